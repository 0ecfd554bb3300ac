"""One ablation table from several ``bench_quality.py --worlds`` runs (a search over the development worlds).

Each input JSON is one run of the family protocol (one learning rate, several
variants, several seeds, a set of worlds). For every (learning rate, variant)
this prints the validation zero-shot mean averaged over the worlds, its change
against the starting models, against the baseline of the same run (same
learning rate) and against the best baseline of all the runs (the baseline
gets its own learning-rate search too), and the worst per-world change of any
coarse or fine task. Selection reads validation only; the script refuses
held-out worlds, where nothing may be selected.

    python benchmarks/ablation_table.py RUN.json [RUN.json ...] [--out benchmarks/results/NAME]

Runs of the same protocol, learning rate and continued-training length on
disjoint sets of worlds (one world per command, say) are joined into one run
first, on the variants they all have.

Writes ``NAME.json`` and ``NAME.md`` when ``--out`` is given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance  # noqa: E402


def _rows(run: dict, path: str):
    from helip.app.worlds import HELDOUT_WORLDS

    worlds = list(run["worlds"])
    if set(worlds) & set(HELDOUT_WORLDS):
        raise SystemExit(f"{path}: holds held-out worlds {sorted(set(worlds) & set(HELDOUT_WORLDS))}; "
                         f"nothing is selected on them")
    if not all(w in run["results"] and "summary" in run["results"][w] for w in worlds):
        print(f"{path}: left out, not every world of {worlds} finished", file=sys.stderr)
        return
    lr = run["results"][worlds[0]]["continued_training"]["lr"]
    for variant in run["variants"]:
        per_world, tasks = {}, {}
        for w in worlds:
            s = run["results"][w]["summary"].get(variant)
            if s is None:
                break
            per_world[w] = s["val"]["zeroshot_mean"]["mean"]
            tasks[w] = s["val"]["zeroshot"]
        if len(per_world) < len(worlds):
            continue  # an interrupted run: this variant did not finish every world
        start = {w: run["results"][w]["pretrained"]["val"]["zeroshot_mean"] for w in worlds}
        base = {w: run["results"][w]["summary"]["baseline"]["val"]["zeroshot_mean"]["mean"] for w in worlds}
        base_tasks = {w: run["results"][w]["summary"]["baseline"]["val"]["zeroshot"] for w in worlds}
        worst = min((tasks[w][t] - base_tasks[w][t], f"{w}:{t}") for w in worlds for t in tasks[w])
        yield {"lr": lr, "variant": variant, "worlds": worlds, "file": path,
               "val_zs": float(np.mean(list(per_world.values()))),
               "vs_start": float(np.mean([per_world[w] - start[w] for w in worlds])),
               "vs_baseline_same_lr": float(np.mean([per_world[w] - base[w] for w in worlds])),
               "per_world": per_world, "worst_task_vs_baseline": {"delta": worst[0], "task": worst[1]}}


def join_runs(runs: list) -> list:
    """Join runs that differ only in their worlds (same protocol, lr and steps) into one, on shared variants."""
    joined: dict = {}
    for path, run in runs:
        first = next(iter(run["results"].values()), {}).get("continued_training", {})
        key = (run.get("protocol_name"), first.get("lr"), first.get("steps"))
        if key in joined and not set(joined[key][1]["worlds"]) & set(run["worlds"]):
            p0, r0 = joined[key]
            joined[key] = (f"{p0}+{path}", {**r0, "worlds": [*r0["worlds"], *run["worlds"]],
                                            "variants": [v for v in r0["variants"] if v in run["variants"]],
                                            "results": {**r0["results"], **run["results"]}})
        else:
            joined[key if key not in joined else (*key, path)] = (path, run)
    return list(joined.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="JSON files written by bench_quality.py --worlds")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    runs = join_runs([(p, json.loads(Path(p).read_text())) for p in args.runs])
    rows = [r for p, run in runs for r in _rows(run, p)]
    worlds = sorted({w for r in rows for w in r["worlds"]})
    best_base = max((r for r in rows if r["variant"] == "baseline"), key=lambda r: r["val_zs"])
    for r in rows:
        r["vs_best_baseline"] = r["val_zs"] - best_base["val_zs"]
    best = max((r for r in rows if r["variant"] != "baseline"), key=lambda r: r["val_zs"])
    lines = [f"Validation zero-shot mean over the development worlds {', '.join(worlds)}, in %, mean of 3 seeds "
             f"per world; changes in points. Best baseline: lr {best_base['lr']} ({100 * best_base['val_zs']:.1f}). "
             f"Best HELIP-family configuration on validation: {best['variant']} at lr {best['lr']}.", "",
             "| lr | variant | val zs mean | vs starting models | vs baseline, same lr | vs best baseline | "
             "worst task vs baseline |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (str(r["lr"]), r["variant"] != "baseline", r["variant"])):
        lines.append(f"| {r['lr']} | {r['variant']} | {100 * r['val_zs']:.1f} | {100 * r['vs_start']:+.1f} | "
                     f"{100 * r['vs_baseline_same_lr']:+.1f} | {100 * r['vs_best_baseline']:+.1f} | "
                     f"{100 * r['worst_task_vs_baseline']['delta']:+.1f} ({r['worst_task_vs_baseline']['task']}) |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from helip.io import save_json, save_text

        save_json(Path(args.out + ".json"), {"rows": rows, "best_baseline": best_base, "selected": best,
                                            "provenance": provenance(args)})
        save_text(Path(args.out + ".md"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
