"""Test harness: one-step equivalence of a distributed model with its single-process reference.

``one_step`` runs forward + backward of one global batch on every rank and returns what a
reference must reproduce: the global logits, the global mean loss, every dense gradient
(DDP-averaged), and every embedding-row gradient. Sparse updates are fused into the backward,
so embedding gradients are read off the table change under SGD: g = (w_before - w_after) / lr.
``reference_step`` does the same in one process on the plain model. Tests assert the two agree;
users can run the same check on their own configuration.

``train_steps`` runs several training steps end to end instead (the trainer's data slicing,
optimizers and ``Stepper``, pipelined or not) and returns each step's global loss and the
final parameters gathered into single-device keys, for comparison with the same run in one
process: multi-step equivalence covers what one step cannot (DDP's bucket rebuild after the
first step, optimizer state, the pipeline's prefetching).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dmtrec.data import DataConfig, load_data, shard_rows
from dmtrec.models import ModelConfig, build_model
from dmtrec.models.common import table_weights
from dmtrec.observe.comm import CommCounter
from dmtrec.parallel.build import build
from dmtrec.parallel.topology import Topology
from dmtrec.train.trainer import TrainConfig

SPARSE_LR = 0.5


@dataclass
class StepSetup:
    """What to build and feed: data, model, mode (``dmt``/``baseline``), topology."""

    data: DataConfig
    model: ModelConfig
    mode: str = "dmt"
    hosts: int = 2
    ranks_per_host: int = 2
    batch_size: int = 8  # per rank
    sharding: str = "table_wise"
    seed: int = 0
    extra: dict = field(default_factory=dict)  # more TrainConfig fields (e.g. comm_precision)
    flat: bool = False  # train_steps: the flat model of the towers' feature order instead


def _strip(name: str) -> str:
    for junk in ("_dmp_wrapped_module.", "module."):
        name = name.replace(junk, "")
    return name


def reference_model(setup: StepSetup) -> tuple[nn.Module, object]:
    """The single-process model every rank (and the reference) starts from, and the data."""
    torch.manual_seed(setup.seed)
    data = load_data(setup.data)
    return build_model(copy.deepcopy(setup.model), data.spec), data


def global_batch(data, setup: StepSetup):
    world = setup.hosts * setup.ranks_per_host
    return next(iter(data.batches("train", setup.batch_size * world)))


def one_step(setup: StepSetup) -> dict:
    """Distributed forward/backward of one global batch (run on every rank)."""
    rank = dist.get_rank()
    topo = Topology(setup.hosts, setup.ranks_per_host)
    model, data = reference_model(setup)
    before = {k: v.clone() for k, v in table_weights(model).items()}
    counter = CommCounter(topo, rank)
    opts = TrainConfig(
        parallel=setup.mode,
        hosts=setup.hosts,
        ranks_per_host=setup.ranks_per_host,
        sharding=setup.sharding,
        sparse_optimizer="sgd",
        sparse_lr=SPARSE_LR,
        seed=setup.seed,
        **setup.extra,
    )
    with counter.install():
        built = build(data.spec, copy.deepcopy(setup.model), opts, reference=model, count_comm=True)
        wrapped = built.model
        batch = next(shard_rows(iter([global_batch(data, setup)]), rank, topo.world_size))
        counter.reset()
        counter.phase = "forward"
        logits = wrapped(batch.dense_features, batch.sparse_features)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        counter.phase = "backward"
        loss.backward()
        comm = counter.totals(1)
    out: dict = {"rank": rank, "comm": comm, "dense_grads": {}, "table_grads": {}}
    gathered = [torch.empty_like(logits) for _ in range(topo.world_size)]
    dist.all_gather(gathered, logits.detach())
    out["logits"] = torch.cat(gathered)
    total = loss.detach().clone()
    dist.all_reduce(total)
    out["loss"] = float(total) / topo.world_size
    if setup.mode == "dmt":
        host_towers = [k for k, h in enumerate(wrapped.tower_host) if h == wrapped.host]
        for name, p in wrapped.named_parameters():
            if p.grad is None:
                continue
            name = _strip(name)
            if name.startswith("host_towers.tms."):
                i, rest = name[len("host_towers.tms.") :].split(".", 1)
                name = f"tower_modules.{host_towers[int(i)]}.{rest}"
            out["dense_grads"][name] = p.grad.clone()
    else:
        for name, p in wrapped.named_parameters():
            if p.grad is not None:
                out["dense_grads"][_strip(name)] = p.grad.clone()
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    for key, value in wrapped.state_dict().items():
        table = ".".join(key.split(".")[-2:])
        if table in before and isinstance(value, ShardedTensor):
            for s in value.local_shards():
                r, c = s.metadata.shard_offsets
                h, w = s.metadata.shard_sizes
                grad = (before[table][r : r + h, c : c + w] - s.tensor) / SPARSE_LR
                out["table_grads"].setdefault(table, []).append(((r, c), grad))
    return out


def reference_step(model: nn.Module, batch) -> dict:
    """Forward/backward of the plain model on the whole global batch (mean loss)."""
    logits = model(batch.dense_features, batch.sparse_features)
    loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"logits": logits.detach(), "loss": float(loss.detach()), "grads": grads}


def assemble_table_grads(results: list[dict], table_shapes: dict[str, torch.Size]) -> dict:
    """Full per-table gradients from every rank's shards."""
    full = {t: torch.zeros(s) for t, s in table_shapes.items()}
    for res in results:
        for table, pieces in res["table_grads"].items():
            for (r, c), g in pieces:
                full[table][r : r + g.shape[0], c : c + g.shape[1]] = g
    return full


