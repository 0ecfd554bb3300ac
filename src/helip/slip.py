"""SLIP models in helip: checkpoint conversion to OpenCLIP, the SimCLR head, SLIP training.

A facebookresearch/SLIP checkpoint is a ``torch.save`` dict whose
``state_dict`` (keys prefixed ``module.`` by DDP) holds a timm ViT under
``visual.`` (created with ``num_classes=0``: the class token after the final
norm), an OpenAI-CLIP text transformer (``transformer.resblocks.*``,
``token_embedding``, ``positional_embedding``, ``ln_final``, QuickGELU),
projection *matrices* applied as ``x @ W`` (``image_projection`` [vision
width, 512], ``text_projection`` [512, 512]), ``logit_scale``, and, for SLIP
(not CLIP) models, the SimCLR head ``image_mlp`` (layer1, bn1, relu1, layer2,
bn2, relu2, layer3). ``args.model`` names the architecture (``SLIP_VITB16``).

helip turns that into a stock OpenCLIP model: the timm ViT becomes the trunk
of OpenCLIP's ``TimmModel`` (config key ``timm_model_name``, class-token
pooling), ``image_projection`` becomes its bias-free ``head.proj`` (a Linear,
so the matrix is transposed), and the text tower maps one to one onto
OpenCLIP's CLIP text tower (``quick_gelu``). The three configs
(``SLIP-ViT-S-16``, ``SLIP-ViT-B-16``, ``SLIP-ViT-L-16``) ship in
``model_configs/``; SLIP's ViT-S is MoCo v3's (12 heads, not timm's 6), which
timm does not have, so helip registers it with timm as
``slip_vit_small_patch16_224`` when it registers its configs. The SimCLR head
is not part of a CLIP model: it is saved beside the checkpoint and used only
by ``helip train --objective slip``.
"""
from __future__ import annotations

import argparse
import logging
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .errors import ConfigError, InputError
from .io import save_json, save_torch
from .models import register_configs, resolve_model_name
from .slip_arch import IMAGENET_MEAN, IMAGENET_STD, SLIP_CONFIGS, SLIP_SIZES, SLIP_TIMM_MODELS, SlipSize, \
    _SLIP_ARCH, preprocess_overrides, register_timm_models  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
HEAD_FILE = "simclr_head.pt"
META_FILE = "slip_meta.json"


# ----------------------------------------------------------------------------------------- the SimCLR head

class SimCLRHead(nn.Sequential):
    """SLIP's ``image_mlp``: Linear, BN, ReLU, Linear, BN, ReLU, Linear, with SLIP's parameter names.

    SLIP uses SyncBatchNorm; the state dict is the same as BatchNorm1d's, so
    helip builds BatchNorm1d (which runs on CPU) and converts it to
    SyncBatchNorm when training on several GPUs.
    """

    def __init__(self, in_dim: int, mlp_dim: int = 4096, out_dim: int = 256):
        super().__init__(OrderedDict([
            ("layer1", nn.Linear(in_dim, mlp_dim)),
            ("bn1", nn.BatchNorm1d(mlp_dim)),
            ("relu1", nn.ReLU(inplace=True)),
            ("layer2", nn.Linear(mlp_dim, mlp_dim)),
            ("bn2", nn.BatchNorm1d(mlp_dim)),
            ("relu2", nn.ReLU(inplace=True)),
            ("layer3", nn.Linear(mlp_dim, out_dim)),
        ]))
        self.in_dim, self.mlp_dim, self.out_dim = in_dim, mlp_dim, out_dim


def head_dims(state: Dict[str, torch.Tensor]) -> Tuple[int, int, int]:
    return int(state["layer1.weight"].shape[1]), int(state["layer1.weight"].shape[0]), int(state["layer3.weight"].shape[0])


def save_head(head: nn.Module, path: Path, source: Optional[str] = None) -> Path:
    """Write the head as ``{"state_dict", "in_dim", "mlp_dim", "out_dim", "source"}`` (atomically)."""
    state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    in_dim, mlp_dim, out_dim = head_dims(state)
    return save_torch(path, {"state_dict": state, "in_dim": in_dim, "mlp_dim": mlp_dim, "out_dim": out_dim,
                             "source": source or ""})


