"""Using a saved model (``OUT/model``): ``evaluate`` on labelled data, ``predict`` new rows.

Both run the model through the same fused TorchRec kernels as training (a one-rank
``parallel none`` build of the saved single-device model), so ``evaluate`` on a run's test
file reproduces the run's test metrics. Inputs are encoded with the model's own vocabularies
(column-spec data) or hashing (Criteo). ``predict`` streams its input in blocks and writes one
probability per input row, in input order; ExFM's data augmentation uses the same path.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmtrec.data import load_data
from dmtrec.errors import ConfigError, DataError
from dmtrec.options import option
from dmtrec.parallel.build import build
from dmtrec.train.artifact import SavedModel, load_model
from dmtrec.train.trainer import TrainConfig, evaluate


@dataclass
class EvaluateConfig:
    """Options of ``dmtrec evaluate``."""

    model: str = option("", "a saved model directory (a training run's OUT/model)")
    test: list[str] = option(factory=list, help="labelled test file (repeatable)")
    out: str = option("runs/evaluate", "output directory (metrics.json)")
    batch_size: int = option(2048, "examples per evaluation batch", minimum=1)


@dataclass
class PredictConfig:
    """Options of ``dmtrec predict``."""

    model: str = option("", "a saved model directory (a training run's OUT/model)")
    input: str = option("", "CSV or Parquet file with the model's feature columns")
    output: str = option("preds.parquet", "where to write the predictions (.parquet or .csv)")
    batch_size: int = option(8192, "rows scored per block", minimum=1)


def _source(saved: SavedModel, test: list[str]):
    """The labelled evaluation source: ``test`` files encoded like the training data, or the
    saved synthetic set's own test split."""
    dcfg = saved.data_config
    if dcfg.kind == "synthetic":
        if test:
            raise ConfigError(
                "--test: a model trained on synthetic data evaluates its own test split"
            )
        return load_data(dcfg)
    if dcfg.kind == "preprocessed":
        if test:
            raise ConfigError("--test: a model trained on a store evaluates the store's test split")
        return load_data(dcfg)
    if not test:
        raise ConfigError("--test FILE is required")
    cfg = replace(dcfg, train=[], valid=[], test=list(test), shuffle=False)
    return load_data(cfg, vocab_values=saved.vocab_values)


def _eval_worker(saved: SavedModel, test: list[str], batch_size: int) -> dict[str, Any]:
    data = _source(saved, test)
    if "test" not in data.splits:
        raise DataError(f"{', '.join(test) or 'test split'}: no rows to evaluate")
    built = build(saved.spec, saved.model_config, TrainConfig(), reference=saved.model)
    return evaluate(data, built.model, "test", batch_size, 0, 1, built.device)


def evaluate_saved(model_dir: str, test: list[str], out: str, batch_size: int = 2048) -> dict:
    """Metrics (auc, logloss, ne, eval_examples) of the saved model; writes OUT/metrics.json."""
    from dmtrec.parallel.launch import run_single

    saved = load_model(model_dir)
    m = run_single(_eval_worker, (saved, list(test), batch_size))
    m = {**m, "model": str(saved.path), "test": list(test) or "saved test split"}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "metrics.json").write_text(json.dumps(m, indent=2))
    return m


