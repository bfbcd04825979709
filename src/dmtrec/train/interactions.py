"""Feature-interaction matrix S (F x F) from a briefly trained flat model -- the partitioner's input.

Measures, all on the probe model's pooled embeddings e_f over real batches:

- ``fwfm`` (default): the probe is a field-weighted FM (``models/fwfm.py``);
  S_ij = |r_ij| * mean |<e_i, e_j>|, the size of the pair term the model learned. Pair terms are
  the only place FwFM lets two fields interact, so S is zero for pairs the model does not use.

- ``dot``: S_ij = mean over samples of |<e_i, e_j>|. DLRM's interaction *is* these dot
  products, so features whose embeddings have learned to align are the ones the model uses
  together. Cheap, model-agnostic (any head).
- ``mixed``: the model's own pairwise interaction strength, Friedman-H style:
  S_ij = mean |f(x_ij') - f(x_i') - f(x_j') + f(x)|, where x_i' replaces feature i's embedding
  by another sample's and f is the logit. Zero exactly when the model's logit is additive in
  (e_i, e_j) -- i.e. when the pair does not interact -- whatever the head's architecture; the
  dot measures above also respond to main effects shared across all pairs.
- ``attribution``: the ``dot`` term times how strongly the top MLP reads that pair,
  ||W1[:, col(i,j)]|| (first top-MLP layer, the column fed by <e_i, e_j>). A pair the head ignores
  scores low even if its embeddings happen to align. DLRM heads only.

``bench partition`` compares them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from dmtrec.errors import ConfigError
from dmtrec.models.common import stack_pooled
from dmtrec.models.dlrm import DLRMHead
from dmtrec.models.fwfm import FwFMHead

INTERACTIONS = ("fwfm", "mixed", "dot", "attribution")
PROBE_MODEL = {"fwfm": "fwfm", "mixed": "dlrm", "dot": "dlrm", "attribution": "dlrm"}


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DistributedModelParallel / DDP wrappers."""
    while True:
        if hasattr(module, "_dmp_wrapped_module"):
            module = module._dmp_wrapped_module
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


@torch.no_grad()
def interaction_matrix(model: nn.Module, batches: Iterable, method: str = "fwfm") -> np.ndarray:
    """S for the flat ``model`` (possibly wrapped) over ``batches``."""
    if method not in INTERACTIONS:
        raise ConfigError(
            f"--interaction: unknown {method!r}; choose from {', '.join(INTERACTIONS)}"
        )
    flat = unwrap(model)
    if method == "mixed":
        return _mixed(flat, list(batches))
    if method == "fwfm":
        return _fwfm(flat, list(batches))
    total, n = None, 0
    for batch in batches:
        e = stack_pooled(flat.ebc(batch.sparse_features), flat.features).double()  # B x F x D
        s = torch.bmm(e, e.transpose(1, 2)).abs().sum(0)
        total = s if total is None else total + s
        n += e.shape[0]
    if total is None:
        raise ConfigError("no training batches to measure feature interactions on")
    S = (total / n).numpy()
    if method == "attribution":
        head = flat.head
        if not isinstance(head, DLRMHead):
            raise ConfigError("--interaction attribution needs a DLRM probe model (--model dlrm)")
        w1 = next(m for m in head.over_arch.modules() if isinstance(m, nn.Linear)).weight
        f = S.shape[0]
        d = w1.shape[1] - (f + 1) * f // 2  # inputs: dense vector (D), then the pair dots
        rows, cols = torch.triu_indices(f + 1, f + 1, offset=1)
        weight = np.zeros_like(S)
        for k, (a, b) in enumerate(zip(rows.tolist(), cols.tolist())):
            if a > 0:  # a sparse-sparse pair (index 0 is the dense vector)
                weight[a - 1, b - 1] = weight[b - 1, a - 1] = float(w1[:, d + k].norm())
        S = S * weight
    np.fill_diagonal(S, 0.0)
    return S


def _mixed(flat: nn.Module, batches: list, max_rows: int = 4096, seed: int = 0) -> np.ndarray:
    dense = torch.cat([b.dense_features for b in batches])[:max_rows]
    e = torch.cat([stack_pooled(flat.ebc(b.sparse_features), flat.features) for b in batches])[
        :max_rows
    ]
    if len(e) == 0:
        raise ConfigError("no training batches to measure feature interactions on")
    perm = torch.randperm(len(e), generator=torch.Generator().manual_seed(seed))
    other = e[perm]
    f = e.shape[1]

    def logit(swap: tuple[int, ...]) -> torch.Tensor:
        x = e.clone()
        for i in swap:
            x[:, i] = other[:, i]
        return flat.head(dense, x).double()

    base = logit(())
    single = [logit((i,)) for i in range(f)]
    S = np.zeros((f, f))
    for i in range(f):
        for j in range(i + 1, f):
            S[i, j] = S[j, i] = float((logit((i, j)) - single[i] - single[j] + base).abs().mean())
    return S


def _fwfm(flat: nn.Module, batches: list) -> np.ndarray:
    head = flat.head
    if not isinstance(head, FwFMHead):
        raise ConfigError("--interaction fwfm needs an FwFM probe model")
    total, n = None, 0
    for b in batches:
        dots = head.pair_dots(stack_pooled(flat.ebc(b.sparse_features), flat.features)).double()
        s = dots.abs().sum(0)
        total = s if total is None else total + s
        n += dots.shape[0]
    if total is None:
        raise ConfigError("no training batches to measure feature interactions on")
    f = len(flat.features)
    S = np.zeros((f, f))
    strength = (total / n * head.pair.detach().double().abs()).numpy()
    S[head.triu[0].numpy(), head.triu[1].numpy()] = strength
    return S + S.T
