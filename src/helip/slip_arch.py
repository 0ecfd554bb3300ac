"""SLIP's architectures as OpenCLIP sees them: sizes, config names, SLIP's ViT-S for timm, SLIP's transform.

Kept apart from :mod:`helip.slip` (conversion and training) so that
:mod:`helip.models` can register SLIP's models without importing the rest.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SlipSize:
    letter: str
    config: str        # helip's OpenCLIP model config name
    vision_width: int
    vision_depth: int


SLIP_SIZES: Dict[str, SlipSize] = {
    "S": SlipSize("S", "SLIP-ViT-S-16", 384, 12),
    "B": SlipSize("B", "SLIP-ViT-B-16", 768, 12),
    "L": SlipSize("L", "SLIP-ViT-L-16", 1024, 24),
}
SLIP_CONFIGS = tuple(s.config for s in SLIP_SIZES.values())
_SLIP_ARCH = re.compile(r"^(SLIP|CLIP|SIMCLR)_VIT([A-Z])(\d+)$")
# SLIP's MoCo-v3 ViT-S/16: timm's vit_small_patch16_224 has 6 heads
SLIP_TIMM_MODELS = {"slip_vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=12)}


def register_timm_models() -> None:
    """Register SLIP's ViT-S/16 with timm (idempotent), so OpenCLIP's TimmModel can build it by name."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    for name, arch in SLIP_TIMM_MODELS.items():
        if timm.is_model(name):
            continue

        def build(pretrained: bool = False, _arch=arch, **kwargs):
            if pretrained:
                raise ValueError("helip registers SLIP's ViT-S without pretrained weights; load a SLIP checkpoint")
            return _create_vision_transformer("vit_small_patch16_224", pretrained=False, **{**_arch, **kwargs})

        build.__name__ = name
        build.__module__ = __name__
        register_model(build)


def preprocess_overrides(model_name: str) -> dict:
    """OpenCLIP transform options for SLIP models: SLIP normalises with ImageNet statistics.

    SLIP's eval transform is Resize(224) (shortest side, bilinear),
    CenterCrop(224), ImageNet mean/std; OpenCLIP's defaults (OpenAI mean/std,
    bicubic) would shift every input. Pass these to
    ``open_clip.create_model_and_transforms`` (``helip.models.load_model``
    does) when building a SLIP model's transforms yourself.
    """
    if model_name in SLIP_CONFIGS:
        return dict(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, image_interpolation="bilinear",
                    image_resize_mode="shortest")
    return {}
