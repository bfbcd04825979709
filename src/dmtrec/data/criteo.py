"""Streaming reader for Criteo Kaggle / Terabyte click logs (tab separated, optionally gzipped).

Each row is ``label \\t I1..I13 \\t C1..C26``: a 0/1 label, 13 integer counts (may be empty or
negative) and 26 categorical hashes written as hex (may be empty). Files are tens of GB, so
they are parsed line by line and only one batch is held in memory at a time.

Preprocessing (the usual DLRM recipe): dense ``x -> log(1 + max(x, 0))``, missing -> 0;
categorical ``id = 1 + int(hex, 16) % (table_size - 1)``, missing -> 0 (a reserved id).

Bad rows are skipped and counted in ``stats[split]``; past ``max_bad_rows`` a ``DataError``
stops the run, naming the file and line."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

from torchrec.datasets.utils import Batch

from dmtrec.data.base import SPLITS, DataStats, FeatureSpec, shard_batches
from dmtrec.data.stream import BadRow, BadRows, batch_rows, check_batch_args, open_lines, short_repr
from dmtrec.errors import ConfigError, DataError

NUM_DENSE = 13
NUM_SPARSE = 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
DENSE_NAMES = [f"I{i + 1}" for i in range(NUM_DENSE)]
SPARSE_NAMES = [f"C{i + 1}" for i in range(NUM_SPARSE)]


# -- Criteo ---------------------------------------------------------------------------------
class CriteoTSV:
    """Criteo day files, streamed: ``paths`` maps a split (train/valid/test) to its files.

    ``table_size`` is the embedding table size, one for all 26 features or one per feature;
    id 0 of every table is reserved for a missing value. ``stats[split]`` is reset at each
    ``batches`` call and filled while streaming: ``rows`` counts rows kept, ``skipped`` bad ones.
    """

    def __init__(
        self,
        paths: dict[str, list[str]],
        table_size: int | list[int] = 100_000,
        max_bad_rows: int = 100,
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
        self.max_bad_rows = max_bad_rows
        self._moduli = [s - 1 for s in sizes]
        self.spec = FeatureSpec(
            dense=list(DENSE_NAMES), sparse=list(SPARSE_NAMES), num_embeddings=sizes
        )
        self.stats: dict[str, DataStats] = {s: DataStats() for s in self.paths}

    @property
    def splits(self) -> list[str]:
        """Splits that have files, in train/valid/test order."""
        return [s for s in SPLITS if s in self.paths]

    def batches(
        self, split: str, batch_size: int, rank: int = 0, world_size: int = 1, epoch: int = 0
    ) -> Iterator[Batch]:
        """Stream ``split`` in file order as batches, round-robin sharded over ranks.

        ``epoch`` is accepted for interface parity with the in-memory sources; a stream is
        not shuffled (shuffle the day files upstream if needed).
        """
        if split not in self.paths:
            raise ConfigError(f"no files given for split {split!r}")
        check_batch_args(batch_size, rank, world_size)
        stats = self.stats[split] = DataStats()
        rows = self._rows(self.paths[split], BadRows(stats, self.max_bad_rows))
        return shard_batches(
            batch_rows(rows, batch_size, self.spec.sparse, NUM_DENSE), rank, world_size
        )

    def _rows(
        self, files: list[str], bad: BadRows
    ) -> Iterator[tuple[float, list[float], list[int]]]:
        for path in files:
            seen = 0
            for lineno, line in enumerate(open_lines(path), 1):
                line = line.rstrip("\r\n")
                if not line:
                    continue  # blank lines (e.g. a trailing one) are not rows
                seen += 1
                try:
                    row = self._parse(line)
                except BadRow as err:
                    bad.record(path, str(lineno), err)
                    continue
                bad.stats.rows += 1
                yield row
            if seen == 0:
                raise DataError(f"{path}: empty file (no rows)")

    def _parse(self, line: str) -> tuple[float, list[float], list[int]]:
        fields = line.split("\t")
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
        # Fast path: whole-row comprehensions; only a failing row is re-scanned for its column.
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
