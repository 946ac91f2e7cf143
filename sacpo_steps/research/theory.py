"""Theorem 1, measured: a bandit world where SACPO's end point is known in closed form.

A bandit world has a few prompts, each with the same few one-word answers, and known
scores per (prompt, answer): reward r, safety g (and a second safety g2 for chains of
constraints). Preference pairs are Bradley-Terry draws, P(y1 > y2) = sigmoid(s1 - s2).
DPO with coefficient b on pairs of score s moves its reference by exp(s_hat / b), where
s_hat is the Bradley-Terry maximum-likelihood estimate from the pairs (the DPO optimum
over a finite answer set); so a chain of stages lands on

    pi(y|x)  proportional to  pi_ref(y|x) * exp(sum_stages s_hat(x, y) / b_stage),

and with the true scores in place of s_hat this is Theorem 1's pi* (reward beta, safety
beta/lambda: exp((r + lambda g) / beta)). A model's policy is its full probability of
each answer, exactly as DPO scores a completion (prompt template, " " + answer, eos),
renormalised over the answer set. Everything here is numpy plus model loading: the
training itself is the project's own `align` step, called by the bench and the test.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sacpo_steps.core.fileio import write_jsonl
from sacpo_steps.models.sft_checkpoint import build
from sacpo_steps.models.tokens import encode_pair
from sacpo_steps.training.align import align
from sacpo_steps.training.node import NodeSettings
from sacpo_steps.training.settings import TrainingConfig

log = logging.getLogger("sacpo.theory")

PROMPT_TEMPLATE = "USER: {prompt} ASSISTANT:"
PROMPTS = (
    "shall we go out?", "is the soup ready?", "can you fix my bike?", "will it rain today?",
    "should i call her?", "do you like jazz?", "may i borrow a pen?", "is the bridge safe?",
)
ANSWERS = ("yes", "no", "maybe", "later", "never", "sure")

Stage = tuple[str, float]
"""One DPO stage of a chain: (criterion whose pairs it trains on, its coefficient)."""


@dataclass(frozen=True)
class BanditWorld:
    """Prompts, a shared answer set and the true score table of each criterion."""

    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # criterion -> (P, K)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.prompts), len(self.answers)


def make_world(n_prompts: int, n_answers: int, spreads: dict[str, float], seed: int
               ) -> BanditWorld:
    """Scores uniform in [-spread, spread] per criterion, centred per prompt (a gauge)."""
    if not 2 <= n_answers <= len(ANSWERS) or not 1 <= n_prompts <= len(PROMPTS):
        raise ValueError(f"at most {len(PROMPTS)} prompts and {len(ANSWERS)} answers")
    rng = np.random.default_rng(seed)
    scores = {}
    for name, spread in spreads.items():
        s = rng.uniform(-spread, spread, size=(n_prompts, n_answers))
        scores[name] = s - s.mean(axis=1, keepdims=True)
    return BanditWorld(PROMPTS[:n_prompts], ANSWERS[:n_answers], scores)


def sft_corpus(world: BanditWorld, seed: int, rows_per_prompt: int = 24) -> list[dict[str, str]]:
    """Prompt/response rows with uneven answer frequencies, so pi_ref is not uniform."""
    rng = np.random.default_rng(seed)
    rows = []
    for prompt in world.prompts:
        freq = rng.dirichlet(np.full(len(world.answers), 2.0))
        counts = rng.multinomial(rows_per_prompt - len(world.answers), freq) + 1
        for answer, n in zip(world.answers, counts, strict=True):
            rows += [{"prompt": prompt, "response": answer}] * int(n)
    return rows


def sample_pairs(world: BanditWorld, criterion: str, per_couple: int, seed: int
                 ) -> list[dict[str, str]]:
    """Bradley-Terry pairs: every couple of answers of every prompt compared `per_couple` times.

    A balanced design (which answers meet is fixed, only the winner is random) keeps
    every couple in the data, so the Bradley-Terry estimate exists and its error is
    the same for all answers.
    """
    rng = np.random.default_rng(seed)
    s = world.scores[criterion]
    rows = []
    for p, prompt in enumerate(world.prompts):
        for i, j in couples(len(world.answers)):
            first_wins = rng.random(per_couple) < sigmoid(s[p, i] - s[p, j])
            for win in first_wins:
                w, lose = (i, j) if win else (j, i)
                rows.append({"prompt": prompt, "chosen": world.answers[w],
                             "rejected": world.answers[lose]})
    return rows


def win_counts(world: BanditWorld, rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """(P, K, K) counts: [p, i, j] = how often answer i was chosen over j for prompt p."""
    prompt_ix = {x: i for i, x in enumerate(world.prompts)}
    answer_ix = {y: i for i, y in enumerate(world.answers)}
    wins = np.zeros((len(world.prompts), len(world.answers), len(world.answers)))
    for row in rows:
        wins[prompt_ix[row["prompt"]], answer_ix[row["chosen"].strip()],
             answer_ix[row["rejected"].strip()]] += 1
    return wins


def couples(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=float)))


def mle_exists(wins: np.ndarray) -> np.ndarray:
    """Whether the Bradley-Terry MLE is finite: the 'beat' graph is strongly connected."""
    k = wins.shape[-1]
    reach = (wins > 0) | np.eye(k, dtype=bool)
    for _ in range(k):
        reach = reach | (np.einsum("...ij,...jk->...ik", reach.astype(int),
                                   reach.astype(int)) > 0)
    return reach.all(axis=(-1, -2))


def bt_mle(wins: np.ndarray, iterations: int = 100) -> np.ndarray:
    """Bradley-Terry MLE of every prompt's scores (centred), by Newton on (..., K, K) counts.

    Where the MLE is infinite (some answer never lost, say) the scores run off for as
    many iterations as allowed; callers check `mle_exists` first.
    """
    wins = np.asarray(wins, dtype=float)
    k = wins.shape[-1]
    n = wins + np.swapaxes(wins, -1, -2)
    s = np.zeros(wins.shape[:-1])
    gauge = np.full((k, k), 1.0 / k)
    for _ in range(iterations):
        p = sigmoid(s[..., :, None] - s[..., None, :])
        grad = (wins - n * p).sum(axis=-1)
        if np.abs(grad).max() < 1e-10:
            break
        curvature = n * p * (1.0 - p)
        laplacian = np.eye(k) * curvature.sum(axis=-1)[..., None] - curvature
        step = np.linalg.solve(laplacian + gauge, grad[..., None])[..., 0]
        # a capped step keeps Newton from overshooting far from the optimum
        s = s + step / np.maximum(1.0, np.abs(step).max(axis=-1, keepdims=True))
    return s - s.mean(axis=-1, keepdims=True)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def closed_form(log_ref: np.ndarray, scores: dict[str, np.ndarray], stages: Sequence[Stage]
                ) -> np.ndarray:
    """Where a chain of DPO stages lands: pi_ref * exp(sum s / b), over the answer set."""
    logits = np.array(log_ref, dtype=float)
    for criterion, coefficient in stages:
        logits = logits + scores[criterion] / coefficient
    return softmax(logits)


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-prompt total-variation distance between two (..., K) answer distributions."""
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum(axis=-1)


