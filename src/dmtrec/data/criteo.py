"""Reader for Criteo Kaggle / Terabyte click logs (tab separated, optionally gzipped).

Each row is ``label \\t I1..I13 \\t C1..C26``: a 0/1 label, 13 integer counts (may be empty or
negative) and 26 categorical hashes written as hex (may be empty). Files are tens of GB: they
are read in blocks (``dmtrec.data.text``), and each rank parses only its own rows
(``dmtrec.data.shard``).

Preprocessing (the usual DLRM recipe): dense ``x -> log(1 + max(x, 0))``, missing -> 0;
categorical ``id = 1 + int(hex, 16) % (table_size - 1)``, missing -> 0 (a reserved id).

**Parsing** is vectorised: ``pyarrow.csv`` splits and converts a block of lines (label int8,
counts int64, hashes as 8-byte fixed-size binary; quoting off, as Criteo has none) and numpy
does the rest with no per-field Python: the 26 hash columns are viewed as one array of
little-endian 64-bit words, each word's eight hex characters are validated and packed into a
32-bit value with a few SWAR (SIMD-within-a-register) integer operations, then hashed into the
tables; hashes of other lengths (up to 16 digits) take a per-character numpy path.

**Bad rows** are skipped and counted in ``stats[split]``; past ``max_bad_rows`` a ``DataError``
stops the run, naming the file and line. A block whose fast parse fails (pyarrow rejects a
value, a label is not 0/1, a hash is not hex) is re-scanned line by line with the reference
parser, which gives the exact message (``file:line:col N (name): reason``); only such blocks
pay for it."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from dmtrec.data.base import SPLITS, DataStats, FeatureSpec, Rows
from dmtrec.data.progress import with_progress
from dmtrec.data.shard import BlockSource, block_permutation
from dmtrec.data.stream import BadRow, BadRows, short_repr
from dmtrec.data.text import TextBlock, TextFile, epoch_blocks
from dmtrec.errors import ConfigError, DataError

if TYPE_CHECKING:
    pass

NUM_DENSE = 13
NUM_SPARSE = 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
DENSE_NAMES = [f"I{i + 1}" for i in range(NUM_DENSE)]
SPARSE_NAMES = [f"C{i + 1}" for i in range(NUM_SPARSE)]
BLOCK_BYTES = 8 << 20
RESCAN_ROWS = 256  # a failing parse is halved down to this many lines, then re-scanned

_COLUMNS = ["label", *DENSE_NAMES, *SPARSE_NAMES]
_PARSE = pa_csv.ParseOptions(
    delimiter="\t", quote_char=False, double_quote=False, escape_char=False
)


def _convert(sparse_type: pa.DataType) -> pa_csv.ConvertOptions:
    # The label as one byte, checked to be '0' or '1' below: exactly what the reference parser
    # accepts (an integer type would also take '01' or '+1').
    types = {"label": pa.binary(1), **{n: pa.int64() for n in DENSE_NAMES}}
    types.update({n: sparse_type for n in SPARSE_NAMES})
    return pa_csv.ConvertOptions(
        column_types=types, null_values=[""], strings_can_be_null=True, check_utf8=False
    )


_CONVERT_HEX8 = _convert(pa.binary(8))
_CONVERT_HEX = _convert(pa.binary())


def read_tsv(buffer: pa.Buffer, convert: pa_csv.ConvertOptions) -> pa.Table:
    """``pyarrow.csv`` on complete Criteo lines, one thread. Its parse blocks are kept small
    (512 KiB, chunks of ~2k rows): measured 2x faster than one big block (cache), and the
    numpy conversion below then works chunk by chunk, in cache too."""
    read = pa_csv.ReadOptions(column_names=_COLUMNS, use_threads=False, block_size=512 << 10)
    return pa_csv.read_csv(
        pa.BufferReader(buffer), read_options=read, parse_options=_PARSE, convert_options=convert
    )


def validity(arr: pa.Array) -> np.ndarray:
    """Non-null mask of an Arrow array, from its validity bitmap."""
    if arr.null_count == 0:
        return np.ones(len(arr), dtype=bool)
    bits = np.frombuffer(arr.buffers()[0], dtype=np.uint8)
    return np.unpackbits(bits, bitorder="little")[arr.offset : arr.offset + len(arr)].view(bool)


def validities(cols: list[pa.Array], n: int) -> np.ndarray:
    """Non-null masks of equal-length arrays, (len(cols), n): one unpack for all bitmaps."""
    nbytes = (n + 7) // 8
    if any(c.offset for c in cols):
        return np.stack([validity(c) for c in cols])
    bits = np.full((len(cols), nbytes), 0xFF, dtype=np.uint8)
    for j, c in enumerate(cols):
        if c.null_count:
            bits[j] = np.frombuffer(c.buffers()[0], dtype=np.uint8, count=nbytes)
    return np.unpackbits(bits, axis=1, count=n, bitorder="little").view(bool)


# -- vectorised hex ---------------------------------------------------------------------------
def _u64(x: int) -> np.uint64:
    return np.uint64(x)


_BYTES = 0x0101010101010101
_HIGH = _u64(0x80 * _BYTES)
_ZERO8 = _u64(0x30 * _BYTES)  # "00000000": stands in for a missing hash while validating


_LOWER = _u64(0x20 * _BYTES)
_NIBBLES = _u64(0x0F * _BYTES)
_ONES = _u64(_BYTES)
# x + _GE[lo] sets a byte's high bit iff that byte (< 0x80) >= lo; x + _GT[hi] iff it is > hi
_DIGIT_GE, _DIGIT_GT = _u64((0x80 - 0x30) * _BYTES), _u64((0x7F - 0x39) * _BYTES)
_ALPHA_GE, _ALPHA_GT = _u64((0x80 - 0x61) * _BYTES), _u64((0x7F - 0x66) * _BYTES)
_PACK = [
    (_u64(0x000F000F000F000F), _u64(4), _u64(8)),
    (_u64(0x000000FF000000FF), _u64(8), _u64(16)),
    (_u64(0xFFFF), _u64(16), _u64(32)),
]


def hex8_words(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values and validity of 8-character hex strings held as little-endian uint64 words.

    Byte k of a word is character k (the most significant digit first). Valid characters are
    ``0-9a-fA-F``: per byte, a range test by adding a constant and looking at the high bit
    (no carry crosses bytes, since valid bytes are < 0x80 and a word with a high bit set is
    invalid anyway); the digit is ``(c & 0xF) + 9 * (c >> 6)`` on ``c | 0x20``; three
    shift/mask rounds pack the eight nibbles into a 32-bit value. In place on two temporaries:
    allocation-free numpy ops are ~2x faster here.
    """
    lower = words | _LOWER  # 'A'-'F' -> 'a'-'f' (digits keep their code; tested on words)
    t, u = np.empty_like(words), np.empty_like(words)
    acc = np.add(words, _DIGIT_GE)
    np.add(words, _DIGIT_GT, out=u)
    np.bitwise_not(u, out=u)
    np.bitwise_and(acc, u, out=acc)  # high bit: a digit
    np.add(lower, _ALPHA_GE, out=t)
    np.add(lower, _ALPHA_GT, out=u)
    np.bitwise_not(u, out=u)
    np.bitwise_and(t, u, out=t)  # high bit: a letter a-f / A-F
    np.bitwise_or(acc, t, out=acc)
    np.bitwise_not(words, out=t)
    np.bitwise_and(acc, t, out=acc)  # ... and the byte itself below 0x80
    np.bitwise_and(acc, _HIGH, out=acc)
    ok = acc == _HIGH
    np.right_shift(lower, _u64(6), out=t)
    np.bitwise_and(t, _ONES, out=t)
    np.multiply(t, _u64(9), out=t)
    d = np.bitwise_and(lower, _NIBBLES, out=lower)
    np.add(d, t, out=d)  # one digit 0..15 per byte
    for mask, left, right in _PACK:
        np.bitwise_and(d, mask, out=t)
        np.left_shift(t, left, out=t)
        np.right_shift(d, right, out=d)
        np.bitwise_and(d, mask, out=d)
        np.bitwise_or(t, d, out=d)
    return d, ok


