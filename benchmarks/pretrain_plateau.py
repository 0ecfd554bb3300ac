"""Is the demo's starting model trained to its plateau?

HELIP is meant for fully trained checkpoints: starting from an under-trained
one mostly measures the value of more training (docs/design.md, "Starting models"). This
script pretrains the demo model for several lengths (each with its own full
warm-up + cosine schedule, as the demo does), and reports validation zero-shot
mean and retrieval for each, so the chosen length can be checked against the
curve. The demo's own length comes from the shared cache when present.

    .venv/bin/python benchmarks/pretrain_plateau.py [--steps 750,1500,3000]
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace

import numpy as np

from helip.app.demo import DemoConfig, build_world, default_cache_dir, pretrained_checkpoint
from helip.embed import encode_pairs
from helip.app.worlds import retrieval_recall, zeroshot_accuracy
from helip.io import save_json
from _provenance import provenance
from helip.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="750,1500,3000")
    ap.add_argument("--out", default="benchmarks/results/pretrain_plateau.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = DemoConfig(progress=False)
    w = build_world(base)
    train_pairs, val_pairs, tasks = w.tensors["train"], w.tensors["val"], w.tasks["val"]
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        cfg = DemoConfig(progress=False)
        cfg.pretrain = replace(cfg.pretrain, steps=steps)
        t0 = time.perf_counter()
        ckpt = pretrained_checkpoint(cfg, train_pairs, default_cache_dir())
        lm = load_model(cfg.pretrain.model, str(ckpt))
        img, txt = encode_pairs(lm, val_pairs)
        zs = zeroshot_accuracy(lm, img, tasks)
        row = {"steps": steps, "epochs": round(steps * cfg.pretrain.batch_size / base.n_train, 2),
               "val_zeroshot_mean": float(np.mean(list(zs.values()))), "val_zeroshot": zs,
               "val_retrieval": retrieval_recall(img, txt), "seconds_incl_cache": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"pretrain {steps:>5} steps ({row['epochs']} epochs): val zero-shot mean {row['val_zeroshot_mean']:.4f}"
              f"  i2t R@1 {row['val_retrieval']['i2t_r1']:.4f}", flush=True)
    save_json(args.out, {"demo_pretrain_steps": base.pretrain.steps, "rows": rows, "provenance": provenance(args)})


if __name__ == "__main__":
    main()
