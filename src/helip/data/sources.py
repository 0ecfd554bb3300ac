"""Image-caption pair datasets with random access by index, behind one interface.

Hard-pair batches put a target beside partners from anywhere in the dataset, so
every format must answer "pair i" without streaming through pairs 0..i-1:

- ``world``: a synthetic world of the application (``helip.app.worlds``, which
  registers itself here), generated in memory;
- ``*.csv`` / ``*.tsv``: a table as OpenCLIP's ``--csv-img-key filepath
  --csv-caption-key title --csv-separator "\\t"`` read it; image paths may be
  relative to the table's directory; the separator, when not given, is the one
  (tab first, as OpenCLIP's default, then comma) that splits the header into
  fields naming both columns;
- ``*.jsonl``: one ``{"image": path, "caption": text}`` object per line;
- WebDataset shards as img2dataset writes them (``{key}.jpg|jpeg|png|webp``,
  ``{key}.txt``, ``{key}.json``), given as a brace pattern
  (``data/{00000..00331}.tar``). Each shard is scanned once for the offsets of
  its image members and its captions; the index is cached beside the shard
  (``<shard>.helip-index.json``, written atomically and rebuilt when the
  shard's size or mtime changes), or under ``$HELIP_CACHE/shard-index`` when the
  shard's directory is read-only. An image is then one seek and one read.

Pair order is the order of the rows (CSV, JSONL) or of the samples' first
members in each shard, shard after shard in pattern order.

Unusable pairs, the rule (deterministic, so every stage agrees): a pair is
unusable when its caption is empty after stripping whitespace (known when the
source is opened) or when its image cannot be read and decoded to RGB (known
only when it is read: ``image(i)`` raises ``UnreadableImage``). ``helip embed``
reads every image once and records the unusable pairs in the embeddings
directory (``skipped.json``), so mining never proposes them; ``PairDataset``
replaces an unusable index by the next usable one (i+1, i+2, ... wrapping).

Why not ``wids``: its memory-mapped reader rebuilds a shard's index on every
open, needs the sample count of each shard up front, keeps a small LRU of open
shards (hard-pair batches touch random shards, so nearly every access would
re-index) and copies local shards into a cache directory; a persistent offset
index built with the standard library's ``tarfile`` is a few dozen lines and
also gives the captions needed for the dataset fingerprint without reading any
image.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..errors import ConfigError, InputError
from ..io import fingerprint, reading_text, save_json

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
INDEX_SUFFIX = ".helip-index.json"
INDEX_VERSION = 1


class UnreadableImage(Exception):
    """Pair i's image is missing or cannot be decoded (a skipped pair, not a user error)."""


@dataclass
class DataConfig:
    """How ``--data`` is read: the table conventions of OpenCLIP and the built-in world's size."""

    data: str = "world"
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: Optional[str] = None   # None: tab or comma, whichever the header splits into both keys
    n_train: int = 20000                  # world only
    world_seed: int = 0                   # world only: the sample seed
    world: str = "builtin"                # world only: which world of the family (helip.app.worlds)
    index_dir: Optional[str] = None       # shard indexes here instead of beside the shards
    max_bad_fraction: float = 0.01
    progress: bool = True                 # a progress bar while shards are indexed

    def validate(self) -> None:
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"--max-bad-fraction must be in [0, 1], got {self.max_bad_fraction}.")


