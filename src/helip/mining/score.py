"""The hard-pair score and its exclusion rules, on one block of targets.

score(i, j) = cos(text_i, text_j) * cos(image_i, image_j)  (method "hpm"),
or one of the two cosines alone (methods "text" and "image", the paper's
ablations). A candidate is excluded when it is the target itself, when either
cosine exceeds ``dup_threshold`` (a near-duplicate is a false negative, not a
hard one), or when either cosine is at most ``min_similarity``: a pair unlike
the target in both modalities has a positive product too (-0.9 x -0.9), but it
is not hard; the default 0.0 keeps the product meaningful.
"""
from __future__ import annotations

import torch

METHODS = ("hpm", "text", "image")


def block_scores(
    text_block: torch.Tensor,
    image_block: torch.Tensor,
    text_all: torch.Tensor,
    image_all: torch.Tensor,
    block_start: int,
    method: str,
    dup_threshold: float,
    min_similarity: float,
) -> torch.Tensor:
    """Scores [b, N] of targets ``block_start..block_start+b`` against all pairs.

    Excluded candidates get -inf. Inputs are L2-normalised float32 rows.
    """
    ct = text_block @ text_all.T
    ci = image_block @ image_all.T
    if method == "hpm":
        score = ct * ci
    elif method == "text":
        score = ct.clone()
    elif method == "image":
        score = ci.clone()
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    excluded = (ct > dup_threshold) | (ci > dup_threshold) | (ct <= min_similarity) | (ci <= min_similarity)
    rows = torch.arange(score.shape[0], device=score.device)
    excluded[rows, rows + block_start] = True
    return score.masked_fill_(excluded, float("-inf"))
