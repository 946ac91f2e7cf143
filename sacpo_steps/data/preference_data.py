"""The preference_data step: a preference table in a registered format -> training sets.

The input's format (`data_formats.FORMATS`, default PKU-SafeRLHF-30K) decides how
each row is checked and which sets it yields: `{criterion}_pairs.jsonl` (DPO) and
`{criterion}_kto.jsonl` (KTO) for each criterion the source yields, plus
`summary.json`. A PKU-SafeRLHF table yields helpfulness and safety from the same
rows; a single-criterion format (TRL, HH-RLHF) yields the one its source names.

Texts are kept raw: the prompt template is the training step's business, so the
same prepared data serves every base model.

Every row is checked before anything is written. A bad row is an `InputError`
naming file, row (1-based line for JSONL, 1-based record for Parquet) and field,
or, with `on_bad_row="skip"`, is dropped and counted by reason in `summary.json`.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import logging
import re
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import (
    atomic_output,
    json_object_arg,
    setup_logging,
    write_json,
    write_jsonl,
)
from sacpo_steps.data.formats import (
    DEFAULT_FORMAT,
    BadRow,
    SourceFormat,
    get_format,
    resolve_format,
)

log = logging.getLogger("sacpo")

PARQUET_SUFFIXES = (".parquet",)
GZIP_JSONL_SUFFIXES = (".jsonl.gz", ".json.gz")
JSONL_SUFFIXES = (".jsonl", ".json")
SUFFIXES = JSONL_SUFFIXES + GZIP_JSONL_SUFFIXES + PARQUET_SUFFIXES

ON_BAD_ROW = ("error", "skip")

# how many skipped rows are logged one by one before only the counts are
_LOG_SKIPPED_ROWS = 10


class _SkipLog:
    """Counts skipped rows by reason and logs the first few with their location."""

    def __init__(self, counter: collections.Counter[str]) -> None:
        self.counter = counter
        self.logged = 0

    def add(self, bad: BadRow, path: str | Path, row: int) -> None:
        self.counter[bad.reason] += 1
        if self.logged < _LOG_SKIPPED_ROWS:
            log.warning("skipping %s", bad.to_input_error(path, row))
            self.logged += 1
            if self.logged == _LOG_SKIPPED_ROWS:
                log.warning("further skipped rows are only counted")


def _check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, not {on_bad_row!r}")


def _progress(total: int | None, unit: str, desc: str) -> Any:
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


def _file_kind(path: Path) -> str | None:
    """'parquet', 'jsonl.gz' or 'jsonl' by the file name's ending; None if unsupported."""
    name = path.name.lower()
    for kind, suffixes in (("parquet", PARQUET_SUFFIXES), ("jsonl.gz", GZIP_JSONL_SUFFIXES),
                           ("jsonl", JSONL_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


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
        if _file_kind(p) and p.is_file() and pattern.search(rel.as_posix()):
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
    if _file_kind(path) is None:
        raise InputError(
            f"unsupported file type '{path.suffix}' (expected one of {', '.join(SUFFIXES)})",
            path=path,
        )
    return [path]


def _parse_line(raw: bytes) -> dict[str, Any]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRow("not valid UTF-8", detail=f"{exc.reason} at byte {exc.start + 1}") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRow(
            "malformed JSON",
            detail=f"{exc.msg} at column {exc.colno}; expected one object per line",
        ) from None
    if not isinstance(obj, dict):
        raise BadRow("not a JSON object", detail=f"got {type(obj).__name__}")
    return obj


def _read_jsonl(
    path: Path, on_bad_row: str, skip_log: _SkipLog
) -> list[tuple[int, dict[str, Any]]]:
    """Parse line by line from bytes, so a bad encoding is reported with its line number.

    A gzipped file is decompressed on the fly; its progress counts decompressed bytes.
    """
    rows: list[tuple[int, dict[str, Any]]] = []
    n_nonblank = 0
    gzipped = _file_kind(path) == "jsonl.gz"
    try:
        fh = gzip.open(path, "rb") if gzipped else open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror or exc})", path=path) from None
    total = None if gzipped else path.stat().st_size
    with fh, _progress(total, "B", path.name) as bar:
        try:
            for lineno, raw in enumerate(fh, start=1):
                bar.update(len(raw))
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte-order mark is not part of the data
                if not raw.strip():
                    continue
                n_nonblank += 1
                try:
                    rows.append((lineno, _parse_line(raw)))
                except BadRow as bad:
                    if on_bad_row == "error":
                        raise bad.to_input_error(path, lineno) from None
                    skip_log.add(bad, path, lineno)
        except (OSError, EOFError, zlib.error) as exc:
            # mostly a gzip stream: truncated, or not gzip at all
            what = "as gzip " if gzipped else ""
            raise InputError(f"cannot read {what}({exc})", path=path) from None
    if n_nonblank == 0:
        raise InputError("empty file (no rows)", path=path)
    return rows


