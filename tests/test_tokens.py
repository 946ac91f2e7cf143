"""One tokenization contract: generation sees exactly the prompt ids TRL trains on.

Two tokenizers a 7B run meets, built here without downloads:
- a Llama-2-style one: a SentencePiece BPE model (identity normalisation, byte
  fallback) trained with the `sentencepiece` package and loaded as transformers'
  LlamaTokenizer with `add_bos_token=True` (BOS, "\u2581" word prefixes);
- a chat-template one: the demo's tokenizer with a chat template of our own.
For both, the prompt ids the generate step feeds the model equal TRL's prompt ids
in training (DPO and KTO) and in the precomputed reference pass. Conversational
prompts (multi-turn message lists, chat template only) are tokenized as TRL does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sacpo_steps.core.errors import InputError
from sacpo_steps.models.tokens import CHAT, PromptCap, encode_pair, encode_prompt, render_prompt
from sacpo_steps.training.node import NodeSettings
from sacpo_steps.training.settings import TrainingConfig
from sacpo_steps.training.trainer import build_trainer, load_examples
from tests.helpers import PROMPT_TEMPLATE, TEXTS

# real answer shapes: a leading blank line, a new user turn, bare refusals
PAIRS = [
    ("how do i bake bread?", "\n\nfirst, mix flour and water. then, knead the dough.",
     "i cannot help with that."),
    ("how do i steal a car?", "i cannot help with that.", "first, hide notes in your sleeve."),
    ("  how can i plant a tree?\n", "first, dig a wide hole.\nUSER: thanks",
     "then, water the soil deeply."),
    ("Tell me a poem about a café.", "Sure, here is a poem:\nRoses are red.", "no."),
]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                 "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
                 "{% endif %}")
TINY = TrainingConfig.from_dict({
    "learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1, "max_length": 128, "warmup_steps": 0.0,
    "logging_steps": 1, "max_steps": 1})


def _save_model(folder: Path, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _corpus() -> list[str]:
    texts = [PROMPT_TEMPLATE.format(prompt=p) + " " + r for p, r in TEXTS]
    texts += [PROMPT_TEMPLATE.format(prompt=p) + " " + a + " " + b for p, a, b in PAIRS]
    return texts * 20


@pytest.fixture(scope="module")
def tokenizer_models(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """model folder and prompt template per tokenizer kind."""
    import sentencepiece as spm  # a declared dependency: never skipped
    from transformers import LlamaTokenizer

    from sacpo_steps.models.sft_checkpoint import train_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=str(root / "sp"), vocab_size=400,
        model_type="bpe", normalization_rule_name="identity", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, minloglevel=2)
    (root / "sp_tok").mkdir()
    shutil.copy(root / "sp.model", root / "sp_tok" / "tokenizer.model")
    llama = LlamaTokenizer.from_pretrained(root / "sp_tok", add_bos_token=True,
                                           pad_token="<pad>")
    chat = train_tokenizer(_corpus(), vocab_size=500)
    chat.chat_template = CHAT_TEMPLATE
    return {
        "llama_sentencepiece": (_save_model(root / "llama", llama), PROMPT_TEMPLATE),
        "chat_template": (_save_model(root / "chat", chat), CHAT),
    }


def _pairs_file(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                            for p, c, r in PAIRS))
    return path


def _generation_prompt_ids(model_dir: Path, template: str, tmp_path: Path, monkeypatch
                           ) -> list[list[int]]:
    """The ids the generate step really feeds `model.generate`, padding removed."""
    from transformers import LlamaForCausalLM

    from sacpo_steps.evaluation.generate import generate

    seen: list[list[int]] = []

    def fake_generate(self, input_ids=None, attention_mask=None, **kwargs):
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            seen.append([i for i, m in zip(ids, mask, strict=True) if m])
        return torch.cat([input_ids, input_ids[:, -1:]], dim=1)

    monkeypatch.setattr(LlamaForCausalLM, "generate", fake_generate)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": p}) + "\n"
                               for i, (p, _, _) in enumerate(PAIRS)))
    generate(model_dir, prompts, tmp_path / "gen.jsonl", model_name="m",
             prompt_template=template, stop_markers=["USER:"], max_new_tokens=2, batch_size=3)
    return seen


@pytest.mark.parametrize("kind", ["llama_sentencepiece", "chat_template"])
@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_generation_prompt_ids_equal_trl_training_and_reference_ids(
        tokenizer_models, kind, loss, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    model_dir, template = tokenizer_models[kind]
    tok = AutoTokenizer.from_pretrained(model_dir)
    pairs = _pairs_file(tmp_path)
    if loss == "kto":
        rows = [{"prompt": p, "completion": a, "label": lab}
                for p, c, r in PAIRS for a, lab in ((c, True), (r, False))]
        pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples(pairs, loss, template, seed=0)
    trainer = build_trainer(model_dir, examples, settings=NodeSettings(loss, 0.1, TINY),
                            output_dir=tmp_path / "t")
    data = trainer.train_dataset  # tokenised, with the precomputed reference log-probs
    assert ("ref_chosen_logps" if loss == "dpo" else "ref_logps") in data.column_names
    trl_prompt_ids = sorted({tuple(ids) for ids in data["prompt_ids"]})

    gen_ids = _generation_prompt_ids(model_dir, template, tmp_path, monkeypatch)
    assert sorted({tuple(ids) for ids in gen_ids}) == trl_prompt_ids

    for prompt, chosen, rejected in PAIRS:
        full_prompt = encode_prompt(tok, template, prompt)
        assert full_prompt[0] == tok.bos_token_id  # BOS really is added
        assert full_prompt.count(tok.bos_token_id) == 1
        for answer in (chosen, rejected):
            prompt_ids, completion_ids = encode_pair(tok, template, prompt, answer)
            # the prompt ids are a prefix of prompt+completion: nothing of the prompt is lost
            assert prompt_ids == full_prompt
            assert completion_ids and tok.decode(completion_ids, skip_special_tokens=True
                                                 ).strip() == answer.strip()


def test_reference_pass_scores_the_contract_ids(tokenizer_models, tmp_path):
    """TRL's precomputed reference log-probs are those of the contract's (prompt, answer) ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, template = tokenizer_models["llama_sentencepiece"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    examples = load_examples(_pairs_file(tmp_path), "dpo", template, seed=0)
    trainer = build_trainer(model_dir, examples, settings=NodeSettings("dpo", 0.1, TINY),
                            output_dir=tmp_path / "t")
    by_prompt = {tuple(p): (c, r) for p, c, r in zip(
        trainer.train_dataset["prompt_ids"], trainer.train_dataset["ref_chosen_logps"],
        trainer.train_dataset["ref_rejected_logps"], strict=True)}
    for prompt, chosen, rejected in PAIRS:
        want = []
        for answer in (chosen, rejected):
            prompt_ids, completion = encode_pair(tok, template, prompt, answer)
            ids = torch.tensor([prompt_ids + completion])
            with torch.no_grad():
                logp = model(ids).logits[0].log_softmax(-1)
            want.append(sum(logp[len(prompt_ids) - 1 + i, t].item()
                            for i, t in enumerate(completion)))
        got = by_prompt[tuple(encode_prompt(tok, template, prompt))]
        assert list(got) == pytest.approx(want, abs=1e-4)


def test_sft_trainer_sees_the_contract_ids(tokenizer_models, tmp_path):
    """The SFT build (TRL's SFTTrainer on prompt-completion rows) splits as the contract."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sacpo_steps.models.tokens import render_completion, render_prompt

    model_dir, template = tokenizer_models["llama_sentencepiece"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"prompt": render_prompt(template, p), "completion": render_completion(template, c)}
            for p, c, _ in PAIRS]
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, bf16=False,
                     report_to=[], per_device_train_batch_size=2, save_strategy="no")
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    for row, (p, c, _) in zip(trainer.train_dataset, PAIRS, strict=True):
        prompt_ids, completion_ids = encode_pair(tok, template, p, c)
        assert row["input_ids"] == prompt_ids + completion_ids
        # the loss covers the completion only: the prompt's labels are masked
        assert row["labels"][:len(prompt_ids)] == [-100] * len(prompt_ids)
        assert -100 not in row["labels"][len(prompt_ids):]


def test_prompt_cap_keeps_the_end_and_trl_stays_within_it(tokenizer_models, tmp_path):
    from transformers import AutoTokenizer

    model_dir, template = tokenizer_models["llama_sentencepiece"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    long_prompt = "please read this first. " * 30 + "how do i bake bread?"
    cap = PromptCap(24)
    kept = cap.apply(tok, template, long_prompt)
    assert kept is not None and kept.endswith("how do i bake bread?")
    assert len(encode_prompt(tok, template, kept)) <= 24
    assert len(encode_prompt(tok, template, long_prompt)) > 24
    assert cap.apply(tok, template, "hi") == "hi"  # short prompts pass unchanged
    assert PromptCap(3).apply(tok, template, long_prompt) is None  # the template alone is longer
    assert cap.counts() == {"max_prompt_length": 24, "prompts": 2, "truncated": 1, "dropped": 0}

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": "first, a.", "rejected": "no."})
                            + "\n" for p in (long_prompt, "hi", "how do i bake bread?")))
    cap = PromptCap(24)
    examples = load_examples(path, "dpo", template, seed=0, tokenizer=tok, prompt_cap=cap)
    trainer = build_trainer(model_dir, examples, settings=NodeSettings("dpo", 0.1, TINY),
                            output_dir=tmp_path / "t")
    assert max(len(ids) for ids in trainer.train_dataset["prompt_ids"]) <= 24
    assert cap.truncated == 1 and cap.dropped == 0


def test_a_cap_below_the_template_is_a_clear_input_error(tokenizer_models, tmp_path):
    from sacpo_steps.core.errors import InputError
    from sacpo_steps.evaluation.generate import generate

    model_dir, template = tokenizer_models["llama_sentencepiece"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "p0", "prompt": "how do i bake bread?"}) + "\n")
    out = tmp_path / "gen.jsonl"
    with pytest.raises(InputError) as err:
        generate(model_dir, prompts, out, model_name="m", prompt_template=template,
                 stop_markers=[], max_new_tokens=2, batch_size=1, max_prompt_length=3)
    assert "row 1" in str(err.value) and "max_prompt_length" in str(err.value)
    assert not out.exists()

    from transformers import AutoTokenizer

    with pytest.raises(InputError, match="max_prompt_length"):
        load_examples(_pairs_file(tmp_path), "dpo", template, seed=0,
                      tokenizer=AutoTokenizer.from_pretrained(model_dir),
                      prompt_cap=PromptCap(3))


# ---- conversational prompts ------------------------------------------------------------

def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


CONVERSATIONS = [
    [_turn("system", "You are a careful assistant."), _turn("user", "how do i bake bread?"),
     _turn("assistant", "first, mix flour and water."), _turn("user", "and then?")],
    [_turn("user", "how do i steal a car?")],
    [_turn("user", "hi"), _turn("assistant", "hello."),
     _turn("user", "how can i plant a tree?")],
]
ANSWERS = [("then, knead the dough.", "i cannot help with that."),
           ("i cannot help with that.", "first, hide notes in your sleeve."),
           ("\n\nfirst, dig a wide hole.", "no.")]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_multi_turn_prompts_reach_trl_as_the_contract_encodes_them(tokenizer_models, tmp_path,
                                                                   loss):
    from transformers import AutoTokenizer

    model_dir, template = tokenizer_models["chat_template"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    if loss == "dpo":
        rows = [{"prompt": conv, "chosen": c, "rejected": r}
                for conv, (c, r) in zip(CONVERSATIONS, ANSWERS, strict=True)]
    else:
        rows = [{"prompt": conv, "completion": a, "label": label}
                for conv, pair in zip(CONVERSATIONS, ANSWERS, strict=True)
                for a, label in zip(pair, (True, False), strict=True)]
    examples = load_examples(_write(tmp_path / "rows.jsonl", rows), loss, template, seed=0)
    assert sorted(len(e["prompt"]) for e in examples)[-1] == 4  # all turns kept
    trainer = build_trainer(model_dir, examples, settings=NodeSettings(loss, 0.1, TINY),
                            output_dir=tmp_path / "t")
    data = trainer.train_dataset
    assert ("ref_chosen_logps" if loss == "dpo" else "ref_logps") in data.column_names
    want = {tuple(encode_prompt(tok, template, conv)) for conv in CONVERSATIONS}
    assert {tuple(ids) for ids in data["prompt_ids"]} == want
    for conv, pair in zip(CONVERSATIONS, ANSWERS, strict=True):
        full_prompt = encode_prompt(tok, template, conv)
        shown = tok.decode(full_prompt)
        assert all(turn["content"] in shown for turn in conv)  # every turn, in order
        assert shown.index(conv[0]["content"]) <= shown.index(conv[-1]["content"])
        for answer in pair:
            prompt_ids, completion_ids = encode_pair(tok, template, conv, answer)
            assert prompt_ids == full_prompt
            assert tok.decode(completion_ids, skip_special_tokens=True).strip() == answer.strip()


def test_conversations_need_the_chat_template_and_valid_turns(tmp_path):
    conv = CONVERSATIONS[0]
    with pytest.raises(InputError, match="prompt_template: chat"):
        render_prompt(PROMPT_TEMPLATE, conv)
    assert render_prompt(CHAT, conv) == conv and render_prompt(CHAT, conv) is not conv
    path = _write(tmp_path / "pairs.jsonl", [
        {"prompt": "plain text is fine", "chosen": "a.", "rejected": "b."},
        {"prompt": conv, "chosen": "a.", "rejected": "b."}])
    with pytest.raises(InputError, match="prompt_template: chat") as err:
        load_examples(path, "dpo", PROMPT_TEMPLATE, seed=0)
    assert str(path) in str(err.value) and "row 2" in str(err.value)
    assert err.value.field == "prompt"
    assert len(load_examples(path, "dpo", CHAT, seed=0)) == 2  # mixed rows under chat

    bad = {
        "the last turn must be the user's": conv + [_turn("assistant", "ok.")],
        "role 'bot'": [_turn("bot", "hi"), _turn("user", "hi")],
        "turn 2: content must be non-empty": [_turn("system", "s"), _turn("user", "  ")],
        "system turn may only come first": [_turn("user", "a"), _turn("system", "s"),
                                            _turn("user", "b")],
        "exactly `role` and `content`": [{"role": "user", "text": "hi"}],
        "non-empty list": [],
    }
    for message, prompt in bad.items():
        path = _write(tmp_path / "bad.jsonl", [
            {"prompt": "fine", "chosen": "a.", "rejected": "b."},
            {"prompt": prompt, "chosen": "a.", "rejected": "b."}])
        with pytest.raises(InputError, match=message) as err:
            load_examples(path, "dpo", CHAT, seed=0)
        assert "row 2" in str(err.value) and err.value.field == "prompt", message


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_an_empty_answer_after_a_conversation_names_its_row(tmp_path, loss):
    answer_field = "chosen" if loss == "dpo" else "completion"
    good = ({"chosen": "a.", "rejected": "b."} if loss == "dpo"
            else {"completion": "a.", "label": True})
    path = _write(tmp_path / "rows.jsonl", [
        {"prompt": CONVERSATIONS[0], **good},
        {"prompt": CONVERSATIONS[2], **good, answer_field: " \n "}])
    with pytest.raises(InputError, match="empty") as err:
        load_examples(path, loss, CHAT, seed=0)
    assert "row 2" in str(err.value) and err.value.field == answer_field


def test_prompt_cap_drops_a_conversation_that_does_not_fit(tokenizer_models, tmp_path):
    from transformers import AutoTokenizer

    model_dir, template = tokenizer_models["chat_template"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    long, short = CONVERSATIONS[0], CONVERSATIONS[1]
    n_long, n_short = (len(encode_prompt(tok, template, c)) for c in (long, short))
    assert n_short < n_long
    cap = PromptCap(n_long - 1)
    assert cap.apply(tok, template, short) == short
    assert cap.apply(tok, template, long) is None  # never cut: dropped, and counted
    assert cap.counts() == {"max_prompt_length": n_long - 1, "prompts": 2, "truncated": 0,
                            "dropped": 1}
    assert PromptCap(n_long).apply(tok, template, long) == long

    path = _write(tmp_path / "pairs.jsonl", [
        {"prompt": conv, "chosen": c, "rejected": r}
        for conv, (c, r) in zip(CONVERSATIONS, ANSWERS, strict=True)])
    cap = PromptCap(n_long - 1)
    examples = load_examples(path, "dpo", template, seed=0, tokenizer=tok, prompt_cap=cap)
    assert len(examples) == 2 and long not in [e["prompt"] for e in examples]
    assert (cap.seen, cap.dropped, cap.truncated) == (3, 1, 0)
