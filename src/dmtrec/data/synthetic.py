"""Criteo-shaped synthetic data with a planted feature-interaction structure.

Sparse features fall into ``num_groups`` groups; the true logit is

    bias + w . dense + sum_i m_i[x_i] + s2 * sum_g sum_{i<j in g} <U_i[x_i], U_j[x_j]>
                                      (+ s3 * sum_g sum_{i<j<k in g} sum_r U_i U_j U_k, order 3)

(the order-3 term is the ANOVA kernel of higher-order FMs, Blondel et al. 2016, or with
``triple_form="pairprod"`` an interaction of interactions, sum <U_i,U_j><U_j,U_k> over the
triples of a group; ``triple_share`` sets the fraction of the interaction variance it carries,
so the third order can matter)

with per-id main effects ``m_i`` and latent vectors ``U_i`` (rank ``latent_rank``); with
``pooling`` P > 1 every feature is multi-hot, a bag of 1..P ids per row (uniform), and ``m_i``
and ``U_i`` of a bag are the means over its ids (what a mean-pooled embedding bag sees). So the true
interaction matrix is block-diagonal by group (the partitioner can be scored against it), a tower
layout aligned with the groups loses nothing, and the AUC of the true logit (``oracle_auc``)
bounds what any model can reach. Ids follow a power law (Zipf-like), as in Criteo.
Everything is a function of ``seed``: the same seed gives the same tables, rows and labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

from dmtrec.data.base import SPLITS, DataStats, FeatureSpec, Jagged, Rows
from dmtrec.data.shard import BlockSource
from dmtrec.errors import ConfigError
from dmtrec.options import option


@dataclass
class SyntheticConfig:
    """Sizes and structure of the synthetic set; defaults are small enough for a 2-core box."""

    num_dense: int = option(13, "synthetic: dense features", minimum=0)
    num_sparse: int = option(26, "synthetic: sparse features", minimum=1)
    num_groups: int = option(4, "synthetic: planted interaction groups", minimum=1)
    table_size: int = option(
        1000, "synthetic: rows per table", flag="synthetic-table-size", aliases=("rows",), minimum=2
    )
    num_train: int = option(100_000, "synthetic: train rows", minimum=0)
    num_valid: int = option(10_000, "synthetic: validation rows", minimum=0)
    num_test: int = option(20_000, "synthetic: test rows", minimum=0)
    latent_rank: int = option(4, "synthetic: rank of the planted latent vectors", minimum=1)
    order: int = option(2, "synthetic: highest planted interaction order", choices=(2, 3))
    triple_share: float = option(
        0.5, "synthetic order 3: variance share of the triples", minimum=0, maximum=1
    )
    triple_form: str = option(
        "anova", "synthetic order 3: form of the triples", choices=("anova", "pairprod")
    )
    zipf_alpha: float = option(1.05, "synthetic: power-law exponent of the id frequencies")
    logit_std: float = option(1.5, "synthetic: scale of the interaction part of the true logit")
    base_rate: float = option(0.25, "synthetic: positive rate", minimum=0, maximum=1)
    shuffle_groups: bool = option(True, "synthetic: feature order shuffled relative to groups")
    pooling: int = option(
        1, "synthetic: ids per bag: 1 one-hot, P > 1 multi-hot with 1..P ids per row", minimum=1
    )
    seed: int = option(0, "seed of the synthetic tables and rows (the CLI's --seed)", cli=False)

    def validate(self) -> None:
        if self.num_sparse < 1 or self.num_dense < 0:
            raise ConfigError("--num-sparse must be >= 1 and --num-dense >= 0")
        if not 1 <= self.num_groups <= self.num_sparse:
            raise ConfigError(
                f"--num-groups {self.num_groups} must be between 1 and the number of sparse "
                f"features ({self.num_sparse})"
            )
        if self.table_size < 2:
            raise ConfigError("--synthetic-table-size must be >= 2")
        if self.order not in (2, 3):
            raise ConfigError(f"--order must be 2 or 3, not {self.order}")
        if self.triple_form not in ("anova", "pairprod"):
            raise ConfigError(f"--triple-form must be anova or pairprod, not {self.triple_form!r}")
        if not 0.0 <= self.triple_share <= 1.0:
            raise ConfigError(f"--triple-share must be in [0, 1], not {self.triple_share}")
        if self.pooling < 1:
            raise ConfigError(f"--pooling must be >= 1, not {self.pooling}")
        for name in ("num_train", "num_valid", "num_test"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")


class SyntheticData(BlockSource):
    """In-memory synthetic data set (train/valid/test) generated from ``config.seed``."""

    def __init__(self, config: SyntheticConfig, shuffle: bool = True) -> None:
        config.validate()
        self.shuffle = shuffle  # the train split in a seeded permutation per epoch
        self.stats: dict[str, DataStats] = {}
        self.config = c = config
        rng = np.random.default_rng(c.seed)
        f = c.num_sparse
        groups = np.arange(f) % c.num_groups
        if c.shuffle_groups:
            groups = rng.permutation(groups)
        self.groups = groups
        self.spec = FeatureSpec(
            dense=[f"I{i + 1}" for i in range(c.num_dense)],
            sparse=[f"C{i + 1}" for i in range(f)],
            num_embeddings=[c.table_size] * f,
            groups=[int(g) for g in groups],
            multi_hot=[f"C{i + 1}" for i in range(f)] if c.pooling > 1 else [],
        )
        r = c.latent_rank
        self._latent = rng.standard_normal((f, c.table_size, r)) / np.sqrt(r)
        self._main = 0.3 * rng.standard_normal((f, c.table_size))
        self._dense_w = 0.3 * rng.standard_normal(c.num_dense) / max(1, np.sqrt(c.num_dense))
        ranks = np.arange(1, c.table_size + 1, dtype=np.float64) ** -c.zipf_alpha
        self._id_p = ranks / ranks.sum()
        self._id_perm = np.stack([rng.permutation(c.table_size) for _ in range(f)])
        # Calibrate the interaction scale and bias on a sample so logits have the set spread.
        self._scale = 1.0
        self._bias = 0.0
        self._order_w = (1.0, 0.0)
        dense, ids = self._features(rng, 20_000)
        if c.order >= 3:  # weight each order's term to its share of the variance
            pair, triple = self._orders(ids)
            self._order_w = (
                np.sqrt(1.0 - c.triple_share) / max(pair.std(), 1e-9),
                np.sqrt(c.triple_share) / max(triple.std(), 1e-9),
            )
        inter = self._interaction(ids)
        self._scale = c.logit_std / max(inter.std(), 1e-9)
        logit = self._logit(dense, ids)
        lo, hi = -20.0, 20.0  # bisect the bias so the mean click probability is base_rate
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) < c.base_rate:
                lo = mid
            else:
                hi = mid
        self._bias = 0.5 * (lo + hi)

        self._splits: dict[str, tuple[np.ndarray, ...]] = {}
        sizes = {"train": c.num_train, "valid": c.num_valid, "test": c.num_test}
        for i, split in enumerate(SPLITS):
            srng = np.random.default_rng([c.seed, i + 1])
            dense, ids = self._features(srng, sizes[split])
            prob = 1.0 / (1.0 + np.exp(-self._logit(dense, ids)))
            labels = (srng.random(len(prob)) < prob).astype(np.float32)
            if c.pooling > 1:
                ids = ids.astype(np.int32)  # bags padded by -1: half the memory
            self._splits[split] = (dense.astype(np.float32), ids, labels, prob)
        self.stats = {s: DataStats(rows=sizes[s]) for s in SPLITS}

    # -- generation -------------------------------------------------------------------------
    def _features(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Dense features and ids: n x F, or with pooling P > 1 bags n x F x P padded by -1."""
        c = self.config
        dense = np.log1p(rng.poisson(3.0, size=(n, c.num_dense))).astype(np.float64)
        p = c.pooling
        shape = (n, c.num_sparse) if p == 1 else (n, c.num_sparse, p)
        raw = rng.choice(c.table_size, size=shape, p=self._id_p)
        feat = (
            np.arange(c.num_sparse)[None, :] if p == 1 else np.arange(c.num_sparse)[None, :, None]
        )
        ids = self._id_perm[feat, raw].astype(np.int64)
        if p > 1:
            lengths = rng.integers(1, p + 1, size=(n, c.num_sparse))
            ids[np.arange(p)[None, None, :] >= lengths[..., None]] = -1
        return dense, ids

    def _pooled(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """``table[f, id]`` per row and feature (F x T x ... table); the mean over a bag."""
        f = np.arange(self.config.num_sparse)
        if ids.ndim == 2:
            return table[f[None, :], ids]
        mask = ids >= 0
        vals = table[f[None, :, None], np.where(mask, ids, 0)]  # n x F x P (x r)
        extra = (1,) * (vals.ndim - 3)
        m = mask.reshape(mask.shape + extra)
        return (vals * m).sum(2) / mask.sum(2).reshape(mask.shape[:2] + extra)

    def _orders(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pairwise, triple) planted terms, summed over groups, unweighted."""
        c = self.config
        vecs = self._pooled(self._latent, ids)  # n x F x r
        pair, triple = np.zeros(len(ids)), np.zeros(len(ids))
        for g in range(c.num_groups):
            v = vecs[:, self.groups == g, :]  # n x m x r
            s = v.sum(axis=1)
            # sum_{i<j} <v_i, v_j> = (|sum v|^2 - sum |v_i|^2) / 2
            pair += 0.5 * ((s * s).sum(-1) - (v * v).sum((1, 2)))
            if c.order >= 3 and c.triple_form == "anova":
                # e3 = sum_{i<j<k} prod, per latent coordinate (Newton's identities)
                p1, p2, p3 = s, (v**2).sum(1), (v**3).sum(1)
                triple += ((p1**3 - 3 * p1 * p2 + 2 * p3) / 6.0).sum(-1)
            elif c.order >= 3:
                # sum over feature triples of products of two of their pair interactions that
                # share a feature: sum_j sum_{i<k; i,k != j} <U_i,U_j><U_j,U_k>
                gram = np.einsum("nir,njr->nij", v, v)
                gram[:, np.arange(v.shape[1]), np.arange(v.shape[1])] = 0.0
                rows = gram.sum(-1)
                triple += 0.5 * ((rows**2) - (gram**2).sum(-1)).sum(-1)
        return pair, triple

    def _interaction(self, ids: np.ndarray) -> np.ndarray:
        pair, triple = self._orders(ids)
        return self._order_w[0] * pair + self._order_w[1] * triple

    def _logit(self, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        main = self._pooled(self._main, ids).sum(1)
        centered = dense - np.log1p(3.0)
        return self._bias + centered @ self._dense_w + main + self._scale * self._interaction(ids)

    # -- public API ---------------------------------------------------------------------------
    def true_interaction(self) -> np.ndarray:
        """F x F 0/1 matrix: 1 where two features share a planted group (diagonal 0)."""
        same = (self.groups[:, None] == self.groups[None, :]).astype(np.float64)
        np.fill_diagonal(same, 0.0)
        return same

    def oracle_auc(self, split: str = "test") -> float:
        """AUC of the true click probability on ``split``: the ceiling for any model."""
        _, _, labels, prob = self._splits[split]
        if len(labels) == 0 or labels.min() == labels.max():
            return float("nan")
        return float(binary_auroc(torch.from_numpy(prob), torch.from_numpy(labels).long()))

    @property
    def splits(self) -> list[str]:
        """Splits that have rows."""
        return [s for s in SPLITS if len(self._splits[s][2])]

    def num_examples(self, split: str) -> int:
        return len(self._splits[split][2])

    def split_blocks(
        self, split: str, epoch: int, stats: DataStats, rank: int
    ) -> list[_TableBlock]:
        """The split as one block; train in a seeded permutation of all rows per epoch."""
        n = len(self._splits[split][2])
        order = None
        if split == "train" and self.shuffle:
            order = np.random.default_rng([self.config.seed, 1000 + epoch]).permutation(n)
        return [_TableBlock(self, split, order)] if n else []

    def rows(self, split: str, idx: np.ndarray) -> Rows:
        """Rows ``idx`` of ``split``."""
        dense, ids, labels, _ = self._splits[split]
        if ids.ndim == 2:
            return Rows(labels[idx], dense[idx], ids[idx].T)
        bags = []
        for f in range(ids.shape[1]):
            sub = ids[idx, f, :]
            mask = sub >= 0
            bags.append(Jagged(mask.sum(1).astype(np.int32), sub[mask].astype(np.int64)))
        return Rows(labels[idx], dense[idx], bags)


class _TableBlock:
    """A whole in-memory split as one block (``shard.Block``): parsing is indexing."""

    def __init__(self, data: SyntheticData, split: str, order: np.ndarray | None) -> None:
        self.data, self.split, self.order = data, split, order
        self.n = data.num_examples(split)

    def parse(self, records: np.ndarray, report: bool) -> tuple[Rows, np.ndarray]:
        return self.data.rows(self.split, records), np.ones(len(records), dtype=bool)
