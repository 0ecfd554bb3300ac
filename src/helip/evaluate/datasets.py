"""Evaluation datasets on disk: image folders, caption files, WebDataset shards.

Layouts (docs/evaluation.md shows them in full):

- image folder: ``DIR/<class>/<image>``, classes in sorted folder order, as
  torchvision's ``ImageFolder`` (and so CLIP_benchmark) numbers them;
- CLIP_benchmark WebDataset: ``DIR/<split>/{0..n-1}.tar`` (``nshards.txt``
  beside them), samples with an image (webp/png/jpg/jpeg) and ``cls`` (an
  integer label) or ``txt`` (captions, one per line, for retrieval), and
  ``DIR/classnames.txt``, ``DIR/zeroshot_classification_templates.txt``;
- caption files: CSV/TSV (OpenCLIP's ``filepath``/``title`` columns, or
  ``image``/``caption``) or JSONL (``{"image": ..., "caption": ...}`` or
  ``{"image": ..., "captions": [...]}``). Rows naming the same image are its
  captions (COCO/Flickr30k Karpathy test sets: 5 per image). Relative image
  paths are relative to the file.

Every set is an :class:`ImageSet`: a list of images (decoded lazily, in a
DataLoader) with one annotation string each (a label, or captions joined by
newlines), and an ``identity`` for the feature cache. An image that does not
decode is returned as a failed sample, so it is counted and skipped by the
caller, never silently fed to the model as something else.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from ..errors import InputError
from ..io import reading_text

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
WDS_IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's order
IMAGE_KEYS = ("filepath", "image", "image_path", "file_name", "filename")
CAPTION_KEYS = ("title", "caption", "text", "sentence")


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _stat_list(paths: Sequence[Path]) -> str:
    """Hash of (path, size, mtime) of every file: changes when any file is replaced, added or removed."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def decode_image(data, transform: Callable) -> Tuple[Optional[torch.Tensor], Optional[str]]:
    """(tensor, None) or (None, reason). ``data`` is a path or the raw bytes of an image file."""
    import io

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as im:
            im = im.convert("RGB")
        return transform(im), None
    except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        return None, f"{type(e).__name__}: {str(e)[:120]}"


@dataclass
class Sample:
    order: int
    image: Optional[torch.Tensor]
    error: Optional[str]
    annotation: str
    name: str
    fatal: Optional[str] = None  # a format error; raised in the main process (not in a DataLoader worker)


class ImageSet:
    """Images with one annotation each; ``torch_dataset`` yields :class:`Sample` in any order."""

    kind = "abstract"

    def identity(self) -> dict:
        raise NotImplementedError

    def torch_dataset(self, transform: Callable):
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, paths, annotations, transform):
        self.paths, self.annotations, self.transform = paths, annotations, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img, err = decode_image(self.paths[i], self.transform)
        return Sample(i, img, err, self.annotations[i], str(self.paths[i]))


@dataclass
class FileImages(ImageSet):
    """Image files on disk with an annotation per file (a label, or captions)."""

    paths: List[Path]
    annotations: List[str]
    root: Path
    kind: str = "files"

    def __len__(self) -> int:
        return len(self.paths)

    def identity(self) -> dict:
        return {"kind": self.kind, "root": str(self.root.resolve()), "n": len(self.paths),
                "files": _stat_list(self.paths), "annotations": _hash_json(self.annotations)}

    def torch_dataset(self, transform):
        return _FileDataset(self.paths, self.annotations, transform)

    def describe(self) -> str:
        return f"{len(self.paths)} images under {self.root}"


class _ShardDataset(torch.utils.data.IterableDataset):
    def __init__(self, shards: List[Path], ann_key: str, transform):
        self.shards, self.ann_key, self.transform = shards, ann_key, transform

    def __iter__(self) -> Iterator[Sample]:
        import webdataset as wds

        index = {str(s): i for i, s in enumerate(self.shards)}
        counts: Dict[str, int] = {}
        ds = wds.WebDataset([str(s) for s in self.shards], shardshuffle=False, nodesplitter=None,
                            workersplitter=wds.split_by_worker, empty_check=False)
        for sample in ds:
            url = sample["__url__"]
            pos = counts.get(url, 0)
            counts[url] = pos + 1
            name = f"{Path(url).name}:{sample['__key__']}"
            if self.ann_key not in sample:
                yield Sample(0, None, None, "", name, fatal=(
                    f"sample {name} has no '.{self.ann_key}' entry; "
                    f"{'a classification' if self.ann_key == 'cls' else 'a retrieval'} shard needs one per image "
                    f"(CLIP_benchmark layout)."))
                return
            ann = sample[self.ann_key].decode("utf-8").strip()
            data = next((sample[k] for k in WDS_IMAGE_KEYS if k in sample), None)
            if data is None:
                img, err = None, f"no image entry ({'/'.join(WDS_IMAGE_KEYS)})"
            else:
                img, err = decode_image(data, self.transform)
            yield Sample(index[url] * (1 << 32) + pos, img, err, ann, name)


@dataclass
class ShardImages(ImageSet):
    """WebDataset shards read in order; the annotation is the ``cls`` or ``txt`` entry of each sample."""

    shards: List[Path]
    ann_key: str
    kind: str = "webdataset"

    def identity(self) -> dict:
        return {"kind": self.kind, "shards": [str(s.resolve()) for s in self.shards],
                "files": _stat_list(self.shards), "ann_key": self.ann_key}

    def torch_dataset(self, transform):
        return _ShardDataset(self.shards, self.ann_key, transform)

    def describe(self) -> str:
        return f"{len(self.shards)} WebDataset shards in {self.shards[0].parent}"


