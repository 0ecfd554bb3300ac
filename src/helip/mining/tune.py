"""Choosing how to mine: ANN's operating point for a recall target, and exact vs ANN for ``mode="auto"``.

**Recall-targeted ANN.** On a random sample of targets, exact search gives
each target's true top-k. Whether ANN with ``nprobe = p`` finds an exact hard
pair j of target i needs no ANN run: ANN scores i against every member of its
p nearest cells, exactly and with the same rules, so it finds j if and only
if j's own cell is among them (a candidate in the top-k of all pairs is in the
top-k of any subset holding it; ties at the k-th place aside). So one exact
search of the sample gives the recall at every p of a grid at once.

The recall of a target is the share of its exact hard pairs found; the
estimate is the mean over sampled targets. Its one-sided lower confidence
bound is Wilson's score bound with n = the number of *targets*: a per-target
recall lies in [0, 1], so its variance is at most m(1 - m) for mean m, the
variance of a Bernoulli trial with that mean, which makes the bound hold
however correlated the hard pairs of one target are (pooling them as
independent trials would not). The chosen point is the smallest p of the grid
whose bound reaches the target; recall grows with p, so testing the grid from
the largest p down and stopping at the first failure (fixed-sequence testing)
keeps the stated confidence without a multiple-testing correction.

**Cost.** The work of ANN at p is known before running it: the number of
(target, candidate) pairs, the sum over targets of the sizes of their p
cells. Its speed is measured on the data: a few random candidate cells, each
searched for every target that probes it (as the real run batches them: all
those targets against the cell's members at once), timed, against the exact
search of the sample, timed. Both run on worker threads with single-threaded
kernels, as the real runs do, so the two estimates compare like with like.
If ANN at the chosen point is not estimated faster than exact search (or no
point of the grid reaches the target), exact search runs instead, and the
reason is logged and recorded.
"""
from __future__ import annotations

import logging
import time
from statistics import NormalDist
from typing import Callable, Dict, Optional

import numpy as np

log = logging.getLogger(__name__)

NPROBE_GRID = (1, 2, 4, 8, 16, 32, 64)
CONFIDENCE = 0.95
# the symmetric exact search computes each tile once for two sets of targets, with seeded bounds; a whole run
# took about this share of (time of the sampled targets' row search x N / sample): at N = 200,000 on 2 threads
# ~0.25 on the hierarchical benchmark data, 0.35 on the isotropic, 0.48 on the heavy-tailed; 0.35 is kept
SYMMETRIC_SHARE = 0.35
AUTO_EXACT_BELOW = 50_000   # mode auto: below this many pairs exact search takes seconds; no probe needed
# ANN's timing probe: at least this many candidate cells and (target, candidate) pairs (~1-2 s on 2 cores)
PROBE_CELLS, PROBE_PAIRS = 8, 20_000_000


