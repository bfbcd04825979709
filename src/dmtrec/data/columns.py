"""Column-spec tables (CSV with a header, or Parquet), the FuxiCTR habit.

The user names the label column, the dense columns and the sparse columns. Sparse vocabularies
are built from the train files alone, in one pass at construction: each value seen at least
``min_count`` times gets an id 1..V in order of first appearance (deterministic, and the same
for a CSV and a Parquet copy of one table); id 0 stands for missing, rare and unseen values.
The vocabularies are then applied unchanged to valid/test, so evaluation never leaks ids.

**Multi-hot** columns (``multi_hot``) hold a bag of values per row: in a CSV cell separated by
``multi_hot_sep`` (``a|b|c``; empty items are dropped, an empty cell is an empty bag); in
Parquet a list column (a list-typed column is multi-hot whether named or not). Each item is
looked up in the column's vocabulary, so the feature's KJT lengths are the bag sizes.

Dense values are read as floats (missing -> 0.0) and the label must be 0 or 1. Bad rows are
skipped and counted in ``stats[split]`` like the Criteo reader does; past ``max_bad_rows`` a
``DataError`` names the file and the line (CSV, header = line 1) or row number (Parquet).

**Parsing** is vectorised with pyarrow: ``pyarrow.csv`` converts a block of lines (label and
dense as float64, sparse as strings), Parquet row groups are read as Arrow columns, and the
vocabulary is counted (``value_counts`` merged with a hash ``group_by``) and applied
(``index_in``) by Arrow kernels. A block whose fast parse fails is re-scanned row by row with
the reference parser (the ``csv`` module), which gives the exact messages. Note that
``index_in`` hashes the vocabulary once per parse call: with vocabularies of millions of
values, preprocess the table once (``dmtrec preprocess``) rather than train from the CSV.
On several ranks, each rank counts the vocabulary over all train rows (it must know every id
before the first batch); preprocessing does that once too.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from dmtrec.data.base import SPLITS, DataStats, FeatureSpec, Jagged, Rows
from dmtrec.data.progress import Progress, with_progress
from dmtrec.data.shard import BlockSource, block_permutation
from dmtrec.data.stream import BadRow, BadRows, short_repr
from dmtrec.data.text import TextBlock, TextFile, epoch_blocks
from dmtrec.errors import ConfigError, DataError

if TYPE_CHECKING:
    pass

FORMATS = ("csv", "parquet")
BLOCK_BYTES = 8 << 20
RESCAN_ROWS = 256  # a failing parse is halved down to this many rows, then re-scanned


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


@dataclass
class RawColumns:
    """Good rows of a block before the vocabulary lookup.

    ``keys[j]`` is a string array (null = missing) for a one-hot column, or for a multi-hot
    one ``(lengths, items)``: the bag size per row and all items (no nulls, no empties)."""

    labels: np.ndarray
    dense: np.ndarray
    keys: list[pa.Array | tuple[np.ndarray, pa.Array]]

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(parts: list[RawColumns]) -> RawColumns:
        if len(parts) == 1:
            return parts[0]
        keys: list[pa.Array | tuple[np.ndarray, pa.Array]] = []
        for cols in zip(*(p.keys for p in parts)):
            if isinstance(cols[0], tuple):
                keys.append(
                    (
                        np.concatenate([c[0] for c in cols]),  # type: ignore[index]
                        pa.concat_arrays([c[1] for c in cols]),  # type: ignore[index]
                    )
                )
            else:
                keys.append(pa.concat_arrays(list(cols)))  # type: ignore[arg-type]
        return RawColumns(
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.dense for p in parts]),
            keys,
        )


class Vocabulary:
    """Counts of a column's values in first-appearance order, merged with Arrow kernels."""

    def __init__(self) -> None:
        self._parts: list[tuple[pa.Array, pa.Array, pa.Array]] = []
        self._seen = 0  # values (counted uniques of blocks) added so far: the order key
        self._pending = 0
        self._merged = 0

    def add(self, values: pa.Array) -> None:
        """Count ``values`` (non-null strings), after all values added before."""
        if len(values) == 0:
            return
        vc = pc.value_counts(values)  # uniques in order of first appearance
        u, c = vc.field("values"), vc.field("counts")
        order = pa.array(np.arange(self._seen, self._seen + len(u), dtype=np.int64))
        self._seen += len(u)
        self._parts.append((u, c, order))
        self._pending += len(u)
        if self._pending > max(1 << 20, 2 * self._merged):
            self._merge()

    def _merge(self) -> None:
        if len(self._parts) <= 1:
            return
        t = pa.table(
            {
                "v": pa.chunked_array([p[0] for p in self._parts]),
                "c": pa.chunked_array([p[1] for p in self._parts]),
                "o": pa.chunked_array([p[2] for p in self._parts]),
            }
        )
        g = t.group_by("v", use_threads=False).aggregate([("c", "sum"), ("o", "min")])
        self._parts = [
            (g["v"].combine_chunks(), g["c_sum"].combine_chunks(), g["o_min"].combine_chunks())
        ]
        self._merged = len(g)
        self._pending = 0

    def kept(self, min_count: int) -> pa.Array:
        """Values seen at least ``min_count`` times, in order of first appearance."""
        self._merge()
        if not self._parts:
            return pa.array([], type=pa.string())
        v, c, o = self._parts[0]
        keep = pc.greater_equal(c, min_count)
        v, o = v.filter(keep), o.filter(keep)
        return v.take(pc.sort_indices(o))


