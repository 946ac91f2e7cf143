"""The `judge` step: one model's answers against a baseline's, on one criterion.

Every prompt is judged in both orders (candidate shown first, baseline shown
first) so position bias cancels in the pooled win rate and can be measured.
Each judgment is one battle row; the judge's reply text goes to a sidecar file
that the row points to, so a surprising outcome can be read back, and what the
judging cost (requests, retries, tokens, dollars) goes to a usage file. Failed
judgments stay errors; too many of them fail the step instead of biasing the
win rate.

Empty answers (nothing but white space) are judged like any answer (the
default judge prompts say an empty reply gives no help), never skipped, but
never silently either: each battle row flags them (`empty_a`, `empty_b`), and
the log, the usage file and the summary count them per side. Each row also carries
both answers' length in words (`words_a`, `words_b`): judges favour long answers and
safety tuning shortens them, so the win-rate table reports lengths beside win rates.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import atomic_output, json_object_arg, read_jsonl, setup_logging
from sacpo_steps.core.lineage import drop_sidecar, file_input, make_record, write_sidecar
from sacpo_steps.evaluation.judges import CRITERIA, Judge, JudgeReply, JudgeRequest
from sacpo_steps.evaluation.judges.registry import JudgeConfig, ProtocolSettings

log = logging.getLogger("sacpo.judge")

ORDERS = ("a_first", "b_first")
OUTCOMES = ("a_wins", "b_wins", "tie", "error")
GENERATION_FIELDS = ("prompt_id", "prompt", "answer", "model")
PROMPT_FIELDS = ("prompt_id", "prompt")
# how many ids an error message lists before "..."
_SHOW_IDS = 5
#: the judge section's `max_error_rate` when it gives none (defined with the protocol keys)
DEFAULT_MAX_ERROR_RATE = ProtocolSettings().max_error_rate

# verdict (about the answer shown first/second) -> outcome (about model a/b), per order
_OUTCOME = {
    "a_first": {"first": "a_wins", "second": "b_wins", "tie": "tie", "error": "error"},
    "b_first": {"first": "b_wins", "second": "a_wins", "tie": "tie", "error": "error"},
}


def _numbered_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """JSONL rows with their 1-based line numbers (blank lines skipped, as read_jsonl does)."""
    rows = read_jsonl(path)
    with open(path, encoding="utf-8") as fh:
        linenos = [i for i, line in enumerate(fh, start=1) if line.strip()]
    return list(zip(linenos, rows, strict=True))


def _require_str(path: Path, lineno: int, row: dict[str, Any], field: str) -> str:
    if field not in row:
        raise InputError("missing field", path=path, row=lineno, field=field)
    value = row[field]
    if not isinstance(value, str):
        raise InputError(f"expected a string, got {type(value).__name__}",
                         path=path, row=lineno, field=field)
    if field == "prompt_id" and not value:
        raise InputError("empty prompt id", path=path, row=lineno, field=field)
    return value


def _by_prompt_id(path: Path, fields: Sequence[str],
                  optional: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Validated rows keyed by prompt_id, in file order; duplicate ids are an error."""
    out: dict[str, dict[str, Any]] = {}
    rows = _numbered_rows(path)
    if not rows:
        raise InputError("no rows", path=path)
    for lineno, row in rows:
        for field in fields:
            _require_str(path, lineno, row, field)
        for field in optional:
            if field in row and row[field] is not None:
                _require_str(path, lineno, row, field)
        pid = row["prompt_id"]
        if pid in out:
            raise InputError(f"duplicate prompt id {pid!r}", path=path, row=lineno,
                             field="prompt_id")
        out[pid] = {**row, "_line": lineno}
    return out


def read_prompt_set(path: str | Path) -> dict[str, dict[str, Any]]:
    """Prompt-set rows (`prompt_id, prompt`, optional `task_id`) keyed by prompt_id."""
    return _by_prompt_id(Path(path), PROMPT_FIELDS, optional=("task_id",))


