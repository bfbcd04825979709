"""Is the student adapter's gain the adapter, or the second head's extra distillation weight?

``aux_sa`` is ``aux`` plus a second distillation head (weight ``sa_w = 1``) whose target is
the adapter's re-mapping of ``y_FM``: twice the total distillation weight of ``aux`` (``w = 1``).
On the synthetic drifting stream of ``bench_config('synthetic', seed)`` (issue 17's bench
setting), per seed one FM and one DAS store per lag (as ``bench exfm``), then each VM in

    aux         w = 1                                   (bench exfm's aux)
    aux_w2      w = 2: aux_sa's total distillation weight on one head
    aux_sa      w = 1, sa_w = 1                         (bench exfm's aux_sa)
    aux_sa_id   aux_sa with sa_lr = 0: the adapter stays the identity, D2's target is y_FM

scored as in the bench (mean next-window NE); one-sided paired t-tests as the bench's
``_paired_less``, per VM and pooled over the two VMs.

And the staleness's shape on each VM's traffic at each lag (windows t >= lag + 2, the first
with an FM label in both t - 1 and t): NE of ``y_FM`` raw, after an affine refit of the labels
on ``logit(y_FM)`` (an unregularised two-parameter logistic fit, ``scipy.optimize``), after a
cubic-in-logit logistic refit (smooth, non-affine) and after an isotonic map
(``scipy.optimize.isotonic_regression``; scikit-learn is not among the project's
dependencies) -- each fitted on window t itself (in-sample: optimistic, most for isotonic),
cross-fitted within window t (5 folds: the honest estimate of what the best map of that
family reaches on window t's own distribution) and fitted on window t - 1 (what an adapter
trained on fresh labels could carry into the next window) -- and of the adapter's output as
trained (``adapter_step`` in the VM's batch order: ``sa_used`` is the post-update output that
supervised D2, ``sa_before`` the output before the adapter saw the batch's labels). The
adapter depends on y_FM and the labels only, so it is replayed without a VM here; it is the
same adapter aux_sa trained.

    nice -n 10 .venv/bin/python benchmarks/exfm_sa_control.py --seeds 0 1 2 3 4 5 6 7 \\
        --out benchmarks/results/exfm_sa_control.json
    # the staleness only (no VM), on a faster-drifting stream
    ... exfm_sa_control.py --seeds 100 101 --lags 0 3 --variants --stream drift=0.2 --out X.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import optimize, special

from dmtrec.bench.exfm import _paired_less, bench_config
from dmtrec.exfm._build import dense_optimizer
from dmtrec.exfm.config import AugmentConfig, ExFMConfig, StudentConfig
from dmtrec.exfm.das import Store, augment
from dmtrec.exfm.stream import Stream, WindowBatches, prepare_stream
from dmtrec.exfm.student import adapter_step, student_features, traffic_rows, train_student
from dmtrec.exfm.teacher import train_teacher
from dmtrec.models.exfm import DistillConfig, StudentAdapter, TeacherTargets, prob_logit
from dmtrec.parallel.launch import run_single
from dmtrec.train.metrics import quality

# variant -> (kd, DistillConfig overrides)
VARIANTS: dict[str, tuple[str, dict[str, float]]] = {
    "aux": ("aux", {}),
    "aux_w2": ("aux", {"w": 2.0}),
    "aux_sa": ("aux_sa", {}),
    "aux_sa_id": ("aux_sa", {"sa_lr": 0.0}),
}
TESTS = (  # (a, b): a's NE < b's NE?
    ("aux_sa", "aux"),
    ("aux_w2", "aux"),
    ("aux_sa_id", "aux"),
    ("aux_sa", "aux_w2"),
    ("aux_sa", "aux_sa_id"),
)
_EPS = 1e-6


def _ne(prob: np.ndarray, y: np.ndarray) -> float:
    logit = prob_logit(torch.from_numpy(np.asarray(prob, dtype=np.float64)))
    return quality(logit, torch.from_numpy(y))["ne"]


def _logit(p: np.ndarray) -> np.ndarray:
    return prob_logit(torch.from_numpy(np.asarray(p, dtype=np.float64))).numpy()


def _powers(p: np.ndarray, degree: int) -> np.ndarray:
    x = _logit(p)
    return np.stack([x**k for k in range(degree + 1)], axis=1)  # 1, x, x^2, ...


def _logistic(degree: int):
    """Unregularised logistic refit of ``y`` on a polynomial of ``logit(y_FM)``: degree 1 is
    the affine recalibration (slope, intercept), degree 3 a smooth non-affine one."""

    def fit(fit_p: np.ndarray, fit_y: np.ndarray) -> np.ndarray:
        x = _powers(fit_p, degree)

        def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
            z = x @ theta
            r = special.expit(z) - fit_y
            return float(np.mean(np.logaddexp(0.0, z) - fit_y * z)), x.T @ r / len(r)

        theta0 = np.zeros(degree + 1)
        theta0[1] = 1.0  # start from the identity
        return optimize.minimize(loss, theta0, jac=True, method="L-BFGS-B").x

    def predict(theta: np.ndarray, p: np.ndarray) -> np.ndarray:
        return special.expit(_powers(p, degree) @ theta)

    return fit, predict


def _isotonic_fit(fit_p: np.ndarray, fit_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The isotonic (non-decreasing) map y_FM -> P(y = 1) fitted on (fit_p, fit_y), as its
    knots (distinct y_FM, fitted value; tied y_FM share their mean)."""
    order = np.argsort(fit_p, kind="stable")
    fitted = optimize.isotonic_regression(fit_y[order]).x
    xs, inv, counts = np.unique(fit_p[order], return_inverse=True, return_counts=True)
    return xs, np.bincount(inv, weights=fitted) / counts


