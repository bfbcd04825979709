"""The student adapter's ablation knob: ``sa_lr = 0`` keeps the adapter the identity, so
``aux_sa`` then distils a second head from ``y_FM`` itself (benchmarks/exfm_sa_control.py);
``adapter_step`` is the adapter's half of an ``aux_sa`` step."""

from __future__ import annotations

import copy

import pytest
import torch

from dmtrec.data.base import FeatureSpec, make_batch
from dmtrec.errors import ConfigError
from dmtrec.exfm._build import dense_optimizer
from dmtrec.exfm.student import adapter_step, student_step
from dmtrec.models import ModelConfig, build_model
from dmtrec.models.exfm import DistillConfig, StudentAdapter, TeacherTargets, VerticalModel

SPEC = FeatureSpec(dense=["d"], sparse=["a", "b"], num_embeddings=[5, 6])


def _batches(n: int, size: int = 16):
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        fm = torch.rand(size, generator=gen) * 0.9 + 0.05
        labels = (torch.rand(size, generator=gen) < 0.5 * fm).float()  # FM overestimates 2x
        ids = torch.stack([torch.randint(0, s, (size,), generator=gen) for s in (5, 6)], 1)
        batch = make_batch(torch.randn(size, 1, generator=gen).numpy(), ids.numpy(),
                           labels.numpy(), SPEC.sparse)  # fmt: skip
        yield batch, TeacherTargets(fm, torch.ones(size, dtype=torch.bool))


@pytest.mark.parametrize("lr", [0.0, 1e-2])
def test_sa_lr_zero_keeps_the_adapter_the_identity(lr) -> None:
    DistillConfig(sa_lr=lr).validate()
    torch.manual_seed(0)
    sa = StudentAdapter([8])
    start = copy.deepcopy(sa.state_dict())
    opt = dense_optimizer(sa, lr)
    for batch, teacher in _batches(30):
        used = adapter_step(sa, opt, batch, teacher)
    moved = max((sa.state_dict()[k] - v).abs().max().item() for k, v in start.items())
    gap = (used.sa_prob - teacher.fm_prob).abs().max().item()
    if lr == 0.0:
        assert moved == 0.0
        assert gap < 1e-6  # y_SA = y_FM: D2 distils from the FM's own prediction
    else:
        assert moved > 0.05
        assert gap > 0.05  # it learnt to pull the 2x-overestimating FM down
        high = teacher.fm_prob > 0.3
        assert bool((used.sa_prob[high] < 0.8 * teacher.fm_prob[high]).all())


def test_negative_sa_lr_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError) as e:
        DistillConfig(sa_lr=-1.0).validate()
    assert str(e.value) == "--sa-lr must be a finite number >= 0, got -1.0"


def test_adapter_step_is_the_adapter_half_of_student_step() -> None:
    torch.manual_seed(0)
    flat = build_model(ModelConfig(embedding_dim=4, bottom=[3], top=[5, 4]), SPEC)
    vm = VerticalModel(flat, 2)
    vm_opt = torch.optim.SGD(vm.parameters(), lr=0.1)
    torch.manual_seed(1)
    sa = StudentAdapter([4])
    alone = copy.deepcopy(sa)
    sa_opt, alone_opt = dense_optimizer(sa, 0.05), dense_optimizer(alone, 0.05)
    for batch, teacher in _batches(5):
        _, in_step = student_step(vm, vm_opt, batch, teacher, "aux_sa", DistillConfig(), sa, sa_opt)
        replay = adapter_step(alone, alone_opt, batch, teacher)
        assert torch.equal(in_step.sa_prob, replay.sa_prob)
