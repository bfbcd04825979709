"""The pure parts of ``dmtrec bench quality``: label/field derivation, the seeded split, the
dense transform, the JSON built from per-run records, run reuse. No network, no training: the
tables are small synthetic frames in the widedeep schema and training runs are stubbed."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from dmtrec.bench import quality as q
from dmtrec.errors import ConfigError, DataError


def _movielens_frames():
    ratings = pa.table(
        {
            "user_id": [2, 1, 2, 1],
            "movie_id": [10, 10, 11, 12],
            "rating": [5, 4, 3, 1],
            "timestamp": [0, 1, 2, 3],
        }
    )
    users = pa.table(
        {
            "user_id": [1, 2],
            "age": [24, 53],
            "gender": ["M", "F"],
            "occupation": ["technician", "other"],
            "zip_code": ["85711", "01234"],
        }
    )
    flags = {g: [0, 0, 0] for g in q.ML_GENRES}
    flags["Comedy"] = [1, 0, 0]
    flags["Action"] = [1, 1, 0]  # item 10: Action|Comedy (file order), 11: Action, 12: none
    items = pa.table({"movie_id": [10, 11, 12], **flags})
    return ratings, users, items


def test_movielens_label_and_fields():
    t = q.movielens_table(*_movielens_frames())
    assert t.column_names == ["label", *q.ML_SPARSE]
    assert t.column("label").to_pylist() == [1.0, 1.0, 0.0, 0.0]  # rating >= 4
    assert t.column("user").to_pylist() == ["2", "1", "2", "1"]
    assert t.column("age").to_pylist() == ["53", "24", "53", "24"]
    assert t.column("zip").to_pylist() == ["01234", "85711", "01234", "85711"]  # kept a string
    assert t.column("genres").to_pylist() == ["Action|Comedy", "Action|Comedy", "Action", ""]


def test_movielens_unknown_user_is_a_data_error():
    ratings, users, items = _movielens_frames()
    ratings = ratings.set_column(0, "user_id", pa.array([2, 1, 9, 1]))
    with pytest.raises(DataError, match=r"^MovieLens100k: rating of unknown user/item id 9$"):
        q.movielens_table(ratings, users, items)


def _adult_frame(income):
    n = len(income)
    cols = {c.replace("_", "-"): [f"{c}{i % 2}" for i in range(n)] for c in q.ADULT_SPARSE}
    cols.update({c.replace("_", "-"): list(range(n)) for c in q.ADULT_DENSE})
    cols["income"] = income
    return pa.table(cols)


def test_adult_label_and_columns():
    t = q.adult_table(_adult_frame([">50K", "<=50K", ">50K.", "<=50K."]))
    assert t.column("label").to_pylist() == [1.0, 0.0, 1.0, 0.0]
    assert t.column_names == ["label", *q.ADULT_SPARSE, *q.ADULT_DENSE]
    assert t.column("marital_status").to_pylist() == ["marital_status0", "marital_status1"] * 2
    assert t.column("capital_gain").to_pylist() == [0.0, 1.0, 2.0, 3.0]


def test_adult_bad_income_is_a_data_error():
    with pytest.raises(DataError, match=r"^adult: unexpected income value '50K' "):
        q.adult_table(_adult_frame([">50K", "50K"]))


def test_split_is_seeded_disjoint_and_sized():
    a, b = q.split_indices(1003, seed=7), q.split_indices(1003, seed=7)
    for s in ("train", "valid", "test"):
        np.testing.assert_array_equal(a[s], b[s])
    assert [len(a[s]) for s in ("train", "valid", "test")] == [802, 100, 101]
    np.testing.assert_array_equal(np.sort(np.concatenate(list(a.values()))), np.arange(1003))
    assert not np.array_equal(q.split_indices(1003, seed=8)["test"], a["test"])


def test_split_rejects_bad_fractions():
    with pytest.raises(ConfigError, match="3 positive numbers summing to 1"):
        q.split_indices(10, 0, (0.8, 0.3, -0.1))


def test_log_standardize_uses_train_statistics():
    train = np.array([[0.0, 5.0], [np.e - 1, 5.0], [-3.0, 5.0]])  # log1p: 0, 1, 0 ; constant
    t, (o,) = q.log_standardize(train, [np.array([[np.e**2 - 1, 5.0]])])
    mean, std = 1 / 3, np.std([0.0, 1.0, 0.0])
    np.testing.assert_allclose(t[:, 0], (np.array([0.0, 1.0, 0.0]) - mean) / std)
    np.testing.assert_allclose(t[:, 1], 0.0, atol=1e-12)  # constant column: std taken as 1
    np.testing.assert_allclose(o, [[(2.0 - mean) / std, 0.0]], atol=1e-12)


def test_write_splits_is_deterministic_and_transforms_dense(tmp_path):
    t = q.adult_table(_adult_frame([">50K", "<=50K"] * 50))
    p1 = q.write_splits(t, list(q.ADULT_DENSE), tmp_path / "a", 3, "log-standard")
    p2 = q.write_splits(t, list(q.ADULT_DENSE), tmp_path / "b", 3, "log-standard")
    for s in ("train", "valid", "test"):
        assert Path(p1[s]).read_bytes() == Path(p2[s]).read_bytes()
    train = pacsv.read_csv(p1["train"])
    assert train.num_rows == 80
    age = np.asarray(train.column("age").to_numpy())
    assert abs(age.mean()) < 1e-9 and abs(age.std() - 1) < 1e-9
    raw = pacsv.read_csv(q.write_splits(t, list(q.ADULT_DENSE), tmp_path / "c", 3, "raw")["test"])
    idx = q.split_indices(100, 3)["test"]
    assert raw.column("age").to_pylist() == [float(i) for i in idx]


def _run(seed, auc, logloss, seconds, **kw):
    return {"seed": seed, "auc": auc, "logloss": logloss, "seconds": seconds, **kw}


def test_summary_from_planted_runs():
    records = {
        "ml": {
            "dmtrec_dlrm": [
                _run(0, 0.80, 0.50, 10),
                _run(1, 0.82, 0.48, 20),
                _run(2, 0.84, 0.46, 30),
            ],
            "dmtrec_dmt": [_run(0, 0.815, 0.5, 40), {"seed": 1, "error": "exit 2: --cr 2"}],
            "fuxictr_dlrm": [_run(0, 0.81, 0.47, 90), _run(1, 0.82, 0.45, 110)],
            "fuxictr_dcn": [{"seed": 0, "error": "boom"}],
        }
    }
    sweeps = {"ml": {2: [_run(0, 0.70, 0.6, 5)], 1: [_run(0, 0.71, 0.6, 5)]}}
    out = q.summarize(records, sweeps, {})
    dlrm = out["datasets"]["ml"]["models"]["dmtrec_dlrm"]
    assert dlrm["auc_mean"] == pytest.approx(0.82)
    assert dlrm["auc_std"] == pytest.approx(statistics.stdev([0.80, 0.82, 0.84]))
    assert dlrm["logloss_mean"] == pytest.approx(0.48)
    assert dlrm["seconds"] == pytest.approx(20)
    assert [r["seed"] for r in dlrm["runs"]] == [0, 1, 2]
    dmt = out["datasets"]["ml"]["models"]["dmtrec_dmt"]
    assert dmt["auc_mean"] == 0.815 and dmt["auc_std"] == 0.0 and dmt["failed"] == 1
    assert out["datasets"]["ml"]["models"]["fuxictr_dcn"] == {
        "error": "boom",
        "failed": 1,
        "runs": [{"seed": 0, "error": "boom"}],
    }
    assert list(out["datasets"]["ml"]["cr_sweep"]) == ["1", "2"]
    g = out["goals"]["ml"]
    assert g["dmtrec_best"] == "dmtrec_dlrm" and g["fuxictr_best"] == "fuxictr_dlrm"
    assert g["auc_gain_over_fuxictr"] == pytest.approx(0.82 - 0.815)
    assert g["dmtrec_beats_fuxictr"] is True
    assert g["dmt_auc_loss_vs_dlrm"] == pytest.approx(0.005)
    assert g["dmt_within_0_002"] is False


def test_config_errors_name_the_option():
    with pytest.raises(ConfigError, match=r"^--models: unknown 'fuxictr_deepfm'; choose from"):
        q.QualityConfig(models="dmtrec_dlrm,fuxictr_deepfm").validate()
    with pytest.raises(ConfigError, match=r"^--cr-sweep: 3 is not one of 1, 2, 4, 8, 16$"):
        q.QualityConfig(cr_sweep="1,3").validate()
    with pytest.raises(ConfigError, match=r"^--datasets: unknown 'criteo'"):
        q.QualityConfig(datasets="criteo").validate()


def test_missing_fuxictr_python_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv(q.FUXICTR_ENV, raising=False)
    cfg = q.QualityConfig(cache=str(tmp_path), fuxictr_python=str(tmp_path / "nope" / "python"))
    with pytest.raises(ConfigError, match=r"^--fuxictr-python: no python at .*nope/python; "):
        q.resolve_fuxictr_python(cfg)


def _prepared(tmp_path, dense=()):
    paths = {s: str(tmp_path / "split" / f"{s}.csv") for s in ("train", "valid", "test")}
    return q.Prepared("movielens100k", paths, list(dense), ["a", "b"], {"train": 8}, {"train": 0.5})


def test_both_libraries_read_the_same_files(tmp_path):
    data = _prepared(tmp_path, dense=["x"])
    cfg = q.QualityConfig(threads=1)
    cmd = q.dmtrec_command(data, "--model dcn", 4, "o", cfg, has_threads=True)
    train_args = cmd[cmd.index("train") + 1 :]
    for s in ("train", "valid", "test"):
        assert train_args[train_args.index(f"--{s}") + 1] == data.paths[s]
    assert train_args[train_args.index("--sparse") + 1] == "a,b"
    assert train_args[train_args.index("--dense") + 1] == "x"
    assert train_args[train_args.index("--seed") + 1] == "4"
    assert train_args[train_args.index("--threads") + 1] == "1"
    job = q.fuxictr_job(data, "fuxictr_dcn", 4, tmp_path / "r", cfg, tmp_path / "fx")
    p = job["params"]
    assert [p["train_data"], p["valid_data"], p["test_data"]] == [
        data.paths[s] for s in ("train", "valid", "test")
    ]
    assert p["seed"] == 4 and job["model"] == "DCNv2"
    assert p["feature_cols"] == [
        {"name": ["a", "b"], "active": True, "dtype": "str", "type": "categorical"},
        {"name": ["x"], "active": True, "dtype": "float", "type": "numeric"},
    ]
    # BARS DCNv2_movielenslatest_x1_016_98ea1c72's tuned values
    assert (p["embedding_dim"], p["num_cross_layers"], p["net_dropout"], p["batch_size"]) == (
        10,
        5,
        0.2,
        4096,
    )


def test_run_quality_writes_schema_and_reuses_runs(tmp_path, monkeypatch):
    data = _prepared(tmp_path)
    monkeypatch.setattr(q, "prepare", lambda name, cfg: data)
    calls = []

    def fake_run(cmd, log, timeout_s, env):
        args = cmd[cmd.index("train") + 1 :]
        seed, out = int(args[args.index("--seed") + 1]), Path(args[args.index("--out") + 1])
        calls.append(args)
        if "--cr" in args and args[args.index("--cr") + 1] == "4":
            raise q.RunFailed("exit 2: dmtrec: error: --cr 4 does not divide the tower width")
        out.mkdir(parents=True, exist_ok=True)
        metrics = {"auc": 0.7 + seed / 100, "logloss": 0.5, "best_epoch": seed, "best_step": 9}
        if seed == 1:
            metrics = {"auc": 0.71, "logloss": 0.5, "config": {"train": {"epochs": 3}}}
        (out / "metrics.json").write_text(json.dumps(metrics))
        return 2.0

    monkeypatch.setattr(q, "_run", fake_run)
    help_text = {"now": "--epochs N (default: 1)"}  # what `dmtrec train --help` prints
    monkeypatch.setattr(q._Bench, "_help", lambda self: help_text["now"])
    opts = dict(datasets="movielens100k", models="dmtrec_dlrm,dmtrec_dmt", cr_sweep="1,2,4")
    result = q.bench_quality(str(tmp_path / "out"), seeds=2, **opts, log=lambda s: None)
    written = json.loads((tmp_path / "out" / "bench_quality.json").read_text())
    assert written == json.loads(json.dumps(result))
    models = written["datasets"]["movielens100k"]["models"]
    assert set(models) == {"dmtrec_dlrm", "dmtrec_dmt"}
    for m in models.values():
        assert {"auc_mean", "auc_std", "logloss_mean", "seconds"} <= set(m)
        assert m["auc_mean"] == pytest.approx(0.705)
        # 0-based trainer epoch -> 1-based passes; an old trainer's metrics: --epochs
        assert [(r["seed"], r["best_epoch"]) for r in m["runs"]] == [(0, 1), (1, 3)]
    sweep = written["datasets"]["movielens100k"]["cr_sweep"]
    assert sweep["1"]["auc_mean"] == pytest.approx(0.705)
    assert sweep["2"] == models["dmtrec_dmt"]  # CR=2 is dmtrec_dmt's runs, not run twice
    assert len(calls) == 8  # 2 seeds x (dlrm, dmt, CR=1, CR=4)
    assert sweep["4"]["error"].startswith("exit 2: dmtrec: error: --cr 4")
    dmt_args = calls[2]
    assert " ".join(dmt_args[dmt_args.index("--model") :]).startswith(q.DMT_ARGS + " --cr 2")
    n = len(calls)
    q.bench_quality(str(tmp_path / "out"), seeds=2, **opts, log=lambda s: None)
    assert len(calls) - n == 2  # only the failed CR=4 runs are retried
    n = len(calls)
    help_text["now"] = "--epochs N (default: 20)"  # the CLI's defaults changed
    q.bench_quality(str(tmp_path / "out"), seeds=2, **opts, log=lambda s: None)
    assert len(calls) - n == 8  # same command lines, other defaults: nothing is reused


def test_run_keys_ignore_output_locations():
    cmd = ["py", "-c", "code", "train", "--model", "dlrm", "--out", "/a/out", "--seed", "1"]
    other = [*cmd[:7], "/b/out", *cmd[8:]]
    assert q.dmtrec_key(cmd, "f") == q.dmtrec_key(other, "f") != q.dmtrec_key(cmd, "g")
    assert q.dmtrec_key(cmd, "f") == ["train", "--model", "dlrm", "--seed", "1", "defaults=f"]
    job = {"model": "DLRM", "params": {"seed": 1, "model_root": "/a"}, "result": "/a/r.json"}
    moved = {"model": "DLRM", "params": {"seed": 1, "model_root": "/b"}, "result": "/b/r.json"}
    assert q.fuxictr_key(job) == q.fuxictr_key(moved) == {"model": "DLRM", "params": {"seed": 1}}


def test_multi_hot_field_is_a_bag_in_both_libraries(tmp_path):
    data = q.Prepared(
        "movielens100k",
        {s: f"{s}.csv" for s in ("train", "valid", "test")},
        [],
        ["user", "genres"],
        {},
        {},
        multi_hot=["genres"],
    )
    cmd = q.dmtrec_command(data, "--model dlrm", 0, "o", q.QualityConfig(), has_threads=False)
    assert cmd[cmd.index("--multi-hot") + 1] == "genres" and "--dense" not in cmd
    job = q.fuxictr_job(data, "fuxictr_dlrm", 0, tmp_path, q.QualityConfig(), tmp_path)
    assert job["params"]["feature_cols"] == [
        {"name": ["user"], "active": True, "dtype": "str", "type": "categorical"},
        {"name": "genres", "active": True, "dtype": "str", "type": "sequence", "splitter": "|"},
    ]
    assert job["params"]["dataset_id"] == "movielens100k_genres_multihot"  # own encoded cache
