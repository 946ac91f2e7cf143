"""Model folders: checks, loading, model cards, thread settings.

A model folder is a standard Hugging Face folder (config.json, safetensors
weights, tokenizer files) plus `sacpo.json`, the machine-readable lineage that
the model card (README.md) renders for humans.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sacpo_steps import seconds_since_start
from sacpo_steps.core.errors import InputError

LINEAGE_FILE = "sacpo.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def set_threads(threads: int | None) -> None:
    """Use exactly the rule's threads, so parallel jobs do not oversubscribe the cores."""
    if not threads:
        return
    import torch

    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def check_model_dir(path: str | Path, *, role: str = "model") -> Path:
    """Refuse anything that is not a loadable model folder, naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{role} folder not found", path=path)
    if not (path / "config.json").is_file():
        raise InputError(f"{role} folder has no config.json", path=path, field="config.json")
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"config.json is not valid JSON ({exc})",
                         path=path / "config.json") from None
    if not any(path.glob("*.safetensors")):
        hint = ""
        if any(path.glob("*.bin")):
            hint = " (it ships pickled .bin weights: set `convert_bin: true` to convert them once)"
        raise InputError(f"{role} folder has no safetensors weights{hint}", path=path,
                         field="*.safetensors")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{role} folder has no tokenizer ({' or '.join(TOKENIZER_FILES)})",
                         path=path, field="tokenizer")
    return path


def read_lineage(path: str | Path) -> dict[str, Any]:
    f = Path(path) / LINEAGE_FILE
    if not f.is_file():
        return {}
    return json.loads(f.read_text(encoding="utf-8"))


def write_model_card(out_dir: str | Path, info: dict[str, Any]) -> None:
    """Write `sacpo.json` and a README.md model card that states the model's lineage.

    `info` holds at least `name`, `method` and `lineage` (a list of stages, oldest
    first, each a dict such as {"name", "loss", "data", "beta", "parent"}).
    """
    out_dir = Path(out_dir)
    (out_dir / LINEAGE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    lineage = info.get("lineage", [])
    base = lineage[-1].get("parent") if lineage else info.get("base_model")
    lines = ["---", "library_name: transformers", "tags:", "- sacpo"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {info['name']}", "", info.get("description", ""), ""]
    if lineage:
        lines += ["## Lineage", "", "| stage | model | parent (init and reference) | data | loss | "
                  "beta |", "|---|---|---|---|---|---|"]
        for i, stage in enumerate(lineage, start=1):
            lines.append(f"| {i} | {stage.get('name', '')} | {stage.get('parent', '')} | "
                         f"{stage.get('data', '')} | {stage.get('loss', '')} | "
                         f"{stage.get('beta', '')} |")
        lines.append("")
    if info.get("training"):
        lines += ["## Training", "", "```json", json.dumps(info["training"], indent=2), "```", ""]
    lines += ["Made by the SACPO pipeline (`sacpo_steps`).", ""]
    (out_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Hard-link files (free on one file system), copying where links are impossible."""
    import shutil

    for item in src.rglob("*"):
        if ".cache" in item.relative_to(src).parts:
            continue
        target = dst / item.relative_to(src)
        if item.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(item, target)
        except OSError:
            shutil.copy2(item, target)


def startup_callback(logger):
    """A trainer callback that logs, once, how long the job took to reach its first step."""
    from transformers import TrainerCallback


    class _Startup(TrainerCallback):
        logged = False

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.logged:
                logger.info("startup: first training step %.2f s after process start",
                            seconds_since_start())
                self.logged = True

    return _Startup()
