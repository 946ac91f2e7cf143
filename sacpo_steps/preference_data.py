"""PKU-SafeRLHF-30K adapter: one table of rated response pairs -> the four training sets.

SACPO aligns for helpfulness and for safety in separate steps, each from its own
preference signal, so the same rows are turned into a helpfulness set (from
`better_response_id`) and a safety set (from `safer_response_id` / the per-response
safety flags), each in pairwise (DPO) and unpaired (KTO) form.

Texts are kept raw: the prompt template is the training step's business, so the
same prepared data serves every base model.

Every row is checked before anything is written. A bad row is an `InputError`
naming file, row (1-based line for JSONL, 1-based record for Parquet) and field,
or, with `on_bad_row="skip"`, is dropped and counted by reason in `summary.json`.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import numbers
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sacpo_steps.errors import InputError
from sacpo_steps.fileio import atomic_output, setup_logging, write_json, write_jsonl

log = logging.getLogger("sacpo")

TEXT_FIELDS = ("prompt", "response_0", "response_1")
SAFE_FIELDS = ("is_response_0_safe", "is_response_1_safe")
ID_FIELDS = ("better_response_id", "safer_response_id")
REQUIRED_FIELDS = TEXT_FIELDS + SAFE_FIELDS + ID_FIELDS

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES

OUTPUT_NAMES = ("helpfulness_pairs", "safety_pairs", "helpfulness_kto", "safety_kto")
ON_BAD_ROW = ("error", "skip")

# how many skipped rows are logged one by one before only the counts are
_LOG_SKIPPED_ROWS = 10


class _BadRow(Exception):
    """One row's first problem: `reason` is the counter key, `detail` the specifics."""

    def __init__(self, reason: str, field: str | None = None, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.detail = detail

    def to_input_error(self, path: str | Path, row: int) -> InputError:
        msg = f"{self.reason} ({self.detail})" if self.detail else self.reason
        return InputError(msg, path=path, row=row, field=self.field)


class _SkipLog:
    """Counts skipped rows by reason and logs the first few with their location."""

    def __init__(self, counter: collections.Counter[str]) -> None:
        self.counter = counter
        self.logged = 0

    def add(self, bad: _BadRow, path: str | Path, row: int) -> None:
        self.counter[bad.reason] += 1
        if self.logged < _LOG_SKIPPED_ROWS:
            log.warning("skipping %s", bad.to_input_error(path, row))
            self.logged += 1
            if self.logged == _LOG_SKIPPED_ROWS:
                log.warning("further skipped rows are only counted")


def _check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, not {on_bad_row!r}")


def _progress(total: int, unit: str, desc: str) -> Any:
    """A tqdm bar on stderr, silent when stderr is not a terminal (e.g. a Snakemake log)."""
    import sys

    from tqdm import tqdm

    return tqdm(
        total=total,
        unit=unit,
        unit_scale=unit == "B",
        desc=desc,
        file=sys.stderr,
        disable=None,
        leave=False,
    )


# --------------------------------------------------------------------------- reading


def _split_pattern(split: str) -> re.Pattern[str]:
    # the split name as a whole token: "train" matches data/train-0000.parquet, not pretrain/
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(split)}(?![A-Za-z0-9])")


def find_split_files(directory: str | Path, split: str = "train") -> list[Path]:
    """The data files of `split` in a downloaded dataset folder, in sorted (shard) order.

    Hidden folders (e.g. a hub snapshot's `.cache/`) are ignored.
    """
    directory = Path(directory)
    pattern = _split_pattern(split)
    found = []
    for p in directory.rglob("*"):
        rel = p.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in SUFFIXES and p.is_file() and pattern.search(rel.as_posix()):
            found.append(p)
    found.sort(key=lambda p: p.relative_to(directory).as_posix())
    if not found:
        raise InputError(
            f"no data files for split '{split}' (looked for {', '.join(SUFFIXES)} files "
            f"whose path contains '{split}')",
            path=directory,
        )
    return found


def _resolve_files(path: str | Path, split: str) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        return find_split_files(path, split)
    if not path.exists():
        raise InputError("file not found", path=path)
    if path.suffix.lower() not in SUFFIXES:
        raise InputError(
            f"unsupported file type '{path.suffix}' (expected one of {', '.join(SUFFIXES)})",
            path=path,
        )
    return [path]


def _parse_line(raw: bytes) -> dict[str, Any]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadRow("not valid UTF-8", detail=f"{exc.reason} at byte {exc.start + 1}") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _BadRow(
            "malformed JSON",
            detail=f"{exc.msg} at column {exc.colno}; expected one object per line",
        ) from None
    if not isinstance(obj, dict):
        raise _BadRow("not a JSON object", detail=f"got {type(obj).__name__}")
    return obj


