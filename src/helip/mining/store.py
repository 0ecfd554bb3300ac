"""Hard pairs on disk (the format of docs/design.md, "File formats") and the authors' CSV format.

Directory: ``hard_pairs.npy`` int32 [N, k] (best first, -1 padding),
``hard_scores.npy`` float32 [N, k] (-inf at padding), ``meta.json``. The meta
file is written last, so a directory without it is incomplete and refused.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError
from ..io import check_fingerprint, load_npy, load_json, save_json, save_npy, save_with


@dataclass
class HardPairs:
    indices: np.ndarray
    scores: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])


def save_hard_pairs(out_dir: Path, pairs: HardPairs) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        meta_path.unlink()  # the directory is incomplete until the new meta lands
    save_npy(out_dir / "hard_pairs.npy", pairs.indices.astype(np.int32))
    save_npy(out_dir / "hard_scores.npy", pairs.scores.astype(np.float32))
    save_json(meta_path, pairs.meta)
    return out_dir


def load_hard_pairs(path: Path, expected_fingerprint: Optional[dict] = None) -> HardPairs:
    """Read a hard-pairs directory; refuse it if it belongs to another dataset."""
    path = Path(path)
    meta = load_json(path / "meta.json", "hard-pairs directory")
    for name in ("hard_pairs.npy", "hard_scores.npy"):
        if not (path / name).is_file():
            raise InputError(f"{path / name} is missing; re-run `helip mine --out {path}`.")
    indices = load_npy(path / "hard_pairs.npy", f"re-run `helip mine --out {path}`.")
    scores = load_npy(path / "hard_scores.npy", f"re-run `helip mine --out {path}`.")
    if indices.shape != scores.shape or indices.ndim != 2:
        raise InputError(f"{path}: hard_pairs.npy {indices.shape} and hard_scores.npy {scores.shape} disagree; "
                         f"re-run `helip mine --out {path}`.")
    if expected_fingerprint is not None:
        if "fingerprint" not in meta:
            raise InputError(f"{path}/meta.json has no dataset fingerprint; re-run `helip mine`.")
        check_fingerprint(meta["fingerprint"], expected_fingerprint, f"hard-pairs directory {path}",
                          "Re-run `helip embed` and `helip mine` for this dataset.")
        if len(indices) != expected_fingerprint["count"]:
            raise InputError(f"{path} has {len(indices)} rows but the dataset has {expected_fingerprint['count']} pairs.")
    return HardPairs(indices=np.asarray(indices), scores=np.asarray(scores), meta=meta)


def write_csv(path: Path, pairs: HardPairs) -> Path:
    """The authors' format: one line per target, ``target,hard_1,...,hard_k`` (no -1 padding)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            for i, row in enumerate(pairs.indices):
                w.writerow([i, *[int(j) for j in row if j >= 0]])
    return save_with(path, write)


def read_csv(path: Path, n: Optional[int] = None) -> HardPairs:
    """Read the authors' CSV back; rows shorter than the longest are padded with -1.

    Scores are not in the format, so they come back as NaN.
    """
    rows = {}
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            try:
                vals = [int(v) for v in row]
            except ValueError:
                raise InputError(f"{path}:{line_no}: expected integers `target,hard_1,...`, got {row[:3]}...")
            rows[vals[0]] = vals[1:]
    n = n if n is not None else (max(rows) + 1 if rows else 0)
    k = max((len(v) for v in rows.values()), default=0)
    indices = np.full((n, k), -1, dtype=np.int32)
    for t, hard in rows.items():
        if not 0 <= t < n:
            raise InputError(f"{path}: target index {t} is outside a dataset of {n} pairs.")
        indices[t, :len(hard)] = hard
    return HardPairs(indices=indices, scores=np.full((n, k), np.nan, dtype=np.float32),
                     meta={"source": str(path), "format": "authors-csv", "k": k})
