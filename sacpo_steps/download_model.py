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

from sacpo_steps.fileio import atomic_output, setup_logging
from sacpo_steps.modelio import check_model_dir

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
        check_model_dir(tmp, role=f"downloaded model {repo_id}")
    return out


def convert_bin_weights(folder: Path) -> None:
    """Convert pickled `.bin` shards to safetensors, loading with weights_only=True."""
    import torch
    from safetensors.torch import save_file

    for bin_file in sorted(folder.glob("*.bin")):
        state = torch.load(bin_file, map_location="cpu", weights_only=True)
        # safetensors refuses shared storage: give each tensor its own
        state = {k: v.contiguous().clone() for k, v in state.items()}
        save_file(state, folder / bin_file.with_suffix(".safetensors").name,
                  metadata={"format": "pt"})
        bin_file.unlink()
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v.replace(".bin", ".safetensors")
                              for k, v in data["weight_map"].items()}
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