class PairSource:
    """Random access to image-caption pairs. Subclasses fill ``_captions`` and implement ``_image``."""

    kind = "?"

    def __init__(self, spec: str, captions: List[str]):
        self.spec = spec
        self._captions = captions

    def __len__(self) -> int:
        return len(self._captions)

    def caption(self, i: int) -> str:
        return self._captions[i]

    def captions(self) -> List[str]:
        return self._captions

    def fingerprint(self) -> dict:
        return fingerprint(self._captions)

    def empty_captions(self) -> np.ndarray:
        """Indices of pairs whose caption is empty (unusable by the rule above)."""
        return np.array([i for i, c in enumerate(self._captions) if not c.strip()], dtype=np.int64)

    def where(self, i: int) -> str:
        """Where pair i comes from, for messages."""
        return f"pair {i}"

    def image(self, i: int) -> Image.Image:
        """Pair i's image as RGB; raises ``UnreadableImage`` when it cannot be read or decoded."""
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} is outside a dataset of {len(self)} pairs")
        try:
            im = self._image(i)
            im.load()
            return im.convert("RGB")
        except UnreadableImage:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's decode errors
            msg = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the image bytes", str(e))  # no memory addresses:
            raise UnreadableImage(f"{self.where(i)}: {type(e).__name__}: {msg}") from e   # reruns give equal files

    def _image(self, i: int) -> Image.Image:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "n": len(self)}


# The synthetic worlds belong to the application (helip.app.worlds), which registers its generator here
# when imported; the library only reads a generated split. ``(n, seed, split, world) -> split`` with
# ``.images`` (uint8 [N, H, W, 3]) and ``.captions``.
_world_generator: Optional[Callable[[int, int, str, str], Any]] = None


def register_world_generator(generate: Callable[[int, int, str, str], Any]) -> None:
    """Make ``--data world`` read from ``generate`` (the application calls this on import)."""
    global _world_generator
    _world_generator = generate


class WorldSource(PairSource):
    kind = "world"

    def __init__(self, n: int, seed: int, world: str = "builtin"):
        if _world_generator is None:
            raise ConfigError("--data world: the synthetic worlds are part of the helip application; "
                              "`import helip.app.worlds` first (the helip command does), or pass a data file.")
        self.split = _world_generator(n, seed, "train", world)
        self.seed, self.world = seed, world
        super().__init__("world", list(self.split.captions))

    def _image(self, i: int) -> Image.Image:
        return Image.fromarray(self.split.images[i])

    def describe(self) -> dict:
        extra = {} if self.world == "builtin" else {"world": self.world}
        return {**super().describe(), "world_seed": self.seed, **extra}


class FilePairs(PairSource):
    """Pairs whose images are files: CSV/TSV and JSONL tables."""

    def __init__(self, spec: str, kind: str, paths: List[str], captions: List[str]):
        self.kind = kind
        self.paths = paths
        super().__init__(spec, captions)

    def where(self, i: int) -> str:
        return f"pair {i} ({self.paths[i]})"

    def _image(self, i: int) -> Image.Image:
        return Image.open(self.paths[i])


def _resolve(base: Path, p: str) -> str:
    return p if os.path.isabs(p) else str(base / p)


def _pick_separator(header: str, keys: Sequence[str]) -> Optional[str]:
    for sep in ("\t", ","):
        fields = next(csv.reader([header], delimiter=sep))
        if all(k in fields for k in keys):
            return sep
    return None