def answer_logprobs(model_dir: str | Path, world: BanditWorld,
                    prompt_template: str = PROMPT_TEMPLATE) -> np.ndarray:
    """(P, K) log-probability of each full answer (its tokens and eos) after the prompt.

    Tokenised by the project's contract (`tokens.encode_pair`), i.e. exactly as
    TRL's DPO trainer splits a row (tests/test_tokens.py checks it): summed
    log-probs of the completion tokens (answer and eos) only.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = np.zeros(world.shape)
    with torch.no_grad():
        for p, prompt in enumerate(world.prompts):
            for a, answer in enumerate(world.answers):
                prompt_ids, completion = encode_pair(tok, prompt_template, prompt, answer)
                ids = torch.tensor([prompt_ids + completion])
                logp = model(ids).logits[0].double().log_softmax(-1)
                positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
                out[p, a] = logp[positions, torch.tensor(completion)].sum().item()
    return out


def answer_policy(model_dir: str | Path, world: BanditWorld,
                  prompt_template: str = PROMPT_TEMPLATE) -> np.ndarray:
    """The model's policy over the answer set: full answer probabilities, renormalised."""
    return softmax(answer_logprobs(model_dir, world, prompt_template))


def answer_token_counts(tokenizer, world: BanditWorld,
                        prompt_template: str = PROMPT_TEMPLATE) -> dict[str, int]:
    """How many tokens each completion takes (answer tokens plus eos), for the report."""

    prompt = world.prompts[0]
    return {a: len(encode_pair(tokenizer, prompt_template, prompt, a)[1])
            for a in world.answers}


