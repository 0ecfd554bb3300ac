"""`helip embed`: encode every pair once, resumably, sharded over torchrun ranks.

Writes the embeddings directory of docs/design.md, "File formats": ``image.npy`` and
``text.npy`` (float16 [N, d], L2-normalised, row i = pair i, written through
memory maps so N x d never has to fit in memory twice), ``skipped.json`` (the
unusable pairs, see ``helip.data.sources``: their rows are all zeros and
mining excludes them) and ``meta.json`` (encoders, N, dims, dataset
fingerprint, skipped counts). ``meta.json`` is written last: a directory
without it is incomplete and refused by ``load_embeddings``.

Pairs are encoded in chunks of ``chunk_size`` rows; each finished chunk is
written atomically to ``OUT/.partial/``. A killed run started again with the
same data and encoders skips the finished chunks and produces the same files
(chunk boundaries and batches are fixed, so every row is computed the same way
whether or not the run was interrupted). Under ``torchrun`` rank r encodes
chunks r, r+W, ...; rank 0 merges them.

Encoders: the model's own OpenCLIP towers (default), or an external text
encoder (a sentence-transformers model) and/or an external image encoder (a
timm model); those libraries are imported only when asked for.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.pairs import PairTensors
from .data.sources import PairSource, UnreadableImage, check_bad_fraction
from .errors import ConfigError, InputError
from .io import array_digest, load_npy, check_fingerprint, load_json, save_json, save_with
from .models import LoadedModel
from .resumable import barrier, partial_dir, rank_and_world

log = logging.getLogger(__name__)


@dataclass
class EmbedConfig:
    batch_size: int = 512
    device: str = "cpu"
    dtype: str = "float16"
    progress: bool = True
    chunk_size: int = 65536      # rows per resumable chunk
    workers: int = 0             # DataLoader worker processes reading and decoding images
    max_bad_fraction: float = 0.01

    def validate(self) -> None:
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"dtype must be float16 or float32, got {self.dtype!r}.")
        for name in ("batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.workers < 0:
            raise ConfigError(f"workers must be 0 or more, got {self.workers}.")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA device is visible; use --device cpu.")


# ---------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------

@dataclass
class Encoders:
    """Two towers and the preprocessing that belongs to each.

    ``image_transform`` maps a PIL image to a tensor (run in DataLoader
    workers); ``text_transform`` maps a list of captions to the text tower's
    input; ``encode_*`` return L2-normalised float tensors [b, d].
    """

    image_name: str
    text_name: str
    image_transform: Callable[[Any], torch.Tensor]
    text_transform: Callable[[List[str]], Any]
    encode_image: Callable[[torch.Tensor], torch.Tensor]
    encode_text: Callable[[Any], torch.Tensor]
    identity: Dict[str, Any]   # what determines the vectors: guards resumed chunks


def _file_identity(path: Optional[str]) -> Any:
    if path and os.path.isfile(path):
        st = os.stat(path)
        return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
    return path


def build_encoders(lm: Optional[LoadedModel], device: str = "cpu", text_encoder: Optional[str] = None,
                   image_encoder: Optional[str] = None, image_encoder_weights: str = "hub",
                   pretrained: Optional[str] = None) -> Encoders:
    """The model's towers, with either replaced by a sentence-transformers / timm model when named."""
    enc: Dict[str, Any] = {}
    if lm is not None:
        model = lm.model.to(device).eval()
        name = lm.name + (f" ({pretrained})" if pretrained else "")
        enc.update(image_name=name, text_name=name, image_transform=lm.preprocess,
                   text_transform=lambda caps: lm.tokenizer(caps),
                   encode_image=lambda x: model.encode_image(x.to(device), normalize=True).float(),
                   encode_text=lambda t: model.encode_text(t.to(device), normalize=True).float())
        ident = {"model": lm.name, "pretrained": _file_identity(pretrained)}
        if pretrained is None:  # random initial weights differ run to run: a resume must not mix two models
            ident["weights"] = array_digest(*(v.detach().cpu().numpy() for v in model.state_dict().values()))
        enc["identity"] = {"image": ident, "text": ident}
    else:
        enc["identity"] = {}
    if image_encoder:
        enc.update(_timm_encoder(image_encoder, image_encoder_weights, device))
        enc["identity"]["image"] = {"timm": image_encoder, "weights": _file_identity(image_encoder_weights)}
    if text_encoder:
        enc.update(_sentence_transformers_encoder(text_encoder, device))
        enc["identity"]["text"] = {"sentence_transformers": _file_identity(text_encoder) or text_encoder}
    missing = [k for k in ("image_transform", "text_transform") if k not in enc]
    if missing:
        raise ConfigError("both towers are needed: give --model, or both --image-encoder and --text-encoder.")
    return Encoders(**enc)


