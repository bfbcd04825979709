"""Trainer behaviour: quality against the synthetic oracle, bit-exact resume, metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dmtrec.cli import main
from dmtrec.data import DataConfig
from dmtrec.models import ModelConfig
from dmtrec.parallel.launch import run_single
from dmtrec.train.trainer import TrainConfig, train_worker

SMALL = ["--num-sparse", "8", "--num-groups", "2", "--rows", "20", "--num-test", "10000"]
FAST = ["--batch-size", "128", "--lr", "3e-3", "--sparse-lr", "0.2", "--no-progress"]
FAST += ["--early-stop-patience", "0"]  # a fixed schedule: the test counts the examples


def _cli_train(out: Path, *extra: str) -> dict:
    args = [
        "train",
        *SMALL,
        *FAST,
        "--num-train",
        "50000",
        "--epochs",
        "3",
        "--out",
        str(out),
        *extra,
    ]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def flat_metrics(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _cli_train(tmp_path_factory.mktemp("flat"))


def test_flat_dlrm_reaches_oracle_auc(flat_metrics: dict) -> None:
    """Small default-shaped synthetic data: the flat DLRM gets within 0.03 of the oracle AUC."""
    m = flat_metrics
    for key in (
        "auc",
        "logloss",
        "ne",
        "examples_per_s",
        "train_examples",
        "eval_examples",
        "skipped_rows",
        "model",
        "oracle_auc",
    ):
        assert key in m, key
    assert m["train_examples"] == 3 * 50000  # one process: the short last batch trains too
    assert m["eval_examples"] == 10000 and m["model"] == "dlrm"
    assert m["auc"] >= m["oracle_auc"] - 0.03, (m["auc"], m["oracle_auc"])
    assert m["ne"] < 0.85


def test_dmt_with_planted_towers_keeps_flat_quality(flat_metrics: dict, tmp_path: Path) -> None:
    """Towers aligned to the planted groups, TM dlrm, CR=2: AUC within 0.005 of the flat model.

    Single-process DMT reference (the distributed SPTT computes exactly this: test_parallel).
    """
    m = _cli_train(tmp_path, "--towers", "2", "--partition", "planted", "--tm", "dlrm", "--cr", "2")
    assert m["towers"] is not None and len(m["towers"]) == 2 and m["tm"] == "dlrm" and m["cr"] == 2
    assert abs(m["auc"] - flat_metrics["auc"]) <= 0.005, (m["auc"], flat_metrics["auc"])


def _train(out: Path, max_steps: int, resume: bool = False, checkpoint_every: int = 0) -> dict:
    data = DataConfig(
        synthetic=dict(
            num_sparse=6, num_groups=2, table_size=30, num_train=1000, num_valid=0, num_test=300
        )
    )
    tcfg = TrainConfig(
        epochs=2,
        batch_size=100,
        max_steps=max_steps,
        resume=resume,
        checkpoint_every=checkpoint_every,
        out=str(out),
        progress=False,
    )
    return run_single(train_worker, (data, ModelConfig(model="dcn"), tcfg))


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    """2N steps straight == N steps, checkpoint, resume, N more (crossing an epoch boundary)."""
    straight = _train(tmp_path / "a", max_steps=14)
    _train(tmp_path / "b", max_steps=7, checkpoint_every=7)
    resumed = _train(tmp_path / "b", max_steps=14, resume=True)
    assert len(straight["losses"]) == 14
    assert resumed["losses"] == straight["losses"]  # exact floats, every step
    assert resumed["logloss"] == straight["logloss"]
    a = torch.load(tmp_path / "a" / "model" / "weights.pt")  # the final, unsharded parameters
    b = torch.load(tmp_path / "b" / "model" / "weights.pt")
    assert a.keys() == b.keys() and any("embedding_bags" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
