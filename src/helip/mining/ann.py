"""Approximate search: FAISS k-means cells as candidate pools, exact HPM re-scoring inside them.

A target's hard pairs are close to it in *both* modalities, so they are close in
the joint representation [text, image] / sqrt(2), whose inner product is the
mean of the two cosines. FAISS clusters that representation into ``nlist``
cells (spherical k-means on a sample) and assigns every pair to its nearest
cell. The targets of one cell are then scored, exactly and with the same rules
as exact mode, against every member of the ``nprobe`` cells nearest to it: one
dense matrix product per cell instead of one per target, which is what makes
this fast on a CPU. Recall against exact mode is estimated on a random sample
of targets for every run (``recall_estimate`` in meta.json).

For methods "text" and "image" the joint representation is replaced by that
modality alone.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

from .score import candidate_scores, select_topk


def default_nlist(n: int) -> int:
    """About 2 sqrt(N) cells, but at least 39 pairs per cell (what FAISS's k-means asks for)."""
    return int(max(1, min(n // 39, round(2 * np.sqrt(n)))))


def joint(txt: torch.Tensor, img: torch.Tensor, method: str) -> np.ndarray:
    if method == "text":
        return np.ascontiguousarray(txt.cpu().numpy())
    if method == "image":
        return np.ascontiguousarray(img.cpu().numpy())
    # filled in place: one [N, dt + di] float32 array, no temporaries of that size
    out = np.empty((len(txt), txt.shape[1] + img.shape[1]), dtype=np.float32)
    out[:, :txt.shape[1]] = txt.cpu().numpy()
    out[:, txt.shape[1]:] = img.cpu().numpy()
    out *= np.float32(1 / np.sqrt(2.0))
    return out


def build_cells(x: np.ndarray, nlist: int, nprobe: int, seed: int, train_points: int = 64) -> Dict[str, np.ndarray]:
    """k-means cells of ``x`` and, per cell, its ``nprobe`` nearest cells (itself first)."""
    import faiss

    n, d = x.shape
    rng = np.random.default_rng([seed, 42])
    sample = x[np.sort(rng.choice(n, size=min(n, nlist * train_points), replace=False))]
    km = faiss.Kmeans(d, nlist, niter=10, seed=int(seed) % (2 ** 31), spherical=True, verbose=False,
                      max_points_per_centroid=train_points)
    km.train(sample)
    index = faiss.IndexFlatIP(d)
    index.add(km.centroids)
    _, assign = index.search(x, 1)
    _, probes = index.search(km.centroids, min(nprobe, nlist))
    return {"assign": assign[:, 0].astype(np.int64), "probes": probes.astype(np.int64)}


def group(labels: np.ndarray, n_groups: int) -> List[np.ndarray]:
    """Positions of each label 0..n_groups-1 in ``labels``, ascending within a group."""
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(n_groups + 1))
    return [order[starts[g]:starts[g + 1]] for g in range(n_groups)]


def search_ann(txt: torch.Tensor, img: torch.Tensor, rows: np.ndarray, k: int, method: str,
               dup_threshold: float, min_similarity: float, block_size: int, cells: Dict,
               on_block: Callable[[int], None] = lambda n: None) -> Tuple[np.ndarray, np.ndarray]:
    """Hard pairs of targets ``rows``, each scored against the members of its cell's probe cells.

    ``cells`` holds ``assign`` (cell of each pair), ``probes`` [nlist, nprobe] and ``members`` (the
    pairs of each cell, from ``group``).
    """
    probes, members = cells["probes"], cells["members"]
    out_i = np.empty((len(rows), k), dtype=np.int32)
    out_s = np.empty((len(rows), k), dtype=np.float32)
    for c, pos in enumerate(group(cells["assign"][rows], len(probes))):
        if len(pos) == 0:
            continue
        cand = torch.as_tensor(np.sort(np.concatenate([members[p] for p in probes[c] if p >= 0])),
                               device=txt.device)
        tc, ic = txt[cand], img[cand]
        for s in range(0, len(pos), block_size):
            p = pos[s:s + block_size]
            q = torch.as_tensor(rows[p], device=txt.device)
            sc = candidate_scores(txt[q], img[q], q, tc, ic, cand, method, dup_threshold, min_similarity)
            out_i[p], out_s[p] = select_topk(sc, cand, k)
            on_block(len(p))
    return out_i, out_s


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact hard pairs (over all rows, -1 padding ignored) that ``approx`` also found."""
    hits, total = 0, 0
    for a, e in zip(approx, exact):
        e = set(e[e >= 0].tolist())
        if e:
            hits += len(e & set(a[a >= 0].tolist()))
            total += len(e)
    return hits / total if total else 1.0
