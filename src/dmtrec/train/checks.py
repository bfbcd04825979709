"""Input that cannot train is an error, not a model: checks the trainer runs on every rank.

- ``LabelCheck``: the training labels of the first ``LABEL_CHECK_ROWS`` rows (or of the whole
  split, when it is shorter) are all one value -> ``DataError`` (an AUC of a one-class split
  means nothing, and a loss of 0 looks like success);
- ``no_training_rows``: the message of a run that trained zero steps (every row skipped, an
  empty split, or fewer rows than ranks), with the row counts of all ranks;
- ``report_skipped``: the skipped rows of every rank and split, first ``MAX_RECORDS`` of them
  to ``OUT/skipped_rows.jsonl`` (file, line or row, column, reason) and one summary line.

Every function with a collective is called by all ranks at the same point (the decisions
depend only on all-reduced values, so every rank raises the same error).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dmtrec.data.base import DataStats
from dmtrec.errors import DataError

LABEL_CHECK_ROWS = 100_000  # at a 0.1% positive rate, P(no positive in 1e5 rows) ~ e^-100
MAX_RECORDS = 1000
SKIPPED_FILE = "skipped_rows.jsonl"


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_reduce(values: list[float], op, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _world() > 1:
        dist.all_reduce(t, op=op)
    return t.tolist()


class LabelCheck:
    """Min, max and count of the training labels until ``LABEL_CHECK_ROWS`` global rows (or
    the end of the first epoch); then one all-reduce and the verdict."""

    def __init__(self, device: torch.device, what: str) -> None:
        self.device, self.what = device, what
        self.rows, self.lo, self.hi = 0, float("inf"), float("-inf")
        self.done = False

    def add(self, labels: torch.Tensor) -> None:
        if self.done or labels.numel() == 0:
            return
        self.rows += int(labels.numel())
        lo, hi = torch.aminmax(labels.detach())
        self.lo, self.hi = min(self.lo, float(lo)), max(self.hi, float(hi))

    def due(self, global_rows_seen: int) -> bool:
        return not self.done and global_rows_seen >= LABEL_CHECK_ROWS

    def check(self, whole_split: bool) -> None:
        """Collective: raise ``DataError`` if every label seen on every rank is the same."""
        if self.done:
            return
        self.done = True
        neg_lo, hi = _all_reduce([-self.lo, self.hi], dist.ReduceOp.MAX, self.device)
        (rows,) = _all_reduce([float(self.rows)], dist.ReduceOp.SUM, self.device)
        if rows and -neg_lo == hi:
            scope = f"all {int(rows)} rows" if whole_split else f"the first {int(rows)} rows"
            raise DataError(
                f"{self.what}: every label of {scope} is {hi:g}; a click model needs both "
                "classes (check the label column and the train files)"
            )


def no_training_rows(
    stats: DataStats | None,
    what: str,
    out: str,
    global_batch: int,
    world: int,
    device: torch.device,
) -> DataError:
    """Collective: the error of a run whose first epoch had no training step."""
    rows, skipped = _all_reduce(
        [float(stats.rows if stats else 0), float(stats.skipped if stats else 0)],
        dist.ReduceOp.SUM,
        device,
    )
    rows, skipped = int(rows), int(skipped)
    if rows == 0 and skipped:
        rows_word = "row" if skipped == 1 else "rows"
        return DataError(
            f"{what}: no training rows: {skipped} bad {rows_word} skipped and none good "
            f"(reasons in {Path(out) / SKIPPED_FILE})"
        )
    if rows == 0:
        return DataError(f"{what}: no training rows (the split is empty)")
    return DataError(
        f"{what}: {rows} good training rows, fewer than one per rank ({world} ranks; "
        f"a global batch is {global_batch} rows)"
    )


def report_skipped(
    stats: dict[str, DataStats], out: str, rank: int, emit: bool = True
) -> dict[str, int]:
    """Collective: skipped rows per split over all ranks; rank 0 writes the first
    ``MAX_RECORDS`` to ``OUT/skipped_rows.jsonl`` and prints one summary line (``emit``).

    A run without skips removes a ``skipped_rows.jsonl`` an earlier run left behind."""
    mine = {s: (st.skipped, st.records) for s, st in stats.items()}
    parts: list[Any] = [mine]
    if _world() > 1:
        parts = [None] * _world()
        dist.all_gather_object(parts, mine)
    counts: dict[str, int] = {}
    records: list[dict] = []
    for part in parts:
        for split, (n, recs) in part.items():
            counts[split] = counts.get(split, 0) + n
            records.extend({"split": split, **r} for r in recs)
    counts = {s: n for s, n in counts.items() if n}
    if rank != 0:
        return counts
    path = Path(out) / SKIPPED_FILE
    if not counts:
        path.unlink(missing_ok=True)
        return counts
    order = {"train": 0, "valid": 1, "test": 2}
    records.sort(
        key=lambda r: (order.get(r["split"], 3), r["file"], r.get("line", r.get("row", 0)))
    )
    records = records[:MAX_RECORDS]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
    if emit:
        total = sum(counts.values())
        by_split = ", ".join(f"{s} {n}" for s, n in counts.items())
        print(
            f"skipped {total} bad rows ({by_split}); the first {len(records)} with file, line, "
            f"column and reason in {path}",
            flush=True,
        )
    return counts
