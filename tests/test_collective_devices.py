"""Every tensor that enters a collective is on its process group's device.

``DeviceGuard`` is a ``TorchDispatchMode``: it sees each op the dispatcher runs, including the
``c10d`` ops behind ``torch.distributed``'s Python collectives (``all_to_all_single``,
``all_reduce``, ``all_gather``, ``broadcast``, ``reduce_scatter``, their ``_tensor`` / ``_base``
variants, ``*_object`` helpers), the ones DDP's C++ reducer and its parameter broadcast issue,
and the ``_c10d_functional`` ops that TorchRec's functional all-to-all uses. For each one it
records the tensors' devices against the device of the group's backend (gloo: ``cpu``; NCCL:
the current CUDA device). On CPU/gloo this guards today's runs; on a GPU machine the same test
catches a CPU tensor sent into an NCCL group (``make test-gpu``).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dmtrec.data import DataConfig
from dmtrec.models import ModelConfig
from dmtrec.train.trainer import TrainConfig

COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")


def group_device(group: dist.ProcessGroup) -> torch.device:
    """The device a group's tensors must be on: what its backend runs on."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    raise AssertionError(f"unexpected backend {backend!r}")


def _group_of(args: tuple, kwargs: dict) -> dist.ProcessGroup | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.ScriptObject):  # c10d ops take the ProcessGroup boxed
            return dist.ProcessGroup.unbox(a)
        if isinstance(a, str):  # functional collectives take the group's name
            return _resolve_process_group(a)
    return None


class DeviceGuard(TorchDispatchMode):
    """Records ``(op, tensor device, group device)`` for every tensor of every collective;
    ``wrong`` lists those whose device is not the group's."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}
        self.wrong: list[tuple[str, str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in COLLECTIVE_NAMESPACES:
            group = _group_of(args, kwargs)
            if group is not None:  # wait_tensor & co. carry no group
                want = group_device(group)
                name = func.name()
                self.ops[name] = self.ops.get(name, 0) + 1
                for t in tree_leaves((args, kwargs)):
                    if isinstance(t, torch.Tensor) and t.device != want:
                        self.wrong.append((name, str(t.device), str(want)))
        return func(*args, **kwargs)


def guarded_train(dcfg: DataConfig, mcfg: ModelConfig, tcfg: TrainConfig) -> dict[str, Any]:
    """``train_worker`` (training, evaluation, checkpoint, model export) under ``DeviceGuard``
    on this rank; returns the collectives it saw and any tensor on the wrong device."""
    from dmtrec.train.trainer import train_worker

    tcfg = replace(tcfg, out=f"{tcfg.out}/rank{dist.get_rank()}")  # each rank its own scratch
    with DeviceGuard() as guard:
        train_worker(dcfg, mcfg, tcfg)
    return {"ops": guard.ops, "wrong": guard.wrong[:20], "num_wrong": len(guard.wrong)}


def test_guard_flags_a_tensor_off_the_group_device(tmp_path: Path) -> None:
    """In one gloo process: a CPU tensor passes, a tensor on another device (``meta``: the
    one other device every build has) is flagged, for a c10d and for a functional collective."""
    import torch.distributed._functional_collectives as funcol

    from dmtrec.parallel.launch import free_port

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        guard = DeviceGuard()
        with guard:
            dist.all_reduce(torch.ones(3))
            funcol.wait_tensor(funcol.all_to_all_single(torch.ones(3), [3], [3], dist.group.WORLD))
        assert guard.wrong == [] and guard.ops == {
            "c10d::allreduce_": 1,
            "_c10d_functional::all_to_all_single": 1,
        }
        with guard, contextlib.suppress(RuntimeError):  # whether c10d runs it or not
            dist.all_reduce(torch.ones(3, device="meta"))
        with guard, contextlib.suppress(RuntimeError):
            funcol.all_to_all_single(torch.ones(3, device="meta"), [3], [3], dist.group.WORLD)
        assert guard.wrong[0] == ("c10d::allreduce_", "meta", "cpu")
        assert ("_c10d_functional::all_to_all_single", "meta", "cpu") in guard.wrong
    finally:
        dist.destroy_process_group()


DATA = DataConfig(
    synthetic=dict(
        num_sparse=6, num_groups=2, table_size=30, num_train=512, num_valid=128, num_test=128
    )
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallel, model",
    [
        ("baseline", ModelConfig(embedding_dim=8, bottom=[16, 8], top=[16])),
        (
            "dmt",
            ModelConfig(
                embedding_dim=8,
                bottom=[16, 8],
                top=[16],
                num_towers=2,
                partition="planted",
                tm="dlrm",
                cr=2,
            ),
        ),
    ],
)
def test_every_collective_tensor_is_on_the_group_device(
    tmp_path: Path, parallel: str, model: ModelConfig
) -> None:
    """A 2 x 2 run (train 2 epochs with validation, test evaluation, comm counter on):
    the collectives of every kind ran, and none got a tensor off its group's device."""
    from dmtrec.parallel.launch import spawn

    tcfg = TrainConfig(
        parallel=parallel,
        hosts=2,
        ranks_per_host=2,
        batch_size=32,
        epochs=2,
        count_comm=True,
        progress=False,
        log_every=0,
        out=str(tmp_path),
    )
    results = spawn(guarded_train, (DATA, copy.deepcopy(model), tcfg), 4, 2)
    seen: dict[str, int] = {}
    for r in results:
        assert r["num_wrong"] == 0, r["wrong"]
        for op, n in r["ops"].items():
            seen[op] = seen.get(op, 0) + n
    # the guard saw what a run issues: embedding all-to-alls, DDP's gradient all-reduce and
    # initial broadcast, the evaluator's and counter's gathers
    for op in ("alltoall_base_", "allreduce_", "broadcast_", "allgather_"):
        op = f"c10d::{op}"
        assert seen.get(op, 0) > 0, (op, seen)
