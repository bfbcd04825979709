"""The training loop, one code path for every parallel mode (``parallel/build.py`` builds the
model, ``train/step.py`` runs each step).

``--batch-size`` is per rank (TorchRec's convention): a step consumes ``batch_size *
world_size`` examples. Validation runs every epoch (and every ``eval_every`` steps); with
``early_stop_patience`` the run stops once the monitored metric has not improved for that many
evaluations, and the best state is restored before the test evaluation, so reported test
metrics are those of the best validation point, never of an overfit last epoch. Checkpoints
(``train/checkpoint.py``: sharded, on ``torch.distributed.checkpoint``) hold model, optimizer
state, the best state, RNG states and the data position, so ``resume`` continues bit-exactly on
the same topology and reshards the tables onto another one.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec.optim.keyed import KeyedOptimizerWrapper

from dmtrec.data import DataConfig, load_data
from dmtrec.errors import ConfigError, DataError
from dmtrec.models import ModelConfig
from dmtrec.observe.comm import CommCounter
from dmtrec.options import option
from dmtrec.parallel.build import PARALLEL, Built, build, resolve_towers
from dmtrec.parallel.launch import synchronize
from dmtrec.parallel.sharding import COMM_PRECISIONS, SHARDING_TYPES, SPARSE_OPTIMIZERS
from dmtrec.train import checkpoint
from dmtrec.train.checks import LabelCheck, no_training_rows, report_skipped
from dmtrec.train.metrics import quality
from dmtrec.train.step import PIPELINES, Stepper, train_step

MONITORS = ("auc", "logloss")


@dataclass
class TrainConfig:
    """Optimization, schedule, parallelism and output options."""

    # Defaults chosen on real data (benchmarks/REPORT.md, "Defaults"): train until validation
    # stops improving, evaluate the best point.
    epochs: int = option(20, "most passes over the training data", minimum=1)
    batch_size: int = option(
        256, "examples per step per rank (global batch = this x ranks)", minimum=1
    )
    lr: float = option(1e-3, "dense optimizer learning rate", minimum=0)
    sparse_lr: float = option(0.05, "embedding (fused optimizer) learning rate", minimum=0)
    dense_optimizer: str = option(
        "adam", "optimizer of the dense parameters", choices=("adam", "adamw", "sgd")
    )
    sparse_optimizer: str = option(
        "rowwise_adagrad",
        "optimizer fused into the embedding backward (adam/rowwise_adam: CUDA only, fbgemm's "
        "CPU kernels have rowwise_adagrad and sgd)",
        choices=SPARSE_OPTIMIZERS,
    )
    weight_decay: float = option(
        0.0, "dense parameters' weight decay (adam/sgd: L2 in the gradient; adamw: decoupled)",
        minimum=0,
    )  # fmt: skip
    lr_warmup_steps: int = option(0, "linear learning-rate warm-up over N steps", minimum=0)
    lr_decay: str = option(
        "none", "learning-rate decay after the warm-up", choices=("none", "cosine", "linear")
    )
    lr_decay_steps: int = option(0, "steps the decay takes to reach 0 (with --lr-decay)", minimum=0)
    eval_batch_size: int = option(2048, "examples per evaluation batch per rank", minimum=1)
    eval_every: int = option(0, "also evaluate valid every N steps (0: once per epoch)", minimum=0)
    monitor: str = option(
        "auc", "validation metric for best state / early stopping", choices=MONITORS
    )
    early_stop_patience: int = option(
        2, "stop after N evaluations without improvement (0: never stop early)", minimum=0
    )
    seed: int = option(0, "seed of the initialisation and the data order (and synthetic data)")
    max_steps: int = option(0, "stop after N steps (0: no limit)", minimum=0)
    checkpoint_every: int = option(
        0, "write a checkpoint every N steps (0: only at the end)", minimum=0
    )
    resume: bool = option(False, "continue from the checkpoint in --out")
    keep_checkpoints: int = option(
        2, "complete checkpoints kept in OUT/checkpoints (the newest ones)", minimum=1
    )
    max_restarts: int = option(
        0,
        "restart all ranks from the last complete checkpoint up to N times when a rank dies "
        "(local launcher; under torchrun use its own --max-restarts)",
        minimum=0,
    )
    timeout: float = option(
        300.0, "seconds a collective waits for its peers before the run fails", minimum=1
    )
    out: str = option("runs/train", "output directory (metrics.json, checkpoints, tb/)")
    log_every: int = option(50, "TensorBoard loss every N steps (0: no TensorBoard)", minimum=0)
    threads: int = option(0, "intra-op threads per process (0: cores / processes)", minimum=0)
    count_comm: bool = option(False, "count bytes per collective and link (bench-style accounting)")
    comm_precision: str = option(
        "fp32",
        "precision of pooled-embedding communication, forward and backward (TorchRec qcomm "
        "codecs; ids stay exact; bf16 falls back to fp16 on gloo, recorded in metrics.json)",
        choices=COMM_PRECISIONS,
    )
    parallel: str = option(
        "none", "none | baseline (TorchRec hybrid) | dmt (SPTT)", choices=PARALLEL
    )
    pipeline: str = option(
        "sparse-dist",
        "train pipeline: sparse-dist (TorchRec's TrainPipelineSparseDist: the next batch's id "
        "exchange overlaps this one's compute) | none (one step after the other)",
        choices=PIPELINES,
    )
    hosts: int = option(
        1, "hosts H (emulated locally; under torchrun from the environment)", minimum=1
    )
    ranks_per_host: int = option(1, "ranks per host L", minimum=1)
    sharding: str = option(
        "table_wise", "table sharding (dmt: inside each host)", choices=tuple(SHARDING_TYPES)
    )
    progress: bool = option(True, "progress bar (shown only when stderr is a terminal)")

    def validate(self) -> None:
        """Checks that need more than one field (single fields are checked by the CLI)."""
        for name in ("lr", "sparse_lr"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a finite number > 0, got {v}"
                )
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ConfigError(
                f"--timeout must be a finite number of seconds > 0, got {self.timeout}"
            )
        for name in ("epochs", "batch_size", "eval_batch_size", "hosts", "ranks_per_host"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.parallel not in PARALLEL:
            raise ConfigError(
                f"--parallel: unknown {self.parallel!r}; choose from {', '.join(PARALLEL)}"
            )
        if self.monitor not in MONITORS:
            raise ConfigError(f"--monitor: unknown {self.monitor!r}; choose from auc, logloss")
        if self.early_stop_patience < 0:
            raise ConfigError("--early-stop-patience must be >= 0")
        if self.lr_decay != "none" and self.lr_decay_steps < 1:
            raise ConfigError(f"--lr-decay {self.lr_decay} needs --lr-decay-steps >= 1")
        if self.parallel == "none" and self.hosts * self.ranks_per_host != 1:
            raise ConfigError("--hosts/--ranks-per-host need --parallel baseline or dmt")


def lr_factor(step: int, tcfg: TrainConfig) -> float:
    """Learning-rate multiplier of step ``step`` (0-based): linear warm-up, then decay."""
    f = min(1.0, (step + 1) / tcfg.lr_warmup_steps) if tcfg.lr_warmup_steps else 1.0
    if tcfg.lr_decay != "none":
        t = min(1.0, max(0.0, (step - tcfg.lr_warmup_steps) / tcfg.lr_decay_steps))
        f *= 0.5 * (1 + math.cos(math.pi * t)) if tcfg.lr_decay == "cosine" else 1.0 - t
    return f


class EarlyStopping:
    """Tracks the best value of a monitored metric and when to stop.

    ``update`` returns True when the value is a new best (strictly better); after
    ``patience`` consecutive non-improving updates ``should_stop`` is True (never with 0).
    """

    def __init__(self, monitor: str, patience: int) -> None:
        self.sign = 1.0 if monitor == "auc" else -1.0  # auc: higher is better; logloss: lower
        self.patience = patience
        self.best: float | None = None
        self.bad = 0

    def update(self, value: float) -> bool:
        if not math.isfinite(value):
            improved = False
        else:
            improved = self.best is None or self.sign * (value - self.best) > 0
        if improved:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience


def local_batches(
    data, split: str, global_batch: int, rank: int, world: int, epoch: int = 0, start_step: int = 0
):
    """This rank's slice of each global batch of ``split`` from global batch ``start_step`` on:
    the source parses only these rows, and the global batches are the same whatever the world
    size (a function of the data and the seed; train is reshuffled every epoch)."""
    return data.batches(
        split, global_batch, epoch=epoch, rank=rank, world_size=world, start_step=start_step
    )


def set_threads(tcfg: TrainConfig, processes: int) -> int:
    """Intra-op threads of this process: ``--threads``, else cores / processes (>= 1).

    More threads than cores per process (e.g. torch's default on a loaded box) ran 10-40x
    slower here with identical numbers, spending half the time in the kernel.
    """
    n = tcfg.threads or max(1, (os.cpu_count() or 1) // max(processes, 1))
    torch.set_num_threads(n)
    return n


def train_worker(dcfg: DataConfig, mcfg: ModelConfig, tcfg: TrainConfig) -> dict[str, Any]:
    """Train and evaluate on this rank (inside a process group); rank 0 returns the metrics."""
    tcfg.validate()
    rank, world = dist.get_rank(), dist.get_world_size()
    threads = set_threads(tcfg, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    data = load_data(dcfg, seed=tcfg.seed)
    if not {"valid", "test"} & set(data.splits):
        raise ConfigError("no --valid or --test data to evaluate on")
    resolve_towers(mcfg, data.spec, tcfg.seed)
    resume_from = _resume_point(tcfg, mcfg, data.spec, rank)
    built = build(data.spec, mcfg, tcfg, count_comm=tcfg.count_comm)
    counter = CommCounter(built.topology, rank) if tcfg.count_comm else None
    what = f"--train {','.join(dcfg.train)}" if dcfg.train else f"{dcfg.kind} train split"
    config = checkpoint.config_doc(dcfg, mcfg, tcfg, data.spec)
    loop = _Loop(data, built, counter, tcfg, rank, world, what)
    loop.keys, loop.config = checkpoint.reference_keys(mcfg, data.spec), config
    loop.resume_from = resume_from
    if counter is not None:
        with counter.install():
            result = loop.run()
            comm = counter.totals(result.pop("steps_timed"))
    else:
        result = loop.run()
        result.pop("steps_timed")
        comm = None
    skipped = report_skipped(loop.read_stats(), tcfg.out, rank)
    from dmtrec.train.artifact import save_model

    save_model(tcfg.out, built.model, mcfg, dcfg, data, asdict(tcfg))  # the best state
    if rank != 0:
        return {}
    topo = built.topology
    result.update(
        model=mcfg.model,
        parallel=tcfg.parallel,
        hosts=topo.hosts,
        ranks_per_host=topo.ranks_per_host,
        threads=threads,
        towers=mcfg.towers,
        tm=mcfg.tm if mcfg.towers else None,
        cr=mcfg.cr if mcfg.towers else None,
        sharding=tcfg.sharding if tcfg.parallel != "dmt" else f"intra-host {tcfg.sharding}",
        comm_precision=tcfg.comm_precision,
        comm_precision_effective=built.comm_precision_effective,
        skipped_rows=sum(skipped.values()),
        skipped_by_split=skipped,
        config={"model": asdict(mcfg), "train": asdict(tcfg)},
        resumed_from_step=loop.resumed_step,
        first_step_time=loop.first_step_time,
    )
    if comm is not None:
        result["comm"] = comm
    if hasattr(data, "oracle_auc"):
        result["oracle_auc"] = data.oracle_auc(result["eval_split"])
    return result


def _resume_point(tcfg: TrainConfig, mcfg: ModelConfig, spec, rank: int):
    """The checkpoint this run continues from: ``--resume``'s (the newest complete one, checked
    against this run's options), or on a restart after a lost rank the newest if any. A fresh
    run removes an earlier run's checkpoints from ``--out``. Collective (a barrier)."""
    attempt = checkpoint.restart_attempt()
    path = checkpoint.latest(tcfg.out) if (tcfg.resume or attempt) else None
    if tcfg.resume and path is None:
        raise ConfigError(f"--resume: no complete checkpoint in {checkpoint.root(tcfg.out)}")
    if path is not None:
        checkpoint.check_compatible(path, checkpoint.read_state(path), mcfg, tcfg, spec)
    elif rank == 0:
        checkpoint.clear(tcfg.out)
    if dist.get_world_size() > 1:
        dist.barrier()
    return path


class _Loop:
    """Epochs of steps with periodic validation, early stopping, checkpoints and progress."""

    def __init__(
        self,
        data,
        built: Built,
        counter: CommCounter | None,
        tcfg: TrainConfig,
        rank: int,
        world: int,
        what: str = "the train split",
    ) -> None:
        self.data, self.built, self.counter, self.tcfg = data, built, counter, tcfg
        self.what = what  # names the training data in errors
        self.train_stats = None  # DataStats of the first complete pass over train
        self.rank, self.world = rank, world
        self.model, self.optimizer, self.device = built.model, built.optimizer, built.device
        self.state: dict[str, Any] = {
            "epoch": 0, "step_in_epoch": 0, "step": 0, "losses": [], "history": [],
            "best": None, "best_epoch": None, "best_step": None, "bad_evals": 0,
            "global_losses": [],
        }  # fmt: skip
        self.stopper = EarlyStopping(tcfg.monitor, tcfg.early_stop_patience)
        self.best_state: dict[str, Any] | None = None
        self.writer = None
        self.has_valid = "valid" in data.splits
        self.keys: list[str] = []  # reference-model keys (set by train_worker)
        self.config: dict[str, Any] = {}  # the run's configs, written into each checkpoint
        self.resume_from: Path | None = None
        self.resumed_step: int | None = None
        self.first_step_time: float | None = None  # wall clock of the first step's end
        self.saved_step: int | None = None
        self.unreduced: list[tuple[float, int]] = []  # (local loss, rows) since the last gather
        self.stepper = Stepper(
            self.model, self.optimizer, self.device, tcfg.pipeline, observer=counter
        )

    # -- checkpoints ------------------------------------------------------------------------
    def _resume_position(self, path: Path) -> None:
        """Continue from checkpoint ``path``'s data position, history and early stopping."""
        self.state.update(checkpoint.read_state(path)["loop"])
        self.stopper.best, self.stopper.bad = self.state["best"], self.state["bad_evals"]
        self.resumed_step = self.saved_step = self.state["step"]

    def _resume_tensors(self, path: Path, batch=None) -> None:
        """Load checkpoint ``path``'s tensors in place (resharding to this run's layout).

        With ``batch`` (the first one to train on), throw-away training steps run first, as
        many as the uninterrupted run had run when DDP rebuilt its gradient buckets (after the
        first step; with ``static_graph``, as TorchRec's DMP wraps, after the second): a
        4-rank all-reduce sums in an order that depends on the bucket layout, and without
        them the first resumed step differs in the last bit. They also create the
        optimizers' lazy state. Everything they changed -- parameters, optimizer state, RNG
        -- is then overwritten by the checkpoint."""
        if batch is not None:
            for _ in range(min(2, self.state["step"])):
                train_step(self.model, self.optimizer, batch)
        for _, opt in self.optimizer.optimizers:
            if isinstance(opt, KeyedOptimizerWrapper):
                opt.init_state()  # Adam's state is lazy; loading fills it in place
        for p in self.model.parameters():  # a dropped gradient, not a stale one
            p.grad = None
        has_best = checkpoint.read_state(path)["has_best"]
        best = checkpoint.clone_state(self.model, self.keys) if has_best else None
        checkpoint.load(path, self.model, self.optimizer, self.keys, best)
        self.best_state = best
        if self.counter is not None:
            self.counter.reset()  # the throw-away step is no training step

    def _gather_losses(self) -> None:
        """Extend ``global_losses`` -- each step's mean loss over its whole global batch, the
        same number whatever the topology (``losses`` are rank 0's own rows) -- with the steps
        since the last gather: one ``all_gather_object`` per checkpoint, none per step.
        Collective."""
        mine, self.unreduced = self.unreduced, []
        if self.world == 1:
            self.state["global_losses"].extend(v for v, _ in mine)
            return
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, mine)
        for step in zip(*parts, strict=True):
            rows = sum(n for _, n in step)
            self.state["global_losses"].append(math.fsum(v * n for v, n in step) / rows)

    def _save(self) -> None:
        """Checkpoint the current step (collective; once per step)."""
        st = self.state
        self._gather_losses()
        if self.saved_step == st["step"]:
            return
        loop = {
            **st, "losses": list(st["losses"]), "history": list(st["history"]),
            "global_losses": list(st["global_losses"]),
        }  # fmt: skip
        checkpoint.save(
            self.tcfg.out, st["step"], self.model, self.optimizer, self.keys, self.best_state,
            {"loop": loop, "config": self.config}, self.tcfg.keep_checkpoints,
        )  # fmt: skip
        self.saved_step = st["step"]

    def read_stats(self) -> dict:
        """Per split, this rank's reading counters (train: its first complete pass)."""
        stats = dict(self.data.stats)
        if self.train_stats is not None:
            stats["train"] = self.train_stats
        return stats

    # -- the schedule -----------------------------------------------------------------------
    def _set_lr(self, step: int, base_lrs: list[float]) -> None:
        """Learning rates of step ``step`` (0-based) in the dense and fused groups (TBE reads
        its lr at each step), under a warm-up or decay schedule."""
        tcfg = self.tcfg
        if tcfg.lr_warmup_steps or tcfg.lr_decay != "none":
            f = lr_factor(step, tcfg)
            for group, base in zip(self.optimizer.param_groups, base_lrs):
                group["lr"] = base * f

    def _segment_steps(self) -> int | None:
        """Steps from now to the next mid-epoch stop: an evaluation every ``eval_every`` steps
        or ``max_steps``; None: none before the epoch's end."""
        tcfg, step = self.tcfg, self.state["step"]
        ends = []
        if self.has_valid and tcfg.eval_every:
            ends.append(tcfg.eval_every - step % tcfg.eval_every)
        if tcfg.max_steps:
            ends.append(max(0, tcfg.max_steps - step))
        return min(ends) if ends else None

    # -- evaluation -------------------------------------------------------------------------
    def _validate(self, epoch: int) -> None:
        """Evaluate valid, log one line, remember the best state (in memory)."""
        self.stepper.detach()  # the model's own forward (the pipeline is drained here)
        m = evaluate(self.data, self.model, "valid", self.tcfg.eval_batch_size, self.rank,
                     self.world, self.device)  # fmt: skip
        st = self.state
        improved = self.stopper.update(m[self.tcfg.monitor])
        st["bad_evals"] = self.stopper.bad
        st["history"].append({"epoch": epoch, "step": st["step"], **m, "best": improved})
        if improved:
            st["best"], st["best_epoch"], st["best_step"] = self.stopper.best, epoch, st["step"]
            self.best_state = checkpoint.clone_state(self.model, self.keys)
        if self.rank == 0:
            mark = " *" if improved else ""
            print(
                f"[eval] epoch {epoch} step {st['step']}: valid auc={m['auc']:.4f} "
                f"logloss={m['logloss']:.4f} ne={m['ne']:.4f}{mark}",
                flush=True,
            )
            if self.writer is not None:
                for k in ("auc", "logloss", "ne"):
                    self.writer.add_scalar(f"valid/{k}", m[k], st["step"])

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        tcfg, st = self.tcfg, self.state
        pending = self.resume_from  # its tensors are loaded at the first batch
        if pending is not None:
            self._resume_position(pending)
        if self.rank == 0 and tcfg.log_every:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(tcfg.out) / "tb"))
        bar = None
        if self.rank == 0 and tcfg.progress:
            from tqdm import tqdm

            bar = tqdm(desc="train", unit="step", initial=st["step"], leave=False)
        if self.counter is not None:
            self.counter.reset()
        steps_timed, examples, train_s = 0, 0, 0.0
        global_bs = tcfg.batch_size * self.world
        stop = False
        base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        labels = LabelCheck(self.device, self.what) if st["step"] == 0 else None
        for epoch in range(st["epoch"], tcfg.epochs):
            start = st["step_in_epoch"]  # > 0: a resumed epoch
            batches = iter(
                local_batches(
                    self.data, "train", global_bs, self.rank, self.world, epoch, start_step=start
                )
            )
            if pending is not None:  # the checkpoint's tensors, loaded at the first batch
                first = next(batches, None)
                if first is not None:
                    self._resume_tensors(pending, first.to(self.device))
                    pending = None
                    batches = itertools.chain([first], batches)
            i = start
            # Segments of steps up to the next point where the loop leaves the pipeline (a
            # mid-epoch evaluation, --max-steps, the epoch's end): the stepper gets exactly
            # those batches, so nothing is in flight there and the data position is the
            # number of batches trained, whatever the pipeline has read ahead meanwhile.
            while not stop:
                n = self._segment_steps()
                if n == 0:
                    stop = True
                    break
                trained = 0
                self._set_lr(st["step"], base_lrs)
                t0 = time.perf_counter()
                segment = batches if n is None else itertools.islice(batches, n)
                for loss, _, batch in self.stepper.steps(segment):
                    value = float(loss)  # also waits for the device
                    synchronize(self.device)
                    train_s += time.perf_counter() - t0
                    steps_timed += 1
                    examples += int(batch.labels.numel()) * self.world
                    st["step"] += 1
                    i += 1
                    st["step_in_epoch"] = i
                    st["losses"].append(value)
                    self.unreduced.append((value, int(batch.labels.numel())))
                    if self.first_step_time is None:
                        self.first_step_time = time.time()
                    checkpoint.fault_point("step", st["step"], self.rank)
                    if not math.isfinite(value):
                        raise DataError(
                            f"step {st['step']}: training loss is {value} (diverged); lower --lr "
                            f"({tcfg.lr:g}) or --sparse-lr ({tcfg.sparse_lr:g})"
                        )
                    if labels is not None and not labels.done:
                        labels.add(batch.labels)
                        if labels.due(st["step"] * global_bs):
                            labels.check(whole_split=False)
                    if self.writer is not None and st["step"] % tcfg.log_every == 0:
                        self.writer.add_scalar("train/loss", value, st["step"])
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{value:.4f}")
                    if tcfg.checkpoint_every and st["step"] % tcfg.checkpoint_every == 0:
                        self._save()
                    if self.has_valid and tcfg.eval_every and st["step"] % tcfg.eval_every == 0:
                        self._validate(epoch)
                        stop = self.stopper.should_stop
                    trained += 1
                    if stop or (tcfg.max_steps and st["step"] >= tcfg.max_steps):
                        stop = True
                        break
                    self._set_lr(st["step"], base_lrs)
                    t0 = time.perf_counter()
                if n is None or trained < n:
                    break  # the epoch's end
            if not stop and self.train_stats is None:
                self.train_stats = self.data.stats.get("train")
            if st["step"] == 0:  # a whole epoch without one step: nothing will ever train
                report_skipped(self.read_stats(), tcfg.out, self.rank, emit=False)
                raise no_training_rows(
                    self.data.stats.get("train"),
                    self.what,
                    tcfg.out,
                    global_bs,
                    self.world,
                    self.device,
                )
            if labels is not None:
                labels.check(whole_split=not stop)
            if not stop:
                st["epoch"], st["step_in_epoch"] = epoch + 1, 0
                if self.has_valid and not tcfg.eval_every:
                    self._validate(epoch)
                    stop = self.stopper.should_stop
            if stop:
                break
        if pending is not None:  # resumed at the end of training: nothing left to train
            self._resume_tensors(pending)
        self.stepper.detach()
        if bar is not None:
            bar.close()
        self._save()  # where training stopped
        if self.counter is not None:
            self.counter.enabled = False  # per-step accounting covers training steps only
        if self.best_state is not None:  # evaluate the best validation point, not the last step
            checkpoint.copy_into(self.model, self.keys, self.best_state)
        split = "test" if "test" in self.data.splits else "valid"
        if split not in self.data.splits:
            raise ConfigError("no --valid or --test data to evaluate on")
        metrics = evaluate(
            self.data, self.model, split, tcfg.eval_batch_size, self.rank, self.world, self.device
        )
        if self.writer is not None:
            for k in ("auc", "logloss", "ne"):
                self.writer.add_scalar(f"{split}/{k}", metrics[k], st["step"])
            self.writer.close()
        out = {
            **metrics,
            "eval_split": split,
            "examples_per_s": examples / train_s if train_s else 0.0,
            "train_examples": examples,
            "steps": st["step"],
            "steps_timed": steps_timed,
            "losses": st["losses"],
            "global_losses": st["global_losses"],
            "history": st["history"],
            "best_epoch": st["best_epoch"],
            "best_step": st["best_step"],
        }
        if st["history"] and st["best_step"] is not None:
            best = next(h for h in st["history"] if h["step"] == st["best_step"] and h["best"])
            out["valid"] = {k: best[k] for k in ("auc", "logloss", "ne")}
        return out


