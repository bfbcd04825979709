"""``dmtrec preprocess`` and ``--data preprocessed``: the store holds exactly the batches the
text readers give, re-runs skip finished files, and progress lines come on a timer."""

from __future__ import annotations

import gzip
import io
import json
import os

import numpy as np
import pytest
import torch

from dmtrec.data import DataConfig, load_data
from dmtrec.data.criteo import CriteoTSV
from dmtrec.data.preprocess import NpyWriter, PreprocessConfig, preprocess
from dmtrec.data.preprocessed import PreprocessedData
from dmtrec.data.progress import Progress
from dmtrec.errors import ConfigError, DataError

TABLE = 1000


def lines(n: int, seed: int, bad_every: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        dense = ["" if rng.random() < 0.2 else str(int(rng.integers(-3, 900))) for _ in range(13)]
        cats = ["" if rng.random() < 0.05 else f"{int(rng.integers(2**32)):08x}" for _ in range(26)]
        if bad_every and i % bad_every == 3:
            cats[4] = "nothex"
        out.append("\t".join([str(int(rng.integers(2))), *dense, *cats]) + "\n")
    return out


@pytest.fixture
def days(tmp_path):
    d0 = tmp_path / "day_0"
    d0.write_text("".join(lines(900, 0, bad_every=100)))
    d1 = tmp_path / "day_1.gz"
    d1.write_bytes(gzip.compress("".join(lines(500, 1)).encode()))
    v = tmp_path / "day_2"
    v.write_text("".join(lines(300, 2)))
    return [str(d0), str(d1)], [str(v)]


def config(tmp_path, train, valid, **kw) -> PreprocessConfig:
    kw = {"table_size": TABLE, **kw}
    return PreprocessConfig(
        kind="criteo",
        train=train,
        valid=valid,
        out=str(tmp_path / "store"),
        block_mb=0.01,  # many blocks per file
        progress_every=0,
        **kw,
    )


def flat(batches):
    bs = list(batches)
    kjt = [b.sparse_features for b in bs]
    ids = torch.cat([k.values().view(26, -1) for k in kjt], dim=1)
    return torch.cat([b.dense_features for b in bs]), torch.cat([b.labels for b in bs]), ids


def assert_same_rows(a_batches, b_batches) -> None:
    """The same rows in the same order (batch boundaries may differ: a text reader's global
    batch is cut in records, bad ones included; the store holds the good rows only)."""
    a, b = flat(a_batches), flat(b_batches)
    assert a[0].shape[0] > 0
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_the_store_gives_the_batches_of_the_criteo_reader(tmp_path, days):
    train, valid = days
    summary = preprocess(config(tmp_path, train, valid))
    assert summary["rows"] == {"train": 1391, "valid": 300}  # 9 bad rows in day_0 dropped
    assert summary["skipped"] == {"train": 9, "valid": 0}
    assert len(summary["converted"]) == 3 and summary["skipped_parts"] == []
    store = PreprocessedData(str(tmp_path / "store"))
    reader = CriteoTSV({"train": train, "valid": valid}, table_size=TABLE)
    assert store.spec == reader.spec
    assert store.num_examples("train") == 1391
    for split in ("train", "valid"):
        assert_same_rows(reader.batches(split, 128), store.batches(split, 128))
    # through load_data, with the seeded shuffle: the same rows, another order
    cfg = DataConfig(kind="preprocessed", train=[str(tmp_path / "store")], block_rows=200)
    data = load_data(cfg)
    shuffled = torch.cat([b.labels for b in data.batches("train", 128)])
    assert shuffled.numel() == 1391
    assert sorted(shuffled.tolist()) == sorted(
        torch.cat([b.labels for b in reader.batches("train", 128)]).tolist()
    )
    with pytest.raises(ConfigError, match="one --train DIR"):
        load_data(DataConfig(kind="preprocessed", train=[str(tmp_path / "store")], valid=valid))


def test_a_rerun_skips_finished_files_and_redoes_changed_ones(tmp_path, days):
    train, valid = days
    preprocess(config(tmp_path, train, valid))
    again = preprocess(config(tmp_path, train, valid))
    assert again["converted"] == [] and len(again["skipped_parts"]) == 3
    assert again["rows"] == {"train": 1391, "valid": 300}  # counted from done.json
    os.utime(valid[0], ns=(1, 1))  # the validation day changed
    third = preprocess(config(tmp_path, train, valid))
    assert third["converted"] == ["valid-000-day_2"]
    assert preprocess(config(tmp_path, train, valid, force=True))["skipped_parts"] == []
    # other settings (hash size) are another conversion: every part is redone
    other = preprocess(config(tmp_path, train, valid, table_size=77))
    assert len(other["converted"]) == 3
    assert PreprocessedData(str(tmp_path / "store")).spec.num_embeddings == [77] * 26


def test_an_interrupted_conversion_is_completed_by_a_rerun(tmp_path, days):
    train, valid = days
    preprocess(config(tmp_path, train, valid))
    store = tmp_path / "store"
    os.remove(store / "valid-000-day_2" / "done.json")  # as if killed before it finished
    with pytest.raises(DataError, match="part not finished"):
        PreprocessedData(str(store))
    (store / "train-000-day_0.tmp").mkdir()  # a leftover of a killed run
    summary = preprocess(config(tmp_path, train, valid))
    assert summary["converted"] == ["valid-000-day_2"]
    assert PreprocessedData(str(store)).num_examples("valid") == 300
    with pytest.raises(DataError, match="not a preprocessed store"):
        PreprocessedData(str(tmp_path))


def test_frequency_vocabulary_counts_train_values_once(tmp_path):
    def line(c1: str) -> str:
        return "\t".join(["1", *["1"] * 13, c1, *["0000abcd"] * 25]) + "\n"

    # C1 values in train: 0x10 x3, 0x05 x2, 0xff x1, missing x1; valid: 0x05, 0x77 (unseen)
    train = tmp_path / "train"
    train.write_text("".join(line(v) for v in ["10", "05", "10", "ff", "", "05", "10"]))
    valid = tmp_path / "valid"
    valid.write_text("".join(line(v) for v in ["05", "77", "10"]))
    cfg = config(tmp_path, [str(train)], [str(valid)], vocab="frequency", min_count=2)
    preprocess(cfg)
    store = PreprocessedData(str(tmp_path / "store"))
    # kept: 0x05 (id 1), 0x10 (id 2), in increasing value order; 0xff is rare, "" missing
    assert store.spec.num_embeddings[0] == 3 and store.spec.num_embeddings[1] == 2
    ids = next(store.batches("train", 7)).sparse_features["C1"].values().tolist()
    assert ids == [2, 1, 2, 0, 0, 1, 2]
    ids = next(store.batches("valid", 3)).sparse_features["C1"].values().tolist()
    assert ids == [1, 0, 2]
    # a re-run reuses the saved vocabulary (and so the parts)
    assert preprocess(cfg)["converted"] == []


def test_preprocess_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="--out"):
        preprocess(PreprocessConfig(train=["x"]))
    with pytest.raises(ConfigError, match="--train"):
        preprocess(PreprocessConfig(out=str(tmp_path)))
    with pytest.raises(ConfigError, match="needs --label and --sparse"):
        preprocess(PreprocessConfig(kind="csv", train=["x.csv"], out=str(tmp_path)))
    with pytest.raises(DataError, match="nope: no such file"):
        preprocess(PreprocessConfig(train=[str(tmp_path / "nope")], out=str(tmp_path / "s")))


