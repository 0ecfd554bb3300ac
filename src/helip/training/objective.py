"""What the loop minimises: CLIP's contrastive loss or SLIP's (CLIP + SimCLR), with HNML added on top.

An objective prepares the model it trains (SLIP wraps it with its SimCLR head
and augmentation), runs the forward pass, computes the losses, and keeps
whatever it adds to a checkpoint and to the run's output directory. The loop
and ``Trainer`` call these methods and know no objective by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from open_clip import ClipLoss

from ..losses import HardNegativeMarginLoss, HelipLoss
from ..slip import HEAD_FILE, build_slip_training, save_head
from .config import TrainConfig
from .distributed import DistInfo, unwrap


def features(out) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_features, text_features, logit_scale) from a tuple- or dict-returning OpenCLIP model."""
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


class ClipObjective:
    """OpenCLIP's ``ClipLoss`` (gathered across ranks, as open_clip_train) plus HNML on the local batch."""

    supports_accumulation = True

    def __init__(self, cfg: TrainConfig, info: DistInfo, hnml: Optional[HardNegativeMarginLoss]):
        self.cfg = cfg
        clip_loss = ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, cache_labels=True,
                             rank=info.rank, world_size=info.world_size)
        self.criterion = HelipLoss(clip_loss, hnml)

    def prepare(self, model: torch.nn.Module, device: str) -> torch.nn.Module:
        """The module the optimiser trains (before any DDP wrapper)."""
        return model

    def forward(self, model: torch.nn.Module, images, tokens):
        """(image_features, text_features, logit_scale, extra): ``extra`` goes to ``loss`` as is."""
        return (*features(model(images, tokens)), ())

    def loss(self, image_f, text_f, logit_scale, mask, extra=()) -> Dict[str, torch.Tensor]:
        """The weighted terms by name (OpenCLIP's ``output_dict`` contract): the loop sums them."""
        return self.criterion(image_f, text_f, logit_scale, mask, *extra, output_dict=True)

    def state_dict(self, model: torch.nn.Module) -> dict:
        return {}

    def load_state_dict(self, model: torch.nn.Module, state: dict) -> None:
        pass

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        """Files the final checkpoint needs beside ``model.pt`` (written before it)."""


class SlipObjective(ClipObjective):
    """SLIP's loss: the CLIP loss (+ HNML) plus ``ssl_scale`` x SimCLR on two augmented views (``helip.slip``)."""

    supports_accumulation = False  # the SimCLR embeddings are not cached across micro-batches

    def prepare(self, model: torch.nn.Module, device: str) -> torch.nn.Module:
        wrapped, self.criterion = build_slip_training(model, self.criterion, self.cfg.slip, self.cfg.pretrained,
                                                      device)
        return wrapped

    def forward(self, model: torch.nn.Module, images, tokens):
        out = model(images, tokens)
        return (*features(out), tuple(out[3:5]))

    def state_dict(self, model: torch.nn.Module) -> dict:
        return {"slip_head": {k: v.detach().cpu() for k, v in unwrap(model).head.state_dict().items()}}

    def load_state_dict(self, model: torch.nn.Module, state: dict) -> None:
        unwrap(model).head.load_state_dict(state["slip_head"])

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        save_head(unwrap(model).head, Path(out_dir) / HEAD_FILE)  # before model.pt: it always has its head


OBJECTIVES = {"clip": ClipObjective, "slip": SlipObjective}


def build_objective(cfg: TrainConfig, info: DistInfo, hnml: Optional[HardNegativeMarginLoss]) -> ClipObjective:
    return OBJECTIVES[cfg.objective](cfg, info, hnml)
