"""``dmtrec bench data``: read throughput of the data path on one core, and the memory of
preprocessing, on one generated real-format Criteo file.

The file has Criteo's layout and value shapes: a 0/1 label (25% positive), 13 integer counts
(heavy-tailed, some negative, 5-45% missing per column) and 26 categorical ids as 8-digit hex
hashes (power-law frequencies, each column capped at its Criteo Kaggle cardinality, 4%
missing). It is written with vectorised numpy/pyarrow, so 5M rows take seconds.

Measured in one run, single-threaded (``torch.set_num_threads(1)``, pyarrow with one thread):

- ``criteo_tsv``: ``--data criteo`` batches of the first ``read_rows`` rows (TSV);
- ``csv``: ``--data csv`` (column-spec reader) batches of the same rows written as a CSV with a
  header (its one-time vocabulary pass is timed separately, ``vocab_pass_rows_per_s``);
- ``preprocessed``: ``--data preprocessed`` batches of the store made from the whole file,
  shuffled as in training;
- ``pyarrow_csv``: plain ``pyarrow.csv.read_csv`` of the TSV (types inferred, no transforms):
  the reference a reader is compared with (``ratio_to_pyarrow``; the ``csv`` reader against
  ``pyarrow.csv`` on its CSV file, recorded as ``pyarrow_rows_per_s``).

``rows_per_s`` is rows per second of the process's CPU time (``time.process_time``): on this
shared box wall time also counts waiting for a core, so CPU time is the one-core figure;
``wall_rows_per_s`` and the load average are recorded beside it. The readers' passes are
interleaved (pass i of each before pass i + 1 of any), so they meet the same load, and each
reader's best of ``repeats`` passes is kept. ``preprocess_peak_rss_mb`` is the peak resident
memory (``VmHWM``) of a fresh subprocess that runs ``preprocess`` on the whole ``rows``-row
file; that subprocess imports neither torch nor TorchRec.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmtrec.options import option

GOALS = {
    "criteo_tsv_rows_per_s": 300_000,
    "preprocessed_rows_per_s": 2_000_000,
    "preprocess_peak_rss_mb": 1024,
}
# Criteo Kaggle's per-column cardinalities (C1..C26): the ids are drawn below these caps.
CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_CHUNK = 250_000


@dataclass
class DataBenchConfig:
    """Options of ``dmtrec bench data`` (``bench_data(out, **asdict(cfg))``)."""

    rows: int = option(5_000_000, "rows of the generated file (preprocessed, RSS)", minimum=1)
    read_rows: int = option(1_000_000, "its first rows read by the text readers", minimum=1)
    batch_size: int = option(4096, "batch size of the reads", minimum=1)
    hash_size: int = option(1_000_000, "rows per hashed Criteo table", minimum=2)
    repeats: int = option(3, "passes per reader, interleaved (the best is kept)", minimum=1)
    seed: int = option(0, "seed of the generated data and the shuffle", minimum=0)
    keep_files: bool = option(False, "keep the generated files under OUT/bench_data_files")


def run_bench_data(out: str, cfg: DataBenchConfig | None = None) -> dict[str, Any]:
    """``bench_data`` with the options of ``cfg``."""
    return bench_data(out, **asdict(cfg or DataBenchConfig()))


def _criteo_table(n: int, rng: np.random.Generator):
    """``n`` rows of Criteo-shaped data as an Arrow table (hex ids as 8-byte strings)."""
    import pyarrow as pa

    cols: dict[str, Any] = {"label": pa.array((rng.random(n) < 0.25).astype(np.int8))}
    missing = np.linspace(0.05, 0.45, 13)
    for j in range(13):
        x = np.floor(rng.lognormal(1.0 + 0.25 * j, 1.5, n)).astype(np.int64)
        if j == 1:
            x -= 3  # I2 has small negative counts
        cols[f"I{j + 1}"] = pa.array(x, mask=rng.random(n) < missing[j])
    for j, card in enumerate(CARDINALITIES):
        ids = np.minimum(rng.zipf(1.15, n), card).astype(np.uint64)
        h = (ids * np.uint64(2654435761) + np.uint64(j * 40503)) & np.uint64(0xFFFFFFFF)
        nibbles = (h[:, None] >> np.arange(28, -1, -4, dtype=np.uint64)) & np.uint64(0xF)
        data = _HEX[nibbles.astype(np.intp)]
        mask = rng.random(n) < 0.04
        validity = pa.array(~mask).buffers()[1]
        arr = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(8), n, [validity, pa.py_buffer(data.tobytes())], null_count=int(mask.sum())
        )
        cols[f"C{j + 1}"] = arr.cast(pa.binary()).cast(pa.string())
    return pa.table(cols)


def write_criteo(
    tsv: Path,
    rows: int,
    seed: int = 0,
    head_rows: int = 0,
    head_tsv: Path | None = None,
    head_csv: Path | None = None,
) -> None:
    """Write ``rows`` generated rows to ``tsv`` (Criteo format, no header), and their first
    ``head_rows`` to ``head_tsv`` (the same format) and ``head_csv`` (comma-separated, with a
    header naming the columns label, I1..I13, C1..C26)."""
    import pyarrow.csv as pa_csv

    rng = np.random.default_rng(seed)
    tsv_opts = pa_csv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    csv_opts = pa_csv.WriteOptions(include_header=True, quoting_style="none")
    targets = [
        (tsv, tsv_opts, rows),
        (head_tsv, tsv_opts, head_rows),
        (head_csv, csv_opts, head_rows),
    ]
    writers: list[Any] = [None] * len(targets)
    done = 0
    try:
        while done < rows:
            n = min(_CHUNK, rows - done)
            table = _criteo_table(n, rng)
            for i, (path, opts, limit) in enumerate(targets):
                if path is None or done >= limit:
                    continue
                if writers[i] is None:
                    writers[i] = pa_csv.CSVWriter(str(path), table.schema, write_options=opts)
                writers[i].write_table(table.slice(0, min(n, limit - done)))
            done += n
    finally:
        for w in writers:
            if w is not None:
                w.close()


def _time(fn, repeats: int) -> tuple[float, float, Any]:
    """Best (CPU seconds, wall seconds, result) of ``repeats`` calls of ``fn``."""
    best = (float("inf"), float("inf"), None)
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        result = fn()
        c, w = time.process_time() - c0, time.perf_counter() - w0
        if c < best[0]:
            best = (c, w, result)
    return best


def _count(batches) -> int:
    return sum(int(b.labels.numel()) for b in batches)


# The child reports VmHWM, the peak RSS of its own address space: ru_maxrss would also count
# the parent's RSS at fork time (Linux keeps the larger of the two across exec).
_CHILD = """
import json, sys
from dmtrec.data.preprocess import PreprocessConfig, preprocess
cfg = PreprocessConfig(**json.loads(sys.argv[1]))
summary = preprocess(cfg)
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
summary["peak_rss_mb"] = hwm / 1024
summary["torch_imported"] = "torch" in sys.modules
print(json.dumps(summary))
"""


def bench_data(
    out: str,
    rows: int = 5_000_000,
    read_rows: int = 1_000_000,
    batch_size: int = 4096,
    hash_size: int = 1_000_000,
    repeats: int = 3,
    seed: int = 0,
    keep_files: bool = False,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); writes and returns ``OUT/bench_data.json``."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import torch

    from dmtrec.data.columns import ColumnTable
    from dmtrec.data.criteo import CriteoTSV
    from dmtrec.data.preprocessed import PreprocessedData

    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    read_rows = min(read_rows, rows)
    outdir = Path(out)
    work = outdir / "bench_data_files"
    work.mkdir(parents=True, exist_ok=True)
    load = {"start": os.getloadavg()}
    t0 = time.perf_counter()
    full, head, head_csv = work / "criteo_full.tsv", work / "criteo_head.tsv", work / "head.csv"
    write_criteo(full, rows, seed, head_rows=read_rows, head_tsv=head, head_csv=head_csv)
    gen_s = time.perf_counter() - t0

    # preprocess the whole file in a fresh process: its peak RSS
    store = work / "store"
    child_cfg = {
        "kind": "criteo",
        "train": [str(full)],
        "out": str(store),
        "table_size": hash_size,
        "progress_every": 10.0,
        "force": True,
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t1 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(child_cfg)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"preprocess subprocess failed:\n{proc.stderr[-4000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    preprocess_s = time.perf_counter() - t1

    readers: dict[str, dict[str, Any]] = {}

    def record(name: str, n: int, cpu: float, wall: float, **extra: Any) -> None:
        readers[name] = {
            "rows": n,
            "rows_per_s": n / cpu,
            "wall_rows_per_s": n / wall,
            "cpu_s": cpu,
            "wall_s": wall,
            **extra,
        }

    def read_pyarrow(path: Path, delimiter: str, header: bool) -> int:
        opts = pa_csv.ReadOptions(use_threads=False, autogenerate_column_names=not header)
        table = pa_csv.read_csv(
            str(path), read_options=opts, parse_options=pa_csv.ParseOptions(delimiter=delimiter)
        )
        return table.num_rows

    criteo = CriteoTSV({"train": [str(head)]}, table_size=hash_size)
    sparse = [f"C{j}" for j in range(1, 27)]
    v0 = time.process_time()
    table = ColumnTable(
        {"train": str(head_csv)},
        label="label",
        dense=[f"I{j}" for j in range(1, 14)],
        sparse=sparse,
    )
    vocab_cpu = time.process_time() - v0
    pre = PreprocessedData(str(store), shuffle=True, seed=seed)
    parsed_of_4 = []

    def rank_of_4() -> int:
        n = _count(criteo.batches("train", batch_size, rank=1, world_size=4))
        parsed_of_4.append(criteo.stats["train"].parsed)
        return n

    passes = {  # name -> a pass returning the rows it delivered
        "pyarrow_csv": lambda: read_pyarrow(head, "\t", False),
        "criteo_tsv": lambda: _count(criteo.batches("train", batch_size)),
        "pyarrow_csv_on_csv": lambda: read_pyarrow(head_csv, ",", True),
        "csv": lambda: _count(table.batches("train", batch_size)),
        "preprocessed": lambda: _count(pre.batches("train", batch_size, epoch=1)),
        "criteo_tsv_rank_of_4": rank_of_4,
    }
    for fn in passes.values():  # warm-up: imports, page cache, maps paged in
        fn()
    # Interleaved: pass i of every reader runs before pass i + 1 of any, so the readers see
    # the same load on this shared box; each keeps its best pass.
    best: dict[str, tuple[float, float, int]] = {}
    for _ in range(repeats):
        for name, fn in passes.items():
            cpu, wall, n = _time(fn, 1)
            if name not in best or cpu < best[name][0]:
                best[name] = (cpu, wall, n)
    record("pyarrow_csv", best["pyarrow_csv"][2], *best["pyarrow_csv"][:2], file="criteo_head.tsv")
    record("criteo_tsv", best["criteo_tsv"][2], *best["criteo_tsv"][:2], file="criteo_head.tsv")
    n_csv = best["csv"][2]
    record(
        "csv",
        n_csv,
        *best["csv"][:2],
        file="head.csv",
        vocab_pass_rows_per_s=n_csv / vocab_cpu,
        vocab_sizes=[len(table.vocab_values[c]) for c in sparse],
        pyarrow_rows_per_s=best["pyarrow_csv_on_csv"][2] / best["pyarrow_csv_on_csv"][0],
    )
    record(
        "preprocessed",
        best["preprocessed"][2],
        *best["preprocessed"][:2],
        file="store of criteo_full.tsv",
        shuffled=True,
    )
    # one rank of four: it reads every block but parses a quarter of the rows
    parsed = parsed_of_4[-1]
    sharded = {
        "criteo_tsv_rank_of_4": {
            "rows_parsed": parsed,
            "rows_per_s": parsed / best["criteo_tsv_rank_of_4"][0],
        }
    }

    ref = readers["pyarrow_csv"]["rows_per_s"]
    for r in readers.values():
        base = r.get("pyarrow_rows_per_s", ref)
        r["ratio_to_pyarrow"] = r["rows_per_s"] / base
    load["end"] = os.getloadavg()
    result = {
        "readers": readers,
        "preprocess_peak_rss_mb": child["peak_rss_mb"],
        "preprocess": {
            "rows": rows,
            "file_mb": full.stat().st_size / 1e6,
            "seconds": preprocess_s,
            "rows_per_s_wall": rows / preprocess_s,
            "torch_imported": child["torch_imported"],
            "skipped": child["skipped"],
        },
        "sharded": sharded,
        "goals": GOALS,
        "met": {
            "criteo_tsv_rows_per_s": readers["criteo_tsv"]["rows_per_s"]
            >= GOALS["criteo_tsv_rows_per_s"],
            "preprocessed_rows_per_s": readers["preprocessed"]["rows_per_s"]
            >= GOALS["preprocessed_rows_per_s"],
            "preprocess_peak_rss_mb": child["peak_rss_mb"] < GOALS["preprocess_peak_rss_mb"],
        },
        "setup": {
            "rows": rows,
            "read_rows": read_rows,
            "batch_size": batch_size,
            "hash_size": hash_size,
            "repeats": repeats,
            "seed": seed,
            "threads": 1,
            "generate_s": gen_s,
            "cpu_count": os.cpu_count(),
            "loadavg_1_5_15": load,
            "total_s": time.perf_counter() - t0,
        },
    }
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "bench_data.json").write_text(json.dumps(result, indent=2))
    if not keep_files:
        shutil.rmtree(work, ignore_errors=True)
    return result
