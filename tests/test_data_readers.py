"""Streaming readers: Criteo TSV (plain and gzip) and column-spec CSV/Parquet tables."""

from __future__ import annotations

import csv
import gzip
import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dmtrec.data.columns import ColumnTable
from dmtrec.data.criteo import CriteoTSV
from dmtrec.errors import ConfigError, DataError

TABLE = 1000  # Criteo table size in these tests: id = 1 + int(hex, 16) % 999


def criteo_line(label: str, dense: list[str], cats: list[str]) -> str:
    return "\t".join([label, *dense, *cats]) + "\n"


def good_dense(k: int) -> list[str]:
    return [str(k + j) for j in range(13)]


def good_cats(k: int) -> list[str]:
    return [f"{(k * 31 + j) * 0x01000193:08x}"[-8:] for j in range(26)]


def hashed(token: str) -> int:
    return 1 + int(token, 16) % (TABLE - 1)


@pytest.fixture
def criteo_file(tmp_path):
    """Three good rows (one with empty/negative/missing fields) and two bad ones."""
    d0, c0 = good_dense(0), good_cats(0)
    d1, c1 = good_dense(1), good_cats(1)
    d1[2] = ""  # empty dense field -> 0
    d1[5] = "-7"  # negative -> log1p(0) = 0
    c1[3] = ""  # empty categorical -> id 0
    d2, c2 = good_dense(2), good_cats(2)
    bad_hex = good_cats(3)
    bad_hex[1] = "zzzz"
    lines = [
        criteo_line("1", d0, c0),  # line 1
        criteo_line("0", d1, c1),  # line 2
        "\t".join(["1", *good_dense(5), *good_cats(5)[:10]]) + "\n",  # line 3: 24 fields
        criteo_line("0", good_dense(3), bad_hex),  # line 4: non-hex C2 (column 16)
        criteo_line("0", d2, c2),  # line 5
    ]
    path = tmp_path / "train.tsv"
    path.write_text("".join(lines))
    expected = [("1", d0, c0), ("0", d1, c1), ("0", d2, c2)]
    return path, expected


def expected_arrays(rows):
    dense = [[math.log1p(max(int(x), 0)) if x else 0.0 for x in d] for _, d, _ in rows]
    ids = [[hashed(t) if t else 0 for t in c] for _, _, c in rows]
    labels = [float(lab) for lab, _, _ in rows]
    return torch.tensor(dense), torch.tensor(ids), torch.tensor(labels)


def test_criteo_good_rows_exact_and_bad_rows_counted(criteo_file):
    path, rows = criteo_file
    reader = CriteoTSV({"train": [str(path)]}, table_size=TABLE)
    assert reader.spec.dense == [f"I{i}" for i in range(1, 14)]
    assert reader.spec.sparse == [f"C{i}" for i in range(1, 27)]
    assert reader.spec.num_embeddings == [TABLE] * 26

    batches = list(reader.batches("train", global_batch_size=2))
    assert [b.labels.numel() for b in batches] == [2, 1]
    dense, ids, labels = expected_arrays(rows)
    torch.testing.assert_close(torch.cat([b.dense_features for b in batches]), dense.float())
    assert torch.equal(torch.cat([b.labels for b in batches]), labels.float())
    assert batches[0].dense_features[1, 2] == 0.0 and batches[0].dense_features[1, 5] == 0.0

    kjt = batches[0].sparse_features
    assert kjt.keys() == reader.spec.sparse
    assert kjt.stride() == 2
    assert torch.equal(kjt.lengths(), torch.ones(52, dtype=kjt.lengths().dtype))
    # Feature-major: the two rows' C1 ids, then their C2 ids, ...
    assert torch.equal(kjt.values(), ids[:2].T.reshape(-1))
    assert kjt["C4"].values().tolist() == [hashed(rows[0][2][3]), 0]
    assert batches[1].sparse_features.values().tolist() == ids[2].tolist()

    stats = reader.stats["train"]
    assert (stats.rows, stats.skipped) == (3, 2)
    assert stats.messages[0].startswith(f"{path}:3: expected 40 tab-separated fields")
    assert stats.messages[1] == f"{path}:4:col 16 (C2): 'zzzz' is not a hex id"


def test_criteo_per_feature_table_sizes(criteo_file):
    path, rows = criteo_file
    sizes = [2 + j for j in range(26)]
    reader = CriteoTSV({"train": [str(path)]}, table_size=sizes)
    batch = next(reader.batches("train", global_batch_size=8))
    kjt = batch.sparse_features.to_dict()
    for j, name in enumerate(reader.spec.sparse):
        got = kjt[name].values().tolist()
        want = [1 + int(c[j], 16) % (sizes[j] - 1) if c[j] else 0 for _, _, c in rows]
        assert got == want and max(got) < sizes[j]


