"""Streaming helpers the file readers share: lines of (gzipped) files, bad-row accounting,
and grouping parsed rows into ``Batch`` es."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from torchrec.datasets.utils import Batch

from dmtrec.data.base import DataStats, make_batch
from dmtrec.errors import ConfigError, DataError

MAX_MESSAGES = 5  # bad-row messages kept per split; the count keeps going

# What a damaged gzip stream raises while being read.
_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def open_lines(path: str) -> Iterator[str]:
    """Yield the lines of a text file (``.gz`` decompressed on the fly), newlines kept.

    Opened with ``newline=""`` so the ``csv`` module can consume the lines directly. I/O
    failures become ``DataError``s naming the file, a cut gzip stream the line it broke after.
    """
    try:
        if path.endswith(".gz"):
            f = gzip.open(path, "rt", encoding="utf-8-sig", errors="replace", newline="")
        else:
            f = open(path, encoding="utf-8-sig", errors="replace", newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror or e}") from None
    n = 0
    with f:
        try:
            for line in f:
                n += 1
                yield line
        except _GZIP_ERRORS:
            raise DataError(f"{path}: truncated or corrupt gzip stream after line {n}") from None
        except OSError as e:
            raise DataError(f"{path}: read error after line {n}: {e.strerror or e}") from None


def short_repr(value: object, limit: int = 40) -> str:
    """``repr`` cut to ``limit`` characters, so one garbage field cannot flood a message."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


class BadRow(Exception):
    """Raised by a row parser: ``col`` is (1-based column number, column name) or None."""

    def __init__(self, reason: str, col: tuple[int, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.col = col


class BadRows:
    """Counts skipped rows into ``stats`` and stops with a ``DataError`` past the threshold."""

    def __init__(self, stats: DataStats, max_bad_rows: int) -> None:
        self.stats = stats
        self.max_bad_rows = max_bad_rows

    def record(self, path: str, where: str, err: BadRow) -> None:
        """Record one bad row at ``path:where`` (``where`` is a line number or ``row N``)."""
        reason = f"col {err.col[0]} ({err.col[1]}): {err.reason}" if err.col else err.reason
        self.stats.skipped += 1
        if len(self.stats.messages) < MAX_MESSAGES:
            sep = ":" if err.col else ": "
            self.stats.messages.append(f"{path}:{where}{sep}{reason}")
        if self.stats.skipped > self.max_bad_rows:
            raise DataError(
                f"{path}:{where}: {self.stats.skipped} bad rows, more than --max-bad-rows "
                f"{self.max_bad_rows} allows (last: {reason}); fix the input or raise "
                "--max-bad-rows"
            )


def batch_rows(
    rows: Iterable[tuple[float, Sequence[float], Sequence[int]]],
    batch_size: int,
    keys: list[str],
    num_dense: int,
) -> Iterator[Batch]:
    """Group parsed ``(label, dense, ids)`` rows into ``Batch``es; the last one may be short.

    Fresh arrays per batch: ``make_batch`` shares memory with contiguous inputs.
    """
    labels: list[float] = []
    dense: list[Sequence[float]] = []
    ids: list[Sequence[int]] = []

    def flush() -> Batch:
        return make_batch(
            np.asarray(dense, dtype=np.float32).reshape(len(labels), num_dense),
            np.asarray(ids, dtype=np.int64).reshape(len(labels), len(keys)),
            np.asarray(labels, dtype=np.float32),
            keys,
        )

    for label, d, i in rows:
        labels.append(label)
        dense.append(d)
        ids.append(i)
        if len(labels) == batch_size:
            yield flush()
            labels, dense, ids = [], [], []
    if labels:
        yield flush()


def check_batch_args(batch_size: int, rank: int, world_size: int) -> None:
    """Reject impossible batch/shard arguments before any file is opened."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, not {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world size {world_size})")
