"""Exact search: every target scored against every pair, in blocks of targets.

Memory is O(block x N + N x d): a block of targets is scored against all N
candidates, reduced to its top-k, and discarded before the next block.

(A pruned variant, bounding the score by the caption cosine and computing image
cosines only for candidates that can still enter the top-k, was tried and
measured no faster on a 2-core CPU: the elementwise passes over the block cost
as much as the matrix product they save. Use ``mode="ann"`` for speed.)
"""
from __future__ import annotations

from typing import Callable, Tuple

import numpy as np
import torch

from .score import candidate_scores, select_topk


def search_exact(txt: torch.Tensor, img: torch.Tensor, rows: np.ndarray, k: int, method: str,
                 dup_threshold: float, min_similarity: float, block_size: int,
                 on_block: Callable[[int], None] = lambda n: None) -> Tuple[np.ndarray, np.ndarray]:
    """Hard pairs of targets ``rows`` (global indices) against all pairs."""
    all_idx = torch.arange(len(txt), device=txt.device)
    out_i = np.empty((len(rows), k), dtype=np.int32)
    out_s = np.empty((len(rows), k), dtype=np.float32)
    for s in range(0, len(rows), block_size):
        q = torch.as_tensor(rows[s:s + block_size], device=txt.device)
        sc = candidate_scores(txt[q], img[q], q, txt, img, all_idx, method, dup_threshold, min_similarity)
        out_i[s:s + len(q)], out_s[s:s + len(q)] = select_topk(sc, all_idx, k)
        on_block(len(q))
    return out_i, out_s
