"""Training pairs from any ``--data`` source, with the unusable pairs left out of sampling.

``helip train`` samples pair indices with ``HardPairBatchSampler``: every index
of the dataset is a target once per epoch, its partners come from its
hard-pair row, and places no row fills are filled with random indices. The
sampler knows nothing of unusable pairs, so instead of teaching it, the
training set is *restricted*: ``UsablePairs`` exposes only the usable pairs
under compact indices 0..M-1, and the hard-pair rows are renumbered into the
same compact space (``restrict_hard_pairs``). Whatever the sampler draws --
target, partner or random fill -- is then a usable pair, and HNML's partner
mask (built from the same renumbered rows) stays consistent with the batch.

Which pairs are unusable (the rule of ``helip.data.sources``):

- empty captions: known from the source itself, always left out;
- unreadable images: known only once read, so taken from the ``skipped.json``
  that ``helip embed`` wrote into the embeddings directory the hard pairs were
  mined from (``meta.json`` of the hard pairs names it). Without hard pairs,
  or when that directory is gone, an image that fails to decode during
  training is replaced by ``PairDataset``'s rule (the next usable pair) and a
  warning is logged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from torch.utils.data import Dataset

from ..mining.store import HardPairs
from .sources import PairDataset, PairSource, check_bad_fraction

log = logging.getLogger(__name__)


class UsablePairs(Dataset):
    """``PairDataset`` seen through a list of usable indices: item c is pair ``usable[c]``."""

    def __init__(self, pairs: PairDataset, usable: np.ndarray):
        self.pairs, self.usable = pairs, np.asarray(usable, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.usable)

    def __getitem__(self, c: int):
        return self.pairs[int(self.usable[c])]

    def fingerprint(self) -> dict:
        return self.pairs.fingerprint()


def restrict_hard_pairs(hard: HardPairs, usable: np.ndarray) -> HardPairs:
    """The rows of the usable targets, their entries renumbered to compact indices.

    Entries naming an unusable pair become -1 and every row keeps its usable
    entries first, best first, so ``--top-k`` still means the k best usable
    partners. Mining with ``exclude`` (what ``helip mine`` does with
    ``skipped.json``) already keeps unusable pairs out of the rows; this only
    renumbers.
    """
    n = len(hard)
    inv = np.full(n + 1, -1, dtype=np.int64)  # last slot: the -1 padding maps to -1
    inv[usable] = np.arange(len(usable))
    rows = np.asarray(hard.indices)[usable].astype(np.int64)
    mapped = inv[np.where(rows >= 0, rows, n)]
    order = np.argsort(mapped < 0, axis=1, kind="stable")  # usable entries first, order kept
    mapped = np.take_along_axis(mapped, order, axis=1)
    scores = np.take_along_axis(np.asarray(hard.scores)[usable], order, axis=1)
    scores = np.where(mapped >= 0, scores, -np.inf).astype(np.float32)
    meta = {**hard.meta, "restricted_to_usable": {"n_dataset": n, "n_usable": int(len(usable))}}
    return HardPairs(indices=mapped.astype(np.int32), scores=scores, meta=meta)


@dataclass
class TrainingData:
    dataset: Dataset               # what train() samples from (compact indices when pairs were left out)
    hard: Optional[HardPairs]      # hard pairs in the same index space, or None
    n_dataset: int                 # pairs in the source
    n_left_out: int                # pairs never sampled (empty captions, images embed could not read)


def skipped_from_hard_pairs(hard: HardPairs) -> Optional[np.ndarray]:
    """The unusable pairs recorded by ``helip embed`` in the embeddings directory the hard pairs came from."""
    from ..embed import load_skipped

    emb = hard.meta.get("embeddings")
    if emb and Path(emb).is_dir():
        return load_skipped(Path(emb))
    if hard.meta.get("excluded", 0):
        log.warning("the hard pairs were mined without %d unusable pairs, but their embeddings directory %s "
                    "(and its skipped.json) is gone: those with empty captions are left out, and an image "
                    "that fails to decode is replaced by the next usable pair when read",
                    hard.meta["excluded"], emb)
    return None


def build_training_data(source: PairSource, preprocess, tokenizer, hard: Optional[HardPairs],
                        max_bad_fraction: float = 0.01) -> TrainingData:
    """Pairs as ``(image, tokens)`` with the model's transform and tokenizer; unusable pairs left out."""
    n = len(source)
    skipped = skipped_from_hard_pairs(hard) if hard is not None else None
    pairs = PairDataset(source, preprocess, tokenizer, skip=() if skipped is None else skipped)
    bad = np.array(sorted(pairs.bad), dtype=np.int64)
    check_bad_fraction(len(bad), n, max_bad_fraction, " (empty captions, or images `helip embed` could not read)")
    if not len(bad):
        return TrainingData(pairs, hard, n, 0)
    usable = np.setdiff1d(np.arange(n, dtype=np.int64), bad)
    log.info("leaving %d unusable pairs of %d out of training", len(bad), n)
    return TrainingData(UsablePairs(pairs, usable), restrict_hard_pairs(hard, usable) if hard is not None else None,
                        n, int(len(bad)))
