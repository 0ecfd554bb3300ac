"""`helip train`: continue training an OpenCLIP model with hard-pair batches and HNML.

One loop serves every variant, so comparisons are fair by construction:
pretraining from scratch and the baseline are this loop with random batches
(``hard_pairs=None``) and no margin loss; HELIP is the same loop with
``HardPairBatchSampler`` batches and ``HardNegativeMarginLoss``. Optimiser and
schedule follow open_clip_train: AdamW without weight decay on gains, biases
and the temperature, linear warm-up then cosine decay (OpenCLIP's own
``cosine_lr``), logit scale clamped at 100.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from open_clip import ClipLoss
from open_clip_train.scheduler import cosine_lr
from tqdm.auto import tqdm

from .data.pairs import PairTensors
from .errors import ConfigError
from .io import save_json
from .losses import HardNegativeMarginLoss, HelipLoss, hard_partner_mask
from .mining.store import HardPairs
from .models import DEMO_MODEL, load_model, save_checkpoint
from .sampler import HardPairBatchSampler
from .slip import HEAD_FILE, SlipConfig, build_slip_training, save_head

log = logging.getLogger(__name__)


OBJECTIVES = ("clip", "slip")


@dataclass
class TrainConfig:
    """Continued-training options. ``hard_per_target=0`` or no hard pairs gives random batches."""

    model: str = DEMO_MODEL
    pretrained: Optional[str] = None
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3  # chosen on the demo world's validation split; real checkpoints want ~1e-5..1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 20
    seed: int = 0
    hard_per_target: int = 1
    top_k: int = 50
    hnml_weight: float = 1.0
    hnml_margin: float = 0.2
    device: str = "cpu"
    log_every: int = 10
    progress: bool = True
    objective: str = "clip"  # "clip": OpenCLIP's ClipLoss; "slip": SLIP's CLIP + SimCLR loss (see helip.slip)
    slip: SlipConfig = field(default_factory=SlipConfig)

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}.")
        if self.objective == "slip":
            self.slip.validate()
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}.")
        if self.hnml_weight < 0 or self.hnml_margin < 0:
            raise ConfigError("hnml_weight and hnml_margin must be non-negative.")


@dataclass
class TrainResult:
    checkpoint: Path
    history: List[dict] = field(default_factory=list)
    seconds: float = 0.0


def _param_groups(model: torch.nn.Module, weight_decay: float):
    def no_decay(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
    ]


def train(cfg: TrainConfig, pairs: PairTensors, out_dir: Path, hard: Optional[HardPairs] = None) -> TrainResult:
    """Train for ``cfg.steps`` optimiser steps; write ``model.pt``, ``train_log.jsonl``, ``train_config.json``.

    ``model.pt`` is a plain state dict: ``open_clip.create_model(cfg.model,
    pretrained=path)`` loads it.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    lm = load_model(cfg.model, cfg.pretrained, device=cfg.device)
    model = lm.model.train()
    use_hard = hard is not None and cfg.hard_per_target > 0
    sampler = HardPairBatchSampler(
        hard.indices if use_hard else None, cfg.batch_size, cfg.hard_per_target if use_hard else 0,
        cfg.top_k, seed=cfg.seed, num_samples=len(pairs), drop_last=True)
    hnml = HardNegativeMarginLoss(cfg.hnml_margin, cfg.hnml_weight) if use_hard and cfg.hnml_weight > 0 else None
    criterion = HelipLoss(ClipLoss(), hnml)
    slip = cfg.objective == "slip"
    if slip:  # the model also returns two views' SimCLR embeddings; the loss adds ssl_scale x SimCLR
        model, criterion = build_slip_training(model, criterion, cfg.slip, cfg.pretrained, cfg.device)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = cosine_lr(optimizer, cfg.lr, cfg.warmup_steps, cfg.steps)

    log_path = out_dir / "train_log.jsonl"
    history: List[dict] = []
    step, epoch = 0, 0
    t_start = time.perf_counter()
    t_window, samples_window = t_start, 0
    with open(log_path, "w") as log_file, tqdm(total=cfg.steps, desc="training", disable=not cfg.progress) as bar:
        while step < cfg.steps:
            sampler.set_epoch(epoch)
            for batch in sampler:
                if step >= cfg.steps:
                    break
                lr = schedule(step)
                idx = torch.as_tensor(batch)
                images = pairs.images[idx].to(cfg.device, non_blocking=True)
                tokens = pairs.tokens[idx].to(cfg.device, non_blocking=True)
                mask = hard_partner_mask(batch, hard.indices, cfg.top_k, device=cfg.device) if hnml else None
                out = model(images, tokens)
                image_f, text_f, logit_scale = out[:3]
                losses = criterion(image_f, text_f, logit_scale, mask, *(out[3:5] if slip else ()))
                optimizer.zero_grad(set_to_none=True)
                losses["total"].backward()
                optimizer.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                step += 1
                samples_window += len(batch)
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    now = time.perf_counter()
                    rec = {"step": step, "epoch": epoch, "lr": lr,
                           **{k: float(v.detach()) for k, v in losses.items()},
                           "logit_scale": float(logit_scale.detach()),
                           "samples_per_second": round(samples_window / max(now - t_window, 1e-9), 1)}
                    if mask is not None:
                        rec["partners_per_sample"] = float(mask.sum(1).float().mean())
                    t_window, samples_window = now, 0
                    history.append(rec)
                    log_file.write(json.dumps(rec) + "\n")
                    log_file.flush()
                    bar.set_postfix(loss=f"{rec['total']:.3f}")
            epoch += 1
    seconds = time.perf_counter() - t_start
    if slip:  # before model.pt, so a model.pt from a SLIP run always has its head beside it
        save_head(model.head, out_dir / HEAD_FILE)
    ckpt = save_checkpoint(lm.model, out_dir / "model.pt")
    save_json(out_dir / "train_config.json", {**asdict(cfg), "hard_pairs_meta": hard.meta if use_hard else None,
                                              "epochs_started": epoch, "seconds": round(seconds, 2)})
    log.info("trained %d steps in %.1fs -> %s", cfg.steps, seconds, ckpt)
    return TrainResult(checkpoint=ckpt, history=history, seconds=seconds)
