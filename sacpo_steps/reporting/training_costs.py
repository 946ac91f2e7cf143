"""What each model of a method cost to train, from its model cards (the comparison step).

A model's cost follows its lineage back to the SFT model through the model cards every
align and merge job writes: each align run once (a merge's two parents too), its
optimizer steps, the shared reference passes it read and its trainer's seconds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import read_json
from sacpo_steps.reporting.tables import fmt, md_table

COSTS_NOTE = (
    "A model's cost counts every training run needed to make it from the SFT model: "
    "its own align run and its ancestors' (a merge's two parents too), each once. "
    "`runs`: align runs; `merges`: weight merges (no training); `optimizer_steps`: the "
    "runs' optimizer steps (training.steps); `reference_passes`: distinct shared "
    "reference log-prob files those runs read (reference_logps; a run without one "
    "computes its reference inside the run or needs none: `runs_without_ref_file`); "
    "`train_seconds`: the runs' trainer wall time (training.train_runtime_s). Not "
    "counted: the SFT model, the reference passes' and merges' own time (their files "
    "record none), generation, judging and job start-up. Each value is the mean over "
    "seeds. The `all models` row of a method counts its whole grid, shared ancestors "
    "once; methods are counted separately, so a run two methods share counts in both."
)

_SEED_DIR = re.compile(r"^seed-(\d+)$")


def seed_of_path(path: str | Path) -> int | None:
    """The seed of a file under results/<experiment>/seed-<s>/..., None elsewhere."""
    for part in reversed(Path(path).parts):
        match = _SEED_DIR.match(part)
        if match:
            return int(match[1])
    return None


def read_cards(paths: Sequence[str | Path]) -> dict[int, dict[str, tuple[Path, dict]]]:
    """{seed: {model name: (path, card)}}; the seed comes from the path's seed-<s> folder."""
    cards: dict[int, dict[str, tuple[Path, dict]]] = {}
    for path in map(Path, paths):
        seed = seed_of_path(path)
        if seed is None:
            raise InputError("no seed-<s> folder in the path of this model card", path=path,
                             field="--cards")
        card = read_json(path)
        if not isinstance(card, dict) or not isinstance(card.get("name"), str):
            raise InputError("not a model card (no name)", path=path, field="name")
        name = card["name"]
        if name in cards.setdefault(seed, {}):
            raise InputError(f"model {name!r} of seed {seed} given twice (also "
                             f"{cards[seed][name][0]})", path=path, field="--cards")
        cards[seed][name] = (path, card)
    if not cards:
        raise InputError("no model cards given", field="--cards")
    return cards


# ---- costs ----------------------------------------------------------------------------

def _kind(card: dict) -> str:
    if "merge" in card:
        return "merge"
    if card.get("lineage") and isinstance(card.get("training"), dict):
        return "align"
    return "start"  # the SFT model, or a model the pipeline did not train


def _roots(cards: Mapping[str, tuple[Path, dict]]) -> set[str]:
    """Where lineages start (the SFT model): a missing card of one of them is fine."""
    return {c["lineage"][0].get("parent") for _, c in cards.values()
            if isinstance(c.get("lineage"), list) and c["lineage"]
            and isinstance(c["lineage"][0], dict)}


def ancestry(model: str, cards: Mapping[str, tuple[Path, dict]], seed: int
             ) -> tuple[list[str], list[str]]:
    """(align runs, merges) needed to make `model` from the start model, each once."""
    roots = _roots(cards)
    if model not in cards:
        raise InputError(f"no model card of {model!r} for seed {seed}", field="--cards")
    runs: list[str] = []
    merges: list[str] = []
    seen: set[str] = set()
    stack = [model]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in cards:
            if name in roots:
                continue
            raise InputError(f"no model card of {name!r} (an ancestor of {model!r}) for "
                             f"seed {seed}", field="--cards")
        path, card = cards[name]
        kind = _kind(card)
        if kind == "merge":
            merges.append(name)
            merge = card["merge"]
            for key in ("parent_a", "parent_b"):
                if not isinstance(merge.get(key), str):
                    raise InputError("missing merge parent", path=path, field=f"merge.{key}")
                stack.append(merge[key])
        elif kind == "align":
            runs.append(name)
            own = card["lineage"][-1]
            if not isinstance(own, dict) or not isinstance(own.get("parent"), str):
                raise InputError("the last lineage entry names no parent", path=path,
                                 field="lineage")
            stack.append(own["parent"])
    return runs, merges


def _run_cost(path: Path, card: dict) -> tuple[int, float, str | None]:
    training = card["training"]
    steps = training.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise InputError(f"expected the optimizer steps, got {steps!r}", path=path,
                         field="training.steps")
    seconds = training.get("train_runtime_s")
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        raise InputError(f"expected seconds, got {seconds!r}", path=path,
                         field="training.train_runtime_s") from None
    ref = card.get("reference_logps")
    return steps, seconds, ref if isinstance(ref, str) and ref else None


def cost_of(models: Sequence[str], cards: Mapping[str, tuple[Path, dict]],
            seed: int) -> dict[str, float]:
    """What it takes to make all of `models` in one seed, shared ancestors once."""
    runs: set[str] = set()
    merges: set[str] = set()
    for model in models:
        r, m = ancestry(model, cards, seed)
        runs.update(r)
        merges.update(m)
    steps, seconds, refs, without = 0, 0.0, set(), 0
    for name in sorted(runs):
        s, t, ref = _run_cost(*cards[name])
        steps += s
        seconds += t
        if ref is None:
            without += 1
        else:
            refs.add(ref)
    return {"runs": len(runs), "merges": len(merges), "optimizer_steps": steps,
            "reference_passes": len(refs), "runs_without_ref_file": without,
            "train_seconds": seconds}


COST_COLUMNS = ("runs", "merges", "optimizer_steps", "reference_passes",
                "runs_without_ref_file", "train_seconds")


def costs_table(cards: Mapping[int, Mapping[str, tuple[Path, dict]]],
                methods: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Per method: one row per model, then its whole grid ("all models"); means over seeds."""
    rows = []
    for label, models in methods.items():
        groups = [(m, [m]) for m in models]
        if len(models) > 1:
            groups.append((f"all {len(models)} models", list(models)))
        for name, members in groups:
            per_seed = [cost_of(members, cards[s], s) for s in sorted(cards)]
            row: dict[str, Any] = {"method": label, "model": name, "seeds": len(per_seed)}
            for col in COST_COLUMNS:
                row[col] = float(np.mean([c[col] for c in per_seed]))
            rows.append(row)
    return pd.DataFrame(rows, columns=["method", "model", "seeds", *COST_COLUMNS])


def costs_markdown(table: pd.DataFrame) -> str:
    rows = [[r.method, r.model, fmt(r.runs, 1), fmt(r.merges, 1), fmt(r.optimizer_steps, 1),
             fmt(r.reference_passes, 1), fmt(r.runs_without_ref_file, 1),
             fmt(r.train_seconds, 1), str(r.seeds)] for r in table.itertuples(index=False)]
    return ("# Training cost per method\n\n" + COSTS_NOTE + "\n\n"
            + md_table(["method", "model", "runs", "merges", "optimizer steps",
                         "reference passes", "runs without ref file", "train seconds",
                         "seeds"], rows))
