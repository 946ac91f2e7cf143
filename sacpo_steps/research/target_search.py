"""P-SACPO that meets a safety target without retraining: search the merge weight q.

The user states the paper's constraint E[g] >= b as a target on a measured safety
value: the harmlessness win rate vs the baseline (`harmlessness_winrate`, by the
red-team prompt set's judge: rule, GPT-4-style or score model), or the share of
red-team answers rated safe on their own (`safe_rate`: ground-truth harm = 0 on the
demo, cost < 0 with a Safe RLHF cost model). Merging the reward-aligned model a with
its over-safe stage-2 child b at weight q trades helpfulness for safety; assuming the
safety measurement grows with q, the helpfulness-maximising feasible merge is the
smallest q whose measured constraint meets the target. The target counts as met only
when the LOWER end of the 95% interval meets it.

Bisection: q = 1 (the over-safe model itself) is measured first: if even it misses
the target, no merge can meet it, and the over-safe model must be retrained with a
smaller beta/lambda. Then q = 0, then halving [lo, hi] until it is narrower than
`tolerance`. lambda ~ q * lambda_bar is reported, labelled approximate: merging
weights only approximates mixing policies.

Matched comparisons: `--target-from` takes the target from another model's
harmlessness row (the lower end of its interval) in a seed's win-rate table, and
`--match-battles` then compares helpfulness of the merge at the found q with that
model's, paired over the prompts both answered against the same baseline.

One search job runs every evaluation (merge, generate, judge) in-process, because
the q values to try depend on earlier measurements: a Snakemake checkpoint would
cost a DAG re-evaluation and several job start-ups per step for no caching gain.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import atomic_output, json_object_arg, setup_logging
from sacpo_steps.core.schema import default_of
from sacpo_steps.evaluation.generate import generate
from sacpo_steps.evaluation.generation_settings import GenerationSettings
from sacpo_steps.evaluation.judge import (
    error_rate_limit,
    judge_model,
    read_generations,
    read_prompt_set,
)
from sacpo_steps.evaluation.judges.base import JudgeRequest
from sacpo_steps.evaluation.judges.registry import make_judge
from sacpo_steps.evaluation.stats import (
    REQUIRED_COLUMNS,
    SCORE_A,
    bootstrap_interval,
    load_battles,
    prompt_scores,
    read_csv_table,
    win_rates,
)
from sacpo_steps.models.merge import merge

log = logging.getLogger("sacpo.target_search")


@dataclass(frozen=True)
class Measurement:
    """Measured at one q: the constraint (with its interval) and the objective."""

    q: float
    constraint: float
    constraint_low: float
    constraint_high: float
    helpfulness: float
    helpfulness_low: float
    helpfulness_high: float

    def meets(self, target: float) -> bool:
        return self.constraint_low >= target


@dataclass
class SearchResult:
    met: bool
    q: float | None
    chosen: Measurement | None
    trace: list[Measurement]
    lambda_approx: float | None
    message: str
    # chosen minus over-safe helpfulness win rate, paired over prompts: (mean, low, high)
    helpfulness_gain: tuple[float, float, float] | None = None


def search(evaluate: Callable[[float], Measurement], target: float, *,
           tolerance: float = 0.05, lambda_bar: float | None = None,
           over_safe_name: str = "b") -> SearchResult:
    """Smallest q in [0, 1] whose constraint's lower bound meets `target` (bisection)."""
    if not 0.0 < tolerance < 1.0:
        raise InputError(f"tolerance must be in (0, 1), got {tolerance}", field="target.tolerance")
    trace: list[Measurement] = []

    def measure(q: float) -> Measurement:
        m = evaluate(q)
        trace.append(m)
        log.info("q=%.4f: constraint %.3f [%.3f, %.3f], helpfulness %.3f", q, m.constraint,
                 m.constraint_low, m.constraint_high, m.helpfulness)
        return m

    top = measure(1.0)
    if not top.meets(target):
        msg = (f"no merge meets the target {target}: even the over-safe model "
               f"'{over_safe_name}' (q = 1) measures {top.constraint:.3f} "
               f"[{top.constraint_low:.3f}, {top.constraint_high:.3f}]. Train the over-safe "
               f"model again with a smaller beta/lambda.")
        return SearchResult(False, None, None, trace, None, msg)
    bottom = measure(0.0)
    if bottom.meets(target):
        best, lo, hi = bottom, 0.0, 0.0
    else:
        best, lo, hi = top, 0.0, 1.0
        while hi - lo > tolerance:
            mid = round((lo + hi) / 2, 6)
            m = measure(mid)
            if m.meets(target):
                best, hi = m, mid
            else:
                lo = mid
    lam = best.q * lambda_bar if lambda_bar is not None else None
    msg = (f"q = {best.q:g} meets the target {target}: constraint {best.constraint:.3f} "
           f"[{best.constraint_low:.3f}, {best.constraint_high:.3f}], helpfulness "
           f"{best.helpfulness:.3f} [{best.helpfulness_low:.3f}, {best.helpfulness_high:.3f}]"
           f" vs the over-safe model's {top.helpfulness:.3f} [{top.helpfulness_low:.3f}, "
           f"{top.helpfulness_high:.3f}]"
           + (f"; lambda ~ {lam:g} (approximate: merging weights only approximates "
              "mixing policies)" if lam is not None else ""))
    return SearchResult(True, best.q, best, trace, lam, msg)


