"""Evaluation prompt sets fetched once from a URL (JSON list or JSONL) into resources/.

The paper evaluates on 129 helpfulness prompts (AlpacaEval `helpful_base`) and 83
red-team prompts from Safe RLHF, both published as JSON files of objects with a
`prompt` field. Every row becomes {prompt_id, prompt} (plus `category` when given).
"""

from __future__ import annotations

import argparse
import json
import logging
import urllib.request
from pathlib import Path
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import setup_logging, write_jsonl

log = logging.getLogger("sacpo.fetch_prompt_set")


def parse_rows(text: str, source: str) -> list[dict[str, Any]]:
    """A JSON list of objects, or one object per line."""
    text = text.strip()
    if not text:
        raise InputError("prompt set is empty", path=source)
    if text.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON ({exc.msg})", path=source) from None
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"malformed JSON ({exc.msg})", path=source, row=i) from None
    return rows


def normalise(rows: list[Any], source: str, prompt_field: str, id_field: str | None,
              name: str) -> list[dict[str, Any]]:
    out, seen = [], set()
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise InputError("expected a JSON object", path=source, row=i)
        prompt = row.get(prompt_field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("missing or empty prompt", path=source, row=i, field=prompt_field)
        pid = str(row[id_field]) if id_field and id_field in row else f"{name}-{i:04d}"
        if pid in seen:
            raise InputError(f"duplicate id {pid!r}", path=source, row=i, field=id_field)
        seen.add(pid)
        item = {"prompt_id": pid, "prompt": prompt.strip()}
        if "category" in row:
            item["category"] = row["category"]
        out.append(item)
    return out


def fetch(url: str, out: str | Path, *, name: str, prompt_field: str = "prompt",
          id_field: str | None = None, timeout: float = 60.0) -> int:
    """Download a prompt set and write it as JSONL atomically; return the number of prompts."""
    log.info("fetching prompt set %s from %s", name, url)
    try:
        if url.startswith(("http://", "https://")):
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
                text = response.read().decode("utf-8")
        else:
            text = Path(url).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:  # URLError is an OSError
        raise InputError(f"cannot read the prompt set ({exc})", path=url,
                         field=f"evaluation.prompt_sets.{name}.url") from None
    rows = normalise(parse_rows(text, url), url, prompt_field, id_field, name)
    return write_jsonl(out, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sacpo_steps fetch_prompt_set", description=__doc__)
    parser.add_argument("--url", required=True, help="http(s) URL or a local file")
    parser.add_argument("--name", required=True)
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--id-field")
    parser.add_argument("--out", required=True)
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    n = fetch(args.url, args.out, name=args.name, prompt_field=args.prompt_field,
              id_field=args.id_field)
    log.info("%d prompts written to %s", n, args.out)
