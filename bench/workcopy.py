"""A fresh working copy of the workflow, for benches that run Snakemake outside the repo."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ["Snakefile", "workflow", "config", "profiles", "sacpo_steps", "environment.yml"]


def fresh_copy(work: Path) -> Path:
    """Copy what a run needs into `work`, emptied first (no results, logs or caches)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for name in PARTS:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, work / name)
    return work
