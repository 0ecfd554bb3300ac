"""Exact hard pair mining: every pair scored against every other, in blocks.

Memory is O(block x N + N x d): a block of targets is scored against all N
candidates, reduced to its top-k, and discarded before the next block.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, InputError
from .score import METHODS, block_scores
from .store import HardPairs

log = logging.getLogger(__name__)


@dataclass
class MineConfig:
    """Options of ``mine_hard_pairs`` and ``helip mine``."""

    k: int = 50
    mode: str = "exact"
    method: str = "hpm"
    dup_threshold: float = 0.98
    min_similarity: float = 0.0
    block_size: int = 1024
    device: str = "cpu"
    seed: int = 0
    progress: bool = True

    def validate(self, n: int) -> None:
        if self.mode != "exact":
            raise ConfigError(f"mode {self.mode!r} is not available yet; use --mode exact.")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}.")
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}.")
        if self.k > n - 1:
            raise ConfigError(f"k={self.k} is larger than the {n - 1} other pairs in a {n}-pair dataset; "
                              f"use --k {max(n - 1, 1)} or less.")
        if not -1.0 <= self.min_similarity < self.dup_threshold <= 1.0:
            raise ConfigError(f"need -1 <= min_similarity < dup_threshold <= 1, got "
                              f"{self.min_similarity} and {self.dup_threshold}.")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be positive, got {self.block_size}.")


def _normalised(x: np.ndarray, what: str, device: str) -> torch.Tensor:
    t = torch.from_numpy(np.array(x, dtype=np.float32)).to(device)  # a copy: inputs may be read-only memmaps
    if t.ndim != 2:
        raise InputError(f"{what} embeddings must be a 2-D array [N, d], got shape {tuple(t.shape)}.")
    if not torch.isfinite(t).all():
        raise InputError(f"{what} embeddings contain NaN or infinity; re-run `helip embed`.")
    return torch.nn.functional.normalize(t, dim=1)


def mine_hard_pairs(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    config: Optional[MineConfig] = None,
    **overrides,
) -> HardPairs:
    """Find each pair's hard pairs: the k best-scoring other pairs, best first.

    ``image_embeddings`` and ``text_embeddings`` are [N, d] arrays (any float
    dtype; normalised here) whose row i describes pair i. Returns ``HardPairs``
    with ``indices`` int32 [N, k] (-1 where fewer than k candidates qualify) and
    ``scores`` float32 [N, k] (-inf at those places). Options are those of
    ``MineConfig``; keyword overrides are applied on top of ``config``.
    """
    cfg = MineConfig(**{**asdict(config or MineConfig()), **overrides})
    if len(image_embeddings) != len(text_embeddings):
        raise InputError(f"image and text embeddings have {len(image_embeddings)} and {len(text_embeddings)} rows; "
                         f"row i of both must be pair i. Re-run `helip embed`.")
    n = len(image_embeddings)
    cfg.validate(n)
    img = _normalised(image_embeddings, "image", cfg.device)
    txt = _normalised(text_embeddings, "text", cfg.device)
    indices = np.empty((n, cfg.k), dtype=np.int32)
    scores = np.empty((n, cfg.k), dtype=np.float32)
    t0 = time.perf_counter()
    with torch.no_grad(), tqdm(total=n, unit="pair", desc="mining", disable=not cfg.progress) as bar:
        for start in range(0, n, cfg.block_size):
            stop = min(start + cfg.block_size, n)
            s = block_scores(txt[start:stop], img[start:stop], txt, img, start,
                             cfg.method, cfg.dup_threshold, cfg.min_similarity)
            vals, idx = torch.topk(s, cfg.k, dim=1, largest=True, sorted=True)
            idx[torch.isinf(vals)] = -1
            indices[start:stop] = idx.cpu().numpy()
            scores[start:stop] = vals.cpu().numpy()
            bar.update(stop - start)
    seconds = time.perf_counter() - t0
    meta = {
        "mode": cfg.mode, "method": cfg.method, "k": cfg.k, "dup_threshold": cfg.dup_threshold,
        "min_similarity": cfg.min_similarity, "candidate_pool": "all", "seed": cfg.seed, "n": n,
        "device": cfg.device, "block_size": cfg.block_size,
        "timings": {"mine_seconds": round(seconds, 3), "pairs_per_second": round(n / max(seconds, 1e-9), 1)},
        "padded_rows": int((indices[:, -1] < 0).sum()),
    }
    log.info("mined %d pairs in %.1fs (%d rows with fewer than k=%d hard pairs)",
             n, seconds, meta["padded_rows"], cfg.k)
    return HardPairs(indices=indices, scores=scores, meta=meta)
