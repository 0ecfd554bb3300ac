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
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.indexed import EpochSlice, IndexedBatches, as_pair_dataset
from ..errors import ConfigError, InputError
from ..io import dataset_fingerprint, remove_leftover_tmp, save_json, save_torch
from ..mining.store import HardPairs
from ..models import interpolate_weights, load_model, save_checkpoint
from ..sampler import HardPairBatchSampler
from .checkpoint import (CHECKPOINT_DIR, check_compatible, check_fresh_out_dir, checkpoint_path, list_checkpoints,
                         prune_log, resume_state)
from .config import TrainConfig, TrainResult
from .distributed import dist_info, loader_seed, resolve_device
from .hooks import TrainHook
from .remine import REMINED_DIR, Remining
from .trainer import Trainer

log = logging.getLogger(__name__)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(f"--tensorboard needs the tensorboard package ({e}); `pip install tensorboard` "
                          f"or drop --tensorboard (the JSONL log has the same numbers).") from e
    return SummaryWriter(str(out_dir / "tensorboard"))


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, pairs, out_dir: Path, hard: Optional[HardPairs] = None,
          on_step: Optional[Callable[[int], None]] = None, model: Optional[torch.nn.Module] = None,
          overwrite: bool = False) -> TrainResult:
    """Train until ``cfg.steps`` optimiser steps; write ``model.pt``, ``train_log.jsonl``, ``train_config.json``.

    ``pairs`` is helip's in-memory ``PairTensors`` or any map-style Dataset of
    ``(image, tokens)``. The model is ``model`` (an OpenCLIP model object,
    trained in place) or else built from ``cfg.model``/``cfg.pretrained``.
    ``model.pt`` is a plain state dict: ``open_clip.create_model(cfg.model,
    pretrained=path)`` loads it. Resumable checkpoints go to
    ``out_dir/checkpoints/step_N.pt`` (every ``save_every`` steps and at the
    end; they hold the trained weights, ``model.pt`` the ``cfg.interpolate``
    mix of them with the starting weights). A fresh run (``cfg.resume``
    None) refuses an ``out_dir`` that holds an earlier run's checkpoints
    unless ``overwrite``, which deletes them.
    ``on_step(step)`` is called after every step and its checkpoint (tests use
    it to simulate a kill).
    """
    cfg.validate()
    if model is None and not cfg.model:
        raise ConfigError("no model to train: set TrainConfig.model (an OpenCLIP model name or JSON config, "
                          "e.g. ViT-B-32) or pass train(model=...) an OpenCLIP model.")
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
    resume_from, resume_saved = resume_state(cfg.resume, out_dir)  # an unreadable one fails before any work
    if resume_from is None and not overwrite:
        check_fresh_out_dir(out_dir)  # as the CLI: an earlier run's checkpoints are never deleted unasked
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for d in (out_dir, out_dir / CHECKPOINT_DIR):  # temporary files of writes a killed run left behind
            remove_leftover_tmp(d)
        if resume_from is None:
            for _, p in list_checkpoints(out_dir):  # overwrite: a fresh run replaces an earlier run's outputs
                log.warning("fresh run: removing %s of an earlier run", p)
                p.unlink()
            shutil.rmtree(out_dir / REMINED_DIR, ignore_errors=True)
    if info.world_size > 1:
        dist.barrier()

    # model, batches, optimiser
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, cfg.pretrained, device=device).model if model is None else model.to(device)
    # the weights this run starts from (before any resume), kept on the CPU for --interpolate
    start = None if cfg.interpolate == 1 else {k: v.detach().to("cpu", copy=True)
                                               for k, v in model.state_dict().items()}
    sampler = HardPairBatchSampler.from_hard_pairs(
        hard if use_hard else None, cfg.batch_size, hard_per_target=cfg.hard_per_target, top_k=cfg.top_k,
        hard_fraction=cfg.hard_fraction, hard_temperature=cfg.hard_temperature,
        temperature_mode=cfg.hard_temperature_mode, num_replicas=info.world_size, rank=info.rank, seed=cfg.seed,
        drop_last=True, num_samples=n)
    steps_per_epoch = len(sampler) // cfg.accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"an epoch of {len(sampler)} batches per rank cannot fill one step of "
                          f"{cfg.accum_steps} micro-batches; lower --accum-steps or --batch-size.")
    trainer = Trainer(model, cfg, device, info, hard.indices if use_hard and cfg.hnml_weight > 0 else None)
    run_extra = {"world_size": info.world_size, "num_samples": n,
                 "hard_pairs_fingerprint": hard.meta.get("fingerprint") if use_hard else None,
                 "data_fingerprint": dataset_fingerprint(pairs)}

    def use_hard_pairs(new: Optional[HardPairs]) -> None:
        if new is not None:
            sampler.set_hard_pairs(new.indices, new.scores)
            trainer.set_hard_pairs(new.indices)

    # resume
    step, resumed_from = 0, None
    if resume_from is not None:
        state = resume_saved
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
    if start is not None:  # every rank, so the returned model is model.pt's; resumable checkpoints keep the trained
        interpolate_weights(trainer.clip_model, start, cfg.interpolate)
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
