"""HELIP's losses: the Hard Negative Margin Loss, composed with OpenCLIP's ClipLoss; SLIP's SimCLR term.

HNML (docs/design.md, "The method"), with s the cosine similarity:

    HNML_i = mean over hard partners j of i present in the batch of
             [ max(0, margin + s(I_i, T_j) - s(I_i, T_i))
             + max(0, margin + s(I_j, T_i) - s(I_i, T_i)) ]
    total  = L_main + weight * mean_i HNML_i

The mean over i runs over the samples that have at least one partner in the
batch; a batch with none adds zero. Which pairs count as partners is a boolean
[B, B] mask built by ``hard_partner_mask`` from the mined lists, so the loss
itself knows nothing about samplers or datasets.

For SLIP models the main loss is SLIP's: CLIP loss + ssl_scale x SimCLR
(NT-Xent) loss on two augmented views of each image (``SimCLRLoss``,
``SlipLoss``); HNML is added on top exactly as for CLIP.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import torch.distributed as dist
from open_clip import ClipLoss
from open_clip.loss import gather_features
from torch import nn

from . import defaults


def hard_partner_mask(batch_indices, hard_pairs: np.ndarray, top_k: int = defaults.TOP_K, symmetric: bool = True,
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

    def __init__(self, hard_pairs, top_k: int = defaults.TOP_K, symmetric: bool = True):
        """``hard_pairs``: the [N, k] index lists, or a ``HardPairs`` (its ``indices``)."""
        self.hard = getattr(hard_pairs, "indices", hard_pairs)
        self.top_k, self.symmetric = top_k, symmetric
        self.where = np.full(len(self.hard) + 1, -1, dtype=np.int32)  # last slot: the -1 padding

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

    def __init__(self, margin: float = defaults.HNML_MARGIN, weight: float = defaults.HNML_WEIGHT):
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
    """OpenCLIP's ClipLoss plus, when given, the HNML term, under OpenCLIP's loss contract.

    ``clip_loss`` is a stock ``open_clip.ClipLoss`` (pass rank/world_size for
    distributed training: it gathers features across ranks); HNML works on the
    local batch, where the sampler put each target beside its partners.

    Like OpenCLIP's losses, ``forward(..., output_dict=True)`` returns the
    weighted terms by name, ``{"contrastive_loss": ..., "hnml_loss": ...}``
    (no total: open_clip_train sums the values), and without ``output_dict``
    their sum. ``hnml_loss`` is absent when there is no HNML or no mask.
    """

    def __init__(self, clip_loss: Optional[ClipLoss] = None, hnml: Optional[HardNegativeMarginLoss] = None):
        super().__init__()
        self.clip_loss = clip_loss or ClipLoss()
        self.hnml = hnml

    def forward(self, image_features, text_features, logit_scale, partner_mask: Optional[torch.Tensor] = None,
                output_dict: bool = False):
        out = {"contrastive_loss": self.clip_loss(image_features, text_features, logit_scale)}
        if self.hnml is not None and partner_mask is not None:
            out["hnml_loss"] = self.hnml(image_features, text_features, partner_mask)
        return out if output_dict else sum(out.values())


class SimCLRLoss(nn.Module):
    """SimCLR's NT-Xent loss on two views, as SLIP computes it (temperature 0.1 by default).

    With q_a, q_b the L2-normalised embeddings of the two views of this rank's
    images and k_a, k_b the same gathered from every rank, image i's view a
    must pick its own view b among all view-b keys and all *other* view-a keys:

        loss_a(i) = -log softmax_i([q_a(i) . k_b, q_a(i) . k_a with i masked] / t)

    symmetrically for view b, and the loss is (mean loss_a + mean loss_b) / 2.
    Under torch.distributed the keys are gathered across ranks like
    OpenCLIP's ClipLoss does (``open_clip.loss.gather_features``), with
    gradients through the gathered keys by default as in SLIP; rank and world
    size are read from the initialised process group unless given.
    """

    def __init__(self, temperature: float = 0.1, gather_with_grad: bool = True,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size

    def _rank_world(self):
        if self.world_size is not None:
            return self.rank or 0, self.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def forward(self, aug1_embed: torch.Tensor, aug2_embed: torch.Tensor) -> torch.Tensor:
        q_a = F.normalize(aug1_embed, dim=-1)
        q_b = F.normalize(aug2_embed, dim=-1)
        n = q_a.shape[0]
        rank, world = self._rank_world()
        if world > 1:
            k_a, k_b = gather_features(q_a, q_b, local_loss=False, gather_with_grad=self.gather_with_grad,
                                       rank=rank, world_size=world)
        else:
            k_a, k_b = q_a, q_b
        labels = torch.arange(n, device=q_a.device) + n * rank
        self_mask = F.one_hot(labels, k_a.shape[0]).to(torch.bool)
        t = self.temperature
        aa = (q_a @ k_a.T / t).masked_fill(self_mask, float("-inf"))
        bb = (q_b @ k_b.T / t).masked_fill(self_mask, float("-inf"))
        ab = q_a @ k_b.T / t
        ba = q_b @ k_a.T / t
        loss_a = F.cross_entropy(torch.cat([ab, aa], dim=1), labels)
        loss_b = F.cross_entropy(torch.cat([ba, bb], dim=1), labels)
        return (loss_a + loss_b) / 2


class SlipLoss(nn.Module):
    """SLIP's objective plus HELIP: ``HelipLoss`` (CLIP loss + HNML) + ``ssl_scale`` x ``SimCLRLoss``."""

    def __init__(self, helip_loss: Optional[HelipLoss] = None, simclr: Optional[SimCLRLoss] = None,
                 ssl_scale: float = 1.0):
        super().__init__()
        self.helip_loss = helip_loss or HelipLoss()
        self.simclr = simclr or SimCLRLoss()
        self.ssl_scale = ssl_scale

    def forward(self, image_features, text_features, logit_scale, partner_mask: Optional[torch.Tensor] = None,
                aug1_embed: Optional[torch.Tensor] = None, aug2_embed: Optional[torch.Tensor] = None,
                output_dict: bool = False):
        """As ``HelipLoss``, plus ``"ssl_loss"`` = ``ssl_scale`` x SimCLR (weighted, like every term)."""
        if aug1_embed is None or aug2_embed is None:
            raise ValueError("SlipLoss needs the SimCLR embeddings of both augmented views")
        out = self.helip_loss(image_features, text_features, logit_scale, partner_mask, output_dict=True)
        out["ssl_loss"] = self.ssl_scale * self.simclr(aug1_embed, aug2_embed)
        return out if output_dict else sum(out.values())
