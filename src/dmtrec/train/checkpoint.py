"""Sharded training checkpoints on ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory ``OUT/checkpoints/step-<N>/`` holding

- the model: every rank writes only its own shards of the tables (``ShardedTensor`` s) and
  the dense parameters (replicated ones are written once: DCP deduplicates them);
- the optimizer state: the fused TBE optimizer's (row-wise Adagrad's ``momentum1``, sharded
  like its table) and the dense optimizer's (Adam's moments and step);
- the best validation state (the same layout under ``best/``) when there is one;
- every rank's RNG states (CPU, and CUDA where present);
- ``state.json`` (written last, by rank 0): the data position (epoch, step in epoch), the
  loss and validation history, early stopping's counters, the topology and the run's config.

Keys are those of the single-device reference model (``train/artifact.py``'s
``_reference_name``: ``ebc.embedding_bags.t_<feature>.weight``, ``tower_modules.<k>...``,
``head...``) in every parallel mode, so a checkpoint written by DMT on 2x2 loads into DMT on
1x2 or into the single-process model: DCP reads each rank's new shards from whichever saved
shards overlap them (resharding). The single-device keys are also what keeps SPTT's hosts apart
(host 0's ``tms.0`` and host 1's ``tms.0`` are different towers).

Writes are atomic: ranks write into ``.tmp-<N>/``; when DCP's collective save has returned
(its metadata written), rank 0 adds ``state.json`` and renames the directory to ``step-<N>``.
A directory named ``step-*`` with both ``.metadata`` and ``state.json`` is complete; anything
else (a crash mid-write) is ignored and removed by the next save. The newest
``--keep-checkpoints`` complete ones are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Iterable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

from dmtrec.errors import ConfigError
from dmtrec.train.artifact import _reference_name

DIR = "checkpoints"
STATE = "state.json"
FORMAT = "dmtrec-checkpoint/1"
_STEP_DIR = re.compile(r"step-(\d+)")

# Model options that change the parameters (a resume with another value cannot load them);
# dropout and embedding_l2 only change how they are trained.
_FREE_MODEL_OPTIONS = {"dropout", "embedding_l2", "towers", "num_towers", "partition"}
_TRAIN_OPTIONS = ("sparse_optimizer", "dense_optimizer")


# -- where checkpoints are -----------------------------------------------------------------------
def root(out: str) -> Path:
    return Path(out) / DIR


def complete(out: str) -> list[Path]:
    """The complete checkpoints in ``out``, oldest first."""
    d = root(out)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and (p / ".metadata").is_file() and (p / STATE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest(out: str) -> Path | None:
    found = complete(out)
    return found[-1] if found else None


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE).read_text())


def clear(out: str) -> None:
    """Remove an earlier run's checkpoints (a fresh run in a used ``--out``)."""
    shutil.rmtree(root(out), ignore_errors=True)


def restart_attempt() -> int:
    """0 for a run's first start; n after its n-th restart (torchrun's
    ``TORCHELASTIC_RESTART_COUNT``, or the local launcher's ``DMTREC_RESTART_COUNT``)."""
    return int(
        os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get("DMTREC_RESTART_COUNT") or 0
    )


# -- the model and optimizer as reference-named tensors ----------------------------------------
def reference_keys(mcfg: Any, spec: Any) -> list[str]:
    """State-dict keys of the single-device model of ``mcfg`` (towers resolved) on ``spec``
    (built on ``meta``, without drawing from the RNG)."""
    from dmtrec.models import ModelConfig, build_model

    with torch.random.fork_rng(devices=[]):
        ref = build_model(ModelConfig(**asdict(mcfg)), spec, table_device="meta")
    return list(ref.state_dict().keys())


def _tower_of_local(model: torch.nn.Module) -> list[int] | None:
    if hasattr(model, "tower_host"):  # SPTT: which global tower each of this host's TMs is
        return [k for k, h in enumerate(model.tower_host) if h == model.host]
    return None


def reference_key(key: str, towers: list[int] | None) -> str:
    """A wrapped model's state-dict or optimizer key as the single-device model's key."""
    if key.startswith("embedding_bags."):  # SPTT's fused optimizer names its host EBC's tables
        key = "ebc." + key
    return _reference_name(key, towers)


def model_tensors(model: torch.nn.Module, keys: Iterable[str]) -> dict[str, Any]:
    """This rank's model state (tensors, ``ShardedTensor`` s) by reference key, restricted to
    ``keys`` (the reference model's; wrappers' private buffers are left out)."""
    wanted = set(keys)
    towers = _tower_of_local(model)
    out: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        name = reference_key(key, towers)
        if name in wanted:
            if name in out:
                raise RuntimeError(f"two model tensors map to {name}")
            out[name] = value
    return out