def lookup(keys: pa.Array, vocab: pa.Array) -> np.ndarray:
    """Ids of ``keys`` in ``vocab`` (1-based; 0 for missing or unknown), int64."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    idx = pc.index_in(keys, value_set=vocab)
    return np.asarray(pc.fill_null(idx, -1), dtype=np.int64) + 1


def _as_strings(arr: pa.Array) -> pa.Array:
    """A key column as strings (null = missing): numbers print as ``str`` would, NaN is missing."""
    if pa.types.is_floating(arr.type):
        arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, arr.type), arr)
        text = arr.cast(pa.string())
        # Arrow prints 5.0 as "5", Python's str as "5.0" (the CSV habit): add the ".0"
        integral = pc.match_substring_regex(text, r"^-?[0-9]+$")
        dotted = pc.binary_join_element_wise(text, pa.scalar(".0"), pa.scalar(""))
        arr = pc.if_else(integral, dotted, text)
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        arr = arr.cast(pa.large_binary()).cast(pa.large_string())  # may raise: not UTF-8
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.string())
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)


def _bag(lists: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(lengths, items) of a list array of keys: null lists and null/empty items dropped."""
    n = len(lists)
    items = _as_strings(pc.list_flatten(lists))
    parents = np.asarray(pc.list_parent_indices(lists))
    keep = np.asarray(items.is_valid())
    lengths = np.bincount(parents[keep], minlength=n).astype(np.int32)
    return lengths, items.filter(pa.array(keep))


class _CsvFile(TextFile):
    """A CSV file of a split: the header's column positions of the needed columns."""

    def __init__(self, table: ColumnTable, path: str, index: int) -> None:
        super().__init__(path, index, header=True, block_bytes=table.block_bytes)
        self.table = table
        if self.header_text is None:
            raise DataError(f"{path}: empty file (no header)")
        try:
            header = next(csv.reader([self.header_text]))
        except csv.Error as e:
            raise DataError(f"{path}:1: bad CSV header: {e}") from None
        self.header = header
        self.pos = table._positions(path, header)
        # Unique names for pyarrow (a repeated header name keeps its first column).
        self.names = [n if n not in header[:i] else f"{n}\0{i}" for i, n in enumerate(header)]
        self.take = [p - 1 for p in self.pos]
        needed = [self.names[i] for i in self.take]
        types = {needed[0]: pa.float64()}
        types.update({c: pa.float64() for c in needed[1 : 1 + len(table.dense)]})
        types.update({c: pa.string() for c in needed[1 + len(table.dense) :]})
        self.needed = needed
        self.convert = pa_csv.ConvertOptions(
            include_columns=needed,
            column_types=types,
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        )

    def where(self, block: TextBlock, records: np.ndarray) -> list[str]:
        return [str(x) for x in block.line_numbers(records)]


