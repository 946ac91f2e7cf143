"""Records of what made each artifact, and the checks that use them."""

from __future__ import annotations

import json
import shutil

import pytest

from sacpo_steps.core import lineage
from sacpo_steps.core.errors import InputError
from sacpo_steps.training.node import NodeSettings
from tests.helpers import PROMPT_TEMPLATE

TRAINING = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1, "max_length": 64, "warmup_steps": 0.0}


def test_models_of_one_shape_without_records_have_different_fingerprints(tiny_models, tmp_path):
    sft, stage1 = tiny_models["sft"], tiny_models["stage1"]
    assert (sft / "model.safetensors").stat().st_size == \
        (stage1 / "model.safetensors").stat().st_size
    fp_sft, how = lineage.model_fingerprint(sft)
    assert how == "files" and fp_sft != lineage.model_fingerprint(stage1)[0]
    # the card and sacpo.json describe the model; they are not part of its content
    copy = tmp_path / "copy"
    shutil.copytree(sft, copy)
    (copy / "README.md").write_text("another card")
    assert lineage.model_fingerprint(copy) == (fp_sft, "files")


def test_a_record_fingerprint_ignores_paths_and_covers_inputs(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"a": 1}\n')
    one = lineage.make_record("align", settings={"beta": 0.1},
                              inputs={"data": lineage.file_input(data)})
    moved = tmp_path / "elsewhere.jsonl"
    shutil.copy(data, moved)
    two = lineage.make_record("align", settings={"beta": 0.1},
                              inputs={"data": lineage.file_input(moved)})
    assert one["fingerprint"] == two["fingerprint"]
    data.write_text('{"a": 2}\n')
    three = lineage.make_record("align", settings={"beta": 0.1},
                                inputs={"data": lineage.file_input(data)})
    assert three["fingerprint"] != one["fingerprint"]
    assert lineage.differences(one, three) == [
        f"input data is now {three['inputs']['data']['sha256'][:12]} "
        f"(was {one['inputs']['data']['sha256'][:12]})"]
    from importlib.metadata import version

    assert one["libraries"]["trl"] == version("trl")
    assert one["libraries"]["torch"] == version("torch")


def test_an_aligned_model_records_its_parent_data_and_versions(tiny_models, pairs_file, tmp_path):
    from sacpo_steps.training.align import align
    from sacpo_steps.training.settings import TrainingConfig

    out = tmp_path / "stage2"
    align(tiny_models["stage1"], pairs_file, out, name="stage2", parent="stage1",
          data="safety", settings=NodeSettings("dpo", 0.1, TrainingConfig.from_dict(TRAINING)),
          prompt_template=PROMPT_TEMPLATE)
    record = lineage.model_record(out)
    assert record["step"] == "align"
    assert record["inputs"]["parent"]["fingerprint"] == \
        lineage.model_fingerprint(tiny_models["stage1"])[0]
    assert record["inputs"]["data"]["sha256"] == lineage.file_sha256(pairs_file)
    assert record["settings"]["beta"] == 0.1
    from sacpo_steps.core.provenance import source_hash

    assert record["code"] == source_hash("sacpo_steps.training.align")
    assert lineage.model_fingerprint(out) == (record["fingerprint"], "record")


def _reference_file(model, name, pairs_file, out):
    from sacpo_steps.training import ref_logps, reference

    key = reference.reference_key_spec("dpo", TRAINING, PROMPT_TEMPLATE)
    ref_logps.compute(model, pairs_file, out,
                      spec={"reference": name, "data": "safety", **key, "seed": 0})
    return out


def test_a_reference_file_of_another_parent_is_refused_naming_both(tiny_models, pairs_file,
                                                                     tmp_path):
    from sacpo_steps.training.align import align
    from sacpo_steps.training.settings import TrainingConfig

    # both models share the tokenizer: the row keys match, only the reference differs
    table = _reference_file(tiny_models["stage1"], "stage1", pairs_file, tmp_path / "ref.json")
    out = tmp_path / "child"
    with pytest.raises(InputError) as err:
        align(tiny_models["sft"], pairs_file, out, name="child", parent="sft", data="safety",
              settings=NodeSettings("dpo", 0.1, TrainingConfig.from_dict(TRAINING)),
              prompt_template=PROMPT_TEMPLATE, ref_logps=table)
    message = str(err.value)
    assert "reference 'stage1'" in message and "parent is 'sft'" in message
    assert str(table) in message and not out.exists()


def test_a_reference_file_without_a_record_is_refused(tiny_models, pairs_file, tmp_path):
    from sacpo_steps.training.reference import ReferenceTable

    table = _reference_file(tiny_models["stage1"], "stage1", pairs_file, tmp_path / "ref.json")
    old = json.loads(table.read_text())
    old["format"] = 1
    del old["record"]
    table.write_text(json.dumps(old))
    with pytest.raises(InputError, match="before reference files carried a lineage record"):
        ReferenceTable(table)


