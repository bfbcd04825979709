"""``dmtrec`` command line: train, demo, bench.

Every command that trains or measures writes a JSON of what it measured into ``--out``.
User errors print one line (``dmtrec: error: ...``) and exit 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from dmtrec.errors import ConfigError, DataError, DmtrecError


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", help="synthetic | criteo | csv | parquet")
    g.add_argument("--train", action="append", default=[], help="train file (repeatable)")
    g.add_argument("--valid", action="append", default=[])
    g.add_argument("--test", action="append", default=[])
    g.add_argument("--label", help="label column (csv/parquet)")
    g.add_argument("--dense", type=_names, default=[], help="dense columns a,b,c")
    g.add_argument("--sparse", type=_names, default=[], help="sparse columns a,b,c")
    g.add_argument("--table-size", type=int, default=100_000, help="criteo: rows per hashed table")
    g.add_argument("--min-count", type=int, default=1, help="csv/parquet: vocabulary threshold")
    g.add_argument("--max-bad-rows", type=int, default=100)
    g.add_argument("--num-train", type=int, default=100_000, help="synthetic rows")
    g.add_argument("--num-valid", type=int, default=10_000)
    g.add_argument("--num-test", type=int, default=20_000)
    g.add_argument("--num-sparse", type=int, default=26)
    g.add_argument("--num-groups", type=int, default=4, help="synthetic planted groups")
    g.add_argument("--rows", type=int, default=1000, help="synthetic rows per table")
    g.add_argument("--order", type=int, default=2, help="synthetic interaction order (2 or 3)")
    g.add_argument(
        "--triple-share", type=float, default=0.5, help="order 3: variance share of the triples"
    )
    g.add_argument("--triple-form", default="anova", help="order 3: anova | pairprod")
    g.add_argument("--seed", type=int, default=0)


def _add_partition_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tower partitioner (--method/--partition learned)")
    g.add_argument(
        "--interaction", default="fwfm", help="S measure: fwfm | mixed | dot | attribution"
    )
    g.add_argument(
        "--partition-cost", default="count", help="balance: count | lookup | memory | both"
    )
    g.add_argument(
        "--imbalance-tolerance", type=float, default=None, help="max tower cost / mean - 1"
    )
    g.add_argument(
        "--host-memory", type=float, default=None, help="bytes of tables a tower may hold"
    )
    g.add_argument("--embed-dim", type=int, default=None, help="spectral embedding dim (default K)")
    g.add_argument("--probe-steps", type=int, default=2000, help="steps of the flat probe model")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of option values (keys as the long options)")
    _add_data_args(p)
    _add_partition_args(p)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="dlrm", help="dlrm | dcn | fwfm | wukong")
    g.add_argument("--embedding-dim", type=int, default=16)
    g.add_argument("--bottom", type=_ints, default=[64, 32], help="bottom MLP sizes")
    g.add_argument("--top", type=_ints, default=[64, 32], help="top MLP sizes (before the logit)")
    g.add_argument("--towers", help="K (with --partition) or a towers.json")
    g.add_argument(
        "--partition", default="sequential", help="sequential | random | planted | learned"
    )
    g.add_argument("--tm", default="identity", help="tower module: identity | dlrm | dcn | wukong")
    g.add_argument("--cr", type=int, default=1, help="tower compression ratio (1,2,4,8,16)")
    g.add_argument("--wukong-layers", type=int, default=2, help="Wukong: stacked layers l")
    g.add_argument("--wukong-nf", type=int, default=8, help="Wukong: FM-block outputs nF")
    g.add_argument("--wukong-nl", type=int, default=8, help="Wukong: linear-compress outputs nL")
    g.add_argument("--wukong-rank", type=int, default=8, help="Wukong: optimized-FM rank k")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=256, help="per rank")
    g.add_argument("--lr", type=float, default=1e-3, help="dense (Adam) learning rate")
    g.add_argument("--sparse-lr", type=float, default=0.05, help="embedding (row-wise Adagrad) lr")
    g.add_argument("--dense-optimizer", default="adam")
    g.add_argument("--sparse-optimizer", default="rowwise_adagrad")
    g.add_argument("--max-steps", type=int, default=0)
    g.add_argument("--checkpoint-every", type=int, default=0)
    g.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    g.add_argument("--out", default="runs/train")
    g.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("parallelism")
    g.add_argument("--parallel", default="none", help="none | baseline | dmt")
    g.add_argument("--hosts", type=int, default=1, help="emulated hosts (H)")
    g.add_argument("--ranks-per-host", type=int, default=1, help="ranks per host (L)")
    g.add_argument("--sharding", default="table_wise", help="table_wise | row_wise | ...")


def _apply_yaml(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config`` become defaults that the command line overrides."""
    args = parser.parse_args(argv)
    if not getattr(args, "config", None):
        return args
    import yaml

    path = args.config
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise DataError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a mapping of option: value")
    known = {a.dest for a in parser._actions}
    defaults: dict[str, Any] = {}
    for key, value in doc.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest == "config":
            raise ConfigError(f"{path}: unknown option {key!r}")
        action = next(a for a in parser._actions if a.dest == dest)
        if action.type is not None and isinstance(value, str):
            value = action.type(value)
        elif dest in ("train", "valid", "test") and isinstance(value, str):
            value = [value]
        defaults[dest] = value
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def data_config_from_args(args: argparse.Namespace):
    from dmtrec.data import DataConfig

    return DataConfig(
        kind=args.data,
        train=args.train,
        valid=args.valid,
        test=args.test,
        label=args.label,
        dense=args.dense,
        sparse=args.sparse,
        table_size=args.table_size,
        min_count=args.min_count,
        max_bad_rows=args.max_bad_rows,
        synthetic=dict(
            num_train=args.num_train,
            num_valid=args.num_valid,
            num_test=args.num_test,
            num_sparse=args.num_sparse,
            num_groups=args.num_groups,
            table_size=args.rows,
            order=args.order,
            triple_share=args.triple_share,
            triple_form=args.triple_form,
            seed=args.seed,
        ),
    )


