"""Generation (truncation, format) and the SFT checkpoint sources."""

from __future__ import annotations

import json

import pytest

from sacpo_steps.errors import InputError
from sacpo_steps.generate import generate, truncate_answer
from sacpo_steps.sft import link_local
from tests.conftest import PROMPT_TEMPLATE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" first, a. then, b.", "first, a. then, b."),
        (" first, a.\n\nUSER: more", "first, a."),
        (" first, a. USER: how do i", "first, a."),
        (" first, a.\n  \nthen, b.", "first, a."),
        (" line one\nline two", "line one\nline two"),
    ],
)
def test_truncate_answer(text, expected):
    assert truncate_answer(text, ["USER:"]) == expected


def test_generate_writes_generation_format(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": p}) + "\n"
                               for i, p in enumerate(["how do i bake bread?", "hi", "x y z"])))
    out = tmp_path / "gen.jsonl"
    kwargs = dict(model_name="tiny", prompt_template=PROMPT_TEMPLATE, stop_markers=["USER:"],
                  max_new_tokens=8, batch_size=2)
    assert generate(tiny_models["sft"], prompts, out, **kwargs) == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == ["p0", "p1", "p2"]
    assert all(set(r) == {"prompt_id", "prompt", "answer", "model"} for r in rows)
    assert all(r["model"] == "tiny" and "USER:" not in r["answer"] for r in rows)
    # greedy: the same answers again
    out2 = tmp_path / "gen2.jsonl"
    generate(tiny_models["sft"], prompts, out2, **kwargs)
    assert out2.read_text() == out.read_text()


def test_generate_refuses_duplicate_prompt_ids(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "a", "prompt": "x"}) + "\n"
                       + json.dumps({"prompt_id": "a", "prompt": "y"}) + "\n")
    out = tmp_path / "gen.jsonl"
    with pytest.raises(InputError) as err:
        generate(tiny_models["sft"], prompts, out, model_name="m",
                 prompt_template=PROMPT_TEMPLATE, stop_markers=[], max_new_tokens=2,
                 batch_size=2)
    assert "row 2" in str(err.value) and "prompt_id" in str(err.value)
    assert not out.exists()


def test_local_sft_source_links_a_checked_folder(tiny_models, tmp_path):
    out = tmp_path / "results" / "models" / "sft"
    link_local({"local": {"path": str(tiny_models["sft"])}}, out)
    assert (out / "model.safetensors").read_bytes() == \
        (tiny_models["sft"] / "model.safetensors").read_bytes()


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_local_sft_source_refuses_incomplete_folder(tiny_models, tmp_path, missing):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["sft"], broken)
    (broken / missing).unlink()
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        link_local({"local": {"path": str(broken)}}, out)
    assert str(broken) in str(err.value)
    assert not out.exists()
