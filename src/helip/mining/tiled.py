"""Exact search on the CPU: the score matrix in cache-sized tiles, a running top-k per target.

Same result as the block search of ``exact.search_exact`` (every target against
every pair, the rules of ``score.score_with_rules``, ties broken by index), with
much less work. Measured on the 50k benchmark data (d=256, one core of this
project's 2-core AMD EPYC), the block search spent about half its time in the two
similarity products and half in ~10 elementwise passes over each [block, N]
score matrix, which lives in main memory. Here:

- **Thresholds.** A target's running k-th best score is a lower bound of its
  final k-th best; a candidate scoring below it can never enter the top-k. Per
  tile only the row (column) maxima are compared with the bounds, and only the
  few candidates at or above them get the exclusion rules and the merge (~13 per
  target over the whole 50k run).
- **Seeded bounds.** Before the scan, each target's k-th best among the members
  of its own k-means cell (``ann.build_cells``, ~300 pairs per cell) gives a floor, minus a
  margin for float rounding, so the bounds are tight from the first tile.
- **Symmetry.** score(i, j) = score(j, i): when every pair is a target (a whole
  single-process run, ``SymmetricSearch``), each tile of the upper triangle is
  computed once and offered to the targets of its rows and of its columns, which
  halves the matrix-product work.
- **BLAS.** The tile products go through numpy's BLAS (OpenBLAS), which ran them
  at ~69 GFLOPS on this CPU where torch's MKL gave ~43-50; a fixed choice, so a
  resumed run rounds exactly as the run it continues.

Ties: a candidate equal to the bound is kept (>=) and merges order by score,
then index, as ``select_topk`` does, so the top-k is the exact one, not an
approximation.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, List, Optional, Tuple

import numpy as np
import torch

from .score import candidate_scores, order_by_score_then_index, score_with_rules, select_topk
from .workers import _run_parallel, blas_threads, tile_workers  # noqa: F401 (blas_threads: mine.py's import)

NEG = float("-inf")
_NO_INDEX = np.iinfo(np.int64).max   # sorts after every real index among -inf scores
TILE_ROWS, TILE_COLS = 1024, 2048    # 8 MB of float32 per tile matrix: three of them stay in L3 cache
SEED_CELL_SIZE = 300                 # pairs per k-means cell for the seeded bounds


class RunningTopK:
    """Each target's best k (score descending, index ascending) among the candidates offered so far."""

    def __init__(self, n: int, k: int, floor: Optional[torch.Tensor] = None):
        self.k = k
        self.scores = torch.full((n, k), NEG)
        self.index = torch.full((n, k), _NO_INDEX, dtype=torch.long)
        self.floor = floor if floor is not None else torch.full((n,), NEG)   # a known lower bound of the k-th
        # merges are read-modify-write of whole rows: one at a time. ``bound`` reads without it: a bound read
        # while another worker merges is the k-th before or after that merge, a valid lower bound either way
        self._lock = threading.Lock()

    def bound(self, rows: slice) -> torch.Tensor:
        """Scores below this can never enter the top-k of ``rows``: the running k-th best, or the floor."""
        return torch.maximum(self.scores[rows, self.k - 1], self.floor[rows])

    def merge(self, rows: torch.Tensor, cand_s: torch.Tensor, cand_i: torch.Tensor) -> None:
        """Merge candidates [r, m] (scores, global indices; -inf for none) into targets ``rows``."""
        with self._lock:
            s = torch.cat([self.scores[rows], cand_s], 1)
            i = torch.cat([self.index[rows], cand_i], 1)
            i.masked_fill_(torch.isinf(s), _NO_INDEX)
            s, i = order_by_score_then_index(s, i)
            self.scores[rows], self.index[rows] = s[:, :self.k], i[:, :self.k]

    def result(self, rows: slice = slice(None)) -> Tuple[np.ndarray, np.ndarray]:
        """int32 indices (-1 padded) and float32 scores (-inf padded), as ``select_topk`` returns them."""
        s = self.scores[rows]
        i = self.index[rows].masked_fill(torch.isinf(s), -1)
        return i.to(torch.int32).numpy(), s.numpy().copy()