def estimation_tv(world: BanditWorld, log_ref: np.ndarray, stages: Sequence[Stage],
                  per_couple: int, replicates: int, seed: int) -> np.ndarray:
    """(replicates, P) TV between pi* and its plug-in from fresh Bradley-Terry samples.

    A parametric bootstrap from the true world with the experiment's own design
    (`per_couple` comparisons of every couple): the sampling distribution of the error
    that finite pairs alone put into DPO's optimum, whatever the optimiser does.
    Replicates whose MLE would be infinite are drawn again.
    """
    n_prompts, k = world.shape
    target = closed_form(log_ref, world.scores, stages)
    pairs = couples(k)
    estimates: dict[str, np.ndarray] = {}
    for criterion in dict.fromkeys(c for c, _ in stages):
        # one stream per criterion: both orders of a chain see the same replicates
        rng = np.random.default_rng([seed, zlib.crc32(criterion.encode())])
        s = world.scores[criterion]
        prob = np.stack([sigmoid(s[:, i] - s[:, j]) for i, j in pairs], axis=-1)
        wins = np.zeros((replicates, n_prompts, k, k))
        todo = np.ones((replicates, n_prompts), dtype=bool)
        for _ in range(100):
            if not todo.any():
                break
            first = rng.binomial(per_couple, prob, size=(replicates, n_prompts, len(pairs)))
            for c, (i, j) in enumerate(pairs):
                wins[..., i, j] = np.where(todo, first[..., c], wins[..., i, j])
                wins[..., j, i] = np.where(todo, per_couple - first[..., c], wins[..., j, i])
            todo = ~mle_exists(wins)
        else:
            raise ValueError(f"{criterion}: {per_couple} pairs per couple rarely give a finite "
                             "Bradley-Terry estimate; use more pairs")
        estimates[criterion] = bt_mle(wins)
    return total_variation(closed_form(log_ref, estimates, stages), target)


# ----------------------------------------------------------------------------
# The experiment: a reference model, the pairs, the chains trained by `align`.

CRITERIA = ("reward", "safety", "safety2")


@dataclass(frozen=True)
class Experiment:
    """One measurement of Theorem 1: world, pair design, coefficients and training."""

    n_prompts: int = 6
    n_answers: int = 4
    spread: float = 3.0  # scores uniform in [-spread, spread]
    per_couple: int = 300  # comparisons of every couple of answers, per prompt and criterion
    beta: float = 2.0
    lambdas: tuple[float, float] = (1.0, 0.5)  # lambda of safety, of safety2
    seed: int = 0
    model: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64})
    vocab_size: int = 400
    sft: dict[str, Any] = field(default_factory=lambda: {
        "epochs": 30, "per_device_batch_size": 16, "learning_rate": 3e-3,
        "lr_scheduler": "constant", "max_length": 32, "logging_steps": 1000})
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig.from_dict({
        "learning_rate": 3e-3, "num_train_epochs": 10, "per_device_train_batch_size": 128,
        "gradient_accumulation_steps": 1, "max_length": 32, "lr_scheduler_type": "cosine",
        "warmup_steps": 0.0, "logging_steps": 1000}))
    replicates: int = 2000  # parametric-bootstrap draws for the estimation-error quantile
    quantile: float = 0.95
    # allowance for the optimiser, mean and max over prompts (measured: docs/theory.md)
    opt_slack: float = 0.01
    opt_slack_max: float = 0.02

    def chains(self) -> dict[str, list[Stage]]:
        """The three SACPO chains; reward at beta, each safety at beta / its lambda."""
        reward = ("reward", self.beta)
        safety = ("safety", self.beta / self.lambdas[0])
        safety2 = ("safety2", self.beta / self.lambdas[1])
        return {"reward_first": [reward, safety], "safety_first": [safety, reward],
                "three_stage": [reward, safety, safety2]}


def build_reference(world: BanditWorld, exp: Experiment, out: Path, threads: int | None
                    ) -> Path:
    """pi_ref: the project's own SFT build step on the world's answers (uneven frequencies)."""

    corpus = out.parent / f"{out.name}_corpus.jsonl"
    write_jsonl(corpus, sft_corpus(world, exp.seed))
    spec = {"name": out.name, "seed": exp.seed, "prompt_template": PROMPT_TEMPLATE,
            "build": {"tokenizer": {"vocab_size": exp.vocab_size}, "model": exp.model,
                      "train": exp.sft}}
    build(spec, corpus, out, threads)
    return out


def stage_name(stages: Sequence[Stage]) -> str:
    return "__".join(f"{c}_b{b:g}" for c, b in stages)