def partition_config_from_args(args: argparse.Namespace, towers: int, method: str):
    from dmtrec.train.partition_job import PartitionConfig

    return PartitionConfig(
        towers=towers,
        method=method,
        interaction=args.interaction,
        cost=args.partition_cost,
        tolerance=args.imbalance_tolerance,
        host_memory=args.host_memory,
        embed_dim=args.embed_dim,
        probe_steps=args.probe_steps,
        seed=args.seed,
    )


def configs_from_args(args: argparse.Namespace):
    """(DataConfig, ModelConfig, TrainConfig) from parsed options."""
    from dmtrec.models import ModelConfig
    from dmtrec.partition import load_towers
    from dmtrec.train.trainer import TrainConfig

    dcfg = data_config_from_args(args)
    towers, num_towers = None, 0
    if args.towers:
        if args.towers.isdigit() or (args.towers.startswith("-") and args.towers[1:].isdigit()):
            num_towers = int(args.towers)
            if num_towers < 1:
                raise ConfigError(f"--towers must be >= 1, not {num_towers}")
        else:
            towers = load_towers(args.towers)
    mcfg = ModelConfig(
        model=args.model,
        embedding_dim=args.embedding_dim,
        bottom=args.bottom,
        top=args.top,
        towers=towers,
        num_towers=num_towers,
        partition=args.partition,
        tm=args.tm,
        cr=args.cr,
        wukong_layers=args.wukong_layers,
        wukong_nf=args.wukong_nf,
        wukong_nl=args.wukong_nl,
        wukong_rank=args.wukong_rank,
    )
    mcfg.validate()
    tcfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        sparse_lr=args.sparse_lr,
        dense_optimizer=args.dense_optimizer,
        sparse_optimizer=args.sparse_optimizer,
        seed=args.seed,
        max_steps=args.max_steps,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        out=args.out,
        parallel=args.parallel,
        hosts=args.hosts,
        ranks_per_host=args.ranks_per_host,
        sharding=args.sharding,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    tcfg.validate()
    if args.parallel == "dmt":
        if not args.towers:
            raise ConfigError("--parallel dmt needs --towers (K or a towers.json)")
        k = num_towers or len(towers or [])
        if k < args.hosts:
            raise ConfigError(
                f"--towers {k} is fewer than --hosts {args.hosts}: SPTT places each tower on one "
                "host and every host needs a tower"
            )
    return dcfg, mcfg, tcfg