TOL = 1e-5
_RUNS: dict[str, list[dict]] = {}
_PLANNED: list[StepSetup] = []


def plan(*setups: StepSetup) -> None:
    """Declare the setups a test module will ask ``run_step`` for: the first ``run_step`` of a
    topology then runs every planned setup of that topology in one set of processes, instead
    of spawning (and importing torch and TorchRec in) a fresh set per setup."""
    _PLANNED.extend(setups)


def one_steps(setups: list[StepSetup]) -> list[dict]:
    """``one_step`` of each setup in turn, in one process group (run on every rank)."""
    out = []
    for setup in setups:
        out.append(one_step(setup))
        dist.barrier()
    return out


def run_step(setup: StepSetup) -> list[dict]:
    """Every rank's ``one_step`` of ``setup`` on its topology (loopback processes), once per
    distinct setup in a test session, run together with the planned setups of the same
    topology (``plan``) that have not run yet."""
    from dmtrec.parallel.launch import spawn

    key = repr(setup)
    if key not in _RUNS:
        topo = (setup.hosts, setup.ranks_per_host)
        batch = {key: setup}
        for s in _PLANNED:
            if (s.hosts, s.ranks_per_host) == topo and repr(s) not in _RUNS:
                batch.setdefault(repr(s), s)
        setups = list(batch.values())
        per_rank = spawn(one_steps, (setups,), topo[0] * topo[1], topo[1])
        for i, s in enumerate(setups):
            _RUNS[repr(s)] = [results[i] for results in per_rank]
    return _RUNS[key]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of two tensors of the same shape."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def check_step(results: list[dict], ref: dict, tol: float = TOL) -> None:
    """A distributed step (``run_step``) equals its reference (``reference_step``): logits,
    loss, every dense gradient (replicas agreeing with each other) and every embedding row's
    gradient, each within ``tol``; every table was touched, so the check means something."""
    r0 = results[0]
    assert max_diff(r0["logits"], ref["logits"]) <= tol
    assert abs(r0["loss"] - ref["loss"]) <= tol
    dense: dict[str, torch.Tensor] = {}
    for res in results:
        for name, g in res["dense_grads"].items():
            if name in dense:
                assert max_diff(dense[name], g) <= tol, name
            dense[name] = g
    expected = {n: g for n, g in ref["grads"].items() if "embedding_bags" not in n}
    assert set(dense) == set(expected), set(dense) ^ set(expected)
    for name, g in expected.items():
        assert max_diff(dense[name], g) <= tol, name
    shapes = {
        n.split(".")[-2] + ".weight": g.shape
        for n, g in ref["grads"].items()
        if "embedding_bags" in n
    }
    tables = assemble_table_grads(results, shapes)
    for n, g in ref["grads"].items():
        if "embedding_bags" in n:
            key = n.split(".")[-2] + ".weight"
            assert max_diff(tables[key], g) <= tol, key
            assert g.abs().sum() > 0


