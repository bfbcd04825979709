"""Sharded reading: each rank parses only its rows, and the global batches (order and content)
are a function of the data and the seed, not of the world size."""

from __future__ import annotations

import csv
import gzip

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dmtrec.data import DataConfig, load_data
from dmtrec.data.columns import ColumnTable
from dmtrec.data.criteo import CriteoTSV
from dmtrec.data.preprocess import PreprocessConfig, preprocess
from dmtrec.data.preprocessed import PreprocessedData
from dmtrec.data.synthetic import SyntheticConfig, SyntheticData
from dmtrec.errors import ConfigError

TABLE = 1000


def criteo_rows(n: int, seed: int) -> list[str]:
    """Real-format Criteo lines; row ``i`` has ``I1 == i`` so rows can be told apart."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        dense = [str(i)] + [
            "" if rng.random() < 0.2 else str(int(rng.integers(-3, 500))) for _ in range(12)
        ]
        cats = ["" if rng.random() < 0.05 else f"{int(rng.integers(2**32)):08x}" for _ in range(26)]
        lines.append("\t".join([str(int(rng.integers(2))), *dense, *cats]) + "\n")
    return lines


def write(path, lines, gz: bool = False) -> str:
    data = "".join(lines).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


def row_ids(batch) -> list[int]:
    """The I1 value of each row (its index in the generated file): log1p undone."""
    return torch.expm1(batch.dense_features[:, 0].double()).round().long().tolist()


def assert_same_batch(a, b) -> None:
    assert torch.equal(a.dense_features, b.dense_features)
    assert torch.equal(a.labels, b.labels)
    ka, kb = a.sparse_features, b.sparse_features
    assert ka.keys() == kb.keys()
    for k in ka.keys():
        assert torch.equal(ka[k].values(), kb[k].values())
        assert torch.equal(ka[k].lengths(), kb[k].lengths())


def concat(parts):
    """The global batch made of the ranks' slices (rank order)."""
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    keys = parts[0].sparse_features.keys()
    values, lengths = [], []
    for k in keys:
        values += [p.sparse_features[k].values() for p in parts]
        lengths += [p.sparse_features[k].lengths() for p in parts]
    kjt = KeyedJaggedTensor(
        keys=keys,
        values=torch.cat(values),
        lengths=torch.cat(lengths),
        stride=sum(p.labels.numel() for p in parts),
    )
    return Batch(
        dense_features=torch.cat([p.dense_features for p in parts]),
        sparse_features=kjt,
        labels=torch.cat([p.labels for p in parts]),
    )


