"""Every bad input of docs/cli.md's table gets its exact one-line message and exit code 2.

Each case runs ``dmtrec.cli.main([...])`` in this process and compares the whole of stderr
with the message the table documents (no ``internal error``, no traceback, nothing else).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from dmtrec.cli import main

SMALL = ["--num-sparse", "4", "--num-groups", "2", "--synthetic-table-size", "30", "--no-progress"]
SYN = [*SMALL, "--num-train", "600", "--num-valid", "0", "--num-test", "200"]


def criteo_line(i: int, label: str = "") -> str:
    """A well-formed Criteo row (label, 13 ints, 26 hex ids); ``label`` overrides the label."""
    dense = [str((i * 7 + j) % 50) for j in range(13)]
    cats = [f"{(i * 31 + j) * 0x01000193 & 0xFFFFFFFF:08x}" for j in range(26)]
    return "\t".join([label or str(i % 2), *dense, *cats]) + "\n"


def criteo_file(path: Path, n: int, label: str = "") -> str:
    path.write_text("".join(criteo_line(i, label) for i in range(n)))
    return str(path)


def criteo(tmp: Path, train: str, *extra: str) -> list[str]:
    test = criteo_file(tmp / "test.tsv", 50)
    return ["--data", "criteo", "--hash-size", "50", "--train", train, "--test", test, *extra]


def mkdir_error(path: str) -> str:
    """The strerror this machine gives for creating ``path`` (differs for root and users)."""
    try:
        os.mkdir(path)
    except OSError as e:
        return e.strerror
    os.rmdir(path)
    raise AssertionError(f"{path} is writable here")


# (case id, builder: tmp dir -> (argv after "train" without --out, exact stderr))
Case = Callable[[Path], tuple[list[str], str]]
CASES: dict[str, Case] = {
    "hosts 0": lambda t: (
        [*SYN, "--hosts", "0"],
        "dmtrec: error: train: argument --hosts: must be >= 1, got 0",
    ),
    "ranks-per-host -1": lambda t: (
        [*SYN, "--ranks-per-host", "-1"],
        "dmtrec: error: train: argument --ranks-per-host: must be >= 1, got -1",
    ),
    "lr nan": lambda t: (
        [*SYN, "--lr", "nan"],
        "dmtrec: error: train: argument --lr: expected a number, got nan",
    ),
    "lr inf": lambda t: (
        [*SYN, "--lr", "inf"],
        "dmtrec: error: --lr must be a finite number > 0, got inf",
    ),
    "sparse-lr inf": lambda t: (
        [*SYN, "--sparse-lr", "inf"],
        "dmtrec: error: --sparse-lr must be a finite number > 0, got inf",
    ),
    "lr 0": lambda t: (
        [*SYN, "--lr", "0"],
        "dmtrec: error: --lr must be a finite number > 0, got 0.0",
    ),
    "epochs 0": lambda t: (
        [*SYN, "--epochs", "0"],
        "dmtrec: error: train: argument --epochs: must be >= 1, got 0",
    ),
    "num-train 0": lambda t: (
        [*SMALL, "--num-train", "0"],
        "dmtrec: error: --num-train 0: no training rows; it must be >= 1",
    ),
    "no evaluation split (synthetic)": lambda t: (
        [*SMALL, "--num-train", "100", "--num-valid", "0", "--num-test", "0"],
        "dmtrec: error: --num-valid and --num-test are both 0: no data to evaluate on",
    ),
    "no evaluation split (files)": lambda t: (
        ["--data", "criteo", "--train", criteo_file(t / "train.tsv", 10), "--no-progress"],
        "dmtrec: error: no --valid or --test data to evaluate on",
    ),
    "data file is a directory": lambda t: (
        criteo(t, str(t)),
        f"dmtrec: error: --train {t}: is a directory, expected a data file",
    ),
    "data file missing": lambda t: (
        criteo(t, str(t / "day_0.gz")),
        f"dmtrec: error: --train {t / 'day_0.gz'}: no such file",
    ),
    "every train row bad": lambda t: (
        criteo(t, criteo_file(t / "train.tsv", 20, label="2")),
        f"dmtrec: error: --train {t / 'train.tsv'}: no training rows: 20 bad rows skipped and "
        f"none good (reasons in {t / 'out' / 'skipped_rows.jsonl'})",
    ),
    "one 10 MB line without tabs": lambda t: (
        criteo(t, _long_line(t / "train.tsv")),
        f"dmtrec: error: --train {t / 'train.tsv'}: no training rows: 1 bad row skipped and "
        f"none good (reasons in {t / 'out' / 'skipped_rows.jsonl'})",
    ),
    "constant labels": lambda t: (
        criteo(t, criteo_file(t / "train.tsv", 300, label="0"), "--batch-size", "64"),
        f"dmtrec: error: --train {t / 'train.tsv'}: every label of all 300 rows is 0; a click "
        "model needs both classes (check the label column and the train files)",
    ),
    "loss diverges": lambda t: (
        [*SYN, "--lr", "1e30", "--sparse-lr", "1e30"],
        "dmtrec: error: step 2: training loss is nan (diverged); lower --lr (1e+30) or "
        "--sparse-lr (1e+30)",
    ),
    "too many bad rows": lambda t: (
        criteo(t, criteo_file(t / "train.tsv", 5, label="x"), "--max-bad-rows", "2"),
        f"dmtrec: error: {t / 'train.tsv'}:3: 3 bad rows, more than --max-bad-rows 2 allows "
        "(last: col 1 (label): 'x' is not 0 or 1); fix the input or raise --max-bad-rows",
    ),
    "timeout inf": lambda t: (
        [*SYN, "--timeout", "inf"],
        "dmtrec: error: --timeout must be a finite number of seconds > 0, got inf",
    ),
    "max-restarts -1": lambda t: (
        [*SYN, "--max-restarts", "-1"],
        "dmtrec: error: train: argument --max-restarts: must be >= 0, got -1",
    ),
    "resume without a checkpoint": lambda t: (
        [*SYN, "--resume"],
        f"dmtrec: error: --resume: no complete checkpoint in {t / 'out' / 'checkpoints'}",
    ),
    "YAML epochs: abc": lambda t: (
        [*SYN, "--config", _yaml(t, "epochs: abc")],
        f"dmtrec: error: {t / 'c.yaml'}: epochs: expected an integer, got 'abc'",
    ),
    "YAML epochs: 1.5": lambda t: (
        [*SYN, "--config", _yaml(t, "epochs: 1.5")],
        f"dmtrec: error: {t / 'c.yaml'}: epochs: expected an integer, got 1.5",
    ),
    "YAML dense: 5": lambda t: (
        [*SYN, "--config", _yaml(t, "dense: 5")],
        f"dmtrec: error: {t / 'c.yaml'}: dense: expected a string, got 5",
    ),
    "YAML hosts: 0": lambda t: (
        [*SYN, "--config", _yaml(t, "hosts: 0")],
        f"dmtrec: error: {t / 'c.yaml'}: hosts: must be >= 1, got 0",
    ),
}


def _long_line(path: Path) -> str:
    path.write_text("x" * (10 << 20) + "\n")
    return str(path)


def _yaml(tmp: Path, text: str) -> str:
    (tmp / "c.yaml").write_text(text + "\n")
    return str(tmp / "c.yaml")


def run_cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_its_one_line_message(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, message = CASES[case](tmp_path)
    code, err = run_cli(capsys, ["train", *argv, "--out", str(tmp_path / "out")])
    assert "internal error" not in err
    assert (code, err) == (2, message)


def test_out_that_is_a_file_or_under_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "metrics.json"
    f.write_text("{}")
    for out in (f, f / "run"):
        code, err = run_cli(capsys, ["train", *SYN, "--out", str(out)])
        assert (code, err) == (
            2,
            f"dmtrec: error: --out {out}: is a file or under a file, expected a directory",
        )


def test_out_that_cannot_be_created(capsys: pytest.CaptureFixture[str]) -> None:
    out = "/sys/dmtrec-cannot-write-here"  # sysfs refuses new directories, even to root
    reason = mkdir_error(out)
    code, err = run_cli(capsys, ["train", *SYN, "--out", out])
    assert (code, err) == (2, f"dmtrec: error: --out {out}: cannot create the directory ({reason})")


def test_skipped_rows_go_to_a_jsonl_and_a_summary_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two bad rows among good ones: the run trains, prints one summary line, and writes
    file, line, column and reason of each to OUT/skipped_rows.jsonl."""
    lines = [criteo_line(i) for i in range(40)]
    lines[6] = criteo_line(6, label="7")
    cols = lines[20].split("\t")
    cols[15] = "zz"  # C2: column 16
    lines[20] = "\t".join(cols)
    train = tmp_path / "train.tsv"
    train.write_text("".join(lines))
    out = tmp_path / "out"
    code = main(["train", *criteo(tmp_path, str(train), "--batch-size", "16"), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    records = [json.loads(x) for x in (out / "skipped_rows.jsonl").read_text().splitlines()]
    assert records == [
        {"split": "train", "file": str(train), "line": 7, "column": 1, "column_name": "label",
         "reason": "'7' is not 0 or 1"},
        {"split": "train", "file": str(train), "line": 21, "column": 16, "column_name": "C2",
         "reason": "'zz' is not a hex id"},
    ]  # fmt: skip
    summary = [x for x in captured.out.splitlines() if x.startswith("skipped ")]
    assert summary == [
        f"skipped 2 bad rows (train 2); the first 2 with file, line, column and reason in "
        f"{out / 'skipped_rows.jsonl'}"
    ]
    assert json.loads((out / "metrics.json").read_text())["skipped_rows"] == 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-step run (its final checkpoint: step 3) to resume with other options."""
    out = tmp_path_factory.mktemp("trained") / "out"
    assert main(["train", *SYN, "--epochs", "1", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    "option, now, then",
    [
        (["--embedding-dim", "8"], "--embedding-dim is 8", "16"),
        (["--model", "dcn"], "--model is dcn", "dlrm"),
        (["--top", "32"], "--top is 32", "64,32"),
        (["--sparse-optimizer", "sgd"], "--sparse-optimizer is sgd", "rowwise_adagrad"),
        (["--batch-size", "128"], "the global batch (--batch-size x ranks) is 128", "256"),
    ],
)
def test_resume_with_an_option_that_changes_the_parameters(
    trained: Path,
    option: list[str],
    now: str,
    then: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--resume of a checkpoint written with another --model, --embedding-dim, ...: one line
    naming the option, its value now and in the checkpoint."""
    capsys.readouterr()
    code, err = run_cli(
        capsys, ["train", *SYN, "--epochs", "2", "--resume", *option, "--out", str(trained)]
    )
    ckpt = trained / "checkpoints" / "step-000000003"
    tail = (
        "; its data position counts global batches (use --batch-size 256 on 1 rank)"
        if "batch" in now
        else "; resume with the same value or train into another --out"
    )
    assert (code, err) == (
        2, f"dmtrec: error: --resume: {now} but the checkpoint {ckpt} was written with {then}{tail}"
    )  # fmt: skip
