"""Devices, ranks, precision and seeds: the plumbing that lets one loop run on a CPU, a GPU or under torchrun."""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank and world size of the joined process group (torchrun), or a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def auto_device(device: str) -> str:
    """``"auto"``: CUDA when present, else the CPU; any other name as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_device(device: str, info: DistInfo) -> str:
    """The device this process trains on (``auto`` resolved, ``cuda`` = this rank's GPU under torchrun)."""
    device = auto_device(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu.")
        if device == "cuda":
            device = f"cuda:{info.local_rank if info.world_size > 1 else torch.cuda.current_device()}"
        torch.cuda.set_device(torch.device(device))
    return device


def resolve_precision(precision: str, device: str) -> str:
    """AMP precision actually used: autocast only on CUDA (a no-op, logged, elsewhere)."""
    on_cuda = device.startswith("cuda")
    if precision == "auto":
        return "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("bf16", "fp16") and not on_cuda:
        log.warning("precision %s: AMP is used on CUDA only; training in fp32 on %s", precision, device)
        return "fp32"
    return precision


def autocast_for(precision: str, device: str):
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def step_seed(seed: int, step: int, micro: int = 0, rank: int = 0) -> int:
    """Seed for the random ops (dropout) of one forward pass: resume-exact and distinct per rank."""
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def loader_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Seed of the DataLoader's worker seeds for one epoch (random augmentations in workers)."""
    return step_seed(seed, epoch, 2**20, rank)  # micro index 2**20: a stream no forward pass uses


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model