def read_generations(path: str | Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """One model's generations keyed by prompt_id, and that model's name."""
    path = Path(path)
    rows = _by_prompt_id(path, GENERATION_FIELDS)
    models = {r["model"] for r in rows.values()}
    if len(models) != 1:
        first = next(iter(rows.values()))["model"]
        other = next(r for r in rows.values() if r["model"] != first)
        raise InputError(f"one model per file expected, found {sorted(models)}",
                         path=path, row=other["_line"], field="model")
    model = models.pop()
    if not model.strip():
        raise InputError("empty model name", path=path, row=1, field="model")
    return model, rows


def _ids(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_SHOW_IDS])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > _SHOW_IDS else "")


def _check_coverage(path: Path, rows: dict[str, Any], prompts: dict[str, Any],
                    prompts_path: Path) -> None:
    missing = [pid for pid in prompts if pid not in rows]
    extra = [pid for pid in rows if pid not in prompts]
    if missing:
        raise InputError(f"does not cover the prompt set {prompts_path}: "
                         f"missing prompt ids {_ids(missing)}", path=path, field="prompt_id")
    if extra:
        raise InputError(f"has prompt ids that are not in the prompt set {prompts_path}: "
                         f"{_ids(extra)}", path=path, field="prompt_id")


def replies_path_for(out_path: str | Path) -> Path:
    """The replies sidecar next to a battles file: `<out stem>.replies.jsonl`."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.replies.jsonl")


def usage_path_for(out_path: str | Path) -> Path:
    """The usage file next to a battles file: `<out stem>.usage.json`."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.usage.json")


def _check_error_rate(errors_by_prompt: Counter[str], total: int, max_error_rate: float,
                      replies_path: Path) -> None:
    """Raise when more than `max_error_rate` of the judgments failed, naming the worst prompts."""
    errors = sum(errors_by_prompt.values())
    if not total or errors / total <= max_error_rate:
        return
    worst = ", ".join(f"{pid!r} ({n})" for pid, n in errors_by_prompt.most_common(_SHOW_IDS))
    more = len(errors_by_prompt) - _SHOW_IDS
    raise InputError(
        f"{errors} of {total} judgments failed ({errors / total:.1%}, more than "
        f"{max_error_rate:.1%}); prompts with the most errors: {worst}"
        + (f" and {more} more" if more > 0 else "")
        + f"; nothing written (the replies would have gone to {replies_path.name}, the log "
        "has the usage, and a caching judge keeps its replies for the rerun: set "
        "judge.retry_errors to ask the failed ones again)",
        field="judge.max_error_rate")


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass(frozen=True)
class _Job:
    """The checked inputs of one judge job."""

    prompts: dict[str, dict[str, Any]]
    model_a: str  # the candidate
    cand: dict[str, dict[str, Any]]
    model_b: str  # the baseline
    base: dict[str, dict[str, Any]]
    files: dict[str, dict[str, Any]]  # the lineage record's inputs


def _check_arguments(criterion: str, repetitions: int, batch_size: int,
                     max_error_rate: float | None) -> None:
    if criterion not in CRITERIA:
        raise InputError(f"unknown criterion {criterion!r} (known: {CRITERIA})",
                         field="criterion")
    if isinstance(repetitions, bool) or not isinstance(repetitions, int) or repetitions < 1:
        raise InputError(f"must be a positive integer, got {repetitions!r}",
                         field="repetitions")
    if batch_size < 1:
        raise InputError(f"must be a positive integer, got {batch_size!r}", field="batch_size")
    if max_error_rate is not None and not 0 <= max_error_rate <= 1:
        raise InputError(f"must be between 0 and 1, got {max_error_rate!r}",
                         field="judge.max_error_rate")


