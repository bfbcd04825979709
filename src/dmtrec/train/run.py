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
from pathlib import Path
from typing import Any

from dmtrec.data import DataConfig
from dmtrec.errors import ConfigError
from dmtrec.models import ModelConfig
from dmtrec.train.trainer import TrainConfig, train_worker, write_metrics

LOCK_NAME = ".lock"


def learn_towers(dcfg: DataConfig, mcfg: ModelConfig, pcfg, out: str) -> None:
    """``--towers K --partition learned``: run the tower partitioner first (its report goes to
    ``OUT/partition``) and train on the towers it returns."""
    from dmtrec.parallel.launch import run_single
    from dmtrec.train.partition_job import partition_worker, write_partition

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
    network.
    """
    from dmtrec.parallel.launch import init_from_env, run_single, spawn

    preflight(dcfg, mcfg, tcfg)
    world = tcfg.hosts * tcfg.ranks_per_host
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # under torchrun
        init_from_env(tcfg.timeout)
        metrics = train_worker(dcfg, mcfg, tcfg)
        if int(os.environ["RANK"]) != 0:
            return metrics
        write_metrics(tcfg.out, metrics)
        return metrics
    with OutputLock(tcfg.out):
        if tcfg.parallel == "none":
            metrics = run_single(train_worker, (dcfg, mcfg, tcfg))
        elif hosts is not None:
            from dmtrec.emulate.launch import spawn_in_hosts

            metrics = spawn_in_hosts(
                train_worker, (dcfg, mcfg, tcfg), hosts, tcfg.ranks_per_host, tcfg.timeout
            )[0]
            metrics["link"] = {"mode": "netns", **hosts.link.to_dict()}
        else:
            metrics = spawn(
                train_worker, (dcfg, mcfg, tcfg), world, tcfg.ranks_per_host, tcfg.timeout
            )[0]
            if world > 1:
                metrics["link"] = {"mode": "none (loopback, unshaped)"}
        write_metrics(tcfg.out, metrics)
    return metrics