def wilson_lower(mean: float, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Wilson score lower bound of a proportion (or of the mean of [0, 1] values) from n trials."""
    if n <= 0:
        return 0.0
    z = NormalDist().inv_cdf(confidence)
    z2 = z * z
    centre = mean + z2 / (2 * n)
    spread = z * np.sqrt(max(mean * (1 - mean), 0.0) / n + z2 / (4 * n * n))
    return float(max(0.0, (centre - spread) / (1 + z2 / n)))


def per_target_recall(probes: np.ndarray, sample: np.ndarray, exact_idx: np.ndarray,
                      grid: tuple = NPROBE_GRID) -> Dict[int, np.ndarray]:
    """Recall of each sampled target at each nprobe of ``grid`` (targets without hard pairs left out).

    ``probes`` [N, P]: every pair's cells, nearest first (column 0: the cell it belongs to).
    """
    home = probes[:, 0]
    valid = exact_idx >= 0
    keep = valid.any(1)
    nb_cell = home[np.where(valid, exact_idx, 0)]                       # [S, k] cell of each exact hard pair
    # rank of that cell among the target's probes (P when absent)
    match = probes[sample][:, None, :] == nb_cell[:, :, None]           # [S, k, P]
    rank = np.where(match.any(2), match.argmax(2), probes.shape[1])
    out = {}
    for p in grid:
        if p > probes.shape[1]:
            break
        hits = ((rank < p) & valid).sum(1)
        out[p] = (hits[keep] / valid.sum(1)[keep]).astype(np.float64)
    return out


def candidate_pairs(probes: np.ndarray, nlist: int, p: int) -> int:
    """(target, candidate) pairs ANN scores at nprobe p: each target against all members of its p cells."""
    sizes = np.bincount(probes[:, 0], minlength=nlist)
    return int(sizes[probes[:, :p]].sum())


def choose_operating_point(recalls: Dict[int, np.ndarray], target: float,
                           confidence: float = CONFIDENCE) -> tuple[Optional[int], list]:
    """The smallest nprobe whose recall lower bound reaches ``target`` (None if none does), and every point's
    estimate and bound (tested from the largest nprobe down: fixed-sequence testing)."""
    points = []
    for p, r in sorted(recalls.items()):
        mean = float(r.mean()) if len(r) else 1.0
        points.append({"nprobe": p, "recall": round(mean, 4), "lower_bound": round(wilson_lower(mean, len(r), confidence), 4)})
    chosen = None
    for pt in reversed(points):
        if pt["lower_bound"] < target:
            break
        chosen = pt["nprobe"]
    return chosen, points


def tune(run, sample_size: int, target: float, seed: int,
         exact_rows: Callable[[np.ndarray], tuple]) -> dict:
    """Choose ANN's nprobe for ``target`` recall on ``run`` (whose cells hold probes for the whole grid), or
    exact search: returns the decision with its estimate, bound, grid and cost estimates (for meta.json)."""
    from .ann import search_ann

    cells, n = run.cells, run.n
    nlist = int(cells["nlist"][0])
    rng = np.random.default_rng([seed, 11])
    sample = np.sort(rng.choice(n, size=min(sample_size, n), replace=False))
    t0 = time.perf_counter()
    exact_idx, _ = exact_rows(sample)
    t_exact_sample = time.perf_counter() - t0
    recalls = per_target_recall(cells["probes"], sample, exact_idx)
    chosen, points = choose_operating_point(recalls, target)
    share = SYMMETRIC_SHARE if run.symmetric_possible else 1.0   # of all N^2 pairs, what exact search costs
    exact_est = t_exact_sample / len(sample) * n * share
    out = {"target_recall": target, "confidence": CONFIDENCE,
           "bound": "one-sided Wilson score bound over sampled targets (per-target recall in [0, 1])",
           "sample_targets": int(len(sample)), "nlist": nlist, "grid": points,
           "exact_seconds_estimate": round(exact_est, 1), "exact_sample_seconds": round(t_exact_sample, 3)}
    if chosen is None:
        out.update(use="exact", nprobe=None,
                   why=f"no nprobe up to {max(recalls)} reaches recall lower bound {target} "
                       f"(best {points[-1]['lower_bound']} at nprobe {points[-1]['nprobe']})")
        return out
    pairs = candidate_pairs(cells["probes"], nlist, chosen)
    point = next(pt for pt in points if pt["nprobe"] == chosen)
    out.update(nprobe=chosen, recall_estimate=point["recall"], recall_lower_bound=point["lower_bound"],
               candidate_pairs=pairs, candidate_share=round(pairs / (float(n) * n), 4))
    if pairs >= share * float(n) * n:   # as many pairs as the symmetric exact search scores
        out.update(use="exact", ann_seconds_estimate=None,
                   why=f"ANN at nprobe {chosen} (recall {point['recall']}, lower bound {point['lower_bound']}) "
                       f"would score {pairs / (float(n) * n):.0%} of all pairs: no faster than exact search")
        return out
    # ANN's speed on this data: a few random candidate cells, each with every target that probes it at the
    # chosen nprobe, as the real run batches them (all targets probing a cell against its members at once)
    probes_p = cells["probes"][:, :chosen]
    sizes = np.bincount(cells["probes"][:, 0], minlength=nlist)
    work = np.bincount(probes_p.ravel(), minlength=nlist) * sizes   # (target, candidate) pairs per cell
    picked, mini_pairs = [], 0
    for c in rng.permutation(nlist):
        if work[c]:
            picked.append(int(c))
            mini_pairs += int(work[c])
        if len(picked) >= PROBE_CELLS and mini_pairs >= min(PROBE_PAIRS, pairs):
            break
    rows = np.flatnonzero(np.isin(probes_p, picked).any(1))
    t0 = time.perf_counter()
    search_ann(run.txt, run.img, rows, run.cfg.k, run.cfg.method, run.cfg.dup_threshold, run.cfg.min_similarity,
               run.cfg.block_size, {"probes": probes_p, "members": cells["members"]}, only_cells=picked)
    t_mini = time.perf_counter() - t0
    ann_est = t_mini / max(mini_pairs, 1) * pairs
    out.update(ann_seconds_estimate=round(ann_est, 1),
               ann_probe={"cells": len(picked), "targets": int(len(rows)), "pairs": mini_pairs,
                          "seconds": round(t_mini, 3)})
    if ann_est >= exact_est:
        out.update(use="exact", why=f"ANN at nprobe {chosen} (recall {point['recall']}, lower bound "
                                    f"{point['lower_bound']}) is estimated at {ann_est:.0f} s, exact search at "
                                    f"{exact_est:.0f} s")
    else:
        out.update(use="ann", why=f"nprobe {chosen}: recall {point['recall']}, {CONFIDENCE:.0%} lower bound "
                                  f"{point['lower_bound']} >= {target}; estimated {ann_est:.0f} s against "
                                  f"{exact_est:.0f} s for exact search")
    return out
