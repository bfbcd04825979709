"""The learned Tower Partitioner of DMT (pure numpy/scipy, no torch).

DMT's TP "embed[s] features in a Euclidean space ... then use[s] a constrained K-Means algorithm".
Our realisation (notes/dmt.md, "Tower partitioner"):

1. ``feature_embedding``: a spectral embedding of the feature-interaction matrix S, so strongly
   interacting features land close together;
2. ``constrained_kmeans``: Lloyd's K-means whose assignment step is an exact MILP (HiGHS through
   ``scipy.optimize.milp``) that keeps every tower non-empty, every tower's cost within
   ``(1 + tolerance)`` of the mean, and, when given, every tower's memory within a host's capacity;
3. ``learned_partition``: both, returning feature indices per tower.

``feature_costs`` builds the per-feature cost to balance; ``imbalance`` and
``adjusted_rand_index`` score a partition. Option names in error messages (``--towers``,
``--imbalance-tolerance``, ``--host-memory``, ``--partition-cost``) are the CLI's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg
import scipy.sparse
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.special import comb

from dmtrec.errors import ConfigError, DataError

COST_VIEWS = ("lookup", "memory", "both")
_MILP_TIME_LIMIT_S = 60.0


# ---------------------------------------------------------------------------------------------
# input checks


def _check_k(k: int, num_features: int) -> None:
    if k < 1:
        raise ConfigError(f"--towers must be >= 1, not {k}")
    if k > num_features:
        raise ConfigError(f"--towers {k} exceeds the number of sparse features ({num_features})")


def _affinity(S: np.ndarray) -> np.ndarray:
    """S validated and cleaned into a symmetric, non-negative affinity with a zero diagonal.

    Negative entries become their magnitude: an interaction score's sign (e.g. a signed
    embedding dot product) says nothing about whether two features belong together.
    """
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise DataError(f"interaction matrix must be square (F x F), not shape {S.shape}")
    if S.shape[0] == 0:
        raise DataError("interaction matrix is empty (no sparse features)")
    bad = np.argwhere(~np.isfinite(S))
    if len(bad):
        i, j = (int(v) for v in bad[0])
        raise DataError(f"interaction matrix has NaN/inf at ({i}, {j})")
    W = np.abs((S + S.T) / 2.0)
    np.fill_diagonal(W, 0.0)
    return W


def _vector(x: object, n: int, what: str) -> np.ndarray:
    """A finite, non-negative length-n float vector, else a DataError naming ``what``."""
    v = np.asarray(x, dtype=np.float64)
    if v.ndim == 0:
        v = np.full(n, float(v))
    if v.shape != (n,):
        raise DataError(f"{what} must have one value per feature ({n}), not shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise DataError(f"{what} has NaN/inf at feature {int(np.argmax(~np.isfinite(v)))}")
    if np.any(v < 0):
        raise DataError(f"{what} is negative at feature {int(np.argmax(v < 0))}")
    return v


def _name(names: Sequence[str] | None, i: int) -> str:
    return repr(str(names[i])) if names is not None else f"#{i}"


# ---------------------------------------------------------------------------------------------
# 1. embedding


def feature_embedding(S: np.ndarray, dim: int) -> np.ndarray:
    """Spectral embedding of the F x F interaction matrix S: an F x ``dim`` array whose rows are
    close for features that interact strongly.

    Why spectral: K-means on these rows approximates the normalized cut of the interaction graph
    (Shi-Malik; Ng-Jordan-Weiss), i.e. towers with much interaction inside and little across --
    what a tower module can exploit. Steps:

    - affinity W = |(S + S^T) / 2| with a zero diagonal (see ``_affinity``), plus a tiny uniform
      off-diagonal affinity (1e-3 of the mean entry; "regularized spectral clustering",
      Amini et al. 2013) so isolated features or disconnected blocks give a unique trivial
      eigenvector instead of an arbitrary basis of the null space;
    - M = D^-1/2 W D^-1/2 (eigenvalue mu of M <-> 1 - mu of the normalized Laplacian); take the
      ``dim + 1`` leading eigenvectors (``scipy.linalg.eigh``) and drop the trivial one
      (~ D^1/2 1, constant after rescaling; it carries no grouping information);
    - scale eigenvector j by max(mu_j, 0) (diffusion-map weighting): with K planted groups only
      K - 1 non-trivial directions carry structure, and the default ``dim = K`` would otherwise
      give a pure within-group-noise direction the same weight as the informative ones;
    - row-normalize (Ng-Jordan-Weiss), removing the sqrt(degree) factor so a feature's position
      depends on *whom* it interacts with, not on how much.

    Columns beyond the F - 1 non-trivial eigenvectors are zero.
    """
    if dim < 1:
        raise ConfigError(f"feature embedding dim must be >= 1, not {dim}")
    W = _affinity(S)
    F = W.shape[0]
    out = np.zeros((F, dim))
    if F == 1:
        return out
    off = ~np.eye(F, dtype=bool)
    mean = W[off].mean()
    W = W + np.where(off, 1e-3 * mean if mean > 0 else 1.0, 0.0)
    d_isqrt = 1.0 / np.sqrt(W.sum(axis=1))
    M = d_isqrt[:, None] * W * d_isqrt[None, :]
    M = (M + M.T) / 2.0
    n = min(dim + 1, F)
    mu, U = scipy.linalg.eigh(M, subset_by_index=[F - n, F - 1])
    mu, U = mu[::-1][1:], U[:, ::-1][:, 1:]  # descending, trivial (mu = 1) dropped
    Y = U * np.clip(mu, 0.0, None)[None, :]
    norms = np.linalg.norm(Y, axis=1, keepdims=True)
    out[:, : Y.shape[1]] = np.divide(Y, norms, out=np.zeros_like(Y), where=norms > 1e-12)
    return out


# ---------------------------------------------------------------------------------------------
# 2. constrained K-means


def _fmt_cap(cap: np.ndarray) -> str:
    if np.all(cap == cap[0]):
        return f"{cap[0]:.0f} bytes"
    return "[" + ", ".join(f"{c:.0f}" for c in cap) + "] bytes"


def _min_max_share(cost: np.ndarray, k: int) -> float:
    """A lower bound on the largest tower cost of any K-tower split (pigeonhole).

    Among the m*K + 1 largest costs some tower holds m + 1, so its cost is at least the sum of
    the m + 1 smallest of them; m = 0 is the largest single feature. Exact for equal costs
    (ceil(F/K) features), so integrality can be reported up front rather than as a bare
    "infeasible" from the solver.
    """
    c = np.sort(cost)[::-1]
    best = cost.sum() / k
    m = 0
    while m * k + 1 <= len(c):
        best = max(best, c[m * k - m : m * k + 1].sum())
        m += 1
    return best


class _Assigner:
    """The exact assignment MILP of one ``constrained_kmeans`` call (constraints built once).

    Variables x[i*K + c] in {0, 1}: feature i in tower c. Constraints: each feature in exactly
    one tower; each tower non-empty; tower cost <= ``bound``; tower memory <= capacity[c].
    """

    def __init__(
        self,
        F: int,
        k: int,
        cost_bound: tuple[np.ndarray, float] | None,
        mem_cap: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        self.F, self.k = F, k
        rows = np.arange(F * k)
        feat, tower = rows // k, rows % k
        one_per_feat = scipy.sparse.csr_array((np.ones(F * k), (feat, rows)), shape=(F, F * k))
        per_tower = scipy.sparse.csr_array((np.ones(F * k), (tower, rows)), shape=(k, F * k))
        self.base = [
            LinearConstraint(one_per_feat, 1, 1),
            LinearConstraint(per_tower, 1, np.inf),
        ]
        self.balance: list[LinearConstraint] = []
        if cost_bound is not None:
            cost, bound = cost_bound
            A = scipy.sparse.csr_array((cost[feat], (tower, rows)), shape=(k, F * k))
            self.balance = [LinearConstraint(A, -np.inf, bound)]
        self.memory: list[LinearConstraint] = []
        if mem_cap is not None:
            mem, cap = mem_cap
            A = scipy.sparse.csr_array((mem[feat], (tower, rows)), shape=(k, F * k))
            self.memory = [LinearConstraint(A, -np.inf, cap)]

    def solve(
        self, dist: np.ndarray | None, *, balance: bool = True, memory: bool = True
    ) -> np.ndarray | None:
        """Solve for the assignment minimizing sum x_ic * dist[i, c] (None: feasibility only);
        returns the labels, or None when infeasible."""
        cons = self.base + (self.balance if balance else []) + (self.memory if memory else [])
        c = np.zeros(self.F * self.k) if dist is None else np.asarray(dist, float).ravel()
        res = milp(
            c,
            constraints=cons,
            integrality=np.ones(self.F * self.k),
            bounds=Bounds(0, 1),
            options={"time_limit": _MILP_TIME_LIMIT_S},
        )
        if res.x is None:  # infeasible (status 2), or no feasible point within the time limit
            return None
        return np.asarray(res.x).reshape(self.F, self.k).argmax(axis=1)


def _kmeanspp(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """K-means++ seeding (Arthur-Vassilvitskii): centers drawn proportional to D(x)^2."""
    F = X.shape[0]
    centers = [X[rng.integers(F)]]
    d2 = ((X - centers[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(F, 1.0 / F)
        centers.append(X[rng.choice(F, p=p)])
        d2 = np.minimum(d2, ((X - centers[-1]) ** 2).sum(axis=1))
    return np.array(centers)


def _sq_dist(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    return ((X[:, None, :] - C[None, :, :]) ** 2).sum(axis=2)


def constrained_kmeans(
    X: np.ndarray,
    k: int,
    cost: np.ndarray | None,
    *,
    tolerance: float = 0.05,
    capacity: float | Sequence[float] | np.ndarray | None = None,
    memory: np.ndarray | None = None,
    seed: int = 0,
    n_init: int = 10,
    max_iter: int = 50,
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """Labels (length F, values 0..k-1) of a balanced, capacity-respecting K-means of X's rows.

    Every assignment step is solved exactly as a MILP (``scipy.optimize.milp``, HiGHS)::

        min  sum_ic x_ic ||X_i - mu_c||^2
        s.t. sum_c x_ic = 1                                   (each feature in one tower)
             sum_i x_ic >= 1                                  (no empty tower)
             sum_i cost_i x_ic <= (1 + tolerance) sum(cost)/k (balance; skipped if cost is None)
             sum_i memory_i x_ic <= capacity_c                (if capacity is given)

    Only an upper cost bound is imposed: it alone caps the slowest/fullest tower, which is what
    limits step time and memory; a lower bound would add infeasibility without helping. The
    centroid step is the mean of each tower's points; each such step and each exact assignment
    step cannot increase the objective, so Lloyd's iteration stops when labels repeat or at
    ``max_iter``. ``n_init`` k-means++ restarts (seeded by ``seed``); the lowest inertia wins.

    Raises ConfigError, naming the option, when the constraints admit no assignment: a single
    feature above the balance bound, a pigeonhole bound above it (e.g. equal costs with F not
    divisible by K), a feature or the total over ``--host-memory``, or an infeasible MILP.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise DataError(f"feature embedding must be a 2-D array (F x dim), not shape {X.shape}")
    if not np.all(np.isfinite(X)):
        raise DataError("feature embedding has NaN/inf values")
    F = X.shape[0]
    _check_k(k, F)
    if not (np.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"--imbalance-tolerance must be a number >= 0, not {tolerance}")
    if n_init < 1 or max_iter < 1:
        raise ConfigError(f"n_init and max_iter must be >= 1, not {n_init} and {max_iter}")

    cost_bound = None
    if cost is not None:
        c = _vector(cost, F, "feature cost")
        total = c.sum()
        if total > 0:
            bound = (1.0 + tolerance) * total / k
            worst = int(np.argmax(c))
            if c[worst] > bound * (1 + 1e-9):
                raise ConfigError(
                    f"feature {_name(names, worst)} alone costs {c[worst] / total:.2f} of the "
                    f"total: no {k}-tower split within imbalance {1 + tolerance:.3g} "
                    f"(needs >= {c[worst] * k / total:.3f}); raise --imbalance-tolerance"
                )
            lb = _min_max_share(c, k)
            if lb > bound * (1 + 1e-9):
                need = lb * k / total
                raise ConfigError(
                    f"every {k}-tower split of these {F} feature costs has a tower >= "
                    f"{need:.3f}x the mean: no split within imbalance {1 + tolerance:.3g}; "
                    f"raise --imbalance-tolerance to >= {need - 1:.3f}"
                )
            cost_bound = (c, bound * (1 + 1e-9))

    mem_cap = None
    if capacity is not None:
        if memory is None:
            raise ConfigError("--host-memory needs the features' memory sizes (table rows x dim)")
        mem = _vector(memory, F, "feature memory")
        cap = np.asarray(capacity, dtype=np.float64)
        cap = np.full(k, float(cap)) if cap.ndim == 0 else cap
        if cap.shape != (k,) or not np.all(np.isfinite(cap)) or np.any(cap <= 0):
            raise ConfigError(
                f"--host-memory must be one positive number or one per tower ({k}), not {capacity}"
            )
        worst = int(np.argmax(mem))
        if mem[worst] > cap.max():
            raise ConfigError(
                f"feature {_name(names, worst)} needs {mem[worst]:.0f} bytes, more than "
                f"--host-memory {_fmt_cap(cap)}"
            )
        if mem.sum() > cap.sum():
            raise ConfigError(
                f"no assignment of {F} features to {k} towers fits --host-memory "
                f"{_fmt_cap(cap)} (total {mem.sum():.0f})"
            )
        mem_cap = (mem, cap)

    solver = _Assigner(F, k, cost_bound, mem_cap)
    if solver.solve(None) is None:  # say which constraint makes it infeasible
        if mem_cap is not None and solver.solve(None, balance=False) is None:
            raise ConfigError(
                f"no assignment of {F} features to {k} towers fits --host-memory "
                f"{_fmt_cap(mem_cap[1])} (total {mem_cap[0].sum():.0f}); raise --host-memory"
            )
        if mem_cap is None or solver.solve(None, memory=False) is None:
            raise ConfigError(
                f"no {k}-tower split of {F} features within imbalance {1 + tolerance:.3g} "
                "exists; raise --imbalance-tolerance"
            )
        raise ConfigError(
            f"no {k}-tower split fits --host-memory {_fmt_cap(mem_cap[1])} and imbalance "
            f"{1 + tolerance:.3g} together; raise --host-memory or --imbalance-tolerance"
        )

    rng = np.random.default_rng(seed)
    best_labels, best_inertia = None, np.inf
    for _ in range(n_init):
        C = _kmeanspp(X, k, rng)
        labels, inertia = None, np.inf
        for _ in range(max_iter):
            new = solver.solve(_sq_dist(X, C))
            if new is None:  # the time limit hit without a feasible point; keep what we have
                break
            if labels is not None and np.array_equal(new, labels):
                break
            new_C = np.stack([X[new == c].mean(axis=0) for c in range(k)])
            new_inertia = float(((X - new_C[new]) ** 2).sum())
            if new_inertia >= inertia - 1e-12:  # no progress (ties or the MILP's gap): stop
                break
            labels, C, inertia = new, new_C, new_inertia
        if labels is not None and inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    if best_labels is None:
        raise ConfigError(
            f"the tower assignment MILP found no solution within {_MILP_TIME_LIMIT_S:.0f} s; "
            "use fewer --towers or raise --imbalance-tolerance"
        )
    return best_labels