def optimizer_tensors(optimizer: Any, model: torch.nn.Module) -> dict[str, Any]:
    """This rank's optimizer state by ``<reference param key>/<state name>``: the live tensors
    (an in-place load fills them)."""
    towers = _tower_of_local(model)
    out: dict[str, Any] = {}
    for key, state in optimizer.state_dict()["state"].items():
        name = reference_key(key, towers)
        for sub, value in state.items():
            if isinstance(value, (torch.Tensor, ShardedTensor)):
                out[f"{name}/{sub}"] = value
    return out


def clone_state(model: torch.nn.Module, keys: Iterable[str]) -> dict[str, Any]:
    """A copy of ``model_tensors`` (the best-validation state): tensors cloned, sharded tables
    as new ``ShardedTensor`` s over cloned local shards with the same global metadata.

    The clones are built on the world group, whose ranks the shard placements name (SPTT's
    host groups number their ranks from 0, and a ``ShardedTensor`` made on them would fail its
    placement checks); no collective ever runs on them, DCP only reads their shards."""
    out: dict[str, Any] = {}
    for name, value in model_tensors(model, keys).items():
        if isinstance(value, ShardedTensor):
            shards = [Shard(s.tensor.detach().clone(), s.metadata) for s in value.local_shards()]
            out[name] = ShardedTensor._init_from_local_shards_and_global_metadata(
                shards, value.metadata(), process_group=dist.group.WORLD
            )
        else:
            out[name] = value.detach().clone()
    return out


@torch.no_grad()
def copy_into(model: torch.nn.Module, keys: Iterable[str], state: dict[str, Any]) -> None:
    """Copy ``clone_state``'s values back into ``model`` in place (same topology)."""
    for name, value in model_tensors(model, keys).items():
        saved = state[name]
        if isinstance(value, ShardedTensor):
            for s, t in zip(value.local_shards(), saved.local_shards(), strict=True):
                s.tensor.copy_(t.tensor)
        else:
            value.copy_(saved)


def _rng_tensors(rank: int) -> dict[str, torch.Tensor]:
    out = {f"rng/cpu/{rank}": torch.get_rng_state()}
    if torch.cuda.is_available():
        out[f"rng/cuda/{rank}"] = torch.cuda.get_rng_state()
    return out


