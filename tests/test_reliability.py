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
    """SIGKILL of a distributed run's parent as soon as its workers exist (still importing
    torch): they die with it (PR_SET_PDEATHSIG, set before any heavy import)."""
    out = tmp_path / "run"
    parent = cli_process(
        "train", *SMALL, "--num-train", "200000", "--num-valid", "0", "--num-test", "500",
        "--parallel", "baseline", "--hosts", "2", "--out", str(out),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: len(_children(parent.pid)) == 2, 240, "the two workers")
        workers = _children(parent.pid)
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


# -- sharded checkpoints: bit-exact resume, restart after a lost rank, resharding ------------
def _configs(out: Path, parallel: str, hosts: int, ranks: int, batch: int, **train):
    """Small synthetic run: 4 features in 2 towers (DMT), 12 steps of a 128-row global batch
    over an epoch boundary, validation every 5 steps (a best state to carry)."""
    from dmtrec.data import DataConfig
    from dmtrec.models import ModelConfig
    from dmtrec.train.trainer import TrainConfig

    data = DataConfig(
        synthetic=dict(
            num_sparse=4, num_groups=2, table_size=30, num_train=1000, num_valid=200, num_test=200
        )
    )
    towers = 2 if parallel == "dmt" or train.pop("towers", False) else 0
    model = ModelConfig(
        model="dlrm", num_towers=towers, partition="sequential", tm="dlrm" if towers else "identity"
    )
    defaults = dict(
        epochs=2, early_stop_patience=0, batch_size=batch, max_steps=12, checkpoint_every=4,
        keep_checkpoints=3, eval_every=5, out=str(out), progress=False, log_every=0,
        parallel=parallel, hosts=hosts, ranks_per_host=ranks, timeout=60,
    )  # fmt: skip
    return data, model, TrainConfig(**{**defaults, **train})


def _train(out: Path, parallel: str, hosts: int, ranks: int, batch: int, fault: str = "", **kw):
    from dmtrec.train.run import run_train

    if fault:
        os.environ["DMTREC_FAULT"] = fault
    try:
        metrics = run_train(*_configs(out, parallel, hosts, ranks, batch, **kw))
    finally:
        os.environ.pop("DMTREC_FAULT", None)
    for key in ("losses", "global_losses"):  # rank 0's rows; the whole global batch
        metrics[key] = json.loads((out / f"{key}.json").read_text())
    return metrics


def _weights(out: Path) -> dict:
    import torch

    return torch.load(out / "model" / "weights.pt")  # final parameters, gathered unsharded


def _assert_same_parameters(a: Path, b: Path) -> None:
    import torch

    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and any("embedding_bags" in k for k in wa)
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


@pytest.fixture(scope="module")
def dmt_2x2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The uninterrupted DMT 2x2 run (12 steps, checkpoints at 4, 8, 12)."""
    out = tmp_path_factory.mktemp("dmt22") / "straight"
    return out, _train(out, "dmt", 2, 2, 32)


@pytest.fixture(scope="module")
def baseline_2x2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The uninterrupted baseline (TorchRec hybrid parallel) 2x2 run."""
    out = tmp_path_factory.mktemp("baseline22") / "straight"
    return out, _train(out, "baseline", 2, 2, 32)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["dmt", "baseline"])