# ---------------------------------------------------------------------------------------------
# 3. costs


def feature_costs(
    table_rows: Sequence[float] | np.ndarray | None,
    embedding_dim: int,
    pooling: Sequence[float] | np.ndarray | None,
    view: str = "lookup",
) -> np.ndarray:
    """Per-feature cost to balance across towers.

    - ``memory``: rows_i * D * 4 bytes (fp32 table). A tower's tables live on one host, so memory
      balance decides how many/which tables fit per host.
    - ``lookup``: pooling_i * D (embedding values gathered and, pooled, sent per sample). Lookup
      and all-to-all volume per tower set each host's step time; the slowest host paces all.
    - ``both``: memory/sum(memory) + lookup/sum(lookup), each view normalized to total 1 so
      neither dominates by its units.

    ``table_rows`` may be None for ``lookup``, ``pooling`` None for ``memory``.
    """
    if view not in COST_VIEWS:
        raise ConfigError(
            f"--partition-cost: unknown view {view!r}; choose from lookup, memory, both"
        )
    if embedding_dim < 1:
        raise ConfigError(f"embedding dim must be >= 1, not {embedding_dim}")
    need_rows, need_pool = view in ("memory", "both"), view in ("lookup", "both")
    if need_rows and table_rows is None:
        raise ConfigError(f"--partition-cost {view} needs the tables' row counts")
    if need_pool and pooling is None:
        raise ConfigError(f"--partition-cost {view} needs the features' pooling factors")
    ref = table_rows if table_rows is not None else pooling
    n = len(np.atleast_1d(np.asarray(ref)))
    mem = _vector(table_rows, n, "table rows") * embedding_dim * 4.0 if need_rows else None
    look = _vector(pooling, n, "pooling factor") * embedding_dim if need_pool else None
    if view == "memory":
        return mem
    if view == "lookup":
        return look

    def unit(v: np.ndarray) -> np.ndarray:
        return v / v.sum() if v.sum() > 0 else v

    return unit(mem) + unit(look)


