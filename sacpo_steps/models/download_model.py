"""Snapshot-download a hub model (the SFT or a baseline) into resources/models/.

Run once by a local rule, on a node with internet, at a pinned revision; every
later job reads only the local copy. Weights are taken as safetensors; pickled
`.bin` weights only by explicit opt-in (`convert_bin`), converted with a
weights-only load. Tokens come from the environment (HF_TOKEN), never from config.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import atomic_output, setup_logging
from sacpo_steps.core.lineage import make_record, model_record, sampled_fingerprint
from sacpo_steps.models.folders import LINEAGE_FILE, check_model_dir

log = logging.getLogger("sacpo.download_model")

HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.md"]


def download_model(repo_id: str, revision: str, out: str | Path, *,
                   convert_bin: bool = False) -> Path:
    """Snapshot `repo_id` at `revision` into `out`, atomically; safetensors unless opted out."""
    from huggingface_hub import snapshot_download

    out = Path(out)
    patterns = HUB_PATTERNS + (["*.bin"] if convert_bin else [])
    with atomic_output(out, is_dir=True) as tmp:
        log.info("downloading %s@%s", repo_id, revision)
        snapshot_download(repo_id=repo_id, revision=revision, local_dir=tmp,
                          allow_patterns=patterns)
        if convert_bin and not any(tmp.glob("*.safetensors")):
            convert_bin_weights(tmp)
        if not any(tmp.glob("*.safetensors")):
            raise InputError(f"hub model {repo_id}@{revision} has no safetensors weights (if "
                             f"it ships pickled .bin weights, set `convert_bin: true` to "
                             f"convert them once)", field="convert_bin")
        check_model_dir(tmp, role=f"downloaded model {repo_id}")
        # the record: the hub id and revision asked for, and what arrived (file list,
        # sizes, first and last MiB), so a moved branch is told apart; a model this
        # pipeline made and uploaded keeps its own record
        if model_record(tmp) is not None:
            return out
        record = make_record("download_model", settings={
            "repo_id": repo_id, "revision": revision, "convert_bin": convert_bin},
            inputs={"hub": {"name": repo_id, "fingerprint": sampled_fingerprint(tmp)}})
        (tmp / LINEAGE_FILE).write_text(json.dumps(
            {"name": repo_id, "method": "download", "lineage": [], "record": record},
            indent=2) + "\n", encoding="utf-8")
    return out


def safetensors_name(bin_name: str) -> str:
    """The file transformers looks for in place of a pickled one: `pytorch_model.bin` ->
    `model.safetensors`, `pytorch_model-00001-of-00002.bin` -> `model-00001-of-00002...`."""
    stem = bin_name.removesuffix(".bin")
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model"):]
    return f"{stem}.safetensors"


def convert_bin_weights(folder: Path) -> None:
    """Convert pickled `.bin` shards to safetensors, loading with weights_only=True, under
    the names transformers loads (the index's weight map is rewritten to match)."""
    import torch
    from safetensors.torch import save_file

    for bin_file in sorted(folder.glob("*.bin")):
        state = torch.load(bin_file, map_location="cpu", weights_only=True)
        # safetensors refuses shared storage: give each tensor its own
        state = {k: v.contiguous().clone() for k, v in state.items()}
        save_file(state, folder / safetensors_name(bin_file.name), metadata={"format": "pt"})
        bin_file.unlink()
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: safetensors_name(v) for k, v in data["weight_map"].items()}
        (folder / "model.safetensors.index.json").write_text(json.dumps(data, indent=2))
        index.unlink()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sacpo_steps download_model", description=__doc__)
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--revision", required=True)
    parser.add_argument("--convert-bin", action="store_true",
                        help="accept pickled .bin weights, converted to safetensors")
    parser.add_argument("--out", required=True)
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    download_model(args.repo_id, args.revision, args.out, convert_bin=args.convert_bin)
