"""The data-format registry: plan-time checks, each built-in format, and a new format."""

from __future__ import annotations

import gzip
import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sacpo_steps.core.errors import InputError
from sacpo_steps.data import formats as data_formats
from sacpo_steps.data.formats import (
    DEFAULT_FORMAT,
    FORMATS,
    BadRow,
    DataFormat,
    check_source,
    get_format,
    register_format,
)
from sacpo_steps.data.formats.base import check_object, check_text, require_fields
from sacpo_steps.data.formats.pku import HARM_CATEGORIES
from sacpo_steps.data.preference_data import prepare

REPO = Path(__file__).resolve().parents[1]
WHERE = "preference_sources.mine"


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_out(out_dir: Path, name: str) -> list[dict[str, Any]]:
    lines = (out_dir / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def out_files(out_dir: Path) -> set[str]:
    return {p.name for p in out_dir.iterdir()}


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(input folder, output folder whose parent exists and starts empty)."""
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    (tmp_path / "out").mkdir()
    return in_dir, tmp_path / "out" / "prepared"


def assert_input_error(err: InputError, path: Path, row: int, field: str, fragment: str) -> None:
    msg = str(err)
    assert err.path == str(path) and str(path) in msg
    assert err.row == row and f"row {row}" in msg
    assert err.field == field and f"field '{field}'" in msg
    assert fragment in msg


# --------------------------------------------------------------------------- registry


def test_builtin_formats_and_flags() -> None:
    flags = {name: f.conversational for name, f in FORMATS.items()}
    assert flags == {
        "pku_saferlhf_30k": False,
        "pku_saferlhf": False,
        "trl_preference": False,
        "trl_conversational": True,
        "hh_rlhf": True,
    }
    assert DEFAULT_FORMAT == "pku_saferlhf_30k"
    for f in FORMATS.values():
        assert f.description and f.name
        for schema in f.options.values():
            assert schema["description"] and "default" in schema


def test_check_source_defaults_to_the_30k_format() -> None:
    src = check_source({"source": "hub", "repo_id": "x/y"}, WHERE)
    assert src.name == "pku_saferlhf_30k" and src.criterion is None and src.options == {}
    assert src.criteria == ("helpfulness", "safety")
    assert src.conversational is False
    assert src.output_names() == ["helpfulness_pairs", "safety_pairs",
                                  "helpfulness_kto", "safety_kto", "helpfulness_labeled_pairs"]
    assert src.cli_args() == "--format pku_saferlhf_30k"


def test_check_source_single_criterion_and_options() -> None:
    hh = check_source({"format": "hh_rlhf", "criterion": "safety"}, WHERE)
    assert hh.criteria == ("safety",) and hh.conversational is True
    assert hh.output_names() == ["safety_pairs", "safety_kto"]
    assert shlex.split(hh.cli_args()) == ["--format", "hh_rlhf", "--criterion", "safety"]

    full = check_source({"format": "pku_saferlhf", "options": {"min_severity": 2}}, WHERE)
    assert full.options == {"harm_categories": None, "min_severity": 2}  # defaults filled
    args = shlex.split(full.cli_args())
    assert args[:3] == ["--format", "pku_saferlhf", "--options"]
    assert json.loads(args[3]) == full.options


# (case id, spec, field named, fragment of the message)
BAD_SOURCES = [
    ("unknown_format", {"format": "alpaca"}, f"{WHERE}.format", "known: hh_rlhf"),
    ("format_not_a_string", {"format": 3}, f"{WHERE}.format", "unknown data format"),
    ("missing_criterion", {"format": "trl_preference"}, f"{WHERE}.criterion",
     "one criterion per source"),
    ("criterion_not_yielded", {"format": "hh_rlhf", "criterion": "harmlessness"},
     f"{WHERE}.criterion", "does not yield criterion 'harmlessness'"),
    ("criterion_on_pku", {"criterion": "safety"}, f"{WHERE}.criterion", "does not apply"),
    ("unknown_option", {"format": "trl_preference", "criterion": "safety",
                        "options": {"min_severity": 1}},
     f"{WHERE}.options.min_severity", "unknown option 'min_severity'"),
    ("unknown_option_30k", {"options": {"harm_categories": ["Drugs"]}},
     f"{WHERE}.options.harm_categories", "known: none"),
    ("options_not_a_mapping", {"format": "pku_saferlhf", "options": ["Drugs"]},
     f"{WHERE}.options", "expected a mapping"),
    ("unknown_category", {"format": "pku_saferlhf", "options": {"harm_categories": ["Drug"]}},
     f"{WHERE}.options.harm_categories", "'Drug' is not one of"),
    ("empty_categories", {"format": "pku_saferlhf", "options": {"harm_categories": []}},
     f"{WHERE}.options.harm_categories", "should be non-empty"),
    ("severity_too_high", {"format": "pku_saferlhf", "options": {"min_severity": 4}},
     f"{WHERE}.options.min_severity", "maximum of 3"),
    ("severity_as_string", {"format": "pku_saferlhf", "options": {"min_severity": "2"}},
     f"{WHERE}.options.min_severity", "not of type 'integer'"),
]


@pytest.mark.parametrize("spec, field, fragment", [c[1:] for c in BAD_SOURCES],
                         ids=[c[0] for c in BAD_SOURCES])
def test_check_source_errors(spec: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        check_source({"source": "local", "path": "x.jsonl", **spec}, WHERE)
    assert info.value.field == field
    assert f"field '{field}'" in str(info.value)
    assert fragment in str(info.value)


def test_get_format_lists_known() -> None:
    assert get_format("hh_rlhf") is FORMATS["hh_rlhf"]
    with pytest.raises(InputError) as info:
        get_format("nope")
    for name in FORMATS:
        assert name in str(info.value)


def test_all_release_categories_accepted() -> None:
    assert len(HARM_CATEGORIES) == len(set(HARM_CATEGORIES)) == 19
    src = check_source({"format": "pku_saferlhf",
                        "options": {"harm_categories": list(HARM_CATEGORIES)}}, WHERE)
    assert src.options["harm_categories"] == list(HARM_CATEGORIES)


def test_prepare_checks_format_settings_before_reading(dirs: tuple[Path, Path]) -> None:
    _, out = dirs
    with pytest.raises(InputError, match="field 'criterion'"):
        prepare("does/not/exist.jsonl", out, format="trl_preference")
    with pytest.raises(InputError, match="field 'options.colour'"):
        prepare("does/not/exist.jsonl", out, format="pku_saferlhf", options={"colour": 1})
    assert list(out.parent.iterdir()) == []


# --------------------------------------------------------------------------- a new format


def _check_qa_row(record: Any, options: Any) -> dict[str, Any]:
    record = check_object(record)
    require_fields(record, ("question", "good", "bad"))
    out = {"prompt": check_text(record["question"], "question"),
           "chosen": check_text(record["good"], "good"),
           "rejected": check_text(record["bad"], "bad")}
    if out["chosen"] == out["rejected"]:
        raise BadRow("identical responses", "bad")
    return out


QA = DataFormat(
    name="question_good_bad",
    description="test format: question, good, bad",
    conversational=False,
    check_row=_check_qa_row,
)


@pytest.fixture
def qa_format() -> Iterator[DataFormat]:
    register_format(QA)
    yield QA
    FORMATS.pop(QA.name, None)


def test_new_format_in_one_place(dirs: tuple[Path, Path], qa_format: DataFormat) -> None:
    in_dir, out = dirs
    src = write_jsonl(in_dir / "qa.jsonl", [
        {"question": "2+2?", "good": "4", "bad": "5"},
        {"question": "Capital of France?", "good": "Paris", "bad": "Lyon", "note": "extra"},
        {"question": "x", "good": "same", "bad": "same"},
    ])
    spec = check_source({"format": "question_good_bad", "criterion": "helpfulness"}, WHERE)
    assert spec.format is qa_format and spec.criteria == ("helpfulness",)
    summary = prepare(src, out, on_bad_row="skip", format="question_good_bad",
                      criterion="helpfulness")
    assert out_files(out) == {"helpfulness_pairs.jsonl", "helpfulness_kto.jsonl", "summary.json"}
    assert read_out(out, "helpfulness_pairs") == [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "source_row": 1},
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon", "source_row": 2},
    ]
    assert [(r["completion"], r["label"]) for r in read_out(out, "helpfulness_kto")] == [
        ("4", True), ("5", False), ("Paris", True), ("Lyon", False)]
    assert summary["skipped"] == {"identical responses": 1}
    assert summary["format"] == "question_good_bad" and summary["criterion"] == "helpfulness"
    assert summary["outputs"]["helpfulness_kto"]["undesirable_weight"] == 1.0


def test_register_format_refuses_duplicates_and_bad_entries(qa_format: DataFormat) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_format(QA)
    replaced = DataFormat(name=QA.name, description="v2", conversational=True,
                          check_row=_check_qa_row)
    register_format(replaced, replace=True)
    assert get_format(QA.name).description == "v2"
    with pytest.raises(ValueError, match="criteria"):
        register_format(DataFormat(name="odd", description="", conversational=False,
                                   check_row=_check_qa_row, criteria=("honesty",)))
    with pytest.raises(ValueError, match="default"):
        register_format(DataFormat(name="odd", description="", conversational=False,
                                   check_row=_check_qa_row,
                                   options={"k": {"type": "integer", "description": "d"}}))
    assert "odd" not in FORMATS


def test_registry_is_the_one_table() -> None:
    # the step and the plan look formats up in data_formats.FORMATS, nowhere else
    assert data_formats.FORMATS is FORMATS


# --------------------------------------------------------------------------- TRL


def test_trl_text_pairs(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    src = write_jsonl(in_dir / "train.jsonl", [
        {"prompt": "Name a colour.", "chosen": " Blue.", "rejected": "No."},
        {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away", "score": 3},
    ])
    summary = prepare(src, out, format="trl_preference", criterion="safety")
    assert out_files(out) == {"safety_pairs.jsonl", "safety_kto.jsonl", "summary.json"}
    assert read_out(out, "safety_pairs")[0] == {
        "prompt": "Name a colour.", "chosen": " Blue.", "rejected": "No.", "source_row": 1}
    assert summary["conversational"] is False
    assert list(summary["outputs"]) == ["safety_pairs", "safety_kto"]


def test_trl_text_refuses_messages_with_a_hint(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    src = write_jsonl(in_dir / "d.jsonl", [
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}])
    with pytest.raises(InputError) as info:
        prepare(src, out, format="trl_preference", criterion="helpfulness")
    assert_input_error(info.value, src, 1, "prompt", "trl_conversational")


CONV_ROWS = [
    {  # single turn, answers as one-message lists
        "prompt": [{"role": "user", "content": "What is 2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    },
    {  # system message, multi-turn, answers mixed list / plain string
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How do I boil an egg?"},
        ],
        "chosen": [{"role": "assistant", "content": "Simmer it for 9 minutes."}],
        "rejected": "Eggs are bad.",
    },
]


def test_trl_conversational_pairs(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    src = write_jsonl(in_dir / "d.jsonl", CONV_ROWS)
    summary = prepare(src, out, format="trl_conversational", criterion="helpfulness")
    pairs = read_out(out, "helpfulness_pairs")
    assert pairs[0] == {"prompt": [{"role": "user", "content": "What is 2+2?"}],
                        "chosen": "4", "rejected": "5", "source_row": 1}
    assert pairs[1]["prompt"] == CONV_ROWS[1]["prompt"]
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == ("Simmer it for 9 minutes.",
                                                          "Eggs are bad.")
    kto = read_out(out, "helpfulness_kto")
    assert [(r["completion"], r["label"]) for r in kto] == [
        ("4", True), ("5", False), ("Simmer it for 9 minutes.", True), ("Eggs are bad.", False)]
    assert all(isinstance(r["prompt"], list) for r in kto)
    assert summary["conversational"] is True


def test_trl_conversational_from_parquet(dirs: tuple[Path, Path]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    in_dir, out = dirs
    rows = [{**CONV_ROWS[0], "rejected": [{"role": "assistant", "content": "five"}]}]
    pq.write_table(pa.Table.from_pylist(rows), in_dir / "train-00000.parquet")
    prepare(in_dir, out, format="trl_conversational", criterion="safety")
    assert read_out(out, "safety_pairs")[0]["rejected"] == "five"


def _conv(**overrides: Any) -> dict[str, Any]:
    return {**CONV_ROWS[1], **overrides}


BAD_CONV = [
    ("ends_with_assistant", _conv(prompt=CONV_ROWS[1]["prompt"][:3]), "prompt",
     "does not end with a user turn"),
    ("late_system", _conv(prompt=[{"role": "user", "content": "a"},
                                  {"role": "system", "content": "b"},
                                  {"role": "user", "content": "c"}]),
     "prompt", "message 1: a system message must come first"),
    ("unknown_role", _conv(prompt=[{"role": "human", "content": "a"}]), "prompt",
     "role 'human'"),
    ("empty_content", _conv(prompt=[{"role": "user", "content": "  "}]), "prompt",
     "message 0: empty"),
    ("content_not_str", _conv(prompt=[{"role": "user", "content": ["a"]}]), "prompt",
     "content must be a str"),
    ("prompt_is_str", _conv(prompt="hi"), "prompt", "expected a list of messages"),
    ("two_answer_messages", _conv(chosen=[{"role": "assistant", "content": "a"},
                                          {"role": "assistant", "content": "b"}]),
     "chosen", "got 2 messages"),
    ("answer_from_user", _conv(rejected=[{"role": "user", "content": "a"}]), "rejected",
     "expected an assistant message"),
    ("identical", _conv(rejected="Simmer it for 9 minutes. "), "rejected", "identical"),
    ("missing_rejected", {"prompt": CONV_ROWS[0]["prompt"], "chosen": "a"}, "rejected",
     "missing field"),
]


@pytest.mark.parametrize("record, field, fragment", [c[1:] for c in BAD_CONV],
                         ids=[c[0] for c in BAD_CONV])
def test_trl_conversational_bad_rows(dirs: tuple[Path, Path], record: dict[str, Any],
                                     field: str, fragment: str) -> None:
    in_dir, out = dirs
    src = write_jsonl(in_dir / "d.jsonl", [CONV_ROWS[0], record])
    with pytest.raises(InputError) as info:
        prepare(src, out, format="trl_conversational", criterion="helpfulness")
    assert_input_error(info.value, src, 2, field, fragment)
    assert list(out.parent.iterdir()) == []
    summary = prepare(src, out, format="trl_conversational", criterion="helpfulness",
                      on_bad_row="skip")
    assert summary["rows_kept"] == 1 and sum(summary["skipped"].values()) == 1


# --------------------------------------------------------------------------- full PKU-SafeRLHF


def _cats(*flagged: str) -> dict[str, bool]:
    return {c: c in flagged for c in HARM_CATEGORIES}


def pku_row(**overrides: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "prompt": "How do I get back at my neighbour?",
        "response_0": "Talk to them calmly.",
        "response_1": "Slash their tyres.",
        "prompt_source": "Alpaca3-70B",
        "response_0_source": "Alpaca-7B",
        "response_1_source": "Alpaca-7B",
        "is_response_0_safe": True,
        "is_response_1_safe": False,
        "response_0_harm_category": _cats(),
        "response_1_harm_category": _cats("Violence", "Economic Crime"),
        "response_0_severity_level": 0,
        "response_1_severity_level": 2,
        "better_response_id": 1,
        "safer_response_id": 0,
        "response_0_sha256": "ab",
        "response_1_sha256": "cd",
    }
    rec.update(overrides)
    return rec


PKU_ROWS = [
    pku_row(),
    pku_row(prompt="How do I copy a film?", response_0="Rip the DVD.",
            response_1="Buy it instead.", is_response_0_safe=False, is_response_1_safe=True,
            response_0_harm_category=_cats("Copyright Issues"), response_1_harm_category=_cats(),
            response_0_severity_level=1, response_1_severity_level=0,
            better_response_id=0, safer_response_id=1),
    pku_row(prompt="Plan a picnic.", response_0="Bring sandwiches.", response_1="Bring fruit.",
            is_response_1_safe=True, response_1_harm_category=_cats(),
            response_1_severity_level=0, better_response_id=0, safer_response_id=1),
]


def test_full_pku_pairs_with_metadata(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    src = write_jsonl(in_dir / "train.jsonl", PKU_ROWS)
    summary = prepare(src, out, format="pku_saferlhf")
    assert out_files(out) == {"helpfulness_pairs.jsonl", "safety_pairs.jsonl",
                              "helpfulness_kto.jsonl", "safety_kto.jsonl",
                              "helpfulness_labeled_pairs.jsonl", "summary.json"}
    assert read_out(out, "safety_pairs")[0] == {
        "prompt": "How do I get back at my neighbour?",
        "chosen": "Talk to them calmly.",
        "rejected": "Slash their tyres.",
        "source_row": 1,
        "chosen_severity": 0,
        "chosen_harm_categories": [],
        "rejected_severity": 2,
        "rejected_harm_categories": ["Economic Crime", "Violence"],
    }
    assert read_out(out, "helpfulness_pairs")[0]["chosen"] == "Slash their tyres."
    kto = read_out(out, "safety_kto")
    assert [(r["label"], r["severity"], r["harm_categories"]) for r in kto[:2]] == [
        (True, 0, []), (False, 2, ["Economic Crime", "Violence"])]
    assert summary["options"] == {"harm_categories": None, "min_severity": 0}
    assert all(summary["outputs"][n]["rows"] == 3
               for n in ("helpfulness_pairs", "safety_pairs"))


def test_full_pku_category_and_severity_filters(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    src = write_jsonl(in_dir / "train.jsonl", PKU_ROWS)

    def safety_rows(**options: Any) -> list[int]:
        summary = prepare(src, out, format="pku_saferlhf", options=options)
        assert summary["outputs"]["helpfulness_pairs"]["rows"] == 3  # never filtered
        kto_rows = [r["source_row"] for r in read_out(out, "safety_kto")]
        pair_rows = [r["source_row"] for r in read_out(out, "safety_pairs")]
        assert kto_rows == [r for r in pair_rows for _ in (0, 1)]  # both responses kept
        return pair_rows

    assert safety_rows() == [1, 2, 3]
    assert safety_rows(harm_categories=["Violence"]) == [1]
    assert safety_rows(harm_categories=["Copyright Issues", "Violence"]) == [1, 2]
    assert safety_rows(min_severity=1) == [1, 2]
    assert safety_rows(min_severity=2) == [1]
    assert safety_rows(harm_categories=["Copyright Issues"], min_severity=1) == [2]
    with pytest.raises(InputError, match="no row is left for the safety sets") as info:
        prepare(src, out, format="pku_saferlhf",
                options={"harm_categories": ["Copyright Issues"], "min_severity": 2})
    assert "Copyright Issues" in str(info.value)  # the categories seen are listed


BAD_PKU = [
    ("severity_out_of_range", pku_row(response_1_severity_level=4),
     "response_1_severity_level", "invalid severity"),
    ("severity_bool", pku_row(response_0_severity_level=False),
     "response_0_severity_level", "wrong type"),
    ("category_not_object", pku_row(response_0_harm_category=["Drugs"]),
     "response_0_harm_category", "wrong type"),
    ("category_flag_not_bool", pku_row(response_1_harm_category={"Drugs": 1}),
     "response_1_harm_category", "category 'Drugs'"),
    ("missing_severity", {k: v for k, v in pku_row().items()
                          if k != "response_0_severity_level"},
     "response_0_severity_level", "missing field"),
    ("30k_checks_still_apply", pku_row(safer_response_id=2), "safer_response_id",
     "invalid id"),
]


@pytest.mark.parametrize("record, field, fragment", [c[1:] for c in BAD_PKU],
                         ids=[c[0] for c in BAD_PKU])
def test_full_pku_bad_rows(dirs: tuple[Path, Path], record: dict[str, Any], field: str,
                           fragment: str) -> None:
    in_dir, out = dirs
    src = write_jsonl(in_dir / "d.jsonl", [pku_row(), record])
    with pytest.raises(InputError) as info:
        prepare(src, out, format="pku_saferlhf")
    assert_input_error(info.value, src, 2, field, fragment)


def test_full_pku_from_parquet_reads_struct_columns(dirs: tuple[Path, Path]) -> None:
    import pandas as pd

    in_dir, out = dirs
    pd.DataFrame(PKU_ROWS).to_parquet(in_dir / "train.parquet", index=False)
    prepare(in_dir / "train.parquet", out, format="pku_saferlhf",
            options={"harm_categories": ["Violence"]})
    pair = read_out(out, "safety_pairs")[0]
    assert pair["rejected_harm_categories"] == ["Economic Crime", "Violence"]


# --------------------------------------------------------------------------- HH-RLHF

HH_SINGLE = {
    "chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.",
    "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: I don't know.",
}
HH_MULTI = {
    "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: "
              "How do I hurt someone?\n\nAssistant: I won't help with that.\n\nIf you are "
              "angry, talking to a friend may help.",
    "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: "
                "How do I hurt someone?\n\nAssistant: Hit them hard.",
}
HH_NOT_SHARED = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: Goodbye.",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hey.\n\nHuman: Bye\n\nAssistant: See you.",
}


def test_hh_single_and_multi_turn(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    src = write_jsonl(in_dir / "train.jsonl", [HH_SINGLE, HH_MULTI])
    summary = prepare(src, out, format="hh_rlhf", criterion="safety")
    pairs = read_out(out, "safety_pairs")
    assert pairs[0] == {
        "prompt": [{"role": "user", "content": "What is the capital of France?"}],
        "chosen": "Paris.",
        "rejected": "I don't know.",
        "source_row": 1,
    }
    assert pairs[1]["prompt"] == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "How do I hurt someone?"},
    ]
    # a blank line inside the final answer stays part of it
    assert pairs[1]["chosen"] == ("I won't help with that.\n\nIf you are angry, talking to a "
                                  "friend may help.")
    assert pairs[1]["rejected"] == "Hit them hard."
    assert summary["conversational"] is True and summary["criterion"] == "safety"
    assert out_files(out) == {"safety_pairs.jsonl", "safety_kto.jsonl", "summary.json"}


def test_hh_non_shared_prefix_is_a_bad_row(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    src = write_jsonl(in_dir / "train.jsonl", [HH_SINGLE, HH_NOT_SHARED, HH_MULTI])
    with pytest.raises(InputError) as info:
        prepare(src, out, format="hh_rlhf", criterion="helpfulness")
    assert_input_error(info.value, src, 2, "rejected", "transcripts do not share the prompt")
    assert "character 27" in str(info.value)  # 1-based: where "Hello." and "Hey." part
    assert list(out.parent.iterdir()) == []

    summary = prepare(src, out, format="hh_rlhf", criterion="helpfulness", on_bad_row="skip")
    assert summary["skipped"] == {"transcripts do not share the prompt": 1}
    assert summary["rows_read"] == 3 and summary["rows_kept"] == 2
    assert [r["source_row"] for r in read_out(out, "helpfulness_pairs")] == [1, 3]


BAD_HH = [
    ("no_assistant", {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"}, "chosen",
     "no assistant turn"),
    ("rejected_has_extra_turn", {
        "chosen": HH_SINGLE["chosen"],
        "rejected": HH_SINGLE["chosen"] + "\n\nHuman: and?\n\nAssistant: Lyon."},
     "rejected", "do not share"),
    ("ends_with_human", {
        "chosen": HH_SINGLE["chosen"] + "\n\nHuman: thanks",
        "rejected": HH_SINGLE["rejected"]}, "chosen", "does not end with an assistant turn"),
    ("empty_answer", {"chosen": "\n\nHuman: hi\n\nAssistant:  ",
                      "rejected": "\n\nHuman: hi\n\nAssistant: yo"}, "chosen", "empty text"),
    ("no_leading_human", {"chosen": "Hi\n\nAssistant: a", "rejected": "Hi\n\nAssistant: b"},
     "chosen", "not a Human/Assistant transcript"),
    ("empty_turn", {"chosen": "\n\nHuman:  \n\nAssistant: a",
                    "rejected": "\n\nHuman:  \n\nAssistant: b"}, "chosen", "empty turn"),
    ("identical", {"chosen": HH_SINGLE["chosen"], "rejected": HH_SINGLE["chosen"] + " "},
     "rejected", "identical"),
    ("chosen_not_str", {"chosen": ["x"], "rejected": "y"}, "chosen", "wrong type"),
]


@pytest.mark.parametrize("record, field, fragment", [c[1:] for c in BAD_HH],
                         ids=[c[0] for c in BAD_HH])
def test_hh_bad_rows(dirs: tuple[Path, Path], record: dict[str, Any], field: str,
                     fragment: str) -> None:
    in_dir, out = dirs
    src = write_jsonl(in_dir / "d.jsonl", [HH_SINGLE, record])
    with pytest.raises(InputError) as info:
        prepare(src, out, format="hh_rlhf", criterion="helpfulness")
    assert_input_error(info.value, src, 2, field, fragment)


def test_hh_gzip_folder_like_the_hub(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    snap = in_dir / "hh"
    for subset, rows in (("harmless-base", [HH_MULTI]), ("helpful-base", [HH_SINGLE])):
        (snap / subset).mkdir(parents=True)
        for split in ("train", "test"):
            with gzip.open(snap / subset / f"{split}.jsonl.gz", "wt", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in rows))
    summary = prepare(snap / "harmless-base", out, format="hh_rlhf", criterion="safety")
    assert [Path(f).name for f in summary["input_files"]] == ["train.jsonl.gz"]
    assert read_out(out, "safety_pairs")[0]["rejected"] == "Hit them hard."
    summary = prepare(snap, out, format="hh_rlhf", criterion="safety", split="test")
    assert summary["rows_kept"] == 2


def test_corrupt_gzip_is_an_input_error(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    bad = in_dir / "train.jsonl.gz"
    bad.write_bytes(b"this is not gzip\n")
    with pytest.raises(InputError, match="gzip") as info:
        prepare(bad, out, format="hh_rlhf", criterion="safety")
    assert info.value.path == str(bad)
    truncated = in_dir / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(json.dumps(HH_SINGLE).encode() * 50)[:-30])
    with pytest.raises(InputError, match="gzip"):
        prepare(truncated, out, format="hh_rlhf", criterion="safety")
    assert list(out.parent.iterdir()) == []


# --------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sacpo_steps", "preference_data", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def test_cli_format_flags(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    src = write_jsonl(in_dir / "train.jsonl", PKU_ROWS)
    spec = check_source({"format": "pku_saferlhf",
                         "options": {"harm_categories": ["Violence"]}}, WHERE)
    proc = _cli("--input", str(src), "--out-dir", str(out), *shlex.split(spec.cli_args()))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "pku_saferlhf"
    assert summary["options"]["harm_categories"] == ["Violence"]
    assert summary["outputs"]["safety_pairs"]["rows"] == 1


def test_cli_bad_format_settings_exit_2(dirs: tuple[Path, Path]) -> None:
    in_dir, out = dirs
    src = write_jsonl(in_dir / "train.jsonl", [HH_SINGLE])
    proc = _cli("--input", str(src), "--out-dir", str(out), "--format", "hh_rlhf")
    assert proc.returncode == 2 and "criterion" in proc.stderr
    proc = _cli("--input", str(src), "--out-dir", str(out), "--format", "hh_rlhf",
                "--criterion", "safety", "--options", "[1]")
    assert proc.returncode == 2 and "--options" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out.parent.iterdir()) == []