def test_a_generation_record_describes_its_file(tmp_path):
    out = tmp_path / "gen.jsonl"
    out.write_text('{"prompt_id": "1", "answer": "x"}\n')
    record = lineage.make_record("generate", settings={}, inputs={})
    lineage.write_sidecar(out, record)
    assert lineage.read_sidecar(out)["fingerprint"] == record["fingerprint"]
    assert lineage.file_input(out) == {"path": str(out), "fingerprint": record["fingerprint"],
                                       "from": "record"}
    out.write_text('{"prompt_id": "1", "answer": "edited"}\n')
    with pytest.raises(InputError) as err:
        lineage.read_sidecar(out)
    assert "gen.jsonl.record.json" in str(err.value) and "changed after it was made" in \
        str(err.value)


def test_constant_answers_write_a_record(tmp_path):
    from sacpo_steps.evaluation.constant_answers import constant_answers

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_id": "p1", "prompt": "hi"}\n')
    out = tmp_path / "gen" / "refuse.jsonl"
    constant_answers(prompts, out, model_name="refuse", answer="no.")
    record = lineage.read_sidecar(out)
    assert record["inputs"]["prompts"]["sha256"] == lineage.file_sha256(prompts)
    assert record["settings"] == {"model_name": "refuse", "answer": "no."}


def test_the_report_names_what_is_stale(tiny_models, tmp_path, monkeypatch):
    """A library upgrade reruns nothing; the report lists what it made stale, and what
    has no record (made before records existed)."""
    root = tmp_path / "results"
    (root / "models").mkdir(parents=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_id": "p1", "prompt": "hi"}\n')
    shutil.copytree(tiny_models["sft"], root / "models" / "old")  # no record
    gen = root / "generations" / "m" / "set.jsonl"
    gen.parent.mkdir(parents=True)
    gen.write_text("{}\n")
    lineage.write_sidecar(gen, lineage.make_record(
        "generate", settings={}, inputs={"prompts": lineage.file_input(prompts)}))
    rows = {kind: status for kind, _, status in lineage.report(root)}
    assert rows["generation"] == "ok"
    assert rows["model"].startswith("no record")

    real = lineage.library_versions()
    monkeypatch.setattr(lineage, "library_versions", lambda: {**real, "trl": "9.9.9"})
    rows = {kind: status for kind, _, status in lineage.report(root)}
    assert rows["generation"] == f"libraries changed: trl {real['trl']} -> 9.9.9"

    monkeypatch.undo()
    prompts.write_text('{"prompt_id": "p1", "prompt": "hello"}\n')
    rows = {kind: status for kind, _, status in lineage.report(root)}
    assert rows["generation"] == f"input prompts ({prompts}) changed since"


def test_the_report_cli_exits_non_zero_when_strict(tmp_path, capsys):
    gen = tmp_path / "generations" / "m" / "set.jsonl"
    gen.parent.mkdir(parents=True)
    gen.write_text("{}\n")
    lineage.main([str(tmp_path)])
    assert "STALE" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        lineage.main([str(tmp_path), "--strict"])
    assert exit_.value.code == 1


def test_an_edited_record_or_a_reference_file_without_one_is_refused(tiny_models, pairs_file,
                                                                      tmp_path):
    from sacpo_steps.training.reference import ReferenceTable

    out = tmp_path / "gen.jsonl"
    out.write_text("{}\n")
    lineage.write_sidecar(out, lineage.make_record("generate", settings={"a": 1}, inputs={}))
    side = lineage.sidecar_path(out)
    record = json.loads(side.read_text())
    record["settings"]["a"] = 2
    side.write_text(json.dumps(record))
    with pytest.raises(InputError, match="edited after it was written"):
        lineage.read_sidecar(out)

    table = _reference_file(tiny_models["stage1"], "stage1", pairs_file, tmp_path / "ref.json")
    data = json.loads(table.read_text())
    for broken in (None, {"inputs": "x"}, {"inputs": {}}):
        table.write_text(json.dumps({**data, "record": broken}))
        with pytest.raises(InputError) as err:
            ReferenceTable(table)
        assert err.value.field == "record.inputs.reference"


def test_a_missing_input_is_an_input_error_naming_it(tmp_path):
    with pytest.raises(InputError, match="not found") as err:
        lineage.file_input(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(err.value)


def test_the_report_skips_leftovers_and_names_bad_or_missing_inputs(tiny_models, tmp_path):
    root = tmp_path / "results"
    models = root / "models"
    shutil.copytree(tiny_models["sft"], models / ".stage1.tmp-99")  # a killed job's leftover
    shutil.copytree(tiny_models["sft"], models / "x" / ".trainer" / "checkpoint-2")
    shutil.copytree(tiny_models["sft"], models / "bad")
    (models / "bad" / "sacpo.json").write_text("{not json")
    gen = root / "generations" / "m" / "set.jsonl"
    gen.parent.mkdir(parents=True)
    gen.write_text("{}\n")
    gone = tmp_path / "prompts.jsonl"
    gone.write_text("{}\n")
    lineage.write_sidecar(gen, lineage.make_record(
        "generate", settings={}, inputs={"prompts": lineage.file_input(gone)}))
    gone.unlink()
    rows = lineage.report(root)
    assert [(kind, path) for kind, path, _ in rows] == [
        ("generation", str(gen)), ("model", str(models / "bad"))]
    assert rows[0][2].startswith(f"input prompts missing at {gone}")
    assert "unreadable model record" in rows[1][2]

