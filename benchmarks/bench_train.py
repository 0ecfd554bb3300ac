"""Training throughput: helip's train step vs open_clip_train's loop, and what HELIP adds to helip's own run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_train.py                 # CPU, ~2-3 min
    .venv/bin/python benchmarks/bench_train.py --device cuda --model ViT-B-32 --batch-size 256 \\
        --precision bf16 --steps 30 --reps 5                                          # one GPU

Three variants, each on its own copy of the same initial model, same device, batch size,
precision and synthetic in-memory data (random images and token ids already on the
device; no DataLoader, no decoding, so data loading is excluded):

    open_clip_train  open_clip_train.train.train_one_epoch, driven by an args namespace and a
                     stand-in for its DataInfo whose "dataloader" yields the batches; OpenCLIP's
                     ClipLoss, cosine_lr schedule, get_autocast; model built with output_dict=True
                     as open_clip_train builds it.
    helip_plain      helip.training.Trainer.step (what `helip train` runs per step) on batches from
                     HardPairBatchSampler without hard pairs: helip's baseline.
    helip_hard       the same step on HardPairBatchSampler batches with one hard partner per
                     target (lists of --k random indices) and HNML: HELIP.

Every variant gets its batches the same way: the index list of a batch (from a fixed
random permutation for open_clip_train, from the sampler for helip, the sampler's work
timed as part of helip's step), then images[idx], tokens[idx] gathered on the device.

Timing: one untimed warm-up block per variant, then --reps rounds; in each round every
variant runs --steps steps back to back, in a rotated order (CPU contention and clock
changes hit all variants alike). CUDA is synchronised before and after each block.
Reported: median samples/s per variant (wall clock, and on CPU also per second of the
process's CPU time, which other jobs on a shared machine do not inflate; the CPU run uses
one intra-op thread so that CPU time is the work done), the median over rounds of the
per-round ratios helip_plain/open_clip_train, helip_hard/open_clip_train and
helip_hard/helip_plain (from CPU time on CPU, wall clock on CUDA; both are in the JSON),
and, measured separately on the
same batches, the milliseconds per step of the sampler, the partner mask and the HNML
forward+backward (HELIP's three additions). Goals: helip_hard >= 0.95x
open_clip_train; sampler + HNML under 3% of the step.

Writes JSON atomically (helip.io.save_json) to --out. Needs only torch, open_clip_torch
(with open_clip_train) and helip.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import torch
from open_clip import ClipLoss
from open_clip_train.scheduler import cosine_lr
from open_clip_train.train import train_one_epoch

from helip.io import save_json
from _provenance import provenance
from helip.losses import HardNegativeMarginLoss, PartnerMasker
from helip.models import register_configs
from helip.sampler import HardPairBatchSampler
from helip.training import TrainConfig, Trainer

OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}
VARIANTS = ("open_clip_train", "helip_plain", "helip_hard")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="helip-tiny-vit", help="OpenCLIP model name (helip's configs registered)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="fp32", choices=tuple(OPEN_CLIP_PRECISION),
                    help="fp32, or AMP bf16/fp16 (CUDA only)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the rounds")
    ap.add_argument("--reps", type=int, default=7, help="rounds")
    ap.add_argument("--n", type=int, default=0, help="synthetic pairs (default: 4 batches' worth, at least 1024)")
    ap.add_argument("--k", type=int, default=50, help="hard-pair list length (sampler top_k)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: 1 on CPU, torch's default on CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/bench_train.json")
    return ap.parse_args(argv)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _Data:
    """The slice of open_clip_train's DataInfo that train_one_epoch uses."""

    def __init__(self, batches, images, tokens, batch_size):
        self.batches, self.images, self.tokens = batches, images, tokens
        self.dataloader = self
        self.num_batches = len(batches)
        self.num_samples = len(batches) * batch_size

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        for i in self.batches:
            yield self.images[i], self.tokens[i]