def load_head(path: Path, in_dim: Optional[int] = None) -> SimCLRHead:
    """Read a head written by ``save_head`` (``helip convert-slip`` or ``helip train --objective slip``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"SimCLR head {path} does not exist; pass the simclr_head.pt written by "
                         f"`helip convert-slip` or `helip train --objective slip`.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        state = obj["state_dict"]
        head = SimCLRHead(*head_dims(state))
        head.load_state_dict(state)
    except Exception as e:
        raise InputError(f"{path} is not a SimCLR head written by helip ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); rerun `helip convert-slip`.") from e
    if in_dim is not None and head.in_dim != in_dim:
        raise InputError(f"SimCLR head {path} takes {head.in_dim}-d features but the model's vision trunk gives "
                         f"{in_dim}-d ones; pass the head that belongs to this model.")
    return head


# ----------------------------------------------------------------------------------------- conversion

@dataclass
class SlipCheckpoint:
    state_dict: Dict[str, torch.Tensor]   # without the "module." prefix
    arch: Optional[str]                    # args.model, e.g. "SLIP_VITB16", when the checkpoint records it
    meta: dict                             # epoch and SLIP's ssl options, for the record


def _load_torch(path: Path, trust: bool):
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(f"{path} holds objects torch will not load safely ({str(e).splitlines()[0][:160]}); "
                         f"if you trust the file, pass --trust-checkpoint.") from e
    except Exception as e:
        raise InputError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''}).") from e


def read_slip_checkpoint(path, trust: bool = False) -> SlipCheckpoint:
    """Load a SLIP checkpoint and check its layout; raise ``InputError`` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"SLIP checkpoint {path} does not exist; download one from "
                         f"https://github.com/facebookresearch/SLIP#results-and-pre-trained-models.")
    ckpt = _load_torch(path, trust)
    if not isinstance(ckpt, dict):
        raise InputError(f"{path} is not a SLIP checkpoint: it holds a {type(ckpt).__name__}, not a dict with "
                         f"'state_dict' and 'args'.")
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} is not a SLIP checkpoint: no 'state_dict' of tensors (top-level keys: "
                         f"{sorted(map(str, ckpt))[:6]}).")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    args = ckpt.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {})
    arch = args.get("model")
    if "visual.cls_token" not in state or "image_projection" not in state:
        if "visual.proj" in state or "visual.conv1.weight" in state or any(k.startswith("visual.trunk.") for k in state):
            hint = "it looks like an OpenCLIP checkpoint: load it with --model NAME --pretrained FILE instead"
        elif arch and str(arch).startswith("SIMCLR"):
            hint = f"it is a SimCLR-only model ({arch}) without a text tower; HELIP needs a CLIP or SLIP checkpoint"
        else:
            hint = f"no 'visual.cls_token'/'image_projection' (keys start: {sorted(state)[:4]})"
        raise InputError(f"{path} is not a SLIP checkpoint of a ViT model: {hint}.")
    if "text_projection" not in state or "token_embedding.weight" not in state:
        raise InputError(f"{path} has a SLIP vision tower but no text tower (SimCLR-only?); HELIP needs a "
                         f"CLIP or SLIP checkpoint.")
    meta = {k: args[k] for k in ("model", "ssl_mlp_dim", "ssl_emb_dim", "ssl_scale", "ssl_temp", "dataset")
            if k in args and isinstance(args[k], (str, int, float))}
    if isinstance(ckpt.get("epoch"), int):
        meta["epoch"] = ckpt["epoch"]
    return SlipCheckpoint(state_dict=state, arch=str(arch) if arch else None, meta=meta)


def resolve_size(size: str) -> SlipSize:
    """``S``/``B``/``L``, SLIP's architecture names (``SLIP_VITB16``) or helip's config names."""
    key = str(size).strip()
    m = _SLIP_ARCH.match(key.upper())
    if m:
        if m.group(3) != "16" or m.group(2) not in SLIP_SIZES:
            raise ConfigError(f"unknown SLIP size {size!r}: SLIP released ViT-S/16, ViT-B/16 and ViT-L/16 "
                              f"(SLIP_VITS16, SLIP_VITB16, SLIP_VITL16); pass --size S, B or L.")
        return SLIP_SIZES[m.group(2)]
    for s in SLIP_SIZES.values():
        if key.upper() == s.letter or key == s.config:
            return s
    raise ConfigError(f"unknown SLIP size {size!r}; use S, B or L (or SLIP's names SLIP_VITS16, SLIP_VITB16, "
                      f"SLIP_VITL16).")


