"""Atomic file output and dataset fingerprints.

Outputs are written to a temporary file in the destination directory and then
renamed, so a killed run never leaves a file that looks complete but is not.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np

from .errors import InputError, StaleError

PathLike = Union[str, os.PathLike]
TMP_SUFFIX = ".tmp"  # _atomic's temporary files: ``.NAME.XXXXXXXX.tmp`` beside NAME
_TMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic(path: PathLike, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; an output gets the mode open() would give it
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


@contextmanager
def reading_text(path: PathLike, what: str):
    """Reading a text table (CSV/TSV/JSONL): undecodable bytes and csv's errors become one InputError line."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} cannot be "
                         f"decoded); save it as UTF-8.") from None
    except csv.Error as e:
        raise InputError(f"{what} {path} cannot be read as a table ({e}); a wrong separator or an unclosed quote "
                         f"makes one huge field: check --csv-separator and the quoting.") from None


def load_npy(path: PathLike, fix: str) -> np.ndarray:
    """``np.load(path, mmap_mode="r")``; a truncated or foreign file is one InputError line ending in ``fix``."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path} is not a complete .npy array ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"{fix}") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{path} holds no single .npy array; {fix}")
    return arr


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


def remove_leftover_tmp(directory: PathLike) -> int:
    """Delete the temporary files a killed atomic write left in ``directory`` (``.NAME.XXXXXXXX.tmp``).

    Call it only where one process writes (rank 0), before that process writes
    there again. Returns how many were removed.
    """
    d = Path(directory)
    removed = 0
    if d.is_dir():
        for p in d.iterdir():
            if _TMP_RE.match(p.name) and p.is_file():
                try:
                    p.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def array_digest(*arrays: np.ndarray, block_rows: int = 65536) -> str:
    """A content digest of arrays (shape, dtype and every byte), read in row blocks so a memory map
    is never loaded whole: resume keys use it to tell work on changed inputs from work to reuse."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(f"{a.shape}|{a.dtype.str}|".encode())
        a = a.reshape(1) if a.ndim == 0 else a
        for s in range(0, max(len(a), 1), block_rows):
            h.update(np.ascontiguousarray(a[s:s + block_rows]).tobytes())
    return h.hexdigest()


def dataset_fingerprint(data: Any) -> Optional[dict]:
    """``data.fingerprint()`` (helip's datasets have one: the caption fingerprint), else None."""
    fp = getattr(data, "fingerprint", None)
    return fp() if callable(fp) else None


def torch_load(path: PathLike, what: str, fix: str, **kwargs) -> Any:
    """``torch.load(path, weights_only=True)``; a file that cannot be read is one InputError line.

    torch's own message is left out on purpose: for a file that is not a plain
    checkpoint it advises ``weights_only=False``, which would run arbitrary
    code from the file.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError, KeyError, AttributeError,
            IndexError, TypeError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path} is not a readable PyTorch checkpoint (truncated, or not a checkpoint: "
                         f"{type(e).__name__}); {fix}") from None