def _timm_encoder(name: str, weights: str, device: str) -> dict:
    """A timm model as image tower: pooled features (``num_classes=0``), its own eval transform.

    ``weights``: 'hub' (timm's pretrained weights, downloaded only then),
    'none' (random initialisation), or a local weights file.
    """
    try:
        import timm
        from timm.data import create_transform, resolve_data_config
    except ImportError as e:
        raise ConfigError(f"--image-encoder needs timm ({e}); `pip install timm`.")
    kwargs: Dict[str, Any] = {"num_classes": 0}
    if weights == "none":
        kwargs["pretrained"] = False
    elif weights == "hub":
        kwargs["pretrained"] = True
    else:
        if not os.path.isfile(weights):
            raise InputError(f"--image-encoder-weights {weights}: no such file; give a weights file, 'hub' or 'none'.")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": weights})
    try:
        m = timm.create_model(name, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"timm does not know the model {name!r}; see `timm.list_models()`.") from e
        raise
    m = m.to(device).eval()
    transform = create_transform(**resolve_data_config({}, model=m))

    def encode(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(m(x.to(device)).float(), dim=-1)

    return {"image_name": f"timm:{name}", "image_transform": transform, "encode_image": encode}


def _sentence_transformers_encoder(path: str, device: str) -> dict:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ConfigError(f"--text-encoder needs sentence-transformers ({e}); "
                          f"`pip install sentence-transformers`.")
    m = SentenceTransformer(path, device=device)

    def encode(captions: List[str]) -> torch.Tensor:
        return m.encode(captions, batch_size=len(captions), convert_to_tensor=True, normalize_embeddings=True,
                        show_progress_bar=False).float()

    return {"text_name": f"sentence-transformers:{path}", "text_transform": list, "encode_text": encode}


# ---------------------------------------------------------------------------
# Reading pairs
# ---------------------------------------------------------------------------

class _EmbedItems(torch.utils.data.Dataset):
    """Pair i -> (i, image tensor or None, reason or None); None for an unusable pair."""

    def __init__(self, source: PairSource, image_transform: Callable):
        self.source, self.transform = source, image_transform
        self.empty = set(int(i) for i in source.empty_captions())

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        if i in self.empty:
            return i, None, "empty caption"
        try:
            return i, self.transform(self.source.image(i)), None
        except UnreadableImage as e:
            return i, None, f"unreadable image: {e}"


def _collate(items):
    return items


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """The model in eval mode (no dropout), each module's train/eval mode given back afterwards, so that
    encoding can happen in the middle of training."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def encode_batches(model: torch.nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], device: str = "cpu",
                   autocast: Callable[[], Any] = nullcontext, total: Optional[int] = None,
                   progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """L2-normalised image and text embeddings of ``(images, tokens)`` batches, float32 numpy [rows, d] each.

    The one loop that encodes prepared pairs with an OpenCLIP model's own
    towers: in-memory pairs (``encode_pairs``, ``embed``) and the training
    set during re-mining (``helip.training.remine``) all go through it. The model runs
    in eval mode (no dropout) and gets its train/eval modes back afterwards,
    so it can be called in the middle of training.
    """
    imgs, txts = [], []
    with _eval_mode(model):
        for images, tokens in tqdm(batches, desc="embedding", total=total, disable=not progress):
            with autocast():
                imgs.append(model.encode_image(images.to(device), normalize=True).float().cpu())
                txts.append(model.encode_text(tokens.to(device), normalize=True).float().cpu())
    return torch.cat(imgs).numpy(), torch.cat(txts).numpy()


def encode_pairs(lm: LoadedModel, pairs: PairTensors, batch_size: int = 512, device: str = "cpu",
                 progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """L2-normalised image and text embeddings of in-memory pairs, float32 numpy [N, d] each."""
    model = lm.model.to(device).eval()
    starts = range(0, len(pairs), batch_size)
    batches = ((pairs.images[s:s + batch_size], pairs.tokens[s:s + batch_size]) for s in starts)
    return encode_batches(model, batches, device, total=len(starts), progress=progress)


def encode_images(lm: LoadedModel, images: torch.Tensor, batch_size: int = 512, device: str = "cpu") -> np.ndarray:
    """L2-normalised image embeddings only, float32 numpy [N, d]: the same batches and values as
    ``encode_pairs(...)[0]`` without encoding the captions (a linear probe needs images only)."""
    with torch.no_grad(), _eval_mode(lm.model.to(device)) as model:
        out = [model.encode_image(images[s:s + batch_size].to(device), normalize=True).float().cpu()
               for s in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


# ---------------------------------------------------------------------------
# The resumable, sharded writer
# ---------------------------------------------------------------------------

def _save_chunk(path: Path, image: np.ndarray, text: np.ndarray, bad: List[Tuple[int, str]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, image=image, text=text, bad_index=np.array([b[0] for b in bad], dtype=np.int64),
                     bad_reason=np.array([b[1] for b in bad], dtype=str))
    save_with(path, write)


def _run_chunks(n: int, key: str, out_dir: Path, cfg: EmbedConfig,
                encode_rows: Callable[..., Any]) -> List[Path]:
    """Encode this rank's unfinished chunks with ``encode_rows`` (a generator of finished chunks)."""
    rank, world = rank_and_world()
    partial = partial_dir(out_dir, key, rank, "other data or encoders")
    n_chunks = -(-n // cfg.chunk_size)
    paths = [partial / f"chunk_{c:06d}.npz" for c in range(n_chunks)]
    mine = [c for c in range(rank, n_chunks, world)]
    todo = [c for c in mine if not paths[c].is_file()]
    rows = {c: np.arange(c * cfg.chunk_size, min(n, (c + 1) * cfg.chunk_size)) for c in todo}
    done_rows = sum(min(n, (c + 1) * cfg.chunk_size) - c * cfg.chunk_size for c in mine if c not in rows)
    if done_rows:
        log.info("resuming: %d of this rank's chunks already done", len(mine) - len(todo))
    bad_seen = 0
    with tqdm(total=sum(min(n, (c + 1) * cfg.chunk_size) - c * cfg.chunk_size for c in mine), initial=done_rows,
              unit="pair", desc="embedding", disable=not cfg.progress) as bar:
        for c, image, text, bad in encode_rows([rows[c] for c in todo], todo, bar):
            _save_chunk(paths[c], image, text, bad)
            bad_seen += len(bad)  # a lower bound of the total: abort as soon as it is already too many
            check_bad_fraction(bad_seen, n, cfg.max_bad_fraction, " so far")
    barrier()
    return paths


def _collect(paths: List[Path]) -> Tuple[Dict[str, int], List[Tuple[int, str]]]:
    """Dimensions and unusable pairs over all chunks."""
    dims = {"image": 0, "text": 0}
    bad: List[Tuple[int, str]] = []
    for p in paths:
        with np.load(p) as z:
            dims = {name: max(dims[name], z[name].shape[1]) for name in dims}
            bad.extend(zip(z["bad_index"].tolist(), z["bad_reason"].tolist()))
    return dims, sorted(bad)


def _merge(paths: List[Path], n: int, dims: Dict[str, int], dtype: str, out_dir: Path) -> None:
    """Rank 0: chunks -> image.npy, text.npy, written through memory maps (N x d never held twice)."""
    for name in ("image", "text"):
        def write(tmp: str, name=name) -> None:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, dims[name]))
            row = 0
            for p in paths:
                with np.load(p) as z:
                    if z[name].shape[1]:  # else a chunk with no usable pair: its rows stay zero
                        arr[row:row + len(z[name])] = z[name]
                    row += len(z[name])
            arr.flush()
            del arr
        save_with(out_dir / f"{name}.npy", write)


