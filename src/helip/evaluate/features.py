"""Frozen features for evaluation, computed once and cached on disk.

Evaluating several checkpoints on several datasets mostly re-reads and
re-encodes the same images; the encoder forward pass is the cost. Each
feature array is therefore keyed by everything that determines it:

- the dataset's identity (file paths, sizes and modification times, or the
  shard list; plus the annotations),
- the model's identity (OpenCLIP name and a SHA-256 of every weight, so a
  retrained or different checkpoint at the same path is a different model),
- the image transform (``repr`` of the OpenCLIP preprocess pipeline),

and stored as ``CACHE/<key>/{features.npy,ok.npy,meta.json}``, ``meta.json``
written last (atomically, through helip.io): a directory without it is an
interrupted write and is recomputed, never read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..io import save_json, save_npy
from ..models import LoadedModel
from .datasets import FileImages, ImageSet, Sample

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class FeatureConfig:
    batch_size: int = 256
    workers: int = 4
    device: str = "cpu"
    progress: bool = True
    cache_dir: Optional[Path] = None  # None: compute every time


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def model_identity(lm: LoadedModel) -> Dict[str, str]:
    """Name, hash of all weights and buffers, and transform of a loaded model."""
    h = hashlib.sha256()
    for k, v in lm.model.state_dict().items():
        h.update(k.encode())
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"name": lm.name, "weights_sha256": h.hexdigest(), "transform": repr(lm.preprocess)}


class FeatureCache:
    """Directories of .npy arrays plus meta.json, one per key; ``root=None`` disables caching."""

    def __init__(self, root: Optional[Path]):
        self.root = Path(root) if root else None

    def key(self, parts: dict) -> str:
        return _sha({"version": CACHE_VERSION, **parts})[:32]

    def load(self, key: str, names: Sequence[str]) -> Optional[tuple]:
        if self.root is None or not (self.root / key / "meta.json").is_file():
            return None
        d = self.root / key
        try:
            meta = json.loads((d / "meta.json").read_text())
            arrays = {n: np.load(d / f"{n}.npy") for n in names}
        except (OSError, ValueError) as e:
            log.warning("feature cache %s unreadable (%s); recomputing", d, e)
            return None
        return arrays, meta

    def save(self, key: str, arrays: Dict[str, np.ndarray], meta: dict) -> None:
        if self.root is None:
            return
        d = self.root / key
        if (d / "meta.json").exists():
            (d / "meta.json").unlink()
        for n, a in arrays.items():
            save_npy(d / f"{n}.npy", a)
        save_json(d / "meta.json", meta)  # last: marks the directory complete


@dataclass
class ImageFeatures:
    """L2-normalised image features, row i = image i of the set (zeros where the image did not decode)."""

    features: np.ndarray          # [N, d] float32
    ok: np.ndarray                # [N] bool
    annotations: List[str]
    names: List[str]
    errors: List[str] = field(default_factory=list)  # "name: reason", first few failures
    from_cache: bool = False

    @property
    def n_failed(self) -> int:
        return int((~self.ok).sum())


def _collate(batch: List[Sample]) -> List[Sample]:
    return batch


@torch.no_grad()
def encode_images(lm: LoadedModel, images: ImageSet, model_id: dict, cfg: FeatureConfig,
                  cache: Optional[FeatureCache] = None, desc: str = "images") -> ImageFeatures:
    """Encode every image of ``images`` once (batched, on ``cfg.device``), reading/writing the cache."""
    cache = cache or FeatureCache(cfg.cache_dir)
    key = cache.key({"kind": "image", "data": images.identity(), "model": model_id})
    hit = cache.load(key, ("features", "ok"))
    if hit is not None:
        arrays, meta = hit
        log.info("%s: image features from cache %s", desc, cache.root / key)
        return ImageFeatures(arrays["features"], arrays["ok"].astype(bool), meta["annotations"], meta["names"],
                             meta["errors"], from_cache=True)
    model = lm.model.to(cfg.device).eval()
    ds = images.torch_dataset(lm.preprocess)
    workers = cfg.workers
    if not isinstance(images, FileImages):
        workers = min(workers, len(images.shards))  # one shard per worker at a time
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=workers,
                                         collate_fn=_collate, pin_memory=cfg.device.startswith("cuda"))
    total = math.ceil(len(images) / cfg.batch_size) if isinstance(images, FileImages) else None
    orders, feats, ok, anns, names, errors = [], [], [], [], [], []
    dim = None
    for batch in tqdm(loader, total=total, desc=f"{desc}: encoding images", unit="batch", disable=not cfg.progress):
        for s in batch:
            if s.fatal:
                raise InputError(s.fatal)
        good = [s for s in batch if s.image is not None]
        f = None
        if good:
            x = torch.stack([s.image for s in good]).to(cfg.device, non_blocking=True)
            f = model.encode_image(x, normalize=True).float().cpu().numpy()
            dim = f.shape[1]
        j = 0
        for s in batch:
            orders.append(s.order)
            anns.append(s.annotation)
            names.append(s.name)
            if s.image is None:
                ok.append(False)
                feats.append(None)
                if len(errors) < 20:
                    errors.append(f"{s.name}: {s.error}")
            else:
                ok.append(True)
                feats.append(f[j])
                j += 1
    if not orders:
        raise InputError(f"{desc}: {images.describe()} holds no samples.")
    if dim is None:
        raise InputError(f"{desc}: none of the {len(orders)} images decodes (first: {errors[0]}).")
    perm = np.argsort(np.asarray(orders, dtype=np.int64), kind="stable")
    zero = np.zeros(dim, dtype=np.float32)
    features = np.stack([feats[i] if feats[i] is not None else zero for i in perm]).astype(np.float32)
    ok_arr = np.asarray(ok, dtype=bool)[perm]
    anns = [anns[i] for i in perm]
    names = [names[i] for i in perm]
    cache.save(key, {"features": features, "ok": ok_arr},
               {"annotations": anns, "names": names, "errors": errors, "model": model_id,
                "data": images.identity(), "n": len(anns), "dim": int(dim)})
    return ImageFeatures(features, ok_arr, anns, names, errors)


@torch.no_grad()
def encode_texts(lm: LoadedModel, texts: Sequence[str], model_id: dict, cfg: FeatureConfig,
                 cache: Optional[FeatureCache] = None, desc: str = "texts") -> np.ndarray:
    """L2-normalised text features [N, d] float32, batched and cached like images."""
    cache = cache or FeatureCache(cfg.cache_dir)
    key = cache.key({"kind": "text", "texts": _sha(list(texts)), "model": model_id})
    hit = cache.load(key, ("features",))
    if hit is not None:
        return hit[0]["features"]
    model = lm.model.to(cfg.device).eval()
    out = []
    for s in tqdm(range(0, len(texts), cfg.batch_size), desc=f"{desc}: encoding texts", unit="batch",
                  disable=not cfg.progress):
        tokens = lm.tokenizer(list(texts[s:s + cfg.batch_size])).to(cfg.device)
        out.append(model.encode_text(tokens, normalize=True).float().cpu().numpy())
    features = np.concatenate(out).astype(np.float32)
    cache.save(key, {"features": features}, {"model": model_id, "n": len(texts)})
    return features


@torch.no_grad()
def zeroshot_weights(lm: LoadedModel, classnames: Sequence[str], templates: Sequence[str], model_id: dict,
                     cfg: FeatureConfig, cache: Optional[FeatureCache] = None, desc: str = "classes") -> np.ndarray:
    """OpenCLIP's ``build_zero_shot_classifier`` [d, C] (prompts averaged, normalised), cached."""
    from open_clip import build_zero_shot_classifier

    cache = cache or FeatureCache(cfg.cache_dir)
    key = cache.key({"kind": "zeroshot", "classnames": list(classnames), "templates": list(templates),
                     "model": model_id})
    hit = cache.load(key, ("weights",))
    if hit is not None:
        return hit[0]["weights"]
    model = lm.model.to(cfg.device).eval()
    per_batch = max(1, cfg.batch_size // max(1, len(templates)))
    w = build_zero_shot_classifier(model, lm.tokenizer, list(classnames), list(templates),
                                   num_classes_per_batch=per_batch, device=cfg.device,
                                   use_tqdm=cfg.progress).float().cpu().numpy()
    cache.save(key, {"weights": w}, {"model": model_id, "n_classes": len(classnames)})
    return w
