"""The merge step: exact endpoints, float32 arithmetic, shard layout, refusals, mergekit parity."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sacpo_steps.core.errors import InputError
from sacpo_steps.models.folders import write_model_card
from sacpo_steps.models.merge import INDEX_FILE, merge

ROOT = Path(__file__).resolve().parent.parent
PARENT_LINEAGE = [
    {"name": "sft", "parent": "base", "loss": "sft"},
    {"name": "dpo_h", "parent": "sft", "loss": "dpo", "data": "helpful", "beta": 0.1},
]


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder, whatever its sharding."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def formula(a: Path, b: Path, q: float) -> dict[str, torch.Tensor]:
    """The reference: (1 - q) * a + q * b in float32, cast to the parents' dtype."""
    wa, wb = load_weights(a), load_weights(b)
    return {k: ((1 - q) * wa[k].float() + q * wb[k].float()).to(wa[k].dtype) for k in wa}


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def variant(src: Path, dst: Path, *, config: dict | None = None,
            tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
            ) -> Path:
    """A copy of a single-file model folder with its config or weights edited."""
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    if tensors is not None:
        path = dst / "model.safetensors"
        save_file(tensors(load_file(path)), path, metadata={"format": "pt"})
    return dst


def reshard(src: Path, dst: Path, max_shard_size: str) -> Path:
    """Save a model again in shards with transformers, tokenizer and card included."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst, max_shard_size=max_shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "sacpo.json", "README.md"):
        shutil.copy2(src / name, dst / name)
    return dst


def to_bf16(src: Path, dst: Path) -> Path:
    return variant(src, dst, config={"dtype": "bfloat16"},
                   tensors=lambda sd: {k: v.to(torch.bfloat16) for k, v in sd.items()})


def assert_nothing_left(*outs: Path) -> None:
    for out in outs:
        assert not out.exists(), out
        assert not list(out.parent.glob(f".{out.name}.tmp-*")), out


@pytest.fixture(scope="module")
def parents(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """a = a stage-1 model with a lineage, b = a different model with the same tokenizer."""
    root = tmp_path_factory.mktemp("merge_parents")
    a = shutil.copytree(tiny_models["sft"], root / "dpo_h")
    write_model_card(a, {"name": "dpo_h", "method": "align", "lineage": PARENT_LINEAGE})
    b = shutil.copytree(tiny_models["stage1"], root / "dpo_h_dpo_s")
    return {"a": a, "b": b, "root": root}


def test_endpoints_are_the_parents_and_midpoint_is_the_float32_average(parents, tmp_path):
    a, b = parents["a"], parents["b"]
    outs = [tmp_path / "q0", tmp_path / "q05", tmp_path / "q1"]
    assert merge(a, b, [0, 0.5, 1], outs) == outs
    # bitwise: the whole file, header included, is the parent's
    assert (outs[0] / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()
    assert (outs[2] / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    wa, wb, mid = load_weights(a), load_weights(b), load_weights(outs[1])
    assert mid.keys() == wa.keys()
    for k in wa:
        assert torch.equal(mid[k], (wa[k] + wb[k]) / 2), k
        assert mid[k].dtype == torch.float32


def test_general_q_follows_the_formula(parents, tmp_path):
    out = tmp_path / "q03"
    merge(parents["a"], parents["b"], [0.3], [out])
    got, want = load_weights(out), formula(parents["a"], parents["b"], 0.3)
    for k, v in want.items():
        assert torch.allclose(got[k], v, rtol=1e-6, atol=1e-7), k


def test_endpoints_keep_signed_zero_and_nan(parents, tmp_path):
    """(1 - q) * a + q * b would turn -0.0 into +0.0 and leak b's NaN into q = 0."""
    name = "model.norm.weight"

    def poke(value: float) -> Callable[[dict], dict]:
        def edit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            sd[name][0] = value
            return sd
        return edit

    a = variant(parents["a"], tmp_path / "a", tensors=poke(-0.0))
    b = variant(parents["b"], tmp_path / "b", tensors=poke(math.nan))
    merge(a, b, [0.0, 1.0], [tmp_path / "q0", tmp_path / "q1"])
    assert bits(load_weights(tmp_path / "q0")[name]) == bits(load_weights(a)[name])
    assert bits(load_weights(tmp_path / "q1")[name]) == bits(load_weights(b)[name])


