"""Regularisation and model options: the embedding L2 term is exactly the stated penalty on
the fused (TorchRec TBE) path, and the MLP options build what they say."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dmtrec.data import DataConfig, load_data
from dmtrec.errors import ConfigError
from dmtrec.models import ModelConfig, build_model
from dmtrec.models.common import stack_pooled, table_weights
from dmtrec.parallel.build import build
from dmtrec.parallel.launch import run_single
from dmtrec.train.step import train_step
from dmtrec.train.trainer import TrainConfig

LAM, LR = 0.3, 0.5
DATA = DataConfig(synthetic=dict(num_sparse=3, num_groups=1, table_size=7, num_train=16,
                                 num_valid=0, num_test=0, pooling=3))  # fmt: skip


def _fused_table_grads(mcfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One fused-SGD step through the production build; gradient = -(change) / lr."""
    data = load_data(DATA)
    torch.manual_seed(0)
    ref = build_model(copy.deepcopy(mcfg), data.spec)
    before = {k: v.clone() for k, v in table_weights(ref).items()}
    opts = TrainConfig(sparse_optimizer="sgd", sparse_lr=LR, dense_optimizer="sgd", lr=1e-9)
    built = build(data.spec, mcfg, opts, reference=ref)
    batch = next(iter(data.batches("train", 16)))
    train_step(built.model, built.optimizer, batch)
    after = {}
    for key, value in built.model.state_dict().items():
        name = ".".join(key.split(".")[-2:])
        if name in before:
            after[name] = value.local_shards()[0].tensor.clone()
    return {k: (before[k] - after[k]) / LR for k in before}


def _reference_grads(mcfg: ModelConfig, lam: float) -> dict[str, torch.Tensor]:
    """Plain model, explicit penalty lam/2 * mean over samples of sum_f ||pooled_f||^2."""
    data = load_data(DATA)
    torch.manual_seed(0)
    model = build_model(copy.deepcopy(mcfg), data.spec)
    model.embedding_l2 = 0.0  # the term is written out below instead
    batch = next(iter(data.batches("train", 16)))
    pooled = stack_pooled(model.ebc(batch.sparse_features), model.features)
    logits = model.head(batch.dense_features, pooled)
    loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
    loss = loss + lam / 2 * pooled.pow(2).sum(dim=(1, 2)).mean()
    loss.backward()
    return {".".join(n.split(".")[-2:]): p.grad for n, p in model.named_parameters() if "ebc" in n}


def test_embedding_l2_is_the_stated_penalty_on_the_fused_path() -> None:
    mcfg = ModelConfig(embedding_dim=4, bottom=[8], top=[8], embedding_l2=LAM)
    fused = run_single(_fused_table_grads, (mcfg,))
    ref = _reference_grads(mcfg, LAM)
    plain = _reference_grads(mcfg, 0.0)
    for name, g in ref.items():
        assert torch.allclose(fused[name], g, atol=1e-5), name
    # the term is not negligible here: without it the gradients differ
    assert max(float((ref[k] - plain[k]).abs().max()) for k in ref) > 1e-2


@pytest.mark.parametrize(
    "kwargs", [dict(interaction="cat"), dict(dropout=0.2, batch_norm=True), dict(model="dcn",
               dropout=0.1), dict(model="wukong", batch_norm=True, wukong_fmb_hidden=[16])]
)  # fmt: skip
def test_model_options_build_and_run(kwargs: dict) -> None:
    data = load_data(DATA)
    model = build_model(ModelConfig(embedding_dim=4, bottom=[8], top=[8], **kwargs), data.spec)
    batch = next(iter(data.batches("train", 16)))
    assert model(batch.dense_features, batch.sparse_features).shape == (16,)
    kinds = {type(m).__name__ for m in model.modules()}
    if kwargs.get("dropout"):
        assert "Dropout" in kinds
    if kwargs.get("batch_norm"):
        assert "BatchNorm1d" in kinds
    if kwargs.get("interaction") == "cat":
        assert "CatInteraction" in kinds


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dropout=1.5), "--dropout must be in [0, 1), got 1.5"),
        (dict(embedding_l2=-1.0), "--embedding-l2 must be >= 0"),
        (dict(interaction="sum"), "--interaction: unknown 'sum'"),
    ],
)
def test_bad_model_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        ModelConfig(**kwargs).validate()
    assert message in str(e.value)


def test_sparse_adam_is_rejected_on_cpu() -> None:
    from dmtrec.parallel.sharding import add_fused_embedding_optimizer

    with pytest.raises(ConfigError, match="--sparse-optimizer adam needs CUDA"):
        add_fused_embedding_optimizer(torch.nn.Linear(1, 1), "adam", 0.1, torch.device("cpu"))
