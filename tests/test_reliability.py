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


# -- workers never outlive their launcher; the first failed rank is named --------------------
def _children(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is ``pid``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.slow
def test_kill_9_of_the_launcher_leaves_no_worker_alive(tmp_path: Path) -> None:
    """SIGKILL of a distributed run's parent: its workers die with it (PR_SET_PDEATHSIG)."""
    out = tmp_path / "run"
    parent = cli_process(
        "train", *SMALL, "--num-train", "200000", "--num-valid", "0", "--num-test", "500",
        "--parallel", "baseline", "--hosts", "2", "--out", str(out),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: (out / "tb").exists(), 240, "the training loop to start")
        workers = _children(parent.pid)
        assert len(workers) >= 2, workers
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [w for w in workers if _alive(w)] == []


def _kill_rank_1(_: object) -> int:
    import signal

    import torch
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    for _ in range(100):
        dist.all_reduce(t)
        time.sleep(0.01)
    return int(t.item())


def _hang_rank_2(_: object) -> int:
    import torch
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)
    if dist.get_rank() == 2:
        time.sleep(600)
    dist.all_reduce(t)
    return 0


@pytest.mark.slow
def test_a_killed_worker_is_named_not_its_peers() -> None:
    """kill -9 of rank 1 of 3: the error is 'rank 1 died (killed by SIGKILL)', one line, not
    the peers' gloo 'connection closed' errors."""
    from dmtrec.parallel.launch import RankFailed, spawn

    with pytest.raises(RankFailed) as e:
        spawn(_kill_rank_1, (None,), 3, 1, timeout=60)
    assert str(e.value) == "rank 1 died (killed by SIGKILL); the other ranks stopped with it"
    assert e.value.rank == 1


@pytest.mark.slow
def test_a_hung_worker_is_named_after_the_timeout() -> None:
    """Rank 2 of 3 stops answering: after --timeout the others fail, and the error names 2."""
    from dmtrec.parallel.launch import RankFailed, spawn

    t0 = time.monotonic()
    with pytest.raises(RankFailed) as e:
        spawn(_hang_rank_2, (None,), 3, 1, timeout=3)
    assert str(e.value) == (
        "rank 2 did not answer within --timeout 3 s; the other ranks timed out waiting for it"
    )
    assert time.monotonic() - t0 < 300  # rank 2 sleeps 600 s: the timeout ended the run


def _mark_and_sleep(marker_dir: str) -> None:
    import torch.distributed as dist

    Path(marker_dir, f"rank{dist.get_rank()}").write_text(str(os.getpid()))
    time.sleep(600)


@pytest.mark.slow
def test_kill_9_of_the_netns_launcher_leaves_no_worker_alive(tmp_path: Path) -> None:
    """The same inside emulated hosts: ranks run by `ip netns exec` die with their launcher."""
    from dmtrec.emulate.netns import available, remove_stale

    if available() is not None:
        pytest.skip(f"no network namespaces: {available()}")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from dmtrec.emulate.launch import spawn_in_hosts\n"
        "from dmtrec.emulate.netns import EmulatedHosts, LinkSpec\n"
        "from test_reliability import _mark_and_sleep\n"
        "with EmulatedHosts(2, LinkSpec()) as hosts:\n"
        "    spawn_in_hosts(_mark_and_sleep, (sys.argv[2],), hosts, 1)\n"
    )
    launcher = subprocess.Popen(
        [sys.executable, "-c", script, str(Path(__file__).parent), str(tmp_path)]
    )
    try:
        wait_for(lambda: len(list(tmp_path.glob("rank*"))) == 2, 240, "both ranks to start")
        workers = [int(p.read_text()) for p in tmp_path.glob("rank*")]
        assert sorted(_children(launcher.pid)) == sorted(workers)
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [w for w in workers if _alive(w)] == []
    removed = remove_stale()  # the killed launcher could not remove its namespaces
    assert f"dmtrec{launcher.pid}h0" in removed and f"dmtrec{launcher.pid}h1" in removed
