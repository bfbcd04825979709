"""Does fp16 embedding communication cost quality? The demo's baseline and DMT runs (2x2 gloo
on loopback, the demo's data and schedule) with ``--comm-precision fp32`` and ``fp16``, over
seeds; writes the test AUC/logloss of each and the fp16 - fp32 differences.

Usage: ``python benchmarks/comm_precision_quality.py OUT.json [SEEDS]`` (default 2 seeds).
Issue 14's goal: fp16 within 0.002 AUC of fp32 on the demo data.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time

from dmtrec.demo import demo_runs
from dmtrec.parallel.launch import quiet_libraries
from dmtrec.train.run import run_train


def main(path: str, seeds: int = 2) -> dict:
    quiet_libraries()  # as the CLI does, here and in the ranks
    rows = []
    with tempfile.TemporaryDirectory(prefix="dmtrec-precision-") as tmp:
        for name, data, model, train in demo_runs(tmp):
            if name == "flat":  # one process: no embedding communication
                continue
            for seed in range(seeds):
                for precision in ("fp32", "fp16"):
                    out = f"{tmp}/{name}_{precision}_{seed}"
                    cfg = dataclasses.replace(
                        train, out=out, seed=seed, comm_precision=precision, count_comm=True
                    )
                    t0 = time.monotonic()
                    m = run_train(data, model, cfg)
                    rows.append(
                        {
                            "run": name,
                            "seed": seed,
                            "comm_precision": precision,
                            "comm_precision_effective": m.get("comm_precision_effective"),
                            "auc": m["auc"],
                            "logloss": m["logloss"],
                            "pooled_cross_host_bytes_per_step": m["comm"][
                                "pooled_cross_host_bytes_per_step"
                            ],
                            "seconds": time.monotonic() - t0,
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    diffs = {}
    for name in ("baseline", "dmt"):
        pairs = [
            (r32["auc"], r16["auc"])
            for r32 in rows
            for r16 in rows
            if r32["run"] == r16["run"] == name
            and r32["seed"] == r16["seed"]
            and (r32["comm_precision"], r16["comm_precision"]) == ("fp32", "fp16")
        ]
        d = [b - a for a, b in pairs]
        diffs[name] = {
            "auc_fp16_minus_fp32": d,
            "max_abs": max(abs(x) for x in d),
            "mean": sum(d) / len(d),
        }
    result = {
        "what": "demo data, 2x2 gloo loopback: fp16 vs fp32 pooled-embedding communication",
        "goal": "fp16 within 0.002 test AUC of fp32",
        "runs": rows,
        "diffs": diffs,
    }
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
