"""OpenCLIP models: registering helip's configs, loading, saving.

helip never defines a CLIP of its own. Its tiny demo model is an OpenCLIP model
config (``model_configs/helip-tiny-vit.json``) registered with OpenCLIP's
registry, so it is built by OpenCLIP's factory, tokenised by OpenCLIP's
tokenizer and preprocessed by OpenCLIP's transforms, like any ViT-B-32.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import open_clip
import torch

from .errors import ConfigError, InputError
from .io import save_torch
from .slip_arch import preprocess_overrides, register_timm_models

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
DEMO_MODEL = "helip-tiny-vit"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


def register_configs() -> None:
    """Add helip's model configs to OpenCLIP's registry (idempotent).

    After this, ``open_clip.create_model("helip-tiny-vit", pretrained=path)``
    works in any script, which is how helip's checkpoints are meant to be read.
    It also registers SLIP's ViT-S/16 trunk with timm (``SLIP-ViT-S-16`` needs it).
    """
    register_timm_models()
    if DEMO_MODEL not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


HUB_PREFIXES = ("hf-hub:", "local-dir:")


def resolve_model_name(model: str) -> str:
    """Accept an OpenCLIP model name or a path to an OpenCLIP JSON model config.

    A JSON config ``dir/MyCLIP.json`` is registered with OpenCLIP under its stem
    ``MyCLIP`` (OpenCLIP's own convention), so a checkpoint trained from it
    loads in any script with ``open_clip.add_model_config("dir/MyCLIP.json")``
    then ``open_clip.create_model("MyCLIP", pretrained=path)``. Names with
    OpenCLIP's ``hf-hub:`` / ``local-dir:`` schemas are passed to OpenCLIP as
    they are.
    """
    register_configs()
    if model.startswith(HUB_PREFIXES):
        return model
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise InputError(f"model config {path} does not exist; pass an OpenCLIP model name or a JSON config path.")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"model config {path} is not valid JSON ({e}); fix it or pass an OpenCLIP model name.")
        if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise InputError(f"model config {path} is not an OpenCLIP model config (it needs embed_dim, vision_cfg "
                             f"and text_cfg, like open_clip/model_configs/ViT-B-32.json).")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise ConfigError(
            f"OpenCLIP does not know the model {model!r}; run `python -c \"import open_clip; "
            f"print(open_clip.list_models())\"` for the names, or pass a path to a JSON model config."
        )
    return model


@dataclass
class LoadedModel:
    """A model with the tokenizer and eval transform that belong to it."""

    name: str
    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]


def load_model(model: str, pretrained: Optional[str] = None, device: str = "cpu") -> LoadedModel:
    """Build an OpenCLIP model, from random init or from a checkpoint.

    ``pretrained`` is a local checkpoint file (a state dict, an ``open_clip_train``
    checkpoint ``epoch_N.pt`` whose ``state_dict`` has ``module.`` prefixes --
    OpenCLIP's own loader strips them --, anything OpenCLIP's loader reads) or
    an OpenCLIP pretrained tag (downloaded by OpenCLIP only then).
    """
    name = resolve_model_name(model)
    check_pretrained(name, pretrained)
    check_schema_weights(name, pretrained)
    try:
        m, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device,
                                                                **preprocess_overrides(name))
    except (RuntimeError, AssertionError, KeyError, ValueError, EOFError, pickle.UnpicklingError, IndexError,
            TypeError, OverflowError) as e:  # (arbitrary bytes unpickle into any of these)
        if pretrained is None or not Path(pretrained).is_file():
            raise
        # torch's message is not passed on: for a file that is not a plain checkpoint it advises
        # weights_only=False, which would run arbitrary code from the file
        text = str(e)
        missing_key = isinstance(e, KeyError) and e.args and isinstance(e.args[0], str)  # a state-dict key
        if isinstance(e, AssertionError) or missing_key or any(
                s in text for s in ("size mismatch", "Missing key", "Unexpected key", "width changed")):
            first = text.splitlines()[0] if text else type(e).__name__
            raise InputError(f"checkpoint {pretrained} does not fit model {name!r} ({first[:200]}); "
                             f"pass the --model it was trained with.") from None
        raise InputError(f"checkpoint {pretrained} is not a readable PyTorch checkpoint (truncated, or not a "
                         f"checkpoint: {type(e).__name__}); pass a complete checkpoint file.") from None
    return LoadedModel(name=name, model=m, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(name))


def check_schema_weights(name: str, pretrained: Optional[str]) -> None:
    """OpenCLIP's ``hf-hub:``/``local-dir:`` models load their own weights and ignore ``pretrained`` (with
    only a log line); a ``local-dir:`` without weights is randomly initialised. Both would embed or
    train with weights other than the ones asked for, so both stop here."""
    if not name.startswith(HUB_PREFIXES):
        return
    if pretrained is not None:
        raise ConfigError(f"--pretrained {pretrained} would be ignored: OpenCLIP loads {name!r} with the weights "
                          f"stored with it. Drop --pretrained, or pass the model's config (a name or JSON path) "
                          f"as --model together with --pretrained.")
    if name.startswith("local-dir:"):
        d = Path(name[len("local-dir:"):])
        if not (d / "open_clip_config.json").is_file():
            raise InputError(f"--model {name}: {d / 'open_clip_config.json'} does not exist; point local-dir: at "
                             f"a directory holding open_clip_config.json and the model's weights.")
        find = getattr(open_clip.factory, "_find_checkpoint_in_dir", None)
        if find is not None and not find(d):
            raise InputError(f"--model {name}: no weights file in {d} (OpenCLIP would start from random weights); "
                             f"add open_clip_model.safetensors or open_clip_pytorch_model.bin there.")


def check_pretrained(name: str, pretrained: Optional[str]) -> None:
    """``pretrained`` must be an existing file or one of OpenCLIP's pretrained tags for ``name``.

    Checked before OpenCLIP is called, so a typo costs one clear line, not a
    download attempt or a traceback.
    """
    if pretrained is None or name.startswith(HUB_PREFIXES) or Path(pretrained).is_file():
        return
    looks_like_path = os.sep in pretrained or "/" in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES)
    if looks_like_path:
        raise InputError(f"checkpoint {pretrained} does not exist; check the path passed as --pretrained.")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ConfigError(f"--pretrained {pretrained!r} is neither a file nor an OpenCLIP pretrained tag of {name!r} "
                          f"(tags: {', '.join(tags) or 'none'}); pass a checkpoint path or one of the tags.")


def interpolate_weights(model: torch.nn.Module, start: dict, alpha: float) -> None:
    """Move ``model`` to ``start + alpha * (model - start)`` in place (WiSE-FT's weight-space ensemble).

    Fine-tuned weights interpolated back towards the weights they started from
    keep more of the starting model's knowledge at a small cost to what the
    fine-tuning added (Wortsman et al., 2022); ``start`` is a state dict of the
    same model. Only floating-point entries move: integer buffers stay.
    """
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.lerp(start[k].to(v.device, v.dtype), v, alpha))


def save_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """Write a plain state dict that ``open_clip.create_model(name, pretrained=path)`` loads."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_torch(path, state)
