"""Pairs ready for a model: preprocessed image tensors and tokenised captions.

The built-in world is small enough to preprocess once and keep in memory; the
preprocessing itself is the model's own OpenCLIP eval transform and tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch
from PIL import Image

from ..io import fingerprint
from ..models import LoadedModel


@dataclass
class PairTensors:
    images: torch.Tensor   # [N, 3, H, W] float, after the model's transform
    tokens: torch.Tensor   # [N, context_length] int64
    captions: List[str]

    def __len__(self) -> int:
        return len(self.captions)

    def fingerprint(self) -> dict:
        return fingerprint(self.captions)


def to_pil(images: np.ndarray) -> List[Image.Image]:
    return [Image.fromarray(a) for a in images]


def prepare_pairs(images: np.ndarray, captions: Sequence[str], lm: LoadedModel) -> PairTensors:
    """Run OpenCLIP's transform over uint8 images [N, H, W, 3] and its tokenizer over captions."""
    tensors = torch.stack([lm.preprocess(im) for im in to_pil(images)])
    tokens = lm.tokenizer(list(captions))
    return PairTensors(images=tensors, tokens=tokens, captions=list(captions))
