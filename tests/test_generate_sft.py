"""Generation (truncation, format) and the SFT checkpoint sources."""

from __future__ import annotations

import json

import pytest

from sacpo_steps.core.errors import InputError
from sacpo_steps.evaluation.generate import generate, truncate_answer
from sacpo_steps.models.sft_checkpoint import link_local
from tests.helpers import PROMPT_TEMPLATE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" first, a. then, b.", "first, a. then, b."),
        (" first, a.\n\nUSER: more", "first, a."),
        (" first, a. USER: how do i", "first, a."),
        (" first, a.\n  \nthen, b.", "first, a."),
        (" line one\nline two", "line one\nline two"),
        # real Llama answers often open with a blank line: strip first, then cut
        (" \n\nSure, here is a poem:\nRoses", "Sure, here is a poem:\nRoses"),
        ("\n\n\nfirst, a.\n\nthen, b.", "first, a."),
        ("\n \n", ""),
        ("", ""),
        ("first, a.\nUSER: next turn", "first, a."),
    ],
)
def test_truncate_answer(text, expected):
    assert truncate_answer(text, ["USER:"]) == expected


def test_generate_writes_generation_format(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": p}) + "\n"
                               for i, p in enumerate(["how do i bake bread?", "hi", "x y z"])))
    out = tmp_path / "gen.jsonl"
    kwargs = dict(model_name="tiny", prompt_template=PROMPT_TEMPLATE, stop_markers=["USER:"],
                  max_new_tokens=8, batch_size=2)
    counts = generate(tiny_models["sft"], prompts, out, **kwargs)
    assert counts["answers"] == 3 and 0 <= counts["empty"] <= 3
    speed = counts["throughput"]  # new tokens: at most 8 per prompt, at least 1
    assert 3 <= speed["tokens"] <= 24 and speed["samples"] == 3
    assert speed["tokens_per_s"] > 0 and speed["gpus"] == 0 and speed["mfu"] is None
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == ["p0", "p1", "p2"]
    assert all(set(r) == {"prompt_id", "prompt", "answer", "model"} for r in rows)
    assert all(r["model"] == "tiny" and "USER:" not in r["answer"] for r in rows)
    # greedy: the same answers again
    out2 = tmp_path / "gen2.jsonl"
    generate(tiny_models["sft"], prompts, out2, **kwargs)
    assert out2.read_text() == out.read_text()


def test_generate_refuses_duplicate_prompt_ids(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "a", "prompt": "x"}) + "\n"
                       + json.dumps({"prompt_id": "a", "prompt": "y"}) + "\n")
    out = tmp_path / "gen.jsonl"
    with pytest.raises(InputError) as err:
        generate(tiny_models["sft"], prompts, out, model_name="m",
                 prompt_template=PROMPT_TEMPLATE, stop_markers=[], max_new_tokens=2,
                 batch_size=2)
    assert "row 2" in str(err.value) and "prompt_id" in str(err.value)
    assert not out.exists()


def test_local_sft_source_links_a_checked_folder(tiny_models, tmp_path):
    out = tmp_path / "results" / "models" / "sft"
    source_card = (tiny_models["sft"] / "sacpo.json").read_bytes()
    link_local({"local": {"path": str(tiny_models["sft"])}}, out)
    assert (out / "model.safetensors").read_bytes() == \
        (tiny_models["sft"] / "model.safetensors").read_bytes()
    # a folder the pipeline did not make gets a record naming it; the source (hard
    # linked) is never written to
    from sacpo_steps.core import lineage

    record = lineage.model_record(out)
    assert record["inputs"]["source"]["fingerprint"] == \
        lineage.model_fingerprint(tiny_models["sft"])[0]
    assert (tiny_models["sft"] / "sacpo.json").read_bytes() == source_card


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_local_sft_source_refuses_incomplete_folder(tiny_models, tmp_path, missing):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["sft"], broken)
    (broken / missing).unlink()
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        link_local({"local": {"path": str(broken)}}, out)
    assert str(broken) in str(err.value)
    assert not out.exists()


PAPER_MARKERS = ["USER:", "USER", "User:", "User"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Sure.\nUser: and now?", "Sure."),
        ("Sure. User asks again", "Sure."),
        ("first, a.\nUSER next", "first, a."),
        ("\n\nUser: hi", ""),  # nothing before the new turn: empty, as it should be
    ],
)
def test_truncate_answer_with_the_papers_markers(text, expected):
    assert truncate_answer(text, PAPER_MARKERS) == expected


def test_answers_that_open_with_a_blank_line_are_kept(tiny_models, tmp_path):
    """A model whose answers start with "\\n\\n" (as real Llama answers often do): no answer
    with text before its first stop marker comes out empty."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sacpo_steps.models.tokens import encode_prompt

    folder = tmp_path / "blank-first"
    tok = AutoTokenizer.from_pretrained(tiny_models["sft"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["sft"])
    answer = " \n\nfirst, mix flour and water.\n\nUSER: more"
    prompt_ids = encode_prompt(tok, PROMPT_TEMPLATE, "hi")
    full = tok(PROMPT_TEMPLATE.format(prompt="hi") + answer + tok.eos_token)["input_ids"]
    assert full[:len(prompt_ids)] == prompt_ids
    completion = full[len(prompt_ids):]
    ids = torch.tensor([prompt_ids + completion])
    labels = ids.clone()
    labels[0, :len(prompt_ids)] = -100
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(150):  # overfit one answer
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "p0", "prompt": "hi"}) + "\n")
    out = tmp_path / "gen.jsonl"
    counts = generate(folder, prompts, out, model_name="m", prompt_template=PROMPT_TEMPLATE,
                      stop_markers=PAPER_MARKERS, max_new_tokens=len(completion),
                      batch_size=1)
    raw = tok.decode(model.generate(torch.tensor([prompt_ids]), do_sample=False,
                                    max_new_tokens=len(completion))[0, len(prompt_ids):],
                     skip_special_tokens=True)
    assert raw.lstrip(" ").startswith("\n\n")  # the model really opens with a blank line
    row = json.loads(out.read_text())
    assert row["answer"] == "first, mix flour and water."
    assert counts["empty"] == 0
