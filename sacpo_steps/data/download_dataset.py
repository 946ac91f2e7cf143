"""Snapshot-download a hub dataset (its data files) into resources/datasets/.

Login nodes have internet, compute nodes may not: every later job reads only
the local copy. Tokens come from the environment (HF_TOKEN), never from config.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import atomic_output, setup_logging

log = logging.getLogger("sacpo.download_dataset")

DATASET_PATTERNS = ["*.parquet", "*.jsonl", "*.json", "*.md", "**/*.parquet", "**/*.jsonl",
                    "**/*.json"]


def download_dataset(repo_id: str, revision: str, out: str | Path) -> Path:
    """Snapshot a hub dataset (data files only) into `out`, atomically."""
    from huggingface_hub import snapshot_download

    out = Path(out)
    with atomic_output(out, is_dir=True) as tmp:
        log.info("downloading dataset %s@%s", repo_id, revision)
        snapshot_download(repo_id=repo_id, repo_type="dataset", revision=revision,
                          local_dir=tmp, allow_patterns=DATASET_PATTERNS)
        if not any(p.suffix in {".parquet", ".jsonl", ".json"} for p in tmp.rglob("*")
                   if ".cache" not in p.parts):
            raise InputError(f"dataset {repo_id}@{revision} has no parquet or JSON files",
                             field="preference_sources.repo_id")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sacpo_steps download_dataset", description=__doc__)
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--revision", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    download_dataset(args.repo_id, args.revision, args.out)