def _read_jsonl(
    path: Path, on_bad_row: str, skip_log: _SkipLog
) -> list[tuple[int, dict[str, Any]]]:
    """Parse line by line from bytes, so a bad encoding is reported with its line number."""
    rows: list[tuple[int, dict[str, Any]]] = []
    n_nonblank = 0
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror or exc})", path=path) from None
    with fh, _progress(path.stat().st_size, "B", path.name) as bar:
        for lineno, raw in enumerate(fh, start=1):
            bar.update(len(raw))
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark is not part of the data
            if not raw.strip():
                continue
            n_nonblank += 1
            try:
                rows.append((lineno, _parse_line(raw)))
            except _BadRow as bad:
                if on_bad_row == "error":
                    raise bad.to_input_error(path, lineno) from None
                skip_log.add(bad, path, lineno)
    if n_nonblank == 0:
        raise InputError("empty file (no rows)", path=path)
    return rows


def _read_parquet(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Read only the schema's columns (extras may be huge or of odd types) as Python values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        pf = pq.ParquetFile(path)
        columns = [c for c in REQUIRED_FIELDS if c in pf.schema_arrow.names]
        total = pf.metadata.num_rows
        with _progress(total, "rows", path.name) as bar:
            for batch in pf.iter_batches(columns=columns, batch_size=4096):
                records = batch.to_pylist() if columns else [{} for _ in range(batch.num_rows)]
                for rec in records:
                    rows.append((len(rows) + 1, rec))
                bar.update(batch.num_rows)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"cannot read as Parquet ({exc})", path=path) from None
    if not rows:
        raise InputError("empty file (no rows)", path=path)
    return rows


def _read_file(path: Path, on_bad_row: str, skip_log: _SkipLog) -> list[tuple[int, dict[str, Any]]]:
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return _read_parquet(path)
    return _read_jsonl(path, on_bad_row, skip_log)


def read_table(
    path: str | Path,
    split: str = "train",
    on_bad_row: str = "error",
    skipped: collections.Counter[str] | None = None,
) -> list[tuple[int, dict[str, Any]]]:
    """Read a JSONL/Parquet file, or the `split` files of a dataset folder, as (row, record).

    Only unreadable lines (bad UTF-8, malformed JSON, not an object) are judged here;
    with `on_bad_row="skip"` they are dropped and counted into `skipped`. Field
    checks are `validate_rows`'s job. For a folder the shards are concatenated and
    row numbers restart in each shard (`prepare` reports problems per shard).
    """
    _check_on_bad_row(on_bad_row)
    skip_log = _SkipLog(skipped if skipped is not None else collections.Counter())
    rows: list[tuple[int, dict[str, Any]]] = []
    for f in _resolve_files(path, split):
        rows.extend(_read_file(f, on_bad_row, skip_log))
    return rows


# --------------------------------------------------------------------------- validation


def _is_bool(value: Any) -> bool:
    # numpy.bool_ is not a Python bool (nor an int), but parquet/pandas readers may yield it
    t = type(value)
    return isinstance(value, bool) or (t.__module__ == "numpy" and t.__name__ in ("bool", "bool_"))


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python; a flag is not a valid id
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def _type_name(value: Any) -> str:
    return "bool" if _is_bool(value) else type(value).__name__


def _check_row(record: Any) -> dict[str, Any]:
    """Return the record's fields as plain Python values, or raise its first problem."""
    if not isinstance(record, dict):
        raise _BadRow("not a JSON object", detail=f"got {type(record).__name__}")
    for f in REQUIRED_FIELDS:
        if f not in record:
            raise _BadRow(f"missing field '{f}'", field=f)
        if record[f] is None:
            raise _BadRow(f"null field '{f}'", field=f)
    out: dict[str, Any] = {}
    for f in TEXT_FIELDS:
        v = record[f]
        if not isinstance(v, str):
            raise _BadRow(f"wrong type for '{f}'", f, f"expected str, got {_type_name(v)}")
        if not v.strip():
            raise _BadRow(f"empty text in '{f}'", f, "empty or whitespace only")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _BadRow(f"invalid unicode in '{f}'", f, exc.reason) from None
        out[f] = str(v)
    for f in SAFE_FIELDS:
        v = record[f]
        if not _is_bool(v):
            raise _BadRow(f"wrong type for '{f}'", f, f"expected bool, got {_type_name(v)}")
        out[f] = bool(v)
    for f in ID_FIELDS:
        v = record[f]
        if not _is_int(v):
            raise _BadRow(f"wrong type for '{f}'", f, f"expected int 0 or 1, got {_type_name(v)}")
        if int(v) not in (0, 1):
            raise _BadRow(f"invalid id in '{f}'", f, f"expected 0 or 1, got {int(v)}")
        out[f] = int(v)
    if out["response_0"].strip() == out["response_1"].strip():
        raise _BadRow("identical responses", "response_1", "same text as response_0")
    return out


def validate_rows(
    rows: Iterable[tuple[int, Any]],
    path: str | Path,
    on_bad_row: str = "error",
) -> tuple[list[dict[str, Any]], collections.Counter[str]]:
    """Check every (row number, record); return the clean records and skips by reason.

    Clean records carry `source_row` and only the schema's fields, as Python
    bool/int/str. In "error" mode the first bad row raises an `InputError`.
    """
    _check_on_bad_row(on_bad_row)
    skipped: collections.Counter[str] = collections.Counter()
    skip_log = _SkipLog(skipped)
    clean: list[dict[str, Any]] = []
    for rowno, record in rows:
        try:
            rec = _check_row(record)
        except _BadRow as bad:
            if on_bad_row == "error":
                raise bad.to_input_error(path, rowno) from None
            skip_log.add(bad, path, rowno)
            continue
        rec["source_row"] = rowno
        clean.append(rec)
    return clean, skipped


