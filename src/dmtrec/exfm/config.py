"""ExFM's configuration: one YAML file describes the stream, the FM, the DAS and the VMs.

```yaml
seed: 0
stream: {source: synthetic, window_rows: 4000, num_windows: 30, drift: 0.06}
teacher:
  model: {model: wukong, embedding_dim: 16, top: [128, 64], wukong_layers: 2}
  snapshot_every: 1
augment: {fm_lag: 0}
distill: {w: 1.0, alpha: 1.0, beta: 1.0}
students:
  - {name: vm_dlrm, model: {model: dlrm, embedding_dim: 8}, sparse: [C1, C2, C3]}
  - {name: vm_dcn, model: {model: dcn, embedding_dim: 8}, variants: [none, aux]}
```

Every field is declared once with ``option(...)`` (default + help), so the CLI can derive
its flags from these dataclasses; ``load_config`` rejects unknown keys with the path of the
key (``students[1].modle``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmtrec.errors import ConfigError
from dmtrec.exfm.stream import StreamConfig
from dmtrec.models import ModelConfig
from dmtrec.models.exfm import KD_MODES, DistillConfig, check_kd
from dmtrec.options import option


@dataclass
class OptimConfig:
    """One model's optimisation on the stream (every window once, in order)."""

    batch_size: int = option(256, "examples per step", minimum=1)
    lr: float = option(3e-3, "dense optimizer (Adam) learning rate", minimum=0)
    sparse_lr: float = option(0.1, "embedding learning rate (row-wise Adagrad, fused)", minimum=0)
    eval_batch_size: int = option(4096, "examples per scoring batch", minimum=1)

    def validate(self, who: str) -> None:
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{who}: --{name.replace('_', '-')} must be >= 1")
        for name in ("lr", "sparse_lr"):
            v = getattr(self, name)
            if not v > 0:
                raise ConfigError(f"{who}: --{name.replace('_', '-')} must be > 0, got {v}")


def _fm_model() -> ModelConfig:
    return ModelConfig(
        model="wukong",
        embedding_dim=16,
        bottom=[64],
        top=[128, 64],
        wukong_layers=2,
        wukong_nf=8,
        wukong_nl=8,
        wukong_rank=8,
    )


def _vm_model() -> ModelConfig:
    return ModelConfig(model="dlrm", embedding_dim=8, bottom=[32], top=[32, 16])


@dataclass
class TeacherConfig:
    """The foundation model: trained on the whole stream, snapshots published as it goes."""

    model: ModelConfig = option(help="the FM's architecture (any dmtrec model)", factory=_fm_model)
    snapshot_every: int = option(1, "publish an FM snapshot every N windows", minimum=1)
    optim: OptimConfig = option(help="the FM's optimisation", factory=OptimConfig)

    def validate(self) -> None:
        self.model.validate()
        if self.snapshot_every < 1:
            raise ConfigError(f"--snapshot-every must be >= 1, got {self.snapshot_every}")
        self.optim.validate("teacher")


@dataclass
class AugmentConfig:
    """The data augmentation service: which FM snapshot labels which window."""

    fm_lag: int = option(
        0,
        "windows a snapshot waits before the DAS uses it (0: the newest, trained up to the window before)",
        minimum=0,
    )
    fm_version: int | None = option(
        None, "label every window with this one snapshot (default: the newest the lag allows)"
    )
    batch_size: int = option(4096, "examples per FM inference batch", minimum=1)
    name: str | None = option(None, "store name under STREAM/das/ (default lag<L> or v<N>)")

    def validate(self) -> None:
        if self.fm_lag < 0:
            raise ConfigError(f"--fm-lag must be >= 0, got {self.fm_lag}")
        if self.batch_size < 1:
            raise ConfigError(f"augment: --batch-size must be >= 1, got {self.batch_size}")

    @property
    def store_name(self) -> str:
        if self.name:
            return self.name
        return f"v{self.fm_version}" if self.fm_version is not None else f"lag{self.fm_lag}"


