"""``exfm run`` and its steps: stream -> FM (teacher) -> DAS (augment) -> VMs (students).

One output directory holds everything a run makes:

    OUT/stream/                    the windowed stream (Parquet by window) and, next to it,
    OUT/stream/das/<name>/         the DAS store (see ``das.py``)
    OUT/teacher/                   FM snapshots + teacher.json
    OUT/students/<vm>/<kd>.json    each VM variant's progressive NE per window
    OUT/exfm.json, OUT/exfm_ne.png the summary and the plot of NE per window

Each entry point runs in its own one-rank process group (``run_single``; nested calls reuse
it), so the lead's CLI can call them directly: ``run_exfm(cfg, out)``, ``run_teacher``,
``run_augment``, ``run_student``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dmtrec.errors import ConfigError
from dmtrec.exfm.config import ExFMConfig
from dmtrec.exfm.das import Store, augment, store_dir
from dmtrec.exfm.stream import Stream, prepare_stream
from dmtrec.exfm.student import check_start, student_features, train_student
from dmtrec.exfm.teacher import read_manifest, train_teacher
from dmtrec.parallel.launch import run_single


def _paths(out: str | Path) -> tuple[Path, Path, Path]:
    out = Path(out)
    return out / "stream", out / "teacher", out / "students"


def open_stream(cfg: ExFMConfig, out: str | Path) -> Stream:
    """``OUT/stream``, materialised from ``cfg.stream`` unless already there."""
    return prepare_stream(cfg.stream, _paths(out)[0])


def run_teacher(cfg: ExFMConfig, out: str | Path) -> dict[str, Any]:
    """Train the FM over the stream, writing snapshots to ``OUT/teacher``; its manifest."""
    cfg.validate()
    stream = open_stream(cfg, out)
    return run_single(train_teacher, (stream, cfg.teacher, _paths(out)[1], cfg.seed))


def run_augment(cfg: ExFMConfig, out: str | Path) -> dict[str, Any]:
    """Run the DAS over the stream with the FM snapshots in ``OUT/teacher``; its summary."""
    cfg.validate()
    stream = open_stream(cfg, out)
    return run_single(augment, (stream, _paths(out)[1], cfg.augment))


def run_student(
    cfg: ExFMConfig,
    out: str | Path,
    names: list[str] | None = None,
    variants: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Train the named VMs (default: all) in the given variants (default: each VM's own),
    reading the DAS store; results by VM and variant, also written to ``OUT/students``."""
    cfg.validate()
    stream = open_stream(cfg, out)
    known = [s.name for s in cfg.students]
    for n in names or []:
        if n not in known:
            raise ConfigError(f"--vm {n!r}: no such student in the config ({', '.join(known)})")
    chosen = [s for s in cfg.students if names is None or s.name in names]
    for s in chosen:  # fail on a bad feature before any training
        student_features(stream, s, f"student {s.name}")
    plan = [(s, v) for s in chosen for v in (variants or s.variants)]
    store = None
    if any(v != "none" for _, v in plan):
        store = Store(store_dir(stream, cfg.augment.store_name))
    results: dict[str, dict[str, Any]] = {}
    students_dir = _paths(out)[2]

    def work() -> None:
        for s, v in plan:
            r = train_student(
                stream, store, s, v, cfg.distill, cfg.optim, cfg.seed, cfg.student_start
            )
            results.setdefault(s.name, {})[v] = r
            d = students_dir / s.name
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{v}.json").write_text(json.dumps(r, indent=1))

    run_single(work, ())
    return results