def _read_inputs(cand_path: Path, base_path: Path, prompts_path: Path,
                 spec_path: str | Path | None) -> _Job:
    """Read both generation files and the prompt set; refuse them unless each answers
    exactly the prompt set and the two models differ."""
    prompts = read_prompt_set(prompts_path)
    model_a, cand = read_generations(cand_path)
    model_b, base = read_generations(base_path)
    files = {"candidate": file_input(cand_path), "baseline": file_input(base_path),
             "prompts": file_input(prompts_path)}
    if spec_path is not None:
        files["spec"] = file_input(spec_path)
    _check_coverage(cand_path, cand, prompts, prompts_path)
    _check_coverage(base_path, base, prompts, prompts_path)
    if model_a == model_b:
        raise InputError(f"candidate and baseline are the same model {model_a!r} "
                         f"({cand_path}, {base_path})", field="model")
    differ = [pid for pid, p in prompts.items()
              if cand[pid]["prompt"] != p["prompt"] or base[pid]["prompt"] != p["prompt"]]
    if differ:
        # a templated prompt may legitimately differ; a different question would not
        log.warning("%d generations carry a prompt text that differs from %s (e.g. %s); "
                    "the judge is shown the prompt set's text", len(differ), prompts_path,
                    _ids(differ))
    return _Job(prompts, model_a, cand, model_b, base, files)


def _build_requests(job: _Job, criterion: str, prompt_set: str, repetitions: int
                    ) -> tuple[list[JudgeRequest], list[dict[str, Any]], dict[str, list[str]]]:
    """(requests, their battle rows without outcome, prompt ids with an empty answer per
    side): every prompt in both orders, `repetitions` times, in the order judged."""
    battles: list[dict[str, Any]] = []
    requests: list[JudgeRequest] = []
    empty: dict[str, list[str]] = {"a": [], "b": []}
    for pid, prompt in job.prompts.items():
        context = {"task_id": prompt["task_id"]} if prompt.get("task_id") is not None else {}
        answers = {"a": job.cand[pid]["answer"], "b": job.base[pid]["answer"]}
        is_empty = {side: not text.strip() for side, text in answers.items()}
        for side in ("a", "b"):
            if is_empty[side]:
                empty[side].append(pid)
        for rep in range(repetitions):
            for order in ORDERS:
                first, second = ("a", "b") if order == "a_first" else ("b", "a")
                requests.append(JudgeRequest(
                    criterion=criterion, prompt_id=pid, question=prompt["prompt"],
                    first_answer=answers[first], second_answer=answers[second],
                    repetition=rep, context=dict(context)))
                battles.append({
                    "criterion": criterion, "prompt_set": prompt_set, "prompt_id": pid,
                    "model_a": job.model_a, "model_b": job.model_b, "order": order,
                    "repetition": rep, "empty_a": is_empty["a"], "empty_b": is_empty["b"],
                    "words_a": len(answers["a"].split()), "words_b": len(answers["b"].split()),
                })
    return requests, battles, empty


def _write_judgment(fh_out: TextIO, fh_rep: TextIO, battle: dict[str, Any], reply: JudgeReply,
                    line: int, judge_name: str, replies_name: str) -> str:
    """Write one battle row and its reply (line `line` of the replies); return the outcome."""
    if not isinstance(reply, JudgeReply):
        raise TypeError(f"judge {judge_name!r} returned {type(reply).__name__}, "
                        "not a JudgeReply")
    outcome = _OUTCOME[battle["order"]][reply.verdict]
    fh_rep.write(json.dumps({"id": line, "verdict": reply.verdict, "raw": reply.raw,
                             "detail": reply.detail}, ensure_ascii=False) + "\n")
    fh_out.write(json.dumps({**battle, "outcome": outcome, "judge": judge_name,
                             "raw": f"{replies_name}#{line}"}, ensure_ascii=False) + "\n")
    return outcome