class _Tiles:
    """The similarity and score tiles of one (target block, candidate block) pair, in reused buffers."""

    def __init__(self, txt: torch.Tensor, img: torch.Tensor, method: str):
        self.txt, self.img, self.method = txt.numpy(), img.numpy(), method
        size = TILE_ROWS * TILE_COLS
        self._buf = [np.empty(size, dtype=np.float32) for _ in range(3)]

    def compute(self, tq: np.ndarray, iq: np.ndarray, c: slice) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(score, caption cosine, image cosine) of targets (rows ``tq``/``iq``) against candidates ``c``."""
        nq, nc = len(tq), c.stop - c.start
        ct, ci, sc = (b[:nq * nc].reshape(nq, nc) for b in self._buf)
        np.matmul(tq, self.txt[c].T, out=ct)
        np.matmul(iq, self.img[c].T, out=ci)
        if self.method == "hpm":
            np.multiply(ct, ci, out=sc)
        else:   # the score is one cosine; a copy, so that excluding the target itself leaves the cosines alone
            np.copyto(sc, ct if self.method == "text" else ci)
        return sc, ct, ci


def _exclude_self(score: np.ndarray, q: np.ndarray, c: slice) -> None:
    """Score -inf for each target (global index ``q[r]``, row r) that is among the candidates ``c``."""
    inside = np.flatnonzero((q >= c.start) & (q < c.stop))
    score[inside, q[inside] - c.start] = NEG


def _offer(top: RunningTopK, t0: int, score: np.ndarray, ct: np.ndarray, ci: np.ndarray, c0: int,
           targets_are_rows: bool, rules: tuple, skip: int = 0) -> None:
    """Offer a tile's candidates to its targets: rows t0.. against columns c0.. (or the transpose).

    Only entries at or above a target's bound can enter its top-k: one comparison
    pass and the positions of the few survivors (numpy: ~3x faster than torch for
    these two passes here), then the rules and the merge on those alone. The
    first ``skip`` targets are left out (offered these candidates elsewhere).
    """
    nt = score.shape[0] if targets_are_rows else score.shape[1]
    bound = top.bound(slice(t0, t0 + nt)).numpy().copy()
    bound[:skip] = np.inf
    fresh = np.isneginf(bound)
    if fresh.any():   # no bound yet (no floor, nothing seen): a dense top-k for these targets
        f = np.flatnonzero(fresh)
        take = (lambda a: a[f]) if targets_are_rows else (lambda a: np.ascontiguousarray(a[:, f].T))
        _dense(top, torch.from_numpy(f + t0), take(score), take(ct), take(ci), c0, rules)
        bound = np.where(fresh, np.inf, bound)
    flat = np.flatnonzero(score >= (bound[:, None] if targets_are_rows else bound[None, :]))
    if len(flat) == 0:
        return
    r, c = np.divmod(flat, score.shape[1])
    target, cand = (r, c) if targets_are_rows else (c, r)
    s = score_with_rules(torch.from_numpy(ct.ravel()[flat]), torch.from_numpy(ci.ravel()[flat]), *rules)
    s.masked_fill_(torch.from_numpy(np.isneginf(score.ravel()[flat])), NEG)
    if not targets_are_rows:   # group by target (row-major positions are sorted by row, not by column)
        order = np.argsort(target, kind="stable")
        target, cand, s = target[order], cand[order], s[torch.from_numpy(order)]
    hit, first, counts = np.unique(target, return_index=True, return_counts=True)
    pos = np.arange(len(target)) - np.repeat(first, counts)
    row = np.repeat(np.arange(len(hit)), counts)
    cand_s = torch.full((len(hit), int(counts.max())), NEG)
    cand_i = torch.full(cand_s.shape, _NO_INDEX, dtype=torch.long)
    cand_s[row, pos] = s
    cand_i[row, pos] = torch.from_numpy(cand + c0)
    top.merge(torch.from_numpy(hit + t0), cand_s, cand_i)


def _dense(top: RunningTopK, targets: torch.Tensor, score: np.ndarray, ct: np.ndarray, ci: np.ndarray,
           c0: int, rules: tuple) -> None:
    full = score_with_rules(torch.from_numpy(ct), torch.from_numpy(ci), *rules)
    full.masked_fill_(torch.from_numpy(np.isneginf(score)), NEG)
    idx, sc = select_topk(full, torch.arange(c0, c0 + score.shape[1]), top.k)
    top.merge(targets, torch.from_numpy(sc), torch.from_numpy(idx).long())


def seed_floor(txt: torch.Tensor, img: torch.Tensor, k: int, method: str, dup_threshold: float,
               min_similarity: float, seed: int) -> torch.Tensor:
    """A lower bound of every target's final k-th best score: its k-th best within its own k-means cell,
    minus a margin for float rounding (the cell's scores come from another matrix product than the tiles').

    -inf where a cell has fewer than k valid candidates for the target.
    """
    from .ann import build_cells, group

    n, dim = txt.shape
    nlist = max(1, n // SEED_CELL_SIZE)
    floor = torch.full((n,), NEG)
    if nlist < 2:
        return floor
    cells = build_cells(txt, img, method, nlist, 1, seed)
    # |float32 cosine - exact| <= ~dim * 2^-24 per product; a product of two cosines, and both sides
    margin = 8 * dim * 2.0 ** -24
    groups = [m for m in group(cells["probes"][:, 0], nlist) if len(m) > k]

    def work(w: int, workers: int) -> None:
        for members in groups[w::workers]:
            m = torch.from_numpy(members).long()
            sc = candidate_scores(txt[m], img[m], m, txt[m], img[m], m, method, dup_threshold, min_similarity)
            floor[m] = torch.topk(sc, k, dim=1).values[:, -1] - margin   # cells are disjoint: no lock

    with tile_workers() as workers:
        _run_parallel(lambda w: work(w, workers), workers)
    return floor


def search_rows(txt: torch.Tensor, img: torch.Tensor, rows: np.ndarray, k: int, method: str,
                dup_threshold: float, min_similarity: float,
                on_block: Callable[[int], None] = lambda n: None) -> Tuple[np.ndarray, np.ndarray]:
    """Exact hard pairs of any set of targets ``rows``: tiles of targets against all pairs (no symmetry)."""
    n = len(txt)
    rules = (method, dup_threshold, min_similarity)
    out_i = np.empty((len(rows), k), dtype=np.int32)
    out_s = np.empty((len(rows), k), dtype=np.float32)
    local = threading.local()   # each worker thread its own tile buffers

    def block(s: int) -> int:   # one block of targets against all pairs: nothing shared between blocks
        with torch.no_grad():
            if not hasattr(local, "tiles"):
                local.tiles = _Tiles(txt, img, method)
            tiles = local.tiles
            q = np.asarray(rows[s:s + size], dtype=np.int64)
            tq, iq = tiles.txt[q], tiles.img[q]
            top = RunningTopK(len(q), k)
            for c0 in range(0, n, TILE_COLS):
                c = slice(c0, min(c0 + TILE_COLS, n))
                sc, ct, ci = tiles.compute(tq, iq, c)
                _exclude_self(sc, q, c)
                _offer(top, 0, sc, ct, ci, c0, True, rules)
            out_i[s:s + len(q)], out_s[s:s + len(q)] = top.result()
            return len(q)

    with tile_workers() as workers:
        # blocks of at most TILE_ROWS, as many as a multiple of the workers: the tuner's and the recall check's
        # samples (a few hundred targets) are split among all workers instead of one block on one
        blocks = workers * max(1, -(-len(rows) // (workers * TILE_ROWS)))
        size = max(1, -(-len(rows) // blocks))
        starts = range(0, len(rows), size)
        if workers == 1 or len(starts) == 1:
            for s in starts:
                on_block(block(s))
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for done in pool.map(block, starts):   # in order, as they finish
                    on_block(done)
    return out_i, out_s


class SymmetricSearch:
    """Exact hard pairs of all N pairs, each tile of the upper-triangular score matrix computed once.

    Targets are processed in blocks in index order; after ``advance(stop)`` the
    rows below ``stop`` are final (they have met every candidate: the earlier
    ones as columns of earlier blocks, the rest in their own block's tiles),
    while later rows hold partial top-k lists. ``state``/``restore`` save and
    reload that position and the partial lists, so a killed run resumes.
    """

    def __init__(self, txt: torch.Tensor, img: torch.Tensor, k: int, method: str, dup_threshold: float,
                 min_similarity: float, seed: int = 0, floor: Optional[torch.Tensor] = None):
        self.n, self.k = len(txt), k
        self.rules = (method, dup_threshold, min_similarity)
        self._tiles: List[_Tiles] = []   # tile buffers, one set per worker
        self.top = RunningTopK(self.n, k, floor)
        self._seed_args = (txt, img, k, method, dup_threshold, min_similarity, seed)
        self._seeded = floor is not None   # the floor is computed on first use: a restored run brings its own
        self.done = 0   # rows below this are final

    def advance(self, stop: int, on_block: Callable[[int], None] = lambda n: None) -> None:
        """Process target blocks until every row below ``stop`` is final.

        The column tiles of a block are dealt out to the workers (``tile_workers``) in turn. Their column
        offers go to disjoint targets; their row offers go to the block's targets, merged under the lock.
        """
        with torch.no_grad(), blas_threads():
            self._seed()
        with tile_workers() as workers:
            while len(self._tiles) < workers:
                self._tiles.append(_Tiles(*self._seed_args[:2], self.rules[0]))
            while self.done < stop:
                q = slice(self.done, min(self.done + TILE_ROWS, stop))
                starts = list(range(q.start, self.n, TILE_COLS))
                _run_parallel(lambda w: self._scan(q, starts[w::workers], self._tiles[w]), workers)
                self.done = q.stop
                on_block(q.stop - q.start)

    def _scan(self, q: slice, starts: Iterable[int], tiles: "_Tiles") -> None:
        for c0 in starts:
            c = slice(c0, min(c0 + TILE_COLS, self.n))
            sc, ct, ci = tiles.compute(tiles.txt[q], tiles.img[q], c)
            _exclude_self(sc, np.arange(q.start, q.stop), c)
            _offer(self.top, q.start, sc, ct, ci, c0, True, self.rules)
            if c.stop > q.stop:   # the columns beyond the block are offered the block's rows
                _offer(self.top, c0, sc, ct, ci, q.start, False, self.rules, skip=max(0, q.stop - c0))

    def _seed(self) -> None:
        if not self._seeded:
            self.top.floor = seed_floor(*self._seed_args)
            self._seeded = True

    def result(self, rows: slice) -> Tuple[np.ndarray, np.ndarray]:
        assert rows.stop <= self.done, "rows not final yet"
        return self.top.result(rows)

    def state(self) -> dict:
        """What a resumed run needs: the position, the floors and the partial lists of the later rows."""
        rest = slice(self.done, None)
        self._seed()
        return {"done": np.asarray([self.done]), "floor": self.top.floor.numpy(),
                "scores": self.top.scores[rest].numpy(), "index": self.top.index[rest].numpy()}

    def restore(self, state: dict) -> None:
        self.done = int(state["done"][0])
        self.top.floor = torch.from_numpy(np.array(state["floor"]))
        self._seeded = True
        self.top.scores[self.done:] = torch.from_numpy(np.array(state["scores"]))
        self.top.index[self.done:] = torch.from_numpy(np.array(state["index"]))
