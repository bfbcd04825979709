"""The one training step every path of dmtrec runs: trainer, benchmarks, partition probe, ExFM.

A step is forward -> loss -> clearing the gradients -> backward -> optimizer step. The embedding tables'
optimizer is fused into their backward (TorchRec's ``apply_optimizer_in_backward``), so
``optimizer.step()`` updates the dense parameters and ``loss.backward()`` already updated the
rows the batch touched. Keeping the sequence in one place means that a benchmark times exactly
what the trainer runs, and that a change of convention (e.g. the loss reduction) reaches every
caller at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torchrec.datasets.utils import Batch


class PhaseObserver(Protocol):
    """Something that wants to know which half of the step runs (e.g. the comm counter)."""

    phase: str


LossFn = Callable[[Any, Batch], torch.Tensor]


def bce_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean binary cross-entropy of the logits against the batch's 0/1 labels."""
    return F.binary_cross_entropy_with_logits(logits, batch.labels)


def train_step(
    model: Callable[[torch.Tensor, Any], Any],
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    loss_fn: LossFn = bce_loss,
    observer: PhaseObserver | None = None,
) -> tuple[torch.Tensor, Any]:
    """Run one optimisation step of ``model`` on ``batch``; return (detached loss, output).

    ``model`` is called as ``model(batch.dense_features, batch.sparse_features)``; ``loss_fn``
    turns its output and the batch into the scalar to minimise (default: BCE on the logits),
    so heads with several outputs (ExFM's auxiliary head) or extra terms (regularisers) use
    the same step. ``observer.phase`` is set to ``"forward"`` / ``"backward"`` around the two
    halves, which lets the communication counter attribute each collective.
    """
    if observer is not None:
        observer.phase = "forward"
    output = model(batch.dense_features, batch.sparse_features)
    loss = loss_fn(output, batch)
    optimizer.zero_grad()
    if observer is not None:
        observer.phase = "backward"
    loss.backward()
    optimizer.step()
    return loss.detach(), output