def _judge_and_write(judge: Judge, requests: list[JudgeRequest], battles: list[dict[str, Any]],
                     paths: tuple[Path, Path, Path], *, criterion: str, batch_size: int,
                     progress: bool | None, max_error_rate: float | None,
                     empty_answers: dict[str, int]) -> dict[str, int]:
    """Judge in batches, writing battles (`paths[0]`), replies and usage as replies come;
    return the outcome counts. All files or none: none when the error share is too high."""
    out_path, replies_path, usage_path = paths
    counts: Counter[str] = Counter()
    errors_by_prompt: Counter[str] = Counter()
    show = len(requests) > batch_size if progress is None else progress
    line = 0
    # battles renamed into place last: a finished battles file implies the others exist
    with atomic_output(out_path) as tmp_out, atomic_output(usage_path) as tmp_usage, \
            atomic_output(replies_path) as tmp_rep, \
            open(tmp_out, "w", encoding="utf-8") as fh_out, \
            open(tmp_rep, "w", encoding="utf-8") as fh_rep, \
            tqdm(total=len(requests), desc=f"judge {criterion}", unit="judgment",
                 file=sys.stderr, disable=not show, mininterval=5) as bar:
        for batch in _batches(requests, batch_size):
            replies = judge.judge_many(batch)
            if len(replies) != len(batch):
                raise RuntimeError(f"judge {judge.name!r} returned {len(replies)} replies "
                                   f"for {len(batch)} requests")
            for reply in replies:
                line += 1
                battle = battles[line - 1]
                outcome = _write_judgment(fh_out, fh_rep, battle, reply, line, judge.name,
                                          replies_path.name)
                counts[outcome] += 1
                if outcome == "error":
                    errors_by_prompt[battle["prompt_id"]] += 1
            bar.update(len(batch))

        outcomes = {o: counts.get(o, 0) for o in OUTCOMES}
        log.info("outcomes: %s", ", ".join(f"{k}={v}" for k, v in outcomes.items()))
        usage = _usage(judge, len(requests), outcomes, empty_answers)
        log.info("usage: %s", json.dumps(usage, sort_keys=True))
        if max_error_rate is not None:
            _check_error_rate(errors_by_prompt, len(requests), max_error_rate, replies_path)
        tmp_usage.write_text(json.dumps(usage, indent=2, ensure_ascii=False) + "\n",
                             encoding="utf-8")
    return outcomes


def judge_model(
    candidate_generations: str | Path,
    baseline_generations: str | Path,
    prompts_path: str | Path,
    criterion: str,
    judge: Judge,
    repetitions: int,
    out_path: str | Path,
    *,
    batch_size: int = 256,
    progress: bool | None = None,
    max_error_rate: float | None = None,
    replies_path: str | Path | None = None,
    usage_path: str | Path | None = None,
    settings: dict[str, Any] | None = None,
    spec_path: str | Path | None = None,
) -> dict[str, Any]:
    """Judge candidate (model a) against baseline (model b) on every prompt of a set.

    Writes the battles JSONL at `out_path`, its replies sidecar and its usage
    file (by default `<out stem>.replies.jsonl` and `<out stem>.usage.json`), all or
    none: none when the share of "error" judgments exceeds `max_error_rate` (None: no
    limit). `progress=None` shows a progress bar only when there is more than one
    batch. Returns a summary with the outcome counts. The battles' lineage record
    (`<out>.record.json`) names both generation files' records (a generation file
    that no longer matches its own record is refused), the prompts, `settings` (the
    judge config as the step got it), the rule judge's `spec_path` and what the judge
    reads besides (`Judge.lineage`: the openai judge's template, by its sha256).
    """
    _check_arguments(criterion, repetitions, batch_size, max_error_rate)
    prompts_path, out_path = Path(prompts_path), Path(out_path)
    job = _read_inputs(Path(candidate_generations), Path(baseline_generations), prompts_path,
                       spec_path)
    if judge.deterministic and repetitions != 1:
        log.info("judge %r is deterministic: %d repetitions reduced to 1", judge.name,
                 repetitions)
        repetitions = 1
    prompt_set = prompts_path.stem
    requests, battles, empty = _build_requests(job, criterion, prompt_set, repetitions)
    log.info("judging %s (a) vs %s (b) on %s: %d prompts x %d orders x %d repetitions "
             "= %d judgments by %r", job.model_a, job.model_b, criterion, len(job.prompts),
             len(ORDERS), repetitions, len(requests), judge.name)
    empty_answers = {side: len(ids) for side, ids in empty.items()}
    for side, model in (("a", job.model_a), ("b", job.model_b)):
        if empty[side]:
            log.warning("%d of %d answers of %s (%s) are empty: judged as they are (no help), "
                        "flagged empty_%s in the battles: %s", len(empty[side]),
                        len(job.prompts), model, side, side, _ids(empty[side]))

    replies_path = Path(replies_path) if replies_path else replies_path_for(out_path)
    usage_path = Path(usage_path) if usage_path else usage_path_for(out_path)
    # the prompt template (openai judge) by its content: no step's code hash covers it
    record = make_record("judge", inputs={**job.files, **judge.lineage(criterion)}, settings={
        "criterion": criterion, "repetitions": repetitions, "judge": judge.name,
        "config": settings or {}})
    drop_sidecar(out_path)
    outcomes = _judge_and_write(judge, requests, battles, (out_path, replies_path, usage_path),
                                criterion=criterion, batch_size=batch_size, progress=progress,
                                max_error_rate=max_error_rate, empty_answers=empty_answers)
    write_sidecar(out_path, record)
    if outcomes["error"]:
        log.warning("%d of %d judgments failed (outcome 'error'; see %s)", outcomes["error"],
                    len(requests), replies_path)
    return {
        "criterion": criterion, "prompt_set": prompt_set, "model_a": job.model_a,
        "model_b": job.model_b, "judge": judge.name, "prompts": len(job.prompts),
        "repetitions": repetitions, "battles": len(requests), "outcomes": outcomes,
        "empty_answers": empty_answers, "out": str(out_path), "replies": str(replies_path),
        "usage": str(usage_path),
    }


