"""The README's CLI examples run as written.

Every ```bash block of README.md is a block of examples: each logical line (backslash
continuations joined, comments dropped) is a ``dmtrec ...`` command. They run in README order
through this venv's ``dmtrec`` (the script next to ``sys.executable``), in one fresh temporary
directory, so their relative ``--out runs/...`` folders land there and a later example can use
an earlier one's output (``partition`` -> ``train --towers runs/part/towers.json``).
``benchmarks/`` is linked into that directory, read-only use, for ``simulate --calibrate``.

Commands that must not run here are fenced ```sh in the README instead, and this runner never
sees them: ``make demo`` / ``make test`` (the whole install and test suite) and ``torchrun``
(a GPU cluster).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DMTREC = Path(sys.executable).parent / "dmtrec"
# The JSON each command writes into --out.
WRITES = {
    ("train",): "metrics.json",
    ("partition",): "towers.json",
    ("demo",): "demo.json",
    ("bench", "dmt"): "bench.json",
    ("bench", "flat"): "bench_flat.json",
    ("bench", "scaling"): "bench_scaling.json",
    ("bench", "partition"): "bench_partition.json",
    ("simulate",): "simulate.json",
    ("evaluate",): "metrics.json",
}
TIMEOUT_S = 600  # per command; a loaded shared box runs them several times slower


def bash_blocks(text: str) -> list[list[str]]:
    """The logical lines of each ```bash block (continuations joined, comments dropped)."""
    blocks = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        lines, current = [], ""
        for raw in body.splitlines():
            line = raw.strip()
            if not current and (not line or line.startswith("#")):
                continue
            current += line[:-1] + " " if line.endswith("\\") else line
            if not line.endswith("\\"):
                lines.append(" ".join(current.split()))
                current = ""
        blocks.append(lines)
    return blocks


def examples() -> list[str]:
    return [cmd for block in bash_blocks(README.read_text()) for cmd in block]


def out_dir(argv: list[str]) -> str:
    assert "--out" in argv, f"README example without --out: {shlex.join(argv)}"
    return argv[argv.index("--out") + 1]


def command(argv: list[str]) -> tuple[str, ...]:
    """``("bench", "dmt")``, ``("train",)``, ...: the (sub)command of a dmtrec argv."""
    return tuple(argv[1:3]) if argv[1] == "bench" else tuple(argv[1:2])


def written_json(argv: list[str]) -> str:
    assert command(argv) in WRITES, f"no known output file for: {shlex.join(argv)}"
    return WRITES[command(argv)]


def test_every_bash_block_is_runnable_examples() -> None:
    """Only ``dmtrec`` commands in ```bash blocks, each with its own --out under runs/."""
    cmds = examples()
    assert cmds, "README.md has no ```bash examples"
    outs = []
    for cmd in cmds:
        argv = shlex.split(cmd)
        assert argv[0] == "dmtrec", f"not a dmtrec command (fence it ```sh): {cmd}"
        written_json(argv)  # a command whose output file this runner knows
        out = out_dir(argv)
        assert out.startswith("runs/") and ".." not in out, f"--out {out} is not under runs/"
        outs.append(out)
    assert len(set(outs)) == len(outs), "two README examples share an --out"
    shown = {command(shlex.split(c)) for c in cmds}
    for want in [("train",), ("partition",), ("bench", "dmt"), ("simulate",)]:
        assert want in shown, f"README has no example of dmtrec {' '.join(want)}"


def test_parser_joins_continuations_and_skips_other_fences() -> None:
    text = (
        "```sh\nmake demo\n```\n"
        "```bash\n# a comment\ndmtrec train \\\n    --out runs/a\n\ndmtrec simulate --out runs/b\n```\n"
        "```\ndmtrec not-this --out runs/c\n```\n"
    )
    assert bash_blocks(text) == [["dmtrec train --out runs/a", "dmtrec simulate --out runs/b"]]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("readme")
    (d / "benchmarks").symlink_to(ROOT / "benchmarks", target_is_directory=True)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("cmd", examples(), ids=lambda c: out_dir(shlex.split(c)))
def test_readme_example_runs(cmd: str, workdir: Path) -> None:
    argv = shlex.split(cmd)
    env = {**os.environ, "DMTREC_DEBUG": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(DMTREC), *argv[1:]],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    took = time.perf_counter() - t0
    assert proc.returncode == 0, f"{cmd}\nexit {proc.returncode}\n{proc.stderr[-4000:]}"
    path = workdir / out_dir(argv) / written_json(argv)
    assert path.is_file(), f"{cmd}: no {path.name} in --out ({took:.0f} s)"
    assert json.loads(path.read_text()), f"{cmd}: {path.name} is empty"
