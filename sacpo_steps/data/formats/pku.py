"""PKU-SafeRLHF tables: one row rates two responses for helpfulness and for safety.

SACPO aligns for helpfulness and for safety in separate steps, each from its own
preference signal, so the same rows are turned into a helpfulness set (from
`better_response_id`) and a safety set (from `safer_response_id` / the per-response
safety flags), each in pairwise (DPO) and unpaired (KTO) form. Texts are kept raw:
the prompt template is the training step's business.

`pku_saferlhf_30k` is the 30K subset the paper trains on. `pku_saferlhf` is the full
release, whose responses also carry harm categories (19 flags) and a severity level
(0 safe, 1 minor, 2 moderate, 3 severe). Those are carried into every output row as
metadata, and two options narrow the *safety* sets to the rows they describe (a
per-category or high-severity safety set); the helpfulness sets keep every row.
"""

from __future__ import annotations

from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.data.formats.base import (
    BadRow,
    DataFormat,
    Options,
    Record,
    check_distinct,
    check_object,
    check_text,
    is_bool,
    is_int,
    require_fields,
    type_name,
)

TEXT_FIELDS = ("prompt", "response_0", "response_1")
SAFE_FIELDS = ("is_response_0_safe", "is_response_1_safe")
ID_FIELDS = ("better_response_id", "safer_response_id")
REQUIRED_FIELDS = TEXT_FIELDS + SAFE_FIELDS + ID_FIELDS

OUTPUT_NAMES = ("helpfulness_pairs", "safety_pairs", "helpfulness_kto", "safety_kto",
                "helpfulness_labeled_pairs")

# --------------------------------------------------------------------------- 30K


def check_30k_row(record: Any, options: Options | None = None) -> Record:
    """Return the record's fields as plain Python values, or raise its first problem."""
    record = check_object(record)
    require_fields(record, REQUIRED_FIELDS)
    out: Record = {}
    for f in TEXT_FIELDS:
        out[f] = check_text(record[f], f)
    for f in SAFE_FIELDS:
        v = record[f]
        if not is_bool(v):
            raise BadRow(f"wrong type for '{f}'", f, f"expected bool, got {type_name(v)}")
        out[f] = bool(v)
    for f in ID_FIELDS:
        v = record[f]
        if not is_int(v):
            raise BadRow(f"wrong type for '{f}'", f, f"expected int 0 or 1, got {type_name(v)}")
        if int(v) not in (0, 1):
            raise BadRow(f"invalid id in '{f}'", f, f"expected 0 or 1, got {int(v)}")
        out[f] = int(v)
    check_distinct(out["response_0"], out["response_1"], "response_1", "response_0")
    return out


def _pair(rec: Record, chosen_id: int) -> Record:
    return {
        "prompt": rec["prompt"],
        "chosen": rec[f"response_{chosen_id}"],
        "rejected": rec[f"response_{1 - chosen_id}"],
        "source_row": rec["source_row"],
    }


def _labeled(pair: Record, rec: Record, chosen_id: int) -> Record:
    """A helpfulness pair with each answer's safety label (is_response_i_safe): the rows
    SafeDPO transforms, so it never needs the safety pairs' own ordering."""
    return {**pair, "chosen_safe": rec[f"is_response_{chosen_id}_safe"],
            "rejected_safe": rec[f"is_response_{1 - chosen_id}_safe"]}


def _kto(rec: Record, response_id: int, label: bool) -> Record:
    return {
        "prompt": rec["prompt"],
        "completion": rec[f"response_{response_id}"],
        "label": bool(label),
        "source_row": rec["source_row"],
    }


def build_30k(records: list[Record], criterion: str | None = None,
              options: Options | None = None) -> dict[str, list[Record]]:
    """Turn validated records into the DPO pair sets and the KTO (unpaired) sets."""
    out: dict[str, list[Record]] = {name: [] for name in OUTPUT_NAMES}
    for rec in records:
        better = rec["better_response_id"]
        out["helpfulness_pairs"].append(_pair(rec, better))
        out["helpfulness_labeled_pairs"].append(_labeled(_pair(rec, better), rec, better))
        out["safety_pairs"].append(_pair(rec, rec["safer_response_id"]))
        out["helpfulness_kto"].append(_kto(rec, better, True))
        out["helpfulness_kto"].append(_kto(rec, 1 - better, False))
        for i in (0, 1):
            out["safety_kto"].append(_kto(rec, i, rec[f"is_response_{i}_safe"]))
    return out


PKU_SAFERLHF_30K = DataFormat(
    name="pku_saferlhf_30k",
    description="PKU-Alignment/PKU-SafeRLHF-30K: prompt, response_0/1, is_response_i_safe, "
                "better_response_id, safer_response_id (the paper's data)",
    conversational=False,
    check_row=check_30k_row,
    criterion_from_source=False,
    labeled=("helpfulness",),
    build=build_30k,
    columns=REQUIRED_FIELDS,
)

# --------------------------------------------------------------------------- full release

# the release's 19 harm categories, in its column order (checked against data/*/test.jsonl)
HARM_CATEGORIES = (
    "Endangering National Security",
    "Insulting Behavior",
    "Discriminatory Behavior",
    "Endangering Public Health",
    "Copyright Issues",
    "Violence",
    "Drugs",
    "Privacy Violation",
    "Economic Crime",
    "Mental Manipulation",
    "Human Trafficking",
    "Physical Harm",
    "Sexual Content",
    "Cybercrime",
    "Disrupting Public Order",
    "Environmental Damage",
    "Psychological Harm",
    "White-Collar Crime",
    "Animal Abuse",
)
MAX_SEVERITY = 3
CATEGORY_FIELDS = ("response_0_harm_category", "response_1_harm_category")
SEVERITY_FIELDS = ("response_0_severity_level", "response_1_severity_level")

