"""What the figures plot: model info (family and label per model) and the win-rate
and Elo tables turned into points, with the across-seed rows split from each seed's.

Kept apart from the drawing so the checks on the tables (missing columns, models
listed twice, seeds without their summary) read as one piece.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import read_json

log = logging.getLogger("sacpo.figures")  # the figures step's logger: its lines keep their name

_NUMBER_SUFFIX = re.compile(r"^(?P<family>.+)-(?P<label>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


def _fallback(model: str) -> tuple[str, str]:
    match = _NUMBER_SUFFIX.match(model)
    if match:
        return match["family"], match["label"]
    return model, ""


def read_model_info(path: str | Path) -> pd.DataFrame:
    """Read a model info file (CSV or JSON) into columns model, family, label."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path)
    if path.suffix.lower() == ".json":
        data = read_json(path)
        if isinstance(data, dict):
            records = [{"model": m, **(v if isinstance(v, dict) else {"family": v})}
                       for m, v in data.items()]
        elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
            records = data
        else:
            raise InputError("expected an object or a list of objects", path=path)
        table = pd.DataFrame.from_records(records)
    else:
        try:
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise InputError(f"not a readable CSV ({exc})", path=path) from None
    for column in ("model", "family"):
        if column not in table.columns:
            raise InputError("missing column", path=path, field=column)
    if "label" not in table.columns:
        table["label"] = ""
    table = table[["model", "family", "label"]].fillna("").astype(str)
    duplicated = table["model"][table["model"].duplicated()].tolist()
    if duplicated:
        raise InputError(f"models listed twice: {duplicated}", path=path, field="model")
    return table


def model_info(models: Sequence[str], info: pd.DataFrame | None = None) -> pd.DataFrame:
    """Family and label for each of `models`, from `info` where given, else the fallback."""
    known = {} if info is None else {r.model: (r.family, r.label)
                                     for r in info.itertuples(index=False)}
    missing = [m for m in models if m not in known]
    if info is not None and missing:
        log.warning("model info lacks %s: family taken from the name", missing)
    rows = [(m, *known.get(m, _fallback(m))) for m in models]
    return pd.DataFrame(rows, columns=["model", "family", "label"])


def two_criteria(table: pd.DataFrame, value: str, x_criterion: str,
                 y_criterion: str, source: str) -> pd.DataFrame:
    """Rows per model with x / y values and CI ends, from a long table with `criterion`."""
    for criterion in (x_criterion, y_criterion):
        if not (table["criterion"] == criterion).any():
            raise InputError(f"no rows for criterion {criterion!r}", path=source,
                             field="criterion")
    twice = table[table.duplicated(["model", "criterion"])]
    if not twice.empty:
        raise InputError(f"models listed twice for a criterion: {twice['model'].tolist()}",
                         path=source, field="model")
    parts = []
    for axis, criterion in (("x", x_criterion), ("y", y_criterion)):
        part = table[table["criterion"] == criterion].set_index("model")
        parts.append(pd.DataFrame({axis: part[value], f"{axis}_low": part["ci_low"],
                                   f"{axis}_high": part["ci_high"]}))
    both = pd.concat(parts, axis=1, join="outer")
    incomplete = both.index[both[["x", "y"]].isna().any(axis=1)].tolist()
    if incomplete:
        log.warning("not plotted (a criterion is missing or has no value): %s", incomplete)
    both = both.drop(index=incomplete)
    return both.rename_axis("model").reset_index()


def with_info(points: pd.DataFrame, info: pd.DataFrame | None) -> pd.DataFrame:
    """`points` plus each model's family and label (`model_info`)."""
    meta = model_info(points["model"].tolist(), info)
    return points.merge(meta, on="model", how="left", validate="one_to_one")


def family_of(points: pd.DataFrame, model: str) -> str | None:
    """The family of `model` in `points`, None when it has no row."""
    match = points.loc[points["model"] == model, "family"]
    return str(match.iloc[0]) if len(match) else None


