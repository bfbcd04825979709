"""The synthetic generator's required properties (data.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmtrec.data.synthetic import SyntheticConfig, SyntheticData
from dmtrec.errors import ConfigError

SMALL = dict(
    num_sparse=12, num_groups=3, table_size=50, num_train=2000, num_valid=200, num_test=1000
)


def test_same_seed_same_data_other_seed_other_data() -> None:
    a, b = SyntheticData(SyntheticConfig(**SMALL)), SyntheticData(SyntheticConfig(**SMALL))
    c = SyntheticData(SyntheticConfig(**SMALL, seed=1))
    ba, bb, bc = (next(d.batches("train", 64)) for d in (a, b, c))
    assert torch.equal(ba.sparse_features.values(), bb.sparse_features.values())
    assert torch.equal(ba.labels, bb.labels)
    assert not torch.equal(ba.sparse_features.values(), bc.sparse_features.values())


def test_planted_groups_and_interaction_matrix() -> None:
    d = SyntheticData(SyntheticConfig(**SMALL))
    groups = np.array(d.spec.groups)
    assert sorted(np.bincount(groups)) == [4, 4, 4]
    assert not np.array_equal(groups, np.sort(groups))  # shuffled relative to feature order
    s = d.true_interaction()
    assert s.shape == (12, 12) and np.all(np.diag(s) == 0)
    assert np.array_equal(s > 0, (groups[:, None] == groups[None, :]) & ~np.eye(12, dtype=bool))


def test_oracle_auc_bounds_and_base_rate() -> None:
    d = SyntheticData(SyntheticConfig(**SMALL))
    assert 0.75 < d.oracle_auc() < 0.97
    labels = np.concatenate([b.labels.numpy() for b in d.batches("train", 500)])
    assert labels.mean() == pytest.approx(0.25, abs=0.05)


def test_power_law_ids() -> None:
    d = SyntheticData(SyntheticConfig(**{**SMALL, "num_train": 20000}))
    ids = np.concatenate(
        [b.sparse_features["C1"].values().numpy() for b in d.batches("train", 5000)]
    )
    counts = np.sort(np.bincount(ids, minlength=50))[::-1]
    assert counts[0] > 10 * counts[25]  # head ids dominate the tail


def test_interaction_signal_lives_inside_groups() -> None:
    """Mixed second difference of the true logit over a pair of features (change i, change j,
    change both): non-zero for pairs in one planted group, exactly zero across groups."""
    d = SyntheticData(SyntheticConfig(**SMALL))
    _, ids, _, _ = d._splits["train"]
    ids = ids[:500]
    g = np.array(d.spec.groups)

    def mixed(i: int, j: int) -> float:
        def f(ci: bool, cj: bool) -> np.ndarray:
            x = ids.copy()
            if ci:
                x[:, i] = (x[:, i] + 1) % 50
            if cj:
                x[:, j] = (x[:, j] + 1) % 50
            return d._interaction(x)

        return float(
            np.abs(f(True, True) - f(True, False) - f(False, True) + f(False, False)).mean()
        )

    for i in range(12):
        for j in range(i + 1, 12):
            if g[i] == g[j]:
                assert mixed(i, j) > 1e-3
            else:
                assert mixed(i, j) < 1e-9


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_groups=30), "--num-groups 30"),
        (dict(order=4), "--order must be 2 or 3"),
        (dict(table_size=1), "--synthetic-table-size"),
        (dict(order=3, triple_share=1.5), "--triple-share must be in"),
        (dict(order=3, triple_form="cubic"), "--triple-form must be anova or pairprod"),
    ],
)
def test_bad_synthetic_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SyntheticData(SyntheticConfig(**{**SMALL, **kwargs}))


@pytest.mark.parametrize("form", ["anova", "pairprod"])
@pytest.mark.parametrize("share", [0.2, 0.8])
def test_triple_share_sets_the_variance_of_the_third_order(share: float, form: str) -> None:
    cfg = SyntheticConfig(**{**SMALL, "num_test": 20_000}, order=3, triple_share=share)
    cfg.triple_form = form
    d = SyntheticData(cfg)
    _, ids, _, _ = d._splits["test"]
    pair, triple = d._orders(ids)
    vp, vt = (d._order_w[0] * pair).var(), (d._order_w[1] * triple).var()
    assert vt / (vp + vt) == pytest.approx(share, abs=0.05)
    # and the triples are really there: the planted logit is not a function of the pairs alone
    assert np.corrcoef(pair, triple)[0, 1] ** 2 < 0.5


def test_pairprod_triple_is_the_sum_over_feature_triples() -> None:
    """The vectorised 'interaction of interactions' equals the explicit triple loop."""
    cfg = SyntheticConfig(**{**SMALL, "num_test": 50}, order=3, triple_form="pairprod")
    d = SyntheticData(cfg)
    _, ids, _, _ = d._splits["test"]
    _, triple = d._orders(ids)
    u = d._latent[np.arange(12)[None, :], ids]
    want = np.zeros(len(ids))
    for g in range(3):
        f = np.flatnonzero(d.groups == g)
        for a in range(len(f)):
            for b in range(a + 1, len(f)):
                for c in range(b + 1, len(f)):
                    i, j, k = f[a], f[b], f[c]
                    p = lambda x, y: (u[:, x] * u[:, y]).sum(-1)  # noqa: E731
                    want += p(i, j) * p(j, k) + p(i, j) * p(i, k) + p(i, k) * p(j, k)
    np.testing.assert_allclose(triple, want, rtol=1e-10)
