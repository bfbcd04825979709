"""Vertical models (students) on the stream, distilling from the DAS store.

A VM reads window ``t``'s rows of its own traffic and features, joined on the key with the
FM predictions the DAS logged for that window (no FM runs here); it is scored on window
``t`` before it trains on it (progressive validation: the first window only trains).

Per batch, in the paper's Algorithm 1 order: with ``kd="aux_sa"``, first one step of the
student adapter ``SA`` on the batch's fresh true labels (``h(SA(y_FM), y)``), then its output
``y_SA = SA(y_FM)`` computed again with no gradient, then one step of the VM on
``exfm_loss`` -- both steps through ``dmtrec.train.step.train_step``.
"""

from __future__ import annotations

import functools
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torchrec.datasets.utils import Batch

from dmtrec.data.base import FeatureSpec
from dmtrec.errors import ConfigError
from dmtrec.exfm._build import dense_optimizer, distribute
from dmtrec.exfm.config import OptimConfig, StudentConfig
from dmtrec.exfm.das import Store
from dmtrec.exfm.stream import Stream, WindowBatches
from dmtrec.models import build_model
from dmtrec.models.exfm import (
    DISTILL_HEADS,
    DistillConfig,
    StudentAdapter,
    TeacherTargets,
    VerticalModel,
    check_kd,
    exfm_loss,
    prob_logit,
    soft_bce,
)
from dmtrec.train.metrics import quality
from dmtrec.train.step import PhaseObserver, train_step


def student_features(stream: Stream, scfg: StudentConfig, who: str) -> tuple[list[str], list[str]]:
    """(dense, sparse) the VM sees, checked against the stream."""
    dense = list(stream.spec.dense if scfg.dense is None else scfg.dense)
    sparse = list(stream.spec.sparse if scfg.sparse is None else scfg.sparse)
    stream.check_features(dense, sparse, who)
    return dense, sparse


def check_start(stream: Stream, start: int) -> None:
    """The VMs start at window ``start`` and need two windows (train one, score the next)."""
    if not 0 <= start <= stream.num_windows - 2:
        raise ConfigError(
            f"--student-start {start}: the VMs need >= 2 of the stream's {stream.num_windows} windows"
        )


def build_vm(
    stream: Stream, scfg: StudentConfig, kd: str, dcfg: DistillConfig, seed: int
) -> VerticalModel:
    """The VM (plain, unsharded) with the heads ``kd`` needs."""
    dense, sparse = student_features(stream, scfg, f"student {scfg.name}")
    sizes = stream.spec.table_sizes
    spec = FeatureSpec(dense=dense, sparse=sparse, num_embeddings=[sizes[f] for f in sparse])
    torch.manual_seed(seed)
    flat = build_model(scfg.model, spec, table_device="meta")
    return VerticalModel(flat, DISTILL_HEADS[kd], beta=dcfg.beta)


def _vm_loss(out, batch: Batch, *, teacher: TeacherTargets | None, kd: str, dcfg: DistillConfig):
    return exfm_loss(out, batch.labels, teacher, kd, dcfg)


def _sa_loss(logits: torch.Tensor, batch: Batch, *, mask: torch.Tensor) -> torch.Tensor:
    return soft_bce(logits, batch.labels, mask)


def adapter_step(
    sa: StudentAdapter,
    sa_opt: torch.optim.Optimizer,
    batch: Batch,
    teacher: TeacherTargets,
    observer: PhaseObserver | None = None,
) -> TeacherTargets:
    """The student adapter's half of an ``aux_sa`` step: one step of ``SA`` on the batch's
    fresh true labels (``h(SA(y_FM), y)`` over the examples with an FM label), then
    ``teacher`` with ``sa_prob = SG(SA(y_FM))`` from the updated adapter. It depends on
    ``y_FM`` and the labels only, so it can also be run without a VM (to measure the
    adapter's own calibration)."""
    fm_logit = prob_logit(teacher.fm_prob).unsqueeze(-1)
    if bool(teacher.mask.any()):
        sa_batch = Batch(
            dense_features=fm_logit, sparse_features=batch.sparse_features, labels=batch.labels
        )
        loss_fn = functools.partial(_sa_loss, mask=teacher.mask)
        train_step(sa, sa_opt, sa_batch, loss_fn=loss_fn, observer=observer)
    with torch.no_grad():  # SG(y_SA): the VM's loss sends nothing into the adapter
        return teacher._replace(sa_prob=torch.sigmoid(sa(fm_logit)))


