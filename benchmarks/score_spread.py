"""How spread are a target's top-k hard-pair scores on the built-in world? Translates an absolute temperature.

The partner temperature in score units (``--hard-temperature-mode absolute``)
means P(j) ~ exp(s_j / T); the relative one divides by each target's own
spread s_1 - s_k over its top-k, P(j) ~ exp((s_j - s_1) / (T_rel (s_1 - s_k))).
Row by row, absolute T equals relative T_rel = T / (s_1 - s_k), so the
distribution of the spreads of the demo's HPM hard pairs says which relative
value draws like the absolute 0.01 that was measured (benchmarks/RESULTS.md,
"Quality"), and how much that equivalence varies row to row.

    .venv/bin/python benchmarks/score_spread.py [--abs-temperature 0.01] [--out benchmarks/results/score_spread.json]

Uses the demo's cached pretrained checkpoint (pretrains it when missing) and
mines with the demo's options, as bench_quality.py does.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from helip.app.demo import DemoConfig, build_world, default_cache_dir, pretrained_checkpoint
from helip.embed import encode_pairs
from helip.io import save_json
from _provenance import provenance
from helip.mining import mine_hard_pairs
from helip.models import load_model

QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def spreads(scores: np.ndarray, indices: np.ndarray, k: int) -> np.ndarray:
    """s_1 - s_k per row over the valid places of the first k, as the sampler computes it."""
    valid = indices[:, :k] >= 0
    s = scores[:, :k].astype(np.float64)
    return np.where(valid, s, -np.inf).max(1) - np.where(valid, s, np.inf).min(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--abs-temperature", type=float, default=0.01)
    ap.add_argument("--out", default="benchmarks/results/score_spread.json")
    args = ap.parse_args(argv)
    cfg = DemoConfig()
    cfg.progress = False
    t0 = time.perf_counter()
    w = build_world(cfg)
    ckpt = pretrained_checkpoint(cfg, w.tensors["train"], default_cache_dir())
    img, txt = encode_pairs(load_model(cfg.pretrain.model, str(ckpt)), w.tensors["train"])
    hard = mine_hard_pairs(img, txt, cfg.mine, progress=False, precision="fp32")
    report = {"abs_temperature": args.abs_temperature, "mining": {k: v for k, v in hard.meta.items()
                                                                  if k in ("method", "k", "n")}, "by_k": {}}
    for k in sorted({10, cfg.continued.top_k}):
        sp = spreads(hard.scores, hard.indices, k)
        rel = args.abs_temperature / sp
        report["by_k"][k] = {
            "spread_mean": float(sp.mean()), "spread_quantiles": {q: float(np.quantile(sp, q)) for q in QUANTILES},
            "zero_spread_rows": int((sp <= 0).sum()),
            "equivalent_relative_T_quantiles": {q: float(np.quantile(rel, q)) for q in QUANTILES},
            "relative_T_of_median_spread": float(args.abs_temperature / np.median(sp))}
        print(f"top-{k}: spread s_1 - s_k median {np.median(sp):.4f} (5%-95%: {np.quantile(sp, 0.05):.4f}-"
              f"{np.quantile(sp, 0.95):.4f}); absolute T={args.abs_temperature} = relative "
              f"{np.median(rel):.3f} at the median row (5%-95%: {np.quantile(rel, 0.05):.3f}-"
              f"{np.quantile(rel, 0.95):.3f})", flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["provenance"] = provenance(args)
    save_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
