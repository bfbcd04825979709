"""``dmtrec preprocess``: convert Criteo day files or column-spec tables, once, into a binary
columnar store that ``--data preprocessed`` reads memory-mapped (``dmtrec.data.preprocessed``).

**Why per-part ``.npy`` files** (as TorchRec's ``BinaryCriteoUtils.tsv_to_npys`` and the
MLPerf DLRM reference do) rather than Parquet row groups: a training read is then a
memory-mapped gather with no decoding at all (the ids are final, the dense transform is
applied), a rank touches only the pages of its own rows, and ``np.load`` is the whole reader.
Parquet would add a decode step per read and row-group granularity. TorchRec's own converter is
not used: it parses fields in Python, holds a whole day in lists, and applies a different dense
transform (``log(x - min + 2)``); here the readers' vectorised parsers are reused block by
block, so a store holds exactly the rows ``--data criteo|csv|parquet`` would give (bad rows
dropped, and counted, once).

**Bounded memory**: each input file is streamed in blocks (``block_mb``) and every block is
appended to the part's arrays at once (an ``.npy`` header is written first and its row count
patched at the end: numpy pads the header so the shape can grow in place). Resident memory is
a few blocks, not the file (measured by ``dmtrec bench data``).

**Ids, once**: Criteo hashing ``1 + int(hex, 16) % (hash_size - 1)`` (``vocab="hash"``) or the
DLRM Kaggle recipe, a frequency vocabulary (``vocab="frequency"``: values seen at least
``min_count`` times in the train files, ids in increasing order of the value, 0 for missing
and rare); tables always get their first-appearance vocabulary (``dmtrec.data.columns``),
counted on the train files and applied unchanged to valid/test.

**Re-runnable per file**: each input file becomes one part directory, written under a
temporary name and renamed when complete with a ``done.json`` recording the source (path,
size, mtime) and the settings; a re-run skips the parts already done with the same source and
settings (``force`` redoes them), so an interrupted conversion of many days resumes where it
stopped. ``meta.json`` is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmtrec.data.base import SPLITS, DataStats, FeatureSpec, Jagged, Rows
from dmtrec.data.preprocessed import FORMAT, VERSION
from dmtrec.data.progress import Progress
from dmtrec.data.stream import BadRows
from dmtrec.errors import ConfigError, DataError
from dmtrec.options import option

KINDS = ("criteo", "csv", "parquet")
VOCABS = ("hash", "frequency")
_RAW_TABLE = 2**62 + 1  # criteo frequency pass: ids = 1 + hash (no modulo in practice)


@dataclass
class PreprocessConfig:
    """What ``dmtrec preprocess`` converts, and how."""

    kind: str = option("criteo", "input format", flag="data", choices=KINDS)
    train: list[str] = option(factory=list, help="train file (repeatable): a day file or a table")
    valid: list[str] = option(factory=list, help="validation file (repeatable)")
    test: list[str] = option(factory=list, help="test file (repeatable)")
    out: str = option("", "directory of the store (parts already converted are skipped)")
    label: str | None = option(None, "csv/parquet: label column")
    dense: list[str] = option(factory=list, help="csv/parquet: dense columns a,b,c")
    sparse: list[str] = option(factory=list, help="csv/parquet: sparse columns a,b,c")
    multi_hot: list[str] = option(
        factory=list, help="csv/parquet: sparse columns holding a list of values per row"
    )
    multi_hot_sep: str = option("|", "csv: separator of the values in a multi-hot cell")
    table_size: int = option(
        100_000, "criteo --vocab hash: rows per hashed table", flag="hash-size", minimum=2
    )
    vocab: str = option(
        "hash",
        "criteo: hash ids into --hash-size rows, or a frequency vocabulary (--min-count)",
        choices=VOCABS,
    )
    min_count: int = option(1, "frequency vocabulary threshold (rarer values -> id 0)", minimum=1)
    max_bad_rows: int = option(100, "bad rows skipped per split before it fails", minimum=0)
    block_mb: float = option(8.0, "MiB of input parsed at a time", minimum=0.001)
    progress_every: float = option(10.0, "seconds between progress lines (0: none)", minimum=0)
    force: bool = option(False, "convert every file again, even those already done")

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"--data: preprocess reads {', '.join(KINDS)}, not {self.kind!r}")
        if not self.train:
            raise ConfigError("preprocess needs --train PATH")
        if not self.out:
            raise ConfigError("preprocess needs --out DIR")
        if self.vocab not in VOCABS:
            raise ConfigError(f"--vocab must be hash or frequency, not {self.vocab!r}")
        if self.kind != "criteo" and (not self.label or not self.sparse):
            raise ConfigError(
                f"--data {self.kind} needs --label and --sparse (and usually --dense)"
            )
        if self.block_mb <= 0:
            raise ConfigError("--block-mb must be > 0")


# -- appending .npy files -------------------------------------------------------------------
class NpyWriter:
    """An ``.npy`` file of rows of shape ``row_shape`` appended block by block."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...] = ()) -> None:
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), row_shape
        self.rows = 0
        self.f = open(path, "wb")
        self._header()

    def _header(self) -> None:
        self.f.seek(0)
        np.lib.format.write_array_header_1_0(
            self.f,
            {
                "descr": np.lib.format.dtype_to_descr(self.dtype),
                "fortran_order": False,
                "shape": (self.rows, *self.row_shape),
            },
        )

    def append(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        self.f.write(a.tobytes())
        self.rows += len(a)

    def close(self) -> None:
        end = self.f.tell()
        start = self.f.seek(0)
        self._header()  # numpy's header keeps room for the row count to grow in place
        assert start == 0 and self.f.tell() <= end
        self.f.close()


class PartWriter:
    """The arrays of one part (see ``dmtrec.data.preprocessed``)."""

    def __init__(self, path: Path, spec: FeatureSpec, id_dtype: np.dtype) -> None:
        path.mkdir(parents=True)
        multi = set(spec.multi_hot)
        self.bag_features = [j for j, n in enumerate(spec.sparse) if n in multi]
        self.onehot = [j for j, n in enumerate(spec.sparse) if n not in multi]
        self.labels = NpyWriter(path / "labels.npy", np.float32)
        self.dense = NpyWriter(path / "dense.npy", np.float32, (len(spec.dense),))
        self.sparse = NpyWriter(path / "sparse.npy", id_dtype, (len(self.onehot),))
        self.bags = {
            j: (
                NpyWriter(path / f"bag{j}.offsets.npy", np.int64),
                NpyWriter(path / f"bag{j}.values.npy", id_dtype),
            )
            for j in self.bag_features
        }
        self.bag_total = dict.fromkeys(self.bag_features, 0)
        for j in self.bag_features:
            self.bags[j][0].append(np.zeros(1, dtype=np.int64))

    def append(self, rows: Rows) -> None:
        self.labels.append(rows.labels)
        self.dense.append(rows.dense)
        cols = rows.columns()
        onehot = [cols[j] for j in self.onehot]
        ids = np.stack(onehot, axis=1) if onehot else np.zeros((len(rows), 0), np.int64)
        self.sparse.append(ids)
        for j in self.bag_features:
            bag = cols[j]
            assert isinstance(bag, Jagged)
            offsets = self.bag_total[j] + np.cumsum(bag.lengths, dtype=np.int64)
            self.bags[j][0].append(offsets)
            self.bags[j][1].append(bag.values)
            self.bag_total[j] += int(bag.lengths.sum())

    def close(self) -> int:
        for w in (self.labels, self.dense, self.sparse):
            w.close()
        for a, b in self.bags.values():
            a.close()
            b.close()
        return self.labels.rows


# -- the sources ------------------------------------------------------------------------------
def _file_id(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class _Counts:
    """Counts of one column's integer values, merged with ``np.unique`` in large batches."""

    def __init__(self) -> None:
        self.values = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.buffer: list[np.ndarray] = []
        self.buffered = 0

    def add(self, v: np.ndarray) -> None:
        v = v[v > 0]  # 0: missing
        self.buffer.append(v)
        self.buffered += len(v)
        if self.buffered > 1 << 22:
            self.merge()

    def merge(self) -> None:
        if not self.buffer:
            return
        u, c = np.unique(np.concatenate(self.buffer), return_counts=True)
        allv, inv = np.unique(np.concatenate([self.values, u]), return_inverse=True)
        self.counts = np.bincount(inv, weights=np.concatenate([self.counts, c])).astype(np.int64)
        self.values = allv
        self.buffer, self.buffered = [], 0


class _CriteoSource:
    def __init__(self, cfg: PreprocessConfig, out: Path, paths: dict[str, list[str]]) -> None:
        from dmtrec.data.criteo import CriteoTSV

        block = int(cfg.block_mb * (1 << 20))
        self.cfg = cfg
        self.vocab: list[np.ndarray] | None = None
        table = cfg.table_size if cfg.vocab == "hash" else _RAW_TABLE
        self.reader = CriteoTSV(
            paths, table_size=table, max_bad_rows=cfg.max_bad_rows, block_bytes=block
        )
        self.settings: dict[str, Any] = {"kind": "criteo", "vocab": cfg.vocab}
        sizes = [cfg.table_size] * len(self.reader.spec.sparse)
        if cfg.vocab == "frequency":
            self.vocab = self._frequency_vocab(out, paths["train"])
            sizes = [len(v) + 1 for v in self.vocab]
            self.settings.update(
                min_count=cfg.min_count, train=[_file_id(p) for p in paths["train"]]
            )
        else:
            self.settings["hash_size"] = cfg.table_size
        spec = self.reader.spec
        self.spec = FeatureSpec(dense=spec.dense, sparse=spec.sparse, num_embeddings=sizes)

    def _frequency_vocab(self, out: Path, train: list[str]) -> list[np.ndarray]:
        key = _digest({"min_count": self.cfg.min_count, "train": [_file_id(p) for p in train]})
        saved = out / "vocab" / f"criteo-{key}.npz"
        if saved.exists() and not self.cfg.force:
            with np.load(saved) as z:
                return [z[f"f{j}"] for j in range(len(z.files))]
        counts = [_Counts() for _ in self.reader.spec.sparse]
        stats = DataStats()
        bad = BadRows(stats, self.cfg.max_bad_rows)
        total = sum(os.path.getsize(p) for p in train)
        progress = Progress("preprocess: counting train values", total, self.cfg.progress_every)
        for i in range(len(train)):
            for block in self.reader.file_blocks("train", i, bad):
                rows, _ = block.parse(np.arange(block.n), True)
                for c, v in zip(counts, rows.sparse):
                    c.add(v)
                progress.update(block.n, block.file_bytes)
        progress.done()
        vocab = []
        for c in counts:
            c.merge()
            vocab.append(c.values[c.counts >= self.cfg.min_count])
        saved.parent.mkdir(parents=True, exist_ok=True)
        np.savez(saved, **{f"f{j}": v for j, v in enumerate(vocab)})
        return vocab

    def blocks(self, split: str, index: int, bad: BadRows):
        return self.reader.file_blocks(split, index, bad)

    def convert(self, rows: Rows) -> Rows:
        if self.vocab is None:
            return rows
        ids = np.empty_like(rows.sparse)
        for j, (v, keys) in enumerate(zip(rows.sparse, self.vocab)):
            pos = np.searchsorted(keys, v)
            pos = np.minimum(pos, max(len(keys) - 1, 0))
            hit = keys[pos] == v if len(keys) else np.zeros(len(v), bool)
            ids[j] = np.where(hit, pos + 1, 0)
        return Rows(rows.labels, rows.dense, ids)


class _TableSource:
    def __init__(self, cfg: PreprocessConfig, out: Path, paths: dict[str, list[str]]) -> None:
        import pyarrow as pa

        from dmtrec.data.columns import ColumnTable

        columns = {
            "label": cfg.label,
            "dense": cfg.dense,
            "sparse": cfg.sparse,
            "multi_hot": cfg.multi_hot,
            "multi_hot_sep": cfg.multi_hot_sep,
        }
        key = _digest(
            {
                **columns,
                "min_count": cfg.min_count,
                "train": [_file_id(p) for p in paths["train"]],
            }
        )
        saved = out / "vocab" / f"table-{key}"
        vocab_values = None
        if (saved / "done").exists() and not cfg.force:
            vocab_values = {}
            for j, name in enumerate(cfg.sparse):
                with pa.ipc.open_file(saved / f"{j}.arrow") as f:
                    vocab_values[name] = f.read_all().column(0).combine_chunks()
        self.table = ColumnTable(
            paths,
            label=cfg.label or "",
            dense=cfg.dense,
            sparse=cfg.sparse,
            fmt=cfg.kind,
            min_count=cfg.min_count,
            max_bad_rows=cfg.max_bad_rows,
            multi_hot=cfg.multi_hot,
            multi_hot_sep=cfg.multi_hot_sep,
            block_bytes=int(cfg.block_mb * (1 << 20)),
            progress_every=cfg.progress_every,
            vocab_values=vocab_values,
        )
        if vocab_values is None:  # keep the vocabularies: re-runs and id -> value lookups
            if saved.exists():
                shutil.rmtree(saved)
            saved.mkdir(parents=True)
            for j, name in enumerate(cfg.sparse):
                values = self.table.vocab_values[name]
                with pa.ipc.new_file(
                    saved / f"{j}.arrow", pa.schema([("value", values.type)])
                ) as w:
                    w.write_table(pa.table({"value": values}))
            (saved / "done").write_text(json.dumps(cfg.sparse))
        self.spec = self.table.spec
        self.settings = {"kind": cfg.kind, **columns, "vocab": key}

    def blocks(self, split: str, index: int, bad: BadRows):
        return self.table.file_blocks(split, index, bad)

    def convert(self, rows: Rows) -> Rows:
        return rows


# -- the conversion ---------------------------------------------------------------------------
def _part_name(split: str, index: int, path: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(path)) or "file"
    return f"{split}-{index:03d}-{base}"


def _is_done(part: Path, source: dict[str, Any], settings: str) -> bool:
    try:
        done = json.loads((part / "done.json").read_text())
    except (OSError, ValueError):
        return False
    return done.get("source") == source and done.get("settings") == settings


def preprocess(cfg: PreprocessConfig) -> dict[str, Any]:
    """Convert ``cfg``'s files into the store ``cfg.out``; returns a summary (also written to
    ``meta.json``): rows and bad rows per split, the parts converted and skipped, seconds."""
    cfg.validate()
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {s: list(getattr(cfg, s)) for s in SPLITS if getattr(cfg, s)}
    for files in paths.values():
        for p in files:
            if not os.path.isfile(p):
                raise DataError(f"{p}: no such file")
    source = (
        _CriteoSource(cfg, out, paths) if cfg.kind == "criteo" else _TableSource(cfg, out, paths)
    )
    spec = source.spec
    settings = _digest(source.settings)
    id_dtype = np.dtype(np.int32 if max(spec.num_embeddings) < 2**31 else np.int64)
    parts: dict[str, list[str]] = {}
    summary: dict[str, Any] = {"rows": {}, "skipped": {}, "converted": [], "skipped_parts": []}
    for split, files in paths.items():
        stats = DataStats()
        bad = BadRows(stats, cfg.max_bad_rows)
        parts[split] = []
        for i, path in enumerate(files):
            name = _part_name(split, i, path)
            parts[split].append(name)
            part = out / name
            src = _file_id(path)
            if not cfg.force and _is_done(part, src, settings):
                done = json.loads((part / "done.json").read_text())
                stats.rows += done["rows"]
                stats.skipped += done["skipped"]
                summary["skipped_parts"].append(name)
                continue
            tmp = out / f"{name}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            writer = PartWriter(tmp, spec, id_dtype)
            skipped0 = stats.skipped
            progress = Progress(f"preprocess {path}", os.path.getsize(path), cfg.progress_every)
            for block in source.blocks(split, i, bad):
                rows, _ = block.parse(np.arange(block.n), True)
                finish = getattr(block, "finish", None)  # a table block: the vocabulary lookup
                writer.append(source.convert(finish(rows) if finish else rows))
                progress.update(block.n, block.file_bytes)
            progress.done()
            n = writer.close()
            stats.rows += n
            done = {"rows": n, "skipped": stats.skipped - skipped0, "source": src}
            (tmp / "done.json").write_text(json.dumps({**done, "settings": settings}, indent=1))
            if part.exists():
                shutil.rmtree(part)
            tmp.rename(part)
            summary["converted"].append(name)
        summary["rows"][split] = stats.rows
        summary["skipped"][split] = stats.skipped
        if stats.messages:
            summary.setdefault("messages", {})[split] = stats.messages
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dense": spec.dense,
        "sparse": spec.sparse,
        "num_embeddings": spec.num_embeddings,
        "multi_hot": spec.multi_hot,
        "id_dtype": id_dtype.name,
        "splits": parts,
        "settings": source.settings,
        "config": asdict(cfg),
        "rows": summary["rows"],
        "skipped": summary["skipped"],
    }
    tmp_meta = out / "meta.json.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=1))
    tmp_meta.rename(out / "meta.json")
    summary["seconds"] = time.perf_counter() - t0
    return summary