def test_criteo_too_many_bad_rows_stops_with_file_and_line(criteo_file):
    path, _ = criteo_file
    reader = CriteoTSV({"train": [str(path)]}, table_size=TABLE, max_bad_rows=0)
    with pytest.raises(DataError) as exc:
        list(reader.batches("train", global_batch_size=2))
    msg = str(exc.value)
    assert f"{path}:3:" in msg and "train.tsv" in msg
    assert "--max-bad-rows" in msg and "1 bad rows" in msg and "\n" not in msg
    # One allowed bad row: the second one (line 4) trips it and is named with its reason.
    reader = CriteoTSV({"train": [str(path)]}, table_size=TABLE, max_bad_rows=1)
    with pytest.raises(DataError, match=r"train\.tsv:4: 2 bad rows.*'zzzz' is not a hex id"):
        list(reader.batches("train", global_batch_size=2))


def test_criteo_bad_values_label_nan_and_float(tmp_path):
    lines = [
        criteo_line("2", good_dense(0), good_cats(0)),
        criteo_line("1", ["nan"] + good_dense(0)[1:], good_cats(0)),
        criteo_line("1", good_dense(0)[:12] + ["1.5"], good_cats(0)),
        criteo_line("0", good_dense(0), good_cats(0)),
    ]
    path = tmp_path / "day_0"
    path.write_text("".join(lines))
    reader = CriteoTSV({"train": [str(path)]}, table_size=TABLE)
    assert sum(b.labels.numel() for b in reader.batches("train", 4)) == 1
    assert reader.stats["train"].messages == [
        f"{path}:1:col 1 (label): '2' is not 0 or 1",
        f"{path}:2:col 2 (I1): 'nan' is not an integer",
        f"{path}:3:col 14 (I13): '1.5' is not an integer",
    ]


def test_criteo_gzip_reads_and_truncated_gzip_is_reported(tmp_path):
    rng = random.Random(0)
    text = "".join(
        criteo_line(
            str(rng.randint(0, 1)),
            [str(rng.randint(0, 999)) for _ in range(13)],
            [f"{rng.getrandbits(32):08x}" for _ in range(26)],
        )
        for _ in range(2000)
    )
    whole = tmp_path / "day_1.gz"
    whole.write_bytes(gzip.compress(text.encode()))
    reader = CriteoTSV({"train": [str(whole)]}, table_size=TABLE)
    assert sum(b.labels.numel() for b in reader.batches("train", 512)) == 2000

    data = whole.read_bytes()
    cut = tmp_path / "day_2.gz"
    cut.write_bytes(data[: len(data) // 2])
    reader = CriteoTSV({"train": [str(cut)]}, table_size=TABLE)
    with pytest.raises(
        DataError, match=r"day_2\.gz: truncated or corrupt gzip stream after line \d+"
    ):
        list(reader.batches("train", 512))


def test_criteo_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="nope.tsv"):
        CriteoTSV({"train": [str(tmp_path / "nope.tsv")]})
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    reader = CriteoTSV({"train": [str(empty)]})
    with pytest.raises(DataError, match=r"empty\.tsv: empty file"):
        list(reader.batches("train", 4))
    with pytest.raises(ConfigError):
        CriteoTSV({"train": [str(empty)]}, table_size=1)


# -- column tables --------------------------------------------------------------------------
HEADER = ["click", "price", "user", "city", "note"]
TRAIN = [
    ["1", "1.5", "u1", "paris", "x"],
    ["0", "2", "u2", "oslo", "y"],
    ["1.0", "", "u1", "", "z"],  # missing dense -> 0.0, missing sparse -> 0
    ["0", "-3.25", "u3", "paris", "w"],
    ["0.0", "0.5", "u1", "oslo", "v"],
]


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def table(paths, **kw) -> ColumnTable:
    return ColumnTable(paths, label="click", dense=["price"], sparse=["user", "city"], **kw)


def collect(reader: ColumnTable, split: str, batch_size: int = 2):
    batches = list(reader.batches(split, batch_size))
    dense = torch.cat([b.dense_features for b in batches])
    labels = torch.cat([b.labels for b in batches])
    ids = {
        k: torch.cat([b.sparse_features[k].values() for b in batches]) for k in reader.spec.sparse
    }
    return dense, labels, ids, batches


def test_columns_vocab_oov_and_values(tmp_path):
    train = write_csv(tmp_path / "train.csv", HEADER, TRAIN)
    test = write_csv(
        tmp_path / "test.csv",
        HEADER,
        [["1", "7", "u9", "oslo", "q"], ["0", "1", "u2", "rome", "r"]],
    )
    reader = table({"train": train, "test": test})
    assert reader.vocab == {"user": {"u1": 1, "u2": 2, "u3": 3}, "city": {"paris": 1, "oslo": 2}}
    assert reader.spec.num_embeddings == [4, 3]

    dense, labels, ids, batches = collect(reader, "train")
    assert [b.labels.numel() for b in batches] == [2, 2, 1]
    assert dense.squeeze(1).tolist() == [1.5, 2.0, 0.0, -3.25, 0.5]
    assert labels.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert ids["user"].tolist() == [1, 2, 1, 3, 1]
    assert ids["city"].tolist() == [1, 2, 0, 1, 2]
    assert reader.stats["train"].rows == 5

    _, _, ids, _ = collect(reader, "test")
    assert ids["user"].tolist() == [0, 2]  # u9 never seen in train -> OOV
    assert ids["city"].tolist() == [2, 0]  # rome -> OOV; vocab unchanged by test
    assert reader.spec.num_embeddings == [4, 3]


def test_columns_min_count_sends_rare_values_to_oov(tmp_path):
    train = write_csv(tmp_path / "train.csv", HEADER, TRAIN)
    reader = table({"train": train}, min_count=2)
    assert reader.vocab == {"user": {"u1": 1}, "city": {"paris": 1, "oslo": 2}}
    assert reader.spec.num_embeddings == [2, 3]
    _, _, ids, _ = collect(reader, "train")
    assert ids["user"].tolist() == [1, 0, 1, 0, 1]


def test_columns_unknown_column_names_it_and_the_file(tmp_path):
    train = write_csv(tmp_path / "train.csv", HEADER, TRAIN)
    valid = write_csv(
        tmp_path / "valid.csv", ["click", "price", "user", "town"], [["1", "1", "u1", "x"]]
    )
    with pytest.raises(DataError, match=r"train\.csv: no column 'age'.*available: 'click'"):
        ColumnTable({"train": train}, label="click", dense=["age"], sparse=["user"])
    with pytest.raises(DataError, match=r"valid\.csv: no column 'city' \(the sparse column\)"):
        table({"train": train, "valid": valid})


def test_columns_bad_values_reported_with_line_and_column(tmp_path):
    rows = [
        *TRAIN[:2],
        ["1", "abc", "u1", "x", "n"],
        ["1", "inf", "u1", "x", "n"],
        ["7", "1", "u1", "x", "n"],
        ["0", "1"],
    ]
    train = write_csv(tmp_path / "train.csv", HEADER, rows)
    reader = table({"train": train})
    _, labels, _, _ = collect(reader, "train")
    assert labels.numel() == 2
    stats = reader.stats["train"]
    assert stats.skipped == 4
    assert stats.messages == [
        f"{train}:4:col 2 (price): 'abc' is not a number",
        f"{train}:5:col 2 (price): 'inf' is not finite",
        f"{train}:6:col 1 (click): '7' is not 0 or 1",
        f"{train}:7: expected 5 fields as in the header, got 2",
    ]
    with pytest.raises(DataError, match=r"train\.csv:4: 1 bad rows.*col 2 \(price\)"):
        table({"train": train}, max_bad_rows=0)


def test_parquet_gives_the_same_batches_as_csv(tmp_path):
    train_csv = write_csv(tmp_path / "train.csv", HEADER, TRAIN)
    cols = list(zip(*TRAIN))
    arrow = pa.table(
        {
            "click": pa.array([float(x) for x in cols[0]]),
            "price": pa.array([float(x) if x else None for x in cols[1]]),
            "user": pa.array(list(cols[2])),
            "city": pa.array([x or None for x in cols[3]]),
            "note": pa.array(list(cols[4])),
        }
    )
    train_pq = str(tmp_path / "train.parquet")
    pq.write_table(arrow, train_pq)
    from_csv, from_pq = table({"train": train_csv}), table({"train": train_pq})
    assert from_pq.vocab == from_csv.vocab and from_pq.spec == from_csv.spec
    for a, b in zip(from_csv.batches("train", 2), from_pq.batches("train", 2), strict=True):
        assert torch.equal(a.dense_features, b.dense_features)
        assert torch.equal(a.labels, b.labels)
        assert a.sparse_features.keys() == b.sparse_features.keys()
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
        assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())


