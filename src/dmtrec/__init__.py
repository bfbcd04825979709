"""dmtrec: Disaggregated Multi-Tower (DMT) training for large recommendation models on TorchRec."""

from dmtrec.errors import ConfigError, DataError, DmtrecError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "DmtrecError", "__version__"]
