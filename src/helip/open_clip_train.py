"""HELIP inside an unchanged ``open_clip_train`` run.

    python -m helip.open_clip_train [open_clip_train flags] --helip-hard-pairs DIR [--helip-... options]

runs open_clip_train's own ``main`` (its flags, logging, checkpoints, ``--resume
latest``, ``--accum-freq``, ``--lock-image``, ``--precision``, zero-shot
evaluation, DDP under torchrun) with two names in ``open_clip_train.main``
replaced for the duration of the call, and nothing else:

- ``get_data``: open_clip_train's own ``get_data`` builds the datasets as usual;
  the training set (open_clip_train's ``CsvDataset``, with its transforms and
  tokenizer) is then read through a ``DataLoader`` whose ``batch_sampler`` is
  helip's ``HardPairBatchSampler`` (each target beside its hard partners, sharded
  by rank, epoch set by open_clip_train's ``DataInfo.set_epoch``). The loader
  yields open_clip_train's ``(images, texts)`` batches and, as it hands each one
  to ``train_one_epoch``, records the batch's dataset indices. WebDataset
  training shards, which open_clip_train streams, are read by index instead
  (helip's ``ShardPairs``: an offset index of each tar) with open_clip_train's
  training transform and tokenizer; open_clip_train still builds the rest
  (``--val-data``, ImageNet).
- ``create_loss``: open_clip_train's own ``create_loss`` builds its ``ClipLoss``
  (rank, world size, ``--local-loss``, ``--gather-with-grad``); helip adds the
  Hard Negative Margin Loss on the local batch, whose partner mask comes from the
  recorded indices of the batches the features belong to (``--accum-freq`` N:
  the last N batches, which is what ``train_one_epoch`` concatenates). Called
  with ``output_dict=True`` it returns ``{"contrastive_loss", "hnml_loss"}``,
  which ``train_one_epoch`` sums, logs and reports (tensorboard, wandb) as it
  does for any loss.

Without ``--helip-hard-pairs`` (and no other ``--helip-`` flag) nothing is
replaced: the call is ``open_clip_train.main.main(argv)``. Importing helip only
registers helip's model configs (e.g. ``helip-tiny-vit``) with OpenCLIP.

Limits (each refused with one line, exit status 2): CSV/TSV or WebDataset
training data (not ``synthetic``; no ``--dataset-resampled``), the CLIP
objective only (not ``--siglip``, CoCa or distillation), and the open_clip_torch
versions in ``TESTED_OPEN_CLIP`` (the two seams above and ``train_one_epoch``'s
batch and loss contract are internals of open_clip_train). See
docs/open_clip_train.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import deque
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, InputError, exit_status
from .io import check_fingerprint, fingerprint
from .losses import HardNegativeMarginLoss, PartnerMasker
from .mining.store import HardPairs, load_hard_pairs
from .sampler import TEMPERATURE_MODES, HardPairBatchSampler

# open_clip_torch releases whose open_clip_train this module was tested with (tests/test_open_clip_train.py)
TESTED_OPEN_CLIP = ("3.3.0",)


@dataclass
class HelipOptions:
    """The ``--helip-*`` flags. Defaults are ``helip train``'s (a test checks they agree)."""

    hard_pairs: Optional[str] = None
    hard_per_target: int = 1
    top_k: int = 50
    hard_fraction: float = 1.0
    hard_temperature: float = 0.05
    hard_temperature_mode: str = "relative"
    hnml_weight: float = 1.0
    hnml_margin: float = 0.2


