"""Feature-to-tower partitions (pure numpy): the baselines a learned partition must beat.

- ``sequential``: features in their given order, cut into K contiguous, count-balanced towers;
- ``random``: a seeded random assignment, count-balanced;
- ``planted``: the synthetic data's true interaction groups (an oracle, for experiments).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dmtrec.errors import ConfigError, DataError

METHODS = ("sequential", "random", "planted", "learned")


def _check_k(k: int, num_features: int) -> None:
    if k < 1:
        raise ConfigError(f"--towers must be >= 1, not {k}")
    if k > num_features:
        raise ConfigError(f"--towers {k} exceeds the number of sparse features ({num_features})")


def sequential(features: list[str], k: int) -> list[list[str]]:
    """K contiguous towers whose sizes differ by at most one."""
    _check_k(k, len(features))
    return [list(chunk) for chunk in np.array_split(np.array(features, dtype=object), k)]


def random(features: list[str], k: int, seed: int = 0) -> list[list[str]]:
    """A seeded random permutation cut into K count-balanced towers (kept in feature order)."""
    _check_k(k, len(features))
    perm = np.random.default_rng(seed).permutation(len(features))
    pos = {f: i for i, f in enumerate(features)}
    return [sorted((features[i] for i in c), key=pos.get) for c in np.array_split(perm, k)]


def planted(features: list[str], groups: list[int] | None, k: int) -> list[list[str]]:
    """The planted groups of synthetic data as towers (needs K = number of groups)."""
    if groups is None:
        raise ConfigError("--partition planted needs synthetic data (planted groups)")
    ids = sorted(set(groups))
    if k != len(ids):
        raise ConfigError(f"--partition planted: the data has {len(ids)} groups, not --towers {k}")
    return [[f for f, g in zip(features, groups) if g == gid] for gid in ids]


def make_partition(
    method: str, features: list[str], k: int, groups: list[int] | None = None, seed: int = 0
) -> list[list[str]]:
    """Dispatch on ``--partition``."""
    if method == "sequential":
        return sequential(features, k)
    if method == "random":
        return random(features, k, seed)
    if method == "planted":
        return planted(features, groups, k)
    if method == "learned":  # needs a probe model: resolved by the CLI before training
        raise ConfigError("--partition learned is computed by `dmtrec partition` / `dmtrec train`")
    raise ConfigError(f"--partition: unknown method {method!r}; choose from {', '.join(METHODS)}")


def load_towers(path: str) -> list[list[str]]:
    """Towers from a ``towers.json`` (``{"towers": [[feature, ...], ...]}``)."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    towers = doc.get("towers") if isinstance(doc, dict) else None
    if not isinstance(towers, list) or not all(
        isinstance(t, list) and all(isinstance(f, str) for f in t) for t in towers
    ):
        raise DataError(f'{path}: expected {{"towers": [[feature names], ...]}}')
    return towers
