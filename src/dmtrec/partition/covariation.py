"""Field-pair interaction strength straight from the data (pure numpy/scipy, no torch).

The ``covariation`` interaction measure of ``dmtrec partition``. A pair of fields (i, j)
interacts when the label depends on (x_i, x_j) jointly beyond what each explains alone; on the
logit scale that is a non-additive term g_ij(x_i, x_j). Two steps:

1. **Additive probe** (``additive_logit``): a main-effects-only logistic model, one weight per
   id of every field plus a linear term on the dense features, fitted by penalized Newton
   backfitting (one diagonal Newton step per field and sweep; for a field's ids the Hessian is
   diagonal on one-hot data, and ``X^T (w * rowsum(X))`` majorizes it on bags, so every step
   lowers the penalized loss). Its logit is the best fit *without* any interaction.
2. **Pair residual tables** (``pair_interactions``): per pair, over the ``top_ids`` most frequent
   ids of each field, the score U_ab = sum (y - p) z_ab and the Fisher information
   I_ab = sum p (1 - p) z_ab^2 of a would-be interaction weight on cell (a, b), z_ab = x_ia x_jb
   (one-hot: 1 on the rows with x_i = a and x_j = b). U / I is the one-step Newton estimate of
   the cell's interaction weight; its row and column effects (what main effects can still
   absorb) are removed by a weighted two-way fit, and S_ij = sum_ab I_ab R_ab^2 / n is the
   Fisher-weighted variance of what is left -- the size, in logit units, of the interaction the
   additive model is missing for that pair (Rao's score statistic for the pair's cell terms,
   divided by n).

Working on the logit scale matters: the sigmoid makes two additive main effects look like an
interaction in probability space, for every pair, which blurs the block structure. The
frequent ids carry most rows (power-law id frequencies), so ``top_ids`` small keeps the noise of
each table (~ its cell count) low while keeping most of the signal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse

from dmtrec.errors import ConfigError, DataError

Progress = Callable[[str], None]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _check(fields: Sequence[scipy.sparse.csr_array], dense: np.ndarray, y: np.ndarray) -> int:
    n = len(y)
    if n == 0:
        raise DataError("no training rows to measure feature interactions on")
    if not fields:
        raise DataError("no sparse features to measure interactions between")
    for f, X in enumerate(fields):
        if X.shape[0] != n:
            raise DataError(f"field {f} has {X.shape[0]} rows, the labels {n}")
    if dense.shape[0] != n:
        raise DataError(f"dense features have {dense.shape[0]} rows, the labels {n}")
    if not (np.all(np.isfinite(y)) and np.all((y >= 0) & (y <= 1))):
        raise DataError("labels must be in [0, 1]")
    return n


def additive_logit(
    fields: Sequence[scipy.sparse.csr_array],
    dense: np.ndarray,
    y: np.ndarray,
    *,
    l2: float = 1.0,
    sweeps: int = 4,
    progress: Progress | None = None,
) -> np.ndarray:
    """Logit (length n) of the main-effects-only logistic model fitted to ``y``.

    ``fields[f]`` is an n x rows_f sparse matrix (one-hot: a single 1 per row; bags: the pooling
    weights); ``dense`` is n x d. ``l2`` is a ridge on the id weights (a pseudo-count: an id
    seen on few rows stays near 0). Each sweep takes one Newton step per field, then one for
    the dense weights and the intercept; ``progress`` gets one line per sweep.
    """
    n = _check(fields, dense, y)
    if sweeps < 1 or not l2 > 0:
        raise ConfigError(f"additive probe needs sweeps >= 1 and l2 > 0, not {sweeps}, {l2}")
    rate = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    eta = np.full(n, np.log(rate / (1 - rate)))
    Z = np.hstack([dense.astype(np.float64), np.ones((n, 1))])
    weights = [np.zeros(X.shape[1]) for X in fields]
    rowsum = [np.asarray(X.sum(axis=1)).ravel() for X in fields]
    XT = [X.T.tocsr() for X in fields]
    for sweep in range(sweeps):
        for f, X in enumerate(fields):
            p = _sigmoid(eta)
            grad = XT[f] @ (y - p) - l2 * weights[f]
            hess = XT[f] @ (p * (1 - p) * rowsum[f]) + l2
            step = grad / hess
            weights[f] += step
            eta += X @ step
        p = _sigmoid(eta)
        H = (Z * (p * (1 - p))[:, None]).T @ Z + 1e-6 * np.eye(Z.shape[1])
        eta += Z @ np.linalg.solve(H, Z.T @ (y - p))
        if progress is not None:
            p = np.clip(_sigmoid(eta), 1e-12, 1 - 1e-12)
            loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
            progress(f"additive probe sweep {sweep + 1}/{sweeps}: train logloss {loss:.4f}")
    return eta


def _two_way_residual(M: np.ndarray, W: np.ndarray, iters: int = 10) -> np.ndarray:
    """M minus its weighted row and column effects (alternating weighted means; W >= 0)."""
    a = np.zeros(M.shape[0])
    b = np.zeros(M.shape[1])
    rw = np.maximum(W.sum(axis=1), 1e-300)
    cw = np.maximum(W.sum(axis=0), 1e-300)
    for _ in range(iters):
        a = (W * (M - b[None, :])).sum(axis=1) / rw
        b = (W * (M - a[:, None])).sum(axis=0) / cw
    return M - a[:, None] - b[None, :]


def pair_interactions(
    fields: Sequence[scipy.sparse.csr_array],
    y: np.ndarray,
    logit: np.ndarray,
    *,
    top_ids: int = 10,
    progress: Progress | None = None,
) -> np.ndarray:
    """F x F matrix S (zero diagonal): the Fisher-weighted variance of each pair's residual
    interaction table over the ``top_ids`` most frequent ids of each field (module docstring)."""
    if top_ids < 2:
        raise ConfigError(f"--pair-top-ids must be >= 2, not {top_ids}")
    n = len(y)
    p = _sigmoid(np.asarray(logit, dtype=np.float64))
    u, w = y - p, p * (1 - p)
    A, Au, A2w = [], [], []
    for X in fields:
        X = scipy.sparse.csc_array(X)
        freq = np.asarray(X.sum(axis=0)).ravel()
        top = np.sort(np.argsort(-freq, kind="stable")[: min(top_ids, X.shape[1])])
        a = X[:, top].tocsr()
        A.append(a.T.tocsr())
        Au.append(scipy.sparse.csr_array(a.multiply(u[:, None])))
        A2w.append(scipy.sparse.csr_array(a.multiply(a).multiply(w[:, None])))
    F = len(fields)
    S = np.zeros((F, F))
    for i in range(F):
        A2i = A[i].multiply(A[i])
        for j in range(i + 1, F):
            U = (A[i] @ Au[j]).toarray()
            info = (A2i @ A2w[j]).toarray()
            M = np.divide(U, info, out=np.zeros_like(U), where=info > 0)
            R = _two_way_residual(M, info)
            S[i, j] = S[j, i] = float((info * R * R).sum() / n)
        if progress is not None and (i + 1) % max(1, F // 4) == 0:
            progress(f"pair tables: field {i + 1}/{F}")
    return S


def covariation_matrix(
    fields: Sequence[scipy.sparse.csr_array],
    dense: np.ndarray,
    y: np.ndarray,
    *,
    top_ids: int = 10,
    l2: float = 1.0,
    sweeps: int = 4,
    progress: Progress | None = None,
) -> np.ndarray:
    """The ``covariation`` S: additive probe, then pair residual tables (module docstring)."""
    y = np.asarray(y, dtype=np.float64)
    dense = np.asarray(dense, dtype=np.float64).reshape(len(y), -1)
    logit = additive_logit(fields, dense, y, l2=l2, sweeps=sweeps, progress=progress)
    return pair_interactions(fields, y, logit, top_ids=top_ids, progress=progress)
