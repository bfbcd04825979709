"""Progress of long reads (preprocessing, vocabulary passes) as plain lines on stderr.

One line every ``every`` seconds — rows, MB/s and, when the total is known, percent and ETA —
whether or not stderr is a terminal (logs of batch jobs get it too; no carriage returns).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """Call ``update(rows, nbytes)`` as work is done; prints at most one line per ``every`` s.

    ``total_bytes`` (of the inputs, compressed size for gzip) gives the percent and ETA;
    ``every <= 0`` disables it. ``done()`` prints a final line if any line was printed.
    """

    def __init__(
        self,
        what: str,
        total_bytes: int | None = None,
        every: float = 10.0,
        stream: TextIO | None = None,
        clock=time.monotonic,
    ) -> None:
        self.what = what
        self.total = total_bytes
        self.every = every
        self.stream = stream
        self.clock = clock
        self.rows = 0
        self.bytes = 0
        self.start = clock()
        self.last = self.start
        self.printed = 0

    def update(self, rows: int, nbytes: int) -> None:
        self.rows += rows
        self.bytes += nbytes
        if self.every > 0:
            now = self.clock()
            if now - self.last >= self.every:
                self.last = now
                self._print(now)

    def line(self, now: float | None = None) -> str:
        """The progress line as of ``now``."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = self.bytes / elapsed
        parts = [f"{self.what}: {self.rows:,} rows", f"{rate / 1e6:.1f} MB/s"]
        if self.total:
            frac = min(self.bytes / self.total, 1.0)
            parts.append(f"{100 * frac:.0f}%")
            if 0 < frac < 1 and rate > 0:
                parts.append(f"ETA {_duration((self.total - self.bytes) / rate)}")
        parts.append(f"{_duration(elapsed)} elapsed")
        return "dmtrec: " + ", ".join(parts)

    def _print(self, now: float) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(self.line(now), file=stream, flush=True)
        self.printed += 1

    def done(self) -> None:
        if self.every > 0 and self.printed:
            self._print(self.clock())


def with_progress(
    blocks: Iterable[Any], what: str, total_bytes: int, every: float
) -> Iterator[Any]:
    """``blocks`` (with ``n`` records and ``file_bytes``), reporting progress as they are read."""
    progress = Progress(what, total_bytes, every)
    for block in blocks:
        yield block
        progress.update(block.n, block.file_bytes)
    progress.done()
