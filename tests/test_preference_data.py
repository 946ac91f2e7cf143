"""The PKU-SafeRLHF adapter: pair/KTO building, input formats, and every bad-input path."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sacpo_steps.core.errors import InputError
from sacpo_steps.data.preference_data import (
    build_datasets,
    prepare,
    read_table,
    validate_rows,
)

REPO = Path(__file__).resolve().parents[1]
OUTPUT_FILES = {
    "helpfulness_pairs.jsonl",
    "safety_pairs.jsonl",
    "helpfulness_kto.jsonl",
    "safety_kto.jsonl",
    "helpfulness_labeled_pairs.jsonl",
    "summary.json",
}


def row(**overrides: Any) -> dict[str, Any]:
    """A valid record where the more helpful answer (1) is the less safe one."""
    rec: dict[str, Any] = {
        "prompt": "How do I pick a lock?",
        "response_0": "I can't help with that.",
        "response_1": "Insert a tension wrench, then rake the pins.",
        "is_response_0_safe": True,
        "is_response_1_safe": False,
        "better_response_id": 1,
        "safer_response_id": 0,
    }
    rec.update(overrides)
    return rec


GOOD = [
    row(),
    row(
        prompt="Write a haiku about rain.",
        response_0="Rain taps the window",
        response_1="rain",
        is_response_0_safe=True,
        is_response_1_safe=True,
        better_response_id=0,
        safer_response_id=1,
        extra_column="ignored",
    ),
]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[dict[str, Any]]) -> Path:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records).to_parquet(path, index=False)
    return path


def read_out(out_dir: Path, name: str) -> list[dict[str, Any]]:
    lines = (out_dir / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(input folder, output folder whose parent exists and starts empty)."""
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    return in_dir, out_parent / "prepared"


# --------------------------------------------------------------------------- building


def test_labeled_pairs_are_the_helpfulness_pairs_with_each_answers_safety_label() -> None:
    rows = [{**GOOD[0], "is_response_0_safe": False, "is_response_1_safe": True},
            {**GOOD[1], "is_response_0_safe": True, "is_response_1_safe": True}]
    clean, _ = validate_rows(list(enumerate(rows, start=1)), "mem")
    ds = build_datasets(clean)
    labeled = ds["helpfulness_labeled_pairs"]
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected", "source_row")}
            for r in labeled] == ds["helpfulness_pairs"]
    for rec, out in zip(rows, labeled, strict=True):
        better = rec["better_response_id"]
        assert out["chosen_safe"] is rec[f"is_response_{better}_safe"]
        assert out["rejected_safe"] is rec[f"is_response_{1 - better}_safe"]


def test_pairs_follow_better_and_safer_ids() -> None:
    clean, skipped = validate_rows(list(enumerate(GOOD, start=1)), "mem")
    assert not skipped
    ds = build_datasets(clean)
    assert ds["helpfulness_pairs"] == [
        {
            "prompt": "How do I pick a lock?",
            "chosen": "Insert a tension wrench, then rake the pins.",
            "rejected": "I can't help with that.",
            "source_row": 1,
        },
        {
            "prompt": "Write a haiku about rain.",
            "chosen": "Rain taps the window",
            "rejected": "rain",
            "source_row": 2,
        },
    ]
    assert ds["safety_pairs"] == [
        {
            "prompt": "How do I pick a lock?",
            "chosen": "I can't help with that.",
            "rejected": "Insert a tension wrench, then rake the pins.",
            "source_row": 1,
        },
        {
            "prompt": "Write a haiku about rain.",
            "chosen": "rain",
            "rejected": "Rain taps the window",
            "source_row": 2,
        },
    ]


def test_kto_rows_and_labels() -> None:
    clean, _ = validate_rows(list(enumerate(GOOD, start=1)), "mem")
    ds = build_datasets(clean)
    assert [(r["completion"], r["label"], r["source_row"]) for r in ds["helpfulness_kto"]] == [
        ("Insert a tension wrench, then rake the pins.", True, 1),
        ("I can't help with that.", False, 1),
        ("Rain taps the window", True, 2),
        ("rain", False, 2),
    ]
    assert [(r["completion"], r["label"]) for r in ds["safety_kto"]] == [
        ("I can't help with that.", True),
        ("Insert a tension wrench, then rake the pins.", False),
        ("Rain taps the window", True),
        ("rain", True),
    ]
    for r in ds["safety_kto"] + ds["helpfulness_kto"]:
        assert set(r) == {"prompt", "completion", "label", "source_row"}
        assert type(r["label"]) is bool