@torch.no_grad()
def evaluate(
    data, model, split: str, batch_size: int, rank: int, world: int, device: torch.device
) -> dict[str, float]:
    """Quality on ``split``; every rank scores its slice, metrics over all of them."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in local_batches(data, split, batch_size * world, rank, world):
        batch = batch.to(device)
        logits.append(model(batch.dense_features, batch.sparse_features).float())
        labels.append(batch.labels)
    model.train(was_training)
    lg = torch.cat(logits) if logits else torch.zeros(0, device=device)
    lb = torch.cat(labels) if labels else torch.zeros(0, device=device)
    if world > 1:  # on the rank's device: NCCL gathers only accelerator tensors
        parts_l = [torch.empty_like(lg) for _ in range(world)]
        parts_y = [torch.empty_like(lb) for _ in range(world)]
        dist.all_gather(parts_l, lg)
        dist.all_gather(parts_y, lb)
        lg, lb = torch.cat(parts_l), torch.cat(parts_y)
    return {**quality(lg.cpu(), lb.cpu()), "eval_examples": int(lb.numel())}


def write_metrics(out: str, metrics: dict[str, Any]) -> Path:
    """``out/metrics.json`` (rank 0's losses go to ``out/losses.json``, the global batch's to
    ``out/global_losses.json``)."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    for key in ("losses", "global_losses"):
        values = metrics.pop(key, None)
        if values is not None:
            (d / f"{key}.json").write_text(json.dumps(values))
    path = d / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, default=float))
    return path


def progress_enabled() -> bool:
    """A progress bar only on a terminal (log files get the per-evaluation lines instead)."""
    return sys.stderr.isatty()
