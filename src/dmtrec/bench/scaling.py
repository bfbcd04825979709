"""``dmtrec bench scaling``: quality vs compute for Wukong, DLRM and DCNv2.

Synthetic data with 3rd-order planted interactions (``order=3``, the triples carrying
``triple_share`` of the interaction variance); each model at growing sizes
(``scale`` multiplies MLP widths, Wukong's nF/nL/rank and layer count, DCN's cross rank);
forward FLOPs per example of the dense part counted with ``torch.utils.flop_counter`` (the
embedding lookups are the same for all); each (model, scale) trained with the same data,
schedule and seeds (a seed fixes the data and the initialisation, so models are compared
paired by seed). Reports, per Wukong size, the paired AUC difference against the DLRM size of
nearest FLOPs, and per family where its curve flattens (the first size whose AUC gain over the
previous size is below the seed-to-seed std). Writes ``OUT/bench_scaling.json`` and a log-x
plot ``OUT/scaling.png``.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dmtrec.bench import paired_comparison, synthetic_schedule
from dmtrec.data import DataConfig, load_data
from dmtrec.models import ModelConfig, build_model
from dmtrec.parallel.launch import run_single
from dmtrec.train.trainer import train_worker

MODELS = ("dlrm", "dcn", "wukong")


def model_config(name: str, scale: int, dim: int) -> ModelConfig:
    """The ``scale``-th size of a model family."""
    widths = dict(bottom=[32 * scale, dim], top=[64 * scale, 32 * scale])
    if name == "dlrm":
        return ModelConfig(model="dlrm", embedding_dim=dim, **widths)
    if name == "dcn":
        return ModelConfig(
            model="dcn", embedding_dim=dim, cross_layers=2 + scale, cross_rank=8 * scale, **widths
        )
    return ModelConfig(
        model="wukong",
        embedding_dim=dim,
        wukong_layers=1 + scale,
        wukong_nf=4 * scale,
        wukong_nl=4 * scale,
        wukong_rank=4 * scale,
        **widths,
    )


def flops_per_example(mcfg: ModelConfig, data: DataConfig, batch: int = 64) -> float:
    """Forward FLOPs per example of the model above the embedding lookup."""
    src = load_data(
        DataConfig(synthetic={**data.synthetic, "num_train": batch, "num_test": 0, "num_valid": 0})
    )
    model = build_model(mcfg, src.spec)
    b = next(src.batches("train", batch))
    with torch.no_grad():
        from dmtrec.models.common import stack_pooled

        emb = stack_pooled(model.ebc(b.sparse_features), src.spec.sparse)
        with FlopCounterMode(display=False) as counter:
            model.head(b.dense_features, emb)
    return counter.get_total_flops() / batch


def bench_scaling(
    out: str,
    *,
    scales: tuple[int, ...] = (1, 2, 4),
    seeds: int = 3,
    num_train: int = 300_000,
    epochs: int = 1,
    dim: int = 16,
    triple_share: float = 0.7,
    triple_form: str = "anova",
    num_sparse: int = 48,
    num_groups: int = 6,
) -> dict[str, Any]:
    runs = []
    base = dict(
        num_sparse=num_sparse,
        num_groups=num_groups,
        table_size=100,
        order=3,
        triple_share=triple_share,
        triple_form=triple_form,
        num_valid=0,
        num_test=20_000,
        num_train=num_train,
    )
    for name in MODELS:
        for scale in scales:
            mcfg = model_config(name, scale, dim)
            gflop = flops_per_example(mcfg, DataConfig(synthetic=base)) / 1e9
            for seed in range(seeds):
                data = DataConfig(synthetic={**base, "seed": seed})
                tcfg = synthetic_schedule(epochs, seed, f"{out}/{name}_s{scale}_seed{seed}")
                m = run_single(train_worker, (data, mcfg, tcfg))
                runs.append(
                    {
                        "model": name,
                        "scale": scale,
                        "seed": seed,
                        "gflop_per_example": gflop,
                        "auc": m["auc"],
                        "logloss": m["logloss"],
                        "oracle_auc": m["oracle_auc"],
                    }
                )
                print(
                    f"[bench scaling] {name} scale {scale} ({gflop * 1e3:.3f} MFLOP/ex) seed {seed}: auc={m['auc']:.4f}",
                    flush=True,
                )
    points = []
    for name in MODELS:
        for scale in scales:
            rs = [r for r in runs if r["model"] == name and r["scale"] == scale]
            points.append(
                {
                    "model": name,
                    "scale": scale,
                    "gflop_per_example": rs[0]["gflop_per_example"],
                    "auc_mean": statistics.mean(r["auc"] for r in rs),
                    "auc_std": statistics.stdev(r["auc"] for r in rs) if len(rs) > 1 else 0.0,
                    "logloss_mean": statistics.mean(r["logloss"] for r in rs),
                }
            )
    report = {
        "config": dict(
            scales=list(scales), seeds=seeds, data=base, epochs=epochs, embedding_dim=dim
        ),
        "points": points,
        "wukong_vs_dlrm_at_nearest_flops": _equal_flops(points, runs),
        "flattens_at": {name: _flattens(points, name) for name in MODELS},
        "runs": runs,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "bench_scaling.json").write_text(json.dumps(report, indent=2))
    _plot(points, runs, Path(out) / "scaling.png")
    for p in points:
        print(
            f"{p['model']:<7} scale {p['scale']}  {p['gflop_per_example'] * 1e3:8.3f} MFLOP/ex  "
            f"AUC {p['auc_mean']:.4f} +- {p['auc_std']:.4f}  logloss {p['logloss_mean']:.4f}"
        )
    for c in report["wukong_vs_dlrm_at_nearest_flops"]:
        print(
            f"wukong s{c['wukong_scale']} vs dlrm s{c['dlrm_scale']} (FLOPs x{c['flops_ratio']:.2f}): "
            f"{c['mean_auc_gain']:+.4f} AUC, wins {c['wins']}/{seeds}, p={c['paired_t_p_value']}"
        )
    print("flattens at scale:", report["flattens_at"])
    return report


def _equal_flops(points: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each Wukong size against the DLRM size nearest in log FLOPs, paired by seed."""

    def aucs(model: str, scale: int) -> list[float]:
        rs = [r for r in runs if r["model"] == model and r["scale"] == scale]
        return [r["auc"] for r in sorted(rs, key=lambda r: r["seed"])]

    dlrm = [p for p in points if p["model"] == "dlrm"]
    out = []
    for w in (p for p in points if p["model"] == "wukong"):
        d = min(dlrm, key=lambda p: abs(math.log(p["gflop_per_example"] / w["gflop_per_example"])))
        out.append(
            {
                "wukong_scale": w["scale"],
                "dlrm_scale": d["scale"],
                "flops_ratio": w["gflop_per_example"] / d["gflop_per_example"],
                **paired_comparison(aucs("wukong", w["scale"]), aucs("dlrm", d["scale"])),
            }
        )
    return out


