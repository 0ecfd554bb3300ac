"""HELIP's losses: the Hard Negative Margin Loss, composed with OpenCLIP's ClipLoss.

HNML (METHOD.md section 2), with s the cosine similarity:

    HNML_i = mean over hard partners j of i present in the batch of
             [ max(0, margin + s(I_i, T_j) - s(I_i, T_i))
             + max(0, margin + s(I_j, T_i) - s(I_i, T_i)) ]
    total  = L_main + weight * mean_i HNML_i

The mean over i runs over the samples that have at least one partner in the
batch; a batch with none adds zero. Which pairs count as partners is a boolean
[B, B] mask built by ``hard_partner_mask`` from the mined lists, so the loss
itself knows nothing about samplers or datasets.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import ClipLoss
from torch import nn


def hard_partner_mask(batch_indices, hard_pairs: np.ndarray, top_k: int = 50, symmetric: bool = True,
                      device=None) -> torch.Tensor:
    """mask[a, b] is True when batch member b is among the first ``top_k`` hard pairs of member a.

    ``symmetric=True`` also counts a as a partner of b when b lists a: a hard
    pair is a confusable *pair of pairs*, whichever of the two was the target.
    For a mask per training step, build a ``PartnerMasker`` once instead.
    """
    return PartnerMasker(hard_pairs, top_k, symmetric)(batch_indices, device)


class PartnerMasker:
    """``hard_partner_mask`` for many batches: O(B * top_k) per batch, not O(B^2 * top_k).

    Keeps a position table over all N pairs (int32, reset after each batch),
    so looking up where each list entry sits in the batch is one gather.
    """

    def __init__(self, hard_pairs: np.ndarray, top_k: int = 50, symmetric: bool = True):
        self.hard = hard_pairs
        self.top_k, self.symmetric = top_k, symmetric
        self.where = np.full(len(hard_pairs) + 1, -1, dtype=np.int32)  # last slot: the -1 padding

    def __call__(self, batch_indices, device=None) -> torch.Tensor:
        idx = np.asarray(batch_indices, dtype=np.int64)
        lists = np.asarray(self.hard[idx, :self.top_k], dtype=np.int64)
        n = len(idx)
        self.where[idx] = np.arange(n, dtype=np.int32)
        try:
            if not np.array_equal(self.where[idx], np.arange(n)):
                # a pair twice in the batch (micro-batches accumulated together): mark every copy
                mask = (lists[:, :, None] == idx[None, None, :]).any(axis=1)
                if self.symmetric:
                    mask |= mask.T
            else:
                pos = self.where[lists]  # -1 padding reads the last slot, which stays -1
                rows, cols = np.nonzero(pos >= 0)
                cols = pos[rows, cols]
                mask = np.zeros((n, n), dtype=bool)
                mask[rows, cols] = True
                if self.symmetric:
                    mask[cols, rows] = True
        finally:
            self.where[idx] = -1
        np.fill_diagonal(mask, False)
        return torch.from_numpy(mask).to(device)


class HardNegativeMarginLoss(nn.Module):
    """The weighted HNML term: ``weight * mean_i HNML_i`` (add it to the main loss)."""

    def __init__(self, margin: float = 0.2, weight: float = 1.0):
        super().__init__()
        self.margin = margin
        self.weight = weight

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                partner_mask: torch.Tensor) -> torch.Tensor:
        img = F.normalize(image_features, dim=-1)
        txt = F.normalize(text_features, dim=-1)
        sim = img @ txt.T                       # sim[a, b] = s(I_a, T_b)
        pos = sim.diagonal().unsqueeze(1)       # s(I_i, T_i), as a column
        mask = partner_mask.to(device=sim.device, dtype=sim.dtype)
        i2t = F.relu(self.margin + sim - pos)   # [i, j]: s(I_i, T_j) vs s(I_i, T_i)
        t2i = F.relu(self.margin + sim.T - pos)  # [i, j]: s(I_j, T_i) vs s(I_i, T_i)
        count = mask.sum(dim=1)
        # mean over the samples that have partners, written without data-dependent indexing or a
        # Python branch, which would make the host wait for the GPU at every step
        per_sample = ((i2t + t2i) * mask).sum(dim=1) / count.clamp(min=1)
        n_with = (count > 0).sum().clamp(min=1)
        return self.weight * per_sample.sum() / n_with


class HelipLoss(nn.Module):
    """OpenCLIP's ClipLoss plus, when given, the HNML term.

    ``clip_loss`` is a stock ``open_clip.ClipLoss`` (pass rank/world_size for
    distributed training: it gathers features across ranks); HNML works on the
    local batch, where the sampler put each target beside its partners.
    """

    def __init__(self, clip_loss: Optional[ClipLoss] = None, hnml: Optional[HardNegativeMarginLoss] = None):
        super().__init__()
        self.clip_loss = clip_loss or ClipLoss()
        self.hnml = hnml

    def forward(self, image_features, text_features, logit_scale,
                partner_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        contrastive = self.clip_loss(image_features, text_features, logit_scale)
        out = {"contrastive": contrastive}
        total = contrastive
        if self.hnml is not None and partner_mask is not None:
            out["hnml"] = self.hnml(image_features, text_features, partner_mask)
            total = total + out["hnml"]
        out["total"] = total
        return out
