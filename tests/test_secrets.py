"""The API key never reaches any file the workflow writes (run through Snakemake)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.fake_openai import FakeOpenAI
from tests.test_workflow import REDUCED, ROOT, copy_workflow

SECRET = "sk-test-WORKFLOW-SECRET-0451"


@pytest.mark.slow
def test_api_key_is_in_no_output_log_metadata_or_report(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((ROOT / REDUCED).read_text())
    cfg["models"] = {"dpo_h": cfg["models"]["dpo_h"]}
    with FakeOpenAI() as server:
        cfg["evaluation"]["judge"] = {"backend": "openai", "base_url": server.url,
                                      "model": "fake-judge", "repetitions": 1,
                                      "concurrency": 8, "timeout": 10.0}
        (work / "secret.yaml").write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "OPENAI_API_KEY": SECRET}
        for args in ([], ["--report", "report.html"]):
            proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2",
                                   "--configfile", "secret.yaml", *args], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
            assert SECRET not in proc.stdout + proc.stderr
        assert server.requests >= 2 * 120 * 2  # both prompt sets, both orders were asked
    assert (work / "results/battles/red_team/dpo_h__vs__sft.usage.json").is_file()
    assert (work / "resources/judge_cache/fake-judge.jsonl").is_file()
    checked = 0
    for folder in ("results", "logs", ".snakemake", "resources"):
        for path in (work / folder).rglob("*"):
            if path.is_file():
                checked += 1
                assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET.encode() not in (work / "report.html").read_bytes()
    assert checked > 50
