"""``TrainConfig``: the options of one training run (what ``helip train``'s flags fill in)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from .. import defaults
from ..errors import ConfigError
from ..sampler import TEMPERATURE_MODES
from ..slip import SlipConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FREEZE = ("image", "text")
OBJECTIVES = ("clip", "slip")


@dataclass
class TrainConfig:
    """Continued-training options. ``hard_per_target=0`` or no hard pairs gives random batches.

    ``batch_size`` is per rank and per micro-batch: an optimiser step sees
    ``batch_size * accum_steps * world_size`` samples.
    """

    model: Optional[str] = None      # OpenCLIP model name or JSON config (or pass train(model=...) an object)
    pretrained: Optional[str] = None
    steps: int = 300
    batch_size: int = 128
    lr: float = defaults.LR          # continued training of a real checkpoint; the demo sets its own
    weight_decay: float = 0.1
    warmup_steps: int = 20
    seed: int = 0
    # HELIP's batches and loss: helip.defaults holds the values and says what they mean
    hard_per_target: int = defaults.HARD_PER_TARGET
    hard_fraction: float = defaults.HARD_FRACTION
    top_k: int = defaults.TOP_K
    hard_temperature: float = defaults.HARD_TEMPERATURE
    hard_temperature_mode: str = defaults.HARD_TEMPERATURE_MODE
    remine_every: int = 0            # re-mine the hard pairs with the current model every N epochs (0: never)
    hnml_weight: float = defaults.HNML_WEIGHT
    hnml_margin: float = defaults.HNML_MARGIN
    device: str = "auto"             # auto: CUDA when present, else the CPU
    log_every: int = 10
    progress: bool = True
    objective: str = "clip"          # "clip": OpenCLIP's ClipLoss; "slip": SLIP's CLIP + SimCLR loss (helip.slip)
    slip: SlipConfig = field(default_factory=SlipConfig)
    precision: str = "auto"          # auto: bf16 autocast on CUDA, fp32 elsewhere
    accum_steps: int = 1             # micro-batches per optimiser step (feature-caching accumulation)
    freeze: Optional[str] = None     # "image" or "text": that tower's weights stay as loaded
    workers: int = 0                 # DataLoader worker processes
    save_every: int = 0              # resumable checkpoint every N steps (0: only the final one)
    resume: Optional[str] = None     # None: fresh run; "auto": latest checkpoint in out_dir; or a checkpoint path
    local_loss: bool = False         # OpenCLIP ClipLoss options for multi-GPU runs
    gather_with_grad: bool = False
    grad_clip_norm: Optional[float] = None
    # weight-space ensemble (WiSE-FT): model.pt = start + interpolate x (trained - start), 1: the trained weights
    interpolate: float = 1.0
    tensorboard: bool = False        # also write TensorBoard scalars to out_dir/tensorboard

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}.")
        if self.objective == "slip":
            self.slip.validate()
            if self.accum_steps > 1:
                raise ConfigError("--objective slip does not support --accum-steps > 1 yet (the SimCLR "
                                  "embeddings are not cached across micro-batches); use a smaller batch.")
        for name in ("steps", "batch_size", "accum_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("workers", "save_every", "warmup_steps", "remine_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}.")
        if self.hard_temperature < 0:
            raise ConfigError(f"hard_temperature must be 0 (uniform choice) or positive, got {self.hard_temperature}.")
        if self.hard_temperature_mode not in TEMPERATURE_MODES:
            raise ConfigError(f"hard_temperature_mode must be one of {', '.join(TEMPERATURE_MODES)}, "
                              f"got {self.hard_temperature_mode!r}.")
        if self.hnml_weight < 0 or self.hnml_margin < 0:
            raise ConfigError("hnml_weight and hnml_margin must be non-negative.")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if self.freeze is not None and self.freeze not in FREEZE:
            raise ConfigError(f"freeze must be 'image' or 'text', got {self.freeze!r}.")
        if not 0 < self.interpolate <= 1:
            raise ConfigError(f"interpolate must be in (0, 1] (1: the trained weights), got {self.interpolate}.")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ConfigError(f"grad_clip_norm must be positive, got {self.grad_clip_norm}.")


@dataclass
class TrainResult:
    checkpoint: Path
    history: List[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: Optional[int] = None
    model: Optional[torch.nn.Module] = None  # the trained model (this rank's replica), unwrapped from DDP


def steps_for_epochs(n_pairs: int, epochs: float, batch_size: int, accum_steps: int = 1, world_size: int = 1) -> int:
    """Optimiser steps in which the model sees ``epochs`` times ``n_pairs`` image-text pairs.

    An epoch is counted in pairs seen, not in targets: a HELIP batch of 128 is
    64 targets and 64 partners, so the sampler's own epoch (every pair a target
    once) is twice as many steps as a random-batch epoch. Counting pairs gives
    baseline and HELIP the same number of steps, hence the same pairs seen.
    """
    for name, v in (("batch_size", batch_size), ("accum_steps", accum_steps), ("world_size", world_size)):
        if v < 1:
            raise ConfigError(f"{name} must be at least 1, got {v}.")
    if n_pairs < 1 or not epochs > 0:
        raise ConfigError(f"epochs must be positive and the data non-empty, got {epochs} epochs of {n_pairs} pairs.")
    return max(1, math.ceil(epochs * n_pairs / (batch_size * accum_steps * world_size)))
