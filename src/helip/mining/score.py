"""The hard-pair score and its exclusion rules, for a block of targets against candidates.

score(i, j) = cos(text_i, text_j) * cos(image_i, image_j)  (method "hpm"),
or one of the two cosines alone (methods "text" and "image", the paper's
ablations). A candidate is excluded when it is the target itself, when either
cosine exceeds ``dup_threshold`` (a near-duplicate is a false negative, not a
hard one), or when either cosine is at most ``min_similarity``: a pair unlike
the target in both modalities has a positive product too (-0.9 x -0.9), but it
is not hard; the default 0.0 keeps the product meaningful.

Every search mode (exact, subset, ann) differs only in which candidates it
hands to ``candidate_scores``; scoring and selection are shared, so the modes
agree wherever their candidate sets do (up to float32 rounding: matrix products of
other shapes may round a cosine differently in the last bit).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

METHODS = ("hpm", "text", "image")


def candidate_scores(
    text_q: torch.Tensor, image_q: torch.Tensor, q_idx: torch.Tensor,
    text_c: torch.Tensor, image_c: torch.Tensor, c_idx: torch.Tensor,
    method: str, dup_threshold: float, min_similarity: float,
) -> torch.Tensor:
    """Scores [b, m] of targets (global indices ``q_idx``) against candidates ``c_idx`` (sorted, unique).

    Excluded candidates get -inf. Inputs are L2-normalised float32 rows.
    """
    score = score_with_rules(cosines(text_q, text_c), cosines(image_q, image_c), method, dup_threshold, min_similarity)
    # the target itself: candidates are sorted, so find each target's column instead of comparing [b, m]
    pos = torch.searchsorted(c_idx, q_idx).clamp_(max=len(c_idx) - 1)
    hit = c_idx[pos] == q_idx
    score[torch.arange(len(q_idx), device=q_idx.device)[hit], pos[hit]] = float("-inf")
    return score


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for unit rows. On the CPU through numpy's BLAS (OpenBLAS), as the tiled exact search
    computes its tiles, so that every mode scores a pair with the same arithmetic (and because it ran
    ~1.5x faster than torch's MKL on the AMD CPU measured; see tiled.py)."""
    if a.is_cuda:
        return a @ b.T
    return torch.from_numpy(np.matmul(a.numpy(), b.numpy().T))


def score_with_rules(ct: torch.Tensor, ci: torch.Tensor, method: str, dup_threshold: float,
                     min_similarity: float) -> torch.Tensor:
    """The score from caption cosines ``ct`` and image cosines ``ci`` (same shape), excluded entries -inf."""
    if method == "hpm":
        score = ct * ci
    elif method == "text":
        score = ct.clone()
    elif method == "image":
        score = ci.clone()
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    excluded = (ct > dup_threshold) | (ci > dup_threshold) | (ct <= min_similarity) | (ci <= min_similarity)
    return score.masked_fill_(excluded, float("-inf"))


def select_topk(scores: torch.Tensor, c_idx: torch.Tensor, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Best k per row as global indices (int32, -1 padded) and scores (float32, -inf padded).

    ``c_idx`` maps columns to global indices: [m] shared by all rows, or [b, m]
    per row. Ties are broken by the smaller global index, so the result does not
    depend on how ``torch.topk`` orders equal values: first within the selection,
    then, for the rare row whose k-th score is shared with a candidate left out,
    by re-choosing among the tied candidates.
    """
    b, m = scores.shape
    kk = min(k, m)
    # one candidate more than needed: a row whose (k+1)-th score equals its k-th has a tie across the cut
    vals, pos = torch.topk(scores, min(kk + 1, m), dim=1, largest=True, sorted=True)
    kth = vals[:, kk - 1:kk]
    boundary = torch.isfinite(kth[:, 0]) & (vals[:, kk] == kth[:, 0]) if vals.shape[1] > kk else \
        torch.zeros(b, dtype=torch.bool, device=scores.device)
    vals, pos = vals[:, :kk].clone(), pos[:, :kk].clone()
    for r in boundary.nonzero()[:, 0].tolist():
        above = (scores[r] > kth[r]).nonzero()[:, 0]
        tied = (scores[r] == kth[r]).nonzero()[:, 0]
        tied_global = c_idx[r, tied] if c_idx.dim() == 2 else c_idx[tied]
        keep = tied[torch.argsort(tied_global)[:kk - len(above)]]
        pos[r] = torch.cat([above, keep])
        vals[r] = scores[r, pos[r]]
    idx = torch.gather(c_idx, 1, pos) if c_idx.dim() == 2 else c_idx[pos]
    vals, idx = order_by_score_then_index(vals, idx)
    idx[torch.isinf(vals)] = -1
    out_i = np.full((b, k), -1, dtype=np.int32)
    out_s = np.full((b, k), -np.inf, dtype=np.float32)
    out_i[:, :kk] = idx.cpu().numpy()
    out_s[:, :kk] = vals.cpu().numpy()
    return out_i, out_s


def order_by_score_then_index(vals: torch.Tensor, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each row of (``vals``, ``idx``) sorted by score descending, then index ascending: helip's result order."""
    order = torch.argsort(idx, dim=1, stable=True)
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), idx.gather(1, order)
