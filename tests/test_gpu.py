"""CUDA checks (``make test-gpu``; skipped where CUDA is absent): the same code on the NCCL
path. Flat training through fused TBE on one GPU, a one-rank NCCL process group, and with two
or more GPUs the distributed equivalence tests over NCCL."""

from __future__ import annotations

import pytest
import torch

from dmtrec.data import DataConfig
from dmtrec.models import ModelConfig
from dmtrec.parallel.launch import backend, rank_device, run_single, spawn
from dmtrec.train.trainer import TrainConfig, train_worker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
DATA = DataConfig(synthetic=dict(num_sparse=8, num_groups=2, table_size=200, num_train=8192,
                                 num_valid=1024, num_test=2048))  # fmt: skip


def _device_and_backend() -> tuple[str, str]:
    import torch.distributed as dist

    t = torch.ones(1, device=rank_device())
    dist.all_reduce(t)
    return str(rank_device()), dist.get_backend()


def test_one_rank_nccl_group_on_the_gpu() -> None:
    assert backend() == "nccl"
    device, be = run_single(_device_and_backend, ())
    assert device == "cuda:0" and be == "nccl"


def test_flat_training_on_cuda(tmp_path) -> None:
    tcfg = TrainConfig(batch_size=512, epochs=2, out=str(tmp_path), progress=False, log_every=0)
    m = run_single(train_worker, (DATA, ModelConfig(embedding_dim=16), tcfg))
    assert m["steps"] == 2 * (8192 // 512)
    assert m["auc"] > 0.6  # learned something on the GPU kernels


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("mode", ["baseline", "dmt"])
def test_nccl_equivalence_two_gpus(mode: str) -> None:
    from equivalence import StepSetup, global_batch, one_step, reference_model, reference_step

    towers = [["C1", "C2", "C3", "C4"], ["C5", "C6", "C7", "C8"]] if mode == "dmt" else None
    model = ModelConfig(embedding_dim=8, bottom=[8], top=[8], towers=towers, tm="identity")
    setup = StepSetup(data=DATA, model=model, mode=mode, hosts=2, ranks_per_host=1)
    results = spawn(one_step, (setup,), 2, 1)
    ref_model, data = reference_model(setup)
    ref = reference_step(ref_model, global_batch(data, setup))
    assert torch.allclose(results[0]["logits"].cpu(), ref["logits"], atol=1e-4)
