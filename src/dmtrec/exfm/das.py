"""The data augmentation service (DAS): one FM inference per example, logged next to the data.

For window ``t`` the DAS uses the newest snapshot a ``fm_lag``-window delay allows: snapshot
``v`` (trained on windows ``[0, (v + 1) * snapshot_every)``) is published when window
``(v + 1) * snapshot_every`` starts and reaches the DAS ``fm_lag`` windows later, so window
``t`` gets ``v = (t - fm_lag) // snapshot_every - 1`` (none while that is negative: those
early examples carry no teacher label). The FM never sees a window's labels before labelling
it -- inference runs while the labels are still unknown, as in the paper.

The store is Parquet, hive-partitioned by window, next to the stream:
``STREAM/das/<name>/window=<t>/part-0.parquet`` with (key, fm_version, fm_prediction), and
``STREAM/das/<name>/das.json`` (schedule, counts, the logged predictions' NE per window).
Why Parquet rather than an embedded database: the store is written once per window
(append-only, a new window is a new file: no writer lock, no compaction) and only ever read
as "all predictions of window t" and joined on the key -- a partition-pruned columnar scan,
which every tool (pyarrow, pandas, DuckDB, Spark) reads directly; a row store would add
nothing that is used.

``fm_calls`` counts the rows that went through the FM's forward (a forward hook), so the
count is what was computed, not what was planned; students never load the FM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from dmtrec.errors import ConfigError, DataError
from dmtrec.exfm.config import AugmentConfig
from dmtrec.exfm.stream import Stream, WindowBatches
from dmtrec.exfm.teacher import build_fm, load_snapshot, predict, read_manifest
from dmtrec.models import ModelConfig
from dmtrec.train.metrics import quality

STORE_SCHEMA = pa.schema(
    [("key", pa.int64()), ("fm_version", pa.int32()), ("fm_prediction", pa.float32())]
)


def snapshot_for_window(t: int, fm_lag: int, snapshot_every: int) -> int | None:
    """The newest FM snapshot the DAS may use for window ``t`` (None: none published yet)."""
    v = (t - fm_lag) // snapshot_every - 1
    return v if v >= 0 else None


def store_dir(stream: Stream, name: str) -> Path:
    return stream.path / "das" / name


class CallCounter:
    """Counts the examples a module's forward sees (one FM inference per example)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.calls += int(output.shape[0])

    def remove(self) -> None:
        self._handle.remove()


def augment(stream: Stream, teacher_dir: Path, acfg: AugmentConfig) -> dict[str, Any]:
    """Label every window with its scheduled snapshot; write the store; return its summary.

    Inside a process group.
    """
    acfg.validate()
    teacher_dir = Path(teacher_dir)
    manifest = read_manifest(teacher_dir)
    if manifest["stream_fingerprint"] != stream.meta.fingerprint:
        raise DataError(f"{teacher_dir}: the FM was trained on another stream than {stream.path}")
    every = int(manifest["snapshot_every"])
    if acfg.fm_version is not None:
        have = [s["version"] for s in manifest["snapshots"]]
        if acfg.fm_version not in have:
            span = f"v{have[0]}..v{have[-1]}" if have else "none"
            raise ConfigError(
                f"--fm-version {acfg.fm_version}: unknown FM snapshot in {teacher_dir} (it has {span})"
            )
    fm, _ = build_fm(
        stream,
        ModelConfig(**manifest["model"]),
        lr=manifest["optim"]["lr"],
        sparse_lr=manifest["optim"]["sparse_lr"],
        seed=manifest["seed"],
    )
    counter = CallCounter(fm)
    out = store_dir(stream, acfg.store_name)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("window=*/part-0.parquet"):
        old.unlink()
    loaded: int | None = None
    windows = []
    for t in range(stream.num_windows):
        v = (
            acfg.fm_version
            if acfg.fm_version is not None
            else snapshot_for_window(t, acfg.fm_lag, every)
        )
        entry: dict[str, Any] = {"window": t, "fm_version": v, "rows": 0}
        windows.append(entry)
        if v is None:
            continue
        if v != loaded:
            load_snapshot(fm, teacher_dir, manifest, v)
            loaded = v
        table = stream.window(t)
        wb = WindowBatches(table, stream.spec.dense, stream.spec.sparse)
        logits = predict(fm, wb, acfg.batch_size)
        prob = torch.sigmoid(logits).numpy().astype(np.float32)
        part = pa.table(
            {
                "key": table["key"],
                "fm_version": np.full(len(prob), v, np.int32),
                "fm_prediction": prob,
            },
            schema=STORE_SCHEMA,
        )
        d = out / f"window={t}"
        d.mkdir(exist_ok=True)
        pq.write_table(part, d / "part-0.parquet.tmp")
        os.replace(d / "part-0.parquet.tmp", d / "part-0.parquet")
        q = quality(logits, torch.from_numpy(wb.labels))
        entry.update(rows=len(prob), fm_ne=q["ne"], fm_auc=q["auc"])
    counter.remove()
    labeled = sum(w["rows"] for w in windows)
    summary = {
        "store": str(out),
        "teacher": str(teacher_dir),
        "fm_lag": acfg.fm_lag,
        "fm_version": acfg.fm_version,
        "snapshot_every": every,
        "fm_calls": counter.calls,
        "examples": stream.meta.rows,
        "examples_labeled": labeled,
        "windows": windows,
    }
    (out / "das.json").write_text(json.dumps(summary, indent=1))
    return summary


class Store:
    """Reader of a DAS store: a window's logged predictions, joined to a window's rows."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not (self.path / "das.json").is_file():
            raise DataError(f"{self.path}: not a DAS store (no das.json); run `exfm augment` first")
        self.summary = json.loads((self.path / "das.json").read_text())
        self._dataset = ds.dataset(
            self.path,
            format="parquet",
            partitioning="hive",
            schema=STORE_SCHEMA.append(pa.field("window", pa.int32())),
            exclude_invalid_files=True,
        )

    def join(self, rows: pa.Table, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fm_prediction, fm_version, has_prediction) aligned with ``rows`` (a window's rows,
        any subset): a left join on the key with Arrow's hash join."""
        logged = self._dataset.to_table(
            columns=["key", "fm_version", "fm_prediction"], filter=ds.field("window") == t
        )
        left = pa.table({"key": rows["key"], "__row": np.arange(rows.num_rows)})
        joined = left.join(logged, keys="key", join_type="left outer").sort_by("__row")
        has = joined["fm_prediction"].is_valid().to_numpy(zero_copy_only=False)
        pred = joined["fm_prediction"].fill_null(0.5).to_numpy().astype(np.float32)
        version = joined["fm_version"].fill_null(-1).to_numpy().astype(np.int32)
        return pred, version, has
