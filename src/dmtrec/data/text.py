"""Line-oriented text files (Criteo TSV, CSV) as blocks of records, plain or gzipped.

A plain file is cut into blocks of ``block_bytes``: block ``j`` holds the lines that *start* in
``[data_start + j*S, data_start + (j+1)*S)``, so block boundaries are found with two small
reads and no pass over the file, and a block can be read alone (``os.pread``) in any order —
which is what a seeded shuffle of blocks needs. Every rank reads the bytes of every block it
visits and finds the line starts with one vectorised numpy scan (``== '\\n'``, far faster than
parsing), but hands only its own lines to the parser: they are gathered with ``pyarrow``'s
``take`` on a zero-copy binary array of the block's lines, and the result is one buffer of
complete lines that ``pyarrow.csv`` parses. ``pread`` rather than a memory map keeps the
resident memory to one block (file pages read through a map count in the RSS).

A gzipped file cannot seek: its blocks are the decompressed stream cut at line ends every
``block_bytes``, in file order (a shuffle can permute the files and the rows in a block, not
the blocks of one gzip file; preprocess for a full shuffle).

Records are the non-blank lines; a blank line (a trailing one, ``\\r\\n`` alone) is not a row,
as before. Line numbers (for messages) are counted only when a bad row needs one.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dmtrec.data.shard import epoch_permutation
from dmtrec.errors import DataError

NEWLINE = 10
CR = 13
_BOM = b"\xef\xbb\xbf"
_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)
_PROBE = 1 << 16  # bytes read at a time while looking for the next line start


class TextBlock:
    """The bytes of whole lines of one file, with the line and record (non-blank) index."""

    def __init__(
        self,
        file: TextFile,
        data: bytes,
        start: int,
        first_line: int | None,
        key: tuple[int, ...],
    ) -> None:
        if data and data[-1] != NEWLINE:
            data = data + b"\n"  # a last line without its newline: complete it
        self.file = file
        self.start = start  # byte offset of the block in the (decompressed) file
        self.key = key
        self._first_line = first_line  # 1-based number of the block's first line, if known
        self.file_bytes = len(data)  # bytes of the file (compressed, for gzip) it accounts for
        self.buffer = pa.py_buffer(data)
        arr = np.frombuffer(data, dtype=np.uint8)
        ends = np.flatnonzero(arr == NEWLINE) + 1  # end (exclusive) of each line
        self.line_offsets = np.zeros(len(ends) + 1, dtype=np.int64)
        self.line_offsets[1:] = ends
        content = np.diff(self.line_offsets) - 1  # line length without its newline
        if len(ends):
            cr = np.zeros(len(ends), dtype=bool)
            has = content > 0
            cr[has] = arr[ends[has] - 2] == CR
            content = content - cr
        self.record_lines = np.flatnonzero(content > 0)  # record -> line index in block
        self.n = len(self.record_lines)
        self.num_lines = len(ends)

    def lines(self, records: np.ndarray) -> pa.Buffer:
        """One buffer of the given records' lines (newlines kept), in the order given."""
        lines = self.record_lines[records]
        if len(lines) and lines[-1] - lines[0] + 1 == len(lines) and np.all(np.diff(lines) == 1):
            lo, hi = self.line_offsets[lines[0]], self.line_offsets[lines[-1] + 1]
            return self.buffer.slice(int(lo), int(hi - lo))  # a contiguous run: no copy
        arr = pa.Array.from_buffers(
            pa.large_binary(),
            self.num_lines,
            [None, pa.py_buffer(self.line_offsets), self.buffer],
        )
        taken = pc.take(arr, pa.array(lines, type=pa.int64()))
        offsets = np.frombuffer(taken.buffers()[1], dtype=np.int64, count=len(lines) + 1)
        return taken.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0]))

    def line_texts(self, records: np.ndarray) -> list[str]:
        """The given records' lines as text (for the line-by-line re-scan of a bad block)."""
        data = self.buffer.to_pybytes()
        lo = self.line_offsets[self.record_lines[records]]
        hi = self.line_offsets[self.record_lines[records] + 1]
        return [data[a:b].decode("utf-8", "replace") for a, b in zip(lo.tolist(), hi.tolist())]

    def line_numbers(self, records: np.ndarray) -> np.ndarray:
        """1-based file line number of each record."""
        if self._first_line is None:
            self._first_line = self.file.line_of(self.start)
        return self._first_line + self.record_lines[records]