def _flattens(points: list[dict[str, Any]], model: str) -> int | None:
    """First scale whose mean AUC gain over the previous scale is below that scale's seed std
    (None: still climbing at the largest size)."""
    ps = [p for p in points if p["model"] == model]
    for prev, cur in zip(ps, ps[1:]):
        if cur["auc_mean"] - prev["auc_mean"] < max(cur["auc_std"], 1e-4):
            return cur["scale"]
    return None


def _plot(points: list[dict[str, Any]], runs: list[dict[str, Any]], path: Path) -> None:
    """AUC minus the smallest DLRM's AUC on the same seed (the seeds' data differ far more
    than the models do), mean +- std over seeds; runs that collapsed to a constant
    prediction (AUC < 0.55) are left out and named in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref_scale = min(p["scale"] for p in points if p["model"] == "dlrm")
    ref = {r["seed"]: r["auc"] for r in runs if r["model"] == "dlrm" and r["scale"] == ref_scale}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in MODELS:
        xs, ys, es, collapsed = [], [], [], []
        for p in (p for p in points if p["model"] == name):
            rs = [r for r in runs if r["model"] == name and r["scale"] == p["scale"]]
            if p["auc_mean"] < 0.55:
                collapsed.append(f"s{p['scale']}")
                continue
            diffs = [r["auc"] - ref[r["seed"]] for r in rs]
            xs.append(p["gflop_per_example"])
            ys.append(statistics.mean(diffs))
            es.append(statistics.stdev(diffs) if len(diffs) > 1 else 0.0)
        label = name + (f" ({', '.join(collapsed)} collapsed: AUC 0.5)" if collapsed else "")
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
    ax.axhline(0.0, color="#999", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("GFLOP / example (forward, dense part)")
    ax.set_ylabel(f"test AUC - DLRM s{ref_scale} AUC (same seed)")
    ax.set_title("quality vs compute, 3rd-order planted interactions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
