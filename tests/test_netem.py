"""Emulated hosts: namespaces exist while used and are removed on success, error and failure."""

from __future__ import annotations

import subprocess

import pytest

from dmtrec.data import DataConfig
from dmtrec.emulate.launch import spawn_in_hosts
from dmtrec.emulate.netns import EmulatedHosts, LinkSpec, available
from dmtrec.errors import DmtrecError
from dmtrec.models import ModelConfig

from equivalence import StepSetup, one_step

pytestmark = pytest.mark.skipif(
    available() is not None, reason=f"no network namespaces: {available()}"
)


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_hosts_are_shaped_and_removed_after_an_error() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with EmulatedHosts(3, LinkSpec(cross_mbit=50)) as hosts:
            names = _namespaces()
            assert all(ns in names for ns in hosts.namespaces)
            qdisc = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    hosts.namespaces[1],
                    "tc",
                    "qdisc",
                    "show",
                    "dev",
                    hosts.ifnames[1],
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert "tbf" in qdisc and "50Mbit" in qdisc
            raise RuntimeError("boom")
    assert not hosts.exists()
    assert not any(ns in _namespaces() for ns in hosts.namespaces)


@pytest.mark.slow
def test_failed_distributed_run_tears_down() -> None:
    """A run whose workers fail (a bad tower partition) reports the error and leaves nothing."""
    bad = StepSetup(
        DataConfig(synthetic=dict(num_sparse=4, num_train=32, num_test=0, num_valid=0)),
        ModelConfig(towers=[["C1", "C2"], ["C3", "Z9"]]),
        hosts=2,
        ranks_per_host=1,
        batch_size=4,
    )
    with pytest.raises(DmtrecError, match="unknown feature"):
        with EmulatedHosts(2, LinkSpec()) as hosts:
            spawn_in_hosts(one_step, (bad,), hosts, 1)
    assert not hosts.exists()
