"""The demo over several seeds: test-split mean and standard deviation per variant.

Every seed continues from the same cached pretrained checkpoint (pretraining
has its own fixed seed); the seed changes the continued-training batches and
partner draws. Runs whose ``WORK/seed{N}/results.json`` already exists are
reused, so the command can be resumed.

    .venv/bin/python benchmarks/demo_seeds.py --seeds 0,1,2 [--work runs/demo_seeds]
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from helip.app.demo import VARIANTS, run_demo
from helip.io import save_json, save_text
from _provenance import provenance

METRICS = [("zeroshot_mean", lambda r: r["zeroshot_mean"]), ("linear_probe", lambda r: r["linear_probe"])] + \
    [(k, (lambda k: lambda r: r["retrieval"][k])(k)) for k in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", default="runs/demo_seeds")
    ap.add_argument("--out", default="benchmarks/results/demo_seeds.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    per_seed = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        path = Path(args.work) / f"seed{seed}" / "results.json"
        if not path.is_file():
            run_demo(path.parent, seed=seed)
        per_seed[seed] = json.loads(path.read_text())
    summary = {}
    for v in VARIANTS:
        summary[v] = {}
        for name, get in METRICS:
            vals = np.array([get(r[v]) for r in per_seed.values()])
            summary[v][name] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                                "per_seed": vals.tolist()}
        tasks = per_seed[next(iter(per_seed))][v]["zeroshot"]
        summary[v]["zeroshot"] = {t: float(np.mean([r[v]["zeroshot"][t] for r in per_seed.values()])) for t in tasks}
    save_json(args.out, {"seeds": list(per_seed), "split": "test", "summary": summary,
                         "provenance": provenance(args)})
    lines = ["| variant | " + " | ".join(n for n, _ in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for v in VARIANTS:
        cells = [f"{100 * summary[v][n]['mean']:.1f} ± {100 * summary[v][n]['std']:.1f}" for n, _ in METRICS]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    tasks = list(summary[VARIANTS[0]]["zeroshot"])
    lines += ["", "| variant | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for v in VARIANTS:
        lines.append(f"| {v} | " + " | ".join(f"{100 * summary[v]['zeroshot'][t]:.1f}" for t in tasks) + " |")
    text = "\n".join(lines) + "\n"
    save_text(Path(args.out).with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