def test_sharded_parent_gives_the_same_shards_and_a_valid_index(parents, tmp_path):
    from transformers import AutoModelForCausalLM

    a = reshard(parents["a"], tmp_path / "a_sharded", "20KB")
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(shards) > 1
    out, first = tmp_path / "merged", tmp_path / "q0"
    merge(a, parents["b"], [0.5, 0.0], [out, first])  # b is a single file: layouts may differ
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    for shard in shards:
        assert (first / shard).read_bytes() == (a / shard).read_bytes(), shard
    index = json.loads((out / INDEX_FILE).read_text())
    a_index = json.loads((a / INDEX_FILE).read_text())
    assert index["weight_map"] == a_index["weight_map"]
    assert index["metadata"] == a_index["metadata"]  # same dtype, so the same sizes
    data_bytes = 0
    for shard in shards:
        with safe_open(out / shard, framework="pt") as f:
            data_bytes += sum(f.get_tensor(k).nbytes for k in f.keys())
            assert {index["weight_map"][k] for k in f.keys()} == {shard}
    assert index["metadata"]["total_size"] == data_bytes
    model = AutoModelForCausalLM.from_pretrained(out)
    want = formula(parents["a"], parents["b"], 0.5)
    state = model.state_dict()
    for k, v in want.items():
        assert torch.equal(state[k], v), k