def _write_embeddings(out_dir: Path, n: int, fp: dict, identity: dict, cfg: EmbedConfig,
                      encode_rows, meta: dict) -> Path:
    cfg.validate()
    if n == 0:
        raise InputError("the dataset has no pairs; check --data.")
    out_dir = Path(out_dir)
    key = hashlib.sha256(json.dumps({"n": n, "fingerprint": fp, "encoders": identity, "dtype": cfg.dtype,
                                     "chunk_size": cfg.chunk_size}, sort_keys=True).encode()).hexdigest()[:16]
    t0 = time.perf_counter()
    paths = _run_chunks(n, key, out_dir, cfg, encode_rows)
    rank, world = rank_and_world()
    if rank == 0:
        dims, bad = _collect(paths)
        reasons = [r for _, r in bad]
        n_empty = sum(r == "empty caption" for r in reasons)
        detail = f" ({n_empty} empty captions, {len(bad) - n_empty} unreadable images)"
        check_bad_fraction(len(bad), n, cfg.max_bad_fraction, detail)
        (out_dir / "meta.json").unlink(missing_ok=True)  # an earlier result is replaced from here on
        _merge(paths, n, dims, cfg.dtype, out_dir)
        save_json(out_dir / "skipped.json", [{"index": i, "reason": r} for i, r in bad])
        save_json(out_dir / "meta.json", {
            **meta, "n": n, **({"dim": dims["image"]} if dims["image"] == dims["text"] else {}),
            "image_dim": dims["image"], "text_dim": dims["text"], "dtype": cfg.dtype, "normalized": True,
            "fingerprint": fp,
            "skipped": {"count": len(bad), "empty_caption": n_empty, "unreadable_image": len(bad) - n_empty,
                        "fraction": round(len(bad) / n, 6), "file": "skipped.json"},
            "chunk_size": cfg.chunk_size, "world_size": world, "seconds": round(time.perf_counter() - t0, 3),
        })
        shutil.rmtree(out_dir / ".partial", ignore_errors=True)
        log.info("embedded %d pairs (%d skipped%s) -> %s", n, len(bad), detail if bad else "", out_dir)
    barrier()
    return out_dir