class TextFile:
    """One text file of a split: plain (blocks read in any order) or gzipped (in order)."""

    def __init__(self, path: str, index: int, header: bool, block_bytes: int) -> None:
        self.path = path
        self.index = index  # position of the file in its split (a stable id for seeding)
        self.gz = path.endswith(".gz")
        self.block_bytes = block_bytes
        self.header_text: str | None = None
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        self.size = os.path.getsize(path)
        self.data_start = 0  # byte offset of the first data line (after a BOM and header)
        self.header_lines = 0
        self._checkpoints: dict[int, int] = {}  # byte offset (a line start) -> lines before it
        head = self._head()
        if head.startswith(_BOM):
            self.data_start = len(_BOM)
        if header:
            end = head.find(b"\n", self.data_start)
            if end < 0:
                end = len(head) - 1  # the header line is the whole file
            text = head[self.data_start : end + 1].decode("utf-8", "replace")
            self.header_text = text.rstrip("\r\n") if text.strip() else None
            self.data_start = end + 1
            self.header_lines = 1
        self._checkpoints[self.data_start] = self.header_lines

    def _head(self) -> bytes:
        """The first bytes of the (decompressed) file: enough for a BOM and a header line."""
        want = _PROBE
        while True:
            try:
                with open(self.path, "rb") as f:
                    raw = f.read(want)
            except OSError as e:
                raise DataError(f"{self.path}: cannot open: {e.strerror or e}") from None
            # A gzip head is inflated without the end-of-stream check (the stream may be cut).
            try:
                head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw) if self.gz else raw
            except zlib.error:
                raise DataError(
                    f"{self.path}: truncated or corrupt gzip stream after line 0"
                ) from None
            if b"\n" in head or len(raw) < want:
                return head
            want *= 4

    # -- plain files ------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Blocks of a plain file (gzip: unknown until read, see ``sequential_blocks``)."""
        span = max(0, self.size - self.data_start)
        return -(-span // self.block_bytes)

    def _line_start_at_or_after(self, fd: int, x: int) -> int:
        if x <= self.data_start:
            return self.data_start
        if x >= self.size:
            return self.size
        pos = x - 1  # a line starts at x iff byte x-1 is a newline
        while pos < self.size:
            chunk = os.pread(fd, _PROBE, pos)
            i = chunk.find(b"\n")
            if i >= 0:
                return pos + i + 1
            pos += len(chunk)
        return self.size

    def read_block(self, j: int) -> TextBlock:
        """Block ``j`` of a plain file."""
        lo = self.data_start + j * self.block_bytes
        hi = lo + self.block_bytes
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise DataError(f"{self.path}: cannot open: {e.strerror or e}") from None
        try:
            start = self._line_start_at_or_after(fd, lo)
            end = self._line_start_at_or_after(fd, hi)
            data = os.pread(fd, end - start, start) if end > start else b""
        except OSError as e:
            raise DataError(f"{self.path}: read error at byte {lo}: {e.strerror or e}") from None
        finally:
            os.close(fd)
        before = self._checkpoints.get(start)  # lines before the block, if known
        first = None if before is None else before + 1
        return TextBlock(self, data, start, first, (self.index, j))

    def line_of(self, offset: int) -> int:
        """1-based line number of the line starting at byte ``offset`` of a plain file.

        Counts newlines from the nearest known point before it, in chunks; the points found
        are kept, so all bad rows of a file cost at most one pass over it.
        """
        base = max(o for o in self._checkpoints if o <= offset)
        count = self._checkpoints[base]
        with open(self.path, "rb") as f:
            f.seek(base)
            pos = base
            while pos < offset:
                chunk = f.read(min(1 << 24, offset - pos))
                if not chunk:
                    break
                count += chunk.count(b"\n")
                pos += len(chunk)
        self._checkpoints[offset] = count
        return count + 1

    def units(self) -> list[int | None]:
        """Blocks of a plain file; a gzip file is one unit (read through in order)."""
        return [None] if self.gz else list(range(self.num_blocks))

    def read_unit(self, unit: int | None) -> Iterator[TextBlock]:
        if unit is None:
            yield from self.sequential_blocks()
        else:
            yield self.read_block(unit)

    # -- gzip files -------------------------------------------------------------------------
    def sequential_blocks(self) -> Iterator[TextBlock]:
        """The file's blocks in order (the only way through a gzip stream; plain files too)."""
        if not self.gz:
            for j in range(self.num_blocks):
                yield self.read_block(j)
            return
        lines_done = self.header_lines
        try:
            f = gzip.open(self.path, "rb")
        except OSError as e:
            raise DataError(f"{self.path}: cannot open: {e.strerror or e}") from None
        with f:
            carry = b""
            pos = 0
            skip = self.data_start
            j = 0
            raw_done = 0
            while True:
                try:
                    chunk = f.read(self.block_bytes)
                except _GZIP_ERRORS:
                    partial = lines_done + carry.count(b"\n")
                    raise DataError(
                        f"{self.path}: truncated or corrupt gzip stream after line {partial}"
                    ) from None
                except OSError as e:
                    raise DataError(
                        f"{self.path}: read error after line {lines_done}: {e.strerror or e}"
                    ) from None
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip, pos = chunk[cut:], skip - cut, pos + cut
                data = carry + chunk
                raw = f.fileobj.tell() if f.fileobj is not None else 0  # compressed bytes read
                if not chunk:
                    if data:
                        last = TextBlock(self, data, pos, lines_done + 1, (self.index, j))
                        last.file_bytes = max(0, self.size - raw_done)
                        yield last
                    return
                end = data.rfind(b"\n") + 1
                if end == 0:
                    carry = data
                    continue
                block = TextBlock(self, data[:end], pos, lines_done + 1, (self.index, j))
                block.file_bytes, raw_done = raw - raw_done, raw
                lines_done += block.num_lines
                pos += end
                carry = data[end:]
                j += 1
                yield block


class BlockFile(Protocol):
    """A file of a split as units a shuffle can permute (each read as one or more blocks)."""

    def units(self) -> list[Any]: ...

    def read_unit(self, unit: Any) -> Iterator[Any]: ...


def epoch_blocks(files: list[BlockFile], shuffle: bool, seed: int, epoch: int) -> Iterator[Any]:
    """The blocks of ``files`` in epoch order: file order, or (``shuffle``) a seeded
    permutation of all files' units (a plain file's blocks, a gzip file as a whole, a
    Parquet row group)."""
    units = [(f, u) for f in files for u in f.units()]
    order = epoch_permutation(seed, epoch, len(units)) if shuffle else range(len(units))
    for i in order:
        f, u = units[int(i)]
        yield from f.read_unit(u)
