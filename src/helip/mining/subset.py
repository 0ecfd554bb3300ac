"""Random-subset search: the authors' approximation, for comparison.

The released HELIP script restricted each target's candidates to a random
subset of M pairs (3M), redrawn every R targets (300k). Seeded here, so a
run is reproducible: the subset for targets [r*R, (r+1)*R) is drawn from
``default_rng([seed, r])``.
"""
from __future__ import annotations

from typing import Callable, Tuple

import numpy as np
import torch

from .score import candidate_scores, select_topk


def search_subset(txt: torch.Tensor, img: torch.Tensor, rows: np.ndarray, k: int, method: str,
                  dup_threshold: float, min_similarity: float, block_size: int, candidates: int,
                  redraw_every: int, seed: int,
                  on_block: Callable[[int], None] = lambda n: None) -> Tuple[np.ndarray, np.ndarray]:
    n = len(txt)
    m = min(candidates, n)
    out_i = np.empty((len(rows), k), dtype=np.int32)
    out_s = np.empty((len(rows), k), dtype=np.float32)
    pool_id, c = None, None  # the current pool, redrawn when the targets cross into the next one
    for s in range(0, len(rows), block_size):
        block = rows[s:s + block_size]
        # a block may straddle a redraw boundary: score each part against its own pool
        for r in np.unique(block // redraw_every):
            part = np.flatnonzero(block // redraw_every == r)
            if r != pool_id:
                pool = np.sort(np.random.default_rng([seed, int(r)]).choice(n, size=m, replace=False))
                pool_id, c = r, torch.as_tensor(pool, device=txt.device)
            q = torch.as_tensor(block[part], device=txt.device)
            sc = candidate_scores(txt[q], img[q], q, txt[c], img[c], c, method, dup_threshold, min_similarity)
            out_i[s + part], out_s[s + part] = select_topk(sc, c, k)
        on_block(len(block))
    return out_i, out_s
