"""``bench_data``: the generated file is real Criteo format, and the JSON has what it promises."""

from __future__ import annotations

import json

import numpy as np
import torch

from dmtrec.bench.data import CARDINALITIES, bench_data, write_criteo
from dmtrec.data.columns import ColumnTable
from dmtrec.data.criteo import CriteoTSV


def test_generated_rows_are_clean_criteo_with_the_planted_shapes(tmp_path):
    tsv, head, csv = tmp_path / "a.tsv", tmp_path / "h.tsv", tmp_path / "h.csv"
    write_criteo(tsv, 30_000, seed=1, head_rows=1000, head_tsv=head, head_csv=csv)
    reader = CriteoTSV({"train": [str(tsv)]}, table_size=2**31)
    batches = list(reader.batches("train", 10_000))
    assert reader.stats["train"].skipped == 0 and reader.stats["train"].rows == 30_000
    labels = torch.cat([b.labels for b in batches])
    assert abs(float(labels.mean()) - 0.25) < 0.02
    ids = torch.cat([b.sparse_features.values().view(26, -1) for b in batches], dim=1)
    distinct = [len(np.unique(ids[j].numpy())) for j in range(26)]
    for d, card in zip(distinct, CARDINALITIES):
        assert d <= card + 1  # + the missing id 0
    assert distinct[8] == 4 and distinct[2] > 1000  # C9: 3 values + missing; C3: many
    missing = float((ids == 0).double().mean())
    assert 0.03 < missing < 0.05
    # the heads are the same first rows, as TSV and as a CSV with a header
    head_rows = list(CriteoTSV({"train": [str(head)]}, table_size=2**31).batches("train", 1000))
    assert torch.equal(head_rows[0].sparse_features.values().view(26, -1), ids[:, :1000])
    table = ColumnTable(
        {"train": str(csv)},
        label="label",
        dense=[f"I{j}" for j in range(1, 14)],
        sparse=[f"C{j}" for j in range(1, 27)],
    )
    b = next(table.batches("train", 1000))
    assert torch.equal(b.labels, head_rows[0].labels)
    counts = torch.expm1(head_rows[0].dense_features.double()).round()
    # the CSV reader keeps raw values; Criteo's log(1 + max(x, 0)) is applied to the TSV
    torch.testing.assert_close(b.dense_features.double().clamp(min=0), counts)


def test_bench_data_writes_the_json_it_promises(tmp_path):
    result = bench_data(str(tmp_path), rows=12_000, read_rows=6_000, repeats=1, batch_size=1024)
    saved = json.loads((tmp_path / "bench_data.json").read_text())
    assert saved["readers"].keys() == {"criteo_tsv", "csv", "preprocessed", "pyarrow_csv"}
    assert saved == json.loads(json.dumps(result))
    readers = saved["readers"]
    assert readers["criteo_tsv"]["rows"] == readers["csv"]["rows"] == 6_000
    assert readers["preprocessed"]["rows"] == 12_000
    for name, r in readers.items():
        assert r["rows_per_s"] > 0
        base = r.get("pyarrow_rows_per_s", readers["pyarrow_csv"]["rows_per_s"])
        assert abs(r["ratio_to_pyarrow"] - r["rows_per_s"] / base) < 1e-9, name
    assert readers["pyarrow_csv"]["ratio_to_pyarrow"] == 1.0
    assert 0 < saved["preprocess_peak_rss_mb"] < 1024
    assert saved["preprocess"]["torch_imported"] is False
    assert saved["sharded"]["criteo_tsv_rank_of_4"]["rows_parsed"] == 1_500
    assert not (tmp_path / "bench_data_files").exists()  # the generated files are removed


def test_the_bench_config_has_exactly_bench_data_options():
    import dataclasses
    import inspect

    from dmtrec.bench.data import DataBenchConfig

    fields = {f.name: f.default for f in dataclasses.fields(DataBenchConfig)}
    params = inspect.signature(bench_data).parameters
    assert fields == {n: p.default for n, p in params.items() if n != "out"}