class _ParquetFile:
    """A Parquet file of a split: its row groups are the blocks."""

    def __init__(self, table: ColumnTable, path: str, index: int) -> None:
        import pyarrow.parquet as pq

        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        try:
            self.pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file: {e}") from None
        self.path, self.index, self.table = path, index, table
        self.size = os.path.getsize(path)
        schema = self.pf.schema_arrow
        self.pos = table._positions(path, schema.names)
        self.list_columns = {
            name
            for name in table.sparse
            if pa.types.is_list(schema.field(name).type)
            or pa.types.is_large_list(schema.field(name).type)
        }
        md = self.pf.metadata
        self.group_rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        self.group_start = np.concatenate([[0], np.cumsum(self.group_rows)]).astype(np.int64)

    def units(self) -> list[int]:
        return list(range(len(self.group_rows)))

    def read_unit(self, unit: int) -> Iterator[_ParquetBlock]:
        try:
            data = self.pf.read_row_group(unit, columns=self.table._columns, use_threads=False)
        except (pa.ArrowException, OSError) as e:
            row = int(self.group_start[unit])
            raise DataError(f"{self.path}: cannot read Parquet data after row {row}: {e}") from None
        yield _ParquetBlock(self, unit, data)


class _ParquetBlock:
    def __init__(self, file: _ParquetFile, group: int, data: pa.Table) -> None:
        self.file, self.group, self.data = file, group, data
        self.n = data.num_rows
        self.key = (file.index, group)
        self.file_bytes = file.size // max(1, len(file.group_rows))

    def where(self, records: np.ndarray) -> list[str]:
        return [f"row {x}" for x in (self.file.group_start[self.group] + records + 1).tolist()]


