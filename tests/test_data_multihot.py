"""Multi-hot features: list-valued cells become KJT bags (lengths > 1), in CSV, Parquet, the
synthetic generator and the preprocessed store; and a split of several files uses them all."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dmtrec.data import DataConfig, load_data
from dmtrec.data.columns import ColumnTable
from dmtrec.data.preprocess import PreprocessConfig, preprocess
from dmtrec.data.preprocessed import PreprocessedData
from dmtrec.data.synthetic import SyntheticConfig, SyntheticData
from dmtrec.errors import ConfigError
from dmtrec.models.common import ebc_pooling, make_ebc

HEADER = ["click", "age", "genres", "user"]
ROWS = [
    ["1", "30", "drama|comedy", "u1"],
    ["0", "41", "comedy", "u2"],
    ["1", "", "", "u1"],  # empty cell: an empty bag
    ["0", "25", "horror|drama|comedy", ""],
    ["1", "33", "drama||horror", "u3"],  # empty items are dropped
]
# vocabulary of genres, first appearance: drama 1, comedy 2, horror 3
LENGTHS = [2, 1, 0, 3, 2]
VALUES = [1, 2, 2, 3, 1, 2, 1, 3]


def write_csv(path, header, rows) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def table(paths, **kw) -> ColumnTable:
    return ColumnTable(
        paths, label="click", dense=["age"], sparse=["genres", "user"], multi_hot=["genres"], **kw
    )


def test_csv_multi_hot_cells_become_kjt_bags(tmp_path):
    t = table({"train": write_csv(tmp_path / "t.csv", HEADER, ROWS)})
    assert t.vocab["genres"] == {"drama": 1, "comedy": 2, "horror": 3}
    assert t.spec.multi_hot == ["genres"] and t.spec.num_embeddings == [4, 4]
    batches = list(t.batches("train", 3))
    kjt = [b.sparse_features for b in batches]
    assert torch.cat([k["genres"].lengths() for k in kjt]).tolist() == LENGTHS
    assert torch.cat([k["genres"].values() for k in kjt]).tolist() == VALUES
    assert torch.cat([k["user"].lengths() for k in kjt]).tolist() == [1] * 5  # one-hot stays
    assert torch.cat([k["user"].values() for k in kjt]).tolist() == [1, 2, 1, 0, 3]
    # the KJT is consistent: per-feature lengths add up to its values
    assert int(kjt[0].lengths().sum()) == kjt[0].values().numel() == 3 + 3


def test_a_separator_option_and_min_count_apply_to_the_items(tmp_path):
    rows = [[r[0], r[1], r[2].replace("|", ";"), r[3]] for r in ROWS]
    t = table(
        {"train": write_csv(tmp_path / "t.csv", HEADER, rows)}, multi_hot_sep=";", min_count=3
    )
    assert t.vocab["genres"] == {"drama": 1, "comedy": 2}  # horror is seen twice only
    b = next(t.batches("train", 5))
    assert b.sparse_features["genres"].lengths().tolist() == LENGTHS
    assert b.sparse_features["genres"].values().tolist() == [1, 2, 2, 0, 1, 2, 1, 0]


def test_parquet_list_columns_give_the_same_bags_as_csv(tmp_path):
    from_csv = table({"train": write_csv(tmp_path / "t.csv", HEADER, ROWS)})
    arrow = pa.table(
        {
            "click": [int(r[0]) for r in ROWS],
            "age": [float(r[1]) if r[1] else None for r in ROWS],
            "genres": [[g for g in r[2].split("|") if g] for r in ROWS],
            "user": [r[3] or None for r in ROWS],
        }
    )
    path = str(tmp_path / "t.parquet")
    pq.write_table(arrow, path, row_group_size=2)
    # a list column is multi-hot without being named
    from_pq = ColumnTable({"train": path}, label="click", dense=["age"], sparse=["genres", "user"])
    assert from_pq.spec == from_csv.spec and from_pq.vocab == from_csv.vocab
    for a, b in zip(from_csv.batches("train", 2), from_pq.batches("train", 2), strict=True):
        for k in ("genres", "user"):
            assert torch.equal(a.sparse_features[k].values(), b.sparse_features[k].values())
            assert torch.equal(a.sparse_features[k].lengths(), b.sparse_features[k].lengths())
        assert torch.equal(a.dense_features, b.dense_features)


def test_multi_hot_bad_rows_are_reported_and_skipped(tmp_path):
    rows = [*ROWS[:2], ["2", "1", "drama", "u1"], *ROWS[2:]]
    t = table({"train": write_csv(tmp_path / "t.csv", HEADER, rows)}, block_bytes=64)
    assert t.stats["train"].messages == [f"{tmp_path / 't.csv'}:4:col 1 (click): '2' is not 0 or 1"]
    b = next(t.batches("train", 8))
    assert b.sparse_features["genres"].lengths().tolist() == LENGTHS


def test_multi_hot_must_name_a_sparse_column(tmp_path):
    path = write_csv(tmp_path / "t.csv", HEADER, ROWS)
    with pytest.raises(ConfigError, match="--multi-hot 'age' is not one of the --sparse columns"):
        ColumnTable({"train": path}, label="click", dense=[], sparse=["user"], multi_hot=["age"])


def test_synthetic_pooling_gives_bags_of_1_to_p_ids_and_mean_is_the_planted_pooling():
    cfg = SyntheticConfig(num_sparse=4, num_groups=2, num_train=4000, num_test=2000, pooling=3)
    d = SyntheticData(cfg)
    assert d.spec.multi_hot == ["C1", "C2", "C3", "C4"]
    b = next(d.batches("train", 4000))
    for k in d.spec.sparse:
        lengths = b.sparse_features[k].lengths()
        assert set(lengths.tolist()) == {1, 2, 3}
        assert b.sparse_features[k].values().numel() == int(lengths.sum())
    # one-hot data are unchanged by the option
    one = SyntheticData(SyntheticConfig(num_sparse=4, num_groups=2, num_train=100))
    assert set(next(one.batches("train", 100)).sparse_features.lengths().tolist()) == {1}
    # the planted structure is learnable: the oracle AUC is well above chance
    assert d.oracle_auc("test") > 0.7


def test_pooling_mode_reaches_the_embedding_tables():
    cfg = DataConfig(synthetic=dict(num_sparse=4, num_groups=2, pooling=2), pooling_mode="mean")
    data = load_data(cfg)
    assert data.spec.pooling == "mean"
    ebc = make_ebc(data.spec.table_sizes, 4, pooling=data.spec.pooling)
    assert ebc_pooling(ebc) == "mean"
    # mean pooling: a bag's pooled embedding is the mean of its rows' embeddings
    b = next(data.batches("train", 8))
    pooled = ebc(b.sparse_features)["C1"]
    table = ebc.embedding_bags["t_C1"].weight
    kjt = b.sparse_features["C1"]
    starts = torch.cumsum(kjt.lengths(), 0) - kjt.lengths()
    for i in range(8):
        ids = kjt.values()[starts[i] : starts[i] + kjt.lengths()[i]]
        torch.testing.assert_close(pooled[i], table[ids].mean(0))
    with pytest.raises(ConfigError, match="--pooling-mode"):
        load_data(DataConfig(pooling_mode="max"))


def test_preprocessed_store_keeps_the_bags(tmp_path):
    train = write_csv(tmp_path / "t.csv", HEADER, ROWS)
    direct = table({"train": train})
    preprocess(
        PreprocessConfig(
            kind="csv",
            train=[train],
            out=str(tmp_path / "store"),
            label="click",
            dense=["age"],
            sparse=["genres", "user"],
            multi_hot=["genres"],
            progress_every=0,
        )
    )
    store = PreprocessedData(str(tmp_path / "store"))
    assert store.spec == direct.spec
    for a, b in zip(direct.batches("train", 2), store.batches("train", 2), strict=True):
        for k in ("genres", "user"):
            assert torch.equal(a.sparse_features[k].values(), b.sparse_features[k].values())
            assert torch.equal(a.sparse_features[k].lengths(), b.sparse_features[k].lengths())
        assert torch.equal(a.dense_features, b.dense_features)
        assert torch.equal(a.labels, b.labels)
    # bags through the sharded reader: 4 ranks concatenate to the 1-rank batch
    one = next(store.batches("train", 4))
    parts = [next(store.batches("train", 4, rank=r, world_size=4)) for r in range(4)]
    assert torch.cat([p.sparse_features["genres"].lengths() for p in parts]).tolist() == LENGTHS[:4]
    assert torch.cat([p.sparse_features["genres"].values() for p in parts]).tolist() == (
        one.sparse_features["genres"].values().tolist()
    )


def test_a_two_file_csv_train_split_uses_both_files(tmp_path):
    a = write_csv(tmp_path / "a.csv", HEADER, ROWS[:3])
    b = write_csv(
        tmp_path / "b.csv",
        ["user", "click", "genres", "age"],
        [  # other column order
            [r[3], r[0], r[2], r[1]] for r in ROWS[3:]
        ],
    )
    cfg = DataConfig(
        kind="csv",
        train=[a, b],
        label="click",
        dense=["age"],
        sparse=["genres", "user"],
        multi_hot=["genres"],
        shuffle=False,
    )
    data = load_data(cfg)
    assert data.stats["train"].rows == 5
    batch = next(data.batches("train", 5))
    assert batch.labels.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert batch.dense_features[:, 0].tolist() == [30.0, 41.0, 0.0, 25.0, 33.0]
    assert batch.sparse_features["genres"].lengths().tolist() == LENGTHS
    assert batch.sparse_features["user"].values().tolist() == [1, 2, 1, 0, 3]  # u3 from b.csv
    # and a one-file split has only its rows
    assert load_data(DataConfig(**{**cfg.__dict__, "train": [a]})).stats["train"].rows == 3
    assert np.isfinite(batch.dense_features.numpy()).all()


def test_parquet_number_keys_match_their_csv_text(tmp_path):
    """Sparse values stored as numbers in Parquet get the keys ``str`` gives (5 -> "5",
    5.0 -> "5.0", NaN -> missing), so a CSV copy of the table has the same vocabulary."""
    rows = [
        ["1", "1", "5", "5.0"],
        ["0", "2", "-3", "2.5"],
        ["1", "3", "5", ""],
        ["0", "4", "7", "1e+20"],
    ]
    header = ["click", "age", "item", "price_bucket"]
    from_csv = ColumnTable(
        {"train": write_csv(tmp_path / "t.csv", header, rows)},
        label="click",
        dense=["age"],
        sparse=["item", "price_bucket"],
    )
    path = str(tmp_path / "t.parquet")
    pq.write_table(
        pa.table(
            {
                "click": [1, 0, 1, 0],
                "age": [1.0, 2.0, 3.0, 4.0],
                "item": [5, -3, 5, 7],
                "price_bucket": [5.0, 2.5, float("nan"), 1e20],
            }
        ),
        path,
    )
    from_pq = ColumnTable(
        {"train": path}, label="click", dense=["age"], sparse=["item", "price_bucket"]
    )
    assert from_pq.vocab == from_csv.vocab
    assert from_csv.vocab["price_bucket"] == {"5.0": 1, "2.5": 2, "1e+20": 3}
    a, b = next(from_csv.batches("train", 4)), next(from_pq.batches("train", 4))
    assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
