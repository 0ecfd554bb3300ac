"""Approximate search: k-means cells as candidate pools, exact HPM re-scoring inside them.

A target's hard pairs are close to it in *both* modalities, so they are close in
the joint representation [text, image] / sqrt(2), whose inner product is the
mean of the two cosines (and score >= s needs a joint cosine >= sqrt(s)).
FAISS's spherical k-means on a sample clusters that representation into ``nlist``
cells; then, for every pair, the ``nprobe`` cells whose centroids are nearest
to *it* are found. Each target is scored, exactly and with the same rules as
exact mode, against every member of its own ``nprobe`` cells. The work is
organised per candidate cell: all targets that probe a cell are scored against
its members in one dense matrix product (what makes this fast on a CPU), and
each target's running top-k is merged with the cell's best.

Probing by the target's own vector rather than by its cell's centroid matters:
in 512 dimensions a cell's members are spread out, and at N = 1M (2000 cells)
the 16 cells nearest a target's *cell* held 96.8% of its exact hard pairs,
the 8 nearest the target itself 98.1% (300 sampled targets, benchmark data).
Recall against exact mode is estimated on a random sample of targets for every
run (``recall_estimate`` in meta.json).

For methods "text" and "image" the joint representation is replaced by that
modality alone.
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .score import candidate_scores, order_by_score_then_index, select_topk
from .workers import _run_parallel, tile_workers


def default_nlist(n: int) -> int:
    """About 2 sqrt(N) cells, but at least 39 pairs per cell (what FAISS's k-means asks for)."""
    return int(max(1, min(n // 39, round(2 * np.sqrt(n)))))


def joint(txt: torch.Tensor, img: torch.Tensor, method: str, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
    """The representation cells are built on, for ``rows``: [text, image] / sqrt(2), or one modality."""
    if method == "text":
        return np.ascontiguousarray(txt[rows].cpu().numpy())
    if method == "image":
        return np.ascontiguousarray(img[rows].cpu().numpy())
    t, i = txt[rows].cpu().numpy(), img[rows].cpu().numpy()
    out = np.empty((len(t), t.shape[1] + i.shape[1]), dtype=np.float32)
    out[:, :t.shape[1]] = t
    out[:, t.shape[1]:] = i
    out *= np.float32(1 / np.sqrt(2.0))
    return out


def build_cells(txt: torch.Tensor, img: torch.Tensor, method: str, nlist: int, nprobe: int, seed: int,
                train_points: int = 39, chunk: int = 65536, niter: int = 10) -> Dict[str, np.ndarray]:
    """k-means cells of the joint representation; per pair its ``nprobe`` nearest cells (nearest first).

    FAISS's spherical k-means (``niter`` iterations) on a random sample of ``train_points`` pairs per
    cell, then every pair's nearest cells by inner product with the centroids. The representation is
    built a chunk of rows at a time, never for all N at once: at N = 1M it would be 2 GB.

    39 points per cell is the least FAISS's k-means accepts without a warning; at N = 200,000 on
    2 cores it trains in about 5 s, against about 10 s at 64. The recall the cells give is measured
    and the number of probed cells chosen for it, so coarser training only moves ``nprobe``. The
    assignment of all N pairs is one matrix product per chunk and ``torch.topk``: FAISS's flat
    search took 2-4x longer for it (its heap-based top-k over smaller BLAS blocks).
    """
    import faiss

    n = len(txt)
    rng = np.random.default_rng([seed, 42])
    sample = joint(txt, img, method, np.sort(rng.choice(n, size=min(n, nlist * train_points), replace=False)))
    faiss.omp_set_num_threads(torch.get_num_threads())
    km = faiss.Kmeans(sample.shape[1], min(nlist, len(sample)), niter=niter, seed=int(seed) % (2 ** 31),
                      spherical=True, verbose=False, max_points_per_centroid=train_points,
                      min_points_per_centroid=1)
    km.train(sample)
    del sample
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    p = min(nprobe, len(centroids))
    probes = np.empty((n, p), dtype=np.int32)
    for s in range(0, n, chunk):
        probes[s:s + chunk] = nearest_cells(joint(txt, img, method, slice(s, s + chunk)), centroids, p)
    return {"probes": probes, "nlist": np.asarray([len(centroids)], dtype=np.int64)}


def nearest_cells(x: np.ndarray, centroids: np.ndarray, p: int) -> np.ndarray:
    """The ``p`` centroids of largest inner product with each row of ``x``, nearest first (int32)."""
    sims = torch.from_numpy(x @ centroids.T)
    return torch.topk(sims, p, dim=1, sorted=True).indices.to(torch.int32).numpy()


def group(labels: np.ndarray, n_groups: int) -> List[np.ndarray]:
    """Positions of each label 0..n_groups-1 in ``labels``, ascending within a group."""
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(n_groups + 1))
    return [order[starts[g]:starts[g + 1]] for g in range(n_groups)]


def search_ann(txt: torch.Tensor, img: torch.Tensor, rows: np.ndarray, k: int, method: str,
               dup_threshold: float, min_similarity: float, block_size: int, cells: Dict,
               on_block: Callable[[int], None] = lambda n: None,
               only_cells: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Hard pairs of targets ``rows``, each scored against the members of its own probe cells.

    ``cells`` holds ``probes`` [N, nprobe] (each pair's cells, nearest first; the first is
    the cell it belongs to) and ``members`` (the pairs of each cell, from ``group``).
    ``only_cells``: search only these candidate cells (the tuner's timing probe).

    On the CPU the candidate cells are dealt out to worker threads (``workers.tile_workers``:
    as many as torch's thread count, each with single-threaded kernels), as the tiled
    exact search deals out its tiles: the work per cell is a few small products and
    selections, which 2-thread BLAS and OpenMP on one Python thread ran many times slower
    (their idle threads spin against each other). A target's running top-k is merged
    under a lock; the candidate sets of two cells are disjoint and the merged order is
    a total order (score, then index), so the result does not depend on which worker
    merges first.
    """
    members = cells["members"]
    probes = cells["probes"][rows]
    nprobe = probes.shape[1]
    best_s = torch.full((len(rows), k), float("-inf"))
    best_i = torch.full((len(rows), k), -1, dtype=torch.int64)
    target_of = np.repeat(np.arange(len(rows)), nprobe)   # position in rows of each (target, cell) entry
    entries_of = group(probes.ravel(), len(members))
    todo = range(len(members)) if only_cells is None else sorted(set(int(c) for c in only_cells))
    todo = [c for c in todo if len(entries_of[c]) and len(members[c])]
    lock = threading.Lock()

    def cell(c: int) -> None:
        cand = torch.as_tensor(members[c], device=txt.device)
        tc, ic = txt[cand], img[cand]
        pos = target_of[entries_of[c]]
        for s in range(0, len(pos), block_size):
            p = pos[s:s + block_size]
            q = torch.as_tensor(rows[p], device=txt.device)
            sc = candidate_scores(txt[q], img[q], q, tc, ic, cand, method, dup_threshold, min_similarity)
            idx, val = select_topk(sc, cand, k)
            with lock:
                _merge(best_s, best_i, torch.as_tensor(p), torch.from_numpy(val), torch.from_numpy(idx).long())

    progress = {"done": 0, "reported": 0}

    def report(c: int) -> None:   # progress in targets, from the entries of the cells finished
        with lock:
            progress["done"] += len(entries_of[c])
            new = progress["done"] // nprobe - progress["reported"]
            progress["reported"] += new
        if new:
            on_block(new)

    if txt.is_cuda:
        with torch.no_grad():
            for c in todo:
                cell(c)
                report(c)
    else:
        queue = iter(todo)   # dealt out one cell at a time: cell sizes vary (by thousands on skewed data)

        def work(w: int) -> None:
            while True:
                with lock:
                    c = next(queue, None)
                if c is None:
                    return
                cell(c)
                report(c)

        with tile_workers() as workers:
            _run_parallel(work, workers)
    best_i[torch.isinf(best_s)] = -1
    return best_i.to(torch.int32).numpy(), best_s.numpy()


def _merge(best_s: torch.Tensor, best_i: torch.Tensor, pos: torch.Tensor, s: torch.Tensor, i: torch.Tensor) -> None:
    """Fold candidates (scores ``s``, indices ``i``, [len(pos), k]) into the running top-k of targets ``pos``.

    Order: score descending, then index ascending, as in ``select_topk``; the
    candidate sets of two cells are disjoint, so no index is counted twice.
    """
    k = best_s.shape[1]
    ss, ii = order_by_score_then_index(torch.cat([best_s[pos], s], 1), torch.cat([best_i[pos], i], 1))
    best_s[pos], best_i[pos] = ss[:, :k], ii[:, :k]


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact hard pairs (over all rows, -1 padding ignored) that ``approx`` also found."""
    hits, total = 0, 0
    for a, e in zip(approx, exact):
        e = set(e[e >= 0].tolist())
        if e:
            hits += len(e & set(a[a >= 0].tolist()))
            total += len(e)
    return hits / total if total else 1.0
