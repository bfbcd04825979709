"""The learned Tower Partitioner (dmtrec.partition.learned): recovery, balance, capacity, errors."""

from __future__ import annotations

import numpy as np
import pytest

from dmtrec.errors import ConfigError, DataError
from dmtrec.partition import sequential
from dmtrec.partition.learned import (
    adjusted_rand_index,
    constrained_kmeans,
    feature_costs,
    feature_embedding,
    imbalance,
    labels_from_towers,
    learned_partition,
)

F, K = 26, 4


def planted_s(seed: int, sigma: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """S for F features in K shuffled planted groups: 1 + noise inside a group, noise across."""
    rng = np.random.default_rng(seed)
    groups = np.arange(F) % K
    rng.shuffle(groups)
    noise = np.abs(rng.normal(0.0, sigma, (F, F)))
    S = (groups[:, None] == groups[None, :]) + (noise + noise.T) / 2
    np.fill_diagonal(S, 0.0)
    return S, groups


def log_uniform_rows(seed: int) -> np.ndarray:
    """Table sizes spread over three orders of magnitude (1e3 .. 1e6 rows)."""
    return np.round(10 ** np.random.default_rng(seed).uniform(3, 6, F))


def within_share(S: np.ndarray, labels: np.ndarray) -> float:
    """Share of the total interaction that stays inside towers."""
    return float(S[labels[:, None] == labels[None, :]].sum() / S.sum())


# --- recovery ------------------------------------------------------------------------------


def test_recovers_planted_groups_and_beats_sequential() -> None:
    seq = labels_from_towers(sequential(list(range(F)), K), F)
    learned_ari, seq_ari = [], []
    for seed in range(5):
        S, groups = planted_s(seed)
        # equal costs: groups of 7/7/6/6 need imbalance 7 / 6.5 = 1.077
        towers = learned_partition(S, K, np.ones(F), tolerance=0.1, seed=seed)
        assert sorted(i for t in towers for i in t) == list(range(F))
        assert [t[0] for t in towers] == sorted(t[0] for t in towers)
        assert all(t == sorted(t) for t in towers)
        learned_ari.append(adjusted_rand_index(labels_from_towers(towers, F), groups))
        seq_ari.append(adjusted_rand_index(seq, groups))
    assert np.mean(learned_ari) >= 0.9
    assert np.mean(seq_ari) < 0.3
    assert np.mean(learned_ari) - np.mean(seq_ari) > 0.6


def test_embedding_puts_group_mates_close() -> None:
    S, groups = planted_s(0)
    X = feature_embedding(S, K)
    assert X.shape == (F, K) and np.all(np.isfinite(X))
    d = np.linalg.norm(X[:, None] - X[None, :], axis=2)
    same = groups[:, None] == groups[None, :]
    off = ~np.eye(F, dtype=bool)
    assert d[same & off].max() < d[~same].min()
    # the embedding only sees |sym(S)|: sign flips and asymmetric halves give the same geometry
    T = np.triu(S) * 2 * np.where(np.random.default_rng(1).random((F, F)) < 0.5, -1, 1)
    np.testing.assert_allclose(np.abs(feature_embedding(T, K)), np.abs(X), atol=1e-8)


# --- ARI -----------------------------------------------------------------------------------


def test_ari_identity_relabeling_and_hand_values() -> None:
    a = np.array([0, 0, 1, 1, 2, 2, 2])
    assert adjusted_rand_index(a, a) == pytest.approx(1.0)
    assert adjusted_rand_index(a, np.array([5, 5, 9, 9, 0, 0, 0])) == pytest.approx(1.0)
    # [0,0,0,1,1,1] vs [0,0,1,1,2,2]: index 2, sum_a 6, sum_b 3, C(6,2)=15, E 1.2, max 4.5
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(8 / 33)
    # [0,0,1,1] vs [0,0,1,2]: index 1, E 1/3, max 1.5 -> 4/7
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 1, 0, 1], [0, 0, 1, 1]) < 0  # worse than chance
    assert adjusted_rand_index([3, 3, 3], [1, 1, 1]) == 1.0  # both one cluster: 0/0 -> 1


def test_imbalance() -> None:
    assert imbalance([0, 0, 1, 1], [1, 1, 1, 1]) == pytest.approx(1.0)
    assert imbalance([0, 0, 0, 1], [1, 1, 1, 1]) == pytest.approx(1.5)


# --- cost balance and memory capacity ------------------------------------------------------