def _isotonic_predict(knots: tuple[np.ndarray, np.ndarray], p: np.ndarray) -> np.ndarray:
    # linear between knots, flat outside (as sklearn's out_of_bounds="clip"); an end block of
    # all-0 or all-1 labels fits 0 or 1, so the output is clipped to [1e-3, 1 - 1e-3]
    return np.clip(np.interp(p, *knots), _ISO_CLIP, 1 - _ISO_CLIP)


MAPS = {
    "affine": _logistic(1),
    "cubic": _logistic(3),
    "isotonic": (_isotonic_fit, _isotonic_predict),
}
_FOLDS = 5
_ISO_CLIP = 1e-3


def _cross_fit(fit, predict, p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Out-of-fold predictions over one window (interleaved folds, row % 5)."""
    fold = np.arange(len(p)) % _FOLDS
    out = np.empty_like(p)
    for k in range(_FOLDS):
        held = fold == k
        out[held] = predict(fit(p[~held], y[~held]), p[held])
    return out


def staleness(
    stream: Stream,
    store: Store,
    scfg: StudentConfig,
    dcfg: DistillConfig,
    batch_size: int,
    seed: int,
    lag: int,
    start: int = 0,
) -> dict[str, Any]:
    """NE of y_FM and of its re-mappings on ``scfg``'s traffic, mean over windows >= lag + 2."""
    dense, sparse = student_features(stream, scfg, f"student {scfg.name}")
    torch.manual_seed(seed)  # as train_student builds aux_sa's adapter
    sa = StudentAdapter(dcfg.sa_hidden)
    sa_opt = dense_optimizer(sa, dcfg.sa_lr)
    per: list[dict[str, Any]] = []
    prev: tuple[np.ndarray, np.ndarray] | None = None
    for t in range(start, stream.num_windows):
        rows = traffic_rows(stream.window(t, ["key", "label", "oracle_prob", *dense, *sparse]),
                            scfg.traffic)  # fmt: skip
        pred, _, has = store.join(rows, t)
        wb = WindowBatches(rows, dense, sparse, {"fm_prob": pred, "mask": has})
        used, before = [], []
        for batch, ex in wb(batch_size):
            teacher = TeacherTargets(ex["fm_prob"], ex["mask"])
            with torch.no_grad():
                before.append(torch.sigmoid(sa(prob_logit(ex["fm_prob"]).unsqueeze(-1))))
            used.append(adapter_step(sa, sa_opt, batch, teacher).sa_prob)
        y = wb.labels.astype(np.float64)
        if has.all() and prev is not None and t >= lag + 2:
            p = pred.astype(np.float64)
            w: dict[str, Any] = {"window": t, "raw": _ne(p, y)}
            for name, (fit, predict) in MAPS.items():
                w[f"{name}_in_window"] = _ne(predict(fit(p, y), p), y)
                w[f"{name}_cross_fit"] = _ne(_cross_fit(fit, predict, p, y), y)
                w[f"{name}_prev_window"] = _ne(predict(fit(*prev), p), y)
            w["sa_used"] = _ne(torch.cat(used).double().numpy(), y)
            w["sa_before"] = _ne(torch.cat(before).double().numpy(), y)
            w["oracle"] = _ne(rows["oracle_prob"].to_numpy(), y)
            w["affine_intercept"], w["affine_slope"] = (float(v) for v in MAPS["affine"][0](p, y))
            per.append(w)
        prev = (pred.astype(np.float64), y) if has.all() else None
    keys = [k for k in per[0] if k != "window"]
    return {
        "windows": [w["window"] for w in per],
        "mean": {k: statistics.mean(w[k] for w in per) for k in keys},
        "per_window": per,
    }


def one_seed(
    seed: int,
    lags: list[int],
    root: Path,
    variants: list[str],
    stream_over: dict[str, float] | None = None,
) -> dict[str, Any]:
    cfg: ExFMConfig = bench_config("synthetic", seed)
    cfg.stream = replace(cfg.stream, **(stream_over or {}))
    cfg.validate()
    base = root / f"seed{seed}"
    stream = prepare_stream(cfg.stream, base / "stream")
    tm = train_teacher(stream, cfg.teacher, base / "teacher", seed)
    runs, shapes, fm_ne = [], [], {}
    for lag in lags:
        s = augment(stream, base / "teacher", AugmentConfig(fm_lag=lag, name=f"lag{lag}"))
        store = Store(s["store"])
        fm_ne[lag] = statistics.mean(w["fm_ne"] for w in s["windows"] if "fm_ne" in w)
        for scfg in cfg.students:
            sh = staleness(stream, store, scfg, cfg.distill, cfg.optim.batch_size, seed, lag,
                           cfg.student_start)  # fmt: skip
            shapes.append({"seed": seed, "vm": scfg.name, "fm_lag": lag, **sh})
            for name in variants:
                kd, over = VARIANTS[name]
                dcfg = replace(cfg.distill, **over)
                t0 = time.perf_counter()
                r = train_student(stream, store, scfg, kd, dcfg, cfg.optim, seed, cfg.student_start)
                runs.append(
                    {"seed": seed, "vm": scfg.name, "variant": name, "fm_lag": lag,
                     "ne_mean": r["ne_mean"], "auc": r["auc"], "ne": r["ne"]}
                )  # fmt: skip
                print(
                    f"[sa-control] seed {seed} lag {lag} {scfg.name} {name}: NE {r['ne_mean']:.4f}"
                    f" ({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
    return {"teacher_ne_mean": tm["ne_mean"], "logged_fm_ne": fm_ne, "runs": runs,
            "staleness": shapes}  # fmt: skip


def summarize(runs: list[dict[str, Any]], shapes: list[dict[str, Any]], lags: list[int]):
    """Mean NE per (variant, lag) and the paired tests, per VM and pooled; staleness means."""

    def ne(vm: str | None, v: str, lag: int) -> list[float]:
        rs = [r for r in runs if r["variant"] == v and r["fm_lag"] == lag]
        rs = [r for r in rs if vm is None or r["vm"] == vm]
        return [r["ne_mean"] for r in sorted(rs, key=lambda r: (r["vm"], r["seed"]))]

    variants = sorted({r["variant"] for r in runs}, key=list(VARIANTS).index)
    out: dict[str, Any] = {}
    for vm in [*sorted({r["vm"] for r in runs}), None]:
        cells, tests = {}, {}
        for lag in lags:
            for v in variants:
                cells[f"{v}@lag{lag}"] = statistics.mean(ne(vm, v, lag))
            for a, b in TESTS:
                if a in variants and b in variants:
                    tests[f"{a} < {b} @lag{lag}"] = _paired_less(ne(vm, a, lag), ne(vm, b, lag))
        out[vm or "pooled"] = {"mean_ne": cells, "tests": tests}
    shape: dict[str, Any] = {}
    for lag in lags:
        for vm in [*sorted({s["vm"] for s in shapes}), None]:
            ss = [s for s in shapes if s["fm_lag"] == lag and (vm is None or s["vm"] == vm)]
            shape[f"{vm or 'pooled'}@lag{lag}"] = {
                k: statistics.mean(s["mean"][k] for s in ss) for k in ss[0]["mean"]
            }
    return {"students": out, "staleness": shape}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--lags", type=int, nargs="+", default=[0, 1, 3])
    ap.add_argument(
        "--variants",
        nargs="*",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="student variants (none given: the staleness measurement only)",
    )
    ap.add_argument(
        "--stream",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="overrides of the bench's synthetic StreamConfig, e.g. drift=0.15 new_ids=3",
    )
    ap.add_argument("--out", required=True, help="JSON report (rewritten after every seed)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    stream_over = {
        k: float(v) if "." in v else int(v) for k, v in (a.split("=") for a in args.stream)
    }
    scratch = tempfile.TemporaryDirectory(prefix="dmtrec-sa-control-")
    root = Path(args.work or scratch.name)
    runs: list[dict[str, Any]] = []
    shapes: list[dict[str, Any]] = []
    per_seed: dict[int, Any] = {}
    t_start = time.perf_counter()

    def work() -> None:
        for seed in args.seeds:
            r = one_seed(seed, args.lags, root, args.variants, stream_over)
            runs.extend(r.pop("runs"))
            shapes.extend(r.pop("staleness"))
            per_seed[seed] = r
            report = {
                "what": __doc__,
                "command": "benchmarks/exfm_sa_control.py "
                + " ".join(
                    f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in vars(args).items()
                    if v is not None and k != "work"
                ),  # fmt: skip
                "seeds_done": sorted(per_seed),
                "lags": args.lags,
                "stream_overrides": stream_over,
                "elapsed_s": time.perf_counter() - t_start,
                "summary": summarize(runs, shapes, args.lags),
                "per_seed": per_seed,
                "runs": runs,
                "staleness": shapes,
            }
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1))

    try:
        run_single(work, ())
    finally:
        scratch.cleanup()
    s = summarize(runs, shapes, args.lags)
    for vm, d in s["students"].items():
        print(vm, {k: round(v, 4) for k, v in d["mean_ne"].items()})
        for k, t in d["tests"].items():
            print(f"  {k:<28} {t['mean_gain_pct']:+.3f}% {t['wins']}/{t['n']} p={t['p_value']}")
    for k, v in s["staleness"].items():
        print(k, {a: round(b, 4) for a, b in v.items()})


if __name__ == "__main__":
    main()