def _usage(judge: Judge, judgments: int, outcomes: dict[str, int],
           empty_answers: dict[str, int]) -> dict[str, Any]:
    """The step's counts plus what the judge reports (requests, tokens, cost) if it can.

    `empty_answers`: prompts whose answer is empty, per side (a: candidate, b: baseline).
    """
    report = getattr(judge, "usage", None)
    extra = report() if callable(report) else {}
    return {"judge": judge.name, "battles": judgments, "outcomes": outcomes,
            "error_rate": outcomes["error"] / judgments if judgments else 0.0,
            "empty_answers": empty_answers, **extra}


def error_rate_limit(config: dict[str, Any]) -> float:
    """The judge section's `max_error_rate`, checked, or its default."""
    return float(JudgeConfig.read(config, job=True).protocol.max_error_rate)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sacpo_steps judge", description=__doc__.splitlines()[0])
    p.add_argument("--candidate", required=True, help="generations JSONL of the judged model")
    p.add_argument("--baseline", required=True, help="generations JSONL of the baseline")
    p.add_argument("--prompts", required=True, help="prompt-set JSONL (prompt_id, prompt, ...)")
    p.add_argument("--criterion", required=True, choices=CRITERIA)
    p.add_argument("--judge-config", required=True,
                   help='the config\'s judge section as JSON, e.g. \'{"backend": "rule"}\'')
    p.add_argument("--spec", default=None, help="demo world spec (rule judge)")
    p.add_argument("--judge-cache", default=None,
                   help="reply cache file of a remote judge, shared by judge jobs "
                        "(overrides the judge config's `cache`)")
    p.add_argument("--repetitions", type=int, default=1,
                   help="judgments per prompt and order (1 for a deterministic judge)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", required=True, help="battles JSONL")
    p.add_argument("--out-replies", default=None,
                   help="the judge's raw replies, JSONL (default: <out stem>.replies.jsonl)")
    p.add_argument("--out-usage", default=None,
                   help="requests, tokens and cost, JSON (default: <out stem>.usage.json)")
    p.add_argument("--log", default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    setup_logging(args.log)
    config = json_object_arg(args.judge_config, "--judge-config")
    if args.judge_cache is not None:
        config["cache"] = args.judge_cache
    judge_config = JudgeConfig.read(config, job=True)  # the one reading of the section
    max_error_rate = judge_config.protocol.max_error_rate
    judge = judge_config.make(spec_path=args.spec)
    try:
        judge_model(args.candidate, args.baseline, args.prompts, args.criterion, judge,
                    args.repetitions, args.out, batch_size=args.batch_size,
                    max_error_rate=max_error_rate, replies_path=args.out_replies,
                    usage_path=args.out_usage, spec_path=args.spec,
                    # where the cache lies changes no verdict
                    settings={k: v for k, v in config.items() if k != "cache"})
    finally:
        judge.close()


if __name__ == "__main__":
    main()
