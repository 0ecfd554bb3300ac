"""`helip train`: continue training an OpenCLIP model with hard-pair batches and HNML.

One loop serves every variant, so comparisons are fair by construction:
pretraining from scratch and the baseline are this loop with random batches
(``hard_pairs=None``) and no margin loss; HELIP is the same loop with
``HardPairBatchSampler`` batches and ``HardNegativeMarginLoss``. Optimiser and
schedule follow open_clip_train: AdamW without weight decay on gains, biases
and the temperature, linear warm-up then cosine decay (OpenCLIP's own
``cosine_lr``), logit scale clamped at 100.

The same loop runs on a CPU, one GPU, or many under ``torchrun``:

- data: any map-style ``Dataset`` whose ``__getitem__(i)`` returns
  ``(image_tensor, token_tensor)``, read through a ``DataLoader`` whose
  ``batch_sampler`` is the ``HardPairBatchSampler`` (workers configurable);
- DDP: the sampler shards targets by rank and keeps each target's partners in
  its batch; OpenCLIP's ``ClipLoss`` gathers features across ranks (with its
  ``local_loss`` / ``gather_with_grad`` options, as open_clip_train); HNML is
  computed on each rank's own batch, where the partners are;
- AMP (bf16, or fp16 with a GradScaler) on GPU; a no-op on CPU;
- gradient accumulation as open_clip_train does it (``Trainer.step``): the
  contrastive loss and HNML see all micro-batches of a step as one batch;
- exact resume: the sampler order is a function of (seed, epoch), the position
  in the epoch a function of the step, and dropout is reseeded from (seed,
  step, micro-batch, rank) before every forward pass, so a run resumed from a
  checkpoint retraces the uninterrupted run's steps;
- re-mining (``remine_every``, ``helip.remine``): at the start of every E-th
  epoch the hard pairs are mined again with the current model; checkpoints
  name the lists in use, so a resumed run continues with the same ones.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from open_clip import ClipLoss
from open_clip_train.scheduler import cosine_lr
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .errors import ConfigError, InputError
from .io import save_json, save_text, save_torch
from .losses import HardNegativeMarginLoss, HelipLoss, PartnerMasker
from .mining.store import HardPairs
from .models import DEMO_MODEL, load_model, save_checkpoint
from .remine import REMINED_DIR, Remining
from .sampler import TEMPERATURE_MODES, HardPairBatchSampler
from .slip import HEAD_FILE, SlipConfig, build_slip_training, save_head

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FREEZE = ("image", "text")
CHECKPOINT_DIR = "checkpoints"
_CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
# options that change the trajectory: a resumed run must use the same values
_TRAJECTORY = ("model", "steps", "batch_size", "accum_steps", "lr", "weight_decay", "warmup_steps", "seed",
               "hard_per_target", "hard_fraction", "top_k", "hnml_weight", "hnml_margin", "freeze",
               "local_loss", "gather_with_grad", "grad_clip_norm", "objective", "slip", "remine_every",
               "hard_temperature", "hard_temperature_mode")
# what an option added later meant for checkpoints written before it existed (default: its current default)
_LEGACY = {"hard_temperature_mode": "absolute"}  # before it existed, the temperature was in score units


OBJECTIVES = ("clip", "slip")


@dataclass
class TrainConfig:
    """Continued-training options. ``hard_per_target=0`` or no hard pairs gives random batches.

    ``batch_size`` is per rank and per micro-batch: an optimiser step sees
    ``batch_size * accum_steps * world_size`` samples.
    """

    model: str = DEMO_MODEL
    pretrained: Optional[str] = None
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3  # chosen on the demo world's validation split; real checkpoints want ~1e-5..1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 20
    seed: int = 0
    hard_per_target: int = 1
    hard_fraction: float = 1.0       # share of a batch's places in target+partner groups (rest: lone targets)
    top_k: int = 50
    # partners drawn by mining score over the top_k (helip.sampler), T's unit by the mode: "relative" the median
    # over targets of a target's top-k score spread s_1 - s_k (scale-free), "per_target" each target's own spread,
    # "absolute" score units; T = 0: uniform (the paper's draw). Relative 0.05 is the absolute 0.01 measured on the
    # built-in world (median spread 0.200: the same partner in 99.95% of draws), chosen on validation
    # (benchmarks/results/bench_quality_steps700_rel.md)
    hard_temperature: float = 0.05
    hard_temperature_mode: str = "relative"
    remine_every: int = 0            # re-mine the hard pairs with the current model every N epochs (0: never)
    hnml_weight: float = 1.0
    hnml_margin: float = 0.2
    device: str = "cpu"
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
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ConfigError(f"grad_clip_norm must be positive, got {self.grad_clip_norm}.")


@dataclass
class TrainResult:
    checkpoint: Path
    history: List[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: Optional[int] = None
    model: Optional[torch.nn.Module] = None  # the trained model (this rank's replica), unwrapped from DDP


# ----------------------------------------------------------------------------- data

class TensorPairs(Dataset):
    """In-memory pairs as a map-style Dataset: ``(image [3, H, W], tokens [L])`` per index.

    ``gather`` indexes a whole batch at once, which is what makes in-memory
    training as fast as feeding prepared tensors.
    """

    def __init__(self, images: torch.Tensor, tokens: torch.Tensor):
        if len(images) != len(tokens):
            raise InputError(f"{len(images)} images but {len(tokens)} token rows.")
        self.images, self.tokens = images, tokens

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.tokens[i]

    def gather(self, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.tokens[idx]


def as_pair_dataset(pairs) -> Dataset:
    """Any map-style (image, tokens) Dataset as is; helip's in-memory ``PairTensors`` wrapped."""
    if hasattr(pairs, "images") and hasattr(pairs, "tokens") and not hasattr(pairs, "__getitem__"):
        return TensorPairs(pairs.images, pairs.tokens)
    if not (hasattr(pairs, "__getitem__") and hasattr(pairs, "__len__")):
        raise InputError(f"training data must be a map-style Dataset of (image, tokens), got {type(pairs).__name__}.")
    return pairs