_HEX_DIGIT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_DIGIT[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_DIGIT[_c] = 10 + _i


def hex_binary(arr: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
    """Values and validity (non-null) of a binary array of hex strings of any length <= 16.

    None if some non-empty value is not hex or longer than 16 digits."""
    n = len(arr)
    off = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    data = arr.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    lens = np.diff(off)
    valid = lens > 0  # nulls and empty strings both have length 0
    if lens.max(initial=0) > 16:
        return None
    digits = _HEX_DIGIT[raw[off[0] : off[-1]]]
    if digits.size and digits.max() == 255:
        return None
    base = off[:-1] - off[0]
    ends = np.repeat(base + lens, lens)
    shift = ((ends - 1 - np.arange(digits.size)) * 4).astype(np.uint64)
    contrib = digits.astype(np.uint64) << shift
    out = np.zeros(n, dtype=np.uint64)
    if valid.any():
        out[valid] = np.bitwise_or.reduceat(contrib, base[valid])
    return out, valid


# -- the reader -------------------------------------------------------------------------------
class CriteoTSV(BlockSource):
    """Criteo day files: ``paths`` maps a split (train/valid/test) to its files.

    ``table_size`` is the embedding table size, one for all 26 features or one per feature;
    id 0 of every table is reserved for a missing value. ``stats[split]`` is reset at each
    ``batches`` call and filled while reading: ``rows`` counts rows kept, ``skipped`` bad ones,
    ``parsed`` the records this rank parsed. ``shuffle`` permutes the train split every epoch
    (blocks of ``block_bytes`` and the rows inside each, from ``seed``; see
    ``dmtrec.data.shard``); other splits are read in file order. ``progress_every`` > 0: rank 0
    prints a progress line every that many seconds while reading.
    """

    def __init__(
        self,
        paths: dict[str, list[str]],
        table_size: int | list[int] = 100_000,
        max_bad_rows: int = 100,
        shuffle: bool = False,
        seed: int = 0,
        block_bytes: int = BLOCK_BYTES,
        progress_every: float = 0.0,
    ) -> None:
        unknown = sorted(set(paths) - set(SPLITS))
        if unknown:
            raise ConfigError(f"unknown split {unknown[0]!r}; use one of {', '.join(SPLITS)}")
        self.paths = {
            s: [os.fspath(p)] if isinstance(p, (str, os.PathLike)) else [os.fspath(f) for f in p]
            for s, p in paths.items()
        }
        for split, files in self.paths.items():
            if not files:
                raise ConfigError(f"no files given for split {split!r}")
            for p in files:
                if not os.path.isfile(p):
                    raise DataError(f"{p}: no such file")
        sizes = [table_size] * NUM_SPARSE if isinstance(table_size, int) else list(table_size)
        if len(sizes) != NUM_SPARSE:
            raise ConfigError(f"--table-size needs 1 or {NUM_SPARSE} values, got {len(sizes)}")
        if min(sizes) < 2:
            raise ConfigError("--table-size must be >= 2 (id 0 is reserved for missing)")
        if max_bad_rows < 0:
            raise ConfigError("--max-bad-rows must be >= 0")
        if block_bytes < 1:
            raise ConfigError("--block-mb must be > 0")
        if seed < 0:
            raise ConfigError(f"--shuffle-seed must be >= 0, not {seed}")
        self.max_bad_rows = max_bad_rows
        self.shuffle, self.seed, self.block_bytes = shuffle, seed, block_bytes
        self.progress_every = progress_every
        self._moduli = [s - 1 for s in sizes]
        self._moduli_u64 = np.array(self._moduli, dtype=np.uint64)[:, None]
        self.spec = FeatureSpec(
            dense=list(DENSE_NAMES), sparse=list(SPARSE_NAMES), num_embeddings=sizes
        )
        self.stats: dict[str, DataStats] = {s: DataStats() for s in self.paths}

    @property
    def splits(self) -> list[str]:
        """Splits that have files, in train/valid/test order."""
        return [s for s in SPLITS if s in self.paths]

    def files(self, split: str) -> list[TextFile]:
        return [
            TextFile(p, i, header=False, block_bytes=self.block_bytes)
            for i, p in enumerate(self.paths[split])
        ]

    def split_blocks(
        self, split: str, epoch: int, stats: DataStats, rank: int
    ) -> Iterator[_CriteoBlock]:
        """The split's blocks in epoch order, with read progress on rank 0."""
        if split not in self.paths:
            raise ConfigError(f"no files given for split {split!r}")
        blocks = self.blocks(split, epoch, BadRows(stats, self.max_bad_rows))
        if self.progress_every > 0 and rank == 0:
            total = sum(os.path.getsize(p) for p in self.paths[split])
            blocks = with_progress(blocks, f"reading {split}", total, self.progress_every)
        return blocks

    def blocks(self, split: str, epoch: int, bad: BadRows) -> Iterator[_CriteoBlock]:
        """The split's blocks in epoch order, ready to parse."""
        shuffle = self.shuffle and split == "train"
        files = self.files(split)
        counts = [0] * len(files)
        for f in files:
            if f.size == 0:
                raise DataError(f"{f.path}: empty file (no rows)")
        for tb in epoch_blocks(files, shuffle, self.seed, epoch):
            counts[tb.file.index] += tb.n
            order = block_permutation(self.seed, epoch, tb.key, tb.n) if shuffle else None
            yield _CriteoBlock(self, tb, order, bad)
        for f, c in zip(files, counts):
            if c == 0:
                raise DataError(f"{f.path}: empty file (no rows)")

    def file_blocks(self, split: str, index: int, bad: BadRows) -> Iterator[_CriteoBlock]:
        """The blocks of one file of ``split`` in file order (for preprocessing)."""
        f = TextFile(self.paths[split][index], index, header=False, block_bytes=self.block_bytes)
        if f.size == 0:
            raise DataError(f"{f.path}: empty file (no rows)")
        seen = 0
        for tb in f.sequential_blocks():
            seen += tb.n
            yield _CriteoBlock(self, tb, None, bad)
        if seen == 0:
            raise DataError(f"{f.path}: empty file (no rows)")

    # -- parsing ----------------------------------------------------------------------------
    def parse_lines(self, buffer: pa.Buffer, n: int) -> Rows | None:
        """Vectorised parse of ``n`` complete lines; None if any of them is not a good row."""
        try:
            table = read_tsv(buffer, _CONVERT_HEX8)
            general = False
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            try:
                table = read_tsv(buffer, _CONVERT_HEX)  # hashes of other lengths
                general = True
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                return None
        if table.num_rows != n:
            return None
        labels = np.empty(n, dtype=np.float32)
        dense = np.empty((n, NUM_DENSE), dtype=np.float32)
        ids = np.empty((NUM_SPARSE, n), dtype=np.int64)
        columns = table.columns
        start = 0
        for c in range(columns[0].num_chunks):  # the parse blocks: the same for every column
            chunk = [col.chunk(c) for col in columns]
            end = start + len(chunk[0])
            if not self._convert_chunk(
                chunk, general, labels[start:end], dense[start:end], ids[:, start:end]
            ):
                return None
            start = end
        return Rows(labels, dense, ids)

    def _convert_chunk(
        self,
        cols: list[pa.Array],
        general: bool,
        labels: np.ndarray,
        dense: np.ndarray,
        ids: np.ndarray,
    ) -> bool:
        """Fill the output slices from one parsed chunk; False if a row in it is not good."""
        n = len(labels)
        label = cols[0]
        if label.null_count:
            return False
        byte = np.frombuffer(label.buffers()[1], dtype=np.uint8, count=n, offset=label.offset)
        byte = byte - np.uint8(ord("0"))
        if np.any(byte > 1):
            return False
        labels[:] = byte
        counts = np.empty((NUM_DENSE, n), dtype=np.int64)
        dense_cols = cols[1 : 1 + NUM_DENSE]
        for j, col in enumerate(dense_cols):
            counts[j] = np.frombuffer(
                col.buffers()[1], dtype=np.int64, count=n, offset=col.offset * 8
            )
        if any(c.null_count for c in dense_cols):
            counts[~validities(dense_cols, n)] = 0
        np.maximum(counts, 0, out=counts)
        dense[:] = np.log1p(counts.astype(np.float64)).T
        sparse = cols[1 + NUM_DENSE :]
        if general:
            got = [hex_binary(c) for c in sparse]
            if any(g is None for g in got):
                return False
            values = np.stack([g[0] for g in got])  # type: ignore[index]
            valid = np.stack([g[1] for g in got])  # type: ignore[index]
        else:
            values, valid = self._hex8_columns(sparse, n)
            if values is None:
                return False
        np.remainder(values, self._moduli_u64, out=values)
        np.add(values, _u64(1), out=values)
        np.multiply(values, valid, out=values)  # missing -> id 0
        ids[:] = values
        return True

    @staticmethod
    def _hex8_columns(cols: list[pa.Array], n: int) -> tuple[np.ndarray | None, np.ndarray]:
        """Values and validity of 8-byte hash columns (F x n); values None if one is not hex."""
        words = np.empty((len(cols), n), dtype=np.uint64)
        for j, col in enumerate(cols):
            words[j] = np.frombuffer(col.buffers()[1], dtype="<u8", count=n, offset=col.offset * 8)
        valid = validities(cols, n)
        if not valid.all():
            words[~valid] = _ZERO8
        values, ok = hex8_words(words)
        if not ok.all():
            return None, valid
        return values, valid

    def parse_line(self, line: str) -> tuple[float, list[float], list[int]]:
        """The reference parser of one line (raises ``BadRow``): used to re-scan a block whose
        fast parse failed, so messages and skip counts match a line-by-line reader's."""
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) != NUM_FIELDS:
            raise BadRow(
                f"expected {NUM_FIELDS} tab-separated fields (label, {NUM_DENSE} integer, "
                f"{NUM_SPARSE} categorical), got {len(fields)}"
            )
        if fields[0] == "1":
            label = 1.0
        elif fields[0] == "0":
            label = 0.0
        else:
            raise BadRow(f"{short_repr(fields[0])} is not 0 or 1", (1, "label"))
        try:
            counts = [int(t) if t else 0 for t in fields[1 : 1 + NUM_DENSE]]
            dense = [math.log1p(x) if x > 0 else 0.0 for x in counts]
            hashes = [int(t, 16) if t else None for t in fields[1 + NUM_DENSE :]]
        except (ValueError, OverflowError):
            raise self._locate(fields) from None
        ids = [0 if h is None else 1 + h % m for h, m in zip(hashes, self._moduli)]
        return label, dense, ids

    @staticmethod
    def _locate(fields: list[str]) -> BadRow:
        """The ``BadRow`` for the first dense/categorical field of ``fields`` that fails."""
        for j, tok in enumerate(fields[1 : 1 + NUM_DENSE]):
            col = (2 + j, DENSE_NAMES[j])
            try:
                if tok:
                    math.log1p(max(int(tok), 0))
            except ValueError:
                return BadRow(f"{short_repr(tok)} is not an integer", col)
            except OverflowError:
                return BadRow(f"{short_repr(tok)} is out of range", col)
        for j, tok in enumerate(fields[1 + NUM_DENSE :]):
            try:
                if tok:
                    int(tok, 16)
            except ValueError:
                col = (2 + NUM_DENSE + j, SPARSE_NAMES[j])
                return BadRow(f"{short_repr(tok)} is not a hex id", col)
        return BadRow("unparsable row")  # not reached: some field above failed


class _CriteoBlock:
    """A text block of a Criteo file, parsed on demand (see ``shard.Block``)."""

    def __init__(
        self, reader: CriteoTSV, block: TextBlock, order: np.ndarray | None, bad: BadRows
    ) -> None:
        self.reader, self.block, self.order, self.bad = reader, block, order, bad
        self.n = block.n
        self.file_bytes = block.file_bytes

    def parse(self, records: np.ndarray, report: bool) -> tuple[Rows, np.ndarray]:
        """Fast parse; if it fails, halve the records and retry, down to ``RESCAN_ROWS``
        lines re-scanned one by one: a bad row costs a few fast parses and a small re-scan."""
        rows = self.reader.parse_lines(self.block.lines(records), len(records))
        if rows is not None:
            return rows, np.ones(len(records), dtype=bool)
        if len(records) <= RESCAN_ROWS:
            return self._rescan(records, report)
        mid = len(records) // 2
        a, ga = self.parse(records[:mid], report)
        b, gb = self.parse(records[mid:], report)
        return Rows.concat([a, b]), np.concatenate([ga, gb])

    def _rescan(self, records: np.ndarray, report: bool) -> tuple[Rows, np.ndarray]:
        """Line-by-line parse of ``records``: exact messages for the bad ones."""
        good = np.zeros(len(records), dtype=bool)
        labels, dense, ids = [], [], []
        lines = self.block.line_texts(records)
        numbers = self.block.line_numbers(records) if report else None
        for i, line in enumerate(lines):
            try:
                label, d, s = self.reader.parse_line(line)
            except BadRow as err:
                if numbers is not None:
                    self.bad.record(self.block.file.path, str(numbers[i]), err)
                continue
            good[i] = True
            labels.append(label)
            dense.append(d)
            ids.append(s)
        rows = Rows(
            np.asarray(labels, dtype=np.float32),
            np.asarray(dense, dtype=np.float32).reshape(len(labels), NUM_DENSE),
            np.asarray(ids, dtype=np.int64).reshape(len(labels), NUM_SPARSE).T.copy(),
        )
        return rows, good
