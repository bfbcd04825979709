"""Running a training job: where its ranks run (this process, local processes, emulated
hosts, or whatever torchrun started) and what it leaves in ``--out``.

The CLI, the demo and the benchmarks call ``run_train``; the per-rank work is
``trainer.train_worker``. Before any rank starts, ``preflight`` checks everything that can be
checked without training (option values, the data paths, the output directory, a resumed
checkpoint's configuration), and the launcher takes ``OUT/.lock`` for the whole run, so two
runs never write into one directory.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path
from typing import Any

from dmtrec.data import DataConfig
from dmtrec.errors import ConfigError
from dmtrec.models import ModelConfig
from dmtrec.train import checkpoint
from dmtrec.train.trainer import TrainConfig, train_worker, write_metrics

LOCK_NAME = ".lock"


def learn_towers(dcfg: DataConfig, mcfg: ModelConfig, pcfg, out: str) -> None:
    """``--towers K --partition learned``: run the tower partitioner first (its report goes to
    ``OUT/partition``) and train on the towers it returns."""
    from dmtrec.parallel.launch import run_single
    from dmtrec.train.partition_job import partition_worker, write_partition

    pcfg.log = pcfg.log or str(Path(out) / "partition" / "partition.log")
    result = run_single(partition_worker, (dcfg, pcfg))
    write_partition(str(Path(out) / "partition"), result)
    mcfg.towers, mcfg.num_towers = result["towers"], 0


def ensure_out_dir(out: str) -> Path:
    """``--out`` as a writable directory (created if missing); a one-line error otherwise."""
    d = Path(out)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"--out {out}: is a file or under a file, expected a directory") from None
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    if not d.is_dir():
        raise ConfigError(f"--out {out}: is a file or under a file, expected a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: directory is not writable")
    return d


class OutputLock:
    """Exclusive use of an output directory: ``fcntl.flock`` on ``OUT/.lock``, held by the
    launcher for the whole run, with the holder's pid inside.

    A second run on the same ``--out`` fails at once with a one-line ``ConfigError`` naming
    the directory and the holder. The kernel drops the lock when its holder dies (however it
    dies), so a ``--resume`` after a crash (or a kill -9) simply takes it over; no stale-lock
    cleanup exists or is needed. (``flock`` is local to one machine: on a network file system
    shared by several hosts it protects each host's runs only.)
    """

    def __init__(self, out: str) -> None:
        self.out = out
        self.path = Path(out) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(
                f"--out {self.out}: cannot create {self.path} ({e.strerror})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"--out {self.out}: in use by another run (pid {holder}); wait for it to end or "
                "choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def preflight(dcfg: DataConfig, mcfg: ModelConfig, tcfg: TrainConfig) -> None:
    """Everything about a training run that can be checked before any rank starts, so that a
    mistake costs a second, not a training run: option values and their combinations, the data
    paths and an evaluation split, the output directory."""
    from dmtrec.data.base import SPLITS
    from dmtrec.data.synthetic import SyntheticConfig

    tcfg.validate()
    if dcfg.kind == "synthetic":
        syn = SyntheticConfig(**dcfg.synthetic)
        if syn.num_train < 1:
            raise ConfigError(f"--num-train {syn.num_train}: no training rows; it must be >= 1")
        if syn.num_valid < 1 and syn.num_test < 1:
            raise ConfigError("--num-valid and --num-test are both 0: no data to evaluate on")
    else:
        if dcfg.kind in ("csv", "parquet") and (not dcfg.label or not dcfg.sparse):
            raise ConfigError(
                f"--data {dcfg.kind} needs --label and --sparse (and usually --dense)"
            )
        for split in SPLITS:
            for path in getattr(dcfg, split):
                p = Path(path)
                if dcfg.kind == "preprocessed":
                    if not p.is_dir():
                        raise ConfigError(f"--{split} {path}: no such directory (a store)")
                elif p.is_dir():
                    raise ConfigError(f"--{split} {path}: is a directory, expected a data file")
                elif not p.exists():
                    raise ConfigError(f"--{split} {path}: no such file")
        if dcfg.kind != "preprocessed" and not (dcfg.valid or dcfg.test):
            raise ConfigError("no --valid or --test data to evaluate on")
    ensure_out_dir(tcfg.out)


def run_train(dcfg: DataConfig, mcfg: ModelConfig, tcfg: TrainConfig, hosts=None) -> dict[str, Any]:
    """Train in this process (``none``) or on hosts x ranks local processes; return metrics
    (rank 0's; other torchrun ranks return ``{}``) and write ``OUT/metrics.json``.

    ``hosts``: an entered ``emulate.netns.EmulatedHosts`` to run the ranks on a shaped 2-tier
    network. With ``--max-restarts N``, a local multi-process run whose rank dies (or hangs
    past ``--timeout``) is restarted, all ranks, from the newest complete checkpoint, up to N
    times; ``metrics["restarts"]`` records each (which rank, from which step, how long).
    """
    torchrun = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if torchrun:  # hosts x ranks come from torchrun's environment (checked against the options)
        from dmtrec.parallel.topology import Topology

        topo = Topology.from_torchrun(tcfg.hosts, tcfg.ranks_per_host)
        tcfg.hosts, tcfg.ranks_per_host = topo.hosts, topo.ranks_per_host
    preflight(dcfg, mcfg, tcfg)
    if tcfg.resume and checkpoint.latest(tcfg.out) is None:
        raise ConfigError(f"--resume: no complete checkpoint in {checkpoint.root(tcfg.out)}")
    if torchrun:
        return _run_under_torchrun(dcfg, mcfg, tcfg)
    with OutputLock(tcfg.out):
        metrics = _run_with_restarts(dcfg, mcfg, tcfg, hosts)
        write_metrics(tcfg.out, metrics)
    return metrics


def _run_under_torchrun(dcfg: DataConfig, mcfg: ModelConfig, tcfg: TrainConfig) -> dict[str, Any]:
    """This process is one rank that torchrun started: rank 0 holds the lock (every rank
    learns whether it got it); torchrun's own ``--max-restarts`` restarts the ranks, which
    then resume from the newest checkpoint (``TORCHELASTIC_RESTART_COUNT`` > 0)."""
    import torch.distributed as dist

    from dmtrec.parallel.launch import init_from_env

    init_from_env(tcfg.timeout)
    lock = OutputLock(tcfg.out)
    refused = [None]
    if dist.get_rank() == 0:
        try:
            lock.acquire()
        except ConfigError as e:
            refused = [str(e)]
    dist.broadcast_object_list(refused, src=0)
    if refused[0]:
        raise ConfigError(refused[0])
    try:
        metrics = train_worker(dcfg, mcfg, tcfg)
        if dist.get_rank() == 0:
            write_metrics(tcfg.out, metrics)
        return metrics
    finally:
        lock.release()


def _launch(dcfg: DataConfig, mcfg: ModelConfig, tcfg: TrainConfig, hosts) -> dict[str, Any]:
    from dmtrec.parallel.launch import run_single, spawn

    world = tcfg.hosts * tcfg.ranks_per_host
    if tcfg.parallel == "none":
        return run_single(train_worker, (dcfg, mcfg, tcfg))
    if hosts is not None:
        from dmtrec.emulate.launch import spawn_in_hosts

        metrics = spawn_in_hosts(
            train_worker, (dcfg, mcfg, tcfg), hosts, tcfg.ranks_per_host, tcfg.timeout
        )[0]
        metrics["link"] = {"mode": "netns", **hosts.link.to_dict()}
        return metrics
    metrics = spawn(train_worker, (dcfg, mcfg, tcfg), world, tcfg.ranks_per_host, tcfg.timeout)[0]
    if world > 1:
        metrics["link"] = {"mode": "none (loopback, unshaped)"}
    return metrics


def _run_with_restarts(
    dcfg: DataConfig, mcfg: ModelConfig, tcfg: TrainConfig, hosts
) -> dict[str, Any]:
    """``_launch``, relaunched after a lost rank (``RankFailed``) up to ``--max-restarts``
    times; the restarted ranks resume from the newest complete checkpoint (or start over when
    there is none). A user error or a bug is never retried: it would fail the same way."""
    from dmtrec.parallel.launch import RankFailed

    restarts: list[dict[str, Any]] = []
    before = os.environ.get("DMTREC_RESTART_COUNT")
    try:
        while True:
            os.environ["DMTREC_RESTART_COUNT"] = str(len(restarts))
            try:
                metrics = _launch(dcfg, mcfg, tcfg, hosts)
                break
            except RankFailed as e:
                if len(restarts) >= tcfg.max_restarts or tcfg.parallel == "none":
                    raise
                latest = checkpoint.latest(tcfg.out)
                step = checkpoint.read_state(latest)["loop"]["step"] if latest else 0
                restarts.append(
                    {"rank": e.rank, "error": str(e), "failed_at": time.time(), "from_step": step}
                )
                print(
                    f"dmtrec: {e}; restarting all ranks from step {step} "
                    f"(restart {len(restarts)} of --max-restarts {tcfg.max_restarts})",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if before is None:
            os.environ.pop("DMTREC_RESTART_COUNT", None)
        else:
            os.environ["DMTREC_RESTART_COUNT"] = before
    if restarts:
        restarts[-1]["restart_s"] = metrics.get("first_step_time", 0) - restarts[-1]["failed_at"]
        metrics["restarts"] = restarts
    return metrics