def summarize(
    stream: Stream, teacher: dict[str, Any], das: dict[str, Any], results: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The ``exfm.json`` document: per VM and variant NE per window, mean, AUC and relative
    NE gain over the same VM without distillation, plus the 1-to-N inference accounting."""
    students: dict[str, dict[str, Any]] = {}
    vm_info: dict[str, dict[str, Any]] = {}
    for vm, by_kd in results.items():
        none = by_kd.get("none")
        students[vm] = {}
        first = next(iter(by_kd.values()))
        vm_info[vm] = {
            "model": first["model"]["model"],
            "features": first["features"],
            "traffic": first["traffic"],
            "parameters": first["parameters"],  # trunk + serving head (what is served)
        }
        if "oracle_ne" in first:  # NE of the true probability on this VM's traffic
            vm_info[vm]["oracle_ne"] = first["oracle_ne"]
        for kd, r in by_kd.items():
            gain = None
            if none is not None:
                gain = 100.0 * (none["ne_mean"] - r["ne_mean"]) / none["ne_mean"]
            students[vm][kd] = {
                "windows": r["windows"],
                "ne": r["ne"],
                "ne_mean": r["ne_mean"],
                "auc": r["auc"],
                "ne_gain_vs_none": gain,
                "examples_with_fm_label": r["examples_with_fm_label"],
            }
    vms = len(results)
    doc: dict[str, Any] = {
        "ne_gain_vs_none": "relative NE reduction vs the same VM without distillation, %, > 0 is better",
        "stream": {
            "source": stream.meta.source,
            "description": stream.meta.description,
            "rows": stream.meta.rows,
            "windows": stream.meta.num_windows,
            "window_rows": stream.meta.window_rows,
            "label_rate": stream.meta.label_rate,
        },
        "teacher": {
            "model": teacher["model"]["model"],
            "parameters": teacher["parameters"],
            "snapshots": len(teacher["snapshots"]),
            "ne": teacher["ne"],
            "ne_mean": teacher["ne_mean"],
        },
        "das": {
            "fm_lag": das["fm_lag"],
            "fm_version": das["fm_version"],
            "store": das["store"],
            "fm_ne": [w.get("fm_ne") for w in das["windows"]],
            "fm_version_per_window": [w["fm_version"] for w in das["windows"]],
        },
        "fm_calls": das["fm_calls"],
        "examples": das["examples"],
        "examples_labeled": das["examples_labeled"],
        "vms": vms,
        "fm_calls_if_each_vm_ran_the_fm": das["examples_labeled"] * vms,
        "vm_info": vm_info,
        "students": students,
    }
    return doc


def plot_ne(doc: dict[str, Any], path: Path) -> None:
    """NE per evaluated window, one panel per VM, a line per variant (+ the logged FM's NE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vms = list(doc["students"])
    fig, axes = plt.subplots(1, len(vms), figsize=(5.5 * len(vms), 3.8), squeeze=False)
    fm_ne = doc["das"]["fm_ne"]
    for ax, vm in zip(axes[0], vms):
        for kd, r in doc["students"][vm].items():
            ax.plot(r["windows"], r["ne"], marker=".", label=f"{kd} (mean {r['ne_mean']:.4f})")
        ts = [t for t, v in enumerate(fm_ne) if v is not None and t > 0]
        ax.plot(
            ts,
            [fm_ne[t] for t in ts],
            ls=":",
            color="#666",
            label="FM logged by the DAS (all traffic)",
        )
        oracle = doc["vm_info"][vm].get("oracle_ne")
        if oracle is not None:
            ax.plot(r["windows"], oracle, ls="--", color="#bbb", label="true probability")
        ax.set_title(f"{vm}: NE on the next window (fm_lag {doc['das']['fm_lag']})")
        ax.set_xlabel("window")
        ax.set_ylabel("NE (lower is better)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_exfm(cfg: ExFMConfig, out: str | Path) -> dict[str, Any]:
    """Teacher, augment and every student from one config; writes ``OUT/exfm.json`` and
    ``OUT/exfm_ne.png`` and returns the summary."""
    cfg.validate()
    out = Path(out)
    stream = open_stream(cfg, out)
    check_start(stream, cfg.student_start)  # bad student settings fail before the FM trains
    for s in cfg.students:
        student_features(stream, s, f"student {s.name}")

    def work() -> dict[str, Any]:
        teacher = run_teacher(cfg, out)
        das = run_augment(cfg, out)
        results = run_student(cfg, out)
        return summarize(stream, teacher, das, results)

    doc = run_single(work, ())
    out.mkdir(parents=True, exist_ok=True)
    (out / "exfm.json").write_text(json.dumps(doc, indent=1))
    plot_ne(doc, out / "exfm_ne.png")
    return doc


def load_teacher_manifest(out: str | Path) -> dict[str, Any]:
    return read_manifest(_paths(out)[1])
