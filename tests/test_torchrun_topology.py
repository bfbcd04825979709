"""Under torchrun, hosts x ranks-per-host come from WORLD_SIZE / LOCAL_WORLD_SIZE; options that
disagree are one-line errors. Tested without torchrun: its environment is set by monkeypatch."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmtrec.cli import main
from dmtrec.errors import ConfigError
from dmtrec.parallel.topology import Topology

TORCHRUN_2x4 = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "RANK": "5", "LOCAL_RANK": "1"}


@pytest.mark.parametrize(
    "hosts, ranks_per_host",
    [(1, 1), (2, 4), (2, 1), (1, 4)],  # left at the default (1), or equal to the environment
)
def test_options_that_agree_take_the_environment(hosts: int, ranks_per_host: int) -> None:
    t = Topology.from_torchrun(hosts, ranks_per_host, TORCHRUN_2x4)
    assert (t.hosts, t.ranks_per_host) == (2, 4)


@pytest.mark.parametrize(
    "hosts, ranks_per_host, message",
    [
        (4, 1, "--hosts 4 disagrees with torchrun's WORLD_SIZE=8 / LOCAL_WORLD_SIZE=4 = 2 hosts"),
        (8, 1, "--hosts 8 disagrees with torchrun's WORLD_SIZE=8 / LOCAL_WORLD_SIZE=4 = 2 hosts"),
        (4, 2, "--ranks-per-host 2 disagrees with torchrun's LOCAL_WORLD_SIZE=4"),
        (2, 8, "--ranks-per-host 8 disagrees with torchrun's LOCAL_WORLD_SIZE=4"),
    ],
)
def test_options_that_disagree_are_errors(hosts: int, ranks_per_host: int, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        Topology.from_torchrun(hosts, ranks_per_host, TORCHRUN_2x4)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_environment_without_sizes_is_an_error() -> None:
    with pytest.raises(ConfigError, match="WORLD_SIZE/LOCAL_WORLD_SIZE are not set to integers"):
        Topology.from_torchrun(1, 1, {"WORLD_SIZE": "eight"})
    with pytest.raises(ConfigError, match="LOCAL_WORLD_SIZE=3 .* does not divide WORLD_SIZE=8"):
        Topology.from_torchrun(1, 1, {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "3"})


def test_train_under_torchrun_rejects_a_disagreeing_option_before_joining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``dmtrec train`` as torchrun would start it: the mismatch is exit 2 with one line,
    raised before any process group is joined (nothing listens on MASTER_PORT here)."""
    for k, v in TORCHRUN_2x4.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    argv = ["train", "--parallel", "baseline", "--out", str(tmp_path / "run")]
    assert main([*argv, "--hosts", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "dmtrec: error: --hosts 4 disagrees with torchrun's WORLD_SIZE=8 / LOCAL_WORLD_SIZE=4 "
        "= 2 hosts (leave it out under torchrun)"
    )
    assert main([*argv, "--ranks-per-host", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "dmtrec: error: --ranks-per-host 2 disagrees with torchrun's LOCAL_WORLD_SIZE=4 "
        "(leave it out under torchrun)"
    )