def student_step(
    vm: torch.nn.Module,
    vm_opt: torch.optim.Optimizer,
    batch: Batch,
    teacher: TeacherTargets | None,
    kd: str,
    dcfg: DistillConfig,
    sa: StudentAdapter | None = None,
    sa_opt: torch.optim.Optimizer | None = None,
    observers: tuple[PhaseObserver | None, PhaseObserver | None] = (None, None),
) -> tuple[torch.Tensor, TeacherTargets | None]:
    """One step of the VM (after one of the student adapter for ``aux_sa``).

    Returns (the VM's loss, the teacher targets it was trained on -- with ``sa_prob`` the
    adapter's post-update output, detached). ``observers`` (SA, VM) see each step's phases.
    """
    if kd == "aux_sa":
        if teacher is None or sa is None or sa_opt is None:
            raise ValueError("kd=aux_sa needs teacher targets, the adapter and its optimizer")
        teacher = adapter_step(sa, sa_opt, batch, teacher, observers[0])
    loss_fn = functools.partial(_vm_loss, teacher=teacher, kd=kd, dcfg=dcfg)
    loss, _ = train_step(vm, vm_opt, batch, loss_fn=loss_fn, observer=observers[1])
    return loss, teacher


@torch.no_grad()
def score(vm: torch.nn.Module, wb: WindowBatches, batch_size: int) -> torch.Tensor:
    """Serving-head logits over every row of ``wb``."""
    was = vm.training
    vm.eval()
    out = [vm(b.dense_features, b.sparse_features).serving.float() for b, _ in wb(batch_size)]
    vm.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def traffic_rows(table: pa.Table, traffic: list[int] | None) -> pa.Table:
    """The VM's traffic: rows whose key % n == k (all rows when ``traffic`` is None)."""
    if traffic is None:
        return table
    k, n = traffic
    keys = table["key"].to_numpy()
    return table.filter(pa.array(keys % n == k))


def train_student(
    stream: Stream,
    store: Store | None,
    scfg: StudentConfig,
    kd: str,
    dcfg: DistillConfig,
    optim: OptimConfig,
    seed: int,
    start: int = 0,
) -> dict[str, Any]:
    """Train one VM variant over windows ``start..`` of the stream; its progressive NE per
    window (window ``start`` only trains). Inside a process group."""
    check_kd(kd)
    check_start(stream, start)
    dcfg.validate()
    if kd != "none" and store is None:
        raise ValueError(f"kd={kd} needs a DAS store")
    dense, sparse = student_features(stream, scfg, f"student {scfg.name}")
    plain = build_vm(stream, scfg, kd, dcfg, seed)
    tables = sum(p.numel() for p in plain.ebc.parameters())
    served = sum(p.numel() for n, p in plain.named_parameters() if not n.startswith("distill."))
    parameters = {"dense": served - tables, "embedding": tables}  # the served model's
    vm, vm_opt = distribute(plain, lr=optim.lr, sparse_lr=optim.sparse_lr, seed=seed)
    sa = sa_opt = None
    if kd == "aux_sa":
        torch.manual_seed(seed)
        sa = StudentAdapter(dcfg.sa_hidden)
        sa_opt = dense_optimizer(sa, dcfg.sa_lr)
    columns = ["key", "label", *dense, *sparse]
    oracle = stream.meta.oracle
    if oracle:
        columns.append("oracle_prob")
    ne, auc, windows, oracle_ne, labeled = [], [], [], [], 0
    all_logits, all_labels = [], []
    for t in range(start, stream.num_windows):
        rows = traffic_rows(stream.window(t, columns), scfg.traffic)
        extra = {}
        if store is not None:
            pred, _, has = store.join(rows, t)
            extra = {"fm_prob": pred, "mask": has}
            labeled += int(has.sum())
        wb = WindowBatches(rows, dense, sparse, extra)
        if t > start:
            logits = score(vm, wb, optim.eval_batch_size)
            labels = torch.from_numpy(wb.labels)
            q = quality(logits, labels)
            ne.append(q["ne"])
            auc.append(q["auc"])
            windows.append(t)
            all_logits.append(logits)
            all_labels.append(labels)
            if oracle:
                prob = torch.tensor(rows["oracle_prob"].to_numpy())
                oracle_ne.append(quality(prob_logit(prob.double()), labels)["ne"])
        for batch, ex in wb(optim.batch_size):
            teacher = None if kd == "none" else TeacherTargets(ex["fm_prob"], ex["mask"])
            student_step(vm, vm_opt, batch, teacher, kd, dcfg, sa, sa_opt)
    pooled = quality(torch.cat(all_logits), torch.cat(all_labels))
    result: dict[str, Any] = {
        "vm": scfg.name,
        "kd": kd,
        "windows": windows,
        "ne": ne,
        "ne_mean": float(np.mean(ne)),
        "auc_per_window": auc,
        "auc": pooled["auc"],
        "ne_pooled": pooled["ne"],
        "examples_with_fm_label": labeled,
        "model": asdict(scfg.model),
        "features": {"dense": dense, "sparse": sparse},
        "traffic": scfg.traffic,
        "parameters": parameters,
    }
    if oracle:
        result["oracle_ne"] = oracle_ne
    return result
