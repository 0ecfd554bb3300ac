"""Choose the demo's continued-training hyperparameters on the validation split.

Protocol (fair by construction): every run continues from the same cached
pretrained checkpoint with the same batch size, number of optimiser steps,
schedule and seed. First the learning rate is chosen for the *baseline*
(random batches, no HNML) on validation zero-shot mean, giving the baseline its
best shot; HELIP then uses that same learning rate and only its own knobs
(hard partners per target, HNML weight and margin) are chosen on validation.
Test numbers are never looked at here.

    .venv/bin/python benchmarks/tune_demo.py [--seed 0] [--steps 300] [--out benchmarks/results/tune_demo.json]

Prints one line per configuration and writes JSON (and a Markdown table beside it).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from helip.app.demo import DemoConfig, build_world, default_cache_dir, pretrained_checkpoint
from helip.embed import encode_pairs
from helip.app.worlds import retrieval_recall, zeroshot_accuracy
from helip.io import save_json, save_text
from _provenance import provenance
from helip.mining import mine_hard_pairs
from helip.models import load_model
from helip.training import train


def val_metrics(model_name, ckpt, val_pairs, tasks):
    lm = load_model(model_name, str(ckpt))
    img, txt = encode_pairs(lm, val_pairs)
    zs = zeroshot_accuracy(lm, img, tasks)
    return {"zeroshot": zs, "zeroshot_mean": float(np.mean(list(zs.values()))), "retrieval": retrieval_recall(img, txt)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lrs", default="1e-4,2e-4,5e-4,1e-3")
    ap.add_argument("--out", default="benchmarks/results/tune_demo.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cfg = DemoConfig(progress=False)
    if args.steps:
        cfg.continued = replace(cfg.continued, steps=args.steps)
    w = build_world(cfg)
    train_pairs, val_pairs, tasks = w.tensors["train"], w.tensors["val"], w.tasks["val"]
    ckpt = pretrained_checkpoint(cfg, train_pairs, default_cache_dir())
    lm = load_model(cfg.pretrain.model, str(ckpt))
    img, txt = encode_pairs(lm, train_pairs)
    hard = mine_hard_pairs(img, txt, cfg.mine, progress=False)

    rows = [{"variant": "pretrained", **val_metrics(cfg.pretrain.model, ckpt, val_pairs, tasks)}]
    print(f"pretrained: val zero-shot mean {rows[0]['zeroshot_mean']:.4f}", flush=True)
    base = replace(cfg.continued, pretrained=str(ckpt), seed=args.seed, progress=False)

    def run(variant, tc, use_hard):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            res = train(tc, train_pairs, Path(d), hard if use_hard else None)
            m = val_metrics(tc.model, res.checkpoint, val_pairs, tasks)
        row = {"variant": variant, "lr": tc.lr, "hard_per_target": tc.hard_per_target if use_hard else 0,
               "hnml_weight": tc.hnml_weight if use_hard else 0.0, "hnml_margin": tc.hnml_margin,
               "seconds": round(time.perf_counter() - t0, 1), **m}
        rows.append(row)
        print(f"{variant:>8} lr={row['lr']:g} h={row['hard_per_target']} w={row['hnml_weight']:g} "
              f"m={row['hnml_margin']:g}: val zero-shot mean {m['zeroshot_mean']:.4f}  "
              f"i2t R@1 {m['retrieval']['i2t_r1']:.4f}", flush=True)
        return row

    lrs = [float(x) for x in args.lrs.split(",")]
    base_rows = [run("baseline", replace(base, lr=lr, hard_per_target=0, hnml_weight=0.0), False) for lr in lrs]
    best_lr = max(base_rows, key=lambda r: r["zeroshot_mean"])["lr"]
    grid = [(1, 0.0, 0.2), (1, 0.3, 0.1), (1, 1.0, 0.2), (3, 0.0, 0.2), (3, 0.3, 0.1), (3, 1.0, 0.2)]
    helip_rows = [run("helip", replace(base, lr=best_lr, hard_per_target=h, hnml_weight=w, hnml_margin=m), True)
                  for h, w, m in grid]
    best = max(helip_rows, key=lambda r: r["zeroshot_mean"])
    out = {"protocol": __doc__.split("\n\n")[1], "seed": args.seed, "steps": base.steps,
           "batch_size": base.batch_size, "pretrained_checkpoint": str(ckpt), "chosen_lr": best_lr,
           "chosen_helip": {k: best[k] for k in ("hard_per_target", "hnml_weight", "hnml_margin")},
           "continued_training": asdict(base), "rows": rows,
           "provenance": provenance(args)}
    save_json(args.out, out)
    lines = ["| variant | lr | hard/target | HNML weight | margin | val zero-shot mean | val i2t R@1 | val t2i R@1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r.get('lr', '')} | {r.get('hard_per_target', '')} | "
                     f"{r.get('hnml_weight', '')} | {r.get('hnml_margin', '')} | {100 * r['zeroshot_mean']:.2f} | "
                     f"{100 * r['retrieval']['i2t_r1']:.2f} | {100 * r['retrieval']['t2i_r1']:.2f} |")
    save_text(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")
    print(json.dumps(out["chosen_helip"]), "lr", best_lr)


if __name__ == "__main__":
    sys.exit(main())
