"""Running a training job: where its ranks run (this process, local processes, emulated
hosts, or whatever torchrun started) and what it leaves in ``--out``.

The CLI, the demo and the benchmarks call ``run_train``; the per-rank work is
``trainer.train_worker``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dmtrec.data import DataConfig
from dmtrec.models import ModelConfig
from dmtrec.train.trainer import TrainConfig, train_worker, write_metrics


def learn_towers(dcfg: DataConfig, mcfg: ModelConfig, pcfg, out: str) -> None:
    """``--towers K --partition learned``: run the tower partitioner first (its report goes to
    ``OUT/partition``) and train on the towers it returns."""
    from dmtrec.parallel.launch import run_single
    from dmtrec.train.partition_job import partition_worker, write_partition

    result = run_single(partition_worker, (dcfg, pcfg))
    write_partition(str(Path(out) / "partition"), result)
    mcfg.towers, mcfg.num_towers = result["towers"], 0


def run_train(dcfg: DataConfig, mcfg: ModelConfig, tcfg: TrainConfig, hosts=None) -> dict[str, Any]:
    """Train in this process (``none``) or on hosts x ranks local processes; return metrics
    (rank 0's; other torchrun ranks return ``{}``) and write ``OUT/metrics.json``.

    ``hosts``: an entered ``emulate.netns.EmulatedHosts`` to run the ranks on a shaped 2-tier
    network.
    """
    from dmtrec.parallel.launch import init_from_env, run_single, spawn

    world = tcfg.hosts * tcfg.ranks_per_host
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # under torchrun
        init_from_env()
        metrics = train_worker(dcfg, mcfg, tcfg)
        if int(os.environ["RANK"]) != 0:
            return metrics
    elif tcfg.parallel == "none":
        metrics = run_single(train_worker, (dcfg, mcfg, tcfg))
    elif hosts is not None:
        from dmtrec.emulate.launch import spawn_in_hosts

        metrics = spawn_in_hosts(train_worker, (dcfg, mcfg, tcfg), hosts, tcfg.ranks_per_host)[0]
        metrics["link"] = {"mode": "netns", **hosts.link.to_dict()}
    else:
        metrics = spawn(train_worker, (dcfg, mcfg, tcfg), world, tcfg.ranks_per_host)[0]
        if world > 1:
            metrics["link"] = {"mode": "none (loopback, unshaped)"}
    write_metrics(tcfg.out, metrics)
    return metrics
