"""bench/align_vs_trl.py's own CPU self-test: both sides run, agree on the data and the
settings, and report finite numbers (no timing is asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_align_vs_trl_self_test_passes(tmp_path):
    out = tmp_path / "self-test.json"
    proc = subprocess.run([sys.executable, "bench/align_vs_trl.py", "--self-test", "--out",
                           str(out), "--workdir", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "self-test passed" in proc.stdout + proc.stderr
    assert json.loads(out.read_text())  # written, parseable