def helip_parser() -> argparse.ArgumentParser:
    d = HelipOptions()
    p = argparse.ArgumentParser(
        prog="python -m helip.open_clip_train", add_help=False, allow_abbrev=False,
        description="open_clip_train with HELIP's hard-pair batches and margin loss; every other flag is "
                    "open_clip_train's (see below).")
    p.add_argument("--helip-hard-pairs", dest="hard_pairs", default=None, metavar="DIR",
                   help="hard-pairs directory from `helip mine` for the --train-data CSV (same rows, same order); "
                        "omit to run open_clip_train unchanged")
    p.add_argument("--helip-hard-per-target", dest="hard_per_target", metavar="N", type=int, default=d.hard_per_target,
                   help="hard partners placed beside each target (default %(default)s)")
    p.add_argument("--helip-top-k", dest="top_k", metavar="K", type=int, default=d.top_k,
                   help="partners are drawn from the first K of each list (default %(default)s)")
    p.add_argument("--helip-hard-fraction", dest="hard_fraction", metavar="F", type=float, default=d.hard_fraction,
                   help="share of each batch in target+partner groups, the rest lone targets (default %(default)s)")
    p.add_argument("--helip-hard-temperature", dest="hard_temperature", metavar="T", type=float, default=d.hard_temperature,
                   help="draw partners by mining score (0: uniformly; default %(default)s)")
    p.add_argument("--helip-hard-temperature-mode", dest="hard_temperature_mode", choices=TEMPERATURE_MODES,
                   default=d.hard_temperature_mode, help="unit of the temperature (default %(default)s)")
    p.add_argument("--helip-hnml-weight", dest="hnml_weight", metavar="W", type=float, default=d.hnml_weight,
                   help="weight of the Hard Negative Margin Loss (0: hard-pair batches only; default %(default)s)")
    p.add_argument("--helip-hnml-margin", dest="hnml_margin", metavar="M", type=float, default=d.hnml_margin,
                   help="margin of the Hard Negative Margin Loss (default %(default)s)")
    return p


def check_open_clip_version() -> str:
    try:
        found = version("open_clip_torch")
    except PackageNotFoundError:
        raise ConfigError("open_clip_torch is not installed; pip install 'helip[open_clip_train]'.") from None
    if found not in TESTED_OPEN_CLIP:
        raise ConfigError(
            f"helip.open_clip_train was tested with open_clip_torch {', '.join(TESTED_OPEN_CLIP)}, not {found} "
            f"(it replaces get_data and create_loss inside open_clip_train.main); install "
            f"open_clip_torch=={TESTED_OPEN_CLIP[-1]}, or run without --helip-hard-pairs.")
    return found


# ----------------------------------------------------------------------------- batches and their indices

class BatchIndices:
    """Dataset indices of the batches the loader has handed to ``train_one_epoch``, newest last."""

    def __init__(self, keep: int):
        self.recent: deque = deque(maxlen=max(1, keep))

    def push(self, indices: np.ndarray) -> None:
        self.recent.append(indices)

    def rows(self, n: int) -> np.ndarray:
        """Indices of the newest batches that together have ``n`` rows (the features the loss was given)."""
        taken, total = [], 0
        for batch in reversed(self.recent):
            if total >= n:
                break
            taken.append(batch)
            total += len(batch)
        if total != n:
            raise RuntimeError(f"the loss got {n} feature rows, but the last batches hold "
                               f"{[len(b) for b in self.recent]} pairs: open_clip_train's loop no longer calls "
                               f"the loss as helip.open_clip_train expects.")
        return np.concatenate(taken[::-1])


