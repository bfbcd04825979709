"""Column-spec tables (CSV with a header, or Parquet), the FuxiCTR habit.

The user names the label column, the dense columns and the sparse columns. Sparse vocabularies
are built from the train file alone, in one pass at construction: each value seen at least
``min_count`` times gets an id 1..V in order of first appearance (deterministic, and the same
for a CSV and a Parquet copy of one table); id 0 stands for missing, rare and unseen values.
The vocabularies are then applied unchanged to valid/test, so evaluation never leaks ids.

Dense values are read as floats (missing -> 0.0) and the label must be 0 or 1. Bad rows are
skipped and counted in ``stats[split]`` like the Criteo reader does; past ``max_bad_rows`` a
``DataError`` names the file and the line (CSV, header = line 1) or row number (Parquet).
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from collections.abc import Iterator

from torchrec.datasets.utils import Batch

from dmtrec.data.base import SPLITS, DataStats, FeatureSpec, shard_batches
from dmtrec.data.stream import (
    BadRow,
    BadRows,
    batch_rows,
    check_batch_args,
    open_lines,
    short_repr,
)
from dmtrec.errors import ConfigError, DataError

FORMATS = ("csv", "parquet")
_PARQUET_READ_ROWS = 65_536  # rows per pyarrow record batch while streaming

Row = tuple[float, list[float], list[str | None]]  # label, dense values, raw sparse values
RawRows = Iterator[tuple[str, list[object] | BadRow]]  # (line or "row N", needed cells)


def infer_format(path: str) -> str:
    """``csv`` for ``.csv``/``.csv.gz``, ``parquet`` for ``.parquet``/``.pq``."""
    name = path.lower().removesuffix(".gz")
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise ConfigError(f"{path}: cannot tell the format from the name; pass --format csv or parquet")


def _sparse_key(value: object) -> str | None:
    """A cell as a vocabulary key (strings, so CSV and Parquet agree); None when missing."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace") or None
    if isinstance(value, float) and math.isnan(value):
        return None  # a Parquet float column uses NaN for missing
    return str(value)