def test_npy_writer_patches_the_row_count_in_place(tmp_path):
    w = NpyWriter(tmp_path / "a.npy", np.float32, (3,))
    parts = [np.arange(6).reshape(2, 3), np.arange(30).reshape(10, 3)]
    for p in parts:
        w.append(p)
    w.close()
    got = np.load(tmp_path / "a.npy")
    assert got.dtype == np.float32 and np.array_equal(got, np.concatenate(parts))
    w = NpyWriter(tmp_path / "b.npy", np.int64)
    data_offset = w.f.tell()
    w.rows = 10**12  # a header for a huge count has the same length as for 0 rows
    w._header()
    assert w.f.tell() == data_offset
    w.f.close()
    with open(tmp_path / "b.npy", "rb") as f:
        np.lib.format.read_magic(f)
        assert np.lib.format.read_array_header_1_0(f)[0] == (10**12,)


def test_progress_prints_a_line_every_interval_with_rate_and_eta():
    now = [0.0]
    out = io.StringIO()
    p = Progress("reading x", total_bytes=100_000_000, every=10, stream=out, clock=lambda: now[0])
    for _ in range(5):
        now[0] += 4.0
        p.update(250_000, 10_000_000)  # 2.5 MB/s
    p.done()
    printed = out.getvalue().splitlines()
    # at t=12 s (10 s passed), not at 16 or 20 (< 10 s since), then the final line at 20 s
    assert printed == [
        "dmtrec: reading x: 750,000 rows, 2.5 MB/s, 30%, ETA 28s, 12s elapsed",
        "dmtrec: reading x: 1,250,000 rows, 2.5 MB/s, 50%, ETA 20s, 20s elapsed",
    ]
    assert "\r" not in out.getvalue()
    silent = io.StringIO()
    q = Progress("x", every=0, stream=silent, clock=lambda: now[0])
    q.update(1, 1)
    q.done()
    assert silent.getvalue() == ""


def test_meta_records_the_settings_and_counts(tmp_path, days):
    train, valid = days
    preprocess(config(tmp_path, train, valid))
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    assert meta["splits"] == {
        "train": ["train-000-day_0", "train-001-day_1.gz"],
        "valid": ["valid-000-day_2"],
    }
    assert meta["settings"] == {"kind": "criteo", "vocab": "hash", "hash_size": TABLE}
    assert meta["id_dtype"] == "int32" and meta["skipped"] == {"train": 9, "valid": 0}


def test_a_long_read_prints_progress_on_rank_0_only(tmp_path, days, capsys):
    train, _ = days
    reader = CriteoTSV({"train": train}, table_size=TABLE, block_bytes=4096, progress_every=1e-9)
    list(reader.batches("train", 100, rank=1, world_size=2))
    assert capsys.readouterr().err == ""
    list(reader.batches("train", 100))
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("dmtrec: reading train: ") and "MB/s" in err[0]
    assert err[-1].startswith("dmtrec: reading train: 1,400 rows")  # 1391 good + 9 bad
