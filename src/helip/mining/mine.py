"""`mine_hard_pairs` and `helip mine`: options, validation, chunked resumable runs, sharding.

Targets are processed in chunks of ``chunk_size``. With an output directory,
each finished chunk is written (atomically) to ``OUT/.partial/``; a killed run
started again with the same options skips the finished chunks and produces
the same final files. (Exact mode on the CPU in one process computes each tile
of the symmetric score matrix once, ``tiled.SymmetricSearch``: later chunks'
partial top-k lists are saved beside each finished chunk, and a resumed run
continues from the last saved position.) Under ``torchrun`` (an initialised torch.distributed
process group) rank r takes chunks r, r+W, r+2W, ...; rank 0 merges them into
one output once all ranks are done. Search modes differ only in the candidates
each target is scored against (see ``score.py``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, InputError
from ..io import array_digest, save_json, save_npy, save_with
from ..resumable import barrier, partial_dir, rank_and_world
from .ann import build_cells, default_nlist, group, recall_at_k, search_ann
from .exact import PRECISIONS, search_exact, search_exact_lowp
from .tiled import SymmetricSearch, blas_threads, search_rows
from .tune import AUTO_EXACT_BELOW, CONFIDENCE, NPROBE_GRID, tune, wilson_lower
from .score import METHODS
from .store import HardPairs, save_hard_pairs
from .subset import search_subset

log = logging.getLogger(__name__)

MODES = ("auto", "exact", "subset", "ann")


@dataclass
class MineConfig:
    """Options of ``mine_hard_pairs`` and ``helip mine``."""

    k: int = 50
    mode: str = "auto"             # auto | exact | subset | ann (auto: exact or recall-targeted ann, see tune.py)
    method: str = "hpm"            # hpm | text | image
    dup_threshold: float = 0.98
    min_similarity: float = 0.0
    block_size: int = 1024         # targets scored at once: memory O(block_size x candidates)
    device: str = "cpu"
    precision: str = "auto"        # exact: similarity matmuls in fp32 | fp16 | bf16 (auto: fp16 on GPU, fp32 on CPU)
    seed: int = 0
    candidates: int = 3_000_000    # subset: size of the random candidate pool
    redraw_every: int = 300_000    # subset: targets per pool
    nlist: int = 0                 # ann: k-means cells (0: about 2 sqrt(N))
    nprobe: int = 0                # ann: cells nearest each target, searched for it (0: the fewest that reach
                                   # target_recall; auto mode always chooses)
    target_recall: float = 0.98    # ann with nprobe 0, auto: recall@k whose lower confidence bound must be reached
    tune_sample: int = 500         # ann with nprobe 0, auto: targets whose exact top-k choose the operating point
    recall_sample: int = 200       # ann/subset: targets checked against exact search after the run
    chunk_size: int = 65536        # targets per resumable chunk
    progress: bool = True

    def validate(self, n: int) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}.")
        if self.precision not in ("auto",) + PRECISIONS:
            raise ConfigError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}.")
        if self.k > n - 1:
            raise ConfigError(f"k={self.k} is larger than the {n - 1} other pairs in a {n}-pair dataset; "
                              f"use --k {max(n - 1, 1)} or less.")
        if not -1.0 <= self.min_similarity < self.dup_threshold <= 1.0:
            raise ConfigError(f"need -1 <= min_similarity < dup_threshold <= 1, got "
                              f"{self.min_similarity} and {self.dup_threshold}.")
        for name in ("block_size", "candidates", "redraw_every", "chunk_size", "tune_sample"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.nprobe < 0:
            raise ConfigError(f"nprobe must be 0 (chosen for --target-recall) or positive, got {self.nprobe}.")
        if not 0.0 < self.target_recall < 1.0:
            raise ConfigError(f"target_recall must be between 0 and 1 (exclusive), got {self.target_recall}; "
                              f"for exact results use --mode exact.")
        if self.nlist < 0:
            raise ConfigError(f"nlist must be 0 (automatic) or positive, got {self.nlist}.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA device is visible; use --device cpu.")

    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        return "fp16" if self.device.startswith("cuda") else "fp32"

    def search_key(self, n: int) -> str:
        """Identity of the result (not of how fast it is computed): guards resumed partial chunks."""
        keep = {k: v for k, v in asdict(self).items()
                if k not in ("progress", "device", "block_size", "precision")}  # same result either way
        return hashlib.sha256(json.dumps({"n": n, **keep}, sort_keys=True).encode()).hexdigest()[:16]


def _normalised(x: np.ndarray, what: str, device: str) -> torch.Tensor:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise InputError(f"{what} embeddings must be a 2-D array [N, d], got shape {arr.shape}.")
    t = torch.from_numpy(np.array(arr, dtype=np.float32)).to(device)  # a copy: inputs may be read-only memmaps
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).any(dim=1).nonzero()[0, 0])
        raise InputError(f"{what} embeddings contain NaN or infinity (first at row {bad}); re-run `helip embed`.")
    norms = t.norm(dim=1)
    if (norms == 0).any():
        bad = int((norms == 0).nonzero()[0, 0])
        raise InputError(f"{what} embedding of row {bad} is all zeros and has no direction; "
                         f"fix or drop that pair and re-run `helip embed`.")
    return t.div_(norms.unsqueeze(1))  # in place: no second [N, d] copy


class _Run:
    """One mining run: inputs, options, the mode it runs in, the ANN cells if any, the search of a set of targets."""

    def __init__(self, img: torch.Tensor, txt: torch.Tensor, cfg: MineConfig):
        self.img, self.txt, self.cfg, self.n = img, txt, cfg, len(img)
        self.cells = None
        self.stats = {"fallback_rows": 0}
        # float32 exact search on the CPU: cache-sized tiles with per-target bounds (tiled.py); on a GPU
        # the large-block search (exact.py) suits the hardware better
        self.tiled = not img.is_cuda and cfg.resolved_precision() == "fp32"
        self.symmetric_possible = self.tiled and rank_and_world()[1] == 1
        self.mode = cfg.mode      # the mode that runs: auto and recall-targeted ann resolve in ``decide``
        self.choice = None        # why, for meta.json

    def decide(self, partial: Optional[Path], rank: int) -> None:
        """Resolve auto mode, build ANN's cells, choose ANN's operating point (or exact search) for the target.

        Cells and the choice are made once (rank 0) and saved beside the chunks, so a resumed run and the other
        ranks search the same way.
        """
        c = self.cfg
        if c.mode == "auto" and (self.img.is_cuda or self.n < AUTO_EXACT_BELOW):
            self.mode = "exact"
            why = (f"on a GPU exact search ({c.resolved_precision()} similarities, certified) was faster than ANN "
                   f"where measured" if self.img.is_cuda else
                   f"{self.n} pairs (< {AUTO_EXACT_BELOW}): exact search takes seconds to minutes, ANN's tuning "
                   f"sample alone would be a noticeable share of it")
            self.choice = {"use": "exact", "why": why}
            log.info("mode auto: exact search (%s)", why)
            return
        if c.mode not in ("auto", "ann"):
            return
        tuned = c.mode == "auto" or c.nprobe == 0
        self._prepare_cells(partial, rank, max(NPROBE_GRID) if tuned else c.nprobe)
        if not tuned:
            return
        path = partial / "choice.json" if partial is not None else None
        if path is None or (rank == 0 and not path.is_file()):
            choice = tune(self, c.tune_sample, c.target_recall, c.seed,
                          lambda rows: self.search(rows, mode="exact", block_size=min(c.block_size, 64)))
            if path is not None:
                save_json(path, choice)
        barrier()
        self.choice = choice if path is None else json.loads(path.read_text())
        self.mode = self.choice["use"]
        if self.mode == "exact":
            self.cells = None
            log.warning("mode %s: running exact search instead of ANN: %s", c.mode, self.choice["why"])
        else:
            self.cells["probes"] = np.ascontiguousarray(self.cells["probes"][:, :self.choice["nprobe"]])
            log.info("mode %s: ANN, %s", c.mode, self.choice["why"])

    def _prepare_cells(self, partial: Optional[Path], rank: int, nprobe: int) -> None:
        """Build the cells (rank 0, once per resumable run, saved beside the chunks) or load them."""
        paths = {name: partial / f"cells_{name}.npy" for name in ("probes", "nlist")} if partial else {}
        if not paths or (rank == 0 and not all(p.is_file() for p in paths.values())):
            nlist = self.cfg.nlist or default_nlist(self.n)
            self.cells = build_cells(self.txt, self.img, self.cfg.method, nlist, nprobe, self.cfg.seed)
            for name, p in paths.items():
                save_npy(p, self.cells[name])
        barrier()
        if paths:
            self.cells = {name: np.load(p) for name, p in paths.items()}
        self.cells["members"] = group(self.cells["probes"][:, 0], int(self.cells["nlist"][0]))

    def target_order(self) -> np.ndarray:
        """The order in which targets are chunked: by cell for ANN, so a chunk holds whole cells."""
        if self.mode == "ann":
            return np.concatenate(self.cells["members"])
        return np.arange(self.n)

    def search(self, rows: np.ndarray, on_block=lambda n: None, mode: Optional[str] = None,
               block_size: Optional[int] = None):
        c = self.cfg
        common = (self.txt, self.img, rows, c.k, c.method, c.dup_threshold, c.min_similarity,
                  block_size or c.block_size)
        mode = mode or self.mode
        if mode == "exact":
            if c.resolved_precision() != "fp32":
                return search_exact_lowp(*common, precision=c.resolved_precision(), on_block=on_block,
                                         stats=self.stats)
            if self.tiled:
                return search_rows(*common[:-1], on_block=on_block)
            return search_exact(*common, on_block=on_block)
        if mode == "subset":
            return search_subset(*common, c.candidates, c.redraw_every, c.seed, on_block=on_block)
        return search_ann(*common, self.cells, on_block=on_block)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    save_with(path, write)


def _search_symmetric(run: _Run, rows_of, chunk_path, partial: Optional[Path], indices: np.ndarray,
                      scores: np.ndarray, done_here: set, bar) -> None:
    """Exact mode, whole run in one process: chunks in order through one ``SymmetricSearch``.

    A chunk is final once the search has passed its last row; after writing it,
    the search's position and the later rows' partial lists are saved, so a
    killed run resumes from there. A chunk file without a matching saved
    position (killed in between) is searched again, with the same result.
    """
    c = run.cfg
    search = SymmetricSearch(run.txt, run.img, c.k, c.method, c.dup_threshold, c.min_similarity, c.seed)
    state_path = partial / "symmetric_state.npz" if partial is not None else None
    if state_path is not None and state_path.is_file():
        with np.load(state_path) as z:
            search.restore(dict(z))
    for chunk, rows in enumerate(rows_of):
        lo, hi = int(rows[0]), int(rows[-1]) + 1   # target order is 0..N-1 in exact mode
        if hi <= search.done:
            continue   # final in an earlier run: read back from its chunk file
        search.advance(hi, on_block=bar.update)
        idx, sc = search.result(slice(lo, hi))
        indices[lo:hi], scores[lo:hi] = idx, sc
        done_here.add(chunk)
        if chunk_path[chunk] is not None:
            _save_npz(chunk_path[chunk], indices=idx, scores=sc)
            if hi < run.n:
                _save_npz(state_path, **search.state())


def _check_recall(run: _Run, indices: np.ndarray) -> dict:
    """Recall@k of the finished run on its own random sample of targets (independent of the tuning sample),
    against exact search; ANN below the target is reported loudly (never silently)."""
    cfg, n = run.cfg, run.n
    sample = np.sort(np.random.default_rng([cfg.seed, 7]).choice(n, size=min(cfg.recall_sample, n), replace=False))
    # small blocks: a block of exact scores is [block, N] (at N = 1M and 1024 targets, 4 GB per matrix)
    exact_idx, _ = run.search(sample, mode="exact", block_size=min(cfg.block_size, 64))
    found = indices[sample]
    valid = exact_idx >= 0
    hits = np.array([len(set(e[e >= 0].tolist()) & set(a[a >= 0].tolist())) for a, e in zip(found, exact_idx)])
    has = valid.any(1)
    mean = float((hits[has] / valid.sum(1)[has]).mean()) if has.any() else 1.0
    est = {"recall_at_k": round(recall_at_k(found, exact_idx), 4), "mean_per_target": round(mean, 4),
           "lower_bound": round(wilson_lower(mean, int(has.sum())), 4), "confidence": CONFIDENCE,
           "sample": int(len(sample))}
    log.info("%s mode: recall@%d against exact search on %d other sampled targets: %.4f (%.0f%% lower bound %.4f)",
             run.mode, cfg.k, len(sample), mean, 100 * CONFIDENCE, est["lower_bound"])
    if run.mode == "ann":
        est["target_recall"] = cfg.target_recall
        est["meets_target"] = mean >= cfg.target_recall
        if not est["meets_target"]:
            how = ("the nprobe chosen on the tuning sample" if run.choice is not None else
                   f"the fixed --nprobe {cfg.nprobe}")
            log.warning("ANN recall estimate %.4f is BELOW the target %.2f with %s; use --nprobe 0 (chosen for the "
                        "target), a larger --tune-sample, or --mode exact", mean, cfg.target_recall, how)
    return est


@blas_threads()   # numpy's BLAS (used on the CPU, see score.cosines) with torch's thread count
def mine_hard_pairs(image_embeddings: np.ndarray, text_embeddings: np.ndarray, config: Optional[MineConfig] = None,
                    out_dir: Optional[Path] = None, extra_meta: Optional[dict] = None,
                    exclude: Optional[np.ndarray] = None, **overrides) -> HardPairs:
    """Find each pair's hard pairs: the k best-scoring other pairs, best first.

    ``image_embeddings`` and ``text_embeddings`` are [N, d] arrays (any float
    dtype; normalised here) whose row i describes pair i. Options are those of
    ``MineConfig`` (keyword overrides are applied on top of ``config``).
    Returns ``HardPairs`` with ``indices`` int32 [N, k] (-1 where fewer than k
    candidates qualify) and ``scores`` float32 [N, k] (-inf there).

    With ``out_dir`` the run is resumable and is written there in the hard-pairs
    format of docs/design.md (``extra_meta``, e.g. the dataset fingerprint, is added
    to meta.json); under torchrun every rank must call this with the same
    arguments, and all ranks return the merged result.

    ``exclude`` lists pairs that must take no part (the unusable pairs that
    ``helip embed`` records in ``skipped.json``): they are mined over the
    remaining pairs only, never appear as hard pairs, and their own rows are
    all -1.
    """
    unknown = set(overrides) - set(MineConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown mining option(s) {', '.join(sorted(unknown))}; "
                          f"valid: {', '.join(MineConfig.__dataclass_fields__)}.")
    cfg = MineConfig(**{**asdict(config or MineConfig()), **overrides})
    if len(image_embeddings) != len(text_embeddings):
        raise InputError(f"image and text embeddings have {len(image_embeddings)} and {len(text_embeddings)} rows; "
                         f"row i of both must be pair i. Re-run `helip embed`.")
    n_all = len(image_embeddings)
    keep = None
    if exclude is not None and len(exclude):
        mask = np.ones(n_all, dtype=bool)
        mask[np.asarray(exclude, dtype=np.int64)] = False
        keep = np.flatnonzero(mask)
        image_embeddings, text_embeddings = image_embeddings[keep], text_embeddings[keep]
    n = len(image_embeddings)
    cfg.validate(n)
    rank, world = rank_and_world()
    if world > 1 and out_dir is None:
        raise ConfigError("a multi-process (torchrun) mining run needs an output directory to merge into.")
    img = _normalised(image_embeddings, "image", cfg.device)
    txt = _normalised(text_embeddings, "text", cfg.device)
    run = _Run(img, txt, cfg)
    out_dir = Path(out_dir) if out_dir is not None else None
    key = cfg.search_key(n)
    if keep is not None:  # the same n can be another selection of pairs
        key = hashlib.sha256((key + hashlib.sha256(keep.tobytes()).hexdigest()).encode()).hexdigest()[:16]
    if out_dir is not None:  # partial work on other embeddings (same N, re-embedded) must not be reused
        key = hashlib.sha256((key + array_digest(image_embeddings, text_embeddings)).encode()).hexdigest()[:16]
    partial = partial_dir(out_dir, key, rank, "other options or other embeddings") if out_dir is not None else None

    t0 = time.perf_counter()
    run.decide(partial, rank)
    t_index = time.perf_counter() - t0
    order = run.target_order()
    n_chunks = -(-n // cfg.chunk_size)
    rows_of = [order[c * cfg.chunk_size:(c + 1) * cfg.chunk_size] for c in range(n_chunks)]
    chunk_path = [partial / f"chunk_{c:06d}.npz" if partial is not None else None for c in range(n_chunks)]
    indices = np.empty((n, cfg.k), dtype=np.int32)
    scores = np.empty((n, cfg.k), dtype=np.float32)
    done_here = set()  # chunks this process searched: already in the arrays, not read back from disk
    mine_chunks = range(rank, n_chunks, world)
    symmetric = run.mode == "exact" and run.symmetric_possible
    with tqdm(total=sum(len(rows_of[c]) for c in mine_chunks), unit="pair", desc=f"mining ({run.mode})",
              disable=not cfg.progress) as bar:
        if symmetric:
            _search_symmetric(run, rows_of, chunk_path, partial, indices, scores, done_here, bar)
        for c in mine_chunks:
            if c in done_here:   # searched by the symmetric search above
                continue
            if chunk_path[c] is not None and chunk_path[c].is_file():   # finished by an earlier, killed run
                bar.update(len(rows_of[c]))
                continue
            idx, sc = run.search(rows_of[c], on_block=bar.update)
            indices[rows_of[c]], scores[rows_of[c]] = idx, sc
            done_here.add(c)
            if chunk_path[c] is not None:
                _save_npz(chunk_path[c], indices=idx, scores=sc)
    barrier()
    for c in set(range(n_chunks)) - done_here:  # finished by another rank or by an earlier, killed run
        with np.load(chunk_path[c]) as z:
            indices[rows_of[c]], scores[rows_of[c]] = z["indices"], z["scores"]
    barrier()  # every rank has read every chunk before rank 0 may remove them
    seconds = time.perf_counter() - t0
    meta = {
        "mode": run.mode, "requested_mode": cfg.mode, "method": cfg.method, "k": cfg.k, "dup_threshold": cfg.dup_threshold,
        "min_similarity": cfg.min_similarity, "seed": cfg.seed, "n": n, "device": cfg.device,
        "precision": cfg.resolved_precision(),
        "candidate_pool": {"exact": "all",
                           "subset": {"candidates": min(cfg.candidates, n), "redraw_every": cfg.redraw_every},
                           "ann": {"nlist": int(run.cells["nlist"][0]) if run.cells else None,
                                   "nprobe": int(run.cells["probes"].shape[1]) if run.cells else None,
                                   "chosen_for_target_recall": run.choice is not None}}[run.mode],
        "world_size": world,
        "timings": {"mine_seconds": round(seconds, 3), "index_seconds": round(t_index, 3),
                    "pairs_per_second": round(n / max(seconds, 1e-9), 1)},
        "padded_rows": int((indices[:, -1] < 0).sum()),
    }
    if run.choice is not None:
        meta["choice"] = run.choice   # auto / recall-targeted ann: what ran, why, the estimates behind it
    if run.mode == "exact" and cfg.resolved_precision() != "fp32":
        # rows whose low-precision pass could not certify the top-k and were recomputed in float32
        meta["fp32_fallback_rows_this_process"] = run.stats["fallback_rows"]
    if run.mode != "exact" and cfg.recall_sample > 0:
        meta["recall_estimate"] = _check_recall(run, indices)
    if keep is not None:  # back from the kept pairs' positions to dataset indices
        full_i = np.full((n_all, cfg.k), -1, dtype=np.int32)
        full_s = np.full((n_all, cfg.k), -np.inf, dtype=np.float32)
        full_i[keep] = np.where(indices >= 0, keep[np.maximum(indices, 0)], -1)
        full_s[keep] = scores
        indices, scores = full_i, full_s
        meta.update(n=n_all, excluded=int(n_all - n), padded_rows=int((indices[:, -1] < 0).sum()))
    meta.update(extra_meta or {})
    pairs = HardPairs(indices=indices, scores=scores, meta=meta)
    if out_dir is not None:
        if rank == 0:
            save_hard_pairs(out_dir, pairs)
            shutil.rmtree(partial, ignore_errors=True)
        barrier()
    log.info("mined %d pairs in %.1fs (%d rows with fewer than k=%d hard pairs)",
             n, seconds, meta["padded_rows"], cfg.k)
    return pairs