def test_memory_cost_balance_with_tables_over_three_orders_of_magnitude() -> None:
    S, groups = planted_s(3)
    rows = log_uniform_rows(103)
    cost = feature_costs(rows, 16, None, view="memory")
    np.testing.assert_allclose(cost, rows * 16 * 4)
    assert rows.max() / rows.min() > 300
    towers = learned_partition(S, K, cost, tolerance=0.05, seed=3)
    labels = labels_from_towers(towers, F)
    assert imbalance(labels, cost) <= 1.05 + 1e-9
    # balance forces groups apart, but the split still keeps much more interaction inside
    # towers than the feature-order baseline, which is also badly unbalanced
    seq = labels_from_towers(sequential(list(range(F)), K), F)
    assert within_share(S, labels) > within_share(S, seq) + 0.2
    assert imbalance(seq, cost) > 1.3


def test_feature_costs_views() -> None:
    rows, pool = np.array([100.0, 300.0]), np.array([1.0, 3.0])
    np.testing.assert_allclose(feature_costs(rows, 8, pool, "memory"), [3200, 9600])
    np.testing.assert_allclose(feature_costs(None, 8, pool, "lookup"), [8, 24])
    np.testing.assert_allclose(feature_costs(rows, 8, pool, "both"), [0.5, 1.5])
    with pytest.raises(ConfigError, match="--partition-cost"):
        feature_costs(rows, 8, pool, "bytes")
    with pytest.raises(ConfigError, match="pooling"):
        feature_costs(rows, 8, None, "both")


def test_memory_capacity_respected_and_too_small_cap_is_named() -> None:
    S, _ = planted_s(1)
    memory = feature_costs(log_uniform_rows(11), 16, None, view="memory")
    cap = 1.1 * memory.sum() / K
    assert memory.max() < cap
    towers = learned_partition(S, K, None, memory=memory, capacity=cap, seed=1)
    assert all(memory[t].sum() <= cap for t in towers)
    low = 0.95 * memory.sum() / K
    with pytest.raises(ConfigError, match=rf"--host-memory {low:.0f} bytes"):
        learned_partition(S, K, None, memory=memory, capacity=low)


def test_capacity_infeasible_by_packing_and_single_feature() -> None:
    X = np.zeros((3, 2))
    # every feature fits and the total fits (8 <= 9), but no two of {3, 3, 2} share a host
    with pytest.raises(ConfigError, match=r"3 features to 2 towers fits --host-memory 4 bytes"):
        constrained_kmeans(X, 2, None, memory=np.array([3.5, 3.5, 1.0]), capacity=4.0)
    with pytest.raises(ConfigError, match="needs 5 bytes, more than --host-memory 4 bytes"):
        constrained_kmeans(X, 2, None, memory=np.array([5.0, 1.0, 1.0]), capacity=4.0)


def test_balance_infeasible_errors_say_what_to_raise() -> None:
    S, _ = planted_s(0)
    cost = np.ones(F)
    cost[7] = 0.61 / 0.39 * (F - 1)  # feature 7 alone is 61% of the total
    names = [f"C{i}" for i in range(F)]
    with pytest.raises(ConfigError, match=r"feature 'C7' alone costs 0.61 .*--imbalance-tolerance"):
        learned_partition(S, K, cost, names=names)
    # equal costs, 26 features in 4 towers: some tower has 7 = 1.077x the mean of 6.5
    with pytest.raises(ConfigError, match=r"1\.077x the mean.*--imbalance-tolerance to >= 0\.077"):
        learned_partition(S, K, np.ones(F), tolerance=0.05)


# --- bad input -----------------------------------------------------------------------------


def test_bad_inputs() -> None:
    S, _ = planted_s(0)
    with pytest.raises(ConfigError, match="--towers 27 exceeds"):
        learned_partition(S, F + 1, None)
    with pytest.raises(ConfigError, match="--towers must be >= 1"):
        learned_partition(S, 0, None)
    bad = S.copy()
    bad[2, 5] = np.nan
    with pytest.raises(DataError, match=r"interaction matrix has NaN/inf at \(2, 5\)"):
        learned_partition(bad, K, None)
    with pytest.raises(DataError, match="square"):
        learned_partition(S[:, :-1], K, None)
    with pytest.raises(DataError, match="one value per feature"):
        learned_partition(S, K, np.ones(F - 1))


def test_edge_cases_k_equals_f_and_one_tower() -> None:
    S, _ = planted_s(0)
    assert learned_partition(S, F, None) == [[i] for i in range(F)]
    assert learned_partition(S, 1, np.ones(F)) == [list(range(F))]
    assert learned_partition(np.zeros((3, 3)), 2, None) in (
        [[0], [1, 2]],
        [[0, 1], [2]],
        [[0, 2], [1]],
    )
