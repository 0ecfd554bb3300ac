"""`helip embed`: encode every pair once with the model's two towers.

Writes the embeddings directory of DESIGN.md section 3: ``image.npy`` and
``text.npy`` (float16 [N, d], L2-normalised, row i = pair i) and ``meta.json``
(encoders, N, dataset fingerprint). ``meta.json`` is written last: a directory
without it is incomplete and refused by ``load_embeddings``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.pairs import PairTensors
from .errors import InputError
from .io import check_fingerprint, load_json, save_json, save_npy
from .models import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class EmbedConfig:
    batch_size: int = 512
    device: str = "cpu"
    dtype: str = "float16"
    progress: bool = True


@torch.no_grad()
def encode_pairs(lm: LoadedModel, pairs: PairTensors, batch_size: int = 512, device: str = "cpu",
                 progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """L2-normalised image and text embeddings, float32 numpy [N, d] each."""
    model = lm.model.to(device).eval()
    imgs, txts = [], []
    for s in tqdm(range(0, len(pairs), batch_size), desc="embedding", disable=not progress):
        imgs.append(model.encode_image(pairs.images[s:s + batch_size].to(device), normalize=True).float().cpu())
        txts.append(model.encode_text(pairs.tokens[s:s + batch_size].to(device), normalize=True).float().cpu())
    return torch.cat(imgs).numpy(), torch.cat(txts).numpy()


def embed(lm: LoadedModel, pairs: PairTensors, out_dir: Path, config: Optional[EmbedConfig] = None,
          encoder_name: str = "") -> Path:
    cfg = config or EmbedConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "meta.json").exists():
        (out_dir / "meta.json").unlink()
    t0 = time.perf_counter()
    img, txt = encode_pairs(lm, pairs, cfg.batch_size, cfg.device, cfg.progress)
    save_npy(out_dir / "image.npy", img.astype(cfg.dtype))
    save_npy(out_dir / "text.npy", txt.astype(cfg.dtype))
    save_json(out_dir / "meta.json", {
        "image_encoder": encoder_name or lm.name, "text_encoder": encoder_name or lm.name,
        "n": len(pairs), "dim": int(img.shape[1]), "dtype": cfg.dtype, "normalized": True,
        "fingerprint": pairs.fingerprint(), "seconds": round(time.perf_counter() - t0, 3),
    })
    return out_dir


def load_embeddings(path: Path, expected_fingerprint: Optional[dict] = None) -> Tuple[np.ndarray, np.ndarray, dict]:
    """Read an embeddings directory (memory-mapped), checking it is complete and current."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"embeddings directory {path} does not exist; run `helip embed --out {path}` first.")
    meta = load_json(path / "meta.json", f"embeddings directory {path} (incomplete? re-run `helip embed`)")
    arrays = []
    for name in ("image.npy", "text.npy"):
        if not (path / name).is_file():
            raise InputError(f"{path / name} is missing; re-run `helip embed --out {path}`.")
        arrays.append(np.load(path / name, mmap_mode="r"))
    img, txt = arrays
    if img.ndim != 2 or txt.ndim != 2 or len(img) != len(txt):
        raise InputError(f"{path}: image.npy {img.shape} and text.npy {txt.shape} must both be [N, d] with the "
                         f"same N (row i = pair i); re-run `helip embed --out {path}`.")
    if "n" in meta and meta["n"] != len(img):
        raise InputError(f"{path}: meta.json says {meta['n']} pairs but the arrays have {len(img)} rows; "
                         f"re-run `helip embed --out {path}`.")
    if expected_fingerprint is not None:
        check_fingerprint(meta.get("fingerprint", {}), expected_fingerprint, f"embeddings directory {path}",
                          f"Re-run `helip embed --out {path}` for this dataset.")
    return img, txt, meta
