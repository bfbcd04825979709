"""User-facing errors. The CLI prints ``dmtrec: error: <message>`` for these, never a traceback."""


class DmtrecError(Exception):
    """An error caused by the user's input or options; its message is one self-contained line."""


class DataError(DmtrecError):
    """Bad input data: the message names the file, and the line/column where known."""


class ConfigError(DmtrecError):
    """Bad or inconsistent options: the message names the option."""