def find_shards(path: Path, split: str) -> Optional[Tuple[List[Path], List[Path]]]:
    """(shards, directories to look for metadata in), or None when ``path`` is not a WebDataset layout."""
    for shard_dir, meta_dirs in ((path / split, [path]), (path, [path, path.parent])):
        if not shard_dir.is_dir():
            continue
        nshards = shard_dir / "nshards.txt"
        if nshards.is_file():
            try:
                n = int(nshards.read_text().strip())
            except ValueError:
                raise InputError(f"{nshards} must hold the number of shards (an integer).")
            shards = [shard_dir / f"{i}.tar" for i in range(n)]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise InputError(f"{nshards} says {n} shards but {', '.join(missing[:3])} "
                                 f"{'is' if len(missing) == 1 else 'are'} missing in {shard_dir}.")
            return shards, meta_dirs
        shards = sorted(shard_dir.glob("*.tar"), key=_natural_key)
        if shards:
            return shards, meta_dirs
    others = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")
                    and ((d / "nshards.txt").is_file() or any(d.glob("*.tar")))) if path.is_dir() else []
    if others:  # a WebDataset directory without the asked split
        raise InputError(f"{path} has no {split}/ split (its WebDataset splits: {', '.join(others)}); "
                         f"pass --split {others[0]}.")
    return None


@dataclass
class ClassificationSet:
    """A labelled image set; ``folder_classes`` are the sub-folder names (image-folder layout only)."""

    images: ImageSet
    meta_dirs: List[Path]
    folder_classes: Optional[List[str]] = None
    layout: str = "folder"


def _list_images(d: Path) -> List[Path]:
    return sorted((p for p in d.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()),
                  key=lambda p: str(p))


def open_classification(path, split: str = "test") -> ClassificationSet:
    """An image folder (one sub-folder per class) or CLIP_benchmark WebDataset shards."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"dataset {path} is not a directory; pass an image folder (one sub-folder per class) "
                         f"or a CLIP_benchmark WebDataset directory.")
    shards = find_shards(path, split)
    if shards is not None:
        return ClassificationSet(ShardImages(shards[0], "cls"), shards[1], None, "webdataset")
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise InputError(f"{path} has neither class sub-folders nor .tar shards (also looked in {path / split}).")
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = _list_images(path / c)
        if not files:
            raise InputError(f"class folder {path / c} has no images ({'/'.join(IMG_EXTENSIONS)}); add its images, or "
                             f"remove the folder and its line in {'classnames.txt'}.")
        paths += files
        labels += [str(i)] * len(files)
    return ClassificationSet(FileImages(paths, labels, path), [path, path.parent], classes, "folder")


def _pick(keys: Sequence[str], candidates: Sequence[str], what: str, path: Path) -> str:
    for c in candidates:
        if c in keys:
            return c
    raise InputError(f"{path} has no {what} column/key (looked for {', '.join(candidates)}; found "
                     f"{', '.join(map(str, keys)) or 'none'}).")


def _group(rows: List[Tuple[str, List[str]]], base: Path) -> Tuple[List[Path], List[str]]:
    order: Dict[str, List[str]] = {}
    for image, caps in rows:
        order.setdefault(image, []).extend(c.replace("\n", " ").strip() for c in caps)
    paths, anns = [], []
    for image, caps in order.items():
        caps = [c for c in caps if c]
        if not caps:
            continue
        p = Path(image)
        paths.append(p if p.is_absolute() else base / p)
        anns.append("\n".join(caps))
    return paths, anns


def open_retrieval(path, split: str = "test") -> ImageSet:
    """A caption set: CSV/TSV, JSONL, or CLIP_benchmark retrieval shards (``txt``: one caption per line)."""
    path = Path(path)
    if path.is_dir():
        shards = find_shards(path, split)
        if shards is None:
            raise InputError(f"{path} holds no .tar shards (also looked in {path / split}); pass a CSV/TSV/JSONL "
                             f"caption file or a WebDataset directory.")
        return ShardImages(shards[0], "txt")
    if not path.is_file():
        raise InputError(f"caption set {path} does not exist.")
    rows: List[Tuple[str, List[str]]] = []
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with reading_text(path, "caption set"), open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            keys = reader.fieldnames or []
            ik, ck = _pick(keys, IMAGE_KEYS, "image", path), _pick(keys, CAPTION_KEYS, "caption", path)
            for row in reader:
                rows.append((row[ik], [row[ck] or ""]))
    elif suffix in (".jsonl", ".json"):
        with reading_text(path, "caption set"), open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path} line {n} is not JSON ({e}); write one object per line.")
                ik = _pick(list(obj), IMAGE_KEYS, "image", path)
                if "captions" in obj:
                    caps = obj["captions"]
                    if not isinstance(caps, list):
                        raise InputError(f"{path} line {n}: 'captions' must be a list of strings.")
                else:
                    caps = [obj[_pick(list(obj), CAPTION_KEYS, "caption", path)]]
                rows.append((obj[ik], [str(c) for c in caps]))
    else:
        raise InputError(f"caption set {path}: unknown format {suffix!r}; use .csv, .tsv, .jsonl or a "
                         f"WebDataset directory.")
    paths, anns = _group(rows, path.parent)
    if not paths:
        raise InputError(f"caption set {path} has no image with a non-empty caption.")
    return FileImages(paths, anns, path)
