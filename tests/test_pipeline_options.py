"""--pipeline's bad values: the exact one-line messages (no process group needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dmtrec.errors import ConfigError
from dmtrec.train.step import Stepper


def test_unknown_pipeline_is_a_one_line_error() -> None:
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError) as e:
        Stepper(model, opt, torch.device("cpu"), "async")
    assert str(e.value) == "--pipeline: unknown 'async'; choose from none, sparse-dist"


def test_bench_dmt_rejects_an_unknown_pipeline(tmp_path: Path) -> None:
    from dmtrec.bench.dmt import bench_dmt

    with pytest.raises(ConfigError) as e:
        bench_dmt(str(tmp_path), link="none", pipeline="async")
    assert str(e.value) == "--pipeline must be none or sparse-dist, got 'async'"
