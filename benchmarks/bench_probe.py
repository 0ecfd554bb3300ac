"""Linear probe C sweep: cold fits (every C from zero) vs warm starts along the C path, side by side.

    .venv/bin/python benchmarks/bench_probe.py                       # 3,000 x 64 features, ~1-3 min on 2 cores
    .venv/bin/python benchmarks/bench_probe.py --n-train 500 --reps 1  # a quick look

Features: --classes Gaussian clusters in --dim dimensions, L2-normalised like CLIP image
features (class means at distance --separation, unit noise), --n-train training images
(--val-fraction of them held out for choosing C, as ``helip eval`` does when a dataset has
no val split) and --n-test test images, seeded. Both variants run ``fit_linear_probe`` with
the default sweep (decades 1e-6..1e6, 3 refinement steps) on the same arrays:

    cold   ProbeConfig(warm_start=False, widen_decades=0): every fit from zero, the sweep
           kept inside [c_min, c_max] (what the probe did before warm starts)
    warm   ProbeConfig() (warm_start=True): each fit from the nearest C's solution, the
           sweep widened at an edge holding the best C (the probe now)

--reps rounds, the two variants alternating (cold first in even rounds) so machine load
hits both alike; reported per variant: median seconds, chosen C, validation and test
accuracy, fits; and the median over rounds of cold/warm seconds. JSON (atomic) to --out.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from helip.evaluate.linear_probe import ProbeConfig, fit_linear_probe, holdout_split
from helip.io import save_json


def features(n: int, dim: int, classes: int, separation: float, rng: np.random.Generator):
    means = rng.normal(size=(classes, dim))
    means *= separation / np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.integers(0, classes, size=n)
    x = means[y] + rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--separation", type=float, default=3.0)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/bench_probe.json")
    a = ap.parse_args(argv)

    rng = np.random.default_rng(a.seed)
    x, y = features(a.n_train + a.n_test, a.dim, a.classes, a.separation, rng)
    trx, try_, tex, tey = x[:a.n_train], y[:a.n_train], x[a.n_train:], y[a.n_train:]
    tr, va = holdout_split(try_, a.val_fraction, a.seed)
    variants = {"cold": ProbeConfig(warm_start=False, widen_decades=0), "warm": ProbeConfig()}
    runs = {v: [] for v in variants}
    for r in range(a.reps):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for v in order:
            t0 = time.perf_counter()
            res = fit_linear_probe(trx[tr], try_[tr], trx[va], try_[va], tex, tey, cfg=variants[v])
            res["seconds"] = time.perf_counter() - t0
            runs[v].append(res)
            print(f"round {r} {v:>4}: {res['seconds']:7.2f}s  C={res['C']:.3g}  val {res['val_accuracy']:.4f}  "
                  f"test {res['accuracy']:.4f}  fits {res['n_fits']}", flush=True)
    ratios = [c["seconds"] / w["seconds"] for c, w in zip(runs["cold"], runs["warm"])]
    summary = {v: {"median_seconds": round(statistics.median(x["seconds"] for x in rs), 3),
                   "C": rs[0]["C"], "val_accuracy": rs[0]["val_accuracy"], "test_accuracy": rs[0]["accuracy"],
                   "n_fits": rs[0]["n_fits"], "C_at_edge": rs[0].get("C_at_edge")} for v, rs in runs.items()}
    summary["cold_over_warm_seconds_median"] = round(statistics.median(ratios), 2)
    print(f"cold/warm seconds (median of {a.reps} rounds): {summary['cold_over_warm_seconds_median']}x")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = None
    import sklearn

    save_json(a.out, {
        "benchmark": "bench_probe", "commit": commit, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "options": vars(a),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "sklearn": sklearn.__version__, "note": "shared 2-core machine, other jobs running"},
        "summary": summary, "runs": runs})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