class OpenClipTrainRunner:
    def __init__(self, state, a, images, tokens, rng):
        self.model = open_clip.create_model(a.model, device=a.device, output_dict=True)
        self.model.load_state_dict(state)
        self.images, self.tokens, self.a = images, tokens, a
        n, per = len(images), len(images) // a.batch_size  # random batches, drawn before any timing
        perms = [rng.permutation(n) for _ in range(-(-(a.warmup + a.reps * a.steps) // per))]
        self.pool = [torch.as_tensor(p[b * a.batch_size:(b + 1) * a.batch_size], device=a.device)
                     for p in perms for b in range(per)]  # index tensors already on the device
        self.used = 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.98), eps=1e-6)
        self.scaler = torch.amp.GradScaler("cuda") if a.precision == "fp16" else None
        self.loss = ClipLoss(cache_labels=True)
        self.epoch = 0
        self.args = SimpleNamespace(
            device=a.device, precision=OPEN_CLIP_PRECISION[a.precision], distill=False, accum_freq=1,
            skip_scheduler=False, horovod=False, grad_clip_norm=None, log_every_n_steps=10**9, world_size=1,
            rank=0, local_rank=0, batch_size=a.batch_size, wandb=False)

    def run(self, steps: int) -> None:
        batches = [self.pool[(self.used + j) % len(self.pool)] for j in range(steps)]
        self.used += steps
        scheduler = cosine_lr(self.optimizer, self.a.lr, 0, 10**9)
        train_one_epoch(self.model, {"train": _Data(batches, self.images, self.tokens, self.a.batch_size)},
                        self.loss, self.epoch, self.optimizer, self.scaler, scheduler, None, self.args)
        self.epoch += 1


class HelipRunner:
    def __init__(self, state, a, images, tokens, hard):
        model = open_clip.create_model(a.model, device=a.device)
        model.load_state_dict(state)
        self.images, self.tokens, self.a = images, tokens, a
        cfg = TrainConfig(model=a.model, steps=10**9, batch_size=a.batch_size, lr=a.lr, warmup_steps=0,
                          seed=a.seed, hard_per_target=1 if hard is not None else 0, top_k=a.k,
                          device=a.device, precision=a.precision)
        self.trainer = Trainer(model, cfg, a.device, hard_indices=hard)
        self.sampler = HardPairBatchSampler(hard, a.batch_size, 1 if hard is not None else 0, a.k, seed=a.seed,
                                            num_samples=len(images), drop_last=True)
        self.epoch, self.it, self.step = 0, iter(()), 0

    def next_batch(self):
        while True:
            for batch in self.it:
                return batch
            self.sampler.set_epoch(self.epoch)
            self.epoch += 1
            self.it = iter(self.sampler)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            idx = torch.as_tensor(self.next_batch())
            # as from a DataLoader with pin_memory: a non-blocking copy, no host-device sync
            i = (idx.pin_memory() if self.a.device.startswith("cuda") else idx).to(self.a.device, non_blocking=True)
            self.trainer.step([(idx, self.images[i], self.tokens[i])], self.step)
            self.step += 1


def helip_additions_ms(a, hard, images, tokens, model_state) -> dict:
    """Milliseconds per step of HELIP's three additions, each timed on its own over many batches."""
    n, reps = len(images), max(20, a.steps * a.reps)
    sampler = HardPairBatchSampler(hard, a.batch_size, 1, a.k, seed=a.seed, drop_last=True)
    t = time.perf_counter()
    batches, epoch = [], 0
    while len(batches) < reps:
        sampler.set_epoch(epoch)
        batches += list(sampler)
        epoch += 1
    batches = batches[:reps]
    sampler_ms = 1e3 * (time.perf_counter() - t) / reps
    plain = HardPairBatchSampler(None, a.batch_size, 0, seed=a.seed, num_samples=n, drop_last=True)
    t, count, epoch = time.perf_counter(), 0, 0
    while count < reps:
        plain.set_epoch(epoch)
        for _ in plain:
            count += 1
            if count == reps:
                break
        epoch += 1
    plain_sampler_ms = 1e3 * (time.perf_counter() - t) / reps
    masker = PartnerMasker(hard, a.k)  # as Trainer builds it, once
    t = time.perf_counter()
    masks = [masker(b) for b in batches]
    mask_ms = 1e3 * (time.perf_counter() - t) / reps
    # HNML forward + backward on features of the model's width (what it adds to the loss)
    model = open_clip.create_model(a.model, device=a.device)
    model.load_state_dict(model_state)
    with torch.no_grad():
        i = torch.as_tensor(batches[0], device=a.device)
        img_f, txt_f, _ = model(images[i], tokens[i])[:3]
    hnml = HardNegativeMarginLoss()
    img_f, txt_f = img_f.float().requires_grad_(), txt_f.float().requires_grad_()
    dev_masks = [m.to(a.device) for m in masks]
    sync(a.device)
    t = time.perf_counter()
    for m in dev_masks:
        hnml(img_f, txt_f, m).backward()
    sync(a.device)
    hnml_ms = 1e3 * (time.perf_counter() - t) / reps
    return {"sampler_hard_ms": sampler_ms, "sampler_plain_ms": plain_sampler_ms, "partner_mask_ms": mask_ms,
            "hnml_fwd_bwd_ms": hnml_ms,
            "partners_per_sample": float(np.mean([m.sum(1).float().mean().item() for m in masks]))}


def main(argv=None) -> dict:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.threads is None and not a.device.startswith("cuda"):
        a.threads = 1
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_train: --device cuda but CUDA is not available")
    if a.precision != "fp32" and not a.device.startswith("cuda"):
        sys.exit("bench_train: AMP (--precision bf16/fp16) is measured on CUDA only; use --precision fp32 on CPU")
    register_configs()
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    init = open_clip.create_model(a.model)
    state = {k: v.to(a.device) for k, v in init.state_dict().items()}
    size = init.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    ctx = init.context_length
    vocab = init.vocab_size
    del init
    n = a.n or max(1024, 4 * a.batch_size)
    g = torch.Generator().manual_seed(a.seed)
    images = torch.randn(n, 3, *size, generator=g).to(a.device)
    tokens = torch.randint(1, vocab, (n, ctx), generator=g).to(a.device)
    # random hard-pair lists: k distinct indices per row, never the row itself
    hard = np.stack([rng.choice(n - 1, a.k, replace=False) for _ in range(n)])
    hard = (hard + (hard >= np.arange(n)[:, None])).astype(np.int32)

    runners = {
        "open_clip_train": OpenClipTrainRunner(state, a, images, tokens, rng),
        "helip_plain": HelipRunner(state, a, images, tokens, None),
        "helip_hard": HelipRunner(state, a, images, tokens, hard),
    }
    for r in runners.values():
        r.run(a.warmup)
    sync(a.device)
    sps = {v: [] for v in VARIANTS}      # samples per wall-clock second
    sps_cpu = {v: [] for v in VARIANTS}  # samples per second of this process's CPU time
    for rep in range(a.reps):
        order = VARIANTS[rep % 3:] + VARIANTS[:rep % 3]
        for v in order:
            sync(a.device)
            t, c = time.perf_counter(), time.process_time()
            runners[v].run(a.steps)
            sync(a.device)
            sps[v].append(a.steps * a.batch_size / (time.perf_counter() - t))
            sps_cpu[v].append(a.steps * a.batch_size / max(time.process_time() - c, 1e-9))
        print(f"round {rep + 1}/{a.reps}: " + "  ".join(f"{v} {sps[v][-1]:.1f}/s" for v in VARIANTS), flush=True)
    # On a CPU shared with other jobs, wall-clock time counts the time other processes held the cores;
    # with one intra-op thread (--threads 1) CPU time does not, so the ratios use it there. On CUDA the
    # host's CPU time is not the work: wall-clock there.
    on_cpu = not a.device.startswith("cuda")
    basis = sps_cpu if on_cpu else sps
    del runners
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    adds = helip_additions_ms(a, hard, images, tokens, state)
    med = {v: statistics.median(x) for v, x in sps.items()}
    med_cpu = {v: statistics.median(x) for v, x in sps_cpu.items()}
    step_ms = 1e3 * a.batch_size / statistics.median(basis["helip_plain"])

    def ratio(x, y, d=None):
        d = d or basis
        return statistics.median([p / q for p, q in zip(d[x], d[y])])

    extra_ms = adds["sampler_hard_ms"] - adds["sampler_plain_ms"] + adds["partner_mask_ms"] + adds["hnml_fwd_bwd_ms"]
    result = {
        "config": {**{k: v for k, v in vars(a).items() if k != "out"}, "n": n, "image_size": list(size),
                   "context_length": ctx},
        "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor()
        or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__, "python": platform.python_version()},
        "samples_per_second": {v: {"median": med[v], "rounds": sps[v]} for v in VARIANTS},
        "samples_per_cpu_second": {v: {"median": med_cpu[v], "rounds": sps_cpu[v]} for v in VARIANTS},
        "ratios_basis": "cpu_time" if on_cpu else "wall_clock",
        "ratios_wall_clock": {
            "helip_plain_vs_open_clip_train": ratio("helip_plain", "open_clip_train", sps),
            "helip_hard_vs_open_clip_train": ratio("helip_hard", "open_clip_train", sps),
            "helip_hard_vs_helip_plain": ratio("helip_hard", "helip_plain", sps),
        },
        "ratios": {
            "helip_plain_vs_open_clip_train": ratio("helip_plain", "open_clip_train"),
            "helip_hard_vs_open_clip_train": ratio("helip_hard", "open_clip_train"),
            "helip_hard_vs_helip_plain": ratio("helip_hard", "helip_plain"),
        },
        "helip_additions_ms_per_step": adds,
        "helip_additions_share_of_step": extra_ms / step_ms,
        "goals": {"helip_vs_open_clip_train_at_least": 0.95, "additions_share_below": 0.03},
        "provenance": provenance(a),
    }
    result["goals"]["met_throughput"] = result["ratios"]["helip_hard_vs_open_clip_train"] >= 0.95
    result["goals"]["met_additions"] = result["helip_additions_share_of_step"] < 0.03
    save_json(Path(a.out), result)
    r = result["ratios"]
    print(f"samples/s (median of {a.reps}): " + ", ".join(f"{v} {med[v]:.1f}" for v in VARIANTS))
    if on_cpu:
        print(f"samples/CPU-s (median of {a.reps}): " + ", ".join(f"{v} {med_cpu[v]:.1f}" for v in VARIANTS))
    print(f"ratios ({result['ratios_basis']}, median over rounds): helip_plain/open_clip_train {r['helip_plain_vs_open_clip_train']:.3f}  "
          f"helip_hard/open_clip_train {r['helip_hard_vs_open_clip_train']:.3f}  "
          f"helip_hard/helip_plain {r['helip_hard_vs_helip_plain']:.3f}")
    print(f"HELIP additions per step: sampler {adds['sampler_hard_ms']:.2f} ms (plain {adds['sampler_plain_ms']:.2f}), "
          f"mask {adds['partner_mask_ms']:.2f} ms, HNML {adds['hnml_fwd_bwd_ms']:.2f} ms = "
          f"{100 * result['helip_additions_share_of_step']:.2f}% of a {step_ms:.1f} ms step")
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