def run_train(dcfg, mcfg, tcfg, hosts=None) -> dict[str, Any]:
    """Train in this process (``none``) or on hosts x ranks local processes; return metrics.

    ``hosts``: an entered ``netem.EmulatedHosts`` to run the ranks on a shaped 2-tier network.
    """
    from dmtrec.parallel.launch import run_single, spawn, spawn_in_hosts
    from dmtrec.train.trainer import train_worker, write_metrics

    world = tcfg.hosts * tcfg.ranks_per_host
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # under torchrun
        from dmtrec.parallel.launch import init_from_env

        init_from_env()
        metrics = train_worker(dcfg, mcfg, tcfg)
        if int(os.environ["RANK"]) != 0:
            return metrics
    elif tcfg.parallel == "none":
        metrics = run_single(train_worker, (dcfg, mcfg, tcfg))
    elif hosts is not None:
        metrics = spawn_in_hosts(train_worker, (dcfg, mcfg, tcfg), hosts, tcfg.ranks_per_host)[0]
        metrics["link"] = {"mode": "netns", **hosts.link.to_dict()}
    else:
        metrics = spawn(train_worker, (dcfg, mcfg, tcfg), world, tcfg.ranks_per_host)[0]
        if world > 1:
            metrics["link"] = {"mode": "none (loopback, unshaped)"}
    write_metrics(tcfg.out, metrics)
    return metrics


def _summary(m: dict[str, Any]) -> str:
    parts = [f"{m['model']} parallel={m['parallel']}"]
    if m.get("towers"):
        parts.append(f"towers={len(m['towers'])} tm={m['tm']} cr={m['cr']}")
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