# --------------------------------------------------------------------------- building


def _pair(rec: dict[str, Any], chosen_id: int) -> dict[str, Any]:
    return {
        "prompt": rec["prompt"],
        "chosen": rec[f"response_{chosen_id}"],
        "rejected": rec[f"response_{1 - chosen_id}"],
        "source_row": rec["source_row"],
    }


def _kto(rec: dict[str, Any], response_id: int, label: bool) -> dict[str, Any]:
    return {
        "prompt": rec["prompt"],
        "completion": rec[f"response_{response_id}"],
        "label": bool(label),
        "source_row": rec["source_row"],
    }


def build_datasets(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Turn validated records into the DPO pair sets and the KTO (unpaired) sets."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in OUTPUT_NAMES}
    for rec in rows:
        better = rec["better_response_id"]
        out["helpfulness_pairs"].append(_pair(rec, better))
        out["safety_pairs"].append(_pair(rec, rec["safer_response_id"]))
        out["helpfulness_kto"].append(_kto(rec, better, True))
        out["helpfulness_kto"].append(_kto(rec, 1 - better, False))
        for i in (0, 1):
            out["safety_kto"].append(_kto(rec, i, rec[f"is_response_{i}_safe"]))
    return out


def _output_stats(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    stats: dict[str, Any] = {"file": f"{name}.jsonl", "rows": len(rows)}
    if name.endswith("_kto"):
        n_des = sum(1 for r in rows if r["label"])
        n_und = len(rows) - n_des
        stats["n_desirable"] = n_des
        stats["n_undesirable"] = n_und
        # KTO's class-balance weight: desirable:undesirable examples, None when undefined
        stats["undesirable_weight"] = n_des / n_und if n_und else None
    return stats


# --------------------------------------------------------------------------- step


def prepare(
    input_path: str | Path,
    out_dir: str | Path,
    split: str = "train",
    on_bad_row: str = "error",
) -> dict[str, Any]:
    """Read, check and convert the input; write the output folder atomically; return summary.

    Everything is validated before the folder is created, and the folder appears
    only once complete, so a failure leaves nothing (and keeps an older good copy).
    """
    _check_on_bad_row(on_bad_row)
    files = _resolve_files(input_path, split)
    skipped: collections.Counter[str] = collections.Counter()
    skip_log = _SkipLog(skipped)
    clean: list[dict[str, Any]] = []
    for f in files:
        file_rows = _read_file(f, on_bad_row, skip_log)
        kept, file_skipped = validate_rows(file_rows, f, on_bad_row)
        skipped.update(file_skipped)
        clean.extend(kept)
    n_skipped = sum(skipped.values())
    rows_read = len(clean) + n_skipped
    reasons = ", ".join(f"{r}: {n}" for r, n in skipped.most_common()) or "none"
    if n_skipped:
        log.warning("skipped %d of %d rows (%s)", n_skipped, rows_read, reasons)
    if not clean:
        raise InputError(
            f"all {rows_read} rows are bad, nothing kept (skipped: {reasons})", path=input_path
        )

    datasets = build_datasets(clean)
    summary: dict[str, Any] = {
        "input": str(input_path),
        "input_files": [str(f) for f in files],
        "split": split,
        "on_bad_row": on_bad_row,
        "rows_read": rows_read,
        "rows_kept": len(clean),
        "skipped": dict(skipped.most_common()),
        "outputs": {name: _output_stats(name, rows) for name, rows in datasets.items()},
    }
    with atomic_output(out_dir, is_dir=True) as tmp:
        for name, rows in datasets.items():
            write_jsonl(tmp / f"{name}.jsonl", rows)
        write_json(tmp / "summary.json", summary)
    log.info(
        "wrote %s: %d of %d rows kept; %s",
        out_dir,
        len(clean),
        rows_read,
        ", ".join(f"{n}={s['rows']}" for n, s in summary["outputs"].items()),
    )
    return summary


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sacpo_steps preference_data",
        description="Convert a PKU-SafeRLHF(-30K) table into helpfulness/safety DPO and KTO sets.",
    )
    p.add_argument("--input", required=True, help="JSONL/Parquet file or dataset folder")
    p.add_argument("--out-dir", required=True, help="output folder (written atomically)")
    p.add_argument("--split", default="train", help="split to pick from a folder (default train)")
    p.add_argument(
        "--on-bad-row",
        choices=ON_BAD_ROW,
        default="error",
        help="stop at the first bad row (default) or skip and count bad rows",
    )
    p.add_argument("--log", default=None, help="also log to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """CLI entry; bad input raises InputError for the dispatcher to report (exit 2)."""
    args = _parse_args(argv)
    setup_logging(args.log)
    prepare(args.input, args.out_dir, split=args.split, on_bad_row=args.on_bad_row)