def require_columns(table: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    """InputError naming the missing columns of the table read from `source`."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"missing columns {missing}", path=source)


def _seed_key(value: object) -> str | int | None:
    """"all", an integer seed, or None (not a seed); CSV cells may be "3", 3 or 3.0."""
    text = str(value).strip()
    if text.lower() == "all":
        return "all"
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if np.isfinite(number) and number == int(number) else None


def split_seeds(table: pd.DataFrame, source: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(rows to plot, per-seed rows or None) of a table that may carry a `seed` column.

    With "all" rows (the across-seed summary) those are plotted and the integer-seed
    rows come back separately for the faint per-seed markers. A single seed without
    an "all" row is plotted as it is; several seeds without one are an error, since
    the across-seed interval is not ours to invent.
    """
    if "seed" not in table.columns:
        return table, None
    keys = table["seed"].map(_seed_key)
    bad = table.loc[keys.isna(), "seed"].unique().tolist()
    if bad:
        raise InputError(f"seed must be an integer or 'all', got {bad}", path=source,
                         field="seed")
    table = table.assign(seed=keys.astype(object))
    is_all = (keys == "all").to_numpy(dtype=bool)
    if not is_all.any():
        if keys.nunique() > 1:
            raise InputError(f"several seeds {sorted(keys.unique())} but no 'all' rows "
                             "(the across-seed summary)", path=source, field="seed")
        return table, None
    return table[is_all], table[~is_all]


def seed_points(rows: pd.DataFrame | None, value: str, x_criterion: str, y_criterion: str,
                source: str, info: pd.DataFrame | None) -> pd.DataFrame | None:
    """Per-seed (model, seed, x, y, family); a seed lacking a criterion is left out."""
    if rows is None or rows.empty:
        return None
    rows = rows[rows["criterion"].isin([x_criterion, y_criterion])]
    twice = rows[rows.duplicated(["model", "seed", "criterion"])]
    if not twice.empty:
        raise InputError("models listed twice for a seed and criterion: "
                         f"{sorted(set(twice['model']))}", path=source, field="model")
    wide = rows.pivot(index=["model", "seed"], columns="criterion", values=value)
    wide = wide.reindex(columns=[x_criterion, y_criterion]).astype(float)
    wide.columns = ["x", "y"]
    wide = wide[np.isfinite(wide.to_numpy()).all(axis=1)].reset_index()
    if wide.empty:
        return None
    meta = model_info(sorted(set(wide["model"])), info)
    return wide.merge(meta[["model", "family"]], on="model", how="left")


def seed_count(rows: pd.DataFrame | None) -> int:
    """How many seeds the per-seed rows hold (0 for None)."""
    return 0 if rows is None else int(rows["seed"].nunique())


def elo_rows(elo: pd.DataFrame, mode: str,
             source: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """(all rows to plot, their `mode` rows, that mode's per-seed rows or None)."""
    require_columns(elo, ("criterion", "mode", "model", "rating", "ci_low", "ci_high"), source)
    elo, per_seed = split_seeds(elo, source)
    rows = elo[elo["mode"] == mode]
    if rows.empty:
        raise InputError(f"no rows with mode {mode!r}", path=source, field="mode")
    if per_seed is not None:
        per_seed = plottable(per_seed[per_seed["mode"] == mode])
    return elo, rows, per_seed


def invalid_rows(rows: pd.DataFrame) -> np.ndarray:
    """Rows the elo step marked invalid (`valid` False: paper mode with a bad rescale)."""
    if "valid" not in rows.columns:
        return np.zeros(len(rows), dtype=bool)
    # read back from CSV the column may be bool, or text when some cells are empty
    valid = rows["valid"].map(lambda v: pd.isna(v) or str(v).strip().lower() in ("true", "1"))
    return ~valid.to_numpy(dtype=bool)


def plottable(rows: pd.DataFrame) -> pd.DataFrame:
    """Valid rows with a finite rating."""
    return rows[~invalid_rows(rows) & np.isfinite(rows["rating"].to_numpy(dtype=float))]