class _Indexed(torch.utils.data.Dataset):
    """``dataset[i] -> (i, *dataset[i])``, so the collated batch carries its indices."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return (i, *self.dataset[i])


class HardPairLoader:
    """Iterates a loader of ``(indices, images, texts)``; yields ``(images, texts)`` and records the indices."""

    def __init__(self, loader: torch.utils.data.DataLoader, register: BatchIndices, world_size: int):
        self.loader, self.register = loader, register
        self.num_batches = len(loader)
        self.num_samples = self.num_batches * loader.batch_sampler.batch_size * world_size

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for indices, images, texts in self.loader:
            self.register.push(indices.numpy())
            yield images, texts


def _data_info_class():
    from open_clip_train.data import DataInfo

    class HardPairDataInfo(DataInfo):
        def set_epoch(self, epoch):
            self.sampler.set_epoch(epoch)

    return HardPairDataInfo


def check_hard_pairs_fit(hard: HardPairs, captions: Sequence[str], where: str, hard_dir: str) -> None:
    """One line when the hard pairs were mined for another table (row count, then captions if recorded)."""
    if len(hard) != len(captions):
        raise InputError(f"--helip-hard-pairs {hard_dir} has {len(hard)} rows but --train-data {where} has "
                         f"{len(captions)} pairs; mine hard pairs for this table (helip embed/mine --data {where}).")
    if "fingerprint" in hard.meta:
        check_fingerprint(hard.meta["fingerprint"], fingerprint(str(c) for c in captions),
                          f"--helip-hard-pairs {hard_dir}", f"Mine hard pairs for --train-data {where}.")


def hard_pair_data(dataset, captions: Sequence[str], args, opts: HelipOptions, hard: HardPairs,
                   register: BatchIndices):
    """The training set (``dataset[i] -> (image, tokens)``) read in hard-pair batches, as open_clip_train's
    ``DataInfo``."""
    check_hard_pairs_fit(hard, captions, args.train_data, opts.hard_pairs)
    sampler = HardPairBatchSampler(
        hard.indices, args.batch_size, opts.hard_per_target, opts.top_k, num_replicas=args.world_size,
        rank=args.rank, seed=args.seed, drop_last=True, num_samples=len(dataset), hard_fraction=opts.hard_fraction,
        hard_scores=hard.scores, hard_temperature=opts.hard_temperature, temperature_mode=opts.hard_temperature_mode)
    loader = torch.utils.data.DataLoader(_Indexed(dataset), batch_sampler=sampler, num_workers=args.workers,
                                         pin_memory=True)
    return _data_info_class()(HardPairLoader(loader, register, args.world_size), sampler)


# ----------------------------------------------------------------------------- the loss

class HelipClipLoss(nn.Module):
    """open_clip_train's ``ClipLoss`` plus HNML on the local batch; OpenCLIP's loss contract."""

    def __init__(self, clip_loss: nn.Module, hnml: Optional[HardNegativeMarginLoss], masker: PartnerMasker,
                 register: BatchIndices):
        super().__init__()
        self.clip_loss, self.hnml = clip_loss, hnml
        self.masker, self.register = masker, register

    def forward(self, image_features, text_features, logit_scale, output_dict: bool = False):
        losses = {"contrastive_loss": self.clip_loss(image_features, text_features, logit_scale)}
        if self.hnml is not None:
            mask = self.masker(self.register.rows(len(image_features)))
            if image_features.is_cuda:
                mask = mask.pin_memory()
            mask = mask.to(image_features.device, non_blocking=True)
            losses["hnml_loss"] = self.hnml(image_features, text_features, mask)
        return losses if output_dict else sum(losses.values())


def helip_loss(args, stock_create_loss, opts: HelipOptions, hard: HardPairs, register: BatchIndices):
    from open_clip import ClipLoss

    base = stock_create_loss(args)
    if type(base) is not ClipLoss:  # DistillClipLoss and CoCaLoss subclass it
        raise ConfigError(f"--helip-hard-pairs works with open_clip_train's CLIP loss, not {type(base).__name__} "
                          f"(drop --siglip / --distill-model, or use a non-CoCa model).")
    hnml = HardNegativeMarginLoss(opts.hnml_margin, opts.hnml_weight) if opts.hnml_weight > 0 else None
    logging.info(f"HELIP: hard pairs {opts.hard_pairs} ({hard.indices.shape[0]} x {hard.indices.shape[1]}), "
                 f"{opts.hard_per_target} partner(s) per target from the top {opts.top_k}, "
                 f"temperature {opts.hard_temperature} ({opts.hard_temperature_mode}), "
                 f"hard fraction {opts.hard_fraction}, HNML weight {opts.hnml_weight} margin {opts.hnml_margin}")
    return HelipClipLoss(base, hnml, PartnerMasker(hard.indices, opts.top_k), register)


# ----------------------------------------------------------------------------- entry point

def check_open_clip_args(argv: List[str]):
    """Refuse what the plug-in cannot do before open_clip_train builds its model."""
    from open_clip_train.data import get_csv_dataset, get_dataset_fn, get_wds_dataset
    from open_clip_train.params import parse_args

    args = parse_args(argv)
    if not args.train_data:
        raise ConfigError("--helip-hard-pairs needs --train-data (the CSV/TSV the hard pairs were mined on).")
    try:
        kind = get_dataset_fn(args.train_data, args.dataset_type)
    except ValueError as e:
        raise ConfigError(f"--train-data {args.train_data}: {e}") from None
    if kind is get_wds_dataset:
        if args.dataset_resampled or args.train_data_upsampling_factors:
            raise ConfigError("--helip-hard-pairs defines the training order itself (every pair once as a target "
                              "per epoch); drop --dataset-resampled / --train-data-upsampling-factors.")
    elif kind is not get_csv_dataset:
        raise ConfigError(f"--helip-hard-pairs needs CSV/TSV or WebDataset --train-data, not "
                          f"--dataset-type {args.dataset_type}.")
    if args.siglip or args.distill_model or "coca" in args.model.lower():
        raise ConfigError("--helip-hard-pairs works with open_clip_train's CLIP loss; drop --siglip / "
                          "--distill-model, or use a non-CoCa model.")
    return args


def is_webdataset(args) -> bool:
    from open_clip_train.data import get_dataset_fn, get_wds_dataset

    return get_dataset_fn(args.train_data, args.dataset_type) is get_wds_dataset


def read_captions(args) -> List[str]:
    """The caption column of open_clip_train's CSV, read as its ``CsvDataset`` reads it."""
    import pandas as pd

    try:
        return pd.read_csv(args.train_data, sep=args.csv_separator, usecols=[args.csv_caption_key])[
            args.csv_caption_key].tolist()
    except (OSError, ValueError) as e:
        raise InputError(f"--train-data {args.train_data}: {str(e).splitlines()[0]}") from None


