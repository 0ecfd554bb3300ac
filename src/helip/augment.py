"""SLIP's SimCLR augmentation, applied to batches of already-preprocessed image tensors.

helip keeps a dataset's images as tensors after the model's OpenCLIP eval
transform (resize, centre crop, normalise), so the two SimCLR views are made
from those tensors rather than from PIL images: undo the normalisation, apply
SLIP's recipe with torchvision's tensor transforms, normalise again. The
recipe (SLIP ``main.py``/``datasets.py``, MoCo v3's):

    RandomResizedCrop(size, scale=(0.08, 1))
    RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
    RandomGrayscale(p=0.2)
    RandomApply([GaussianBlur(sigma in [0.1, 2.0])], p=0.5)
    RandomHorizontalFlip()
    Normalize(mean, std)

Every image gets its own random parameters (torchvision draws one set per
call, so the batch is transformed one image at a time). Randomness comes from
torch's global generator, which ``helip train`` seeds.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import nn
from torchvision.transforms import v2


def blur_kernel_size(image_size: int, sigma_max: float = 2.0) -> int:
    """An odd kernel covering +-3 sigma_max, no larger than the image.

    SLIP blurs PIL images with ``ImageFilter.GaussianBlur(radius=sigma)``,
    whose support is not truncated; torchvision needs a kernel size, and
    +-3 sigma holds 99.7% of the Gaussian's mass (13 pixels for sigma 2).
    """
    k = 2 * math.ceil(3 * sigma_max) + 1
    largest_odd = image_size if image_size % 2 else image_size - 1
    return max(1, min(k, largest_odd))


class SlipAugment(nn.Module):
    """Map a normalised batch [B, 3, H, W] to one randomly augmented view of it (same shape, normalised)."""

    def __init__(self, image_size: Tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 crop_scale: Tuple[float, float] = (0.08, 1.0), blur_sigma: Tuple[float, float] = (0.1, 2.0)):
        super().__init__()
        size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.transform = v2.Compose([
            v2.RandomResizedCrop(size, scale=crop_scale, antialias=True),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(blur_kernel_size(min(size), blur_sigma[1]), sigma=blur_sigma)], p=0.5),
            v2.RandomHorizontalFlip(),
        ])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(images), self.std.to(images)
        raw = (images * std + mean).clamp_(0.0, 1.0)
        views = torch.stack([self.transform(img) for img in raw])
        return (views - mean) / std
