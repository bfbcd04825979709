"""``dmtrec bench partition``: does the learned tower partition beat sequential and random?

For each seed: synthetic data (features in planted groups, order shuffled), K towers by
``learned`` (covariation interaction matrix -> spectral + constrained K-means), ``sequential``
and ``random``; then the same DMT model (TM ``dlrm``, CR) trained on each partition with the
same data, init and schedule (single-process DMT reference: SPTT computes exactly the same).
Reports per-method AUC mean/std, the ARI of each partition, and paired t-tests (learned vs
each baseline, over seeds). Writes ``OUT/bench_partition.json``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from dmtrec.bench import paired_comparison, synthetic_schedule
from dmtrec.data import DataConfig
from dmtrec.models import ModelConfig
from dmtrec.parallel.launch import run_single
from dmtrec.train.partition_job import PartitionConfig, partition_worker
from dmtrec.train.trainer import train_worker

METHODS = ("learned", "sequential", "random")


def _grouped_data(
    num_sparse: int, groups: int, rows: int, num_train: int, num_test: int, seed: int
) -> DataConfig:
    """Synthetic data with ``groups`` planted (shuffled) feature groups, no valid split."""
    return DataConfig(
        synthetic=dict(
            num_sparse=num_sparse,
            num_groups=groups,
            table_size=rows,
            num_train=num_train,
            num_valid=0,
            num_test=num_test,
            seed=seed,
        )
    )


def bench_measures(
    out: str,
    *,
    seeds: int = 5,
    num_sparse: int = 26,
    towers: int = 4,
    rows: int = 100,
    num_train: int = 60_000,
    probe_steps: int = 2000,
) -> dict[str, Any]:
    """ARI vs the planted groups of the learned partition under each interaction measure."""
    from dmtrec.train.partition_job import MEASURES as INTERACTIONS

    runs = []
    for seed in range(seeds):
        data = _grouped_data(num_sparse, towers, rows, num_train, 0, seed)
        for measure in INTERACTIONS:
            pcfg = PartitionConfig(
                towers=towers, interaction=measure, probe_steps=probe_steps, seed=seed
            )
            part = run_single(partition_worker, (data, pcfg))
            runs.append(
                {
                    "seed": seed,
                    "interaction": measure,
                    "ari": part["ari"],
                    "interaction_inside_towers": part["interaction_inside_towers"],
                }
            )
            print(f"[bench measures] seed {seed} {measure:<12} ari={part['ari']:.3f}", flush=True)
    summary = {
        m: {
            "ari_mean": statistics.mean(r["ari"] for r in runs if r["interaction"] == m),
            "ari_min": min(r["ari"] for r in runs if r["interaction"] == m),
        }
        for m in INTERACTIONS
    }
    report = {
        "config": dict(
            seeds=seeds,
            num_sparse=num_sparse,
            towers=towers,
            rows=rows,
            num_train=num_train,
            probe_steps=probe_steps,
        ),
        "summary": summary,
        "runs": runs,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "bench_measures.json").write_text(json.dumps(report, indent=2))
    for m, v in summary.items():
        print(f"{m:<12} mean ARI {v['ari_mean']:.3f} (min {v['ari_min']:.3f})")
    return report


def bench_partition(
    out: str,
    *,
    seeds: int = 5,
    num_sparse: int = 32,
    towers: int = 4,
    cr: int = 4,
    rows: int = 100,
    num_train: int = 100_000,
    epochs: int = 2,
    probe_steps: int = 2000,
) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for seed in range(seeds):
        data = _grouped_data(num_sparse, towers, rows, num_train, 20_000, seed)
        for method in METHODS:
            part = run_single(
                partition_worker,
                (
                    data,
                    PartitionConfig(
                        towers=towers, method=method, probe_steps=probe_steps, seed=seed
                    ),
                ),
            )
            mcfg = ModelConfig(towers=part["towers"], tm="dlrm", cr=cr)
            tcfg = synthetic_schedule(epochs, seed, f"{out}/seed{seed}_{method}")
            m = run_single(train_worker, (data, mcfg, tcfg))
            runs.append(
                {
                    "seed": seed,
                    "method": method,
                    "auc": m["auc"],
                    "logloss": m["logloss"],
                    "ari": part["ari"],
                    "imbalance": part["imbalance"],
                    "towers": part["towers"],
                    "oracle_auc": m["oracle_auc"],
                }
            )
            print(
                f"[bench partition] seed {seed} {method:<10} ari={part['ari']:.3f} auc={m['auc']:.4f}",
                flush=True,
            )
    summary: dict[str, Any] = {}
    by = {meth: [r for r in runs if r["method"] == meth] for meth in METHODS}
    for meth, rs in by.items():
        aucs = [r["auc"] for r in rs]
        summary[meth] = {
            "auc_mean": statistics.mean(aucs),
            "auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
            "ari_mean": statistics.mean(r["ari"] for r in rs),
        }
    for base in ("sequential", "random"):
        summary[f"learned_vs_{base}"] = paired_comparison(
            [r["auc"] for r in by["learned"]], [r["auc"] for r in by[base]]
        )
    report = {
        "config": dict(
            seeds=seeds,
            num_sparse=num_sparse,
            towers=towers,
            cr=cr,
            tm="dlrm",
            rows=rows,
            num_train=num_train,
            epochs=epochs,
            probe_steps=probe_steps,
        ),
        "summary": summary,
        "runs": runs,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "bench_partition.json").write_text(json.dumps(report, indent=2))
    for meth in METHODS:
        s = summary[meth]
        print(f"{meth:<11} AUC {s['auc_mean']:.4f} +- {s['auc_std']:.4f}  ARI {s['ari_mean']:.3f}")
    for base in ("sequential", "random"):
        s = summary[f"learned_vs_{base}"]
        print(
            f"learned vs {base}: +{s['mean_auc_gain']:.4f} AUC, wins {s['wins']}/{seeds}, paired t p={s['paired_t_p_value']:.2g}"
        )
    return report