def embed_source(source: PairSource, encoders: Encoders, out_dir: Path, config: Optional[EmbedConfig] = None) -> Path:
    """Encode every pair of ``source`` into the embeddings directory ``out_dir`` (resumable, sharded)."""
    cfg = config or EmbedConfig()
    cfg.validate()
    n = len(source)
    empty = source.empty_captions()
    check_bad_fraction(len(empty), n, cfg.max_bad_fraction, f" (empty captions, e.g. {source.where(int(empty[0]))})"
                       if len(empty) else "")
    items = _EmbedItems(source, encoders.image_transform)

    @torch.no_grad()
    def encode_rows(row_lists, chunk_ids, bar):
        batches, owner = [], []
        for c, rows in zip(chunk_ids, row_lists):
            for s in range(0, len(rows), cfg.batch_size):
                batches.append(rows[s:s + cfg.batch_size].tolist())
                owner.append(c)
        if not batches:
            return
        loader = torch.utils.data.DataLoader(items, batch_sampler=batches, num_workers=cfg.workers,
                                             collate_fn=_collate, persistent_workers=False)
        current, parts = None, None
        for c, batch in zip(owner, loader):
            if c != current:
                if current is not None:
                    yield _finish(current, parts)
                current, parts = c, {"image": [], "text": [], "bad": []}
            ok = [(i, t) for i, t, reason in batch if t is not None]
            parts["bad"].extend((i, reason) for i, t, reason in batch if t is None)
            img = txt = None
            if ok:
                img = encoders.encode_image(torch.stack([t for _, t in ok])).cpu()
                txt = encoders.encode_text(encoders.text_transform([source.caption(i) for i, _ in ok])).cpu()
            parts["image"].append((batch, ok, img))
            parts["text"].append((batch, ok, txt))
            bar.update(len(batch))
        yield _finish(current, parts)

    def _finish(c, parts):
        image = _assemble(parts["image"], cfg.dtype)
        text = _assemble(parts["text"], cfg.dtype)
        return c, image, text, parts["bad"]

    meta = {"image_encoder": encoders.image_name, "text_encoder": encoders.text_name, "data": source.describe()}
    return _write_embeddings(Path(out_dir), n, source.fingerprint(), encoders.identity, cfg, encode_rows, meta)