# -- predict ----------------------------------------------------------------------------------
def _blocks(path: str, columns: list[str], rows: int) -> Iterator[Any]:
    """pyarrow record batches of ``columns`` (CSV or Parquet by the name), in file order."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from dmtrec.data.columns import infer_format

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--input {path}: no such file")
    if infer_format(path) == "parquet":
        f = pq.ParquetFile(path)
        have = set(f.schema_arrow.names)
        missing = [c for c in columns if c not in have]
        if missing:
            raise DataError(f"{path}: missing feature column(s): {', '.join(missing)}")
        yield from f.iter_batches(batch_size=rows, columns=columns)
        return
    with open(path, "rb") as fh:
        header = fh.readline().decode("utf-8", "replace").rstrip("\r\n").split(",")
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing feature column(s): {', '.join(missing)}")
    reader = pcsv.open_csv(
        path,
        read_options=pcsv.ReadOptions(block_size=1 << 22),
        convert_options=pcsv.ConvertOptions(
            include_columns=columns,
            column_types={c: "string" for c in columns},
            strings_can_be_null=True,
        ),
    )
    yield from reader


def _encode(saved: SavedModel, rb: Any) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(dense B x n float32, lengths per feature, ids per feature) of a record batch."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from dmtrec.data.columns import _as_strings, _bag, lookup

    dcfg, spec = saved.data_config, saved.spec
    n = rb.num_rows
    dense = np.zeros((n, len(spec.dense)), dtype=np.float32)
    for j, name in enumerate(spec.dense):
        col = rb.column(name)
        if not pa.types.is_floating(col.type):
            col = pc.cast(_as_strings(col), pa.float64(), safe=False)
        dense[:, j] = np.nan_to_num(np.asarray(pc.fill_null(col, 0.0), dtype=np.float64))
    lengths, ids = [], []
    vocab = saved.vocab_values or {}
    for name in spec.sparse:
        col = rb.column(name)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            lens, items = _bag(col)
        elif name in dcfg.multi_hot:
            split = pc.split_pattern(_as_strings(col), dcfg.multi_hot_sep)
            lens, items = _bag(split)
        else:
            lens, items = np.ones(n, dtype=np.int32), _as_strings(col)
        lengths.append(lens)
        ids.append(lookup(items, vocab[name]))
    return dense, lengths, ids


def predict(model_dir: str, input_path: str, output: str, batch_size: int = 8192) -> int:
    """Write one probability per row of ``input_path`` (CSV/Parquet with the model's feature
    columns; a label column is not needed) to ``output`` (.parquet or .csv); returns rows."""
    from dmtrec.parallel.launch import run_single

    if not output.endswith((".parquet", ".csv")):
        raise ConfigError(f"--output {output}: name a .parquet or .csv file")
    saved = load_model(model_dir)
    if saved.data_config.kind not in ("csv", "parquet"):
        raise ConfigError(
            f"predict reads column-spec tables; the model was trained on --data "
            f"{saved.data_config.kind} (use dmtrec evaluate on labelled files)"
        )
    return run_single(_predict_worker, (saved, input_path, output, batch_size))


def _predict_worker(saved: SavedModel, input_path: str, output: str, batch_size: int) -> int:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    spec = saved.spec
    built = build(spec, saved.model_config, TrainConfig(), reference=saved.model)
    model = built.model
    model.eval()
    columns = [*spec.dense, *spec.sparse]
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    schema = pa.schema([("prediction", pa.float32())])
    writer = pq.ParquetWriter(tmp, schema) if output.endswith(".parquet") else None
    rows = 0
    csv_file = open(tmp, "wb") if writer is None else contextlib.nullcontext()
    with torch.no_grad(), csv_file as fh:
        if writer is None:
            fh.write(b'"prediction"\n')
        for rb in _blocks(input_path, columns, batch_size):
            dense, lengths, ids = _encode(saved, rb)
            if not len(dense):
                continue
            kjt = KeyedJaggedTensor(
                keys=list(spec.sparse),
                values=torch.from_numpy(np.concatenate(ids)),
                lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
                stride=len(dense),
            )
            batch = Batch(torch.from_numpy(dense), kjt, torch.zeros(len(dense))).to(built.device)
            prob = torch.sigmoid(model(batch.dense_features, batch.sparse_features)).float().cpu()
            table = pa.table({"prediction": pa.array(prob.numpy())})
            if writer is not None:
                writer.write_table(table)
            else:
                pcsv.write_csv(table, fh, pcsv.WriteOptions(include_header=False))
            rows += len(dense)
    if writer is not None:
        writer.close()
    tmp.replace(out)
    return rows


__all__ = ["evaluate_saved", "predict"]
