"""Shared plumbing of the resumable, torchrun-sharded stages (``helip embed``, ``helip mine``).

Both write finished chunks to ``OUT/.partial/`` stamped with a key that names
everything the result depends on; a rerun with the same key reuses the chunks,
one with another key starts afresh (logging one line that says so). An earlier
complete result in ``OUT`` stays as it is (usable, ``meta.json`` included)
until the new one has been computed: only the final writes replace it, so a
rerun that fails leaves it intact.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Tuple

import torch

from .errors import InputError
from .io import remove_leftover_tmp, save_json

log = logging.getLogger(__name__)


def rank_and_world() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def partial_dir(out_dir: Path, key: str, rank: int, made_with: str) -> Path:
    """``out_dir/.partial`` for results identified by ``key`` (rank 0 prepares it; every rank waits)."""
    partial = out_dir / ".partial"
    stamp = partial / "key.json"
    if rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            remove_leftover_tmp(out_dir)  # temporary files of writes a killed run left behind
            if partial.exists() and not _stamp_is(stamp, key):
                log.warning("discarding partial results in %s made with %s", partial, made_with)
                shutil.rmtree(partial)
            remove_leftover_tmp(partial)
            partial.mkdir(exist_ok=True)
            save_json(stamp, {"key": key})
        except OSError as e:
            raise InputError(f"cannot write to {out_dir} ({e.strerror}); choose an --out directory you can write to.")
    barrier()
    return partial


def _stamp_is(stamp: Path, key: str) -> bool:
    try:
        return json.loads(stamp.read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False
