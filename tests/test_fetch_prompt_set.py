"""Prompt sets fetched from a URL or file: JSON list or JSONL, validated."""

from __future__ import annotations

import json

import pytest

from sacpo_steps.core.errors import InputError
from sacpo_steps.data.fetch_prompt_set import fetch


@pytest.mark.parametrize("as_list", [True, False])
def test_json_list_and_jsonl_become_the_prompt_set_format(tmp_path, as_list):
    rows = [{"prompt": "how do i bake bread?", "category": "food"}, {"prompt": " hi "}]
    src = tmp_path / "problems.json"
    src.write_text(json.dumps(rows) if as_list else "\n".join(map(json.dumps, rows)))
    out = tmp_path / "set.jsonl"
    assert fetch(str(src), out, name="helpfulness") == 2
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got == [{"prompt_id": "helpfulness-0001", "prompt": "how do i bake bread?",
                    "category": "food"},
                   {"prompt_id": "helpfulness-0002", "prompt": "hi"}]


@pytest.mark.parametrize(("text", "row", "field"), [
    ('[{"prompt": "a"}, {"question": "b"}]', 2, "prompt"),
    ('{"prompt": "a"}\n{not json}', 2, None),
    ('[{"prompt": "a", "id": 1}, {"prompt": "b", "id": 1}]', 2, "id"),
])
def test_bad_rows_name_file_row_field_and_write_nothing(tmp_path, text, row, field):
    src = tmp_path / "problems.json"
    src.write_text(text)
    out = tmp_path / "set.jsonl"
    with pytest.raises(InputError) as err:
        fetch(str(src), out, name="x", id_field="id")
    assert str(src) in str(err.value) and f"row {row}" in str(err.value)
    if field:
        assert field in str(err.value)
    assert not out.exists()


def test_unreadable_source_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="evaluation.prompt_sets.red_team.url"):
        fetch(str(tmp_path / "missing.json"), tmp_path / "out.jsonl", name="red_team")
