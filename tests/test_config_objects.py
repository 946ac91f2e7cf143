"""The typed settings the plan builds once: a node's, a judge's, a generation's. Each
checks its values in its constructor, survives the JSON a step gets, and makes a step
run by hand refuse what the plan would."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sacpo_steps.core.errors import InputError
from sacpo_steps.evaluation.generation_settings import GenerationSettings
from sacpo_steps.evaluation.judges.registry import JudgeConfig
from sacpo_steps.plan import load_plan
from sacpo_steps.training.node import NodeSettings
from sacpo_steps.training.settings import TrainingConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo():
    return load_plan(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))


def test_the_plan_hands_out_typed_frozen_settings(demo):
    node = demo.nodes["dpo_h"]
    assert isinstance(node.settings, NodeSettings) and isinstance(node.training, TrainingConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        node.settings.beta = 2.0  # type: ignore[misc]
    assert all(isinstance(j, JudgeConfig) for j in demo.judges.values())
    assert set(demo.judges) == set(demo.prompt_sets)


@pytest.mark.parametrize("beta", [0, -0.1, True, "0.1", None])
def test_a_node_refuses_a_bad_beta_naming_its_field(beta):
    with pytest.raises(InputError) as err:
        NodeSettings("dpo", beta, TrainingConfig.from_dict({}), where="models.safe")
    assert err.value.field == "models.safe.beta"


def test_a_node_refuses_an_unknown_loss_and_stage2_arguments_that_break_theorem1():
    training = TrainingConfig.from_dict({"trl": {"f_divergence_type": "js_divergence"}})
    with pytest.raises(InputError) as err:
        NodeSettings("simpo", 0.1, TrainingConfig.from_dict({}), where="models.x")
    assert err.value.field == "models.x.loss" and "known losses" in err.value.message
    NodeSettings("dpo", 0.1, training)  # stage 1: allowed
    with pytest.raises(InputError, match="Theorem 1"):
        NodeSettings("dpo", 0.1, training, stage2=True, where="models.safe")


def test_node_settings_survive_the_steps_json_and_come_back_equal(demo):
    for name, node in demo.nodes.items():
        spec = json.loads(json.dumps(demo.align_spec(name, 0)))
        assert NodeSettings.from_dict(spec) == node.settings
        assert spec["stage2"] == (node.parent != demo.sft)


def test_training_settings_are_checked_against_the_schema_and_fill_lora_defaults():
    with pytest.raises(InputError) as err:
        TrainingConfig.from_dict({"learning_rate": "1e-4"})  # YAML reads this as a string
    assert err.value.field == "training.learning_rate"
    lora = TrainingConfig.from_dict({"lora": {"r": 8}}).lora
    assert lora == {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
    with pytest.raises(InputError, match="needs a `lora` adapter"):
        TrainingConfig.from_dict({"quantization": "4bit"})


@pytest.mark.parametrize("key, value", [("max_new_tokens", 0), ("batch_size", True),
                                        ("stop_markers", "USER:"), ("prompt_template", ""),
                                        ("max_prompt_length", -3), ("seed", 1.5)])
def test_generation_settings_refuse_bad_values_naming_the_key(key, value):
    good = {"prompt_template": "USER: {prompt} ASSISTANT:", "stop_markers": ["USER:"],
            "max_new_tokens": 8, "batch_size": 4, "seed": 0, "max_prompt_length": None}
    assert GenerationSettings.from_dict(good).to_dict() == good
    with pytest.raises(InputError) as err:
        GenerationSettings.from_dict({**good, key: value})
    assert err.value.field == key


def test_a_judge_is_read_once_into_its_backend_protocol_and_settings():
    judge = JudgeConfig.read({"backend": "openai", "model": "m", "repetitions": 3,
                              "templates": {"helpfulness": "v2"}})
    assert judge.backend.name == "openai" and judge.protocol.repetitions == 3
    assert judge.settings.model == "m"
    # params stay as the config gives them: no defaults filled into the section
    assert judge.to_dict() == {"backend": "openai", "model": "m", "repetitions": 3,
                               "templates": {"helpfulness": "v2"}}
    assert "templates" not in judge.for_criterion("harmlessness").to_dict()
    with pytest.raises(InputError) as err:
        JudgeConfig.read({"backend": "openai", "reward_model": "x"}, "evaluation.judge")
    assert err.value.field == "evaluation.judge.reward_model"
    assert "score_model" in err.value.message


def _step(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sacpo_steps", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_steps_run_by_hand_refuse_bad_settings_before_any_work(tmp_path):
    """The steps rebuild their settings through the same constructors: bad JSON is an
    error naming the field, exit status 2, and nothing written."""
    spec = {"name": "x", "parent": "sft", "data": "d", "loss": "dpo", "beta": -1,
            "training": {}, "prompt_template": "{prompt}", "seed": 0}
    out = tmp_path / "model"
    proc = _step("align", "--parent-dir", str(tmp_path), "--data", str(tmp_path / "d.jsonl"),
                 "--out", str(out), "--spec", json.dumps(spec))
    assert proc.returncode == 2 and "beta" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()
    gen = {"prompt_template": "{prompt}", "stop_markers": [], "max_new_tokens": 0,
           "batch_size": 4}
    answers = tmp_path / "answers.jsonl"
    proc = _step("generate", "--model-dir", str(tmp_path), "--model-name", "m", "--prompts",
                 str(tmp_path / "p.jsonl"), "--out", str(answers), "--spec", json.dumps(gen))
    assert proc.returncode == 2 and "max_new_tokens" in proc.stderr, proc.stderr[-2000:]
    assert not answers.exists()