def convert_state_dict(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """SLIP names -> (OpenCLIP TimmModel-CLIP state dict, SimCLR head state dict).

    Unknown keys are kept under their SLIP names so the strict comparison
    with the target model reports them instead of dropping them silently.
    """
    clip, head = {}, {}
    for k, v in state.items():
        if k.startswith("visual."):
            clip["visual.trunk." + k[len("visual."):]] = v
        elif k == "image_projection":
            clip["visual.head.proj.weight"] = v.t().contiguous()   # x @ W == Linear with weight W.T
        elif k.startswith("image_mlp."):
            head[k[len("image_mlp."):]] = v
        else:
            clip[k] = v   # text tower, text_projection (x @ W in both), logit_scale: same names
    return clip, head


def _build_meta(name: str) -> nn.Module:
    """OpenCLIP's CLIP for config ``name`` on the meta device: names and shapes, no memory, no init time."""
    import open_clip
    from open_clip.model import CLIP

    register_configs()
    cfg = {k: v for k, v in open_clip.get_model_config(name).items() if k != "custom_text"}
    with torch.device("meta"):
        return CLIP(**cfg)


def check_fits(state: Dict[str, torch.Tensor], name: str, what: str) -> None:
    """Raise ``InputError`` unless ``state`` has exactly the keys and shapes of OpenCLIP model ``name``."""
    target = {k: tuple(v.shape) for k, v in _build_meta(name).state_dict().items()}
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    wrong = [f"{k} {tuple(state[k].shape)} vs {target[k]}" for k in target
             if k in state and tuple(state[k].shape) != target[k]]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise InputError(f"{what} does not fit {name}: {'; '.join(parts)}; pass the right --size.")


@dataclass
class ConvertResult:
    model_name: str
    checkpoint: Path
    head: Optional[Path]
    meta: dict


def convert_slip_checkpoint(src, out_dir, size: Optional[str] = None, model: Optional[str] = None,
                            trust: bool = False) -> ConvertResult:
    """Convert a SLIP checkpoint into ``out_dir/model.pt`` (OpenCLIP) and ``out_dir/simclr_head.pt``.

    The size comes from ``size``, else the checkpoint's ``args.model``, else
    the vision width. ``model`` names another OpenCLIP config to convert into
    (a SLIP variant of your own); it overrides ``size``. Afterwards
    ``open_clip.create_model(result.model_name, pretrained=out_dir/"model.pt")``
    loads it once ``helip.models.register_configs()`` has run.
    """
    ckpt = read_slip_checkpoint(src, trust=trust)
    if model is not None:
        name = resolve_model_name(model)
    else:
        if size is not None:
            s = resolve_size(size)
        elif ckpt.arch:
            s = resolve_size(ckpt.arch)
        else:
            width = int(ckpt.state_dict["visual.cls_token"].shape[-1])
            found = [s for s in SLIP_SIZES.values() if s.vision_width == width]
            if not found:
                raise ConfigError(f"unknown SLIP size: {src} has no args.model and a {width}-wide vision tower "
                                  f"(SLIP's are 384, 768, 1024); pass --size or --model.")
            s = found[0]
        name = s.config
    clip_state, head_state = convert_state_dict(ckpt.state_dict)
    check_fits(clip_state, name, f"SLIP checkpoint {src} ({ckpt.arch or 'no args.model'})")
    out_dir = Path(out_dir)
    head_path = None
    if head_state:
        try:
            head = SimCLRHead(*head_dims(head_state))
            head.load_state_dict(head_state)
        except Exception as e:
            raise InputError(f"SLIP checkpoint {src} has an image_mlp that is not SLIP's SimCLR head "
                             f"({str(e).splitlines()[0][:160]}).") from e
        head_path = save_head(head, out_dir / HEAD_FILE, source=str(src))
    else:
        log.info("%s has no SimCLR head (a CLIP model); --objective slip will start a fresh one", src)
    ckpt_path = save_torch(out_dir / MODEL_FILE, clip_state)
    meta = {"model": name, "checkpoint": MODEL_FILE, "simclr_head": HEAD_FILE if head_path else None,
            "source": str(Path(src).resolve()), "slip": ckpt.meta,
            "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess_overrides(name).items()}}
    save_json(out_dir / META_FILE, meta)
    return ConvertResult(model_name=name, checkpoint=ckpt_path, head=head_path, meta=meta)


# ----------------------------------------------------------------------------------------- training

@dataclass
class SlipConfig:
    """Options of the SLIP objective (``helip train --objective slip``); defaults are SLIP's."""

    ssl_scale: float = 1.0
    ssl_temperature: float = 0.1
    head: Optional[str] = None   # simclr_head.pt; default: the one beside --pretrained, else a fresh head
    mlp_dim: int = 4096          # fresh heads only
    out_dim: int = 256           # fresh heads only
    crop_scale_min: float = 0.08

    def validate(self) -> None:
        if self.ssl_temperature <= 0:
            raise ConfigError(f"ssl_temperature must be positive, got {self.ssl_temperature}.")
        if self.ssl_scale < 0:
            raise ConfigError(f"ssl_scale must be non-negative, got {self.ssl_scale}.")
        if self.mlp_dim < 1 or self.out_dim < 1:
            raise ConfigError(f"SimCLR head dims must be positive, got mlp_dim={self.mlp_dim}, out_dim={self.out_dim}.")
        if not 0 < self.crop_scale_min <= 1:
            raise ConfigError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}.")


def _is_timm(visual: nn.Module) -> bool:
    return hasattr(visual, "trunk") and hasattr(visual, "head")


def trunk_width(visual: nn.Module) -> int:
    """Width of the pooled vision features before the CLIP projection (the SimCLR head's input)."""
    if _is_timm(visual):
        return int(visual.trunk.num_features)
    if hasattr(visual, "_embeds") and hasattr(visual, "_pool"):
        return int(visual.proj.shape[0]) if visual.proj is not None else int(visual.output_dim)
    raise ConfigError(f"the SLIP objective needs a ViT vision tower (OpenCLIP or timm), not {type(visual).__name__}.")


def trunk_features(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled vision features before the CLIP projection, where SLIP attaches its SimCLR head."""
    if _is_timm(visual):
        return visual.trunk(images)
    if hasattr(visual, "_embeds") and hasattr(visual, "_pool"):
        # OpenCLIP's VisionTransformer.forward up to (not including) ``@ self.proj``
        return visual._pool(visual.transformer(visual._embeds(images)))[0]
    raise ConfigError(f"the SLIP objective needs a ViT vision tower (OpenCLIP or timm), not {type(visual).__name__}.")


class SlipModel(nn.Module):
    """An OpenCLIP model with SLIP's SimCLR head and augmentation: one forward gives everything SlipLoss needs.

    ``forward(images, tokens)`` returns ``(image_features, text_features,
    logit_scale, aug1_embed, aug2_embed)``: the CLIP outputs exactly as the
    wrapped model gives them for the (unaugmented) batch, and the head's
    embeddings of two SLIP-augmented views. Keeping it one module keeps DDP
    simple (one forward per step).
    """

    def __init__(self, clip: nn.Module, head: SimCLRHead, augment: nn.Module):
        super().__init__()
        self.clip = clip
        self.head = head
        self.augment = augment

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        out = self.clip(images, tokens)
        if isinstance(out, dict):
            out = (out["image_features"], out["text_features"], out["logit_scale"])
        views = torch.cat([self.augment(images), self.augment(images)])
        h1, h2 = trunk_features(self.clip.visual, views).chunk(2)
        return out[0], out[1], out[2], self.head(h1), self.head(h2)   # head per view: BN statistics per view, as SLIP


def head_beside(pretrained: Optional[str]) -> Optional[Path]:
    if pretrained and Path(pretrained).is_file():
        p = Path(pretrained).with_name(HEAD_FILE)
        return p if p.is_file() else None
    return None


def build_slip_training(clip: nn.Module, helip_loss: nn.Module, cfg: SlipConfig, pretrained: Optional[str],
                        device: str = "cpu"):
    """Wrap an OpenCLIP model and a ``HelipLoss`` for SLIP training: returns ``(SlipModel, SlipLoss)``.

    The head is ``cfg.head``, else the ``simclr_head.pt`` beside the
    ``pretrained`` checkpoint (``helip convert-slip`` and ``helip train``
    write it there), else a fresh head of ``cfg.mlp_dim``/``cfg.out_dim``.
    """
    import open_clip
    import torch.distributed as dist

    from .augment import SlipAugment
    from .losses import SimCLRLoss, SlipLoss

    cfg.validate()
    width = trunk_width(clip.visual)
    path = Path(cfg.head) if cfg.head else head_beside(pretrained)
    if path is not None:
        head = load_head(path, in_dim=width)
        log.info("SimCLR head from %s (%d -> %d -> %d)", path, head.in_dim, head.mlp_dim, head.out_dim)
    else:
        head = SimCLRHead(width, cfg.mlp_dim, cfg.out_dim)
        log.info("fresh SimCLR head (%d -> %d -> %d)", width, cfg.mlp_dim, cfg.out_dim)
    if dist.is_available() and dist.is_initialized() and str(device).startswith("cuda"):
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    pp = open_clip.get_model_preprocess_cfg(clip)
    size = getattr(clip.visual, "image_size", None) or pp["size"]
    augment = SlipAugment(size, pp["mean"], pp["std"], crop_scale=(cfg.crop_scale_min, 1.0))
    model = SlipModel(clip, head, augment).to(device)
    loss = SlipLoss(helip_loss, SimCLRLoss(cfg.ssl_temperature), cfg.ssl_scale)
    return model, loss