def open_shards(args):
    """WebDataset shards by random access: helip's ``ShardPairs`` (an offset index of each tar, cached beside it)."""
    from .data.sources import ShardPairs

    return ShardPairs(args.train_data)


def run(argv: List[str], opts: HelipOptions):
    """open_clip_train's ``main(argv)`` with HELIP's ``get_data`` and ``create_loss`` in place."""
    import open_clip_train.main as octm

    check_open_clip_version()
    args = check_open_clip_args(argv)
    if opts.hard_per_target < 1:
        raise ConfigError("--helip-hard-per-target must be at least 1 (omit --helip-hard-pairs for random batches).")
    hard = load_hard_pairs(opts.hard_pairs)
    shards = open_shards(args) if is_webdataset(args) else None
    # before open_clip_train builds the model (which can take minutes), and again on the dataset it trains on
    check_hard_pairs_fit(hard, shards.captions() if shards else read_captions(args), args.train_data,
                         opts.hard_pairs)
    stock_get_data, stock_create_loss = octm.get_data, octm.create_loss
    register = BatchIndices(1)

    def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
        register.recent = deque(maxlen=max(1, args.accum_freq))
        if shards is None:  # CSV: open_clip_train's own CsvDataset, read in hard-pair batches
            data = stock_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
            if "train" in data:
                csv = data["train"].dataloader.dataset
                data["train"] = hard_pair_data(csv, csv.captions, args, opts, hard, register)
            return data
        # WebDataset: open_clip_train builds the rest (--val-data, ImageNet); the training shards are read by
        # index, with open_clip_train's training transform and tokenizer
        from .data.sources import PairDataset

        train_data, args.train_data = args.train_data, None
        try:
            data = stock_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        finally:
            args.train_data = train_data
        dataset = PairDataset(shards, preprocess_fns[0], tokenizer)
        data["train"] = hard_pair_data(dataset, shards.captions(), args, opts, hard, register)
        return data

    def create_loss(args):
        return helip_loss(args, stock_create_loss, opts, hard, register)

    octm.get_data, octm.create_loss = get_data, create_loss
    try:
        return octm.main(argv)
    finally:
        octm.get_data, octm.create_loss = stock_get_data, stock_create_loss


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = helip_parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\nopen_clip_train's flags:\n")
    ns, rest = parser.parse_known_args(argv)
    opts = HelipOptions(**vars(ns))
    helip_flags = [a for a in argv if a.startswith("--helip-")]
    try:
        import open_clip_train.main as octm
    except ImportError as e:
        print(f"python -m helip.open_clip_train: error: open_clip_train cannot be imported ({e}); "
              f"pip install 'helip[open_clip_train]'.", file=sys.stderr)
        return 2

    from .models import register_configs

    register_configs()  # helip's model names (helip-tiny-vit, SLIP-*) for --model; nothing else changes

    if opts.hard_pairs is None:
        if helip_flags:
            print(f"python -m helip.open_clip_train: error: {helip_flags[0].split('=')[0]} needs "
                  f"--helip-hard-pairs DIR.", file=sys.stderr)
            return 2
        octm.main(rest)  # open_clip_train unchanged (its __main__ ignores main's return value too)
        return 0
    return exit_status("python -m helip.open_clip_train", run, rest, opts)


if __name__ == "__main__":
    sys.exit(main())
