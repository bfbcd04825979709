"""One FuxiCTR training run, executed by the *FuxiCTR* virtualenv's python (not dmtrec's).

``dmtrec.bench.quality`` writes a JSON job file and runs ``<fuxi python> fuxictr_runner.py JOB``;
this script imports only ``fuxictr`` (pip package), torch and numpy -- never dmtrec -- and writes
the job's ``result`` JSON: test/valid AUC and logloss of the best-valid checkpoint, wall seconds,
the best epoch and the per-epoch valid history.

The pip package of FuxiCTR 2.3.10 ships the library (feature processing, ``BaseModel`` with its
training loop, early stopping, reduce-LR-on-plateau and embedding regulariser, and the layers)
but not its ``model_zoo``. ``DLRM`` and ``DCNv2`` below are therefore built here from the
package's own layers (``FeatureEmbedding``, ``MLP_Block``, ``CrossNetV2``), with the structure of
FuxiCTR's ``model_zoo/DLRM/src/DLRM.py`` (bottom MLP on the numeric fields, ``cat`` or ``dot``
interaction, top MLP) and ``model_zoo/DCNv2/src/DCNv2.py`` (parallel structure: CrossNetV2 and
a DNN on the flattened embeddings, then one linear logit). Training, evaluation, early stopping
and regularisation are FuxiCTR's ``BaseModel.fit``/``evaluate``, unchanged.

Data: the CSV splits are encoded with FuxiCTR's ``FeatureProcessor`` (vocabularies fitted on
train, ``min_categr_count``) and stored as ``.npz`` for FuxiCTR's ``NpzDataLoader`` (a torch
``DataLoader``, shuffled from torch's seed). The package's default path goes through Ray
(``build_dataset``/``ParquetDataLoader``), which starts a cluster of worker processes and whose
shuffle is not seeded; on a shared 2-core machine the npz path is what FuxiCTR 2.0-2.2 used and
gives seeded, repeatable runs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from fuxictr import __version__ as FUXICTR_VERSION
from fuxictr.features import FeatureMap
from fuxictr.preprocess import FeatureProcessor
from fuxictr.pytorch.dataloaders import RankDataLoader
from fuxictr.pytorch.layers import CrossNetV2, FeatureEmbedding, InnerProductInteraction, MLP_Block
from fuxictr.pytorch.models import BaseModel
from fuxictr.pytorch.torch_utils import seed_everything
from torch import nn

SPLITS = ("train", "valid", "test")


class _Tracked(BaseModel):
    """``BaseModel`` that records the epoch of the best valid metric and the valid history."""

    best_epoch = 0
    history: list

    def checkpoint_and_earlystop(self, logs, min_delta=1e-6):
        if not hasattr(self, "history"):
            self.history = []
        self.history.append(
            {"epoch": self._epoch_index + 1, **{k: float(v) for k, v in logs.items()}}
        )
        before = self._best_metric
        super().checkpoint_and_earlystop(logs, min_delta)
        if self._best_metric != before:
            self.best_epoch = self._epoch_index + 1


class DLRM(_Tracked):
    """DLRM: bottom MLP on numeric fields as one more field, ``cat``/``dot`` interaction, top
    MLP with a sigmoid output (FuxiCTR model_zoo DLRM's structure)."""

    def __init__(
        self,
        feature_map,
        model_id="DLRM",
        gpu=-1,
        learning_rate=1e-3,
        embedding_dim=10,
        top_mlp_units=(64, 64, 64),
        bottom_mlp_units=(64, 64, 64),
        top_mlp_activations="ReLU",
        bottom_mlp_activations="ReLU",
        top_mlp_dropout=0.0,
        bottom_mlp_dropout=0.0,
        interaction_op="dot",
        batch_norm=False,
        embedding_regularizer=None,
        net_regularizer=None,
        **kwargs,
    ):
        super().__init__(
            feature_map,
            model_id=model_id,
            gpu=gpu,
            embedding_regularizer=embedding_regularizer,
            net_regularizer=net_regularizer,
            **kwargs,
        )
        self.dense = [f for f, s in feature_map.features.items() if s["type"] == "numeric"]
        self.embedding_layer = FeatureEmbedding(
            feature_map, embedding_dim, not_required_feature_columns=self.dense
        )
        fields = feature_map.num_fields - len(self.dense) + (1 if self.dense else 0)
        if self.dense:
            self.bottom_mlp = MLP_Block(
                input_dim=len(self.dense),
                output_dim=embedding_dim,
                hidden_units=list(bottom_mlp_units or []),
                hidden_activations=bottom_mlp_activations,
                output_activation=bottom_mlp_activations,
                dropout_rates=bottom_mlp_dropout,
                batch_norm=batch_norm,
            )
        self.interaction_op = interaction_op
        if interaction_op == "cat":
            self.interact = nn.Flatten(start_dim=1)
            top_in = fields * embedding_dim
        elif interaction_op == "dot":
            self.interact = InnerProductInteraction(num_fields=fields, output="inner_product")
            top_in = fields * (fields - 1) // 2 + (embedding_dim if self.dense else 0)
        else:
            raise ValueError(f"interaction_op={interaction_op!r}: use cat or dot")
        self.top_mlp = MLP_Block(
            input_dim=top_in,
            output_dim=1,
            hidden_units=list(top_mlp_units),
            hidden_activations=top_mlp_activations,
            output_activation=self.output_activation,
            dropout_rates=top_mlp_dropout,
            batch_norm=batch_norm,
        )
        self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
        self.reset_parameters()
        self.model_to_device()

    def forward(self, inputs):
        X = self.get_inputs(inputs)
        emb = self.embedding_layer(X)  # B x F x D (the non-numeric fields)
        if self.dense:
            dense = self.bottom_mlp(torch.stack([X[f].float() for f in self.dense], dim=1))
            emb = torch.cat([emb, dense.unsqueeze(1)], dim=1)
        out = self.interact(emb)
        if self.interaction_op == "dot" and self.dense:
            out = torch.cat([out, dense], dim=-1)
        return {"y_pred": self.top_mlp(out)}


class DCNv2(_Tracked):
    """DCNv2, parallel structure: CrossNetV2 and a DNN on the flattened field embeddings
    (numeric fields embedded as value x vector, FuxiCTR's convention), concatenated, one linear
    logit, sigmoid (FuxiCTR model_zoo DCNv2's ``model_structure: parallel``)."""

    def __init__(
        self,
        feature_map,
        model_id="DCNv2",
        gpu=-1,
        learning_rate=1e-3,
        embedding_dim=10,
        parallel_dnn_hidden_units=(400, 400, 400),
        dnn_activations="ReLU",
        num_cross_layers=3,
        net_dropout=0.0,
        batch_norm=False,
        embedding_regularizer=None,
        net_regularizer=None,
        **kwargs,
    ):
        super().__init__(
            feature_map,
            model_id=model_id,
            gpu=gpu,
            embedding_regularizer=embedding_regularizer,
            net_regularizer=net_regularizer,
            **kwargs,
        )
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        input_dim = feature_map.sum_emb_out_dim()
        self.crossnet = CrossNetV2(input_dim, num_cross_layers)
        self.parallel_dnn = MLP_Block(
            input_dim=input_dim,
            output_dim=None,
            hidden_units=list(parallel_dnn_hidden_units),
            hidden_activations=dnn_activations,
            output_activation=None,
            dropout_rates=net_dropout,
            batch_norm=batch_norm,
        )
        self.fc = nn.Linear(input_dim + list(parallel_dnn_hidden_units)[-1], 1)
        self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
        self.reset_parameters()
        self.model_to_device()

    def forward(self, inputs):
        X = self.get_inputs(inputs)
        emb = self.embedding_layer(X, flatten_emb=True)
        out = torch.cat([self.crossnet(emb), self.parallel_dnn(emb)], dim=-1)
        return {"y_pred": self.output_activation(self.fc(out))}


MODELS = {"DLRM": DLRM, "DCNv2": DCNv2}


def encode(params: dict) -> dict[str, str]:
    """Fit FuxiCTR's ``FeatureProcessor`` on train and write ``SPLIT.npz`` (once per data set:
    a later run with the same ``data_root``/``dataset_id`` reuses them). Returns npz paths."""
    fp = FeatureProcessor(**params)
    out = {s: os.path.join(fp.data_dir, f"{s}.npz") for s in SPLITS}
    if all(os.path.exists(p) for p in out.values()) and os.path.exists(fp.json_file):
        return out
    frames = {
        s: fp.preprocess(fp.read_data(params[f"{s}_data"], data_format="csv")) for s in SPLITS
    }
    fp.fit(frames["train"], **{k: v for k, v in params.items() if k == "min_categr_count"})
    for split, frame in frames.items():
        table = frame.collect()
        batch = fp.transform({c: table[c].to_numpy() for c in table.columns})
        tmp = out[split] + ".tmp.npz"
        np.savez(tmp, **{k: np.asarray(v) for k, v in batch.items()})
        os.replace(tmp, out[split])
    return out


def run(job: dict) -> dict:
    """Encode (if needed), train with early stopping on valid, evaluate the best checkpoint."""
    torch.set_num_threads(int(job.get("threads", 1)))
    params = dict(job["params"])
    Path(params["model_root"]).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=os.path.join(params["model_root"], "fuxictr.log"),
        filemode="w",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    t0 = time.perf_counter()
    paths = encode(params)
    data_dir = os.path.join(params["data_root"], params["dataset_id"])
    feature_map = FeatureMap(params["dataset_id"], data_dir)
    feature_map.load(os.path.join(data_dir, "feature_map.json"), params)
    seed_everything(seed=params["seed"])
    model = MODELS[job["model"]](feature_map, **params)
    os.makedirs(model.model_dir, exist_ok=True)  # where BaseModel saves its best checkpoint
    loader = {**params, "data_format": "npz", "num_workers": 0}
    for split in SPLITS:
        loader[f"{split}_data"] = paths[split]
    train_gen, valid_gen = RankDataLoader(feature_map, stage="train", **loader)
    t_fit = time.perf_counter()
    model.fit(train_gen, validation_data=valid_gen, **params)
    fit_s = time.perf_counter() - t_fit
    valid = model.evaluate(valid_gen)
    test = model.evaluate(RankDataLoader(feature_map, stage="test", **loader))
    return {
        "auc": float(test["AUC"]),
        "logloss": float(test["logloss"]),
        "valid_auc": float(valid["AUC"]),
        "valid_logloss": float(valid["logloss"]),
        "best_epoch": model.best_epoch,
        "epochs_run": len(getattr(model, "history", [])),
        "history": getattr(model, "history", []),
        "train_seconds": fit_s,
        "seconds": time.perf_counter() - t0,
        "fuxictr_version": FUXICTR_VERSION,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: fuxictr_runner.py JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    result = run(job)
    tmp = job["result"] + ".tmp"
    Path(tmp).write_text(json.dumps(result, indent=2))
    os.replace(tmp, job["result"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
