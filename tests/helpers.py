"""What many test modules share: tiny models built from config (no downloads), and
running the workflow in a copy (dry runs, job tables, configs). Fixtures live in
conftest.py; everything else a second test module needs lives here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# ---- tiny models ---------------------------------------------------------------------

PROMPT_TEMPLATE = "USER: {prompt} ASSISTANT:"

TEXTS = [
    ("how do i bake bread?", "first, mix flour and water. then, knead the dough."),
    ("how do i steal a car?", "i cannot help with that."),
    ("how can i plant a tree?", "first, dig a wide hole. then, water the soil deeply."),
    ("how can i cheat on an exam?", "first, hide notes in your sleeve."),
]


def make_tiny_model(out: Path, *, seed: int = 0, noise: float = 0.0, hidden: int = 16
                    ) -> Path:
    """A tiny random Llama with a tokenizer trained on a few sentences, saved to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sacpo_steps.models.folders import write_model_card
    from sacpo_steps.models.sft_checkpoint import train_tokenizer

    corpus = [PROMPT_TEMPLATE.format(prompt=p) + " " + r for p, r in TEXTS] * 4
    tokenizer = train_tokenizer(corpus, vocab_size=400)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=2 * hidden,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    if noise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_model_card(out, {"name": out.name, "method": "test", "lineage": []})
    return out


# ---- the workflow in a copy ------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
# The copy's Snakefile plans with the copy's sacpo_steps/ and its jobs import it (PYTHONPATH,
# workflow/rules/common.smk): editing the copy's source is what the rerun tests rely on.
WORKFLOW_PARTS = ["Snakefile", "workflow", "config", "profiles", "sacpo_steps", "tests/configs",
                  "environment.yml"]
REDUCED = "tests/configs/reduced_demo.yaml"
RESULTS = "results/reduced-demo"  # the reduced demo's experiment folder
SEED0 = f"{RESULTS}/seed-0"  # its only seed
PROMPT_SETS = ("helpfulness", "red_team")
# what follows every change of a seed's win rates or Elo: the across-seed tables and figures
STATISTICS = ["across_seeds", "figures", "figures_across_seeds"]


def copy_workflow(dest: Path) -> Path:
    """Copy what a run needs into `dest` (no results, logs or .snakemake of the repo)."""
    for part in WORKFLOW_PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (dest / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / part)
    return dest


def snakemake(workdir: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args],
                          cwd=workdir, capture_output=True, text=True, timeout=timeout)


def output_of(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


@dataclass
class Job:
    rule: str
    wildcards: dict[str, str] = field(default_factory=dict)
    log: str | None = None
    reason: str = ""
    outputs: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str | None, str | None]:
        """(rule, model, prompt set): the model is the `model` or `aligned` wildcard."""
        model = self.wildcards.get("model", self.wildcards.get("aligned"))
        return self.rule, model, self.wildcards.get("prompt_set")


RULE_LINE = re.compile(r"^(?:local)?rule (\w+):\s*$")
FIELD_LINE = re.compile(r"^\s+(\w+): (.*)$")


def parse_jobs(output: str) -> list[Job]:
    """The job blocks of a dry run: `rule X:` then indented `key: value` lines."""
    jobs: list[Job] = []
    current: Job | None = None
    for line in output.splitlines():
        match = RULE_LINE.match(line)
        if match:
            current = Job(match.group(1))
            jobs.append(current)
            continue
        match = FIELD_LINE.match(line)
        if current is not None and match:
            key, value = match.groups()
            if key == "wildcards":
                current.wildcards = dict(kv.split("=", 1) for kv in value.split(", "))
            elif key == "log":
                current.log = value.strip()
            elif key == "output":
                current.outputs = [p.strip() for p in value.split(", ")]
            elif key == "input":
                current.inputs = [p.strip() for p in value.split(", ")]
            elif key == "reason":
                current.reason = value
        elif not line.startswith(" "):
            current = None
    return jobs


def job_counts(output: str) -> dict[str, int]:
    """The `Job stats` table of a dry run, without the total."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    start = lines.index("Job stats:")
    for line in lines[start + 1:]:
        match = re.match(r"^(\w+)\s+(\d+)$", line)
        if match:
            if match.group(1) == "total":
                break
            counts[match.group(1)] = int(match.group(2))
    return counts


def dry_run(workdir: Path, *args: str) -> tuple[str, list[Job]]:
    proc = snakemake(workdir, "-n", *args)
    output = output_of(proc)
    assert proc.returncode == 0, output
    return output, parse_jobs(output)


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def reduced_config() -> dict:
    return yaml.safe_load((ROOT / REDUCED).read_text(encoding="utf-8"))


# the reduced demo's SFT model (seed 0): with the demo world, what every run of it builds first
REDUCED_SFT = f"{SEED0}/models/sft"
# what a finished run leaves that another folder's run can take over as done
RUN_STATE = ("results", "logs", ".snakemake/metadata")


def seed_from(built: Path, workdir: Path) -> Path:
    """Copy a run's outputs, logs and Snakemake's records of them into `workdir`, so that
    a run there of the same rules, params and code finds those jobs done (copies keep
    their times: inputs stay older than outputs). Its jobs are not run again there."""
    for part in RUN_STATE:
        if (built / part).is_dir():
            shutil.copytree(built / part, workdir / part, symlinks=True, dirs_exist_ok=True)
    return workdir
