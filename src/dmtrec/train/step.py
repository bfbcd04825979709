"""The one training step every path of dmtrec runs: trainer, benchmarks, partition probe, ExFM.

A step is forward -> loss -> clearing the gradients -> backward -> optimizer step. The embedding tables'
optimizer is fused into their backward (TorchRec's ``apply_optimizer_in_backward``), so
``optimizer.step()`` updates the dense parameters and ``loss.backward()`` already updated the
rows the batch touched. Keeping the sequence in one place means that a benchmark times exactly
what the trainer runs, and that a change of convention (e.g. the loss reduction) reaches every
caller at once.

``Stepper`` runs that step over a stream of batches in one of two ways (``--pipeline``):

- ``none``: ``train_step`` on each batch in turn;
- ``sparse-dist``: TorchRec's ``TrainPipelineSparseDist``, which starts batch i+1's input
  distribution (the sharded modules' ``input_dist``: the baseline EBC's id all-to-all, SPTT's
  id exchange to the towers' hosts) before batch i's forward and finishes it before batch i's
  backward, so the id exchange overlaps with compute. Its ``progress`` orders the same
  sequence itself (gradients cleared before the forward instead of after it: the same, as
  they only accumulate in the backward) around ``forward_loss``, this module's forward and
  loss; the math is identical, only the overlap differs (tests/test_pipeline.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch

from dmtrec.errors import ConfigError

PIPELINES = ("none", "sparse-dist")


class PhaseObserver(Protocol):
    """Something that wants to know which half of the step runs (e.g. the comm counter)."""

    phase: str


LossFn = Callable[[Any, Batch], torch.Tensor]


def bce_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean binary cross-entropy of the logits against the batch's 0/1 labels."""
    return F.binary_cross_entropy_with_logits(logits, batch.labels)


def forward_loss(
    model: Callable[[torch.Tensor, Any], Any],
    batch: Batch,
    loss_fn: LossFn = bce_loss,
    observer: PhaseObserver | None = None,
) -> tuple[torch.Tensor, Any]:
    """The forward half of a step: ``model(batch.dense_features, batch.sparse_features)``
    and the loss ``loss_fn`` makes of its output; (loss, output)."""
    if observer is not None:
        observer.phase = "forward"
    output = model(batch.dense_features, batch.sparse_features)
    return loss_fn(output, batch), output


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
    loss, output = forward_loss(model, batch, loss_fn, observer)
    optimizer.zero_grad()
    if observer is not None:
        observer.phase = "backward"
    loss.backward()
    optimizer.step()
    return loss.detach(), output


@dataclass
class PipelineBatch(Batch):
    """A ``Batch`` that tells TorchRec's pipeline how dmtrec models read it.

    The pipeline finds the sharded modules by FX-tracing the model with the batch as its
    input; dmtrec models take the batch's fields, ``forward(dense, sparse)``, so their two
    placeholders are named after the fields they are (``to_proxy_tuple``, the pipeline's hook
    for models with flattened inputs): a sharded module called with ``sparse`` is then called
    with ``batch.sparse_features``, and the pipeline runs its input dist on that KJT."""

    @classmethod
    def of(cls, batch: Batch) -> PipelineBatch:
        return cls(batch.dense_features, batch.sparse_features, batch.labels)

    def to(self, device: torch.device, non_blocking: bool = False) -> PipelineBatch:
        return PipelineBatch.of(super().to(device, non_blocking=non_blocking))

    def to_proxy_tuple(self, model: nn.Module) -> dict[str, Any]:
        from torch.fx._symbolic_trace import PHWithMeta

        dense, sparse = list(inspect.signature(model.forward).parameters)[:2]
        return {dense: PHWithMeta("dense_features"), sparse: PHWithMeta("sparse_features")}


def _sparse_dist_pipeline(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    loss_fn: LossFn,
    observer: PhaseObserver | None,
):
    """TorchRec's ``TrainPipelineSparseDist`` around ``forward_loss``, telling ``observer``
    the phase (the next batch's id exchange runs in the forward phase)."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    def model_fwd(batch: PipelineBatch) -> tuple[torch.Tensor, Any]:
        loss, output = forward_loss(model, batch, loss_fn)
        return loss, (loss.detach(), output, batch)

    class Pipeline(TrainPipelineSparseDist):
        def progress(self, dataloader_iter: Iterator[PipelineBatch]) -> Any:
            if observer is not None:
                observer.phase = "forward"
            return super().progress(dataloader_iter)

        def _backward(self, losses: torch.Tensor) -> None:
            if observer is not None:
                observer.phase = "backward"
            super()._backward(losses)

    return Pipeline(model, optimizer, device, execute_all_batches=True, custom_model_fwd=model_fwd)


class Stepper:
    """``train_step`` over a stream of batches, unpipelined or through TorchRec's
    ``TrainPipelineSparseDist`` (``pipeline``: one of ``PIPELINES``, see the module docstring).

    ``steps(batches)`` trains on every batch in order and yields (detached loss, output,
    the batch on the device) after each step; when it is exhausted nothing is in flight, so
    callers that stop to evaluate or to finish give it exactly the batches up to that point.
    ``detach()`` gives the model its own forwards back (the pipeline replaces its sharded
    modules' forwards while it runs): call it before using the model outside ``steps``."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        pipeline: str = "none",
        loss_fn: LossFn = bce_loss,
        observer: PhaseObserver | None = None,
    ) -> None:
        if pipeline not in PIPELINES:
            raise ConfigError(
                f"--pipeline: unknown {pipeline!r}; choose from {', '.join(PIPELINES)}"
            )
        self.model, self.optimizer, self.device = model, optimizer, device
        self.pipeline, self.loss_fn, self.observer = pipeline, loss_fn, observer
        self._pipe = None

    def steps(self, batches: Iterable[Batch]) -> Iterator[tuple[torch.Tensor, Any, Batch]]:
        if self.pipeline == "none":
            for batch in batches:
                batch = batch.to(self.device)
                loss, output = train_step(
                    self.model, self.optimizer, batch, self.loss_fn, self.observer
                )
                yield loss, output, batch
            return
        if self._pipe is None:
            self._pipe = _sparse_dist_pipeline(
                self.model, self.optimizer, self.device, self.loss_fn, self.observer
            )
        from torch.fx.proxy import TraceError

        stream = (PipelineBatch.of(b) for b in batches)
        try:
            while True:
                try:
                    out = self._pipe.progress(stream)
                except StopIteration:
                    return
                except TraceError as e:  # TorchRec's FX trace of the model, at the first batch
                    raise ConfigError(
                        f"--pipeline sparse-dist: TorchRec's pipeline cannot trace the model's "
                        f"forward around its sharded modules ({e}); use --pipeline none"
                    ) from e
                yield out
        finally:
            if self._pipe.batches:  # left early (an error, a stop): drop what is in flight
                self._pipe.reset()

    @property
    def pipelined(self) -> list[str]:
        """The sharded modules whose input dist the pipeline runs ahead (their names in the
        traced model), once it has run a batch."""
        return [m.forward.name for m in self._pipe._pipelined_modules] if self._pipe else []

    def detach(self) -> None:
        if self._pipe is not None:
            self._pipe.detach()
