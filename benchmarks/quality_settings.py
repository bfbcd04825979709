"""dmtrec train settings on the real-data quality benchmark's splits (issue 13, defaults).

Each setting (a string of ``dmtrec train`` options) is trained on every seed of every data set
of ``dmtrec.bench.quality`` (same cached CSV splits, same per-run records and reuse); the valid
AUC at the trainer's best valid point is what a setting is chosen on, test is reported beside
it. Writes ``OUT/quality_settings.json``::

    {NAME: {SETTING: {"valid_auc", "auc_mean", "auc_std", "logloss_mean", "seconds",
                      "best_epochs", "failed"}}}

Example (the evidence for the defaults in benchmarks/results/bench_quality_settings.json)::

    python benchmarks/quality_settings.py --out runs/quality_settings --seeds 3 \\
        --setting "--model dlrm --epochs 20 --early-stop-patience 2" \\
        --setting "--model wukong --epochs 20 --early-stop-patience 2"
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from dmtrec.bench import quality as q


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--datasets", default=",".join(q.DATASETS))
    p.add_argument("--setting", action="append", required=True, help="dmtrec train options")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    cfg = q.QualityConfig(out=args.out, datasets=args.datasets, seeds=args.seeds)
    cfg.validate()
    bench = q._Bench(cfg)
    result: dict[str, dict[str, dict]] = {}
    for name in cfg.dataset_list():
        data = q.prepare(name, cfg)
        for setting in args.setting:
            tag = "sweep_" + "".join(c if c.isalnum() else "_" for c in setting)[:90]
            runs = [bench.record(data, tag, seed, setting) for seed in range(args.seeds)]
            summary = {k: v for k, v in q.summarize_runs(runs).items() if k != "runs"}
            ok = [r for r in runs if "error" not in r]
            if ok:
                summary["valid_auc"] = statistics.fmean(r.get("valid_auc") or 0.0 for r in ok)
                summary["best_epochs"] = [r.get("best_epoch") for r in ok]
            result.setdefault(name, {})[setting] = summary
            print(name, f"[{setting}]", json.dumps(summary), flush=True)
            Path(args.out, "quality_settings.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