def test_kill_9_of_a_rank_restarts_from_the_checkpoint_bit_for_bit(
    parallel: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """2x2: 12 steps straight == 6 steps, kill -9 of rank 1, automatic restart of all ranks
    from the step-4 checkpoint, 8 more: every loss, the test metrics and every final parameter
    bit for bit."""
    straight_out, straight = request.getfixturevalue(f"{parallel}_2x2")
    out = tmp_path / "faulted"
    faulted = _train(out, parallel, 2, 2, 32, fault="step:1:6", max_restarts=1)
    [restart] = faulted["restarts"]
    assert restart["rank"] == 1 and restart["from_step"] == 4
    assert restart["error"] == "rank 1 died (killed by SIGKILL); the other ranks stopped with it"
    assert faulted["resumed_from_step"] == 4
    assert len(straight["losses"]) == 12
    assert faulted["losses"] == straight["losses"]
    assert faulted["global_losses"] == straight["global_losses"]
    assert (faulted["auc"], faulted["logloss"]) == (straight["auc"], straight["logloss"])
    assert straight["best_step"] is not None and faulted["best_step"] == straight["best_step"]
    _assert_same_parameters(straight_out, out)


def _copy_checkpoint(src: Path, step: int, dst: Path) -> None:
    import shutil

    name = f"step-{step:09d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)


@pytest.mark.slow
def test_dmt_checkpoint_reshards_to_1x2_and_to_one_process(
    dmt_2x2: tuple[Path, dict], tmp_path: Path
) -> None:
    """DMT 2x2's step-4 checkpoint resumed as DMT 1x2 (one host: all towers, tables over 2
    ranks) for steps 5-8, whose step-8 checkpoint resumed in one process (the same towers,
    unsharded) for 9-12: every global-batch loss within 1e-5 of the 2x2 continuation (each
    step's mean loss over all ranks: rank 0's own rows differ with the topology)."""
    straight_out, straight = dmt_2x2
    one_host = tmp_path / "1x2"
    _copy_checkpoint(straight_out, 4, one_host)
    m12 = _train(one_host, "dmt", 1, 2, 64, resume=True, max_steps=8)
    flat = tmp_path / "flat"
    _copy_checkpoint(one_host, 8, flat)
    m1 = _train(flat, "none", 1, 1, 128, resume=True, towers=True)
    assert (m12["resumed_from_step"], m1["resumed_from_step"]) == (4, 8)
    ref = straight["global_losses"]
    # the history is carried; the steps after each resume agree within float tolerance
    assert m12["global_losses"][:4] == ref[:4] and m1["global_losses"][:8] == m12["global_losses"]
    assert len(m1["global_losses"]) == 12
    d12 = max(abs(a - b) for a, b in zip(m12["global_losses"][4:], ref[4:8]))
    d1 = max(abs(a - b) for a, b in zip(m1["global_losses"][8:], ref[8:12]))
    print(f"max |loss - 2x2 continuation|: 1x2 {d12:.3g}, one process {d1:.3g}")
    assert d12 < 1e-5 and d1 < 1e-5


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one_to_resume(
    tmp_path: Path,
) -> None:
    """SIGKILL inside the step-8 checkpoint write (its shards written, not yet complete): the
    directory is ignored, --resume continues from step 4 (taking over the dead run's lock),
    and the result equals the uninterrupted run's bit for bit."""
    from dmtrec.train import checkpoint

    args = [
        "train", *SMALL, "--num-train", "1000", "--num-valid", "200", "--num-test", "200",
        "--batch-size", "100", "--epochs", "2", "--max-steps", "12", "--checkpoint-every", "4",
        "--eval-every", "5", "--early-stop-patience", "0",
    ]  # fmt: skip
    straight, out = tmp_path / "straight", tmp_path / "killed"
    assert main([*args, "--out", str(straight)]) == 0
    env = dict(os.environ, DMTREC_FAULT="save:0:8")
    killed = subprocess.run([sys.executable, "-c", CLI, *args, "--out", str(out)], env=env)
    assert killed.returncode == -9
    partial = out / "checkpoints" / ".tmp-000000008"
    assert (partial / ".metadata").is_file() and not (partial / "state.json").exists()
    assert checkpoint.latest(str(out)) == out / "checkpoints" / "step-000000004"
    assert main([*args, "--resume", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 4
    for name in ("losses.json", "global_losses.json"):
        assert (out / name).read_text() == (straight / name).read_text()
    _assert_same_parameters(straight, out)
    # the newest --keep-checkpoints (2) are kept; the crashed write is gone
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-000000008",
        "step-000000012",
    ]


@pytest.mark.slow
def test_baseline_checkpoint_reshards_from_2x2_to_4x1(
    baseline_2x2: tuple[Path, dict], tmp_path: Path
) -> None:
    """The baseline's tables, placed by the planner for 2 hosts x 2, resumed on 4 hosts x 1
    from step 4: every global-batch loss within 1e-5 of the 2x2 continuation."""
    straight_out, straight = baseline_2x2
    out = tmp_path / "4x1"
    _copy_checkpoint(straight_out, 4, out)
    m = _train(out, "baseline", 4, 1, 32, resume=True)
    assert m["resumed_from_step"] == 4 and len(m["global_losses"]) == 12
    ref = straight["global_losses"]
    diff = max(abs(a - b) for a, b in zip(m["global_losses"][4:], ref[4:]))
    print(f"max |loss - 2x2 continuation|: 4x1 {diff:.3g}")
    assert m["global_losses"][:4] == ref[:4] and diff < 1e-5


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_a_killed_rank_bit_for_bit(tmp_path: Path) -> None:
    """Under torchrun (standalone, loopback, 2 ranks of one host) with ``--max-restarts 1``:
    rank 1 SIGKILLed after step 6, torchrun restarts both ranks, they resume from the step-4
    checkpoint (TORCHELASTIC_RESTART_COUNT 1) and finish with the same losses and parameters
    as the local launcher's uninterrupted run, bit for bit."""
    args = [
        "train", *SMALL, "--num-train", "1000", "--num-valid", "200", "--num-test", "200",
        "--parallel", "baseline", "--hosts", "1", "--ranks-per-host", "2", "--epochs", "2",
        "--early-stop-patience", "0", "--batch-size", "64", "--max-steps", "12",
        "--checkpoint-every", "4", "--keep-checkpoints", "3", "--eval-every", "5",
        "--log-every", "0", "--timeout", "60",
    ]  # fmt: skip
    straight, faulted = tmp_path / "straight", tmp_path / "torchrun"
    assert main([*args, "--out", str(straight)]) == 0
    env = dict(os.environ, DMTREC_FAULT="step:1:6", PYTHONUNBUFFERED="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*torchrun, "--nproc-per-node", "2", "--max-restarts", "1", "-m", "dmtrec.cli"]
    proc = subprocess.run(
        [*cmd, *args, "--out", str(faulted)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "internal error" not in proc.stdout + proc.stderr
    # the surviving rank 0 says what happened to it (torchrun names the killed rank 1)
    assert "dmtrec: error: rank 0 lost its peers in a collective" in proc.stderr
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((faulted / "metrics.json").read_text())
    assert b["resumed_from_step"] == 4 and b["steps"] == a["steps"] == 12
    for key in ("losses", "global_losses"):
        assert json.loads((faulted / f"{key}.json").read_text()) == json.loads(
            (straight / f"{key}.json").read_text()
        )
    assert (b["auc"], b["logloss"]) == (a["auc"], a["logloss"])
    _assert_same_parameters(straight, faulted)
