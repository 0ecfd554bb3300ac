"""``Trainer``: model, optimiser, schedule, scaler and losses; ``step`` performs one optimiser step."""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from open_clip_train.scheduler import cosine_lr

from ..errors import ConfigError
from ..losses import HardNegativeMarginLoss, PartnerMasker
from .config import TrainConfig
from .distributed import DistInfo, autocast_for, resolve_precision, step_seed, unwrap
from .objective import build_objective


def _param_groups(model: torch.nn.Module, weight_decay: float):
    def no_decay(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
    ]


def freeze_tower(model: torch.nn.Module, tower: Optional[str]) -> None:
    """Freeze the image or text tower with OpenCLIP's own LiT-style locks (logit scale stays trainable)."""
    if tower is None:
        return
    if tower == "image":
        model.lock_image_tower(unlocked_groups=0)
    elif tower == "text":
        model.lock_text_tower(unlocked_layers=0)
    else:
        raise ConfigError(f"freeze must be 'image' or 'text', got {tower!r}.")


class Trainer:
    """Model, optimiser, schedule, scaler and losses; ``step`` performs one optimiser step.

    The training loop and the benchmark both drive this class, so what the
    benchmark times is what ``helip train`` runs.

    Gradient accumulation (``accum_steps > 1``) is open_clip_train's
    feature-caching scheme: features of all micro-batches are first computed
    without gradients, then each micro-batch is recomputed with gradients and
    its features replace its cached ones in the full concatenation before the
    loss. The summed gradients equal those of one batch ``accum_steps`` times
    larger, for the contrastive loss (every sample sees all others as
    negatives) and for HNML (its partner mask spans the concatenation). The
    price is one extra forward pass without gradients. Dropout is reseeded
    identically for the cached and the recomputed pass of a micro-batch, and
    only the last pass lets the logit scale's gradient through (open_clip_train
    lets every pass add it, multiplying it by the number of micro-batches).
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: str, info: Optional[DistInfo] = None,
                 hard_indices: Optional[np.ndarray] = None):
        self.cfg, self.device = cfg, device
        self.info = info or DistInfo()
        self.precision = resolve_precision(cfg.precision, device)
        self.autocast = autocast_for(self.precision, device)
        freeze_tower(model, cfg.freeze)
        model.train()
        self.clip_model = model  # what model.pt and stock OpenCLIP get (SLIP's head is saved beside it)
        self.hard_indices = hard_indices
        self.masker = PartnerMasker(hard_indices, cfg.top_k) if hard_indices is not None else None
        use_hnml = hard_indices is not None and cfg.hnml_weight > 0
        self.hnml = HardNegativeMarginLoss(cfg.hnml_margin, cfg.hnml_weight) if use_hnml else None
        # CLIP or SLIP: the objective prepares the trained module and computes the losses
        self.objective = build_objective(cfg, self.info, self.hnml)
        model = self.objective.prepare(model, device)
        if self.info.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[torch.device(device).index]
                                            if device.startswith("cuda") else None)
        self.model = model
        self.optimizer = torch.optim.AdamW(_param_groups(unwrap(model), cfg.weight_decay), lr=cfg.lr,
                                           betas=(0.9, 0.98), eps=1e-6)
        self.schedule = cosine_lr(self.optimizer, cfg.lr, cfg.warmup_steps, cfg.steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")

    def set_hard_pairs(self, hard_indices: np.ndarray) -> None:
        """HNML's partners from these lists from now on (re-mining)."""
        if self.masker is not None:
            self.masker = PartnerMasker(hard_indices, self.cfg.top_k)

    def _mask(self, indices: torch.Tensor) -> Optional[torch.Tensor]:
        if self.hnml is None:
            return None
        mask = self.masker(indices.numpy())
        if self.device.startswith("cuda"):  # pinned + non_blocking: no host-device sync at every step
            return mask.pin_memory().to(self.device, non_blocking=True)
        return mask

    def _seed(self, step: int, micro: int) -> None:
        torch.manual_seed(step_seed(self.cfg.seed, step, micro, self.info.rank))

    def _forward(self, images, tokens):
        """(image_features, text_features, logit_scale, extra): extra holds SLIP's two view embeddings."""
        return self.objective.forward(self.model, images, tokens)

    def step(self, micro_batches: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], step: int) -> Dict:
        """One optimiser step on ``accum_steps`` micro-batches of ``(indices, images, tokens)``.

        Returns detached loss tensors (no device sync here; the caller syncs
        only when it logs) plus ``lr`` and, with HNML, the partner mask.
        """
        lr = self.schedule(step)
        moved = [(idx, im.to(self.device, non_blocking=True), tok.to(self.device, non_blocking=True))
                 for idx, im, tok in micro_batches]
        mask = self._mask(torch.cat([m[0] for m in moved]) if len(moved) > 1 else moved[0][0])
        self.optimizer.zero_grad(set_to_none=True)
        if len(moved) == 1:
            _, images, tokens = moved[0]
            self._seed(step, 0)
            with self.autocast():
                image_f, text_f, logit_scale, extra = self._forward(images, tokens)
                losses = self.objective.loss(image_f, text_f, logit_scale, mask, extra)
                total = sum(losses.values())
            self.scaler.scale(total).backward()
        else:
            cached_img, cached_txt = [], []
            with torch.no_grad():
                for j, (_, images, tokens) in enumerate(moved):
                    self._seed(step, j)
                    with self.autocast():
                        image_f, text_f, _, _ = self._forward(images, tokens)
                    cached_img.append(image_f)
                    cached_txt.append(text_f)
            for j, (_, images, tokens) in enumerate(moved):
                last = j == len(moved) - 1
                sync = nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
                with sync:
                    self._seed(step, j)
                    with self.autocast():
                        image_f, text_f, logit_scale, _ = self._forward(images, tokens)
                        # every pass computes the whole loss: let only one carry the temperature's gradient
                        scale = logit_scale if last else logit_scale.detach()
                        all_img = torch.cat(cached_img[:j] + [image_f] + cached_img[j + 1:])
                        all_txt = torch.cat(cached_txt[:j] + [text_f] + cached_txt[j + 1:])
                        losses = self.objective.loss(all_img, all_txt, scale, mask)
                        total = sum(losses.values())
                    self.scaler.scale(total).backward()
        if self.cfg.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            unwrap(self.model).logit_scale.clamp_(0, math.log(100))
        # log names without OpenCLIP's "_loss" suffix (contrastive, hnml, ssl), and their sum
        out = {k[:-len("_loss")] if k.endswith("_loss") else k: v.detach() for k, v in losses.items()}
        out["total"] = total.detach()
        out["logit_scale"] = logit_scale.detach()
        out["lr"] = lr
        out["mask"] = mask
        return out

    # -- resumable state -------------------------------------------------------------------------

    def state_dict(self, step: int, epoch: int, extra: Optional[dict] = None) -> dict:
        """Everything a resumed run needs; ``state_dict`` also makes it loadable by stock OpenCLIP."""
        state = {
            "state_dict": {k: v.detach().cpu() for k, v in self.clip_model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": step,
            "sampler_epoch": epoch,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "config": asdict(self.cfg),
        }
        state.update(self.objective.state_dict(self.model))
        state.update(extra or {})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.clip_model.load_state_dict(state["state_dict"])
        self.objective.load_state_dict(self.model, state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
