"""The vectorised block parsers against the line-by-line readers they replace.

``reference_criteo`` and ``reference_csv`` are the previous readers' parsing loops (kept here as
the reference): one ``str.split``/``csv`` row at a time, bad rows counted as they come. The
block readers must give the same good rows, the same skip count and the same messages, also
when bad rows fall in several blocks and the fast path has to re-scan them."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
import torch

from dmtrec.data.base import DataStats
from dmtrec.data.columns import ColumnTable
from dmtrec.data.criteo import CriteoTSV, hex8_words, hex_binary
from dmtrec.data.stream import BadRow, BadRows, short_repr
from dmtrec.errors import DataError

TABLE = 1000


# -- the reference line readers -------------------------------------------------------------
def reference_criteo(path: str, table: int, max_bad_rows: int = 100):
    """The old ``CriteoTSV._rows``/``_parse``: (labels, dense, ids) of good rows, stats."""
    stats = DataStats()
    bad = BadRows(stats, max_bad_rows)
    rows = []
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("\t")
            try:
                if len(fields) != 40:
                    raise BadRow(
                        "expected 40 tab-separated fields (label, 13 integer, 26 categorical), "
                        f"got {len(fields)}"
                    )
                if fields[0] not in ("0", "1"):
                    raise BadRow(f"{short_repr(fields[0])} is not 0 or 1", (1, "label"))
                dense = []
                for j, tok in enumerate(fields[1:14]):
                    try:
                        x = int(tok) if tok else 0
                        dense.append(math.log1p(x) if x > 0 else 0.0)
                    except ValueError:
                        col = (2 + j, f"I{j + 1}")
                        raise BadRow(f"{short_repr(tok)} is not an integer", col) from None
                    except OverflowError:
                        col = (2 + j, f"I{j + 1}")
                        raise BadRow(f"{short_repr(tok)} is out of range", col) from None
                ids = []
                for j, tok in enumerate(fields[14:]):
                    try:
                        ids.append(1 + int(tok, 16) % (table - 1) if tok else 0)
                    except ValueError:
                        col = (15 + j, f"C{j + 1}")
                        raise BadRow(f"{short_repr(tok)} is not a hex id", col) from None
            except BadRow as err:
                bad.record(path, str(lineno), err)
                continue
            stats.rows += 1
            rows.append((float(fields[0]), dense, ids))
    return rows, stats


def reference_csv(path: str, label: str, dense: list[str], sparse: list[str]):
    """The old ``ColumnTable`` CSV loop: (label, dense, raw keys) of good rows, stats."""
    stats = DataStats()
    bad = BadRows(stats, 100)
    rows = []
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        pos = [header.index(c) + 1 for c in [label, *dense, *sparse]]
        for row in reader:
            if not row:
                continue
            where = str(reader.line_num)
            try:
                if len(row) != len(header):
                    raise BadRow(f"expected {len(header)} fields as in the header, got {len(row)}")
                values = [row[p - 1] for p in pos]
                if values[0] == "":
                    raise BadRow("missing label", (pos[0], label))
                try:
                    y = float(values[0])
                except ValueError:
                    y = math.nan
                if y not in (0.0, 1.0):
                    raise BadRow(f"{short_repr(values[0])} is not 0 or 1", (pos[0], label))
                d = []
                for j, v in enumerate(values[1 : 1 + len(dense)]):
                    col = (pos[1 + j], dense[j])
                    if v == "":
                        d.append(0.0)
                        continue
                    try:
                        x = float(v)
                    except ValueError:
                        raise BadRow(f"{short_repr(v)} is not a number", col) from None
                    if not math.isfinite(x):
                        raise BadRow(f"{short_repr(v)} is not finite", col)
                    d.append(x)
                keys = [v or None for v in values[1 + len(dense) :]]
            except BadRow as err:
                bad.record(path, where, err)
                continue
            stats.rows += 1
            rows.append((y, d, keys))
    return rows, stats


# -- Criteo ---------------------------------------------------------------------------------
def good_line(rng: np.random.Generator) -> list[str]:
    dense = ["" if rng.random() < 0.2 else str(int(rng.integers(-5, 10_000))) for _ in range(13)]
    cats = ["" if rng.random() < 0.1 else f"{int(rng.integers(2**32)):08x}" for _ in range(26)]
    return [str(int(rng.integers(2))), *dense, *cats]


# Lines the fast path cannot take as they are; the reference decides whether each is good.
ODD = [
    lambda f: f[:24],  # 24 fields: bad
    lambda f: ["2", *f[1:]],  # label 2: bad
    lambda f: ["01", *f[1:]],  # label 01: bad (the reference wants exactly 0 or 1)
    lambda f: ["", *f[1:]],  # no label: bad
    lambda f: [f[0], "nan", *f[2:]],  # bad integer
    lambda f: [*f[:13], "1.5", *f[14:]],  # bad integer in I13
    lambda f: [*f[:20], "zzzz", *f[21:]],  # bad hex
    lambda f: [*f[:39], "0x1g"],  # bad hex in C26
    lambda f: [f[0], "+5", " 7", *f[3:]],  # good: int() takes a sign and spaces
    lambda f: [f[0], str(2**70), *f[2:]],  # good: beyond int64 (log1p of a big int)
    lambda f: [*f[:14], "a3f", "0", "ffffffffffffffff", "123456789abcdef01", *f[18:]],  # good
    lambda f: [*f[:14], "ABCDEF12", "0x00ff", "1_2", *f[17:]],  # good: int(x, 16) takes these
]


def odd_file(tmp_path, n: int = 3000, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    out = io.StringIO()
    for i in range(n):
        f = good_line(rng)
        if i % 97 == 13:  # odd lines in many blocks
            f = ODD[(i // 97) % len(ODD)](f)
        end = "\r\n" if i % 301 == 5 else "\n"
        out.write("\t".join(f) + end)
        if i % 500 == 7:
            out.write("\n")  # blank lines are not rows
    path = tmp_path / "day_odd"
    path.write_text(out.getvalue().rstrip("\n"))  # no newline after the last line
    return str(path)


def flat(batches):
    labels = torch.cat([b.labels for b in batches])
    dense = torch.cat([b.dense_features for b in batches])
    ids = torch.cat([b.sparse_features.values().view(26, -1) for b in batches], dim=1).T
    return labels, dense, ids


@pytest.mark.parametrize("block_bytes", [4096, 8 << 20])
def test_criteo_blocks_match_the_line_reader_with_bad_rows_in_many_blocks(tmp_path, block_bytes):
    path = odd_file(tmp_path)
    want, ref = reference_criteo(path, TABLE)
    reader = CriteoTSV({"valid": [path]}, table_size=TABLE, block_bytes=block_bytes)
    labels, dense, ids = flat(list(reader.batches("valid", 128)))
    got = reader.stats["valid"]
    assert ref.skipped >= 15  # bad rows in many blocks (one odd line every 97)
    assert (got.skipped, got.rows) == (ref.skipped, ref.rows)
    assert got.messages == ref.messages  # the first five, in file order, word for word
    assert got.messages[0] == ref.messages[0]
    assert labels.tolist() == [r[0] for r in want]
    assert torch.equal(dense, torch.tensor([r[1] for r in want], dtype=torch.float32))
    assert torch.equal(ids, torch.tensor([r[2] for r in want]))


def test_criteo_too_many_bad_rows_stops_at_the_same_line_as_the_line_reader(tmp_path):
    path = odd_file(tmp_path)
    with pytest.raises(DataError) as ref:
        reference_criteo(path, TABLE, max_bad_rows=6)
    reader = CriteoTSV({"valid": [path]}, table_size=TABLE, max_bad_rows=6, block_bytes=4096)
    with pytest.raises(DataError) as got:
        list(reader.batches("valid", 128))
    assert str(got.value) == str(ref.value)


def test_criteo_fast_path_equals_the_line_parser_on_clean_rows(tmp_path):
    rng = np.random.default_rng(1)
    lines = ["\t".join(good_line(rng)) + "\n" for _ in range(5000)]
    path = tmp_path / "clean"
    path.write_text("".join(lines))
    want, _ = reference_criteo(str(path), 10**6 + 7)
    reader = CriteoTSV({"valid": [str(path)]}, table_size=10**6 + 7)
    blocks = list(reader.blocks("valid", 0, BadRows(DataStats(), 0)))
    rows = reader.parse_lines(blocks[0].block.lines(np.arange(blocks[0].n)), blocks[0].n)
    assert rows is not None  # clean rows never leave the vectorised path
    labels, dense, ids = flat(list(reader.batches("valid", 1000)))
    assert torch.equal(dense, torch.tensor([r[1] for r in want], dtype=torch.float32))
    assert torch.equal(ids, torch.tensor([r[2] for r in want]))
    assert labels.tolist() == [r[0] for r in want]


def test_hex_kernels_on_planted_values():
    rng = np.random.default_rng(2)
    vals = rng.integers(0, 2**32, size=1000, dtype=np.uint64)
    text = "".join(f"{int(v):08x}" if i % 2 else f"{int(v):08X}" for i, v in enumerate(vals))
    words = np.frombuffer(text.encode(), dtype="<u8")
    got, ok = hex8_words(words)
    assert ok.all() and np.array_equal(got, vals)
    # not hex: a 'g', a space, a high byte, and control characters that "| 0x20" would turn
    # into digits ("\x10" | 0x20 == "0")
    bad = np.frombuffer(b"0000000g" + b"1234 678" + b"\xff0000000" + b"\x100000000", dtype="<u8")
    assert not hex8_words(bad)[1].any()
    edge = np.frombuffer(b"0000000000000000ffffffffFFFFFFFF99999999aAfF0909", dtype="<u8")
    got, ok = hex8_words(edge)
    assert ok.all() and got.tolist() == [0, 0, 2**32 - 1, 2**32 - 1, 0x99999999, 0xAAFF0909]

    import pyarrow as pa

    cells = ["", "0", "a3f", "ffffffffffffffff", "DEADbeef", None]
    got = hex_binary(pa.array(cells, type=pa.binary()))
    assert got is not None
    assert got[0].tolist() == [0, 0, 0xA3F, 2**64 - 1, 0xDEADBEEF, 0]
    assert got[1].tolist() == [False, True, True, True, True, False]
    assert hex_binary(pa.array(["12g"], type=pa.binary())) is None
    assert hex_binary(pa.array(["1" * 17], type=pa.binary())) is None


# -- CSV ------------------------------------------------------------------------------------
def test_csv_blocks_match_the_line_reader_with_bad_rows_in_many_blocks(tmp_path):
    rng = np.random.default_rng(3)
    header = ["id", "click", "price", "qty", "user", "city"]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    odd = [
        ["x", "1", "abc", "1", "u", "c"],  # not a number
        ["x", "1", "inf", "1", "u", "c"],  # not finite
        ["x", "7", "1", "1", "u", "c"],  # label 7
        ["x", "", "1", "1", "u", "c"],  # missing label
        ["x", "1"],  # 2 fields
        ["x", "1.0", " 2.5", "1e3", 'a "quoted", user', ""],  # good (float takes spaces)
        ["x", "0", "nan", "1", "u", "c"],  # not finite
    ]
    for i in range(2500):
        if i % 89 == 11:
            row = list(odd[(i // 89) % len(odd)])
        else:
            row = [
                f"r{i}",
                str(int(rng.integers(2))),
                "" if rng.random() < 0.1 else f"{rng.normal():.6g}",
                str(int(rng.integers(100))),
                f"u{int(rng.integers(300))}",
                "" if rng.random() < 0.1 else f"c{int(rng.integers(20))}",
            ]
        w.writerow(row)
    path = tmp_path / "train.csv"
    path.write_text(out.getvalue())
    want, ref = reference_csv(str(path), "click", ["price", "qty"], ["user", "city"])
    t = ColumnTable(
        {"train": str(path)},
        label="click",
        dense=["price", "qty"],
        sparse=["user", "city"],
        block_bytes=2048,
    )
    got = t.stats["train"]  # the vocabulary pass
    assert ref.skipped > 10
    assert (got.skipped, got.rows, got.messages) == (ref.skipped, ref.rows, ref.messages)
    batches = list(t.batches("train", 100))
    assert t.stats["train"].messages == ref.messages
    assert torch.cat([b.labels for b in batches]).tolist() == [r[0] for r in want]
    dense = torch.cat([b.dense_features for b in batches])
    assert torch.equal(dense, torch.tensor([r[1] for r in want], dtype=torch.float32))
    # ids: first appearance order of the reference's keys
    for j, name in enumerate(["user", "city"]):
        vocab: dict[str, int] = {}
        for r in want:
            if r[2][j] is not None:
                vocab.setdefault(r[2][j], len(vocab) + 1)
        ids = torch.cat([b.sparse_features[name].values() for b in batches]).tolist()
        assert ids == [0 if r[2][j] is None else vocab[r[2][j]] for r in want]
        assert t.vocab[name] == vocab