@dataclass
class StudentConfig:
    """One vertical model: its architecture, its features, its traffic, the variants to train."""

    name: str = option("vm", "name of the VM (its results' key)")
    model: ModelConfig = option(help="the VM's architecture (dlrm, dcn, wukong)", factory=_vm_model)
    sparse: list[str] | None = option(None, "sparse features the VM sees (default: all)")
    dense: list[str] | None = option(None, "dense features the VM sees (default: all)")
    traffic: list[int] | None = option(
        None, "[k, n]: the VM's traffic is the examples with key % n == k (default: all)"
    )
    variants: list[str] = option(
        help="distillation variants to train: none | plain | aux | aux_sa",
        factory=lambda: list(KD_MODES),
    )

    def validate(self, who: str) -> None:
        self.model.validate()
        if self.model.model == "fwfm":
            raise ConfigError(f"{who}: model fwfm has no top MLP to put the auxiliary head on")
        if not self.variants:
            raise ConfigError(f"{who}: variants is empty")
        for v in self.variants:
            check_kd(v)
        if self.traffic is not None:
            if len(self.traffic) != 2 or not 0 <= self.traffic[0] < self.traffic[1]:
                raise ConfigError(
                    f"{who}: traffic must be [k, n] with 0 <= k < n, got {self.traffic}"
                )


@dataclass
class ExFMConfig:
    """Everything one ``exfm run`` does: stream, FM, DAS, VMs, distillation, optimisation."""

    seed: int = option(0, "seed of the models' initialisation (the stream has its own)")
    student_start: int = option(
        0, "windows of history only the FM trains on before the VMs start", minimum=0
    )
    stream: StreamConfig = option(help="the time-ordered stream", factory=StreamConfig)
    teacher: TeacherConfig = option(help="the foundation model", factory=TeacherConfig)
    augment: AugmentConfig = option(help="the data augmentation service", factory=AugmentConfig)
    distill: DistillConfig = option(
        help="distillation loss and student adapter", factory=DistillConfig
    )
    optim: OptimConfig = option(help="the VMs' optimisation", factory=OptimConfig)
    students: list[StudentConfig] = option(
        help="the vertical models (>= 1; >= 2 for 1-to-N)",
        factory=lambda: [
            StudentConfig(name="vm_dlrm"),
            StudentConfig(
                name="vm_dcn",
                model=ModelConfig(
                    model="dcn",
                    embedding_dim=8,
                    bottom=[32],
                    top=[32, 16],
                    cross_layers=2,
                    cross_rank=8,
                ),
            ),
        ],
    )

    def validate(self) -> None:
        if self.student_start < 0:
            raise ConfigError(f"--student-start must be >= 0, got {self.student_start}")
        self.stream.validate()
        self.teacher.validate()
        self.augment.validate()
        self.distill.validate()
        self.optim.validate("students")
        if not self.students:
            raise ConfigError("students: name at least one vertical model")
        names = [s.name for s in self.students]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"students: name {dup[0]!r} is used twice")
        for i, s in enumerate(self.students):
            s.validate(f"students[{i}] ({s.name})")


def _from_dict(cls: type, data: Any, path: str, source: str) -> Any:
    """``cls(**data)`` with nested dataclasses (and lists of them) built the same way; an
    unknown key or a non-mapping is a ``ConfigError`` naming the file and the key's path."""
    here = f"{source}: {path or 'top level'}"
    if not isinstance(data, dict):
        raise ConfigError(f"{here}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {sub!r}; known: {', '.join(fields)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value, sub, source)
        elif typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            if not isinstance(value, list):
                raise ConfigError(f"{source}: {sub}: expected a list")
            item = typing.get_args(hint)[0]
            kwargs[key] = [_from_dict(item, v, f"{sub}[{i}]", source) for i, v in enumerate(value)]
        else:
            kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], source: str = "config") -> ExFMConfig:
    """An ``ExFMConfig`` from plain data (a parsed YAML document), validated."""
    cfg = _from_dict(ExFMConfig, data or {}, "", source)
    cfg.validate()
    return cfg


def load_config(path: str | Path) -> ExFMConfig:
    """Read and validate an ExFM YAML config; errors name the file and the key."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file")
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    return config_from_dict(doc, str(p))
