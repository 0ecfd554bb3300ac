"""Exact search: every target scored against every pair, in blocks of targets.

Memory is O(block x N + N x d): a block of targets is scored against all N
candidates, reduced to its top-k, and discarded before the next block.

Two ways to compute the same result:

- ``search_exact``: float32 throughout (the CPU default).
- ``search_exact_lowp``: the two similarity matrices in float16 (the GPU
  default: half the memory traffic, tensor cores), then the survivors
  re-scored in float32, with a certificate that nothing was lost. The
  low-precision pass keeps the best ``k + slack`` candidates per target; their
  float32 scores decide the final top-k. Any candidate it dropped has a
  low-precision score at most the (k+slack)-th one, so its float32 score is at
  most that plus ``score_error_bound``; a row whose float32 k-th best is at
  least that bound is therefore exact, and every other row is recomputed in
  float32 against all N. Exclusions in the low-precision pass are only the
  certain ones (a cosine beyond a threshold by more than the error bound); the
  re-scoring applies the exact rules. So the result is the float32 result on
  any device, not an approximation of it.

On the CPU, float32 exact mode uses ``tiled.py`` instead (tiles, per-target
bounds, symmetry); these block searches are what a GPU runs, and the
float32 reference. (Two pruned CPU variants were tried and not kept: bounding
the score by the caption cosine and computing image cosines only where a
candidate could still enter the top-k cost as much in elementwise passes as
it saved; skipping the image product of whole k-means-cell tiles left ~80% of
them, because a target's caption cosines above its k-th score, ~3% of all
candidates, are spread over 20-46% of the cells.)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from .score import candidate_scores, score_with_rules, select_topk

PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


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


def cosine_error_bound(dtype: torch.dtype, dim: int) -> float:
    """Largest |cosine in ``dtype`` - cosine in exact arithmetic| for unit vectors of width ``dim``.

    Rounding the inputs moves each unit vector by at most u (relative), which
    moves the dot product by at most 2u + u^2 (Cauchy-Schwarz); rounding the
    result (|cos| <= 1) adds u; float32 accumulation adds at most dim * 2^-24.
    The float32 re-scoring itself is within about dim * 2^-24 of exact too.
    """
    u = torch.finfo(dtype).eps / 2  # unit roundoff
    return 3 * u + u * u + 2 * dim * 2.0 ** -24


def score_error_bound(method: str, cos_err: float, dtype: torch.dtype) -> float:
    """Largest error of a low-precision score: the product of two cosines, each off by ``cos_err``."""
    if method != "hpm":
        return cos_err
    # |a'b' - ab| <= |a'-a||b'| + |a||b'-b| <= e(1+e) + e, plus rounding the product (|ab| <= 1)
    return 2 * cos_err + cos_err * cos_err + torch.finfo(dtype).eps / 2


@contextmanager
def _full_precision_accumulation():
    """cuBLAS may otherwise reduce float16 products in float16, which the error bound does not cover."""
    flags = torch.backends.cuda.matmul
    old = (flags.allow_fp16_reduced_precision_reduction, flags.allow_bf16_reduced_precision_reduction)
    flags.allow_fp16_reduced_precision_reduction = flags.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        flags.allow_fp16_reduced_precision_reduction, flags.allow_bf16_reduced_precision_reduction = old


def search_exact_lowp(txt: torch.Tensor, img: torch.Tensor, rows: np.ndarray, k: int, method: str,
                      dup_threshold: float, min_similarity: float, block_size: int, precision: str = "fp16",
                      slack: int = 0, on_block: Callable[[int], None] = lambda n: None,
                      stats: Optional[dict] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``search_exact``'s result computed with low-precision similarities (see the module docstring).

    ``txt``/``img`` are the float32 unit rows; ``slack`` extra candidates per
    target survive the low-precision pass (default k + 16). ``stats``, when
    given, receives the number of rows that needed the float32 fallback.
    """
    dtype = _DTYPES[precision]
    n, dim = txt.shape
    cos_err = cosine_error_bound(dtype, dim)
    err = score_error_bound(method, cos_err, dtype)
    hi, lo = dup_threshold + cos_err, min_similarity - cos_err  # beyond these a cosine is surely excluded
    keep = min(k + (slack or k + 16), n)
    txt_l, img_l = txt.to(dtype), img.to(dtype)
    out_i = np.empty((len(rows), k), dtype=np.int32)
    out_s = np.empty((len(rows), k), dtype=np.float32)
    fallback = []
    with torch.no_grad(), _full_precision_accumulation():
        for s in range(0, len(rows), block_size):
            q = torch.as_tensor(rows[s:s + block_size], device=txt.device)
            b = len(q)
            ct = txt_l[q] @ txt_l.T
            ci = img_l[q] @ img_l.T
            sure = (ct > hi).logical_or_(ct <= lo).logical_or_(ci > hi).logical_or_(ci <= lo)
            score = ct.mul_(ci) if method == "hpm" else (ct if method == "text" else ci)
            del ct, ci
            score.masked_fill_(sure, float("-inf"))
            del sure
            score[torch.arange(b, device=q.device), q] = float("-inf")
            low_vals, cand = torch.topk(score, keep, dim=1, sorted=True)
            del score
            # float32 re-scoring of the survivors with the exact rules
            sc = _rescore(txt, img, q, cand, method, dup_threshold, min_similarity)
            sc[torch.isinf(low_vals)] = float("-inf")
            out_i[s:s + b], out_s[s:s + b] = select_topk(sc, cand, k)
            # certificate: every dropped candidate scores at most low_vals[:, -1] + err in float32; strictly
            # above that, the k-th cannot even tie with one (ties are broken by index among all candidates)
            low_last = low_vals[:, -1].float().cpu().numpy()
            ok = np.isneginf(low_last) | (out_s[s:s + b, -1] > low_last + err)
            bad = np.flatnonzero(~ok)
            fallback.extend((s + bad).tolist())
            on_block(b)
        if fallback:
            redo = np.asarray(fallback)
            out_i[redo], out_s[redo] = search_exact(txt, img, rows[redo], k, method, dup_threshold,
                                                    min_similarity, block_size)
    if stats is not None:
        stats["fallback_rows"] = stats.get("fallback_rows", 0) + len(fallback)
    return out_i, out_s


def _rescore(txt: torch.Tensor, img: torch.Tensor, q: torch.Tensor, cand: torch.Tensor, method: str,
             dup_threshold: float, min_similarity: float) -> torch.Tensor:
    """float32 scores [b, m] of targets ``q`` against their own candidates ``cand`` [b, m], exact rules."""
    ct = torch.einsum("bd,bmd->bm", txt[q], txt[cand])
    ci = torch.einsum("bd,bmd->bm", img[q], img[cand])
    return score_with_rules(ct, ci, method, dup_threshold, min_similarity).masked_fill_(cand == q[:, None],
                                                                                        float("-inf"))