class ColumnTable(BlockSource):
    """CSV or Parquet tables per split, with user-named label, dense and sparse columns.

    ``paths`` maps split (train/valid/test) to a file or a list of files; train is required
    (vocabularies). ``fmt`` is ``"csv"``, ``"parquet"`` or None to infer it from each file
    name. After construction ``vocab_values[feature]`` holds the kept values (id = position
    + 1; ``vocab`` gives them as dicts) and ``spec.num_embeddings`` is V + 1 per feature.
    ``stats[split]`` is reset at each ``batches`` call; ``stats["train"]`` first holds the
    counts of the vocabulary pass. ``shuffle`` permutes the train split every epoch from
    ``seed`` (see ``dmtrec.data.shard``).
    """

    def __init__(
        self,
        paths: dict[str, str | list[str]],
        label: str,
        dense: list[str],
        sparse: list[str],
        fmt: str | None = None,
        min_count: int = 1,
        max_bad_rows: int = 100,
        multi_hot: list[str] | None = None,
        multi_hot_sep: str = "|",
        shuffle: bool = False,
        seed: int = 0,
        block_bytes: int = BLOCK_BYTES,
        pooling: str = "sum",
        progress_every: float = 0.0,
        vocab_values: dict[str, pa.Array] | None = None,
    ) -> None:
        unknown = sorted(set(paths) - set(SPLITS))
        if unknown:
            raise ConfigError(f"unknown split {unknown[0]!r}; use one of {', '.join(SPLITS)}")
        if "train" not in paths and vocab_values is None:
            raise ConfigError("a train file is required: the vocabularies are built on it")
        if not sparse:
            raise ConfigError("name at least one sparse column")
        columns = [label, *dense, *sparse]
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            raise ConfigError(f"column {repeated[0]!r} is named more than once")
        multi_hot = list(multi_hot or [])
        for c in multi_hot:
            if c not in sparse:
                raise ConfigError(f"--multi-hot {c!r} is not one of the --sparse columns")
        if not multi_hot_sep:
            raise ConfigError("--multi-hot-sep must not be empty")
        if fmt is not None and fmt not in FORMATS:
            raise ConfigError(f"--format must be csv or parquet, not {fmt!r}")
        if min_count < 1:
            raise ConfigError("--min-count must be >= 1")
        if max_bad_rows < 0:
            raise ConfigError("--max-bad-rows must be >= 0")
        if block_bytes < 1:
            raise ConfigError("--block-mb must be > 0")
        if seed < 0:
            raise ConfigError(f"--shuffle-seed must be >= 0, not {seed}")
        self.paths = {
            s: [os.fspath(p)] if isinstance(p, (str, os.PathLike)) else [os.fspath(f) for f in p]
            for s, p in paths.items()
        }
        for split, files in self.paths.items():
            if not files:
                raise ConfigError(f"no files given for split {split!r}")
        self.formats = {
            s: [fmt or infer_format(p) for p in files] for s, files in self.paths.items()
        }
        self.label, self.dense, self.sparse = label, list(dense), list(sparse)
        self.min_count = min_count
        self.max_bad_rows = max_bad_rows
        self.multi_hot_sep = multi_hot_sep
        self.shuffle, self.seed, self.block_bytes = shuffle, seed, block_bytes
        self.progress_every = progress_every
        self._columns = columns
        self._roles = ["label"] + ["dense"] * len(dense) + ["sparse"] * len(sparse)
        # Open every file now: a missing file or column fails before the long pass.
        self._files = {s: self._open(s) for s in self.paths}
        listed = {
            c
            for f in self._files.get("train", [])
            if isinstance(f, _ParquetFile)
            for c in f.list_columns
        }
        self._multi = [c in multi_hot or c in listed for c in sparse]

        self.stats: dict[str, DataStats] = {s: DataStats() for s in self.paths}
        if vocab_values is None:
            vocab_values = self._count_vocabularies()
        self.vocab_values = {name: vocab_values[name] for name in sparse}
        self.spec = FeatureSpec(
            dense=list(dense),
            sparse=list(sparse),
            num_embeddings=[len(self.vocab_values[name]) + 1 for name in sparse],
            multi_hot=[c for c, m in zip(sparse, self._multi) if m],
            pooling=pooling,
        )

    def _count_vocabularies(self) -> dict[str, pa.Array]:
        """One pass over the train files: each column's values kept by ``min_count``."""
        vocabs = [Vocabulary() for _ in self.sparse]
        bad = BadRows(self.stats["train"], self.max_bad_rows)
        total = sum(os.path.getsize(p) for p in self.paths["train"])
        progress = Progress("vocabulary pass over train", total, self.progress_every)
        for block in self._blocks("train", 0, bad, shuffle=False):
            raw, _ = block.parse_raw(np.arange(block.n), True)
            self.stats["train"].rows += len(raw)
            for vocab, keys in zip(vocabs, raw.keys):
                vocab.add(keys[1] if isinstance(keys, tuple) else keys.drop_null())
            progress.update(block.n, block.file_bytes)
        progress.done()
        return {name: v.kept(self.min_count) for name, v in zip(self.sparse, vocabs)}

    def file_blocks(self, split: str, index: int, bad: BadRows) -> Iterator[_Block]:
        """The blocks of one file of ``split`` in file order (for preprocessing)."""
        f = self._files[split][index]
        seen = 0
        for u in f.units():
            for block in f.read_unit(u):
                seen += block.n
                yield _Block(self, block, None, bad)
        if seen == 0:
            raise DataError(f"{f.path}: no data rows")

    @property
    def vocab(self) -> dict[str, dict[str, int]]:
        """``feature -> {value: id}`` (built on demand: for inspection and small tables)."""
        return {
            name: {v: i for i, v in enumerate(values.to_pylist(), start=1)}
            for name, values in self.vocab_values.items()
        }

    @property
    def splits(self) -> list[str]:
        """Splits that have files, in train/valid/test order."""
        return [s for s in SPLITS if s in self.paths]

    def split_blocks(self, split: str, epoch: int, stats: DataStats, rank: int) -> Iterator[_Block]:
        """The split's blocks in epoch order (shuffled: train), with read progress on rank 0."""
        if split not in self.paths:
            raise ConfigError(f"no file given for split {split!r}")
        shuffle = self.shuffle and split == "train"
        blocks: Iterator[_Block] = self._blocks(
            split, epoch, BadRows(stats, self.max_bad_rows), shuffle
        )
        if self.progress_every > 0 and rank == 0:
            total = sum(os.path.getsize(p) for p in self.paths[split])
            blocks = with_progress(blocks, f"reading {split}", total, self.progress_every)
        return blocks

    def to_rows(self, raw: RawColumns) -> Rows:
        """Apply the vocabularies: the rows' ids."""
        sparse: list[np.ndarray | Jagged] = []
        for name, keys in zip(self.sparse, raw.keys):
            if isinstance(keys, tuple):
                lengths, items = keys
                sparse.append(Jagged(lengths, lookup(items, self.vocab_values[name])))
            else:
                sparse.append(lookup(keys, self.vocab_values[name]))
        if not any(self._multi):
            sparse_arr = np.stack(sparse) if sparse else np.zeros((0, len(raw)), np.int64)
            return Rows(raw.labels, raw.dense, sparse_arr)
        return Rows(raw.labels, raw.dense, sparse)

    # -- files and blocks -------------------------------------------------------------------
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

    def _open(self, split: str) -> list[_CsvFile | _ParquetFile]:
        files: list[_CsvFile | _ParquetFile] = []
        for i, (path, fmt) in enumerate(zip(self.paths[split], self.formats[split])):
            files.append(_CsvFile(self, path, i) if fmt == "csv" else _ParquetFile(self, path, i))
        return files

    def _blocks(self, split: str, epoch: int, bad: BadRows, shuffle: bool) -> Iterator[_Block]:
        files = self._files[split]
        counts = [0] * len(files)
        for block in epoch_blocks(files, shuffle, self.seed, epoch):  # type: ignore[arg-type]
            file = block.file
            counts[file.index] += block.n
            order = block_permutation(self.seed, epoch, block.key, block.n) if shuffle else None
            yield _Block(self, block, order, bad)
        for f, c in zip(files, counts):
            if c == 0:
                raise DataError(f"{f.path}: no data rows")

    # -- parsing ----------------------------------------------------------------------------
    def convert_columns(self, cols: list[pa.Array]) -> RawColumns | None:
        """Vectorised conversion of (label, dense..., sparse...) columns; None if a row is bad."""
        n = len(cols[0]) if cols else 0
        try:
            label = cols[0]
            if label.null_count:
                return None
            labels = np.asarray(label.cast(pa.float64()))
            if np.any((labels != 0.0) & (labels != 1.0)):
                return None  # not 0/1, NaN included
            nd = len(self.dense)
            dense = np.zeros((n, nd), dtype=np.float32)
            for j, col in enumerate(cols[1 : 1 + nd]):
                x = np.asarray(col.cast(pa.float64()).fill_null(0.0))
                if not np.isfinite(x).all():
                    return None
                dense[:, j] = x
            keys: list[pa.Array | tuple[np.ndarray, pa.Array]] = []
            for j, col in enumerate(cols[1 + nd :]):
                if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                    keys.append(_bag(col))
                elif self._multi[j]:
                    keys.append(_bag(pc.split_pattern(_as_strings(col), self.multi_hot_sep)))
                else:
                    keys.append(_as_strings(col))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return None
        return RawColumns(labels.astype(np.float32), dense, keys)

    def parse_values(self, values: list[object], pos: list[int]) -> tuple[float, list[float], list]:
        """The reference parser of one row's needed cells (raises ``BadRow``)."""
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
        keys: list = []
        for j, v in enumerate(values[1 + n_dense :]):
            if not self._multi[j]:
                keys.append(_sparse_key(v))
            elif isinstance(v, (list, tuple)):
                keys.append([k for k in map(_sparse_key, v) if k is not None])
            else:
                key = _sparse_key(v)
                keys.append([] if key is None else [k for k in key.split(self.multi_hot_sep) if k])
        return label, dense, keys

    def raw_from_rows(self, rows: list[tuple[float, list[float], list]]) -> RawColumns:
        """``RawColumns`` of rows parsed by the reference parser."""
        n = len(rows)
        labels = np.asarray([r[0] for r in rows], dtype=np.float32)
        dense = np.asarray([r[1] for r in rows], dtype=np.float32).reshape(n, len(self.dense))
        keys: list[pa.Array | tuple[np.ndarray, pa.Array]] = []
        for j in range(len(self.sparse)):
            cells = [r[2][j] for r in rows]
            if self._multi[j]:
                lengths = np.asarray([len(c) for c in cells], dtype=np.int32)
                keys.append((lengths, pa.array([k for c in cells for k in c], type=pa.string())))
            else:
                keys.append(pa.array(cells, type=pa.string()))
        return RawColumns(labels, dense, keys)