def read_table(path: Path, img_key: str, caption_key: str, sep: Optional[str]) -> FilePairs:
    """A CSV/TSV as OpenCLIP reads it: a header naming the image-path and caption columns."""
    if not path.is_file():
        raise InputError(f"--data {path}: no such file.")
    with reading_text(path, "--data"), open(path, newline="", encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n")
        if sep is None:
            sep = _pick_separator(header, (img_key, caption_key)) or ("\t" if "\t" in header else ",")
        f.seek(0)
        reader = csv.DictReader(f, delimiter=sep)
        fields = reader.fieldnames or []
        missing = [k for k in (img_key, caption_key) if k not in fields]
        if missing:
            raise InputError(
                f"{path} has no column {' or '.join(map(repr, missing))} (columns: {', '.join(fields) or 'none'}, "
                f"separator {sep!r}); pass --csv-img-key/--csv-caption-key naming its image and caption columns"
                f" (and --csv-separator if needed).")
        base = path.parent
        paths, caps = [], []
        for row in reader:
            paths.append(_resolve(base, (row.get(img_key) or "").strip()))
            caps.append(row.get(caption_key) or "")
    return FilePairs(str(path), "csv", paths, caps)


def read_jsonl(path: Path) -> FilePairs:
    if not path.is_file():
        raise InputError(f"--data {path}: no such file.")
    base = path.parent
    paths, caps = [], []
    with reading_text(path, "--data"), open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                image, caption = rec["image"], rec["caption"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InputError(f"{path}:{line_no}: expected a JSON object with 'image' and 'caption' "
                                 f"({type(e).__name__}: {e}); fix or remove that line.")
            paths.append(_resolve(base, str(image)))
            caps.append("" if caption is None else str(caption))
    return FilePairs(str(path), "jsonl", paths, caps)


# ---------------------------------------------------------------------------
# WebDataset shards
# ---------------------------------------------------------------------------

def expand_shards(pattern: str) -> List[str]:
    """``dir/{00000..00003}.tar`` -> the four paths (braceexpand, as webdataset and open_clip_train use);
    several patterns may be joined with ``::`` as open_clip_train allows."""
    import braceexpand

    out: List[str] = []
    for part in pattern.split("::"):
        out.extend(braceexpand.braceexpand(part))
    return out


def _split_member(name: str) -> Tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    m = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    if not m:
        return name, ""
    return m.group(1), m.group(2).lower()


def build_shard_index(shard: Path) -> dict:
    """One pass over a tar: per sample its key, image member (ext, data offset, size) and caption."""
    samples: Dict[str, dict] = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = _split_member(m.name)
                s = samples.setdefault(key, {"image": None, "caption": None})
                if ext in IMAGE_EXTS and s["image"] is None:
                    s["image"] = [ext, m.offset_data, m.size]
                elif ext == "txt":
                    raw = tar.extractfile(m).read()
                    try:
                        s["caption"] = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        s["caption"] = ""  # undecodable caption: an empty one, skipped by the rule
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"shard {shard} is not a readable tar file ({e}); re-download or remove it from --data.")
    st = shard.stat()
    keys = list(samples)
    return {
        "version": INDEX_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "keys": keys,
        "image": [samples[k]["image"] or ["", -1, 0] for k in keys],
        "captions": [samples[k]["caption"] or "" for k in keys],
    }


def _index_paths(shard: Path, index_dir: Optional[str]) -> List[Path]:
    import hashlib

    beside = shard.with_name(shard.name + INDEX_SUFFIX)
    digest = hashlib.sha256(str(shard.resolve()).encode()).hexdigest()[:16]
    root = Path(index_dir) if index_dir else Path(os.environ.get("HELIP_CACHE", Path.home() / ".cache" / "helip"))
    elsewhere = root / "shard-index" / f"{shard.name}.{digest}{INDEX_SUFFIX}"
    return [elsewhere] if index_dir else [beside, elsewhere]


def load_shard_index(shard: Path, index_dir: Optional[str] = None) -> dict:
    """The cached index of ``shard`` if current, else a freshly built one (cached for next time)."""
    st = shard.stat()
    candidates = _index_paths(shard, index_dir)
    for p in candidates:
        if p.is_file():
            try:
                idx = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if (idx.get("version"), idx.get("size"), idx.get("mtime_ns")) == (INDEX_VERSION, st.st_size,
                                                                               st.st_mtime_ns):
                return idx
    idx = build_shard_index(shard)
    for p in candidates:
        try:
            save_json(p, idx)
            log.debug("indexed %s -> %s", shard, p)
            break
        except OSError:
            continue
    else:
        log.warning("could not cache the index of %s (tried %s)", shard, ", ".join(map(str, candidates)))
    return idx


class ShardPairs(PairSource):
    kind = "webdataset"

    def __init__(self, pattern: str, index_dir: Optional[str] = None, progress: bool = False):
        from tqdm.auto import tqdm

        self.shards = [Path(s) for s in expand_shards(pattern)]
        if not self.shards:
            raise InputError(f"--data {pattern!r} names no shard.")
        missing = [s for s in self.shards if not s.is_file()]
        if missing:
            raise InputError(f"shard {missing[0]} does not exist ({len(missing)} of the {len(self.shards)} shards "
                             f"named by {pattern!r} are missing); fix the brace pattern or fetch the shards.")
        captions: List[str] = []
        self._image_index: List[np.ndarray] = []   # per shard: [n, 2] int64 (offset, size)
        self._exts: List[List[str]] = []
        self._keys: List[List[str]] = []
        starts = [0]
        for shard in tqdm(self.shards, desc="indexing shards", unit="shard", disable=not progress):
            idx = load_shard_index(shard, index_dir)
            captions.extend(idx["captions"])
            self._keys.append(idx["keys"])
            self._exts.append([e for e, _, _ in idx["image"]])
            self._image_index.append(np.array([[o, s] for _, o, s in idx["image"]], dtype=np.int64).reshape(-1, 2))
            starts.append(starts[-1] + len(idx["keys"]))
        self._starts = np.array(starts, dtype=np.int64)
        self._handles: Dict[int, io.BufferedReader] = {}
        self._pid = os.getpid()
        super().__init__(pattern, captions)

    def _locate(self, i: int) -> Tuple[int, int]:
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        return s, i - int(self._starts[s])

    def where(self, i: int) -> str:
        s, j = self._locate(i)
        return f"pair {i} ({self.shards[s]}, key {self._keys[s][j]})"

    def _handle(self, s: int):
        if os.getpid() != self._pid:  # a DataLoader worker: file offsets must not be shared with the parent
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(s)
        if h is None:
            h = self._handles[s] = open(self.shards[s], "rb")
        return h

    def _image(self, i: int) -> Image.Image:
        s, j = self._locate(i)
        offset, size = self._image_index[s][j]
        if offset < 0:
            raise UnreadableImage(f"{self.where(i)}: the sample has no {'/'.join(IMAGE_EXTS)} member")
        h = self._handle(s)
        h.seek(int(offset))
        return Image.open(io.BytesIO(h.read(int(size))))

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def describe(self) -> dict:
        return {**super().describe(), "shards": len(self.shards)}


def open_pairs(spec_or_config, **overrides) -> PairSource:
    """Open ``--data``: 'world', a .csv/.tsv, a .jsonl, or WebDataset shards ('dir/{00000..00003}.tar')."""
    if isinstance(spec_or_config, DataConfig):
        cfg = DataConfig(**{**spec_or_config.__dict__, **overrides})
    else:
        cfg = DataConfig(data=str(spec_or_config), **overrides)
    cfg.validate()
    if cfg.csv_separator in ("\\t", "tab"):  # `--csv-separator "\t"` on a shell is a backslash and a t
        cfg.csv_separator = "\t"
    spec = cfg.data
    low = spec.lower()
    if spec == "world":
        return WorldSource(cfg.n_train, cfg.world_seed, cfg.world)
    if low.endswith((".csv", ".tsv")):
        return read_table(Path(spec), cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_separator)
    if low.endswith(".jsonl"):
        return read_jsonl(Path(spec))
    if low.endswith(".tar") or ".tar::" in low:
        return ShardPairs(spec, cfg.index_dir, progress=cfg.progress)
    raise ConfigError(f"--data {spec!r}: expected 'world', a .csv/.tsv table, a .jsonl file, or WebDataset "
                      f"shards such as 'dir/{{00000..00003}}.tar'.")


def check_bad_fraction(n_bad: int, n: int, max_fraction: float, detail: str = "") -> None:
    """Abort (InputError) once unusable pairs exceed ``max_fraction`` of the dataset."""
    if n and n_bad > max_fraction * n:
        raise InputError(f"{n_bad} of {n} pairs ({100 * n_bad / n:.2f}%) are unusable{detail}, more than "
                         f"--max-bad-fraction {max_fraction}; fix the data or raise --max-bad-fraction.")


# ---------------------------------------------------------------------------
# torch Dataset
# ---------------------------------------------------------------------------

try:  # torch is a dependency; the guard only keeps this module importable for tools that read shards
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object


class PairDataset(_TorchDataset):
    """Map-style dataset: ``ds[i] -> (image tensor, token tensor)`` with the model's OpenCLIP transforms.

    ``preprocess`` is the model's image transform (PIL -> tensor) and ``tokenizer``
    its OpenCLIP tokenizer (list of str -> [n, context_length]). An unusable
    index (empty caption, listed in ``skip`` -- e.g. the ``skipped.json`` of
    the embeddings directory -- or an image that fails to decode now) is replaced
    by the next usable index, i+1, i+2, ... wrapping around; ``replaced`` counts
    the replacements made in this process.
    """

    def __init__(self, source: PairSource, preprocess: Callable, tokenizer: Callable, skip: Iterable[int] = ()):
        self.source, self.preprocess, self.tokenizer = source, preprocess, tokenizer
        self.bad = set(int(i) for i in source.empty_captions()) | set(int(i) for i in skip)
        self.replaced = 0
        if len(self.bad) >= len(source):
            raise InputError(f"--data {source.spec}: no usable pair (all {len(source)} are unusable).")

    def __len__(self) -> int:
        return len(self.source)

    def fingerprint(self) -> dict:
        """The source's caption fingerprint (what resumed training checks it continues on)."""
        return self.source.fingerprint()

    def load(self, i: int):
        """Pair i as tensors, or None when it is unusable."""
        if i in self.bad:
            return None
        try:
            image = self.source.image(i)
        except UnreadableImage as e:
            log.warning("skipping %s", e)
            self.bad.add(i)
            return None
        return self.preprocess(image), self.tokenizer([self.source.caption(i)])[0]

    def __getitem__(self, i: int):
        n = len(self.source)
        for step in range(n):
            item = self.load((i + step) % n)
            if item is not None:
                if step:
                    self.replaced += 1
                return item
        raise InputError(f"--data {self.source.spec}: no usable pair (all {n} are unusable).")


def add_data_arguments(p, world: bool = True) -> None:
    """The ``--data`` options, shared by the commands that read a dataset."""
    d = DataConfig()
    p.add_argument("--data", required=True,
                   help="a .csv/.tsv or .jsonl file, WebDataset shards 'dir/{00000..00331}.tar', or 'world' (the "
                        "demo's built-in world)")
    p.add_argument("--csv-img-key", default=d.csv_img_key, help="CSV/TSV column of image paths (OpenCLIP's name)")
    p.add_argument("--csv-caption-key", default=d.csv_caption_key, help="CSV/TSV column of captions")
    p.add_argument("--csv-separator", default=d.csv_separator,
                   help="CSV/TSV separator (default: tab or comma, whichever the header splits into both columns)")
    p.add_argument("--max-bad-fraction", type=float, default=d.max_bad_fraction,
                   help="abort when more than this share of pairs is unusable (empty caption, unreadable image)")
    p.add_argument("--index-dir", default=None, help="where shard indexes are cached (default: beside the shards)")
    if world:
        p.add_argument("--n-train", type=int, default=d.n_train, help="pairs in the built-in world's training split")
        p.add_argument("--world-seed", type=int, default=d.world_seed, help="sample seed inside the world")
        p.add_argument("--world", default=d.world, help="which world of the family: builtin (default), w1 ... w7")


def data_config_from_args(args) -> DataConfig:
    return DataConfig(**{k: getattr(args, k) for k in DataConfig.__dataclass_fields__ if hasattr(args, k)})