class IndexedBatches(Dataset):
    """Wraps a pair Dataset so the DataLoader yields ``(indices, images, tokens)`` per batch.

    The indices are what HNML needs to find each target's partners in the batch.
    ``__getitems__`` (the DataLoader's batched fetch) collates in the worker.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, tokens = self.dataset[i]
        return i, image, tokens

    def __getitems__(self, indices: List[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        if hasattr(self.dataset, "gather"):
            images, tokens = self.dataset.gather(indices)
        else:
            items = [self.dataset[int(i)] for i in indices]
            images = torch.stack([torch.as_tensor(im) for im, _ in items])
            tokens = torch.stack([torch.as_tensor(t) for _, t in items])
        return idx, images, tokens


def _collate_batch(batch):
    return batch  # already collated by IndexedBatches.__getitems__


class _EpochSlice(Sampler[List[int]]):
    """Batches ``start..stop`` of one epoch of a batch sampler: resume mid-epoch without loading skipped data."""

    def __init__(self, sampler: HardPairBatchSampler, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[List[int]]:
        for b, batch in enumerate(self.sampler):
            if b >= self.stop:
                return
            if b >= self.start:
                yield batch


# ----------------------------------------------------------------------------- distributed / device

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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
    if n_pairs < 1 or epochs <= 0:
        raise ConfigError(f"epochs must be positive and the data non-empty, got {epochs} epochs of {n_pairs} pairs.")
    return max(1, math.ceil(epochs * n_pairs / (batch_size * accum_steps * world_size)))


def dist_info() -> DistInfo:
    """Rank and world size of the joined process group (torchrun), or a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def resolve_device(device: str, info: DistInfo) -> str:
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


# ----------------------------------------------------------------------------- model helpers

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


