"""bench exfm's statistics: comparisons paired by (VM, seed), the lag chain, against scipy."""

from __future__ import annotations

import pytest
from scipy import stats

from dmtrec.bench.exfm import _summarize


def _runs() -> list[dict]:
    # NE per (vm, seed): none > plain > aux at lag 0, aux rising with the lag; the seeds'
    # levels differ a lot, so only a test paired by seed sees the small steps.
    level = {("a", 0): 0.90, ("a", 1): 0.95, ("b", 0): 0.80, ("b", 1): 0.99}
    step = {"none": 0.0, "plain": -0.004, "aux": -0.010, "aux_sa": -0.011}
    lag_cost = {0: 0.0, 1: 0.002, 3: 0.006}
    runs = []
    for (vm, seed), base in level.items():
        jitter = 0.0005 * seed - 0.0003 * (vm == "b")
        runs.append(dict(dataset="s", vm=vm, seed=seed, kd="none", fm_lag=None, ne_mean=base))
        for lag in (0, 1, 3):
            for kd in ("plain", "aux", "aux_sa"):
                if kd == "plain" and lag != 0:
                    continue
                ne = base + step[kd] + lag_cost[lag] + (jitter if kd != "plain" else 0.0)
                runs.append(dict(dataset="s", vm=vm, seed=seed, kd=kd, fm_lag=lag, ne_mean=ne))
    return runs


def test_comparisons_are_paired_by_vm_and_seed() -> None:
    runs = _runs()
    out = _summarize(runs, [0, 1, 3], [0])["s"]
    assert set(out) == {"a", "b", "pooled"}

    def ne(kd: str, lag: int | None) -> list[float]:
        rs = [r for r in runs if r["kd"] == kd and (kd == "none" or r["fm_lag"] == lag)]
        return [r["ne_mean"] for r in sorted(rs, key=lambda r: (r["vm"], r["seed"]))]

    t = out["pooled"]["tests"]
    expect = stats.ttest_rel(ne("aux", 0), ne("plain", 0), alternative="less").pvalue
    assert t["aux@lag0 < plain@lag0"]["p_value"] == pytest.approx(expect)
    assert t["aux@lag0 < plain@lag0"]["n"] == 4 and t["aux@lag0 < plain@lag0"]["wins"] == 4
    gains = [100 * (y - x) / y for x, y in zip(ne("plain", 0), ne("none", None))]
    assert t["plain@lag0 < none"]["mean_gain_pct"] == pytest.approx(sum(gains) / 4)
    # the lag chain: each lag against the next, and the first against the last
    assert [k for k in t if k.startswith("aux@lag") and "< aux@" in k] == [
        "aux@lag0 < aux@lag1",
        "aux@lag1 < aux@lag3",
        "aux@lag0 < aux@lag3",
    ]
    assert t["aux@lag1 < aux@lag3"]["p_value"] < 1e-3
    assert out["a"]["mean_ne"]["aux@lag3"] == pytest.approx(
        (0.90 + 0.95) / 2 - 0.010 + 0.006 + 0.00025
    )