def _float(value: object) -> float:
    """Parse a cell as a float; raises ValueError/TypeError when it is not a number."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return float(value)  # type: ignore[arg-type]


class ColumnTable:
    """A CSV or Parquet table per split, with user-named label, dense and sparse columns.

    ``paths`` maps split (train/valid/test) to one file; train is required (vocabularies).
    ``fmt`` is ``"csv"``, ``"parquet"`` or None to infer it from each file name. After
    construction ``vocab[feature]`` maps a raw value (as a string) to its id and
    ``spec.num_embeddings`` is V + 1 per feature. ``stats[split]`` is reset at each
    ``batches`` call; ``stats["train"]`` first holds the counts of the vocabulary pass.
    """

    def __init__(
        self,
        paths: dict[str, str],
        label: str,
        dense: list[str],
        sparse: list[str],
        fmt: str | None = None,
        min_count: int = 1,
        max_bad_rows: int = 100,
    ) -> None:
        unknown = sorted(set(paths) - set(SPLITS))
        if unknown:
            raise ConfigError(f"unknown split {unknown[0]!r}; use one of {', '.join(SPLITS)}")
        if "train" not in paths:
            raise ConfigError("a train file is required: the vocabularies are built on it")
        if not sparse:
            raise ConfigError("name at least one sparse column")
        columns = [label, *dense, *sparse]
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            raise ConfigError(f"column {repeated[0]!r} is named more than once")
        if fmt is not None and fmt not in FORMATS:
            raise ConfigError(f"--format must be csv or parquet, not {fmt!r}")
        if min_count < 1:
            raise ConfigError("--min-count must be >= 1")
        if max_bad_rows < 0:
            raise ConfigError("--max-bad-rows must be >= 0")
        self.paths = {s: os.fspath(p) for s, p in paths.items()}
        self.formats = {s: fmt or infer_format(p) for s, p in self.paths.items()}
        self.label, self.dense, self.sparse = label, list(dense), list(sparse)
        self.min_count = min_count
        self.max_bad_rows = max_bad_rows
        self._columns = columns
        self._roles = ["label"] + ["dense"] * len(dense) + ["sparse"] * len(sparse)
        for split in self.paths:  # fail on a missing file or column before the long pass
            self._open(split)

        self.stats: dict[str, DataStats] = {s: DataStats() for s in self.paths}
        counts = [Counter[str]() for _ in sparse]  # insertion order = first appearance
        for _, _, keys in self._rows("train", BadRows(self.stats["train"], max_bad_rows)):
            for counter, key in zip(counts, keys):
                if key is not None:
                    counter[key] += 1
        self.vocab: dict[str, dict[str, int]] = {}
        for name, counter in zip(sparse, counts):
            kept = (k for k, n in counter.items() if n >= min_count)
            self.vocab[name] = {k: i for i, k in enumerate(kept, start=1)}
        self.spec = FeatureSpec(
            dense=list(dense),
            sparse=list(sparse),
            num_embeddings=[len(self.vocab[name]) + 1 for name in sparse],
        )

    @property
    def splits(self) -> list[str]:
        """Splits that have files, in train/valid/test order."""
        return [s for s in SPLITS if s in self.paths]

    def batches(
        self, split: str, batch_size: int, rank: int = 0, world_size: int = 1, epoch: int = 0
    ) -> Iterator[Batch]:
        """Stream ``split`` in file order as batches, round-robin sharded over ranks.

        ``epoch`` is accepted for interface parity with the in-memory sources; a stream is
        not shuffled.
        """
        if split not in self.paths:
            raise ConfigError(f"no file given for split {split!r}")
        check_batch_args(batch_size, rank, world_size)
        stats = self.stats[split] = DataStats()
        vocabs = [self.vocab[name] for name in self.sparse]
        rows = (
            (label, dense, [0 if k is None else voc.get(k, 0) for voc, k in zip(vocabs, keys)])
            for label, dense, keys in self._rows(split, BadRows(stats, self.max_bad_rows))
        )
        batches = batch_rows(rows, batch_size, self.sparse, len(self.dense))
        return shard_batches(batches, rank, world_size)

    # -- reading ----------------------------------------------------------------------------
    def _positions(self, path: str, names: list[str]) -> list[int]:
        """1-based file column of each named column; DataError naming an absent one."""
        index: dict[str, int] = {}
        for i, n in enumerate(names):
            index.setdefault(n, i + 1)
        for col, role in zip(self._columns, self._roles):
            if col not in index:
                shown = ", ".join(repr(n) for n in names[:30]) + (" ..." if len(names) > 30 else "")
                raise DataError(
                    f"{path}: no column {col!r} (the {role} column); available: {shown}"
                )
        return [index[c] for c in self._columns]

    def _open(self, split: str) -> tuple[list[int], RawRows]:
        """Read the header/schema now (checking the columns) and return the cell stream."""
        path = self.paths[split]
        if self.formats[split] == "csv":
            return self._open_csv(path)
        return self._open_parquet(path)

    def _open_csv(self, path: str) -> tuple[list[int], RawRows]:
        reader = csv.reader(open_lines(path))
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise DataError(f"{path}:1: bad CSV header: {e}") from None
        if header is None:
            raise DataError(f"{path}: empty file (no header)")
        pos = self._positions(path, header)
        take = [p - 1 for p in pos]

        def cells() -> RawRows:
            try:
                for row in reader:
                    if not row:
                        continue  # blank line
                    where = str(reader.line_num)
                    if len(row) != len(header):
                        yield (
                            where,
                            BadRow(
                                f"expected {len(header)} fields as in the header, got {len(row)}"
                            ),
                        )
                    else:
                        yield where, [row[i] for i in take]
            except csv.Error as e:
                raise DataError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None

        return pos, cells()

    def _open_parquet(self, path: str) -> tuple[list[int], RawRows]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file: {e}") from None
        pos = self._positions(path, pf.schema_arrow.names)
        columns = self._columns

        def cells() -> RawRows:
            n = 0
            try:
                for rb in pf.iter_batches(batch_size=_PARQUET_READ_ROWS, columns=columns):
                    data = rb.to_pydict()
                    for values in zip(*(data[c] for c in columns)):
                        n += 1
                        yield f"row {n}", list(values)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{path}: cannot read Parquet data after row {n}: {e}") from None

        return pos, cells()

    def _rows(self, split: str, bad: BadRows) -> Iterator[Row]:
        """Parsed good rows of ``split``; bad ones go to ``bad`` (which may stop the run)."""
        path = self.paths[split]
        pos, cells = self._open(split)
        seen = 0
        for where, values in cells:
            seen += 1
            try:
                if isinstance(values, BadRow):
                    raise values
                row = self._parse(values, pos)
            except BadRow as err:
                bad.record(path, where, err)
                continue
            bad.stats.rows += 1
            yield row
        if seen == 0:
            raise DataError(f"{path}: no data rows")

    def _parse(self, values: list[object], pos: list[int]) -> Row:
        raw_label = values[0]
        if raw_label is None or raw_label == "":
            raise BadRow("missing label", (pos[0], self.label))
        try:
            label = _float(raw_label)
        except (ValueError, TypeError):
            label = math.nan
        if label not in (0.0, 1.0):
            raise BadRow(f"{short_repr(raw_label)} is not 0 or 1", (pos[0], self.label))
        n_dense = len(self.dense)
        dense: list[float] = []
        for j in range(n_dense):
            v = values[1 + j]
            if v is None or v == "":
                dense.append(0.0)
                continue
            col = (pos[1 + j], self.dense[j])
            try:
                x = _float(v)
            except (ValueError, TypeError):
                raise BadRow(f"{short_repr(v)} is not a number", col) from None
            if not math.isfinite(x):
                raise BadRow(f"{short_repr(v)} is not finite", col)
            dense.append(x)
        keys = [_sparse_key(v) for v in values[1 + n_dense :]]
        return label, dense, keys
