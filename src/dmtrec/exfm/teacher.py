"""The foundation model (FM): trained on the whole stream, window by window, publishing a
versioned snapshot every ``snapshot_every`` windows.

Snapshot ``v`` holds the FM after windows ``[0, (v + 1) * snapshot_every)`` and is written
with ``torch.distributed.checkpoint`` (the sharded tables as they are, so a multi-rank FM
saves and loads the same way) to ``TEACHER/snapshots/v<v>/``; ``TEACHER/teacher.json`` lists
the snapshots, the FM's configuration and its own progressive NE per window (scored on each
window before training on it).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from dmtrec.errors import ConfigError, DataError
from dmtrec.exfm._build import distribute
from dmtrec.exfm.config import TeacherConfig
from dmtrec.exfm.stream import Stream, WindowBatches
from dmtrec.models import ModelConfig, build_model
from dmtrec.train.metrics import quality
from dmtrec.train.step import train_step

MANIFEST = "teacher.json"


def build_fm(stream: Stream, mcfg: ModelConfig, *, lr: float, sparse_lr: float, seed: int):
    """The FM over every feature of the stream, distributed; (model, optimizer)."""
    if mcfg.towers is not None or mcfg.num_towers:
        raise ConfigError("teacher.model: an ExFM teacher is a flat model (no towers)")
    torch.manual_seed(seed)
    model = build_model(mcfg, stream.spec, table_device="meta")
    return distribute(model, lr=lr, sparse_lr=sparse_lr, seed=seed)


@torch.no_grad()
def predict(model: nn.Module, wb: WindowBatches, batch_size: int) -> torch.Tensor:
    """Logits of ``model`` (called as ``model(dense, kjt)``) over every row of ``wb``."""
    was = model.training
    model.eval()
    out = [model(b.dense_features, b.sparse_features).float() for b, _ in wb(batch_size)]
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def snapshot_path(teacher_dir: Path, version: int) -> Path:
    return teacher_dir / "snapshots" / f"v{version}"


def train_teacher(stream: Stream, tcfg: TeacherConfig, out: Path, seed: int) -> dict[str, Any]:
    """Train the FM on every window in order, snapshotting; write and return the manifest.

    Inside a process group. Progressive NE: window ``t`` is scored before the FM trains on it.
    """
    tcfg.validate()
    out = Path(out)
    if (out / "snapshots").exists():
        shutil.rmtree(out / "snapshots")
    fm, optimizer = build_fm(
        stream, tcfg.model, lr=tcfg.optim.lr, sparse_lr=tcfg.optim.sparse_lr, seed=seed
    )
    features = (stream.spec.dense, stream.spec.sparse)
    snapshots, ne, auc = [], [], []
    for t in range(stream.num_windows):
        wb = WindowBatches(stream.window(t), *features)
        if t > 0:
            q = quality(predict(fm, wb, tcfg.optim.eval_batch_size), torch.from_numpy(wb.labels))
            ne.append(q["ne"])
            auc.append(q["auc"])
        for batch, _ in wb(tcfg.optim.batch_size):
            train_step(fm, optimizer, batch)
        if (t + 1) % tcfg.snapshot_every == 0:
            v = len(snapshots)
            path = snapshot_path(out, v)
            dcp.save(fm.state_dict(), checkpoint_id=str(path))
            snapshots.append(
                {"version": v, "trained_windows": t + 1, "path": str(path.relative_to(out))}
            )
    manifest = {
        "stream": str(stream.path),
        "stream_fingerprint": stream.meta.fingerprint,
        "model": asdict(tcfg.model),
        "optim": asdict(tcfg.optim),
        "snapshot_every": tcfg.snapshot_every,
        "seed": seed,
        "snapshots": snapshots,
        "ne": ne,
        "auc": auc,
        "ne_mean": sum(ne) / len(ne),
        "parameters": parameter_count(stream, tcfg.model),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def parameter_count(stream: Stream, mcfg: ModelConfig) -> dict[str, int]:
    """Dense and embedding parameters of ``mcfg`` on the stream's features."""
    model = build_model(mcfg, stream.spec, table_device="meta")
    tables = sum(p.numel() for p in model.ebc.parameters())
    return {"dense": sum(p.numel() for p in model.parameters()) - tables, "embedding": tables}


def read_manifest(teacher_dir: Path) -> dict[str, Any]:
    path = Path(teacher_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{teacher_dir}: no FM snapshots here (no {MANIFEST}); run `exfm teacher` first"
        )
    return json.loads(path.read_text())


def load_snapshot(fm: nn.Module, teacher_dir: Path, manifest: dict[str, Any], version: int) -> None:
    """Load snapshot ``version`` into the distributed FM ``fm`` in place."""
    have = [s["version"] for s in manifest["snapshots"]]
    if version not in have:
        span = f"v{have[0]}..v{have[-1]}" if have else "none"
        raise ConfigError(f"unknown FM snapshot v{version} in {teacher_dir} (it has {span})")
    state = fm.state_dict()
    dcp.load(
        state,
        checkpoint_id=str(Path(teacher_dir) / manifest["snapshots"][have.index(version)]["path"]),
    )