def check_world_size_independent(source, split: str, g: int, world: int, epoch: int) -> int:
    """Every step's global batch on ``world`` ranks equals the 1-rank batch; returns steps."""
    one = list(source.batches(split, g, epoch=epoch))
    ranks = [
        list(source.batches(split, g, epoch=epoch, rank=r, world_size=world)) for r in range(world)
    ]
    assert [len(r) for r in ranks] == [len(one)] * world  # every rank: the same steps
    for k, batch in enumerate(one):
        sizes = {int(r[k].labels.numel()) for r in ranks}
        assert sizes == {batch.labels.numel() // world}  # equal slices
        assert_same_batch(concat([r[k] for r in ranks]), batch)
    return len(one)


@pytest.fixture
def criteo_split(tmp_path):
    """1000 + 600 rows in two files (one gzipped), blocks of 4 KiB: ~30 rows per block."""
    a = write(tmp_path / "day_0", criteo_rows(1000, 0))
    b = write(tmp_path / "day_1.gz", criteo_rows(600, 1), gz=True)
    return [a, b]


def test_rows_parsed_per_rank_over_2x2_ranks_sum_to_the_rows_of_the_files(criteo_split):
    reader = CriteoTSV(
        {"train": criteo_split}, table_size=TABLE, shuffle=True, seed=3, block_bytes=4096
    )
    parsed, seen = [], []
    for rank in range(4):  # 2 hosts x 2 ranks per host: world size 4
        ids = [i for b in reader.batches("train", 64, rank=rank, world_size=4) for i in row_ids(b)]
        parsed.append(reader.stats["train"].parsed)
        seen.append(ids)
    # 1600 rows = 25 global batches of 64: each row parsed by exactly one rank, once.
    assert sum(parsed) == 1600 and all(p == 400 for p in parsed)
    assert sorted(i for s in seen for i in s) == sorted(list(range(1000)) + list(range(600)))
    assert reader.stats["train"].rows == 400 and reader.stats["train"].skipped == 0


def test_criteo_four_ranks_see_the_global_batches_of_one_rank(criteo_split):
    reader = CriteoTSV(
        {"train": criteo_split, "valid": criteo_split[:1]},
        table_size=TABLE,
        shuffle=True,
        seed=5,
        block_bytes=4096,
    )
    for epoch in (0, 1):
        # 1600 = 25 x 64: every global batch full
        assert check_world_size_independent(reader, "train", 64, 4, epoch) == 25
    # 1000 = 15 x 64 + 40: the final 40 rows are 10 per rank
    assert check_world_size_independent(reader, "valid", 64, 4, 0) == 16


def test_the_final_partial_global_batch_is_cut_to_a_multiple_of_the_world_size(tmp_path):
    path = write(tmp_path / "day", criteo_rows(70, 0))
    reader = CriteoTSV({"valid": [path]}, table_size=TABLE)
    one = [row_ids(b) for b in reader.batches("valid", 32)]
    assert one == [list(range(32)), list(range(32, 64)), list(range(64, 70))]
    ranks = [
        [row_ids(b) for b in reader.batches("valid", 32, rank=r, world_size=4)] for r in (0, 3)
    ]
    # 6 final rows on 4 ranks: 1 each (rows 64..67), rows 68, 69 are left out
    assert ranks[0] == [list(range(0, 8)), list(range(32, 40)), [64]]
    assert ranks[1] == [list(range(24, 32)), list(range(56, 64)), [67]]


def test_train_order_is_seeded_per_epoch_and_replayed_exactly(criteo_split):
    def order(seed: int, epoch: int) -> list[int]:
        reader = CriteoTSV(
            {"train": criteo_split}, table_size=TABLE, shuffle=True, seed=seed, block_bytes=4096
        )
        return [i for b in reader.batches("train", 100, epoch=epoch) for i in row_ids(b)]

    e0, e1 = order(0, 0), order(0, 1)
    assert sorted(e0) == sorted(e1) == sorted(list(range(1000)) + list(range(600)))
    assert e0 != e1  # reshuffled each epoch
    assert order(0, 1) == e1  # a fresh reader (a resumed run) replays the epoch's order
    assert order(1, 0) != e0  # another seed, another order
    # Blocks are visited out of file order and rows are permuted inside blocks.
    first = e0[:30]
    assert first != sorted(first)


def test_eval_splits_are_read_in_file_order(criteo_split):
    reader = CriteoTSV(
        {"train": criteo_split, "valid": criteo_split}, table_size=TABLE, shuffle=True
    )
    ids = [i for b in reader.batches("valid", 128) for i in row_ids(b)]
    assert ids == list(range(1000)) + list(range(600))


def write_csv(path, header, rows) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def table_rows(n: int, start: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [
        [str(int(rng.integers(2))), str(start + i), f"u{int(rng.integers(50))}", f"c{i % 7}"]
        for i in range(n)
    ]


def test_csv_and_parquet_four_ranks_see_the_global_batches_of_one_rank(tmp_path):
    header = ["click", "x", "user", "city"]
    a = write_csv(tmp_path / "a.csv", header, table_rows(700, 0, 0))
    rows_b = table_rows(500, 700, 1)
    b = str(tmp_path / "b.parquet")
    cols = list(zip(*rows_b))
    pq.write_table(
        pa.table(
            {
                "click": pa.array([int(x) for x in cols[0]]),
                "x": pa.array([float(x) for x in cols[1]]),
                "user": pa.array(cols[2]),
                "city": pa.array(cols[3]),
            }
        ),
        b,
        row_group_size=64,
    )
    t = ColumnTable(
        {"train": [a, b]},
        label="click",
        dense=["x"],
        sparse=["user", "city"],
        shuffle=True,
        seed=2,
        block_bytes=2048,
    )
    # both files are read: 1200 rows, a mix of CSV blocks and Parquet row groups
    assert sorted(int(x) for bt in t.batches("train", 100) for x in bt.dense_features[:, 0]) == (
        list(range(1200))
    )
    for epoch in (0, 3):
        assert check_world_size_independent(t, "train", 40, 4, epoch) == 30


def test_preprocessed_and_synthetic_four_ranks_see_the_global_batches_of_one_rank(
    tmp_path, criteo_split
):
    preprocess(
        PreprocessConfig(
            kind="criteo",
            train=criteo_split,
            out=str(tmp_path / "store"),
            table_size=TABLE,
            progress_every=0,
        )
    )
    store = PreprocessedData(str(tmp_path / "store"), shuffle=True, seed=1, block_rows=100)
    for epoch in (0, 1):
        assert check_world_size_independent(store, "train", 64, 4, epoch) == 25
    synth = SyntheticData(SyntheticConfig(num_sparse=6, num_groups=2, num_train=1000, seed=4))
    assert check_world_size_independent(synth, "train", 48, 4, 2) == 21  # 20 x 48 + 40


def test_load_data_wires_shuffle_and_seed(criteo_split):
    cfg = DataConfig(kind="criteo", train=criteo_split, shuffle_seed=7, block_mb=4096 / 2**20)
    ids = [i for b in load_data(cfg).batches("train", 100) for i in row_ids(b)]
    direct = CriteoTSV(
        {"train": criteo_split}, table_size=100_000, shuffle=True, seed=7, block_bytes=4096
    )
    assert ids == [i for b in direct.batches("train", 100) for i in row_ids(b)]
    cfg.shuffle = False
    ids = [i for b in load_data(cfg).batches("train", 100) for i in row_ids(b)]
    assert ids == list(range(1000)) + list(range(600))


def test_the_shuffle_follows_the_runs_seed_unless_shuffle_seed_is_given(criteo_split):
    cfg = DataConfig(kind="criteo", train=criteo_split, block_mb=4096 / 2**20)

    def order(seed: int) -> list[int]:
        return [i for b in load_data(cfg, seed=seed).batches("train", 100) for i in row_ids(b)]

    by_seed = {s: order(s) for s in (0, 1, 7)}
    assert by_seed[0] != by_seed[1] != by_seed[7] and by_seed[0] == order(0)
    assert sorted(by_seed[1]) == sorted(by_seed[0])  # the same rows, another order
    cfg.shuffle_seed = 7  # an explicit --shuffle-seed wins over --seed
    assert order(0) == order(1) == by_seed[7]


def test_bad_shard_arguments_are_config_errors(criteo_split):
    reader = CriteoTSV({"train": criteo_split})
    with pytest.raises(ConfigError, match="rank 4 is not in"):
        reader.batches("train", 64, rank=4, world_size=4)
    with pytest.raises(ConfigError, match="global batch size 66 is not a multiple of the world"):
        reader.batches("train", 66, world_size=4)


def test_a_bad_row_keeps_every_slice_full_on_several_ranks(tmp_path):
    lines = criteo_rows(16, 0)
    lines[5] = "1\tnot-a-row\n"  # rank 1's slice of the first global batch (rows 4..7)
    for i in range(8, 12):  # the whole of rank 2's slice of the second batch
        lines[i] = lines[i].replace("\t", "\tx", 1)
    path = write(tmp_path / "day", lines)
    reader = CriteoTSV({"valid": [path]}, table_size=TABLE)
    one = [row_ids(b) for b in reader.batches("valid", 16)]
    assert one == [[0, 1, 2, 3, 4, 6, 7, 12, 13, 14, 15]]  # 1 rank: bad rows are just dropped
    assert reader.stats["valid"].skipped == 5
    # 2 ranks x 8: rank 0 has rows 0..7 (5 bad -> topped up with its own row 4, cycling)
    # rank 1 has rows 8..15 (8..11 bad -> its good rows 12..15 twice)
    r0 = [row_ids(b) for b in reader.batches("valid", 16, rank=0, world_size=2)]
    assert r0 == [[0, 1, 2, 3, 4, 6, 7, 0]] and reader.stats["valid"].skipped == 1
    r1 = [row_ids(b) for b in reader.batches("valid", 16, rank=1, world_size=2)]
    assert r1 == [[12, 13, 14, 15, 12, 13, 14, 15]] and reader.stats["valid"].skipped == 4
    # 4 ranks x 4: rank 2's slice (rows 8..11) is all bad: it takes the batch's first good row
    r2 = [row_ids(b) for b in reader.batches("valid", 16, rank=2, world_size=4)]
    assert r2 == [[0, 0, 0, 0]] and reader.stats["valid"].skipped == 4
    assert reader.stats["valid"].parsed == 4  # the search parse is not counted as its share


def test_a_resumed_epoch_starts_at_its_step_without_parsing_the_steps_before(
    tmp_path, criteo_split
):
    reader = CriteoTSV(
        {"train": criteo_split}, table_size=TABLE, shuffle=True, seed=9, block_bytes=4096
    )
    whole = [row_ids(b) for b in reader.batches("train", 64, epoch=2, rank=1, world_size=4)]
    resumed = list(reader.batches("train", 64, epoch=2, rank=1, world_size=4, start_step=20))
    assert [row_ids(b) for b in resumed] == whole[20:]
    assert reader.stats["train"].parsed == 5 * 16  # 5 steps x 16 rows: nothing before step 20
    preprocess(
        PreprocessConfig(
            kind="criteo", train=criteo_split, out=str(tmp_path / "s"), progress_every=0
        )
    )
    store = PreprocessedData(str(tmp_path / "s"), shuffle=True, block_rows=128)
    whole = [b.labels for b in store.batches("train", 64, epoch=1)]
    resumed = [b.labels for b in store.batches("train", 64, epoch=1, start_step=7)]
    assert len(resumed) == len(whole) - 7
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole[7:], strict=True))
    assert list(store.batches("train", 64, start_step=10**6)) == []