def _read_parquet(path: Path, columns: tuple[str, ...] | None) -> list[tuple[int, dict[str, Any]]]:
    """Read the format's columns (extras may be huge or of odd types) as Python values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        wanted = names if columns is None else [c for c in columns if c in names]
        total = pf.metadata.num_rows
        with _progress(total, "rows", path.name) as bar:
            for batch in pf.iter_batches(columns=wanted, batch_size=4096):
                records = batch.to_pylist() if wanted else [{} for _ in range(batch.num_rows)]
                for rec in records:
                    rows.append((len(rows) + 1, rec))
                bar.update(batch.num_rows)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"cannot read as Parquet ({exc})", path=path) from None
    if not rows:
        raise InputError("empty file (no rows)", path=path)
    return rows


def _read_file(path: Path, on_bad_row: str, skip_log: _SkipLog,
               columns: tuple[str, ...] | None) -> list[tuple[int, dict[str, Any]]]:
    if _file_kind(path) == "parquet":
        return _read_parquet(path, columns)
    return _read_jsonl(path, on_bad_row, skip_log)


def read_table(
    path: str | Path,
    split: str = "train",
    on_bad_row: str = "error",
    skipped: collections.Counter[str] | None = None,
    *,
    format: str | None = None,
) -> list[tuple[int, dict[str, Any]]]:
    """Read a JSONL(.gz)/Parquet file, or the `split` files of a folder, as (row, record).

    Only unreadable lines (bad UTF-8, malformed JSON, not an object) are judged here;
    with `on_bad_row="skip"` they are dropped and counted into `skipped`. Field
    checks are `validate_rows`'s job. For a folder the shards are concatenated and
    row numbers restart in each shard (`prepare` reports problems per shard).
    `format` picks the Parquet columns read (default: the default format's).
    """
    _check_on_bad_row(on_bad_row)
    columns = get_format(DEFAULT_FORMAT if format is None else format).columns
    skip_log = _SkipLog(skipped if skipped is not None else collections.Counter())
    rows: list[tuple[int, dict[str, Any]]] = []
    for f in _resolve_files(path, split):
        rows.extend(_read_file(f, on_bad_row, skip_log, columns))
    return rows


# --------------------------------------------------------------------------- validation


def _validate(
    rows: Iterable[tuple[int, Any]], path: str | Path, on_bad_row: str, source: SourceFormat
) -> tuple[list[dict[str, Any]], collections.Counter[str]]:
    skipped: collections.Counter[str] = collections.Counter()
    skip_log = _SkipLog(skipped)
    clean: list[dict[str, Any]] = []
    check_row = source.format.check_row
    for rowno, record in rows:
        try:
            rec = check_row(record, source.options)
        except BadRow as bad:
            if on_bad_row == "error":
                raise bad.to_input_error(path, rowno) from None
            skip_log.add(bad, path, rowno)
            continue
        rec["source_row"] = rowno
        clean.append(rec)
    return clean, skipped


def validate_rows(
    rows: Iterable[tuple[int, Any]],
    path: str | Path,
    on_bad_row: str = "error",
    *,
    format: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], collections.Counter[str]]:
    """Check every (row number, record); return the clean records and skips by reason.

    Clean records carry `source_row` and the format's fields as plain Python values.
    In "error" mode the first bad row raises an `InputError`.
    """
    _check_on_bad_row(on_bad_row)
    fmt = get_format(DEFAULT_FORMAT if format is None else format)
    # row checks do not depend on the criterion, but a single-criterion format needs one
    criterion = fmt.criteria[0] if fmt.criterion_from_source else None
    return _validate(rows, path, on_bad_row, resolve_format(fmt.name, criterion, options))


# --------------------------------------------------------------------------- building


def build_datasets(
    rows: Iterable[dict[str, Any]],
    *,
    format: str | None = None,
    criterion: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Turn validated records into the format's pair sets and KTO (unpaired) sets."""
    source = resolve_format(format, criterion, options)
    return source.format.build(list(rows), source.criterion, source.options)


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
    *,
    format: str | None = None,
    criterion: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Read, check and convert the input; write the output folder atomically; return summary.

    `format` names an entry of `data_formats.FORMATS` (None: the default format);
    `criterion` is required by single-criterion formats; `options` are the format's.
    Everything is validated before the folder is created, and the folder appears
    only once complete, so a failure leaves nothing (and keeps an older good copy).
    """
    _check_on_bad_row(on_bad_row)
    source = resolve_format(format, criterion, options)
    files = _resolve_files(input_path, split)
    skipped: collections.Counter[str] = collections.Counter()
    skip_log = _SkipLog(skipped)
    clean: list[dict[str, Any]] = []
    for f in files:
        file_rows = _read_file(f, on_bad_row, skip_log, source.format.columns)
        kept, file_skipped = _validate(file_rows, f, on_bad_row, source)
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

    datasets = source.format.build(clean, source.criterion, source.options)
    expected = set(source.output_names())
    if set(datasets) != expected:  # a format's builder broke the contract
        raise RuntimeError(f"format {source.name!r} built {sorted(datasets)}, "
                           f"expected {sorted(expected)}")
    summary: dict[str, Any] = {
        "input": str(input_path),
        "input_files": [str(f) for f in files],
        "split": split,
        "on_bad_row": on_bad_row,
        "format": source.name,
        "conversational": source.conversational,
        "criterion": source.criterion,
        "options": source.options,
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
        "wrote %s (%s): %d of %d rows kept; %s",
        out_dir,
        source.name,
        len(clean),
        rows_read,
        ", ".join(f"{n}={s['rows']}" for n, s in summary["outputs"].items()),
    )
    return summary


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sacpo_steps preference_data",
        description="Convert a preference table (a registered data format) into "
                    "DPO and KTO training sets.",
    )
    p.add_argument("--input", required=True, help="JSONL(.gz)/Parquet file or dataset folder")
    p.add_argument("--out-dir", required=True, help="output folder (written atomically)")
    p.add_argument("--split", default="train", help="split to pick from a folder (default train)")
    p.add_argument(
        "--on-bad-row",
        choices=ON_BAD_ROW,
        default="error",
        help="stop at the first bad row (default) or skip and count bad rows",
    )
    # no defaults here: the format registry and `prepare` own them
    p.add_argument("--format", default=None,
                   help="data format (a name in sacpo_steps.data.formats.FORMATS)")
    p.add_argument("--criterion", default=None,
                   help="the criterion a single-criterion format's rows express")
    p.add_argument("--options", default=None, help="the format's options as a JSON object")
    p.add_argument("--log", default=None, help="also log to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """CLI entry; bad input raises InputError for the dispatcher to report (exit 2)."""
    args = _parse_args(argv)
    setup_logging(args.log)
    options = json_object_arg(args.options, "--options") if args.options is not None else None
    prepare(args.input, args.out_dir, split=args.split, on_bad_row=args.on_bad_row,
            format=args.format, criterion=args.criterion, options=options)