class _Block:
    """A block (CSV lines or a Parquet row group) parsed on demand (see ``shard.Block``)."""

    def __init__(
        self,
        table: ColumnTable,
        block: TextBlock | _ParquetBlock,
        order: np.ndarray | None,
        bad: BadRows,
    ) -> None:
        self.table, self.block, self.order, self.bad = table, block, order, bad
        self.n = block.n
        self.file_bytes = block.file_bytes

    def parse(self, records: np.ndarray, report: bool) -> tuple[RawColumns, np.ndarray]:
        """The good records' columns before the lookup: ``finish`` looks a whole wave up."""
        return self.parse_raw(records, report)

    def finish(self, raw: RawColumns) -> Rows:
        return self.table.to_rows(raw)

    def parse_raw(self, records: np.ndarray, report: bool) -> tuple[RawColumns, np.ndarray]:
        """Fast parse; if it fails, halve and retry down to ``RESCAN_ROWS`` rows re-scanned
        one by one (as the Criteo reader does)."""
        raw = self._fast(records)
        if raw is not None and len(raw) == len(records):
            return raw, np.ones(len(records), dtype=bool)
        if len(records) <= RESCAN_ROWS:
            return self._rescan(records, report)
        mid = len(records) // 2
        a, ga = self.parse_raw(records[:mid], report)
        b, gb = self.parse_raw(records[mid:], report)
        return RawColumns.concat([a, b]), np.concatenate([ga, gb])

    def _fast(self, records: np.ndarray) -> RawColumns | None:
        block = self.block
        if isinstance(block, _ParquetBlock):
            data = block.data.take(pa.array(records, type=pa.int64()))
            cols = [data.column(c).combine_chunks() for c in self.table._columns]
            return self.table.convert_columns(cols)
        file = block.file
        assert isinstance(file, _CsvFile)
        read = pa_csv.ReadOptions(column_names=file.names, use_threads=False, block_size=1 << 20)
        try:
            t = pa_csv.read_csv(
                pa.BufferReader(block.lines(records)),
                read_options=read,
                parse_options=pa_csv.ParseOptions(newlines_in_values=False),
                convert_options=file.convert,
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None
        return self.table.convert_columns([t.column(c).combine_chunks() for c in file.needed])

    def _rescan(self, records: np.ndarray, report: bool) -> tuple[RawColumns, np.ndarray]:
        """Row-by-row parse of ``records`` with the reference parser: exact messages."""
        table, block = self.table, self.block
        good = np.zeros(len(records), dtype=bool)
        rows: list[tuple[float, list[float], list]] = []
        if isinstance(block, _ParquetBlock):
            file: Any = block.file
            data = block.data.take(pa.array(records, type=pa.int64())).to_pydict()
            cells = [list(v) for v in zip(*(data[c] for c in table._columns))]
            where = block.where(records) if report else None
            width = None
        else:
            file = block.file
            where = file.where(block, records) if report else None
            cells = []
            width = len(file.header)
            for line in block.line_texts(records):
                try:
                    row = next(csv.reader([line]))
                except csv.Error as e:
                    row = BadRow(f"malformed CSV: {e}")
                cells.append(row)
        for i, row in enumerate(cells):
            try:
                if isinstance(row, BadRow):
                    raise row
                if width is not None:
                    if len(row) != width:
                        raise BadRow(f"expected {width} fields as in the header, got {len(row)}")
                    row = [row[k] for k in file.take]
                parsed = table.parse_values(row, file.pos)
            except BadRow as err:
                if where is not None:
                    self.bad.record(file.path, where[i], err)
                continue
            good[i] = True
            rows.append(parsed)
        return table.raw_from_rows(rows), good
