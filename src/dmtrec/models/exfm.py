"""ExFM's student side, plain math (Meta, WWW'25 Companion, arXiv 2502.17494).

A foundation model (FM, the teacher) is trained elsewhere; its logged prediction ``y_FM`` of
each example reaches the small vertical models (VMs, the served students) with the example.
This module holds what a VM computes and minimises:

- ``VerticalModel``: any dmtrec model with a top MLP (DLRM, DCNv2, Wukong) as a shared
  *trunk* (embeddings, interaction, top MLP up to its last hidden layer) feeding a serving
  head ``y_S`` (the model's own last layer, the only output that is served) and 0, 1 or 2
  separate distillation heads ``y_D`` (the auxiliary head, and the student adapter's head);
- ``grad_scale``: identity forward, gradient x ``beta`` backward -- placed between the trunk
  and the distillation heads, it scales exactly what those heads send into the trunk;
- ``clip_teacher``: the distillation target ``min(alpha * y_FM, 1)``;
- ``exfm_loss``: ``h(y_S, y) + w * h(y_D, min(alpha * y_FM, 1)) [+ sa_w * h(y_D2, SG(y_SA))]``
  (``kd="aux"`` / ``"aux_sa"``), single-head KD ``h(y_S, y) + w * h(y_S, min(alpha y_FM, 1))``
  (``kd="plain"``) and ``h(y_S, y)`` (``kd="none"``); ``h`` is binary cross-entropy against a
  probability;
- ``StudentAdapter``: a tiny MLP ``y_SA = SA(y_FM)`` trained on fresh true labels, which
  re-maps a stale FM prediction before it supervises the second distillation head.

Nothing here imports ``dmtrec.parallel`` or ``dmtrec.train``: the streaming loop, the
distribution of the model and the optimisation step live in ``dmtrec.exfm``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dmtrec.errors import ConfigError
from dmtrec.models.common import FlatModel
from dmtrec.options import option

KD_MODES = ("none", "plain", "aux", "aux_sa")
# Distillation heads each mode adds on the trunk (plain KD distils into the serving head).
DISTILL_HEADS = {"none": 0, "plain": 0, "aux": 1, "aux_sa": 2}
_PROB_EPS = 1e-6  # FM probabilities are clamped to [eps, 1 - eps] before taking a logit


@dataclass
class DistillConfig:
    """The knobs of the distillation loss and of the student adapter."""

    w: float = option(1.0, "weight w of the auxiliary head's distillation loss", minimum=0)
    alpha: float = option(1.0, "teacher scale: the target is min(alpha * y_FM, 1)", minimum=0)
    beta: float = option(
        1.0, "gradient scale on what the distillation heads send into the trunk", minimum=0
    )
    sa_w: float = option(1.0, "weight of the student adapter's head loss (the paper: 1)", minimum=0)
    sa_hidden: list[int] = option(
        help="hidden widths of the student adapter MLP", factory=lambda: [16]
    )
    sa_lr: float = option(
        1e-2, "student adapter learning rate (Adam); 0 keeps the adapter the identity", minimum=0
    )

    def validate(self) -> None:
        """One-line ``ConfigError`` naming the first out-of-range knob."""
        checks = (
            ("w", self.w, self.w >= 0, ">= 0"),
            ("alpha", self.alpha, self.alpha > 0, "> 0"),
            ("beta", self.beta, self.beta >= 0, ">= 0"),
            ("sa-w", self.sa_w, self.sa_w >= 0, ">= 0"),
            ("sa-lr", self.sa_lr, self.sa_lr >= 0, ">= 0"),
        )
        for name, value, ok, rule in checks:
            if not (math.isfinite(value) and ok):
                raise ConfigError(f"--{name} must be a finite number {rule}, got {value}")
        if not self.sa_hidden or any(h < 1 for h in self.sa_hidden):
            raise ConfigError(f"--sa-hidden must be widths >= 1, got {self.sa_hidden}")


def check_kd(kd: str) -> None:
    if kd not in KD_MODES:
        raise ConfigError(f"--kd: unknown {kd!r}; choose from {', '.join(KD_MODES)}")


class _GradScale(torch.autograd.Function):
    """y = x forward; dL/dx = beta * dL/dy backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, beta: float) -> torch.Tensor:  # type: ignore[override]
        ctx.beta = beta
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.beta, None