def _assemble(parts, dtype: str) -> np.ndarray:
    """Batches (with unusable rows left out) -> one [rows, d] array with zero rows for the unusable ones."""
    d = next((e.shape[1] for _, _, e in parts if e is not None), 0)  # 0: a chunk with no usable pair
    rows = sum(len(b) for b, _, _ in parts)
    out = np.zeros((rows, d), dtype=dtype)
    r = 0
    for batch, ok, e in parts:
        pos = {i: r + k for k, (i, _, _) in enumerate(batch)}
        if ok:
            out[[pos[i] for i, _ in ok]] = e.numpy().astype(dtype)
        r += len(batch)
    return out


def embed(lm: LoadedModel, pairs: PairTensors, out_dir: Path, config: Optional[EmbedConfig] = None,
          encoder_name: str = "") -> Path:
    """Embed in-memory, already preprocessed pairs (the demo's world) with the model's towers."""
    cfg = config or EmbedConfig()
    model = lm.model.to(cfg.device).eval()

    def encode_rows(row_lists, chunk_ids, bar):
        def batches(rows):
            for s in range(0, len(rows), cfg.batch_size):
                idx = torch.as_tensor(rows[s:s + cfg.batch_size])
                yield pairs.images[idx], pairs.tokens[idx]
                bar.update(len(idx))

        for c, rows in zip(chunk_ids, row_lists):
            img, txt = encode_batches(model, batches(rows), cfg.device)
            yield c, img.astype(cfg.dtype), txt.astype(cfg.dtype), []

    name = encoder_name or lm.name
    meta = {"image_encoder": name, "text_encoder": name}
    h = hashlib.sha256()
    for v in model.state_dict().values():
        h.update(v.detach().cpu().numpy().tobytes())
    identity = {"model": name, "weights": h.hexdigest()}
    return _write_embeddings(Path(out_dir), len(pairs), pairs.fingerprint(), identity, cfg, encode_rows, meta)


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
        arrays.append(load_npy(path / name, f"re-run `helip embed --out {path}`."))
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


def load_skipped(path: Path) -> np.ndarray:
    """Indices of the unusable pairs recorded by ``helip embed`` (empty when none or an older directory)."""
    f = Path(path) / "skipped.json"
    if not f.is_file():
        return np.zeros(0, dtype=np.int64)
    return np.array([r["index"] for r in load_json(f, f"skipped pairs of {path}")], dtype=np.int64)
