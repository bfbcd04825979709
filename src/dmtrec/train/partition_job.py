"""``dmtrec partition``: compute a feature-to-tower partition and explain it.

``learned`` measures the interaction matrix S and runs DMT's Tower Partitioner
(``partition/learned.py``: spectral embedding + constrained K-means balancing per-feature cost).
S comes, by default (``covariation``), from the training rows themselves: an additive logistic
probe and each field pair's residual interaction table (``partition/covariation.py``); the other
measures train a flat FwFM/DLRM probe for ``probe_steps`` steps (``train/interactions.py``).
Progress lines (``[partition] ...``) go to stdout and, when ``log`` is set, to that file. ``sequential`` and
``random`` are the baselines. Writes ``towers.json`` (towers, cost_per_tower, imbalance,
method, ari when planted groups are known), ``interaction.png`` (S ordered by tower) and
``report.txt``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import torch

from dmtrec.data import DataConfig, load_data
from dmtrec.errors import ConfigError
from dmtrec.models import ModelConfig
from dmtrec.options import option
from dmtrec.parallel.build import build
from dmtrec.partition import random as random_partition
from dmtrec.partition import sequential
from dmtrec.partition.covariation import covariation_matrix
from dmtrec.partition.learned import (
    adjusted_rand_index,
    feature_costs,
    imbalance,
    labels_from_towers,
    learned_partition,
)
from dmtrec.train.interactions import PROBE_MODEL, interaction_matrix
from dmtrec.train.step import train_step
from dmtrec.train.trainer import TrainConfig

METHODS = ("learned", "sequential", "random")
COSTS = ("count", "lookup", "memory", "both")
MEASURES = ("covariation", "fwfm", "mixed", "dot", "attribution")


@dataclass
class PartitionConfig:
    """Options of ``dmtrec partition`` (and of ``train --partition learned``)."""

    towers: int = option(4, "number of towers K", minimum=1)
    method: str = option("learned", "how to partition", choices=METHODS)
    interaction: str = option(
        "covariation",
        "learned: the interaction measure S (was --interaction; that name is DLRM's now)",
        flag="interaction-measure",
        choices=MEASURES,
    )
    cost: str = option(
        "count", "learned: what towers balance", flag="partition-cost", choices=COSTS
    )
    tolerance: float | None = option(
        None, "learned: max tower cost / mean - 1 (none: 0.05, or the least a count split allows)",
        flag="imbalance-tolerance", minimum=0,
    )  # fmt: skip
    host_memory: float | None = option(None, "learned: bytes of tables a tower may hold", minimum=0)
    embed_dim: int | None = option(
        None, "learned: spectral embedding dim (none: K)", flag="spectral-dim",
        aliases=("embed-dim",), minimum=1,
    )  # fmt: skip
    probe_steps: int = option(
        2000, "learned, measures other than covariation: flat probe training steps", minimum=1
    )
    probe_rows: int = option(
        200_000, "learned covariation: most training rows the additive probe reads", minimum=1
    )
    pair_top_ids: int = option(
        10, "learned covariation: most frequent ids per field in each pair table", minimum=2
    )
    batch_size: int = option(256, "learned: probe batch size", cli=False)
    embedding_dim: int = option(16, "learned: probe embedding dim", cli=False)
    seed: int = option(0, "seed (the CLI's --seed)", cli=False)
    log: str | None = option(None, "file the progress lines are appended to", cli=False)


def _progress(cfg: PartitionConfig) -> Callable[[str], None]:
    """A printer of ``[partition] <elapsed> <message>`` lines to stdout and ``cfg.log``."""
    start = time.monotonic()
    if cfg.log:
        Path(cfg.log).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.log).write_text("")

    def say(message: str) -> None:
        line = f"[partition] {time.monotonic() - start:6.1f}s {message}"
        print(line, flush=True)
        if cfg.log:
            with open(cfg.log, "a") as fh:
                fh.write(line + "\n")

    return say


def _costs(cfg: PartitionConfig, rows: np.ndarray, pooling: np.ndarray) -> np.ndarray:
    if cfg.cost == "count":
        return np.ones(len(rows))
    if cfg.cost not in COSTS:
        raise ConfigError(f"--partition-cost: unknown {cfg.cost!r}; choose from {', '.join(COSTS)}")
    return feature_costs(rows, cfg.embedding_dim, pooling, cfg.cost)


def partition_worker(dcfg: DataConfig, cfg: PartitionConfig) -> dict[str, Any]:
    """Compute the partition (inside a one-rank process group: the probe uses fused kernels)."""
    if cfg.method not in METHODS:
        raise ConfigError(f"--method: unknown {cfg.method!r}; choose from {', '.join(METHODS)}")
    data = load_data(dcfg)
    spec = data.spec
    names = spec.sparse
    f = len(names)
    if not 1 <= cfg.towers <= f:
        raise ConfigError(
            f"--towers {cfg.towers} must be between 1 and the number of sparse features ({f})"
        )
    rows = np.array(spec.num_embeddings, dtype=np.float64)
    probe_batches = []
    for i, b in enumerate(data.batches("train", cfg.batch_size)):
        if i >= 20:
            break
        probe_batches.append(b)
    if not probe_batches:
        raise ConfigError("no training rows to partition features with")
    pooling = np.array(
        [
            np.mean([float(b.sparse_features[n].lengths().double().mean()) for b in probe_batches])
            for n in names
        ]
    )
    cost = _costs(cfg, rows, pooling)
    memory = rows * cfg.embedding_dim * 4
    S = None
    if cfg.method == "learned":
        say = _progress(cfg)
        if cfg.interaction == "covariation":
            S = _covariation(data, spec, cfg, say)
        else:
            S = _probe_interactions(data, dcfg, cfg, probe_batches, say)
        say(f"interaction matrix ({cfg.interaction}) done; spectral embedding + K-means")
        tol = cfg.tolerance
        if tol is None:
            tol = 0.05
            if cfg.cost == "count":  # F not divisible by K: the best split is ceil(F/K)
                tol = max(tol, math.ceil(f / cfg.towers) * cfg.towers / f - 1 + 1e-9)
        idx = learned_partition(
            S,
            cfg.towers,
            cost,
            dim=cfg.embed_dim,
            tolerance=tol,
            memory=memory,
            capacity=cfg.host_memory,
            seed=cfg.seed,
            names=names,
        )
        towers = [[names[i] for i in t] for t in idx]
    elif cfg.method == "sequential":
        towers = sequential(names, cfg.towers)
    else:
        towers = random_partition(names, cfg.towers, cfg.seed)
    pos = {n: i for i, n in enumerate(names)}
    labels = labels_from_towers([[pos[n] for n in t] for t in towers], f)
    out: dict[str, Any] = {
        "towers": towers,
        "method": cfg.method,
        "cost": cfg.cost,
        "cost_per_tower": [float(sum(cost[pos[n]] for n in t)) for t in towers],
        "memory_bytes_per_tower": [float(sum(memory[pos[n]] for n in t)) for t in towers],
        "imbalance": imbalance(labels, cost),
    }
    if spec.groups is not None:
        out["ari"] = adjusted_rand_index(labels, np.array(spec.groups))
    if S is not None:
        out["interaction"] = cfg.interaction
        out["interaction_matrix"] = S.tolist()
        inside = sum(S[pos[a], pos[b]] for t in towers for a in t for b in t)
        out["interaction_inside_towers"] = float(inside / max(S.sum(), 1e-12))
    out["features"] = names
    return out


def _covariation(data, spec, cfg: PartitionConfig, say: Callable[[str], None]) -> np.ndarray:
    """S from up to ``probe_rows`` training rows: per field an n x rows sparse matrix (one-hot,
    or a bag's pooling weights: 1 for sum pooling, 1/length for mean), then
    ``covariation_matrix``."""
    names = spec.sparse
    cols: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {f: [] for f in names}
    dense, labels, n = [], [], 0
    for batch in data.batches("train", 4096):
        take = min(len(batch.labels), cfg.probe_rows - n)
        kjt = batch.sparse_features
        for f in names:
            jt = kjt[f]
            lengths = jt.lengths()[:take].numpy().astype(np.int64)
            values = jt.values()[: int(lengths.sum())].numpy().astype(np.int64)
            cols[f].append((lengths, values))
        dense.append(batch.dense_features[:take].double().numpy())
        labels.append(batch.labels[:take].double().numpy())
        n += take
        if n >= cfg.probe_rows:
            break
    if n == 0:
        raise ConfigError("no training rows to measure feature interactions on")
    say(f"read {n} training rows; fitting the additive probe")
    fields = []
    for f, rows in zip(names, spec.num_embeddings):
        lengths = np.concatenate([c[0] for c in cols[f]])
        values = np.concatenate([c[1] for c in cols[f]])
        if spec.pooling == "mean":
            w = np.repeat(1.0 / np.maximum(lengths, 1), lengths)
        else:
            w = np.ones(len(values))
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        X = scipy.sparse.csr_array((w, values, indptr), shape=(n, rows))
        X.sum_duplicates()
        fields.append(X)
    return covariation_matrix(
        fields,
        np.concatenate(dense),
        np.concatenate(labels),
        top_ids=cfg.pair_top_ids,
        progress=say,
    )


def _probe_interactions(
    data, dcfg: DataConfig, cfg: PartitionConfig, batches: list, say: Callable[[str], None]
) -> np.ndarray:
    """Train a flat FwFM/DLRM for ``probe_steps`` steps and measure S on held batches."""
    torch.manual_seed(cfg.seed)
    if cfg.interaction not in PROBE_MODEL:
        raise ConfigError(
            f"--interaction-measure: unknown {cfg.interaction!r}; choose from {', '.join(MEASURES)}"
        )
    mcfg = ModelConfig(model=PROBE_MODEL[cfg.interaction], embedding_dim=cfg.embedding_dim)
    tcfg = TrainConfig(
        batch_size=cfg.batch_size, lr=3e-3, sparse_lr=0.2, seed=cfg.seed, progress=False
    )
    built = build(data.spec, mcfg, tcfg)
    step, epoch, every = 0, 0, max(1, cfg.probe_steps // 10)
    losses: list[float] = []
    say(f"training the {mcfg.model} probe for {cfg.probe_steps} steps")
    while step < cfg.probe_steps:
        seen = False
        for batch in data.batches("train", cfg.batch_size, epoch=epoch):
            seen = True
            loss, _ = train_step(built.model, built.optimizer, batch.to(built.device))
            losses.append(float(loss))
            step += 1
            if step % every == 0 or step == cfg.probe_steps:
                say(f"probe step {step}/{cfg.probe_steps}: mean loss {np.mean(losses):.4f}")
                losses = []
            if step >= cfg.probe_steps:
                break
        if not seen:
            raise ConfigError("no training rows to probe feature interactions with")
        epoch += 1
    wrapped = built.model
    return interaction_matrix(wrapped, batches, cfg.interaction)


def write_partition(out: str, result: dict[str, Any]) -> Path:
    """``towers.json``, ``report.txt`` and (when S is known) ``interaction.png`` in ``out``."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    doc = {k: v for k, v in result.items() if k not in ("interaction_matrix", "features")}
    (d / "towers.json").write_text(json.dumps(doc, indent=2))
    lines = [f"method={result['method']} cost={result['cost']} imbalance={result['imbalance']:.3f}"]
    if "ari" in result:
        lines.append(f"ARI vs planted groups: {result['ari']:.3f}")
    if "interaction_inside_towers" in result:
        lines.append(
            f"share of interaction ({result['interaction']}) inside towers: {result['interaction_inside_towers']:.3f}"
        )
    for k, (t, c) in enumerate(zip(result["towers"], result["cost_per_tower"])):
        lines.append(f"tower {k}: cost {c:.3g}  {' '.join(t)}")
    (d / "report.txt").write_text("\n".join(lines) + "\n")
    if "interaction_matrix" in result:
        _heatmap(
            np.array(result["interaction_matrix"]),
            result["features"],
            result["towers"],
            d / "interaction.png",
        )
    return d / "towers.json"


def _heatmap(S: np.ndarray, names: list[str], towers: list[list[str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = {n: i for i, n in enumerate(names)}
    order = [pos[n] for t in towers for n in t]
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(S[np.ix_(order, order)], cmap="viridis")
    ax.set_xticks(range(len(order)), [names[i] for i in order], rotation=90, fontsize=6)
    ax.set_yticks(range(len(order)), [names[i] for i in order], fontsize=6)
    edge = 0
    for t in towers[:-1]:
        edge += len(t)
        ax.axhline(edge - 0.5, color="w", lw=1)
        ax.axvline(edge - 0.5, color="w", lw=1)
    ax.set_title("feature interaction S, ordered by tower")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