def test_bf16_parents_give_bf16_outputs(parents, tmp_path):
    a = to_bf16(parents["a"], tmp_path / "a16")
    b = to_bf16(parents["b"], tmp_path / "b16")
    outs = [tmp_path / "q0", tmp_path / "q05", tmp_path / "q1"]
    merge(a, b, [0.0, 0.5, 1.0], outs)
    assert (outs[0] / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()
    assert (outs[2] / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    wa, wb, mid = load_weights(a), load_weights(b), load_weights(outs[1])
    for k in wa:
        assert mid[k].dtype == torch.bfloat16
        assert torch.equal(mid[k], ((wa[k].float() + wb[k].float()) / 2).to(torch.bfloat16)), k
    card = json.loads((outs[1] / "sacpo.json").read_text())
    assert card["merge"]["dtype"] == "bfloat16"
    assert json.loads((outs[1] / "config.json").read_text())["dtype"] == "bfloat16"


def test_tied_embeddings_merge_without_lm_head(parents, tmp_path):
    from transformers import AutoModelForCausalLM

    def tie(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in sd.items() if k != "lm_head.weight"}

    a = variant(parents["a"], tmp_path / "a", config={"tie_word_embeddings": True}, tensors=tie)
    b = variant(parents["b"], tmp_path / "b", config={"tie_word_embeddings": True}, tensors=tie)
    merge(a, b, [0.25], [tmp_path / "m"])
    got = load_weights(tmp_path / "m")
    assert "lm_head.weight" not in got
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(model.lm_head.weight, got["model.embed_tokens.weight"])


def test_model_card_lineage_and_copied_files(parents, tmp_path):
    a, b = parents["a"], parents["b"]
    (a / "training_args.bin").write_bytes(b"not weights, but not for a merged model either")
    try:
        outs = [tmp_path / "p_sacpo_q025", tmp_path / "p_sacpo_q075"]
        merge(a, b, [0.25, 0.75], outs, name_a="dpo_h", name_b="dpo_h_dpo_s_0.01")
    finally:
        (a / "training_args.bin").unlink()
    card = json.loads((outs[0] / "sacpo.json").read_text())
    assert card["name"] == "p_sacpo_q025"  # the folder's name when --name is not given
    assert card["method"] == "merge"
    assert card["merge"] == {"parent_a": "dpo_h", "parent_b": "dpo_h_dpo_s_0.01", "q": 0.25,
                             "dtype": "float32"}
    assert card["lineage"] == [*PARENT_LINEAGE, {"name": "p_sacpo_q025", "parent": "dpo_h",
                                                 "parent_b": "dpo_h_dpo_s_0.01",
                                                 "loss": "merge", "q": 0.25}]
    assert "dpo_h_dpo_s_0.01" in card["description"]
    readme = (outs[0] / "README.md").read_text()
    assert "# p_sacpo_q025" in readme and "| merge |" in readme
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (outs[1] / name).read_bytes() == (a / name).read_bytes(), name
    assert sorted(p.name for p in outs[1].iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "sacpo.json",
        "tokenizer.json", "tokenizer_config.json"]


def test_names_and_folder_fallbacks(parents, tmp_path):
    outs = [tmp_path / "x", tmp_path / "y"]
    merge(parents["a"], parents["b"], [0.25, 0.5], outs, names=["m25", "m50"])
    cards = [json.loads((o / "sacpo.json").read_text()) for o in outs]
    assert [c["name"] for c in cards] == ["m25", "m50"]
    assert cards[1]["merge"]["parent_a"] == "dpo_h"  # folder names
    assert cards[1]["merge"]["parent_b"] == "dpo_h_dpo_s"


def test_ignores_how_the_config_was_saved(parents, tmp_path):
    b = variant(parents["b"], tmp_path / "b", config={
        "transformers_version": "4.0.0", "_name_or_path": "/somewhere", "dtype": "float32",
        "torch_dtype": "float32", "use_cache": False})
    merge(parents["a"], b, [0.5], [tmp_path / "m"])
    assert (tmp_path / "m" / "model.safetensors").is_file()


def _drop(name: str) -> Callable[[dict], dict]:
    return lambda sd: {k: v for k, v in sd.items() if k != name}


def _reshape_rows(name: str) -> Callable[[dict], dict]:
    def edit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sd[name] = sd[name][:-1].clone()
        return sd
    return edit


def _add(name: str, value: torch.Tensor) -> Callable[[dict], dict]:
    def edit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sd[name] = value
        return sd
    return edit


REFUSED_B = {
    "architecture": (dict(config={"architectures": ["MistralForCausalLM"],
                                  "model_type": "mistral"}), ["architectures", "config.json"]),
    "hidden size": (dict(config={"intermediate_size": 64}), ["intermediate_size"]),
    "shape": (dict(tensors=_reshape_rows("lm_head.weight")), ["lm_head.weight", "shape"]),
    "missing in b": (dict(tensors=_drop("model.norm.weight")),
                     ["model.norm.weight", "missing"]),
    "extra in b": (dict(tensors=_add("model.extra.weight", torch.ones(3))),
                   ["model.extra.weight", "missing from parent a"]),
    "dtype": (dict(tensors=lambda sd: {k: v.to(torch.bfloat16) for k, v in sd.items()}),
              ["dtype", "BF16"]),
}


@pytest.mark.parametrize("case", list(REFUSED_B))
def test_refuses_parents_that_do_not_match(case, parents, tmp_path):
    edit, words = REFUSED_B[case]
    b = variant(parents["b"], tmp_path / "bad_b", **edit)
    outs = [tmp_path / "m1", tmp_path / "m2"]
    with pytest.raises(InputError) as err:
        merge(parents["a"], b, [0.25, 0.5], outs)
    message = str(err.value)
    assert "bad_b" in message, message
    for word in words:
        assert word in message, message
    assert_nothing_left(*outs)


def test_refuses_different_tokenizers(parents, tmp_path):
    b = shutil.copytree(parents["b"], tmp_path / "bad_b")
    tok = json.loads((b / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = list(vocab)[5:7]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (b / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(InputError, match=r"bad_b.*tokenizer\.json.*different tokenizers"):
        merge(parents["a"], b, [0.5], [tmp_path / "m"])
    assert_nothing_left(tmp_path / "m")


def test_refuses_non_safetensors_parent(parents, tmp_path):
    b = shutil.copytree(parents["b"], tmp_path / "bin_b")
    torch.save(load_file(b / "model.safetensors"), b / "pytorch_model.bin")
    (b / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"bin_b.*no safetensors weights"):
        merge(parents["a"], b, [0.5], [tmp_path / "m"])
    assert_nothing_left(tmp_path / "m")


@pytest.mark.parametrize(("qs", "n_out", "pattern"), [
    ([-0.1], 1, r"q.*\[0, 1\]"),
    ([1.5], 1, r"q.*\[0, 1\]"),
    ([math.nan], 1, r"q.*\[0, 1\]"),
    ([0.25, 0.5], 1, r"2 q values but 1 output"),
    ([0.5], 2, r"1 q values but 2 output"),
    ([0.5, 0.5], 2, r"duplicate q"),
    ([], 0, r"no q"),
])
def test_refuses_bad_q_lists(qs, n_out, pattern, parents, tmp_path):
    outs = [tmp_path / f"m{i}" for i in range(n_out)]
    with pytest.raises(InputError, match=pattern):
        merge(parents["a"], parents["b"], qs, outs)
    assert_nothing_left(*outs)


def test_refuses_output_over_a_parent(parents, tmp_path):
    with pytest.raises(InputError, match="overlaps the parent"):
        merge(parents["a"], parents["b"], [0.5], [parents["a"]])
    with pytest.raises(InputError, match="overlaps the parent"):
        merge(parents["a"], parents["b"], [0.5], [parents["root"]])
    assert (parents["a"] / "model.safetensors").is_file()


def test_refuses_duplicate_outputs(parents, tmp_path):
    with pytest.raises(InputError, match="duplicate output folder"):
        merge(parents["a"], parents["b"], [0.25, 0.5], [tmp_path / "m", tmp_path / "." / "m"])
    assert_nothing_left(tmp_path / "m")


def test_failure_mid_merge_leaves_no_output_at_all(parents, tmp_path):
    """An integer tensor that differs is found while writing: every q output is dropped."""
    a = variant(parents["a"], tmp_path / "a", tensors=_add("model.zz_steps", torch.arange(4)))
    b = variant(parents["b"], tmp_path / "b", tensors=_add("model.zz_steps", torch.arange(4) + 1))
    outs = [tmp_path / "m1", tmp_path / "m2"]
    (tmp_path / "m2").mkdir()
    (tmp_path / "m2" / "old.txt").write_text("an earlier, finished output")
    with pytest.raises(InputError, match="model.zz_steps"):
        merge(a, b, [0.25, 0.75], outs)
    assert_nothing_left(outs[0])
    assert (tmp_path / "m2" / "old.txt").is_file()  # an earlier output is not touched
    assert not list(tmp_path.glob(".m2.tmp-*"))


def test_cli_runs_and_exits_2_on_bad_input(parents, tmp_path):
    base = [sys.executable, "-m", "sacpo_steps", "merge", "--a", str(parents["a"]),
            "--b", str(parents["b"])]
    bad = subprocess.run([*base, "--q", "1.5", "--out", str(tmp_path / "m")], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2, bad.stderr
    assert "q must be a number in [0, 1]" in bad.stderr
    assert_nothing_left(tmp_path / "m")
    log = tmp_path / "logs" / "merge.log"
    ok = subprocess.run([*base, "--name-a", "A", "--name-b", "B", "--q", "0.25", "--q", "0.75",
                         "--out", str(tmp_path / "x"), "--out", str(tmp_path / "y"),
                         "--name", "X", "--name", "Y", "--threads", "1", "--log", str(log)],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    card = json.loads((tmp_path / "y" / "sacpo.json").read_text())
    assert card["name"] == "Y" and card["merge"]["q"] == 0.75
    assert card["merge"]["parent_a"] == "A" and card["merge"]["parent_b"] == "B"
    assert "wall" in log.read_text()


@pytest.mark.slow
def test_equals_mergekit_linear(parents, tmp_path):
    pytest.importorskip("mergekit", reason="mergekit (test-only dependency) is not installed")
    q = 0.3
    config = tmp_path / "linear.yml"
    config.write_text(
        "merge_method: linear\ndtype: float32\nparameters:\n  normalize: false\n"
        f"models:\n  - model: {parents['a']}\n    parameters:\n      weight: {1 - q!r}\n"
        f"  - model: {parents['b']}\n    parameters:\n      weight: {q!r}\n")
    proc = subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(config),
                           str(tmp_path / "mergekit"), "--quiet"], cwd=tmp_path,
                          capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    merge(parents["a"], parents["b"], [q], [tmp_path / "ours"])
    theirs, ours = load_weights(tmp_path / "mergekit"), load_weights(tmp_path / "ours")
    assert theirs.keys() == ours.keys()
    for k in ours:
        assert theirs[k].dtype == ours[k].dtype == torch.float32
        assert torch.allclose(ours[k], theirs[k], rtol=1e-6, atol=1e-6), k