def train_steps(setups: list[StepSetup], steps: int = 3) -> list[dict]:
    """``steps`` training steps of each setup in turn (run on every rank of one process group
    of the setups' topology): per setup, every step's loss over the global batch and, on rank
    0, the final parameters by single-device key (``train.artifact.gather_state``).

    Every setup starts from ``reference_model``'s weights; ``mode`` ``none`` runs one process
    (its ``batch_size`` is then the global batch). ``flat`` trains the flat model with the
    features in tower order (``FlatModel``, same weights), what DMT with identity TMs must
    equal. Optimizers and the pipeline are the trainer's defaults unless ``extra`` says."""
    from itertools import islice

    from dmtrec.models.common import FlatModel
    from dmtrec.train.artifact import gather_state
    from dmtrec.train.step import Stepper
    from dmtrec.train.trainer import local_batches

    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for setup in setups:
        model, data = reference_model(setup)
        if setup.flat:
            features = [f for t in setup.model.towers for f in t]
            model = FlatModel(model.ebc, model.head, features)
        opts = TrainConfig(
            parallel=setup.mode,
            hosts=setup.hosts,
            ranks_per_host=setup.ranks_per_host,
            sharding=setup.sharding,
            seed=setup.seed,
            batch_size=setup.batch_size,
            **setup.extra,
        )
        mcfg = copy.deepcopy(setup.model)
        built = build(data.spec, mcfg, opts, reference=copy.deepcopy(model))
        stepper = Stepper(built.model, built.optimizer, built.device, opts.pipeline)
        batches = local_batches(data, "train", setup.batch_size * world, rank, world)
        losses = []
        for loss, _, _ in stepper.steps(islice(batches, steps)):
            total = loss.clone()
            dist.all_reduce(total)
            losses.append(float(total) / world)
        pipelined = stepper.pipelined
        stepper.detach()
        assert len(losses) == steps, f"only {len(losses)} batches for {steps} steps"
        state = gather_state(built.model, model)
        results.append({"losses": losses, "state": state, "pipelined": pipelined})
    return results


def reference_train(setup: StepSetup, steps: int = 3) -> dict:
    """``train_steps``'s steps in one process on the plain model (``flat``: the flat model of
    the towers' order) over the same global batches: TorchRec's ``RowWiseAdagrad`` on the
    tables' (dense) gradients -- the update fbgemm's fused kernel applies to the rows a batch
    touches, untouched rows get none -- and Adam on the rest, at ``TrainConfig``'s rates.
    Returns each step's loss and the final state dict."""
    from itertools import islice

    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    from dmtrec.models.common import FlatModel

    model, data = reference_model(setup)
    if setup.flat:
        features = [f for t in setup.model.towers for f in t]
        model = FlatModel(model.ebc, model.head, features)
    opts = TrainConfig(**setup.extra)
    assert (opts.sparse_optimizer, opts.dense_optimizer) == ("rowwise_adagrad", "adam")
    params = dict(model.named_parameters())
    tables = [p for n, p in params.items() if ".embedding_bags." in n]
    dense = [p for n, p in params.items() if ".embedding_bags." not in n]
    optimizers = [RowWiseAdagrad(tables, lr=opts.sparse_lr, eps=1e-8)]
    if dense:
        optimizers.append(torch.optim.Adam(dense, lr=opts.lr))
    world = setup.hosts * setup.ranks_per_host
    losses = []
    for batch in islice(data.batches("train", setup.batch_size * world), steps):
        logits = model(batch.dense_features, batch.sparse_features)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
        losses.append(float(loss.detach()))
    assert len(losses) == steps, f"only {len(losses)} batches for {steps} steps"
    return {
        "losses": losses,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }
