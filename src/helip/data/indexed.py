"""Pair datasets that carry their indices: what a hard-pair loss needs to find each target's partners.

``IndexedBatches`` wraps any map-style Dataset of ``(image, tokens)`` so a
DataLoader driven by a batch sampler (``HardPairBatchSampler``) yields
``(indices, images, tokens)`` per batch; ``PartnerMasker(indices)`` then gives
the batch's partner mask.
"""
from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import Dataset, Sampler

from ..errors import InputError


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

    Use it with ``batch_sampler=`` and ``collate_fn=IndexedBatches.collate``:
    ``__getitems__`` (the DataLoader's batched fetch) collates in the worker.
    The indices are what HNML needs to find each target's partners in the batch.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = as_pair_dataset(dataset)

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

    @staticmethod
    def collate(batch):
        return batch  # already collated by __getitems__


class EpochSlice(Sampler[List[int]]):
    """Batches ``start..stop`` of one epoch of a batch sampler: resume mid-epoch without loading skipped data."""

    def __init__(self, sampler: Sampler, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[List[int]]:
        for b, batch in enumerate(self.sampler):
            if b >= self.stop:
                return
            if b >= self.start:
                yield batch
