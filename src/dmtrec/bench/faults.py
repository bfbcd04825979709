"""``dmtrec bench faults``: does a run survive a lost rank, and how long does it take to recover?

One uninterrupted run, then ``runs`` runs of the same job in which one rank, drawn at random,
SIGKILLs itself after a training step drawn at random (``DMTREC_FAULT``, first attempt only).
Every faulted run has ``--max-restarts 1``: the local launcher sees the rank die, restarts all
ranks, and they resume from the newest complete checkpoint. Per run the JSON records the killed
rank and step, the step it resumed from, whether it finished, whether its final parameters
(``OUT/model/weights.pt``, gathered unsharded) and every loss equal the uninterrupted run's bit
for bit, and the times: ``detect_s`` (kill -> the launcher has judged the failure: the other
ranks' errors are awaited a few seconds), ``restart_s`` (kill -> the restarted run's first
training step, i.e. new processes, imports, rendezvous, build, checkpoint load and the
throw-away steps), to be read against ``uninterrupted_startup_s`` (launch -> first step of
the uninterrupted run: the same minus detection and checkpoint). Writes
``OUT/bench_faults.json``.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from dmtrec.data import DataConfig
from dmtrec.models import ModelConfig
from dmtrec.train.trainer import TrainConfig


def _configs(out: Path, parallel: str, hosts: int, ranks_per_host: int, steps: int,
             checkpoint_every: int, seed: int, max_restarts: int):  # fmt: skip
    data = DataConfig(
        synthetic=dict(
            num_sparse=8, num_groups=2, table_size=100, num_train=4000, num_valid=0, num_test=500
        )
    )
    model = ModelConfig(
        model="dlrm",
        num_towers=2 if parallel == "dmt" else 0,
        partition="sequential",
        tm="dlrm" if parallel == "dmt" else "identity",
    )
    train = TrainConfig(
        epochs=1000, early_stop_patience=0, batch_size=32, max_steps=steps,
        checkpoint_every=checkpoint_every, out=str(out), progress=False, log_every=0,
        parallel=parallel, hosts=hosts, ranks_per_host=ranks_per_host, seed=seed,
        max_restarts=max_restarts, timeout=120,
    )  # fmt: skip
    return data, model, train


def _same_parameters(a: Path, b: Path) -> bool:
    wa = torch.load(a / "model" / "weights.pt")
    wb = torch.load(b / "model" / "weights.pt")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _read(out: Path, name: str) -> Any:
    return json.loads((out / name).read_text())


def bench_faults(
    out: str,
    *,
    runs: int = 10,
    parallel: str = "dmt",
    hosts: int = 2,
    ranks_per_host: int = 2,
    steps: int = 12,
    checkpoint_every: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); return and write its JSON."""
    from dmtrec.train.run import run_train

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    world = hosts * ranks_per_host
    rng = random.Random(seed)
    ref = root / "uninterrupted"
    shutil.rmtree(ref, ignore_errors=True)
    t0, wall0 = time.perf_counter(), time.time()
    m0 = run_train(
        *_configs(ref, parallel, hosts, ranks_per_host, steps, checkpoint_every, seed, 0)
    )
    reference_s = time.perf_counter() - t0
    startup_s = m0["first_step_time"] - wall0  # launch -> first step, no checkpoint to load
    records = []
    for i in range(runs):
        rank, step = rng.randrange(world), rng.randint(1, steps - 1)
        run_dir = root / f"run{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        log = run_dir / "fault.json"
        os.environ.update(DMTREC_FAULT=f"step:{rank}:{step}", DMTREC_FAULT_LOG=str(log))
        rec: dict[str, Any] = {"killed_rank": rank, "killed_after_step": step}
        t0 = time.perf_counter()
        try:
            metrics = run_train(
                *_configs(
                    run_dir, parallel, hosts, ranks_per_host, steps, checkpoint_every, seed, 1
                )  # fmt: skip
            )
            rec["finished"] = True
        except Exception as e:  # noqa: BLE001 - a benchmark records a failed run and goes on
            rec.update(finished=False, error=f"{type(e).__name__}: {e}".splitlines()[0])
            metrics = {}
        finally:
            os.environ.pop("DMTREC_FAULT", None)
            os.environ.pop("DMTREC_FAULT_LOG", None)
        rec["wall_s"] = time.perf_counter() - t0
        killed = json.loads(log.read_text()) if log.exists() else None
        restarts = metrics.get("restarts", [])
        if restarts and killed:
            r = restarts[-1]
            rec.update(
                reported_rank=r["rank"],
                resumed_from_step=r["from_step"],
                detect_s=r["failed_at"] - killed["time"],
                restart_s=metrics["first_step_time"] - killed["time"],
            )
        if rec["finished"]:
            rec["same_parameters"] = _same_parameters(ref, run_dir)
            rec["same_losses"] = _read(ref, "losses.json") == _read(run_dir, "losses.json")
            rec["same_global_losses"] = _read(ref, "global_losses.json") == _read(
                run_dir, "global_losses.json"
            )
        records.append(rec)
        print(f"[bench faults] run {i}: {json.dumps(rec)}", flush=True)

    def summary(key: str) -> dict[str, float] | None:
        values = [r[key] for r in records if key in r]
        if not values:
            return None
        return {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }

    src = Path(__file__).resolve().parent
    git = subprocess.run(
        ["git", "-C", str(src), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    result = {
        "what": "runs with one rank SIGKILLed after a random step, restarted from the newest "
        "checkpoint (--max-restarts 1), compared with the uninterrupted run",
        "config": dict(
            runs=runs,
            parallel=parallel,
            hosts=hosts,
            ranks_per_host=ranks_per_host,
            steps=steps,
            checkpoint_every=checkpoint_every,
            seed=seed,
        ),  # fmt: skip
        "finished": sum(r["finished"] for r in records),
        "same_parameters": sum(bool(r.get("same_parameters")) for r in records),
        "same_losses": sum(bool(r.get("same_losses")) for r in records),
        "reported_the_killed_rank": sum(
            r.get("reported_rank") == r["killed_rank"] for r in records
        ),
        "detect_s": summary("detect_s"),
        "restart_s": summary("restart_s"),
        "uninterrupted_wall_s": reference_s,
        "uninterrupted_startup_s": startup_s,
        "runs": records,
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1min_at_end": os.getloadavg()[0],
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    if git.returncode == 0:
        result["dmtrec_git"] = git.stdout.strip()
    (root / "bench_faults.json").write_text(json.dumps(result, indent=1))
    return result