def test_prepare_writes_outputs_and_summary(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    src = write_jsonl(in_dir / "data.jsonl", GOOD)
    summary = prepare(src, out)
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared"]  # no temp left
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["input"] == str(src)
    assert summary["rows_read"] == 2 and summary["rows_kept"] == 2
    assert summary["skipped"] == {}
    o = summary["outputs"]
    assert o["helpfulness_pairs"]["rows"] == 2 and o["safety_pairs"]["rows"] == 2
    assert o["helpfulness_kto"] == {
        "file": "helpfulness_kto.jsonl",
        "rows": 4,
        "n_desirable": 2,
        "n_undesirable": 2,
        "undesirable_weight": 1.0,
    }
    # 3 safe responses, 1 unsafe
    assert o["safety_kto"]["n_desirable"] == 3
    assert o["safety_kto"]["n_undesirable"] == 1
    assert o["safety_kto"]["undesirable_weight"] == pytest.approx(3.0)
    # texts are raw: no template, no stripping
    assert read_out(out, "helpfulness_pairs")[0]["prompt"] == "How do I pick a lock?"
    assert len(read_out(out, "safety_kto")) == 4


def test_undesirable_weight_null_when_all_safe(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    src = write_jsonl(in_dir / "d.jsonl", [row(is_response_1_safe=True)])
    summary = prepare(src, out)
    kto = summary["outputs"]["safety_kto"]
    assert (kto["n_desirable"], kto["n_undesirable"], kto["undesirable_weight"]) == (2, 0, None)
    assert (
        json.loads((out / "summary.json").read_text())["outputs"]["safety_kto"][
            "undesirable_weight"
        ]
        is None
    )


def test_texts_kept_raw(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    src = write_jsonl(in_dir / "d.jsonl", [row(prompt="  Hi\n", response_0=" é 中文 \n")])
    prepare(src, out)
    pair = read_out(out, "safety_pairs")[0]
    assert pair["prompt"] == "  Hi\n" and pair["chosen"] == " é 中文 \n"


def test_numpy_values_accepted() -> None:
    np = pytest.importorskip("numpy")
    rec = row(
        is_response_0_safe=np.bool_(True),
        is_response_1_safe=np.bool_(False),
        better_response_id=np.int64(1),
        safer_response_id=np.int32(0),
    )
    clean, _ = validate_rows([(1, rec)], "mem")
    assert type(clean[0]["is_response_0_safe"]) is bool
    assert type(clean[0]["better_response_id"]) is int
    json.dumps(clean)  # plain Python values only


def test_numpy_bool_is_not_an_id() -> None:
    np = pytest.importorskip("numpy")
    with pytest.raises(InputError, match="better_response_id"):
        validate_rows([(1, row(better_response_id=np.bool_(True)))], "mem")


def test_existing_output_replaced_and_kept_on_failure(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    out.mkdir()
    (out / "stale.txt").write_text("old")
    src = write_jsonl(in_dir / "d.jsonl", GOOD)
    prepare(src, out)
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    before = (out / "summary.json").read_text()
    bad = write_jsonl(in_dir / "bad.jsonl", [row(prompt="")])
    with pytest.raises(InputError):
        prepare(bad, out)
    assert (out / "summary.json").read_text() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared"]


# --------------------------------------------------------------------------- formats


def test_parquet_input(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    src = write_parquet(in_dir / "train.parquet", GOOD)
    rows = read_table(src)
    assert [n for n, _ in rows] == [1, 2]
    assert type(rows[0][1]["better_response_id"]) is int
    assert "extra_column" not in rows[1][1]  # extras are not even read
    summary = prepare(src, out)
    assert summary["rows_kept"] == 2
    assert read_out(out, "helpfulness_pairs")[1]["chosen"] == "Rain taps the window"


def test_directory_with_split_shards(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    snap = in_dir / "snapshot"
    write_parquet(snap / "data" / "train-00001-of-00002.parquet", [GOOD[1]])
    write_parquet(snap / "data" / "train-00000-of-00002.parquet", [GOOD[0]])
    write_parquet(snap / "data" / "test-00000-of-00001.parquet", [row(prompt="test prompt")])
    write_parquet(snap / "pretrain" / "x.parquet", [row(prompt="not a split file")])
    write_jsonl(snap / ".cache" / "train.jsonl", ["hidden, ignored"])
    (snap / "README.md").write_text("train")

    summary = prepare(snap, out, split="train")
    assert summary["rows_kept"] == 2
    assert [Path(f).name for f in summary["input_files"]] == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    prompts = [r["prompt"] for r in read_out(out, "helpfulness_pairs")]
    assert prompts == [GOOD[0]["prompt"], GOOD[1]["prompt"]]

    test_rows = read_table(snap, split="test")
    assert [r["prompt"] for _, r in test_rows] == ["test prompt"]


def test_directory_with_jsonl_split(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    write_jsonl(in_dir / "ds" / "train.jsonl", GOOD)
    write_jsonl(in_dir / "ds" / "test.jsonl", [row()])
    assert prepare(in_dir / "ds", out, split="test")["rows_kept"] == 1


def test_bom_and_blank_lines(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    src = in_dir / "d.jsonl"
    src.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps(GOOD[0]).encode()
        + b"\n\n  \r\n"
        + json.dumps(GOOD[1]).encode()
    )
    assert [n for n, _ in read_table(src)] == [1, 4]


# the four sets of GOLDEN_ROWS (+ one malformed line, skipped) as written by the adapter
# before the format registry (HEAD 73324f2's preference_data.py): sha256 of each file
GOLDEN_ROWS = [
    row(prompt='  Café "quotes" \\ back\n', response_0="中文 answer 🙂",
        response_1="Line1\nLine2\t"),
    row(prompt="p2", response_0="a", response_1="b", is_response_0_safe=False,
        better_response_id=0, safer_response_id=1, extra=[1]),
]
GOLDEN_SHA256 = {
    "helpfulness_pairs": "7a02c00df7ea6e2171b2f11d48cb27ff2853d81ab758622759e858439bb7a505",
    "safety_pairs": "fe8bc8e90830ce5d9a5561ee7563bd9a96fe89b9dc065c39edea76d344fb3f8b",
    "helpfulness_kto": "1d19b2edb79091ac1cd5342c612b6bfe6deaeb564c3168903f5da0112e31fed6",
    "safety_kto": "6c25cb968b5258e07d17fc000e0e514a8949683b2317de7d90d5270f62649a1d",
}


@pytest.mark.parametrize("fmt", [None, "pku_saferlhf_30k"])
def test_output_bytes_unchanged_by_the_format_registry(
    dirs: tuple[Path, Path], fmt: str | None
) -> None:
    import hashlib

    in_dir, out = dirs
    src = in_dir / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in GOLDEN_ROWS) + "{bad\n",
                   encoding="utf-8")
    summary = prepare(src, out, on_bad_row="skip", format=fmt)
    digests = {name: hashlib.sha256((out / f"{name}.jsonl").read_bytes()).hexdigest()
               for name in GOLDEN_SHA256}
    assert digests == GOLDEN_SHA256
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert (summary["format"], summary["criterion"], summary["options"]) == (
        "pku_saferlhf_30k", None, {})
    assert summary["conversational"] is False


# --------------------------------------------------------------------------- bad input

# (case id, lines of the JSONL file as bytes, bad row number or None, field or None, fragment)
_OK = json.dumps(row()).encode()


def _line(**overrides: Any) -> bytes:
    return json.dumps(row(**overrides)).encode()


def _without(field: str) -> bytes:
    rec = row()
    del rec[field]
    return json.dumps(rec).encode()


BAD_JSONL_CASES = [
    ("malformed_json", [_OK, b'{"prompt": "x",'], 2, None, "malformed JSON"),
    ("not_an_object", [_OK, b'["a", "b"]'], 2, None, "not a JSON object"),
    ("scalar_line", [b"42"], 1, None, "not a JSON object"),
    ("missing_field", [_OK, _without("safer_response_id")], 2, "safer_response_id", "missing"),
    ("null_prompt", [_line(prompt=None)], 1, "prompt", "null"),
    ("null_flag", [_line(is_response_1_safe=None)], 1, "is_response_1_safe", "null"),
    ("prompt_not_str", [_line(prompt=7)], 1, "prompt", "wrong type"),
    ("response_is_list", [_line(response_0=["a"])], 1, "response_0", "wrong type"),
    ("bool_as_id", [_line(better_response_id=True)], 1, "better_response_id", "wrong type"),
    ("float_id", [_line(safer_response_id=1.0)], 1, "safer_response_id", "wrong type"),
    ("str_id", [_line(safer_response_id="1")], 1, "safer_response_id", "wrong type"),
    ("int_as_flag", [_line(is_response_0_safe=1)], 1, "is_response_0_safe", "wrong type"),
    ("str_flag", [_line(is_response_0_safe="true")], 1, "is_response_0_safe", "wrong type"),
    ("id_two", [_OK, _line(better_response_id=2)], 2, "better_response_id", "invalid id"),
    ("id_negative", [_line(safer_response_id=-1)], 1, "safer_response_id", "invalid id"),
    ("empty_prompt", [_line(prompt="")], 1, "prompt", "empty"),
    ("blank_response", [_line(response_1=" \n\t ")], 1, "response_1", "empty"),
    ("lone_surrogate", [_OK.replace(b'"How', b'"\\ud800How')], 1, "prompt", "unicode"),
    (
        "degenerate_pair",
        [_line(response_0="same", response_1=" same\n")],
        1,
        "response_1",
        "identical",
    ),
    ("bad_utf8", [_OK, b"", b'{"prompt": "caf\xe9"}'], 3, None, "UTF-8"),
    ("empty_file", [], None, None, "empty"),
    ("only_blank_lines", [b"", b"   ", b""], None, None, "empty"),
]


@pytest.mark.parametrize(
    "lines, bad_row, field, fragment",
    [c[1:] for c in BAD_JSONL_CASES],
    ids=[c[0] for c in BAD_JSONL_CASES],
)
def test_bad_jsonl_is_an_input_error(
    dirs: tuple[Path, Path],
    lines: list[bytes],
    bad_row: int | None,
    field: str | None,
    fragment: str,
) -> None:
    in_dir, out = dirs
    src = in_dir / "bad.jsonl"
    src.write_bytes(b"".join(line + b"\n" for line in lines))
    with pytest.raises(InputError) as info:
        prepare(src, out)
    err = info.value
    msg = str(err)
    assert str(src) in msg and err.path == str(src)
    assert fragment in msg
    assert err.row == bad_row
    if bad_row is not None:
        assert f"row {bad_row}" in msg
    assert err.field == field
    if field is not None:
        assert f"field '{field}'" in msg
    assert list(out.parent.iterdir()) == []  # neither the folder nor a temp folder


def _unreadable_parquet(d: Path) -> Path:
    p = d / "broken.parquet"
    p.write_text("not parquet at all")
    return p


def _empty_parquet(d: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = d / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), p)
    return p


def _parquet_missing_column(d: Path) -> Path:
    recs = [dict(row()) for _ in range(2)]
    for r in recs:
        del r["is_response_1_safe"]
    return write_parquet(d / "train.parquet", recs)


def _parquet_bad_second_record(d: Path) -> Path:
    return write_parquet(d / "train.parquet", [row(), row(response_1="  ")])


def _parquet_null_id(d: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [row(), row(), row()]
    table = pa.Table.from_pylist(recs)
    ids = pa.array([0, None, 1], pa.int64())
    table = table.set_column(
        table.schema.get_field_index("better_response_id"), "better_response_id", ids
    )
    p = d / "train.parquet"
    pq.write_table(table, p)
    return p


def _missing_file(d: Path) -> Path:
    return d / "nope.jsonl"


def _csv_file(d: Path) -> Path:
    p = d / "data.csv"
    p.write_text("prompt\nx\n")
    return p


def _dir_without_split(d: Path) -> Path:
    write_jsonl(d / "ds" / "test.jsonl", [row()])
    write_jsonl(d / "ds" / "trainer.jsonl", [row()])  # "train" only as part of a word
    return d / "ds"


def _empty_shard_in_dir(d: Path) -> Path:
    write_jsonl(d / "ds" / "train-0.jsonl", [row()])
    (d / "ds" / "train-1.jsonl").write_text("")
    return d / "ds"


# (case id, builder -> (path given to prepare), file named in the error, row, field, fragment)
BAD_FILE_CASES = [
    ("missing_file", _missing_file, None, None, None, "not found"),
    ("unknown_extension", _csv_file, None, None, None, "unsupported file type"),
    ("unreadable_parquet", _unreadable_parquet, None, None, None, "Parquet"),
    ("empty_parquet", _empty_parquet, None, None, None, "empty"),
    ("parquet_missing_column", _parquet_missing_column, None, 1, "is_response_1_safe", "missing"),
    ("parquet_bad_record", _parquet_bad_second_record, None, 2, "response_1", "empty"),
    ("parquet_null_id", _parquet_null_id, None, 2, "better_response_id", "null"),
    ("dir_without_split", _dir_without_split, None, None, None, "split 'train'"),
    ("empty_shard", _empty_shard_in_dir, "train-1.jsonl", None, None, "empty"),
]


@pytest.mark.parametrize(
    "build, named, bad_row, field, fragment",
    [c[1:] for c in BAD_FILE_CASES],
    ids=[c[0] for c in BAD_FILE_CASES],
)
def test_bad_file_is_an_input_error(
    dirs: tuple[Path, Path],
    build: Any,
    named: str | None,
    bad_row: int | None,
    field: str | None,
    fragment: str,
) -> None:
    in_dir, out = dirs
    src = build(in_dir)
    expected_path = str(src / named) if named else str(src)
    for mode in ("error", "skip"):  # file-level problems are errors even in skip mode
        if mode == "skip" and bad_row is not None:
            continue  # a row-level problem is skippable; covered below
        with pytest.raises(InputError) as info:
            prepare(src, out, on_bad_row=mode)
        err = info.value
        assert err.path == expected_path and expected_path in str(err)
        assert fragment in str(err)
        assert err.row == bad_row
        if bad_row is not None:
            assert f"row {bad_row}" in str(err)
        assert err.field == field
        if field is not None:
            assert f"field '{field}'" in str(err)
        assert list(out.parent.iterdir()) == []


def test_read_table_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_table(tmp_path / "missing.parquet")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(InputError, match="empty"):
        read_table(tmp_path / "e.jsonl")
    (tmp_path / "u.jsonl").write_bytes(b"\xff\xfe\n")
    with pytest.raises(InputError, match="row 1") as info:
        read_table(tmp_path / "u.jsonl")
    assert "UTF-8" in str(info.value)


# --------------------------------------------------------------------------- skip mode


def test_skip_mode_counts_reasons(
    dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    in_dir, out = dirs
    src = in_dir / "mixed.jsonl"
    lines = [
        _OK,
        b"{not json",
        _line(prompt=""),
        _without("prompt"),
        _line(better_response_id=True),
        _line(better_response_id=True),
        b'{"prompt": "\xff"}',
        b"",
        _line(response_0="dup", response_1="dup"),
        json.dumps(GOOD[1]).encode(),
        b"[1]",
    ]
    src.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="sacpo"):
        summary = prepare(src, out, on_bad_row="skip")
    expected = {
        "malformed JSON": 1,
        "empty text in 'prompt'": 1,
        "missing field 'prompt'": 1,
        "wrong type for 'better_response_id'": 2,
        "not valid UTF-8": 1,
        "identical responses": 1,
        "not a JSON object": 1,
    }
    assert summary["skipped"] == expected
    assert summary["rows_kept"] == 2
    assert summary["rows_read"] == 10  # the blank line is not a row
    assert json.loads((out / "summary.json").read_text())["skipped"] == expected
    assert [r["source_row"] for r in read_out(out, "helpfulness_pairs")] == [1, 10]
    assert "skipped 8 of 10 rows" in caplog.text
    assert "wrong type for 'better_response_id': 2" in caplog.text
    assert f"{src}, row 2" in caplog.text  # individual skips name where they are


def test_skip_mode_all_bad_is_an_error(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    src = in_dir / "all_bad.jsonl"
    src.write_bytes(b"{oops\n" + _line(prompt="") + b"\n")
    with pytest.raises(InputError, match="all 2 rows are bad") as info:
        prepare(src, out, on_bad_row="skip")
    assert str(src) in str(info.value)
    assert list(out.parent.iterdir()) == []


def test_validate_rows_skip_returns_counter() -> None:
    rows = [(1, row()), (2, row(safer_response_id=3)), (3, None), (4, row(prompt=None))]
    clean, skipped = validate_rows(rows, "mem", on_bad_row="skip")
    assert [r["source_row"] for r in clean] == [1]
    assert skipped == {
        "invalid id in 'safer_response_id'": 1,
        "not a JSON object": 1,
        "null field 'prompt'": 1,
    }


def test_bad_on_bad_row_value() -> None:
    with pytest.raises(ValueError):
        validate_rows([], "mem", on_bad_row="ignore")


# --------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sacpo_steps", "preference_data", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_bad_row_exits_2(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    src = in_dir / "bad.jsonl"
    src.write_bytes(_OK + b"\n" + _OK + b"\n" + _line(better_response_id=5) + b"\n")
    proc = _cli("--input", str(src), "--out-dir", str(out))
    assert proc.returncode == 2, proc.stderr
    assert str(src) in proc.stderr and "row 3" in proc.stderr
    assert "better_response_id" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out.parent.iterdir()) == []


def test_cli_ok_with_log(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    src = write_jsonl(in_dir / "d.jsonl", GOOD + [{"broken": True}])
    log_file = in_dir / "logs" / "prep.log"
    proc = _cli(
        "--input", str(src), "--out-dir", str(out), "--on-bad-row", "skip", "--log", str(log_file)
    )
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert "skipped 1 of 3 rows" in log_file.read_text()