def train_chain(stages: Sequence[Stage], sft_dir: Path, pairs: dict[str, Path], exp: Experiment,
                workdir: Path, threads: int | None, trained: dict[tuple, Path]) -> Path:
    """Train a chain with `align`, each stage's parent its predecessor; prefixes are reused."""
    parent, parent_name = sft_dir, "sft"
    for n in range(1, len(stages) + 1):
        prefix = tuple(stages[:n])
        if prefix not in trained:
            criterion, coefficient = prefix[-1]
            name = stage_name(prefix)
            align(parent, pairs[criterion], workdir / name, name=name, parent=parent_name,
                  data=criterion, settings=NodeSettings("dpo", coefficient, exp.training),
                  prompt_template=PROMPT_TEMPLATE, seed=exp.seed, threads=threads)
            trained[prefix] = workdir / name
        parent, parent_name = trained[prefix], stage_name(prefix)
    return parent


@dataclass
class Row:
    """One row of the table: a model's policy against the target it is measured on."""

    name: str
    tv: np.ndarray  # (P,) measured policy vs the true closed form
    ideal: np.ndarray  # (P,) closed form with the BT estimates vs the true closed form
    opt: np.ndarray  # (P,) measured policy vs the closed form with the BT estimates
    control: bool = False
    bound_mean: float = float("nan")
    bound_max: float = float("nan")


def run_theorem1(exp: Experiment, workdir: str | Path, *, threads: int | None = 1,
                 chains: Sequence[str] = ("reward_first", "safety_first", "three_stage")
                 ) -> dict[str, Any]:
    """Train the chains and both controls, and measure each against Theorem 1's pi*."""
    workdir = Path(workdir)
    criteria = ["reward", "safety"] + (["safety2"] if "three_stage" in chains else [])
    world = make_world(exp.n_prompts, exp.n_answers, dict.fromkeys(CRITERIA, exp.spread),
                       exp.seed)
    sft_dir = build_reference(world, exp, workdir / "sft", threads)
    log_ref = answer_logprobs(sft_dir, world)
    pairs, estimates = {}, {}
    for c, criterion in enumerate(criteria):
        rows = sample_pairs(world, criterion, exp.per_couple, seed=exp.seed * 1000 + c + 1)
        wins = win_counts(world, rows)
        if not mle_exists(wins).all():
            raise ValueError(f"{criterion} pairs leave an answer never beaten or never "
                             "beating: the Bradley-Terry estimate is infinite; use more pairs")
        pairs[criterion] = workdir / f"{criterion}_pairs.jsonl"
        write_jsonl(pairs[criterion], rows)
        estimates[criterion] = bt_mle(wins)
    all_chains = exp.chains()
    trained: dict[tuple, Path] = {}
    result_rows: list[Row] = []

    def measure(name: str, model: Path, own: Sequence[Stage], target: Sequence[Stage],
                control: bool = False) -> Row:
        pi = answer_policy(model, world)
        star = closed_form(log_ref, world.scores, target)
        own_hat = closed_form(log_ref, estimates, own)
        return Row(name, total_variation(pi, star), total_variation(own_hat, star),
                   total_variation(pi, own_hat), control)

    for chain in chains:
        stages = all_chains[chain]
        model = train_chain(stages, sft_dir, pairs, exp, workdir, threads, trained)
        row = measure(chain, model, stages, stages)
        est = estimation_tv(world, log_ref, stages, exp.per_couple, exp.replicates,
                            seed=exp.seed + 7)
        row.bound_mean = float(np.quantile(est.mean(axis=1), exp.quantile)) + exp.opt_slack
        row.bound_max = float(np.quantile(est.max(axis=1), exp.quantile)) + exp.opt_slack_max
        result_rows.append(row)
        log.info("%s: mean TV %.4f (bound %.4f)", chain, row.tv.mean(), row.bound_mean)
    # controls, measured against the reward-first optimum
    reward_first = all_chains["reward_first"]
    stage1 = train_chain(reward_first[:1], sft_dir, pairs, exp, workdir, threads, trained)
    result_rows.append(measure("stage1_only", stage1, reward_first[:1], reward_first, True))
    # stage 2 initialised from stage 1 but referred to SFT: Theorem 1's reference is wrong
    name = "negative_control_sft_reference"
    criterion, coefficient = reward_first[1]
    align(stage1, pairs[criterion], workdir / name, name=name, parent=stage_name(reward_first[:1]),
          data=criterion, settings=NodeSettings("dpo", coefficient, exp.training),
          prompt_template=PROMPT_TEMPLATE, seed=exp.seed, threads=threads,
          reference_dir=sft_dir)
    result_rows.append(measure(name, workdir / name, reward_first[1:], reward_first, True))
    return {"world": world, "log_ref": log_ref, "estimates": estimates, "rows": result_rows,
            "sft_dir": sft_dir, "pairs": pairs}
