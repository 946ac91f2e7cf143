"""The hub download steps, with the hub replaced by a local fake (nothing can be fetched
here): pinned revisions, safetensors only unless opted in, `.bin` conversion, and no
half-written folder on failure."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sacpo_steps.core.errors import InputError
from sacpo_steps.data.download_dataset import download_dataset
from sacpo_steps.models.download_model import download_model
from tests.helpers import make_tiny_model


@pytest.fixture(scope="module")
def bin_snapshot(tmp_path_factory) -> Path:
    """A hub snapshot as older repos ship it: pickled `pytorch_model.bin` weights."""
    import torch
    from safetensors.torch import load_file

    folder = make_tiny_model(tmp_path_factory.mktemp("hub") / "repo")
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    return folder


def fake_hub(monkeypatch, snapshot: Path, calls: list[dict]) -> None:
    """snapshot_download copies `snapshot`, honouring allow_patterns as the hub does."""
    import fnmatch

    import huggingface_hub

    def snapshot_download(*, repo_id, revision, local_dir, allow_patterns, repo_type=None):
        calls.append({"repo_id": repo_id, "revision": revision, "patterns": allow_patterns,
                      "repo_type": repo_type})
        for f in snapshot.rglob("*"):
            rel = f.relative_to(snapshot).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, Path(local_dir) / rel)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_bin_weights_are_converted_only_when_opted_in(tmp_path, monkeypatch, bin_snapshot):
    calls: list[dict] = []
    fake_hub(monkeypatch, bin_snapshot, calls)
    out = tmp_path / "resources" / "models" / "org--m@abc123+safetensors"
    download_model("org/m", "abc123", out, convert_bin=True)
    assert calls[0]["repo_id"] == "org/m" and calls[0]["revision"] == "abc123"
    assert "*.bin" in calls[0]["patterns"]
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    from transformers import AutoModelForCausalLM

    converted = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(bin_snapshot, use_safetensors=False)
    for (name, a), (_, b) in zip(converted.state_dict().items(),
                                 original.state_dict().items(), strict=True):
        assert a.equal(b), name


def test_bin_only_snapshot_without_opt_in_fails_and_leaves_nothing(tmp_path, monkeypatch,
                                                                  bin_snapshot):
    calls: list[dict] = []
    fake_hub(monkeypatch, bin_snapshot, calls)
    out = tmp_path / "models" / "org--m@main"
    with pytest.raises(InputError, match="convert_bin"):
        download_model("org/m", "main", out)
    assert "*.bin" not in calls[0]["patterns"]  # pickles are not even fetched
    assert not out.exists() and not list(out.parent.iterdir())


def test_dataset_without_data_files_is_refused(tmp_path, monkeypatch):
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    (snapshot / "README.md").write_text("# a card, no data\n")
    calls: list[dict] = []
    fake_hub(monkeypatch, snapshot, calls)
    out = tmp_path / "datasets" / "org--d@main"
    with pytest.raises(InputError, match="no parquet or JSON files"):
        download_dataset("org/d", "main", out)
    assert calls[0]["repo_type"] == "dataset" and not out.exists()
    (snapshot / "train.jsonl").write_text(json.dumps({"prompt": "q"}) + "\n")
    download_dataset("org/d", "main", out)
    assert (out / "train.jsonl").is_file()


@pytest.mark.parametrize("step", ["download_model", "download_dataset"])
def test_download_steps_need_a_pinned_revision_on_the_command_line(tmp_path, step):
    proc = subprocess.run([sys.executable, "-m", "sacpo_steps", step, "--repo-id", "org/m",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode != 0 and "--revision" in proc.stderr


def test_sharded_bin_weights_convert_under_the_names_transformers_loads(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from sacpo_steps.models.download_model import convert_bin_weights

    folder = make_tiny_model(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    state = model.state_dict()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, folder / shard)
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    convert_bin_weights(folder)
    assert sorted(p.name for p in folder.glob("model*.safetensors*")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"]
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    for name, tensor in reloaded.state_dict().items():
        assert tensor.equal(state[name]), name
