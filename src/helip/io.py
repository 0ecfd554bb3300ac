"""Atomic file output and dataset fingerprints.

Outputs are written to a temporary file in the destination directory and then
renamed, so a killed run never leaves a file that looks complete but is not.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Union

import numpy as np

from .errors import InputError, StaleError

PathLike = Union[str, os.PathLike]


def _atomic(path: PathLike, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_npy(path: PathLike, array: np.ndarray) -> Path:
    """np.save, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)
    return _atomic(path, write)


def save_json(path: PathLike, obj: Any) -> Path:
    """JSON with indentation, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
    return _atomic(path, write)


def save_text(path: PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    return _atomic(path, write)


def save_torch(path: PathLike, obj: Any) -> Path:
    """torch.save, atomically."""
    import torch

    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def save_with(path: PathLike, write: Callable[[str], None]) -> Path:
    """Run ``write(tmp_path)`` and rename the result onto ``path``."""
    return _atomic(path, write)


def load_json(path: PathLike, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what}: {path} does not exist; create it first (see `helip --help`).")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{what}: {path} is not valid JSON ({e}); delete it and rerun the stage that writes it.")


def fingerprint(captions: Iterable[str]) -> dict:
    """Identity of a dataset: pair count and a hash of all captions in order.

    Cheap to compute (no images are read) and changes whenever pairs are added,
    removed or reordered, which is what makes row i of an embeddings or
    hard-pairs file refer to the wrong pair.
    """
    h = hashlib.sha256()
    n = 0
    for c in captions:
        h.update(c.encode("utf-8"))
        h.update(b"\0")
        n += 1
    return {"count": n, "captions_sha256": h.hexdigest()}


def check_fingerprint(found: dict, expected: dict, what: str, fix: str) -> None:
    if found != expected:
        raise StaleError(
            f"{what} was made from another dataset (it has {found.get('count')} pairs, "
            f"hash {str(found.get('captions_sha256'))[:12]}; this dataset has {expected['count']} pairs, "
            f"hash {expected['captions_sha256'][:12]}). {fix}"
        )
