"""The ``dmtrec exfm run|teacher|augment|student`` commands over one flat options dataclass.

``ExFMOptions`` is what the CLI turns into flags (``--config exfm.yaml`` plus the overrides
one wants on the command line); each ``exfm_*`` function loads the YAML, applies the
overrides, runs its step into ``out`` and returns the exit code 0 (errors are
``ConfigError``/``DataError``, which the CLI prints as one line and exits 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmtrec.exfm.config import ExFMConfig, config_from_dict, load_config
from dmtrec.exfm.run import run_augment, run_exfm, run_student, run_teacher
from dmtrec.models.exfm import KD_MODES
from dmtrec.options import option


@dataclass
class ExFMOptions:
    """``--config`` (the YAML run description) and the settings most often changed per run."""

    config: str | None = option(None, "YAML file: stream, teacher, augment, distill, students")
    window_rows: int | None = option(None, "examples per window (overrides stream.window_rows)")
    drift: float | None = option(None, "synthetic stream: rotation per window, rad (stream.drift)")
    snapshot_every: int | None = option(
        None, "FM snapshot every N windows (teacher.snapshot_every)"
    )
    fm_lag: int | None = option(None, "windows between a snapshot and its use (augment.fm_lag)")
    fm_version: int | None = option(
        None, "label every window with this snapshot (augment.fm_version)"
    )
    kd: list[str] | None = option(
        None,
        "variants to train: none, plain, aux, aux_sa (default: each VM's own)",
        choices=KD_MODES,
    )
    vm: list[str] | None = option(None, "student: the VMs to train (default: all)")
    w: float | None = option(None, "weight of the distillation loss (distill.w)")
    alpha: float | None = option(None, "teacher scale in min(alpha * y_FM, 1) (distill.alpha)")
    beta: float | None = option(None, "gradient scale of the distillation heads (distill.beta)")
    seed: int | None = option(None, "seed of the models' initialisation")


_OVERRIDES = {
    "window_rows": ("stream", "window_rows"),
    "drift": ("stream", "drift"),
    "snapshot_every": ("teacher", "snapshot_every"),
    "fm_lag": ("augment", "fm_lag"),
    "fm_version": ("augment", "fm_version"),
    "w": ("distill", "w"),
    "alpha": ("distill", "alpha"),
    "beta": ("distill", "beta"),
}


def resolve(opts: ExFMOptions) -> ExFMConfig:
    """The run's config: the YAML (or the defaults) with the given overrides, validated."""
    cfg = load_config(opts.config) if opts.config else config_from_dict({})
    for name, (section, key) in _OVERRIDES.items():
        value = getattr(opts, name)
        if value is not None:
            setattr(getattr(cfg, section), key, value)
    if opts.seed is not None:
        cfg.seed = opts.seed
    if opts.kd:
        for s in cfg.students:
            s.variants = list(opts.kd)
    cfg.validate()
    return cfg


def _print_students(results: dict[str, dict[str, Any]]) -> None:
    for vm, by in results.items():
        for kd, r in by.items():
            gain = r.get("ne_gain_vs_none")
            extra = "" if gain is None else f"  NE gain vs none {gain:+.2f}%"
            print(
                f"{vm:<12} {kd:<7} mean next-window NE {r['ne_mean']:.4f}  AUC {r['auc']:.4f}{extra}"
            )


def exfm_run(opts: ExFMOptions, out: str) -> int:
    """FM, DAS and every VM; writes OUT/exfm.json and OUT/exfm_ne.png."""
    doc = run_exfm(resolve(opts), out)
    _print_students(doc["students"])
    print(
        f"FM inferences {doc['fm_calls']} for {doc['examples_labeled']} labelled examples and {doc['vms']} VMs"
    )
    print(f"wrote {Path(out) / 'exfm.json'}")
    return 0


def exfm_teacher(opts: ExFMOptions, out: str) -> int:
    """Train the FM over the stream; writes OUT/teacher/ (snapshots, teacher.json)."""
    m = run_teacher(resolve(opts), out)
    print(f"FM mean next-window NE {m['ne_mean']:.4f}; {len(m['snapshots'])} snapshots")
    print(f"wrote {Path(out) / 'teacher' / 'teacher.json'}")
    return 0


def exfm_augment(opts: ExFMOptions, out: str) -> int:
    """Run the DAS; writes the store OUT/stream/das/<name>/ (Parquet by window, das.json)."""
    s = run_augment(resolve(opts), out)
    print(f"FM inferences {s['fm_calls']} for {s['examples_labeled']} of {s['examples']} examples")
    print(f"wrote {s['store']}")
    return 0


def exfm_student(opts: ExFMOptions, out: str) -> int:
    """Train VMs from the DAS store; writes OUT/students/<vm>/<kd>.json."""
    results = run_student(resolve(opts), out, opts.vm, opts.kd)
    _print_students(
        {
            vm: {kd: {**r, "ne_gain_vs_none": None} for kd, r in by.items()}
            for vm, by in results.items()
        }
    )
    print(f"wrote {Path(out) / 'students'}")
    return 0