MEASURES = ("harmlessness_winrate", "safe_rate")


def safe_rate(judge: Any, generations: Path, prompts: Path, *, rounds: int, seed: int,
              confidence: float = 0.95) -> tuple[float, float, float]:
    """Share of answers the judge rates safe on their own, with a bootstrap interval
    over prompts (the paper's cost-model safe rate; on the demo, harm = 0)."""
    import numpy as np


    prompt_rows = read_prompt_set(prompts)
    _, rows = read_generations(generations)
    requests = []
    for pid, row in rows.items():
        task_id = prompt_rows.get(pid, {}).get("task_id")
        requests.append(JudgeRequest("harmlessness", pid, row["prompt"], row["answer"],
                                     row["answer"],
                                     context={"task_id": task_id} if task_id else {}))
    verdicts = judge.safe_many(requests)
    missing = [r.prompt_id for r, v in zip(requests, verdicts, strict=True) if v is None]
    if missing:
        raise InputError(f"{len(missing)} answer(s) could not be rated (first: prompt "
                         f"{missing[0]!r})", path=generations)
    return mean_interval(np.array(verdicts, dtype=float), rounds=rounds, seed=seed,
                         confidence=confidence)


def mean_interval(values: Any, *, rounds: int, seed: int,
                  confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-prompt values with the percentile interval from resampling prompts."""
    import numpy as np


    values = np.asarray(values, dtype=float)
    low, high = bootstrap_interval(values, np.ones(len(values)), np.random.default_rng(seed),
                                   rounds, confidence)
    return float(values.mean()), low, high


class MergeEvaluator:
    """Measures one merge weight q: merge, generate both prompt sets, then judge each
    with its own judge: helpfulness as the win rate vs the baseline, the constraint as
    the harmlessness win rate vs the baseline or as the safe rate. Keeps each q's
    per-prompt helpfulness, for the paired gain of one q over another."""

    def __init__(self, parent_a: Path, parent_b: Path, *, prompts: dict[str, Path],
                 baseline: dict[str, Path], judges: dict[str, dict[str, Any]],
                 spec: Path | None, gen: dict[str, Any], work: Path, rounds: int, seed: int,
                 threads: int | None, measure: str = "harmlessness_winrate",
                 baseline_name: str = "sft") -> None:
        if measure not in MEASURES:
            raise InputError(f"unknown measure {measure!r} (known: {', '.join(MEASURES)})",
                             field="target.measure")
        self.parents, self.prompts, self.baseline = (parent_a, parent_b), prompts, baseline
        self.settings, self.gen, self.work = judges, gen, work
        self.rounds, self.seed, self.threads = rounds, seed, threads
        self.measure, self.baseline_name = measure, baseline_name
        self.judges = {role: make_judge(dict(cfg), spec_path=spec)
                       for role, cfg in judges.items()}
        if measure == "safe_rate":  # fail before any merge if this judge cannot do it
            self.judges["red_team"].safe_many([])
        self.per_prompt: dict[float, Any] = {}  # q -> helpfulness per prompt (win 1, tie 0.5)

    def __call__(self, q: float) -> Measurement:
        name = f"merge-q{q:g}"
        model = self.work / name
        merge(*self.parents, [q], [model], names=[name], threads=self.threads)
        files, outs = [], {}
        for prompt_set, criterion in (("helpfulness", "helpfulness"),
                                      ("red_team", "harmlessness")):
            out = outs[prompt_set] = self.work / f"{name}.{prompt_set}.jsonl"
            generate(model, self.prompts[prompt_set], out, model_name=name, seed=self.seed,
                     threads=self.threads, **self.gen)
            if prompt_set == "red_team" and self.measure == "safe_rate":
                continue
            battles = self.work / f"{name}.{prompt_set}.battles.jsonl"
            settings = self.settings[prompt_set]
            judge_model(out, self.baseline[prompt_set], self.prompts[prompt_set], criterion,
                        self.judges[prompt_set], int(settings.get("repetitions", 1)), battles,
                        max_error_rate=error_rate_limit(settings))
            files.append(battles)
        battles = load_battles(files)
        table = win_rates(battles, baseline=self.baseline_name, rounds=self.rounds,
                          seed=self.seed).set_index("criterion")
        helpful = battles[(battles["criterion"] == "helpfulness")
                          & (battles["outcome"] != "error")]
        self.per_prompt[q] = helpful["outcome"].map(SCORE_A).groupby(helpful["prompt_id"]).mean()
        h = table.loc["helpfulness"]
        if self.measure == "safe_rate":
            c = safe_rate(self.judges["red_team"], outs["red_team"], self.prompts["red_team"],
                          rounds=self.rounds, seed=self.seed)
        else:
            row = table.loc["harmlessness"]
            c = (float(row.win_rate), float(row.ci_low), float(row.ci_high))
        return Measurement(q, *c, float(h.win_rate), float(h.ci_low), float(h.ci_high))

    def paired_gain(self, q: float, other: float) -> tuple[float, float, float]:
        """Helpfulness of q minus that of `other`, paired over prompts, with its interval."""
        return paired_difference(self.per_prompt[q], self.per_prompt[other],
                                 rounds=self.rounds, seed=self.seed)

    def close(self) -> None:
        for judge in self.judges.values():
            judge.close()


def paired_difference(a: Any, b: Any, *, rounds: int, seed: int,
                      confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of a - b over the prompts both scored, with a bootstrap interval that
    resamples prompts (the two models answered the same prompts: a paired design)."""
    common = a.index.intersection(b.index)
    if len(common) == 0:
        raise InputError("no prompt was scored for both models", field="helpfulness")
    return mean_interval((a.loc[common] - b.loc[common]).to_numpy(dtype=float),
                         rounds=rounds, seed=seed, confidence=confidence)


LABELS = {"harmlessness_winrate": "harmlessness win rate vs the baseline",
          "safe_rate": "safe rate of the red-team answers"}


def target_from_table(path: str | Path, model: str, measure: str) -> float:
    """The lower end of `model`'s harmlessness interval in a seed's winrate.csv: meeting
    it means the merge is at least as harmless as `model`, by the same judge."""
    if measure != "harmlessness_winrate":
        raise InputError(f"--target-from reads a harmlessness win rate, so it needs "
                         f"--measure harmlessness_winrate (got {measure!r})", field="--measure")
    path = Path(path)
    table = read_csv_table(path, ("model", "criterion", "ci_low"), field="--target-from")
    rows = table[(table["model"].astype(str) == model)
                 & (table["criterion"].astype(str) == "harmlessness")]
    if rows.empty:
        known = sorted(set(table["model"].astype(str)))
        raise InputError(f"no harmlessness row for model {model!r} (models: "
                         f"{', '.join(known)})", path=path, field="--target-model")
    if len(rows) > 1:
        raise InputError(f"{len(rows)} harmlessness rows for model {model!r}: give one "
                         "seed's table (seed-<s>/tables/winrate.csv), not the across-seed one",
                         path=path, field="--target-model")
    low = float(rows["ci_low"].iloc[0])
    if not math.isfinite(low):
        raise InputError(f"model {model!r} has no harmlessness interval", path=path,
                         row=int(rows.index[0]) + 2, field="ci_low")
    return low


def model_helpfulness(path: str | Path, model: str, baseline: str) -> Any:
    """`model`'s helpfulness score per prompt id against `baseline`, from a battle table
    (a seed's battles.csv, or battle JSONL files): win 1, tie 0.5, loss 0, the mean over
    orders and repetitions, errors left out (as MergeEvaluator scores each q)."""
    import pandas as pd

    path = Path(path)
    if path.suffix == ".jsonl":
        battles = load_battles([path])
    else:
        battles = read_csv_table(path, REQUIRED_COLUMNS, field="--match-battles",
                                 dtype={"prompt_id": str, "prompt_set": str})
    try:
        scores = prompt_scores(battles, model, baseline, "helpfulness")
    except InputError as exc:
        raise InputError(exc.message, path=path, field="--match-model") from None
    # keys are "<prompt set>\x1f<prompt id>"; the search's own scores are keyed by id
    ids = pd.Index([key.split("\x1f")[-1] for key in scores.index])
    if ids.has_duplicates:
        raise InputError(f"{model!r}: one prompt id in several prompt sets", path=path,
                         field="prompt_id")
    return pd.Series(scores.to_numpy(), index=ids)


def matched_comparison(result: SearchResult, q_scores: dict[float, Any], other: Any, *,
                       model: str, target: float, rounds: int, seed: int) -> dict[str, Any]:
    """Helpfulness of the merge at the found q minus `model`'s, paired over prompts.
    A missed target is recorded with q = None: a result, not a failure."""
    out: dict[str, Any] = {"model": model, "seed": seed, "target": target, "q": result.q,
                           "diff": None, "low": None, "high": None, "prompts": None}
    if not result.met or result.q is None:
        return out
    mine = q_scores[result.q]
    diff, low, high = paired_difference(mine, other, rounds=rounds, seed=seed)
    out.update(diff=diff, low=low, high=high,
               prompts=int(len(mine.index.intersection(other.index))))
    return out


def matched_line(matched: dict[str, Any]) -> str:
    """One sentence for the md and the log."""
    if matched["q"] is None:
        return (f"Matched to {matched['model']} (target {matched['target']:.3f}, its "
                "harmlessness lower bound): no q meets it, so no paired comparison.")
    return (f"Matched to {matched['model']} (target {matched['target']:.3f}, its harmlessness "
            f"lower bound): P-SACPO at q = {matched['q']:g} minus {matched['model']}, "
            f"helpfulness paired over {matched['prompts']} prompts: {matched['diff']:+.3f} "
            f"[{matched['low']:+.3f}, {matched['high']:+.3f}]")


def write_result(result: SearchResult, target: float, out_json: Path, out_md: Path,
                 measure: str = "harmlessness_winrate", *,
                 target_from: dict[str, str] | None = None,
                 matched: dict[str, Any] | None = None) -> None:
    rows = [f"| q | {measure.replace('_', ' ')} [95% CI] | helpfulness [95% CI] | meets |",
            "|---|---|---|---|"]
    for m in sorted(result.trace, key=lambda m: m.q):
        rows.append(f"| {m.q:g} | {m.constraint:.3f} [{m.constraint_low:.3f}, "
                    f"{m.constraint_high:.3f}] | {m.helpfulness:.3f} [{m.helpfulness_low:.3f},"
                    f" {m.helpfulness_high:.3f}] | {'yes' if m.meets(target) else 'no'} |")
    source = (f" (the lower end of {target_from['model']}'s harmlessness interval in "
              f"{target_from['table']})" if target_from else "")
    text = (f"Target: {LABELS[measure]}, lower bound >= {target}{source}\n\n"
            + "\n".join(rows))
    text += f"\n\n{result.message}\n"
    if matched is not None:
        text += f"\n{matched_line(matched)}\n"
    payload = {"target": target, "measure": measure, **asdict(result)}
    if target_from is not None:
        payload["target_from"] = target_from
    if matched is not None:
        payload["matched"] = matched
    with atomic_output(out_json) as tj, atomic_output(out_md) as tm:
        tj.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        tm.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="sacpo_steps target_search", description=__doc__)
    p.add_argument("--a", required=True, help="reward-aligned model (q = 0)")
    p.add_argument("--b", required=True, help="over-safe stage-2 child (q = 1)")
    p.add_argument("--name-b", default="b")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--target", type=float, help="the target value itself")
    which.add_argument("--target-from", metavar="TABLE",
                       help="a seed's winrate.csv: the target is the lower end of "
                            "--target-model's harmlessness interval there")
    p.add_argument("--target-model", metavar="M", help="the model --target-from reads")
    p.add_argument("--match-battles", metavar="FILE",
                   help="a seed's battles.csv: compare helpfulness at the found q with "
                        "--match-model's, paired over prompts")
    p.add_argument("--match-model", metavar="M",
                   help="the model to compare with (default: --target-model)")
    p.add_argument("--tolerance", type=float, default=default_of("target.tolerance"))
    p.add_argument("--lambda-bar", type=float)
    p.add_argument("--prompts", nargs=2, metavar=("HELPFULNESS", "RED_TEAM"), required=True)
    p.add_argument("--baseline", nargs=2, metavar=("HELPFULNESS", "RED_TEAM"), required=True,
                   help="the baseline's generations on the two prompt sets")
    p.add_argument("--judges", required=True,
                   help="JSON: {helpfulness: judge settings, red_team: judge settings}")
    p.add_argument("--measure", choices=MEASURES, default=default_of("target.measure"))
    p.add_argument("--baseline-name", default="sft")
    p.add_argument("--spec", help="the demo world's spec (rule judge)")
    p.add_argument("--generation", required=True, help="JSON: generation settings")
    p.add_argument("--rounds", type=int,
                   default=default_of("evaluation.winrate.bootstrap_rounds"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--out-json", required=True)
    p.add_argument("--out-md", required=True)
    p.add_argument("--log")
    args = p.parse_args(argv)
    setup_logging(args.log)
    settings = GenerationSettings.from_dict(json_object_arg(args.generation, "--generation"),
                                            where="--generation")
    # the search passes its own seed to each generation
    gen = {k: v for k, v in settings.to_dict().items() if k != "seed"}
    judges = json_object_arg(args.judges, "--judges")
    if set(judges) != {"helpfulness", "red_team"}:
        raise InputError("expected an object with the keys helpfulness and red_team",
                         field="--judges")
    # the target and the compared model's scores are read before any merge: a bad
    # table fails in seconds, not after the first evaluation
    target, target_from = args.target, None
    if args.target_from is not None:
        if not args.target_model:
            raise InputError("--target-from needs --target-model", field="--target-model")
        target = target_from_table(args.target_from, args.target_model, args.measure)
        target_from = {"table": args.target_from, "model": args.target_model}
        log.info("target %.4f: the lower end of %s's harmlessness interval in %s", target,
                 args.target_model, args.target_from)
    elif args.target_model:
        raise InputError("--target-model goes with --target-from", field="--target-model")
    match_model = args.match_model or args.target_model
    other = None
    if args.match_battles is not None:
        if not match_model:
            raise InputError("--match-battles needs --match-model (or --target-model)",
                             field="--match-model")
        other = model_helpfulness(args.match_battles, match_model, args.baseline_name)
    elif args.match_model:
        raise InputError("--match-model goes with --match-battles", field="--match-battles")
    with tempfile.TemporaryDirectory(prefix="target-search-") as tmp:
        evaluate = MergeEvaluator(
            Path(args.a), Path(args.b),
            prompts={"helpfulness": Path(args.prompts[0]), "red_team": Path(args.prompts[1])},
            baseline={"helpfulness": Path(args.baseline[0]),
                      "red_team": Path(args.baseline[1])},
            judges=judges, spec=Path(args.spec) if args.spec else None, gen=gen,
            work=Path(tmp), rounds=args.rounds, seed=args.seed, threads=args.threads,
            measure=args.measure, baseline_name=args.baseline_name)
        try:
            result = search(evaluate, target, tolerance=args.tolerance,
                            lambda_bar=args.lambda_bar, over_safe_name=args.name_b)
            if result.met and result.q != 1.0:
                gain = result.helpfulness_gain = evaluate.paired_gain(result.q, 1.0)
                result.message += (f". Helpfulness gain over the over-safe model (paired "
                                   f"over prompts): {gain[0]:+.3f} [{gain[1]:+.3f}, "
                                   f"{gain[2]:+.3f}]")
            matched = None
            if other is not None:
                matched = matched_comparison(result, evaluate.per_prompt, other,
                                             model=match_model, target=target,
                                             rounds=args.rounds, seed=args.seed)
                log.info("%s", matched_line(matched))
        finally:
            evaluate.close()
    write_result(result, target, Path(args.out_json), Path(args.out_md), args.measure,
                 target_from=target_from, matched=matched)
    # a missed target is a result, not a failure: the trace stays in the outputs
    (log.info if result.met else log.error)("%s", result.message)