def cmd_train(args: argparse.Namespace) -> int:
    dcfg, mcfg, tcfg = configs_from_args(args)
    if mcfg.num_towers and mcfg.partition == "learned":
        from dmtrec.parallel.launch import run_single
        from dmtrec.train.partition_job import partition_worker, write_partition

        pcfg = partition_config_from_args(args, mcfg.num_towers, "learned")
        result = run_single(partition_worker, (dcfg, pcfg))
        write_partition(str(Path(tcfg.out) / "partition"), result)
        mcfg.towers, mcfg.num_towers = result["towers"], 0
    m = run_train(dcfg, mcfg, tcfg)
    if m:
        print(_summary(m))
        print(f"wrote {Path(tcfg.out) / 'metrics.json'}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from dmtrec.parallel.launch import run_single
    from dmtrec.train.partition_job import partition_worker, write_partition

    pcfg = partition_config_from_args(args, args.towers, args.method)
    result = run_single(partition_worker, (data_config_from_args(args), pcfg))
    path = write_partition(args.out, result)
    print((Path(args.out) / "report.txt").read_text().rstrip())
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dmtrec`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dmtrec", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train and evaluate a model; writes OUT/metrics.json")
    _add_train_args(p_train)
    p_part = sub.add_parser("partition", help="feature-to-tower partition; writes OUT/towers.json")
    _add_data_args(p_part)
    _add_partition_args(p_part)
    p_part.add_argument("--towers", type=int, required=True, help="number of towers K")
    p_part.add_argument("--method", default="learned", help="learned | sequential | random")
    p_part.add_argument("--out", default="runs/partition")
    p_demo = sub.add_parser(
        "demo", help="flat vs hybrid-parallel baseline vs DMT on synthetic data"
    )
    p_demo.add_argument("--out", default="runs/demo")
    p_bench = sub.add_parser("bench", help="benchmarks; each writes a JSON into --out")
    bsub = p_bench.add_subparsers(dest="bench", required=True)
    p_flat = bsub.add_parser("flat", help="dmtrec DLRM vs torchrec.models.dlrm.DLRM throughput")
    p_flat.add_argument("--out", default="runs/bench_flat")
    p_flat.add_argument("--batch-size", type=int, default=2048)
    p_flat.add_argument("--steps", type=int, default=20)
    p_flat.add_argument("--table-size", type=int, default=100_000)
    p_dmt = bsub.add_parser(
        "dmt", help="DMT vs hybrid-parallel baseline on an emulated 2-tier network"
    )
    p_dmt.add_argument("--out", default="runs/bench_dmt")
    p_dmt.add_argument("--hosts", type=int, default=2)
    p_dmt.add_argument("--ranks-per-host", type=int, default=2)
    p_dmt.add_argument(
        "--link",
        default="netns",
        choices=["netns", "delay", "none"],
        help="netns: shaped namespaces (root); delay: alpha-beta slept on loopback; none",
    )
    p_dmt.add_argument("--cross-mbit", type=float, default=100.0, help="cross-host link Mbit/s")
    p_dmt.add_argument("--ratio", type=float, default=48.0, help="intra/cross bandwidth ratio")
    p_dmt.add_argument(
        "--queue-ms", type=float, default=100.0, help="link queue depth (tbf latency), ms"
    )
    p_dmt.add_argument(
        "--cross-latency-ms",
        type=float,
        default=0.0,
        help="per-message cross-host latency (alpha), slept before each collective",
    )
    p_dmt.add_argument(
        "--intra-latency-ms", type=float, default=0.0, help="per-message intra-host latency"
    )
    p_dmt.add_argument("--batch-size", type=int, default=256, help="per rank")
    p_dmt.add_argument("--num-sparse", type=int, default=32)
    p_dmt.add_argument("--towers", type=int, default=4)
    p_dmt.add_argument("--crs", type=_ints, default=[1, 2, 4, 8])
    p_dmt.add_argument("--warmup", type=int, default=3)
    p_dmt.add_argument("--steps", type=int, default=10)
    p_bp = bsub.add_parser(
        "partition", help="learned vs sequential vs random towers: DMT AUC over seeds"
    )
    p_bp.add_argument("--out", default="runs/bench_partition")
    p_bp.add_argument("--seeds", type=int, default=5)
    p_bp.add_argument("--num-train", type=int, default=100_000)
    p_bp.add_argument("--epochs", type=int, default=2)
    p_bp.add_argument("--measures", action="store_true", help="instead: ARI of each S measure")
    p_sc = bsub.add_parser("scaling", help="Wukong vs DLRM vs DCNv2: AUC vs GFLOP/example")
    p_sc.add_argument("--out", default="runs/bench_scaling")
    p_sc.add_argument("--scales", type=_ints, default=[1, 2, 4])
    p_sc.add_argument("--seeds", type=int, default=3)
    p_sc.add_argument("--num-train", type=int, default=300_000)
    p_sc.add_argument("--epochs", type=int, default=1)
    p_sc.add_argument("--triple-share", type=float, default=0.7)
    p_sc.add_argument("--triple-form", default="anova", help="anova | pairprod")
    p_sc.add_argument("--num-sparse", type=int, default=48)
    p_sc.add_argument("--num-groups", type=int, default=6)
    p_sim = sub.add_parser(
        "simulate", help="alpha-beta projection of DMT vs baseline to 16-512 GPUs"
    )
    p_sim.add_argument("--out", default="runs/simulate")
    p_sim.add_argument("--hardware", type=_names, default=["v100", "a100", "h100"])
    p_sim.add_argument("--gpus", type=_ints, default=[16, 32, 64, 128, 256, 512])
    p_sim.add_argument("--crs", type=_ints, default=[1, 2, 4])
    p_sim.add_argument("--num-sparse", type=int, default=256)
    p_sim.add_argument("--embedding-dim", type=int, default=128)
    p_sim.add_argument("--pooling", type=float, default=10.0, help="ids per feature per example")
    p_sim.add_argument("--batch-size", type=int, default=1024, help="per GPU")
    p_sim.add_argument("--alpha-cross-us", type=float, default=None, help="per-message latency")
    p_sim.add_argument("--alpha-intra-us", type=float, default=None)
    p_sim.add_argument(
        "--calibrate",
        nargs="+",
        metavar="BENCH_JSON",
        help="UNSHAPED.json (bench dmt --link none) FIT.json [HELD_OUT.json ...]",
    )
    try:
        if argv and argv[0] == "train":
            args = _apply_yaml(p_train, argv[1:])
            args.command = "train"
        else:
            args = parser.parse_args(argv)
        from dmtrec.parallel.launch import quiet_libraries

        quiet_libraries()
        if args.command == "train":
            return cmd_train(args)
        if args.command == "partition":
            return cmd_partition(args)
        if args.command == "demo":
            from dmtrec.demo import run_demo

            return run_demo(args.out)
        if args.command == "simulate":
            from dmtrec.bench.simulate import Workload, run_simulate

            for opt in ("num_sparse", "embedding_dim", "batch_size"):
                if getattr(args, opt) < 1:
                    raise ConfigError(f"--{opt.replace('_', '-')} must be >= 1")
            if args.pooling <= 0:
                raise ConfigError("--pooling must be > 0")
            if not args.crs or min(args.crs) < 1:
                raise ConfigError(f"--crs must be integers >= 1, got {args.crs}")
            run_simulate(
                args.out,
                hardware=args.hardware,
                gpus=args.gpus,
                crs=args.crs,
                workload=Workload(
                    num_sparse=args.num_sparse,
                    embedding_dim=args.embedding_dim,
                    pooling=args.pooling,
                    batch_per_gpu=args.batch_size,
                ),
                calibration=args.calibrate,
                alpha_cross_us=args.alpha_cross_us,
                alpha_intra_us=args.alpha_intra_us,
            )
            print(f"wrote {Path(args.out) / 'simulate.json'}")
            return 0
        if args.command == "bench" and args.bench == "flat":
            from dmtrec.bench.flat import bench_flat
            from dmtrec.parallel.launch import run_single

            r = run_single(
                bench_flat,
                (args.out,),
                dict(batch_size=args.batch_size, steps=args.steps, table_size=args.table_size),
            )
            print(json.dumps({k: r[k] for k in r if k != "config"}, indent=1))
            return 0
        if args.command == "bench" and args.bench == "scaling":
            from dmtrec.bench.scaling import bench_scaling

            bench_scaling(
                args.out,
                scales=tuple(args.scales),
                seeds=args.seeds,
                num_train=args.num_train,
                epochs=args.epochs,
                triple_share=args.triple_share,
                triple_form=args.triple_form,
                num_sparse=args.num_sparse,
                num_groups=args.num_groups,
            )
            print(f"wrote {Path(args.out) / 'bench_scaling.json'}")
            return 0
        if args.command == "bench" and args.bench == "partition":
            from dmtrec.bench.partition import bench_measures, bench_partition

            if args.measures:
                bench_measures(args.out, seeds=args.seeds)
                print(f"wrote {Path(args.out) / 'bench_measures.json'}")
                return 0
            bench_partition(
                args.out, seeds=args.seeds, num_train=args.num_train, epochs=args.epochs
            )
            print(f"wrote {Path(args.out) / 'bench_partition.json'}")
            return 0
        if args.command == "bench" and args.bench == "dmt":
            from dmtrec.bench.dmt import bench_dmt

            bench_dmt(
                args.out,
                hosts=args.hosts,
                ranks_per_host=args.ranks_per_host,
                link=args.link,
                cross_mbit=args.cross_mbit,
                ratio=args.ratio,
                queue_ms=args.queue_ms,
                cross_latency_ms=args.cross_latency_ms,
                intra_latency_ms=args.intra_latency_ms,
                batch_size=args.batch_size,
                num_sparse=args.num_sparse,
                towers=args.towers,
                crs=tuple(args.crs),
                warmup=args.warmup,
                steps=args.steps,
            )
            print(f"wrote {Path(args.out) / 'bench.json'}")
            return 0
    except DmtrecError as e:
        print(f"dmtrec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dmtrec: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - never a bare traceback to a user
        if os.environ.get("DMTREC_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(
            f"dmtrec: internal error: {type(e).__name__}: {msg} (DMTREC_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
