"""``dmtrec demo``: the main job on built-in synthetic data, end to end.

Trains the same DLRM three ways on the same data and seed -- flat (one process), TorchRec
hybrid parallel (the baseline) and DMT (SPTT + DLRM tower modules, CR=2, towers aligned to the
planted groups) on 2 emulated hosts x 2 ranks -- then prints what it measured and writes
``OUT/demo.json`` (each run's metrics.json is in ``OUT/<run>/``).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from dmtrec.data import DataConfig
from dmtrec.models import ModelConfig
from dmtrec.train.trainer import TrainConfig

DEMO_DATA = dict(
    num_sparse=24, num_groups=4, table_size=100, num_train=100_000, num_valid=0, num_test=20_000
)


def demo_runs(
    out: str, num_train: int = DEMO_DATA["num_train"], num_test: int = DEMO_DATA["num_test"]
) -> list[tuple[str, DataConfig, ModelConfig, TrainConfig]]:
    """The three runs of the demo (``tests/test_demo.py`` runs them at a smaller size)."""
    data = DataConfig(synthetic={**DEMO_DATA, "num_train": num_train, "num_test": num_test})
    common = dict(batch_size=128, lr=3e-3, sparse_lr=0.2, epochs=1, progress=False, count_comm=True)
    two_by_two = dict(hosts=2, ranks_per_host=2)
    return [
        (
            "flat",
            data,
            ModelConfig(),
            TrainConfig(
                out=f"{out}/flat",
                batch_size=512,
                **{k: v for k, v in common.items() if k != "batch_size"},
            ),
        ),
        (
            "baseline",
            data,
            ModelConfig(),
            TrainConfig(out=f"{out}/baseline", parallel="baseline", **two_by_two, **common),
        ),
        (
            "dmt",
            data,
            ModelConfig(num_towers=4, partition="planted", tm="dlrm", cr=2),
            TrainConfig(out=f"{out}/dmt", parallel="dmt", **two_by_two, **common),
        ),
    ]


def run_demo(out: str, runs: list | None = None) -> int:
    """Run the demo; distributed runs go on shaped emulated hosts when namespaces are available."""
    from dmtrec.emulate import netns as netem
    from dmtrec.train.run import run_train

    results: dict[str, Any] = {}
    why_not = netem.available()
    with contextlib.ExitStack() as stack:
        hosts = None if why_not else stack.enter_context(netem.EmulatedHosts(2, netem.LinkSpec()))
        for name, dcfg, mcfg, tcfg in runs or demo_runs(out):
            print(f"[demo] {name}: training ...", flush=True)
            t0 = time.perf_counter()
            m = run_train(dcfg, mcfg, tcfg, hosts=hosts if tcfg.parallel != "none" else None)
            m["wall_s"] = time.perf_counter() - t0
            results[name] = m
    link = (
        f"emulated hosts: network namespaces, cross-host {netem.LinkSpec().cross_mbit:g} Mbit/s, "
        f"intra-host {netem.LinkSpec().intra_mbit:g} Mbit/s"
        if hosts is not None
        else f"loopback, no link emulation ({why_not})"
    )
    base, dmt = results["baseline"], results["dmt"]
    summary = {
        "runs": {
            k: {
                key: v.get(key)
                for key in (
                    "auc",
                    "logloss",
                    "ne",
                    "oracle_auc",
                    "examples_per_s",
                    "train_examples",
                    "parallel",
                    "hosts",
                    "ranks_per_host",
                    "tm",
                    "cr",
                )
            }
            | {"cross_host_bytes_per_step": v.get("comm", {}).get("cross_host_bytes_per_step")}
            for k, v in results.items()
        },
        "dmt_speedup_vs_baseline": dmt["examples_per_s"] / base["examples_per_s"],
        "pooled_cross_host_bytes_ratio_dmt_over_baseline": dmt["comm"][
            "pooled_cross_host_bytes_per_step"
        ]
        / base["comm"]["pooled_cross_host_bytes_per_step"],
        "link_mode": link,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "demo.json").write_text(json.dumps(summary, indent=2))
    print()
    print(f"{'run':<10}{'AUC':>8}{'logloss':>9}{'NE':>8}{'ex/s':>9}{'cross-host MB/step':>20}")
    for name, r in summary["runs"].items():
        xb = r["cross_host_bytes_per_step"]
        print(
            f"{name:<10}{r['auc']:>8.4f}{r['logloss']:>9.4f}{r['ne']:>8.4f}{r['examples_per_s']:>9.0f}"
            f"{'-' if xb is None else f'{xb / 1e6:.3f}':>20}"
        )
    print(f"oracle AUC (true logit): {results['flat']['oracle_auc']:.4f}")
    print(
        "DMT/baseline pooled-embedding cross-host bytes: "
        f"{summary['pooled_cross_host_bytes_ratio_dmt_over_baseline']:.3f} (CR=2)"
    )
    print(
        f"measured speedup of DMT over baseline: {summary['dmt_speedup_vs_baseline']:.2f}x "
        f"({summary['link_mode']})"
    )
    print(f"wrote {Path(out) / 'demo.json'}")
    return 0
