"""Reliability: one run per output directory, workers that never outlive their launcher,
sharded checkpoints (DCP) that resume bit-exactly and reshard, restart after a lost rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmtrec.cli import main

CLI = "import sys; from dmtrec.cli import main; sys.exit(main(sys.argv[1:]))"
SMALL = ["--num-sparse", "4", "--num-groups", "2", "--synthetic-table-size", "30", "--no-progress"]


def cli_process(*args: str, **kwargs) -> subprocess.Popen:
    """``dmtrec ARGS`` in a fresh interpreter (its own pid, killable)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", CLI, *args], env=env, **kwargs)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_second_run_on_one_out_gets_the_lock_error_and_the_first_finishes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run holds OUT/.lock (its pid inside); a second run on the same --out fails at once
    with one line naming the directory and that pid; the first ends with its own metrics."""
    out = tmp_path / "run"
    first = cli_process(
        "train", *SMALL, "--num-train", "6000", "--num-valid", "0", "--num-test", "500",
        "--epochs", "2", "--seed", "1", "--out", str(out),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lock = out / ".lock"
    wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), 120, "lock")
    code = main(["train", *SMALL, "--num-train", "1000", "--seed", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert first.poll() is None, "the first run ended before the second tried"
    assert code == 2
    assert err == [
        f"dmtrec: error: --out {out}: in use by another run (pid {first.pid}); wait for it to "
        "end or choose another --out"
    ]
    log, _ = first.communicate(timeout=300)
    assert first.returncode == 0, log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["train"]["seed"] == 1 and metrics["steps"] == 2 * (6000 // 256 + 1)