def grad_scale(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient flowing back through it by
    ``beta``. ``beta = 1`` is a no-op, ``beta = 0`` stops the gradient (the heads after it
    still learn, the modules before it do not hear from them)."""
    return _GradScale.apply(x, float(beta))


def clip_teacher(fm_prob: torch.Tensor, alpha: float) -> torch.Tensor:
    """The distillation target ``min(alpha * y_FM, 1)`` (``alpha`` re-scales the FM's
    probabilities to the VM's traffic; the clip keeps the target a probability)."""
    return torch.clamp(alpha * fm_prob, max=1.0)


def prob_logit(prob: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` of a probability clamped away from 0 and 1."""
    return torch.logit(prob.clamp(_PROB_EPS, 1.0 - _PROB_EPS))


class VMOutput(NamedTuple):
    """What a ``VerticalModel`` returns: the served logit and the distillation heads' logits."""

    serving: torch.Tensor  # B
    distill: tuple[torch.Tensor, ...]  # len = DISTILL_HEADS[kd], each B


def _split_last_layer(head: nn.Module) -> nn.Linear:
    """Take the last ``Linear`` (hidden -> 1 logit) out of a head's top MLP in place.

    The top MLP is ``head.over_arch``: TorchRec's ``OverArch`` (layers in ``.model``) or a
    plain ``nn.Sequential``. Afterwards the head returns its last hidden layer (B x H).
    """
    over = getattr(head, "over_arch", None)
    layers = getattr(over, "model", over)
    last = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    if not isinstance(last, nn.Linear) or last.out_features != 1:
        raise ConfigError(
            f"an ExFM VM needs a model with a top MLP (dlrm, dcn, wukong); "
            f"{type(head).__name__} has none"
        )
    layers[-1] = nn.Identity()
    return last


class VerticalModel(nn.Module):
    """A VM: shared trunk -> serving head (true labels) + distillation heads (teacher labels).

    Built from a flat dmtrec model (``build_model`` with ``towers=None``): the model's last
    ``Linear`` becomes the serving head and the rest of the model, run by its own forward,
    is the trunk; each distillation head is a fresh ``Linear`` of the serving head's shape on
    the trunk output, behind ``grad_scale(., beta)``. ``ebc`` (the trunk's tables) is what
    the distributed build shards and gives the fused optimizer, as for any flat model.
    """

    def __init__(self, flat: FlatModel, num_distill_heads: int, beta: float = 1.0) -> None:
        super().__init__()
        if num_distill_heads not in (0, 1, 2):
            raise ValueError(f"num_distill_heads must be 0, 1 or 2, got {num_distill_heads}")
        self.serving = _split_last_layer(flat.head)
        self.trunk = flat
        self.distill = nn.ModuleList(
            nn.Linear(self.serving.in_features, 1) for _ in range(num_distill_heads)
        )
        self.beta = float(beta)

    @property
    def ebc(self) -> nn.Module:
        return self.trunk.ebc

    def trunk_output(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """B x H: the last hidden layer both kinds of head read."""
        z = self.trunk(dense, sparse)
        return z.unsqueeze(-1) if z.dim() == 1 else z

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> VMOutput:
        z = self.trunk_output(dense, sparse)
        serving = self.serving(z).squeeze(-1)
        if not len(self.distill):
            return VMOutput(serving, ())
        zd = grad_scale(z, self.beta)
        return VMOutput(serving, tuple(h(zd).squeeze(-1) for h in self.distill))


class TeacherTargets(NamedTuple):
    """Per-example teacher information a VM step distils from (all 1-D, length B)."""

    fm_prob: torch.Tensor  # the logged FM prediction (any value where mask is False)
    mask: torch.Tensor  # bool: the example has an FM prediction
    sa_prob: torch.Tensor | None = None  # the student adapter's output, aux_sa only


def soft_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None):
    """``h``: binary cross-entropy of ``logits`` against probabilities ``target``, averaged
    over the batch; with ``mask`` the unmasked examples contribute 0 (still counted in the
    mean, so an example's weight does not depend on how many others have a teacher label)."""
    per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if mask is not None:
        per = per * mask.to(per.dtype)
    return per.mean()


def exfm_loss(
    out: VMOutput,
    labels: torch.Tensor,
    teacher: TeacherTargets | None,
    kd: str,
    cfg: DistillConfig,
) -> torch.Tensor:
    """The VM's training loss for distillation mode ``kd`` (see the module docstring).

    ``h(y_S, y)`` always; plus, for examples with a teacher label,
    plain: ``w * h(y_S, t)``; aux: ``w * h(y_D, t)``; aux_sa: aux ``+ sa_w * h(y_D2, SG(y_SA))``
    with ``t = min(alpha * y_FM, 1)``.
    """
    check_kd(kd)
    if len(out.distill) != DISTILL_HEADS[kd]:
        raise ValueError(
            f"kd={kd} needs {DISTILL_HEADS[kd]} distillation heads, got {len(out.distill)}"
        )
    loss = F.binary_cross_entropy_with_logits(out.serving, labels)
    if kd == "none":
        return loss
    if teacher is None:
        raise ValueError(f"kd={kd} needs teacher targets")
    target = clip_teacher(teacher.fm_prob, cfg.alpha)
    student = out.serving if kd == "plain" else out.distill[0]
    loss = loss + cfg.w * soft_bce(student, target, teacher.mask)
    if kd == "aux_sa":
        if teacher.sa_prob is None:
            raise ValueError("kd=aux_sa needs the student adapter's output")
        loss = loss + cfg.sa_w * soft_bce(out.distill[1], teacher.sa_prob.detach(), teacher.mask)
    return loss


class StudentAdapter(nn.Module):
    """``logit(y_SA) = logit(y_FM) + MLP(logit(y_FM))``: starts as the identity (last layer
    zero), so before any fresh label it passes the FM's prediction through unchanged, and it
    learns only the correction a stale FM needs (re-calibration, shrinkage toward the base
    rate under drift). ``forward(dense, sparse)`` reads the FM logit from ``dense`` (B x 1)
    so the adapter trains through the same ``train_step`` as every model."""

    def __init__(self, hidden: list[int] | None = None) -> None:
        super().__init__()
        hidden = [16] if hidden is None else hidden
        layers: list[nn.Module] = []
        width = 1
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        last = nn.Linear(width, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*layers, last)

    def forward(self, dense: torch.Tensor, sparse: object = None) -> torch.Tensor:
        x = dense.reshape(-1, 1)
        return (x + self.mlp(x)).squeeze(-1)