def _features(out):
    """(image_features, text_features, logit_scale) from a tuple- or dict-returning OpenCLIP model."""
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------- the step

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
        clip_loss = ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, cache_labels=True,
                             rank=self.info.rank, world_size=self.info.world_size)
        self.criterion = HelipLoss(clip_loss, self.hnml)
        self.slip = cfg.objective == "slip"
        if self.slip:  # the model also returns two views' SimCLR embeddings; the loss adds ssl_scale x SimCLR
            model, self.criterion = build_slip_training(model, self.criterion, cfg.slip, cfg.pretrained, device)
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
        out = self.model(images, tokens)
        return (*_features(out), tuple(out[3:5]) if self.slip else ())

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
                losses = self.criterion(image_f, text_f, logit_scale, mask, *extra)
            self.scaler.scale(losses["total"]).backward()
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
                        losses = self.criterion(all_img, all_txt, scale, mask)
                    self.scaler.scale(losses["total"]).backward()
        if self.cfg.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            unwrap(self.model).logit_scale.clamp_(0, math.log(100))
        out = {k: v.detach() for k, v in losses.items()}
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
        if self.slip:
            state["slip_head"] = {k: v.detach().cpu() for k, v in unwrap(self.model).head.state_dict().items()}
        state.update(extra or {})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.clip_model.load_state_dict(state["state_dict"])
        if self.slip:
            unwrap(self.model).head.load_state_dict(state["slip_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


# ----------------------------------------------------------------------------- checkpoints

def list_checkpoints(out_dir: Path) -> List[Tuple[int, Path]]:
    """Resumable checkpoints in ``out_dir/checkpoints``, by step (temporary files of a killed save ignored)."""
    d = Path(out_dir) / CHECKPOINT_DIR
    found = []
    if d.is_dir():
        for p in d.iterdir():
            m = _CKPT_RE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return sorted(found)


def check_fresh_out_dir(out_dir: Path) -> None:
    """Refuse to start a fresh run over an earlier run's checkpoints (the CLI calls this without --resume)."""
    found = list_checkpoints(out_dir)
    if found:
        raise ConfigError(f"{out_dir} holds checkpoints of an earlier run (latest: step {found[-1][0]}); "
                          f"pass --resume auto to continue it, or choose another --out.")


def _resume_path(cfg: TrainConfig, out_dir: Path) -> Optional[Path]:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        found = list_checkpoints(out_dir)
        return found[-1][1] if found else None
    path = Path(cfg.resume)
    if not path.is_file():
        raise InputError(f"--resume {path}: no such checkpoint; pass --resume auto or a checkpoints/step_N.pt file.")
    return path


def _check_compatible(saved: dict, cfg: TrainConfig, extra: dict, path: Path) -> None:
    # options newer than the checkpoint: what they meant before they existed (_LEGACY), else their defaults
    now, default = asdict(cfg), {**asdict(TrainConfig()), **_LEGACY}
    old = {k: saved["config"].get(k, default[k]) for k in _TRAJECTORY}
    if old["hard_temperature"] == now["hard_temperature"] == 0:  # a uniform draw has no temperature units
        old["hard_temperature_mode"] = now["hard_temperature_mode"]
    diff = [f"{k}: {old[k]!r} -> {now[k]!r}" for k in _TRAJECTORY if old[k] != now[k]]
    diff += [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in extra.items() if saved.get(k) != v]
    if diff:
        raise ConfigError(f"cannot resume from {path}: options differ from the run that wrote it "
                          f"({'; '.join(diff)}); rerun with the same options or choose another --out.")


def _prune_log(path: Path, step: int) -> None:
    """Keep the log records up to the resumed step (a killed run may have logged steps it then lost)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    save_text(path, "".join(line + "\n" for line in keep))


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(f"--tensorboard needs the tensorboard package ({e}); `pip install tensorboard` "
                          f"or drop --tensorboard (the JSONL log has the same numbers).") from e
    return SummaryWriter(str(out_dir / "tensorboard"))


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, pairs, out_dir: Path, hard: Optional[HardPairs] = None,
          on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Train until ``cfg.steps`` optimiser steps; write ``model.pt``, ``train_log.jsonl``, ``train_config.json``.

    ``pairs`` is helip's in-memory ``PairTensors`` or any map-style Dataset of
    ``(image, tokens)``. ``model.pt`` is a plain state dict:
    ``open_clip.create_model(cfg.model, pretrained=path)`` loads it. Resumable
    checkpoints go to ``out_dir/checkpoints/step_N.pt`` (every ``save_every``
    steps and at the end). ``on_step(step)`` is called after every step and
    its checkpoint (tests use it to simulate a kill).
    """
    cfg.validate()
    out_dir = Path(out_dir)
    info = dist_info()
    device = resolve_device(cfg.device, info)
    dataset = as_pair_dataset(pairs)
    n = len(dataset)
    use_hard = hard is not None and cfg.hard_per_target > 0
    if use_hard and len(hard) != n:
        raise InputError(f"hard pairs have {len(hard)} rows but the dataset has {n} pairs; "
                         f"mine hard pairs for this dataset.")
    if cfg.remine_every and not use_hard:
        raise ConfigError("--remine-every re-mines hard pairs, so it needs hard pairs to start from "
                          "(--hard-pairs, with --hard-per-target > 0); drop --remine-every for random batches.")
    remining = Remining(cfg.remine_every, hard, out_dir, device, cfg.batch_size, cfg.workers,
                        cfg.progress) if cfg.remine_every else None
    tb = _tensorboard(out_dir) if cfg.tensorboard and info.is_main else None
    resume_path = _resume_path(cfg, out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_path is None:
            for _, p in list_checkpoints(out_dir):  # a fresh run replaces an earlier run's outputs
                log.warning("fresh run: removing %s of an earlier run", p)
                p.unlink()
            shutil.rmtree(out_dir / REMINED_DIR, ignore_errors=True)
    if info.world_size > 1:
        dist.barrier()

    torch.manual_seed(cfg.seed)
    lm = load_model(cfg.model, cfg.pretrained, device=device)
    sampler = HardPairBatchSampler(
        hard.indices if use_hard else None, cfg.batch_size, cfg.hard_per_target if use_hard else 0,
        cfg.top_k, num_replicas=info.world_size, rank=info.rank, seed=cfg.seed, num_samples=n, drop_last=True,
        hard_fraction=cfg.hard_fraction, hard_scores=hard.scores if use_hard else None,
        hard_temperature=cfg.hard_temperature, temperature_mode=cfg.hard_temperature_mode)
    steps_per_epoch = len(sampler) // cfg.accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"an epoch of {len(sampler)} batches per rank cannot fill one step of "
                          f"{cfg.accum_steps} micro-batches; lower --accum-steps or --batch-size.")
    trainer = Trainer(lm.model, cfg, device, info, hard.indices if use_hard and cfg.hnml_weight > 0 else None)
    run_extra = {"world_size": info.world_size, "num_samples": n,
                 "hard_pairs_fingerprint": hard.meta.get("fingerprint") if use_hard else None}

    def use_hard_pairs(pairs: HardPairs) -> None:
        sampler.set_hard_pairs(pairs.indices, pairs.scores)
        trainer.set_hard_pairs(pairs.indices)

    step, resumed_from = 0, None
    if resume_path is not None:
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        _check_compatible(state, cfg, run_extra, resume_path)
        trainer.load_state_dict(state)
        restored = remining.load_state(state, n) if remining is not None else None
        if restored is not None:
            use_hard_pairs(restored)
        step = resumed_from = int(state["step"])
        log.info("resuming from %s (step %d, sampler epoch %d)", resume_path, step, state["sampler_epoch"])

    log_path = out_dir / "train_log.jsonl"
    history: List[dict] = []
    if info.is_main:
        if resumed_from is not None:
            _prune_log(log_path, resumed_from)
            history = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.is_file() else []
        log_file = open(log_path, "a" if resumed_from is not None else "w")
    else:
        log_file = open(os.devnull, "w")

    def save(step: int) -> None:
        if info.is_main:
            epoch = (step - 1) // steps_per_epoch if step else 0
            extra = {**run_extra, **(remining.state() if remining is not None else {})}
            save_torch(out_dir / CHECKPOINT_DIR / f"step_{step:08d}.pt", trainer.state_dict(step, epoch, extra))
        if info.world_size > 1:
            dist.barrier()

    t_start = time.perf_counter()
    t_window, samples_window = t_start, 0
    pin = device.startswith("cuda")
    bar = tqdm(total=cfg.steps, initial=step, desc="training", disable=not (cfg.progress and info.is_main))
    try:
        while step < cfg.steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if remining is not None and in_epoch == 0 and remining.due(epoch):
                t0 = time.perf_counter()
                use_hard_pairs(remining.run(trainer.clip_model, dataset, epoch, step, trainer.autocast))
                t_window += time.perf_counter() - t0  # samples_per_second counts training time only
            sampler.set_epoch(epoch)
            last = min(steps_per_epoch, in_epoch + cfg.steps - step)
            loader = DataLoader(
                IndexedBatches(dataset), batch_sampler=_EpochSlice(sampler, in_epoch * cfg.accum_steps,
                                                                   last * cfg.accum_steps),
                num_workers=cfg.workers, collate_fn=_collate_batch, pin_memory=pin,
                generator=torch.Generator().manual_seed(loader_seed(cfg.seed, epoch, info.rank)))
            micro: list = []
            for batch in loader:
                micro.append(batch)
                if len(micro) < cfg.accum_steps:
                    continue
                out = trainer.step(micro, step)
                samples_window += sum(len(b[0]) for b in micro) * info.world_size
                micro = []
                step += 1
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    now = time.perf_counter()
                    rec = {"step": step, "epoch": epoch, "lr": out["lr"],
                           **{k: float(v) for k, v in out.items() if k not in ("lr", "mask", "logit_scale")},
                           "logit_scale": float(out["logit_scale"]),
                           "samples_per_second": round(samples_window / max(now - t_window, 1e-9), 1)}
                    if out["mask"] is not None:
                        rec["partners_per_sample"] = float(out["mask"].sum(1).float().mean())
                    t_window, samples_window = now, 0
                    if info.is_main:
                        history.append(rec)
                        log_file.write(json.dumps(rec) + "\n")
                        log_file.flush()
                        if tb is not None:
                            for k, v in rec.items():
                                if k not in ("step", "epoch"):
                                    tb.add_scalar(f"train/{k}", v, step)
                    bar.set_postfix(loss=f"{rec['total']:.3f}")
                if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                    save(step)
                if on_step is not None:
                    on_step(step)
    finally:
        bar.close()
        log_file.close()
        if tb is not None:
            tb.close()
    seconds = time.perf_counter() - t_start
    ckpt = out_dir / "model.pt"
    if info.is_main:
        if cfg.objective == "slip":  # before model.pt, so a SLIP run's model.pt always has its head beside it
            save_head(unwrap(trainer.model).head, out_dir / HEAD_FILE)
        save_checkpoint(trainer.clip_model, ckpt)
        save_json(out_dir / "train_config.json", {
            **asdict(cfg), "hard_pairs_meta": hard.meta if use_hard else None, "precision_used": trainer.precision,
            "device_used": device, "world_size": info.world_size, "steps_per_epoch": steps_per_epoch,
            "epochs_started": (cfg.steps - 1) // steps_per_epoch + 1, "resumed_from_step": resumed_from,
            "remining": remining.events if remining is not None else None,
            "seconds": round(seconds, 2)})
        log.info("trained to step %d in %.1fs -> %s", cfg.steps, seconds, ckpt)
    if info.world_size > 1:
        dist.barrier()
    return TrainResult(checkpoint=ckpt, history=history, seconds=seconds, resumed_from=resumed_from,
                       model=trainer.clip_model)
