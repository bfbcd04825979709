"""The trained model as a directory a user can take away: ``OUT/model/``.

- ``model.json``: format tag, the model / data / training configs and the feature spec;
- ``weights.pt``: the *unsharded* state dict of the single-device model
  (``models.build_model``: ``FlatModel`` or ``MultiTower``), whatever parallel mode trained it;
- ``vocab/<feature>.parquet``: the column-spec vocabularies (value -> id = row + 1), so new
  rows are encoded exactly as the training rows were (Criteo hashing needs nothing stored).

``save_model`` is collective (every rank contributes its shards; rank 0 writes);
``load_model`` needs no process group. Gathering through rank 0 suits models that fit one
host's memory; sharded checkpoints (``torch.distributed.checkpoint``) are the path for more.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dmtrec.data import DataConfig
from dmtrec.data.base import FeatureSpec
from dmtrec.errors import ConfigError
from dmtrec.models import ModelConfig, build_model

FORMAT = "dmtrec-model/1"


def _reference_name(key: str, tower_of_local: list[int] | None) -> str:
    """A wrapped model's state-dict key as the single-device model's key.

    DMP adds ``_dmp_wrapped_module.`` (and DDP ``module.``); SPTT keeps its host's tables in
    ``host_sparse``, its tower modules as ``host_towers.tms.<i>`` (i: the host's i-th tower).
    """
    key = re.sub(r"(^|\.)(_dmp_wrapped_module|module)\.", r"\1", key)
    key = re.sub(r"(^|\.)(_dmp_wrapped_module|module)\.", r"\1", key)  # DMP around DDP
    if key.startswith("host_sparse.") and "embedding_bags." in key:
        # DMP on a submodule repeats its prefix (host_sparse.host_sparse.embedding_bags...)
        key = "ebc." + key[key.index("embedding_bags.") :]
    m = re.match(r"host_towers\.tms\.(\d+)\.(.*)", key)
    if m and tower_of_local is not None:
        key = f"tower_modules.{tower_of_local[int(m.group(1))]}.{m.group(2)}"
    return key


def _local_pieces(model: nn.Module) -> dict[str, list[tuple[tuple[int, ...], torch.Tensor]]]:
    """This rank's part of every tensor: (offsets, values) per reference key (CPU)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    towers = None
    if hasattr(model, "tower_host"):  # SPTT: which global tower each local TM is
        towers = [k for k, h in enumerate(model.tower_host) if h == model.host]
    out: dict[str, list] = {}
    for key, value in model.state_dict().items():
        name = _reference_name(key, towers)
        if isinstance(value, ShardedTensor):
            for s in value.local_shards():
                out.setdefault(name, []).append(
                    (tuple(s.metadata.shard_offsets), s.tensor.detach().cpu())
                )
        elif isinstance(value, torch.Tensor):
            out.setdefault(name, []).append(((0,) * value.dim(), value.detach().cpu()))
    return out


def gather_state(model: nn.Module, reference: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full single-device state dict of a distributed ``model`` on rank 0 (None elsewhere).

    ``reference`` (same configs, tables on ``meta``) gives the keys and full shapes."""
    mine = _local_pieces(model)
    world = dist.get_world_size() if dist.is_initialized() else 1
    parts: list[Any] = [None] * world
    if world > 1:
        dist.all_gather_object(parts, mine)
    else:
        parts = [mine]
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    full: dict[str, torch.Tensor] = {}
    for key, ref in reference.state_dict().items():
        target = torch.zeros(ref.shape, dtype=ref.dtype)
        found = False
        for part in parts:
            for offsets, t in part.get(key, []):
                index = tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))
                target[index] = t
                found = True
        if not found:
            raise RuntimeError(f"no rank holds {key} of the trained model")
        full[key] = target
    return full


def spec_dict(spec: FeatureSpec) -> dict[str, Any]:
    return {
        "dense": spec.dense,
        "sparse": spec.sparse,
        "num_embeddings": spec.num_embeddings,
        "multi_hot": spec.multi_hot,
        "pooling": spec.pooling,
    }


def save_model(
    out: str,
    model: nn.Module,
    mcfg: ModelConfig,
    dcfg: DataConfig,
    data: Any,
    train: dict[str, Any],
) -> Path | None:
    """Write ``out/model/`` (collective: call on every rank; rank 0 writes)."""
    reference = build_model(_copy(mcfg), data.spec, table_device="meta")
    state = gather_state(model, reference)
    if state is None:
        return None
    d = Path(out) / "model"
    tmp = Path(out) / f".model.tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp / "weights.pt")
    vocab = getattr(data, "vocab_values", None)
    if vocab:
        import pyarrow as pa
        import pyarrow.parquet as pq

        (tmp / "vocab").mkdir(exist_ok=True)
        for name, values in vocab.items():
            pq.write_table(pa.table({"value": values}), tmp / "vocab" / f"{name}.parquet")
    doc = {
        "format": FORMAT,
        "model": asdict(mcfg),
        "data": asdict(dcfg),
        "spec": spec_dict(data.spec),
        "train": train,
    }
    (tmp / "model.json").write_text(json.dumps(doc, indent=2))
    if d.exists():
        import shutil

        shutil.rmtree(d)
    os.replace(tmp, d)
    return d


def _copy(mcfg: ModelConfig) -> ModelConfig:
    return ModelConfig(**asdict(mcfg))


@dataclass
class SavedModel:
    """A loaded ``OUT/model``: the single-device model and what it was trained with."""

    model: nn.Module
    model_config: ModelConfig
    data_config: DataConfig
    spec: FeatureSpec
    vocab_values: dict[str, Any] | None
    path: Path


def load_model(path: str) -> SavedModel:
    """Load ``OUT/model`` (no process group needed); errors name the directory."""
    d = Path(path)
    meta = d / "model.json"
    if not d.is_dir():
        raise ConfigError(f"--model {path}: no such directory")
    if not meta.is_file():
        raise ConfigError(f"--model {path}: not a dmtrec model (no model.json)")
    try:
        doc = json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{meta}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"--model {path}: not a dmtrec model (format is not {FORMAT})")
    mcfg = ModelConfig(**doc["model"])
    dcfg = DataConfig(**doc["data"])
    s = doc["spec"]
    spec = FeatureSpec(
        s["dense"], s["sparse"], s["num_embeddings"], multi_hot=s["multi_hot"], pooling=s["pooling"]
    )
    model = build_model(_copy(mcfg), spec)
    state = torch.load(d / "weights.pt", weights_only=True)
    model.load_state_dict(state)
    vocab = None
    if (d / "vocab").is_dir():
        import pyarrow.parquet as pq

        vocab = {
            name: pq.read_table(d / "vocab" / f"{name}.parquet").column("value").combine_chunks()
            for name in spec.sparse
        }
    return SavedModel(model, mcfg, dcfg, spec, vocab, d)
