"""Quality metrics: AUC (torchmetrics), logloss, and normalized entropy (NE).

NE = logloss / H(p), p the positive rate of the evaluated labels: 1.0 is no better than
predicting the base rate, lower is better (the metric of the DLRM/DMT/ExFM papers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc


def quality(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """AUC, logloss and NE of ``logits`` against 0/1 ``labels`` (1-D, same length)."""
    logits = logits.double()
    labels = labels.double()
    n = labels.numel()
    if n == 0:
        return {"auc": float("nan"), "logloss": float("nan"), "ne": float("nan")}
    logloss = float(F.binary_cross_entropy_with_logits(logits, labels))
    p = float(labels.mean())
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else float("nan")
    auc = float(binary_auroc(logits, labels.long())) if 0 < p < 1 else float("nan")
    return {"auc": auc, "logloss": logloss, "ne": logloss / entropy}
