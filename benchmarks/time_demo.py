"""How long a fresh `make demo` takes: `helip demo` from an empty cache, so pretraining included.

Runs the command a user runs (``helip demo --out DIR``) in a child process
with ``--cache-dir`` an empty temporary folder, so the starting model is
pretrained as on a fresh machine. Records the wall time of the whole command
(Python's start and imports included), the stage times the demo writes to
``results.json`` (``meta.timings_seconds``, ``meta.run_seconds``), the load
average before and after (on a shared machine, say whether others ran), the
demo's printed table, and the provenance. The venv's install is not included.

    .venv/bin/python benchmarks/time_demo.py [--out benchmarks/results/time_demo.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _provenance import provenance

from helip.app.demo import DemoConfig
from helip.io import save_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/time_demo.json")
    ap.add_argument("--quick", action="store_true", help="time `helip demo --quick` (a smoke test of this script)")
    args = ap.parse_args(argv)
    helip = Path(sys.executable).parent / "helip"
    cmd = [str(helip)] if helip.exists() else [sys.executable, "-m", "helip"]
    with tempfile.TemporaryDirectory() as tmp:
        demo_out, cache = Path(tmp) / "demo_out", Path(tmp) / "cache"
        cache.mkdir()
        cmd += ["demo", "--out", str(demo_out), "--cache-dir", str(cache)] + (["--quick"] if args.quick else [])
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            return proc.returncode
        results = json.loads((demo_out / "results.json").read_text())
    meta = results["meta"]
    report = {"benchmark": "wall time of `helip demo` from an empty cache (pretraining included)",
              "wall_seconds": round(wall, 1), "timings_seconds": meta["timings_seconds"],
              "run_seconds": meta.get("run_seconds"), "jobs": meta.get("jobs"),
              "load_average_before": load_before, "load_average_after": load_after,
              "pretrain_steps": (DemoConfig.quick() if args.quick else DemoConfig()).pretrain.steps,
              "continued_steps": meta["continued_training"]["steps"],
              "printed": proc.stdout, "results": {k: results[k] for k in ("pretrained", "baseline", "helip")},
              "command": " ".join(cmd),
              "provenance": provenance(args)}
    save_json(args.out, report)
    print(proc.stdout, end="")
    print(f"wall {wall:.1f} s; stages {meta['timings_seconds']}; runs {meta.get('run_seconds')}; "
          f"load before {load_before[0]:.2f}, after {load_after[0]:.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
