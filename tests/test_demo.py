"""The demo end to end at a small size, in a fresh process as `make demo` runs it: it prints
its table and speedup, writes demo.json, and prints no warning line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SCRIPT = """
import sys
from dmtrec.demo import demo_runs, run_demo
from dmtrec.parallel.launch import quiet_libraries
quiet_libraries()
out = sys.argv[1]
sys.exit(run_demo(out, demo_runs(out, num_train=6144, num_test=2048)))
"""


def test_demo_small(tmp_path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (r.stdout + r.stderr).splitlines()
    assert [ln for ln in lines if "warn" in ln.lower()] == []
    assert any(ln.startswith("measured speedup of DMT over baseline:") for ln in lines)
    doc = json.loads((tmp_path / "demo.json").read_text())
    assert set(doc["runs"]) == {"flat", "baseline", "dmt"}
    # DMT at CR=2 sends exactly half the baseline's pooled-embedding bytes across hosts
    assert doc["pooled_cross_host_bytes_ratio_dmt_over_baseline"] == pytest.approx(0.5)
    for run in doc["runs"].values():
        assert 0.5 < run["auc"] <= run["oracle_auc"] + 0.01