def test_parquet_bad_value_is_reported_with_row_number(tmp_path):
    arrow = pa.table(
        {
            "click": [1, 0, 1],
            "price": [1.0, float("nan"), 2.0],
            "user": ["a", "b", "c"],
            "city": ["x", "y", "z"],
        }
    )
    path = str(tmp_path / "t.pq")
    pq.write_table(arrow, path)
    reader = table({"train": path})
    assert reader.stats["train"].messages == [f"{path}:row 2:col 2 (price): nan is not finite"]
    assert reader.vocab["user"] == {"a": 1, "c": 2}


# -- sharding -------------------------------------------------------------------------------
def test_two_ranks_get_disjoint_equal_batches(tmp_path):
    # 13 rows in global batches of 6 (3 per rank): rank 0 takes rows 0-2 of each, rank 1
    # rows 3-5; the final 1-row global batch has no row for each of 2 ranks, so it is dropped.
    rows = [[str(i % 2), str(i), f"u{i}", "c", "n"] for i in range(13)]
    train = write_csv(tmp_path / "train.csv", HEADER, rows)
    reader = table({"train": train})
    seen = []
    for rank in range(2):
        batches = list(reader.batches("train", 6, rank=rank, world_size=2))
        assert [b.labels.numel() for b in batches] == [3, 3]
        seen.append({int(x) for b in batches for x in b.dense_features[:, 0]})
    assert seen[0].isdisjoint(seen[1])
    assert seen == [{0, 1, 2, 6, 7, 8}, {3, 4, 5, 9, 10, 11}]
    with pytest.raises(ConfigError):
        reader.batches("train", 6, rank=2, world_size=2)
