"""Bad-row accounting the file readers share: one-line messages naming ``file:line:col``,
counted skips, and a hard stop past ``--max-bad-rows``."""

from __future__ import annotations

from dmtrec.data.base import DataStats
from dmtrec.errors import DataError

MAX_MESSAGES = 5  # bad-row messages kept per split; the count keeps going
MAX_RECORDS = 1000  # bad rows kept as records per split (the trainer's skipped_rows.jsonl)


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
        if len(self.stats.records) < MAX_RECORDS:
            rec: dict = {"file": path}
            if where.isdigit():
                rec["line"] = int(where)
            elif where.startswith("row ") and where[4:].isdigit():
                rec["row"] = int(where[4:])
            else:
                rec["where"] = where
            if err.col:
                rec["column"], rec["column_name"] = err.col
            rec["reason"] = err.reason
            self.stats.records.append(rec)
        if self.stats.skipped > self.max_bad_rows:
            raise DataError(
                f"{path}:{where}: {self.stats.skipped} bad rows, more than --max-bad-rows "
                f"{self.max_bad_rows} allows (last: {reason}); fix the input or raise "
                "--max-bad-rows"
            )
