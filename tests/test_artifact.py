"""The model artefact (OUT/model): evaluate reproduces the run's test metrics, predict keeps
row order and count, and a model trained distributed loads on one process."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dmtrec.cli import main
from dmtrec.data import DataConfig
from dmtrec.errors import ConfigError
from dmtrec.models import ModelConfig
from dmtrec.train.artifact import load_model
from dmtrec.train.inference import evaluate_saved, predict
from dmtrec.train.run import run_train
from dmtrec.train.trainer import TrainConfig

SMALL = dict(num_sparse=6, num_groups=2, table_size=30, num_train=4096, num_valid=512,
             num_test=1024)  # fmt: skip


def _write_csv(path: Path, n: int, seed: int, label: bool = True) -> None:
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow((["y"] if label else []) + ["price", "user", "item", "tags"])
        for _ in range(n):
            user, item = rng.randrange(40), rng.randrange(25)
            tags = "|".join(rng.sample("abcdef", rng.randrange(0, 3)))
            p = 1 / (1 + math.exp(-(((user * 7 + item * 3) % 11) - 5) / 2))
            row = [f"{rng.random():.3f}", f"u{user}", f"i{item}", tags]
            w.writerow(([int(rng.random() < p)] if label else []) + row)


def test_evaluate_reproduces_the_run_and_predict_keeps_rows(tmp_path: Path) -> None:
    for name, n, seed in (("train", 3000, 0), ("valid", 500, 1), ("test", 700, 2)):
        _write_csv(tmp_path / f"{name}.csv", n, seed)
    out = tmp_path / "run"
    argv = ["train", "--data", "csv", "--label", "y", "--dense", "price", "--sparse",
            "user,item,tags", "--multi-hot", "tags", "--train", str(tmp_path / "train.csv"),
            "--valid", str(tmp_path / "valid.csv"), "--test", str(tmp_path / "test.csv"),
            "--epochs", "2", "--batch-size", "128", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    run = json.loads((out / "metrics.json").read_text())
    m = evaluate_saved(str(out / "model"), [str(tmp_path / "test.csv")], str(tmp_path / "ev"))
    for k in ("auc", "logloss", "ne", "eval_examples"):
        assert m[k] == run[k], k  # the same kernels on the same rows: exactly the same
    # predict: a label-free file, one probability per row, in order
    _write_csv(tmp_path / "new.csv", 333, 7, label=False)
    rows = list(csv.reader(open(tmp_path / "new.csv")))
    with open(tmp_path / "rev.csv", "w", newline="") as f:
        csv.writer(f).writerows([rows[0], *reversed(rows[1:])])
    assert (
        predict(str(out / "model"), str(tmp_path / "new.csv"), str(tmp_path / "p.parquet")) == 333
    )
    assert main(["predict", "--model", str(out / "model"), "--input", str(tmp_path / "rev.csv"),
                 "--output", str(tmp_path / "r.csv"), "--batch-size", "50"]) == 0  # fmt: skip
    fwd = pq.read_table(tmp_path / "p.parquet").column("prediction").to_pylist()
    rev = [float(r[0]) for r in list(csv.reader(open(tmp_path / "r.csv")))[1:]]
    assert len(fwd) == len(rev) == 333
    assert rev[::-1] == pytest.approx(fwd, abs=1e-6)
    assert 0 < min(fwd) and max(fwd) < 1


def test_predict_and_evaluate_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="not a dmtrec model"):
        load_model(str(tmp_path))
    _write_csv(tmp_path / "train.csv", 600, 0)
    out = tmp_path / "run"
    assert main(["train", "--data", "csv", "--label", "y", "--dense", "price", "--sparse",
                 "user,item", "--train", str(tmp_path / "train.csv"), "--test",
                 str(tmp_path / "train.csv"), "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("price,user\n1.0,u1\n")
    assert main(["predict", "--model", str(out / "model"), "--input", str(tmp_path / "bad.csv"),
                 "--output", str(tmp_path / "o.csv")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err == f"dmtrec: error: {tmp_path / 'bad.csv'}:1: missing feature column(s): item"


@pytest.mark.slow
def test_dmt_model_loads_on_one_process(tmp_path: Path) -> None:
    dcfg = DataConfig(synthetic=dict(SMALL))
    mcfg = ModelConfig(embedding_dim=8, num_towers=2, partition="planted", tm="dlrm", cr=2)
    tcfg = TrainConfig(parallel="dmt", hosts=2, ranks_per_host=2, batch_size=64, epochs=1, out=str(tmp_path),
                       progress=False, log_every=0)  # fmt: skip
    run = run_train(dcfg, mcfg, tcfg)
    m = evaluate_saved(str(tmp_path / "model"), [], str(tmp_path / "ev"))
    assert m["eval_examples"] == run["eval_examples"]
    assert m["auc"] == pytest.approx(run["auc"], abs=1e-5)
    assert m["logloss"] == pytest.approx(run["logloss"], abs=1e-5)
