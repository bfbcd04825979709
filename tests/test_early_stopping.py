"""Validation-driven training: early stopping at the planted point, best state restored."""

from __future__ import annotations

import pytest
import torch

from dmtrec.data import DataConfig
from dmtrec.errors import ConfigError
from dmtrec.models import ModelConfig
from dmtrec.parallel.launch import run_single
from dmtrec.train import trainer
from dmtrec.train.trainer import EarlyStopping, TrainConfig, train_worker


def test_early_stopping_rule() -> None:
    s = EarlyStopping("auc", patience=2)
    assert [s.update(v) for v in (0.6, 0.7, 0.7, 0.69)] == [True, True, False, False]
    assert s.should_stop and s.best == 0.7
    s = EarlyStopping("logloss", patience=0)  # lower is better; 0 never stops
    assert [s.update(v) for v in (0.5, 0.4, 0.45, float("nan"))] == [True, True, False, False]
    assert not s.should_stop and s.best == 0.4


def _dense_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "head" in n}


def test_early_stop_restores_the_best_state(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # valid AUC per evaluation (one per step): best at the 3rd, then 3 worse ones
    script = iter([0.60, 0.65, 0.71, 0.70, 0.69, 0.705, 0.50, 0.40])
    seen: list[tuple[str, int, dict]] = []
    real = trainer.evaluate

    def scripted(data, model, split, *args):
        m = real(data, model, split, *args)
        seen.append((split, len(seen), _dense_params(model)))
        if split == "valid":
            m["auc"] = next(script)
        return m

    monkeypatch.setattr(trainer, "evaluate", scripted)
    dcfg = DataConfig(synthetic=dict(num_sparse=4, num_groups=2, table_size=20, num_train=4096,
                                     num_valid=256, num_test=256))  # fmt: skip
    tcfg = TrainConfig(batch_size=64, eval_every=1, early_stop_patience=3, epochs=3,
                       out=str(tmp_path), progress=False, log_every=0)  # fmt: skip
    m = run_single(train_worker, (dcfg, ModelConfig(embedding_dim=4), tcfg))
    assert m["steps"] == 6  # stopped 3 evaluations after the best (step 3)
    assert m["best_step"] == 3 and m["best_epoch"] == 0
    assert m["valid"]["auc"] == 0.71
    assert [h["auc"] for h in m["history"]] == [0.60, 0.65, 0.71, 0.70, 0.69, 0.705]
    splits = [s for s, _, _ in seen]
    assert splits == ["valid"] * 6 + ["test"]
    best, last, final = seen[2][2], seen[5][2], seen[6][2]
    assert all(torch.equal(final[k], best[k]) for k in best)  # test ran on the best state
    assert any(not torch.equal(final[k], last[k]) for k in last)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(monitor="foo"), "--monitor: unknown 'foo'"),
        (dict(early_stop_patience=-1), "--early-stop-patience must be >= 0"),
        (dict(lr=float("inf")), "--lr must be a finite number > 0, got inf"),
        (dict(hosts=0, parallel="baseline"), "--hosts must be >= 1"),
    ],
)
def test_bad_training_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        TrainConfig(**kwargs).validate()
