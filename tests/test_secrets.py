"""The API key never reaches any file the workflow writes (run through Snakemake).

The run is also the deployment check: Snakemake runs the clone's workflow/Snakefile
from a folder outside the repository that holds only the user's config (and a
template of theirs), the way a snakedeploy `module` sets it up. The demo world and SFT
model are the test run's shared ones (conftest.reduced_sft); every job after them runs
here with the key in its environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fake_openai import FakeOpenAI
from tests.helpers import ROOT, parse_jobs, reduced_config, seed_from, write_config

SECRET = "sk-test-WORKFLOW-SECRET-0451"


@pytest.mark.e2e
def test_api_key_is_in_no_output_log_metadata_or_report(tmp_path, reduced_sft):
    work = tmp_path / "my-project"  # the user's own folder: only their config
    work.mkdir()
    seed_from(reduced_sft, work)
    entry = ["-s", str(ROOT / "workflow" / "Snakefile")]
    cfg = reduced_config()
    cfg["models"] = {"dpo_h": cfg["models"]["dpo_h"]}
    with FakeOpenAI() as server:
        cfg["evaluation"]["judge"] = {"backend": "openai", "base_url": server.url,
                                      "model": "fake-judge", "repetitions": 1,
                                      "concurrency": 8, "timeout": 10.0}
        write_config(work / "secret.yaml", cfg)
        env = {**os.environ, "OPENAI_API_KEY": SECRET}
        for args in ([], ["--report", "report.html"]):
            proc = subprocess.run([sys.executable, "-m", "snakemake", *entry, "--cores", "2",
                                   "--configfile", "secret.yaml", *args], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
            assert SECRET not in proc.stdout + proc.stderr
            # the shared world and SFT model were taken over, not built again
            assert "rule sft_checkpoint" not in proc.stdout + proc.stderr
        assert server.requests >= 2 * 120 * 2  # both prompt sets, both orders were asked

        # unchanged templates: judge jobs forced to rerun make zero requests (all cached)
        before = server.requests
        proc = subprocess.run([sys.executable, "-m", "snakemake", *entry, "--cores", "2",
                               "--configfile", "secret.yaml", "--forcerun", "judge"],
                              cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert server.requests == before

        # the user's own helpfulness template reruns only that criterion's judge jobs
        text = (ROOT / "sacpo_steps/evaluation/judges/prompts/helpfulness_scores.txt").read_text()
        (work / "my_help.txt").write_text(text.replace("0 to 10", "0 to 10 (own wording)")
                                          + "\nBe brief.\n")
        cfg["evaluation"]["judge"]["templates"] = {"helpfulness": "my_help.txt"}
        write_config(work / "own.yaml", cfg)
        dry = subprocess.run([sys.executable, "-m", "snakemake", *entry, "-n", "--cores", "2",
                              "--configfile", "own.yaml"], cwd=work, env=env,
                             capture_output=True, text=True, timeout=300)
        assert dry.returncode == 0, dry.stdout + dry.stderr
        jobs = parse_jobs(dry.stdout + dry.stderr)
        assert sorted(j.key for j in jobs) == [
            ("across_seeds", None, None), ("all", None, None), ("elo", None, None),
            ("figures", None, None), ("figures_across_seeds", None, None),
            ("judge", "dpo_h", "helpfulness"), ("winrate", None, None)]
        before = server.requests
        proc = subprocess.run([sys.executable, "-m", "snakemake", *entry, "--cores", "2",
                               "--configfile", "own.yaml"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert server.requests - before == 120 * 2  # helpfulness prompts, both orders
    battles = work / "results/reduced-demo/seed-0/battles"
    assert (battles / "red_team/dpo_h__vs__sft.usage.json").is_file()
    assert (work / "resources/judge_cache/fake-judge.jsonl").is_file()
    checked = 0
    for folder in ("results", "logs", ".snakemake", "resources"):
        for path in (work / folder).rglob("*"):
            if path.is_file():
                checked += 1
                assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET.encode() not in (work / "report.html").read_bytes()
    assert checked > 50
    # nothing of the run landed in the clone; the folder holds the run and the user's files
    made = {p.name for p in work.iterdir() if not p.name.startswith(".")}
    assert made - {"scratch"} == {"logs", "my_help.txt", "own.yaml", "report.html",
                                  "resources", "results", "secret.yaml"}
    assert (work / "results/reduced-demo/tables/winrate.csv").is_file()
