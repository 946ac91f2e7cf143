"""A `constant` baseline's answers: the same fixed text for every prompt, no weights.

A sanity row (e.g. always refuse) judged like a model: a judge that lets it win a
criterion it should lose is suspect.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from sacpo_steps.core.fileio import setup_logging, write_jsonl
from sacpo_steps.core.lineage import drop_sidecar, file_input, make_record, write_sidecar
from sacpo_steps.evaluation.generate import load_prompts

log = logging.getLogger("sacpo.constant_answers")


def constant_answers(prompts_path: str | Path, out_path: str | Path, *, model_name: str,
                     answer: str) -> dict[str, Any]:
    """Write `answer` as `model_name`'s answer to every prompt; return the counts."""
    prompts = load_prompts(prompts_path)
    rows = [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "answer": answer,
             "model": model_name} for p in prompts]
    drop_sidecar(out_path)
    n = write_jsonl(out_path, rows)
    write_sidecar(out_path, make_record(
        "constant_answers", settings={"model_name": model_name, "answer": answer},
        inputs={"prompts": file_input(prompts_path)}))
    log.info("%d constant answers by %s written to %s: %r", n, model_name, out_path, answer)
    return {"answers": n, "empty": n if not answer.strip() else 0}



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sacpo_steps constant_answers", description=__doc__)
    parser.add_argument("--answer", required=True, help="the fixed answer")
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    constant_answers(args.prompts, args.out, model_name=args.model_name, answer=args.answer)