# ---------------------------------------------------------------------------------------------
# 4. the partitioner and scores


def learned_partition(
    S: np.ndarray,
    k: int,
    cost: np.ndarray | None,
    *,
    dim: int | None = None,
    tolerance: float = 0.05,
    memory: np.ndarray | None = None,
    capacity: float | Sequence[float] | np.ndarray | None = None,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> list[list[int]]:
    """DMT's Tower Partitioner: K towers of feature indices from the interaction matrix S.

    Spectral embedding of S (``dim`` defaults to K) then ``constrained_kmeans`` with the given
    cost balance (``cost=None``: towers only non-empty) and optional memory capacity. Towers are
    ordered by their smallest feature index; indices inside a tower ascend. ``names`` (optional)
    only improves error messages.
    """
    W = _affinity(S)
    F = W.shape[0]
    _check_k(k, F)
    X = feature_embedding(W, k if dim is None else dim)
    labels = constrained_kmeans(
        X, k, cost, tolerance=tolerance, memory=memory, capacity=capacity, seed=seed, names=names
    )
    towers = [sorted(int(i) for i in np.flatnonzero(labels == c)) for c in range(k)]
    return sorted(towers, key=lambda t: t[0])


def labels_from_towers(towers: Sequence[Sequence[int]], num_features: int) -> np.ndarray:
    """Tower index per feature from a list of towers of feature indices (each used once)."""
    labels = np.full(num_features, -1)
    for t, members in enumerate(towers):
        for i in members:
            if labels[i] != -1:
                raise DataError(f"feature {i} is in towers {labels[i]} and {t}")
            labels[i] = t
    if np.any(labels < 0):
        raise DataError(f"feature {int(np.argmax(labels < 0))} is in no tower")
    return labels


def imbalance(labels: np.ndarray | Sequence[int], cost: np.ndarray | Sequence[float]) -> float:
    """Max over mean tower cost (1.0 = perfectly balanced) over the towers that occur in labels."""
    labels = np.asarray(labels)
    _, inv = np.unique(labels, return_inverse=True)
    loads = np.bincount(inv.ravel(), weights=np.asarray(cost, dtype=np.float64))
    mean = loads.mean()
    return float(loads.max() / mean) if mean > 0 else 1.0


def adjusted_rand_index(a: np.ndarray | Sequence[int], b: np.ndarray | Sequence[int]) -> float:
    """Hubert-Arabie adjusted Rand index of two labelings (1 = same partition, ~0 = chance).

    From the contingency table n_ij: (sum C(n_ij,2) - E) / ((sum C(a_i,2) + sum C(b_j,2))/2 - E)
    with E = sum C(a_i,2) * sum C(b_j,2) / C(n,2). Label ids are irrelevant. When both labelings
    are all-singletons or both one cluster the formula is 0/0; like scikit-learn we return 1.
    """
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise DataError(f"labelings differ in length ({a.size} vs {b.size})")
    n = a.size
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1 if n else 0, ib.max() + 1 if n else 0), dtype=np.int64)
    np.add.at(table, (ia, ib), 1)
    index = comb(table, 2).sum()
    sum_a, sum_b = comb(table.sum(axis=1), 2).sum(), comb(table.sum(axis=0), 2).sum()
    expected = sum_a * sum_b / comb(n, 2) if n > 1 else 0.0
    max_index = (sum_a + sum_b) / 2.0
    if max_index == expected:
        return 1.0
    return float((index - expected) / (max_index - expected))