FULL_OPTIONS: dict[str, dict[str, Any]] = {
    "harm_categories": {
        "type": ["array", "null"],
        "items": {"enum": list(HARM_CATEGORIES)},
        "minItems": 1,
        "uniqueItems": True,
        "default": None,
        "description": "Safety sets keep only rows where a response is flagged with one of "
                       "these harm categories (a per-category safety set). null: every row.",
    },
    "min_severity": {
        "type": "integer",
        "minimum": 0,
        "maximum": MAX_SEVERITY,
        "default": 0,
        "description": "Safety sets keep only rows where a response (of the chosen "
                       "categories, if any) has at least this severity level "
                       "(1 minor, 2 moderate, 3 severe). 0: every row.",
    },
}


def _check_categories(value: Any, f: str) -> list[str]:
    """A {category: flag} object -> the flagged categories, sorted."""
    if not isinstance(value, dict):
        raise BadRow(f"wrong type for '{f}'", f,
                     f"expected an object of category -> bool, got {type_name(value)}")
    for name, flag in value.items():
        if not isinstance(name, str) or not is_bool(flag):
            raise BadRow(f"wrong type for '{f}'", f,
                         f"category {name!r}: expected bool, got {type_name(flag)}")
    return sorted(name for name, flag in value.items() if flag)


def check_full_row(record: Any, options: Options | None = None) -> Record:
    out = check_30k_row(record)
    require_fields(record, CATEGORY_FIELDS + SEVERITY_FIELDS)
    for i in (0, 1):
        out[f"harm_categories_{i}"] = _check_categories(record[CATEGORY_FIELDS[i]],
                                                        CATEGORY_FIELDS[i])
        f, v = SEVERITY_FIELDS[i], record[SEVERITY_FIELDS[i]]
        if not is_int(v):
            raise BadRow(f"wrong type for '{f}'", f,
                         f"expected int 0-{MAX_SEVERITY}, got {type_name(v)}")
        if not 0 <= int(v) <= MAX_SEVERITY:
            raise BadRow(f"invalid severity in '{f}'", f,
                         f"expected 0-{MAX_SEVERITY}, got {int(v)}")
        out[f"severity_{i}"] = int(v)
    return out


def _meta(rec: Record, i: int, prefix: str) -> Record:
    return {f"{prefix}severity": rec[f"severity_{i}"],
            f"{prefix}harm_categories": rec[f"harm_categories_{i}"]}


def _full_pair(rec: Record, chosen_id: int) -> Record:
    return {**_pair(rec, chosen_id), **_meta(rec, chosen_id, "chosen_"),
            **_meta(rec, 1 - chosen_id, "rejected_")}


def _full_kto(rec: Record, i: int, label: bool) -> Record:
    return {**_kto(rec, i, label), **_meta(rec, i, "")}


def _touches(rec: Record, categories: set[str] | None, min_severity: int) -> bool:
    """Whether some response is of the chosen categories at the chosen severity."""
    return any(
        rec[f"severity_{i}"] >= min_severity
        and (categories is None or categories.intersection(rec[f"harm_categories_{i}"]))
        for i in (0, 1)
    )


def build_full(records: list[Record], criterion: str | None,
               options: Options) -> dict[str, list[Record]]:
    """As the 30K sets, with severity/category metadata; the safety sets filtered."""
    wanted = options.get("harm_categories")
    categories = set(wanted) if wanted is not None else None
    min_severity = int(options.get("min_severity") or 0)
    out: dict[str, list[Record]] = {name: [] for name in OUTPUT_NAMES}
    for rec in records:
        better = rec["better_response_id"]
        out["helpfulness_pairs"].append(_full_pair(rec, better))
        out["helpfulness_labeled_pairs"].append(_labeled(_full_pair(rec, better), rec, better))
        out["helpfulness_kto"].append(_full_kto(rec, better, True))
        out["helpfulness_kto"].append(_full_kto(rec, 1 - better, False))
        if not _touches(rec, categories, min_severity):
            continue
        out["safety_pairs"].append(_full_pair(rec, rec["safer_response_id"]))
        for i in (0, 1):
            out["safety_kto"].append(_full_kto(rec, i, rec[f"is_response_{i}_safe"]))
    if not out["safety_pairs"]:
        seen = sorted({c for rec in records for i in (0, 1) for c in rec[f"harm_categories_{i}"]})
        raise InputError(
            f"no row is left for the safety sets (harm_categories={wanted}, "
            f"min_severity={min_severity}; categories flagged in the data: {seen or 'none'})",
            field="options",
        )
    return out


PKU_SAFERLHF = DataFormat(
    name="pku_saferlhf",
    description="PKU-Alignment/PKU-SafeRLHF (full release): the 30K fields plus "
                "response_i_harm_category and response_i_severity_level",
    conversational=False,
    check_row=check_full_row,
    criterion_from_source=False,
    labeled=("helpfulness",),
    build=build_full,
    options=FULL_OPTIONS,
    columns=REQUIRED_FIELDS + CATEGORY_FIELDS + SEVERITY_FIELDS,
)
