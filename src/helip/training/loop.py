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
- re-mining (``remine_every``, ``helip.training.remine``): at the start of every E-th
  epoch the hard pairs are mined again with the current model; checkpoints
  name the lists in use, so a resumed run continues with the same ones.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from open_clip_train.scheduler import cosine_lr
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.indexed import EpochSlice, IndexedBatches, as_pair_dataset
from ..errors import ConfigError, InputError
from ..io import save_json, save_torch
from ..losses import HardNegativeMarginLoss, PartnerMasker
from ..mining.store import HardPairs
from ..models import load_model, save_checkpoint
from ..sampler import HardPairBatchSampler
from .checkpoint import check_compatible, checkpoint_path, list_checkpoints, prune_log, resume_path
from .config import TrainConfig, TrainResult
from .distributed import DistInfo, autocast_for, dist_info, loader_seed, resolve_device, resolve_precision, \
    step_seed, unwrap
from .hooks import TrainHook
from .objective import build_objective
from .remine import REMINED_DIR, Remining

log = logging.getLogger(__name__)


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
                        losses = self.objective.loss(all_img, all_txt, scale, mask)
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
    hooks: List[TrainHook] = []
    if cfg.remine_every:
        hooks.append(Remining(cfg.remine_every, hard, out_dir, device, cfg.batch_size, cfg.workers, cfg.progress))
    tb = _tensorboard(out_dir) if cfg.tensorboard and info.is_main else None
    resume_from = resume_path(cfg.resume, out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            for _, p in list_checkpoints(out_dir):  # a fresh run replaces an earlier run's outputs
                log.warning("fresh run: removing %s of an earlier run", p)
                p.unlink()
            shutil.rmtree(out_dir / REMINED_DIR, ignore_errors=True)
    if info.world_size > 1:
        dist.barrier()

    # model, batches, optimiser
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

    def use_hard_pairs(new: Optional[HardPairs]) -> None:
        if new is not None:
            sampler.set_hard_pairs(new.indices, new.scores)
            trainer.set_hard_pairs(new.indices)

    # resume
    step, resumed_from = 0, None
    if resume_from is not None:
        state = torch.load(resume_from, map_location="cpu", weights_only=True)
        check_compatible(state, cfg, run_extra, resume_from)
        trainer.load_state_dict(state)
        for hook in hooks:
            use_hard_pairs(hook.load_state_dict(state, n))
        step = resumed_from = int(state["step"])
        log.info("resuming from %s (step %d, sampler epoch %d)", resume_from, step, state["sampler_epoch"])
    log_path = out_dir / "train_log.jsonl"
    history: List[dict] = []
    if info.is_main:
        history = prune_log(log_path, resumed_from) if resumed_from is not None else []
        log_file = open(log_path, "a" if resumed_from is not None else "w")
    else:
        log_file = open(os.devnull, "w")

    def save(step: int) -> None:
        if info.is_main:
            epoch = (step - 1) // steps_per_epoch if step else 0
            extra = dict(run_extra)
            for hook in hooks:
                extra.update(hook.state_dict())
            save_torch(checkpoint_path(out_dir, step), trainer.state_dict(step, epoch, extra))
        if info.world_size > 1:
            dist.barrier()

    # the loop
    t_start = time.perf_counter()
    t_window, samples_window = t_start, 0
    bar = tqdm(total=cfg.steps, initial=step, desc="training", disable=not (cfg.progress and info.is_main))
    try:
        while step < cfg.steps:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if in_epoch == 0:
                t0 = time.perf_counter()
                for hook in hooks:
                    use_hard_pairs(hook.on_epoch_start(epoch, step, trainer.clip_model, dataset, trainer.autocast))
                t_window += time.perf_counter() - t0  # samples_per_second counts training time only
            sampler.set_epoch(epoch)
            last = min(steps_per_epoch, in_epoch + cfg.steps - step)
            loader = DataLoader(
                IndexedBatches(dataset), batch_sampler=EpochSlice(sampler, in_epoch * cfg.accum_steps,
                                                                  last * cfg.accum_steps),
                num_workers=cfg.workers, collate_fn=IndexedBatches.collate, pin_memory=device.startswith("cuda"),
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
                    rec = _log_record(step, epoch, out, samples_window / max(now - t_window, 1e-9))
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

    # outputs
    seconds = time.perf_counter() - t_start
    ckpt = out_dir / "model.pt"
    if info.is_main:
        trainer.objective.save(trainer.model, out_dir)  # before model.pt: model.pt marks a complete run
        save_checkpoint(trainer.clip_model, ckpt)
        summary = {"remining": None}
        for hook in hooks:
            summary.update(hook.summary())
        save_json(out_dir / "train_config.json", {
            **asdict(cfg), "hard_pairs_meta": hard.meta if use_hard else None, "precision_used": trainer.precision,
            "device_used": device, "world_size": info.world_size, "steps_per_epoch": steps_per_epoch,
            "epochs_started": (cfg.steps - 1) // steps_per_epoch + 1, "resumed_from_step": resumed_from,
            **summary, "seconds": round(seconds, 2)})
        log.info("trained to step %d in %.1fs -> %s", cfg.steps, seconds, ckpt)
    if info.world_size > 1:
        dist.barrier()
    return TrainResult(checkpoint=ckpt, history=history, seconds=seconds, resumed_from=resumed_from,
                       model=trainer.clip_model)


def _log_record(step: int, epoch: int, out: Dict, samples_per_second: float) -> dict:
    """One line of ``train_log.jsonl`` from what ``Trainer.step`` returned (syncs with the device)."""
    rec = {"step": step, "epoch": epoch, "lr": out["lr"],
           **{k: float(v) for k, v in out.items() if k not in ("lr", "mask", "logit_scale")},
           "logit_scale": float(out["logit_scale"]), "samples_per_second": round(samples_per_second, 1)}
    if out["mask"] is not None:
        rec["partners_per_sample"] = float(out["mask"].sum(1).float().mean())
    return rec