# -- save and load -------------------------------------------------------------------------------
def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save(
    out: str,
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    keys: Iterable[str],
    best: dict[str, Any] | None,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` (collective: every rank calls it) and keep the newest
    ``keep``; ``state`` (JSON) is the loop's position and the run's config."""
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    d = root(out)
    tmp, final = d / f".tmp-{step:09d}", d / f"step-{step:09d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
        tmp.mkdir(parents=True)
    _barrier()
    keys = list(keys)
    items: dict[str, Any] = {f"model/{k}": v for k, v in model_tensors(model, keys).items()}
    items.update({f"optim/{k}": v for k, v in optimizer_tensors(optimizer, model).items()})
    if best is not None:
        items.update({f"best/{k}": v for k, v in best.items()})
    items.update(_rng_tensors(rank))
    dcp.save(items, checkpoint_id=str(tmp))
    fault_point("save", step, rank)
    if rank == 0:
        doc = {
            "format": FORMAT,
            **state,
            "world_size": world,
            "has_best": best is not None,
            "cuda_rng": torch.cuda.is_available(),
        }
        (tmp / STATE).write_text(json.dumps(doc, indent=1, default=float))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(d, keep, final)
    _barrier()
    return final


def _prune(d: Path, keep: int, current: Path) -> None:
    done = complete(str(d.parent))
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in d.iterdir():  # crashed writes and anything else that is not a complete checkpoint
        if (
            p != current
            and p not in done
            and (p.name.startswith(".tmp-") or _STEP_DIR.fullmatch(p.name))
        ):
            shutil.rmtree(p, ignore_errors=True)


def load(
    path: Path,
    model: torch.nn.Module,
    optimizer: Any,
    keys: Iterable[str],
    best: dict[str, Any] | None,
) -> dict[str, Any]:
    """Load checkpoint ``path`` into ``model``, ``optimizer`` (its state must exist: see
    ``KeyedOptimizer.init_state``) and ``best`` (a ``clone_state`` to fill, or None) in
    place, resharding tables to this run's layout; restore this rank's RNG states when the
    checkpoint has them; return ``state.json``. Collective."""
    import torch.distributed.checkpoint as dcp

    meta = read_state(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    keys = list(keys)
    items: dict[str, Any] = {f"model/{k}": v for k, v in model_tensors(model, keys).items()}
    items.update({f"optim/{k}": v for k, v in optimizer_tensors(optimizer, model).items()})
    if best is not None and meta["has_best"]:
        items.update({f"best/{k}": v for k, v in best.items()})
    rng: dict[str, torch.Tensor] = {}
    if rank < meta["world_size"]:
        rng = {f"rng/cpu/{rank}": torch.get_rng_state()}
        if meta["cuda_rng"] and torch.cuda.is_available():
            rng[f"rng/cuda/{rank}"] = torch.cuda.get_rng_state()
        items.update(rng)
    dcp.load(items, checkpoint_id=str(path))
    if f"rng/cpu/{rank}" in rng:
        torch.set_rng_state(items[f"rng/cpu/{rank}"])
    if f"rng/cuda/{rank}" in rng:
        torch.cuda.set_rng_state(items[f"rng/cuda/{rank}"])
    return meta


# -- a resumed run must build the same parameters ------------------------------------------------
def _flag(f) -> str:
    return "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))


def _show(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v)) if v and not isinstance(v[0], list) else json.dumps(v)
    return str(v)


def check_compatible(path: Path, saved: dict[str, Any], mcfg: Any, tcfg: Any, spec: Any) -> None:
    """Raise a one-line ``ConfigError`` naming the first option whose value differs from the
    checkpoint's in a way that changes the parameters or the data position.

    ``saved`` is the checkpoint's ``state.json``; ``mcfg.towers`` must be resolved."""
    from dmtrec.models import ModelConfig
    from dmtrec.train.artifact import spec_dict

    where = f"the checkpoint {path}"

    def differ(flag: str, now: Any, then: Any) -> ConfigError:
        return ConfigError(
            f"--resume: {flag} is {_show(now)} but {where} was written with {_show(then)}; "
            "resume with the same value or train into another --out"
        )

    config = saved["config"]
    for f in fields(ModelConfig):
        if f.name in _FREE_MODEL_OPTIONS:
            continue
        then, now = config["model"].get(f.name), getattr(mcfg, f.name)
        if then != now:
            raise differ(_flag(f), now, then)
    towers_then = config["model"].get("towers")
    if (towers_then or None) != (mcfg.towers or None):
        now = len(mcfg.towers) if mcfg.towers else "none"
        then = len(towers_then) if towers_then else "none"
        if now == then:
            now, then = "a different feature partition", "another"
        raise differ("--towers", now, then)
    spec_then, spec_now = config["spec"], spec_dict(spec)
    for key, flag in (
        ("sparse", "the sparse features"),
        ("dense", "the dense features"),
        ("num_embeddings", "the table sizes (--hash-size, --synthetic-table-size, vocabularies)"),
        ("multi_hot", "--multi-hot"),
    ):
        if spec_then.get(key) != spec_now.get(key):
            raise ConfigError(
                f"--resume: {flag} of this data differ from those {where} was written with; "
                "resume on the same data or train into another --out"
            )
    train = config["train"]
    from dmtrec.train.trainer import TrainConfig

    by_name = {f.name: f for f in fields(TrainConfig)}
    for name in _TRAIN_OPTIONS:
        if train.get(name) != getattr(tcfg, name):
            raise differ(_flag(by_name[name]), getattr(tcfg, name), train.get(name))
    world = tcfg.hosts * tcfg.ranks_per_host
    then_global = train["batch_size"] * saved["world_size"]
    if tcfg.batch_size * world != then_global:
        raise ConfigError(
            f"--resume: the global batch (--batch-size x ranks) is {tcfg.batch_size * world} but "
            f"{where} was written with {then_global}; its data position counts global batches "
            f"(use --batch-size {then_global // world} on {world} rank{'s' if world > 1 else ''})"
            if then_global % world == 0
            else f"--resume: the global batch (--batch-size x ranks) is {tcfg.batch_size * world} "
            f"but {where} was written with {then_global}; its data position counts global batches"
        )


def config_doc(dcfg: Any, mcfg: Any, tcfg: Any, spec: Any) -> dict[str, Any]:
    from dmtrec.train.artifact import spec_dict

    return {
        "model": asdict(mcfg),
        "data": asdict(dcfg),
        "train": asdict(tcfg),
        "spec": spec_dict(spec),
    }


# -- fault injection (tests and ``bench faults``) -----------------------------------------------
def _fault() -> tuple[str, int, int] | None:
    """``DMTREC_FAULT=<where>:<rank>:<step>`` (where: ``step`` after that training step,
    ``save`` inside that step's checkpoint write, before it is complete): that rank SIGKILLs
    itself there -- on the first attempt only (``DMTREC_RESTART_COUNT`` /
    ``TORCHELASTIC_RESTART_COUNT`` 0), so a restarted run gets past the same point."""
    spec = os.environ.get("DMTREC_FAULT")
    if not spec or restart_attempt():
        return None
    where, rank, step = spec.split(":")
    return where, int(rank), int(step)


def fault_point(where: str, step: int, rank: int) -> None:
    """Kill this rank here if ``DMTREC_FAULT`` says so (see ``_fault``)."""
    f = _fault()
    if f is not None and f == (where, rank, step):
        kill_file = os.environ.get("DMTREC_FAULT_LOG")
        if kill_file:  # when and where, for the fault benchmark's restart time
            import time

            Path(kill_file).write_text(
                json.dumps({"where": where, "rank": rank, "step": step, "time": time.time()})
            )
        os.kill(os.getpid(), signal.SIGKILL)
