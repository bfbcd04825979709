"""The command line: one-line errors naming the option/file, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmtrec.cli import main
from dmtrec.errors import ConfigError
from dmtrec.parallel.sptt import assign_towers
from dmtrec.parallel.topology import Topology


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dmtrec: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--towers", "30"], "--towers 30 exceeds the number of sparse features (26)"),
        (["--towers", "0"], "--towers must be >= 1"),
        (
            ["--towers", "4", "--tm", "dlrm", "--cr", "200"],
            "--cr 200 is larger than a tower of 7 features x 16 dims (112 numbers per sample)",
        ),
        (["--towers", "2", "--tm", "magic"], "--tm: unknown 'magic'; choose from identity"),
        (
            ["--parallel", "dmt", "--hosts", "2", "--ranks-per-host", "2"],
            "--parallel dmt needs --towers",
        ),
        (
            ["--parallel", "dmt", "--towers", "1", "--hosts", "2", "--ranks-per-host", "1"],
            "--towers 1 is fewer than --hosts 2",
        ),
        (["--parallel", "fast"], "--parallel: unknown 'fast'"),
        (["--model", "gbdt"], "--model: unknown 'gbdt'; choose from dlrm"),
        (
            ["--data", "criteo", "--train", "/nonexistent/day_0.gz"],
            "/nonexistent/day_0.gz: no such file",
        ),
        (["--data", "csv", "--train", "x.csv"], "needs --label and --sparse"),
        (["--hosts", "2"], "need --parallel baseline or dmt"),
    ],
)
def test_bad_train_options(
    capsys: pytest.CaptureFixture, tmp_path: Path, argv: list[str], message: str
) -> None:
    err = _error(
        capsys, ["train", "--num-train", "100", "--num-test", "100", "--out", str(tmp_path), *argv]
    )
    assert message in err


def test_config_file_values_and_errors(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("epochs: 1\nlearning_rate: 0.1\n")
    assert "bad.yaml: unknown option 'learning_rate'" in _error(
        capsys, ["train", "--config", str(bad_key)]
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: 1\nmodel: [dlrm\n")
    assert "broken.yaml:3:1: invalid YAML" in _error(capsys, ["train", "--config", str(broken)])
    good = tmp_path / "good.yaml"
    good.write_text("model: nope\n")
    # a config value is used (and validated) unless the command line overrides it
    assert "good.yaml: model: unknown 'nope'; choose from dlrm" in _error(
        capsys, ["train", "--config", str(good)]
    )


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("epochs: abc\n", "epochs: expected an integer, got 'abc'"),
        ("epochs: 1.5\n", "epochs: expected an integer, got 1.5"),
        ("dense: 5\n", "dense: expected a string, got 5"),
        ("lr: .nan\n", "lr: expected a number, got nan"),
        ("towers: [1, 2]\n", "towers: expected a tower count or a towers.json path"),
        ("batch-size: 0\n", "batch-size: must be >= 1, got 0"),
    ],
)
def test_config_values_are_typed_by_their_option(
    capsys: pytest.CaptureFixture, tmp_path: Path, yaml_text: str, message: str
) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml_text)
    assert f"run.yaml: {message}" in _error(capsys, ["train", "--config", str(cfg)])


def test_config_towers_count_is_used(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    # YAML `towers: 4` is a tower count (was an internal AttributeError)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("towers: 30\n")
    assert "--towers 30 exceeds the number of sparse features (26)" in _error(
        capsys, ["train", "--config", str(cfg), "--num-train", "100", "--out", str(tmp_path)]
    )


def test_help_shows_every_option_with_default(capsys: pytest.CaptureFixture) -> None:
    import re

    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    # every option's help block ends with its default
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    opts = [b for b in blocks if b.startswith("--")]
    assert len(opts) > 50
    missing = [b.split()[0] for b in opts if "(default:" not in " ".join(b.split())]
    assert missing == []


def test_towers_json_errors(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    bad = tmp_path / "towers.json"
    bad.write_text('{"towers": [["C1", "C2"], ')
    assert "towers.json:1:" in _error(capsys, ["train", "--towers", str(bad)])
    unknown = tmp_path / "t2.json"
    unknown.write_text('{"towers": [["C1", "Z9"]]}')
    err = _error(
        capsys,
        [
            "train",
            "--num-train",
            "10",
            "--num-test",
            "10",
            "--towers",
            str(unknown),
            "--out",
            str(tmp_path),
        ],
    )
    assert "unknown feature(s): Z9" in err


def test_topology_from_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    t = Topology.from_env()
    assert (t.hosts, t.ranks_per_host) == (2, 4)
    assert t.peer_ranks(1) == [1, 5] and t.host_ranks(1) == [4, 5, 6, 7]
    assert t.link(0, 3) == "intra" and t.link(3, 4) == "cross" and t.link(2, 2) == "local"
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ConfigError, match="LOCAL_WORLD_SIZE=4 .* does not divide WORLD_SIZE=6"):
        Topology.from_env()


def test_assign_towers_balances_hosts() -> None:
    assert assign_towers([4, 1, 3], 2) == [0, 1, 1]
    assert sorted(assign_towers([2, 2, 2, 2], 2)) == [0, 0, 1, 1]
    with pytest.raises(ConfigError):
        assign_towers([3], 2)


def _pair_count_ari(towers: list[list[str]], planted: dict[str, int]) -> float:
    """Hubert-Arabie ARI from the contingency table (the reference the report must match)."""
    from math import comb

    names = sorted(planted)
    tower = {f: k for k, t in enumerate(towers) for f in t}
    pairs = [(tower[f], planted[f]) for f in names]
    cells: dict = {}
    for pair in pairs:
        cells[pair] = cells.get(pair, 0) + 1
    rows: dict = {}
    cols: dict = {}
    for (a, b), n in cells.items():
        rows[a] = rows.get(a, 0) + n
        cols[b] = cols.get(b, 0) + n
    index = sum(comb(n, 2) for n in cells.values())
    ra, cb = sum(comb(n, 2) for n in rows.values()), sum(comb(n, 2) for n in cols.values())
    expected = ra * cb / comb(len(names), 2)
    return (index - expected) / ((ra + cb) / 2 - expected)


def test_partition_command_writes_towers_json(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    import json

    small = [
        "--num-sparse",
        "8",
        "--num-groups",
        "2",
        "--rows",
        "20",
        "--num-train",
        "2000",
        "--num-test",
        "0",
        "--num-valid",
        "0",
    ]
    from dmtrec.data import DataConfig, load_data

    spec = load_data(
        DataConfig(synthetic=dict(num_sparse=8, num_groups=2, table_size=20, num_train=10,
                                  num_test=0, num_valid=0))
    ).spec  # fmt: skip
    planted = dict(zip(spec.sparse, spec.groups))
    for method in ("sequential", "random", "learned"):
        out = tmp_path / method
        assert (
            main(
                [
                    "partition",
                    *small,
                    "--towers",
                    "2",
                    "--method",
                    method,
                    "--probe-steps",
                    "20",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        doc = json.loads((out / "towers.json").read_text())
        assert doc["method"] == method and len(doc["towers"]) == 2
        assert sorted(f for t in doc["towers"] for f in t) == sorted(f"C{i}" for i in range(1, 9))
        assert doc["cost_per_tower"] == [4.0, 4.0] and doc["imbalance"] == 1.0
        assert doc["ari"] == pytest.approx(_pair_count_ari(doc["towers"], planted), abs=1e-12)
    assert (tmp_path / "learned" / "interaction.png").stat().st_size > 1000
    assert "towers" in (tmp_path / "learned" / "report.txt").read_text()
    capsys.readouterr()
    assert "--towers 9 must be between 1 and" in _error(
        capsys, ["partition", *small, "--towers", "9", "--out", str(tmp_path)]
    )
    assert "--method: unknown 'kmeans'" in _error(
        capsys, ["partition", *small, "--towers", "2", "--method", "kmeans", "--out", str(tmp_path)]
    )


@pytest.mark.parametrize("opt", ["--cross-mbit", "--ratio", "--queue-ms"])
def test_bench_dmt_rejects_nonpositive_link_settings(
    opt: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = _error(capsys, ["bench", "dmt", opt, "0", "--out", str(tmp_path)])
    assert err == f"dmtrec: error: {opt} must be > 0, got 0"


@pytest.mark.parametrize("opt", ["--cross-latency-ms", "--intra-latency-ms"])
def test_bench_dmt_rejects_negative_latency(
    opt: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = _error(capsys, ["bench", "dmt", opt, "-1", "--out", str(tmp_path)])
    assert err == f"dmtrec: error: {opt} must be >= 0, got -1"
