"""Hard-pair mining speed, memory and agreement: the authors' procedure vs helip's exact and ann modes.

    .venv/bin/python benchmarks/bench_mining.py [--sizes 50000,200000,1000000] [--k 10]
        [--out benchmarks/results/bench_mining.json]
    .venv/bin/python benchmarks/bench_mining.py --quick --out /tmp/bench_quick.json   # smoke test, sizes 5000,20000

What it measures, on the same embeddings for every method of one size:

- Data (--distribution, default hierarchical; the others, isotropic, heavy-tailed and real, are
  described in docs/mining.md and at ``generate`` below): N image-caption pairs, d=256 per modality, L2-normalised float32, deterministic
  from --seed. A shared 64-d latent space holds N/50 cluster centres (themselves grouped
  into super-clusters); each pair is centre + noise, then text = latent @ Wt + noise and
  image = latent @ Wi + noise with separate random projections and noise, so text and
  image similarities are correlated but not identical. 2% of the rows are near-duplicates
  of another row (cosine > 0.98): three quarters copy image and caption, one quarter only
  the caption (same caption, another image of the same cluster), which exercises the
  "text OR image cosine above the threshold" exclusion.
- Methods, each in a fresh subprocess that loads the embeddings from a temp .npy file
  (generation is never counted; only the mining call is timed):
    authors  `authors_mine` below: a faithful torch-on-CPU re-implementation of the
             authors' released procedure (blocks of 600 targets, two dense fp32
             similarity matmuls, dups and the target zeroed by index assignment, product,
             torch.topk).
    exact    helip.mining.mine_hard_pairs(mode="exact", min_similarity=-1.0): -1.0 makes
             helip's candidate rules coincide with the authors' (helip's default 0.0 also
             drops candidates with a non-positive cosine), so the two can be compared.
    ann      helip.mining.mine_hard_pairs(mode="ann") with the library's defaults
             (plus --nlist / --nprobe when given). If the mode is not available yet
             (ConfigError), the JSON says so and the run goes on.
  Sizes >= --ann-only-from (default 1,000,000) run only ann: the others are quadratic.
- Seconds of the mining call; speed ratios authors/exact and authors/ann.
- Peak memory per method (MB): peak_rss_mb is the worker's peak RSS during the mining
  call (inputs and libraries included), extra_rss_mb that minus the RSS after imports and
  after loading the embeddings, i.e. what the method itself needs. The peak is VmHWM,
  reset after loading (/proc/self/clear_refs); ru_maxrss (also recorded) cannot be reset
  and in a spawned worker starts at the parent's RSS, so it hides small peaks. Where the
  reset is not allowed, ru_maxrss is used (peak_rss_source says which).
- ann recall@k against exact with helip's default rules (min_similarity=0.0):
  mean over rows of |ann_row & exact_row| / |exact_row without -1 padding|. Below
  --ann-only-from, over all rows; the reference is the exact run above, with the few
  rows whose top-k contain a non-positive cosine re-computed by brute force under
  min_similarity=0.0 (every other row is provably unchanged). From --ann-only-from on,
  over --recall-sample random targets scored by brute force against all N. (ann's own
  meta["recall_estimate"] is reported beside it; it pools hits over rows instead of
  averaging per row, and uses its own sample.)
- exact vs authors: fraction of rows whose top-k index sets are identical (and
  identical in order). They can differ only where fewer than k candidates qualify
  (the authors zero an excluded candidate's score, helip excludes it and pads with -1)
  or at ties within float rounding (helip re-normalises its inputs); with the scores,
  rows that differ only by such a tie at the k-th place are counted separately.

Prints a summary and writes JSON atomically to --out (rewritten after every size, so a
long run keeps what it finished). Timings are for this machine's CPU with torch's
default thread count unless --threads is given. Run it on an otherwise idle machine:
on a busy 2-core box ann mode (many small matrix products) was seen to slow down by
more than 10x, exact and authors (few large ones) far less. Each method's JSON records
cpu_seconds and the load average before it ran; --repeats N keeps the fastest of N.
Expected duration of the default sizes on a 2-core CPU: roughly 40-60 min (authors and
exact are quadratic: 4-10 s each at N=20k, so ~1 min at 50k and ~10-15 min at 200k).
N=1M needs 2 GB of temp disk (--tmpdir) and several GB of RAM in the ann worker.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from helip.io import save_json

D = 256                 # embedding width per modality
LATENT = 64             # width of the shared latent space
PAIRS_PER_CLUSTER = 50
DUP_FRACTION = 0.02     # rows that are near-duplicates of another row
DUP_THRESHOLD = 0.98
GEN_CHUNK = 65536       # rows generated at a time (bounds generation memory)
METHODS = ("authors", "exact", "ann")
MIB = 1024 * 1024


# --------------------------------------------------------------------------- data

def generate_embeddings(n: int, out_dir: Path, seed: int = 0, d: int = D) -> dict:
    """Write clustered, L2-normalised float32 ``img.npy`` and ``txt.npy`` ([n, d]) to out_dir.

    Generated in chunks straight into .npy memmaps, so N=1M needs well under 1 GB of RAM
    beyond the page cache. Returns a small description of the data.
    """
    rng = np.random.default_rng([seed, 0])
    n_clusters = max(1, n // PAIRS_PER_CLUSTER)
    n_super = max(1, n_clusters // 20)
    supers = rng.standard_normal((n_super, LATENT), dtype=np.float32)
    centres = supers[rng.integers(n_super, size=n_clusters)] + 0.8 * rng.standard_normal(
        (n_clusters, LATENT), dtype=np.float32)
    proj_t = rng.standard_normal((LATENT, d), dtype=np.float32) / LATENT ** 0.5   # a Python float keeps float32
    proj_i = rng.standard_normal((LATENT, d), dtype=np.float32) / LATENT ** 0.5   # a Python float keeps float32
    offset_t = 0.6 * rng.standard_normal(d, dtype=np.float32)   # CLIP-like anisotropy: a
    offset_i = 0.6 * rng.standard_normal(d, dtype=np.float32)   # shared direction per modality
    cluster = rng.integers(n_clusters, size=n)

    copies, sources, full = _plan_duplicates(rng, n)
    cluster[copies] = cluster[sources]          # a caption-only copy shows the same kind of scene

    txt = np.lib.format.open_memmap(out_dir / "txt.npy", mode="w+", dtype=np.float32, shape=(n, d))
    img = np.lib.format.open_memmap(out_dir / "img.npy", mode="w+", dtype=np.float32, shape=(n, d))
    for c, start in enumerate(range(0, n, GEN_CHUNK)):
        stop = min(start + GEN_CHUNK, n)
        crng = np.random.default_rng([seed, 1, c])
        latent = centres[cluster[start:stop]] + crng.standard_normal((stop - start, LATENT), dtype=np.float32)
        txt[start:stop] = _unit(latent @ proj_t + 0.55 * crng.standard_normal((stop - start, d), dtype=np.float32)
                                + offset_t)
        img[start:stop] = _unit(latent @ proj_i + 0.75 * crng.standard_normal((stop - start, d), dtype=np.float32)
                                + offset_i)

    _plant_duplicates(txt, img, copies, sources, full, seed, d)
    del txt, img
    return {"n": n, "d": d, "latent_dim": LATENT, "clusters": n_clusters, "super_clusters": n_super,
            "duplicate_rows": int(len(copies)), "duplicate_rows_caption_only": int((~full).sum()),
            "seed": seed}


def _plan_duplicates(rng: np.random.Generator, n: int):
    """Rows that become near-copies, the rows they copy, and whether the image is copied too.

    Sources are never copies themselves; several copies may share a source (a group).
    """
    n_copies = int(round(DUP_FRACTION * n))
    if n_copies == 0 or n < 4:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
    perm = rng.permutation(n)
    copies = np.sort(perm[:n_copies])
    pool = perm[n_copies:n_copies + max(1, n_copies // 2)]     # ~3 rows per group on average
    sources = pool[rng.integers(len(pool), size=n_copies)]
    full = rng.random(n_copies) < 0.75
    return copies, sources, full


def _unit(x: np.ndarray) -> np.ndarray:
    assert x.dtype == np.float32, x.dtype   # keep generation in float32 (speed, memory)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


DISTRIBUTIONS = ("hierarchical", "isotropic", "heavy-tailed", "real")
ISO_PAIRS_PER_CLUSTER = 25
ISO_TEXT_NOISE, ISO_IMAGE_NOISE = 0.9, 0.7
HEAVY_ALPHA = 1.1       # cluster sizes ~ Zipf: the share of cluster r is proportional to r^-alpha
REAL_BASE = 20000       # real embeddings encoded by the demo's model (the demo's training split size)
REAL_PERTURB = 0.3      # norm of the Gaussian perturbation of a tiled copy (a unit vector), relative


def generate(distribution: str, n: int, out_dir: Path, seed: int = 0, d: int = D, log=print) -> dict:
    """Embeddings of ``distribution`` (img.npy / txt.npy in ``out_dir``); returns their description."""
    if distribution == "hierarchical":
        return {"distribution": distribution, **generate_embeddings(n, out_dir, seed=seed, d=d)}
    if distribution in ("isotropic", "heavy-tailed"):
        return {"distribution": distribution, **generate_isotropic(n, out_dir, seed, d, heavy=distribution == "heavy-tailed")}
    if distribution == "real":
        return {"distribution": distribution, **generate_real(n, out_dir, seed, log)}
    raise ValueError(f"unknown distribution {distribution!r}; choose from {', '.join(DISTRIBUTIONS)}")


def generate_isotropic(n: int, out_dir: Path, seed: int = 0, d: int = D, heavy: bool = False) -> dict:
    """Clusters in the full dimension: N/25 random unit centres per modality (shared cluster ids), each pair
    = its centre + isotropic Gaussian noise in all d dimensions (norm ~0.9 for text, ~0.7 for images,
    relative to the unit centre), L2-normalised; 2% planted near-duplicates as in the hierarchical data.

    ``heavy``: the same, but cluster sizes follow a power law (Zipf, exponent HEAVY_ALPHA): a few clusters
    hold thousands of pairs, most hold a handful, as web data does.
    """
    rng = np.random.default_rng([seed, 10])
    n_clusters = max(1, n // ISO_PAIRS_PER_CLUSTER)
    centres_t = _unit(rng.standard_normal((n_clusters, d), dtype=np.float32))
    centres_i = _unit(rng.standard_normal((n_clusters, d), dtype=np.float32))
    if heavy:
        w = np.arange(1, n_clusters + 1, dtype=np.float64) ** -HEAVY_ALPHA
        cluster = rng.choice(n_clusters, size=n, p=w / w.sum())
    else:
        cluster = rng.integers(n_clusters, size=n)
    copies, sources, full = _plan_duplicates(rng, n)
    cluster[copies] = cluster[sources]
    txt = np.lib.format.open_memmap(out_dir / "txt.npy", mode="w+", dtype=np.float32, shape=(n, d))
    img = np.lib.format.open_memmap(out_dir / "img.npy", mode="w+", dtype=np.float32, shape=(n, d))
    scale_t, scale_i = np.float32(ISO_TEXT_NOISE / d ** 0.5), np.float32(ISO_IMAGE_NOISE / d ** 0.5)
    for c, start in enumerate(range(0, n, GEN_CHUNK)):
        stop = min(start + GEN_CHUNK, n)
        crng = np.random.default_rng([seed, 11, c])
        cl = cluster[start:stop]
        txt[start:stop] = _unit(centres_t[cl] + scale_t * crng.standard_normal((stop - start, d), dtype=np.float32))
        img[start:stop] = _unit(centres_i[cl] + scale_i * crng.standard_normal((stop - start, d), dtype=np.float32))
    _plant_duplicates(txt, img, copies, sources, full, seed, d)
    sizes = np.bincount(cluster, minlength=n_clusters)
    return {"n": n, "d": d, "clusters": n_clusters, "text_noise": ISO_TEXT_NOISE, "image_noise": ISO_IMAGE_NOISE,
            "cluster_sizes": "power law (Zipf, exponent %.2f)" % HEAVY_ALPHA if heavy else "uniform",
            "largest_cluster": int(sizes.max()), "median_cluster": float(np.median(sizes)),
            "duplicate_rows": int(len(copies)), "duplicate_rows_caption_only": int((~full).sum()), "seed": seed}


def _plant_duplicates(txt, img, copies, sources, full, seed: int, d: int) -> None:
    drng = np.random.default_rng([seed, 2])
    txt[copies] = _unit(np.asarray(txt[sources]) + 0.002 * drng.standard_normal((len(copies), d), dtype=np.float32))
    img[copies[full]] = _unit(np.asarray(img[sources[full]])
                              + 0.002 * drng.standard_normal((int(full.sum()), d), dtype=np.float32))
    txt.flush()
    img.flush()


def real_base(log=print, steps: int = 300) -> tuple[np.ndarray, np.ndarray, dict]:
    """REAL_BASE pairs of the built-in world (the demo's training split) encoded by a model of it.

    The model: the demo's cached pretrained checkpoint when present (helip demo writes it), else the demo's
    tiny model trained from scratch for ``steps`` steps with the demo's pretraining options (a few minutes on a
    CPU). Cached under the demo's cache directory, keyed by what determines it.
    """
    import hashlib
    from dataclasses import replace

    import torch

    from helip.app.demo import DemoConfig, _pretrain_key, default_cache_dir
    from helip.app import worlds as world
    from helip.data.pairs import prepare_pairs
    from helip.embed import encode_pairs
    from helip.models import load_model
    from helip.training import train

    cfg = DemoConfig()
    cache = default_cache_dir()
    demo_ckpt = cache / f"pretrain-{_pretrain_key(cfg)}" / "model.pt"
    source = f"demo checkpoint {demo_ckpt.parent.name}" if demo_ckpt.is_file() else f"demo model trained {steps} steps"
    key = hashlib.sha256(json.dumps([source, REAL_BASE, cfg.world_seed, world.get_world("builtin").version]).encode()).hexdigest()[:12]
    path = cache / f"bench-mining-real-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["img"], z["txt"], json.loads(str(z["info"]))
    t0 = time.perf_counter()
    log(f"real embeddings: generating {REAL_BASE} world pairs and encoding them ({source}); cached at {path}")
    split = world.generate(REAL_BASE, cfg.world_seed, "train")
    lm = load_model(cfg.pretrain.model)
    pairs = prepare_pairs(split.images, split.captions, lm)
    if demo_ckpt.is_file():
        ckpt = demo_ckpt
    else:
        run_dir = cache / f"bench-mining-real-model-{key}"
        ckpt = train(replace(cfg.pretrain, steps=steps, pretrained=None, progress=False), pairs, run_dir).checkpoint
    lm = load_model(cfg.pretrain.model, pretrained=str(ckpt))
    with torch.no_grad():
        img, txt = encode_pairs(lm, pairs)
    info = {"model": cfg.pretrain.model, "source": source, "base_pairs": REAL_BASE, "world_seed": cfg.world_seed,
            "seconds_to_build": round(time.perf_counter() - t0, 1)}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, img=img, txt=txt, info=json.dumps(info))
    os.replace(tmp, path)
    return img, txt, info


def generate_real(n: int, out_dir: Path, seed: int = 0, log=print) -> dict:
    """Real embeddings of the built-in world; beyond REAL_BASE rows, tiled copies perturbed in every dimension.

    Row i < REAL_BASE is base row i (N <= REAL_BASE: the first N rows, unperturbed). Row i >= REAL_BASE is
    base row (i mod REAL_BASE) + Gaussian noise of norm ~REAL_PERTURB in each modality, re-normalised (cosine
    ~0.96 to its source: below the 0.98 duplicate threshold, so a copy is a candidate, not a duplicate).
    """
    base_img, base_txt, info = real_base(log)
    b, d = base_img.shape
    txt = np.lib.format.open_memmap(out_dir / "txt.npy", mode="w+", dtype=np.float32, shape=(n, d))
    img = np.lib.format.open_memmap(out_dir / "img.npy", mode="w+", dtype=np.float32, shape=(n, d))
    scale = np.float32(REAL_PERTURB / d ** 0.5)
    for c, start in enumerate(range(0, n, GEN_CHUNK)):
        stop = min(start + GEN_CHUNK, n)
        src = np.arange(start, stop) % b
        crng = np.random.default_rng([seed, 21, c])
        noisy = (np.arange(start, stop) >= b)[:, None].astype(np.float32) * scale
        txt[start:stop] = _unit(base_txt[src] + noisy * crng.standard_normal((stop - start, d), dtype=np.float32))
        img[start:stop] = _unit(base_img[src] + noisy * crng.standard_normal((stop - start, d), dtype=np.float32))
    txt.flush()
    img.flush()
    return {"n": n, "d": d, **info, "tiled": n > b,
            "tiling": (f"rows >= {b}: base row (i mod {b}) + Gaussian noise of norm ~{REAL_PERTURB} per modality, "
                       "re-normalised") if n > b else "none (the first N base rows)", "seed": seed}


def describe_similarities(img: np.ndarray, txt: np.ndarray, sample: int = 2000, seed: int = 0) -> dict:
    """Cosine statistics of random pairs in a row sample: shows the data are not degenerate."""
    rows = np.sort(np.random.default_rng([seed, 3]).choice(len(img), size=min(sample, len(img)), replace=False))
    ct = np.asarray(txt[rows]) @ np.asarray(txt[rows]).T
    ci = np.asarray(img[rows]) @ np.asarray(img[rows]).T
    off = ~np.eye(len(rows), dtype=bool)
    ct, ci = ct[off], ci[off]
    return {"sample_rows": len(rows),
            "text_cos_mean": round(float(ct.mean()), 4), "image_cos_mean": round(float(ci.mean()), 4),
            "text_cos_p99": round(float(np.quantile(ct, 0.99)), 4),
            "image_cos_p99": round(float(np.quantile(ci, 0.99)), 4),
            "text_image_cos_correlation": round(float(np.corrcoef(ct, ci)[0, 1]), 4),
            "fraction_text_or_image_cos_above_dup_threshold": float(((ct > DUP_THRESHOLD) | (ci > DUP_THRESHOLD)).mean())}


# --------------------------------------------------------------------------- reference miners

def authors_mine(img: np.ndarray, txt: np.ndarray, k: int, dup_threshold: float = DUP_THRESHOLD,
                 block: int = 600, return_scores: bool = False, device: str = "cpu", targets: Optional[int] = None):
    """The authors' released mining procedure, re-implemented in torch on CPU. Indices [N, k].

    Per block of targets: dense fp32 text and image similarities against every pair,
    near-duplicates (either similarity above the threshold) and the target itself zeroed
    by index assignment, product, top-k. Inputs are already L2-normalised. With
    ``return_scores`` also returns the top-k scores [N, k] (for tie-tolerant comparison).
    On ``device`` (the authors ran it on GPUs, in float32). ``targets`` mines only the
    first that many targets (rows past them are left -1), for sizes where the whole run
    would take too long; the benchmark then extrapolates its time.
    """
    import torch

    txt_t = torch.from_numpy(np.ascontiguousarray(txt, dtype=np.float32)).to(device)
    img_t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).to(device)
    n = txt_t.shape[0]
    out = np.full((n, k), -1, dtype=np.int32)
    out_scores = np.full((n, k), -np.inf, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, min(n, targets or n), block):
            stop = min(start + block, n)
            sim_t = txt_t[start:stop] @ txt_t.T
            sim_i = img_t[start:stop] @ img_t.T
            sim_t[sim_t > dup_threshold] = 0
            sim_i[sim_i > dup_threshold] = 0
            rows = torch.arange(stop - start, device=device)
            sim_t[rows, rows + start] = 0
            sim_i[rows, rows + start] = 0
            score = sim_t * sim_i
            vals, idx = torch.topk(score, k, dim=1)
            out[start:stop] = idx.cpu().numpy()
            out_scores[start:stop] = vals.cpu().numpy()
    return (out, out_scores) if return_scores else out


def brute_force_rows(img: np.ndarray, txt: np.ndarray, rows: np.ndarray, k: int,
                     dup_threshold: float = DUP_THRESHOLD, min_similarity: float = 0.0) -> np.ndarray:
    """Exact top-k indices [len(rows), k] of the given targets against all N, with helip's rules.

    helip's own exact search (``helip.mining.exact.search_exact``) restricted to ``rows``,
    so a sampled recall needs no full exact run.
    """
    import torch

    from helip.mining.exact import search_exact

    def unit(x):
        return torch.nn.functional.normalize(torch.from_numpy(np.asarray(x, dtype=np.float32)), dim=1)

    return search_exact(unit(txt), unit(img), np.asarray(rows), k, "hpm", dup_threshold, min_similarity,
                        block_size=512)[0]


# --------------------------------------------------------------------------- comparisons

def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> dict:
    """Mean over rows of |approx_row & exact_row| / |exact_row without -1|; rows with no valid exact entry skipped."""
    valid = exact >= 0
    hits = ((exact[:, :, None] == approx[:, None, :]).any(2) & valid).sum(1)
    denom = valid.sum(1)
    keep = denom > 0
    return {"recall": float((hits[keep] / denom[keep]).mean()) if keep.any() else None,
            "rows": int(keep.sum()), "rows_without_candidates": int((~keep).sum())}


def set_agreement(a: np.ndarray, b: np.ndarray, a_scores: Optional[np.ndarray] = None,
                  b_scores: Optional[np.ndarray] = None, tie_tol: float = 1e-5) -> dict:
    """Fractions of rows whose index sets (and whole ordered rows) are identical.

    With scores (best first), a row whose sets differ but whose k scores agree within
    ``tie_tol`` differs only by a (float-rounding) tie at the k-th place.
    """
    same_set = (np.sort(a, 1) == np.sort(b, 1)).all(1)
    out = {"identical_sets_fraction": float(same_set.mean()),
           "identical_order_fraction": float((a == b).all(1).mean()),
           "rows_differing": int((~same_set).sum())}
    if a_scores is not None and b_scores is not None:
        tie = ~same_set & (np.abs(a_scores - b_scores) <= tie_tol).all(1)
        out["rows_differing_only_by_ties"] = int(tie.sum())
        out["identical_sets_up_to_ties_fraction"] = float((same_set | tie).mean())
    return out


def exact_with_default_rules(img, txt, exact_m1: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Exact top-k under min_similarity=0.0, from an exact run under min_similarity=-1.0.

    The 0.0 candidates are a subset of the -1.0 ones, so a row whose -1.0 top-k all have
    both cosines > 0 is also the 0.0 top-k; only the other rows need recomputing.
    """
    idx = exact_m1.astype(np.int64)
    safe = np.where(idx >= 0, idx, 0)
    ct = np.empty(idx.shape, np.float32)
    ci = np.empty(idx.shape, np.float32)
    for s in range(0, len(idx), 8192):        # chunked: the [rows, k, d] gathers stay small
        sl = slice(s, s + 8192)
        ct[sl] = np.einsum("nd,nkd->nk", txt[sl], txt[safe[sl].ravel()].reshape(*safe[sl].shape, -1))
        ci[sl] = np.einsum("nd,nkd->nk", img[sl], img[safe[sl].ravel()].reshape(*safe[sl].shape, -1))
    bad_rows = np.flatnonzero(((idx >= 0) & ((ct <= 1e-5) | (ci <= 1e-5))).any(1))  # margin for rounding
    out = exact_m1.copy()
    if len(bad_rows):
        out[bad_rows] = brute_force_rows(img, txt, bad_rows, k, min_similarity=0.0)
    return out, int(len(bad_rows))


# --------------------------------------------------------------------------- workers

def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KB on Linux


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _status_mb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (VmHWM); False where the kernel does not allow it.

    Needed because ru_maxrss cannot be reset and, in a child process, starts at the
    parent's RSS (the kernel carries the pre-exec high-water mark over), and the torch
    import alone peaks at ~0.5 GB: either can hide the mining's own peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmHWM") is not None
    except OSError:
        return False


def worker_main(args: argparse.Namespace) -> int:
    """Run one method on the saved embeddings; write <method>.json and <method>_indices.npy."""
    import torch

    from helip.errors import HelipError
    from helip.mining import mine_hard_pairs
    try:
        import faiss  # noqa: F401  loaded before the baseline: library code is not mining memory
    except ImportError:
        pass
    if args.threads:
        torch.set_num_threads(args.threads)
    emb = Path(args.emb_dir)
    img = np.load(emb / "img.npy")
    txt = np.load(emb / "txt.npy")
    hwm = reset_peak_rss()
    baseline = _status_mb("VmRSS") if hwm else maxrss_mb()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.zeros(1, device=args.device)     # CUDA context created outside the timed call
        torch.cuda.reset_peak_memory_stats()
    method, k = args.worker, args.k
    options = {"device": args.device}
    if method == "exact":
        options.update(min_similarity=-1.0, precision=args.precision)
    elif method == "ann":
        options.update({key: v for key, v in (("nlist", args.nlist), ("nprobe", args.nprobe)) if v is not None})
    result: dict = {"method": method, "options": options, "torch_threads": torch.get_num_threads()}
    try:
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        if method == "authors":
            (indices, scores), meta = authors_mine(img, txt, k, return_scores=True, device=args.device,
                                                   targets=args.authors_targets), None
        else:
            hp = mine_hard_pairs(img, txt, k=k, mode=method, progress=False, **options)
            indices, scores, meta = hp.indices, hp.scores, hp.meta
        result["seconds"] = round(time.perf_counter() - t0, 3)
        result["cpu_seconds"] = round(_cpu_seconds() - cpu0, 3)   # ~ threads x seconds unless starved
    except HelipError as e:
        result["error"] = f"{type(e).__name__}: {e}"
        write_json(Path(args.worker_out), result)
        return 0
    peak = _status_mb("VmHWM") if hwm else maxrss_mb()
    result.update(baseline_rss_mb=round(baseline, 1), peak_rss_mb=round(peak, 1),
                  extra_rss_mb=round(peak - baseline, 1), ru_maxrss_mb=round(maxrss_mb(), 1),
                  peak_rss_source="VmHWM, reset after loading" if hwm else "ru_maxrss", meta=meta)
    if cuda:
        result["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
    if method == "authors" and args.authors_targets and args.authors_targets < len(img):
        done = args.authors_targets
        result.update(targets_mined=done, seconds_measured=result["seconds"],
                      seconds=round(result["seconds"] * len(img) / done, 3),
                      cpu_seconds_measured=result["cpu_seconds"],
                      cpu_seconds=round(result["cpu_seconds"] * len(img) / done, 3),
                      seconds_note=f"extrapolated linearly from the first {done} of {len(img)} targets")
    np.savez(Path(args.worker_out).with_suffix(".npz"), indices=np.asarray(indices, dtype=np.int32),
             scores=np.asarray(scores, dtype=np.float32))
    write_json(Path(args.worker_out), result)
    return 0


def run_worker(method: str, emb_dir: Path, args: argparse.Namespace) -> tuple[dict, Optional[dict]]:
    """Run ``method`` in a fresh interpreter; returns its result dict and {"indices", "scores"} (None on error)."""
    out = emb_dir / f"{method}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--emb-dir", str(emb_dir),
           "--k", str(args.k), "--worker-out", str(out)]
    for flag in ("threads", "nlist", "nprobe", "device", "precision", "authors_targets"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"worker exited {proc.returncode}: " + " | ".join(tail)}, None
    result = json.loads(out.read_text())
    if proc.stderr.strip():   # library warnings (e.g. FAISS's) are kept out of the summary but recorded
        result["worker_stderr_tail"] = proc.stderr.strip().splitlines()[-3:]
    if "error" in result:
        return result, None
    with np.load(out.with_suffix(".npz")) as z:
        return result, {"indices": z["indices"], "scores": z["scores"]}


def run_repeated(method: str, emb_dir: Path, args: argparse.Namespace) -> tuple[dict, Optional[dict]]:
    """``--repeats`` fresh workers; keeps the fastest (the least disturbed by other load on the machine).

    Each run records the 1-minute load average before it started, a hint of contention.
    """
    runs = []
    for _ in range(args.repeats):
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        result, output = run_worker(method, emb_dir, args)
        result["load_avg_1min_before"] = None if load is None else round(load, 2)
        runs.append((result, output))
        if "error" in result:
            return result, output
    result, output = min(runs, key=lambda ro: ro[0]["seconds"])
    if len(runs) > 1:
        result["seconds_all_repeats"] = [r["seconds"] for r, _ in runs]
    return result, output


# --------------------------------------------------------------------------- one size

def bench_size(n: int, args: argparse.Namespace, log) -> dict:
    ann_only = n >= args.ann_only_from
    methods = [m for m in args.methods if m == "ann" or not ann_only]
    entry: dict = {"n": n, "k": args.k, "methods_run": methods}
    with tempfile.TemporaryDirectory(prefix="helip-bench-", dir=args.tmpdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        entry["data"] = generate(args.distribution, n, tmp, seed=args.seed, log=log)
        entry["data"]["generation_seconds"] = round(time.perf_counter() - t0, 2)
        img = np.load(tmp / "img.npy", mmap_mode="r")
        txt = np.load(tmp / "txt.npy", mmap_mode="r")
        entry["data"]["similarities"] = describe_similarities(img, txt, seed=args.seed)
        log(f"[N={n}] data ready in {entry['data']['generation_seconds']} s")

        results, outputs = {}, {}
        for m in methods:
            results[m], outputs[m] = run_repeated(m, tmp, args)
            r = results[m]
            log(f"[N={n}] {m:8s} " + (r["error"] if "error" in r else
                                       f"{r['seconds']:.2f} s, peak RSS +{r['extra_rss_mb']:.0f} MB over inputs"))
        entry["methods"] = results
        entry["speed_ratios"] = _ratios(results)
        if "ann" in results:
            entry["ann_meta"] = results["ann"].get("meta")
        entry["ann_recall"] = _ann_recall(img, txt, outputs, ann_only, args)
        entry["exact_vs_authors"] = _exact_vs_authors(outputs)
        del img, txt
    return entry


def _ratios(results: dict) -> dict:
    def sec(m):
        r = results.get(m, {})
        return r.get("seconds") if "error" not in r else None
    a = sec("authors")
    return {f"authors_over_{m}": (round(a / sec(m), 3) if a and sec(m) else None) for m in ("exact", "ann")}


def _ann_recall(img, txt, outputs: dict, ann_only: bool, args) -> dict:
    if outputs.get("ann") is None:
        return {"recall_at_k": None, "why": "ann did not run or failed"}
    ann = outputs["ann"]["indices"]
    if ann_only or outputs.get("exact") is None:
        rows = np.sort(np.random.default_rng([args.seed, 4]).choice(len(img), size=min(args.recall_sample, len(img)),
                                                                    replace=False))
        t0 = time.perf_counter()
        ref = brute_force_rows(img, txt, rows, args.k, min_similarity=0.0)
        r = recall_at_k(ann[rows], ref)
        return {"recall_at_k": r["recall"], "rows": r["rows"], "sampled": True,
                "reference": "brute force, helip default rules (min_similarity=0.0), on a random sample of targets",
                "reference_seconds": round(time.perf_counter() - t0, 2)}
    ref, fixed = exact_with_default_rules(img, txt, outputs["exact"]["indices"], args.k)
    r = recall_at_k(ann, ref)
    return {"recall_at_k": r["recall"], "rows": r["rows"], "sampled": False,
            "rows_without_candidates": r["rows_without_candidates"],
            "reference": "helip exact, default rules (min_similarity=0.0): the min_similarity=-1.0 run with "
                         f"{fixed} rows recomputed by brute force",
            "rows_recomputed": fixed}


def _exact_vs_authors(outputs: dict) -> dict:
    ex, au = outputs.get("exact"), outputs.get("authors")
    if ex is None or au is None:
        return {"identical_sets_fraction": None, "why": "exact or authors did not run"}
    rows = np.flatnonzero(np.isfinite(au["scores"][:, 0]))   # the targets the authors' run mined
    ex = {key: v[rows] for key, v in ex.items()}
    au = {key: v[rows] for key, v in au.items()}
    out = set_agreement(ex["indices"], au["indices"], ex["scores"], au["scores"])
    out["rows_compared"] = int(len(rows))
    out["rows_padded_in_exact"] = int((ex["indices"][:, -1] < 0).sum())
    out["note"] = ("exact ran with min_similarity=-1.0 so its candidate rules match the authors' "
                   "(helip's default 0.0 also drops non-positive cosines); rows can still differ where "
                   "fewer than k candidates qualify (authors zero, helip pads with -1) or at ties within float "
                   "rounding (helip re-normalises its inputs), counted in rows_differing_only_by_ties")
    return out


# --------------------------------------------------------------------------- reporting

def machine_info(threads: Optional[int]) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        import faiss
        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    try:
        import helip
        helip_version = helip.__version__
    except Exception as e:  # the package may be mid-edit; the benchmark still records what it can
        helip_version = f"import failed: {e}"
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3, 1)
    except (ValueError, OSError):
        mem_gb = None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": _cpu_model(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_gb": mem_gb, "numpy": np.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "faiss": faiss_version, "helip": helip_version,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def git_commit() -> Optional[str]:
    """``git rev-parse HEAD`` of the checkout the benchmark runs from (and whether it had local changes)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+local-changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def summary(report: dict) -> str:
    lines = [f"distribution: {report['settings']['distribution']}  commit {report['git_commit']}"]
    for e in report["sizes"]:
        lines.append(f"N={e['n']:,}  k={e['k']}")
        lines.append(f"  {'method':8s} {'seconds':>9s} {'extra RSS MB':>13s} {'peak RSS MB':>12s}")
        for m, r in e["methods"].items():
            if "error" in r:
                lines.append(f"  {m:8s} error: {r['error']}")
            else:
                gpu = f"  GPU peak {r['peak_gpu_memory_mb']:.0f} MB" if "peak_gpu_memory_mb" in r else ""
                note = f"  ({r['seconds_note']})" if "seconds_note" in r else ""
                lines.append(f"  {m:8s} {r['seconds']:9.2f} {r['extra_rss_mb']:13.0f} {r['peak_rss_mb']:12.0f}{gpu}{note}")
        ratios = ", ".join(f"{key} {v}x" for key, v in e["speed_ratios"].items() if v is not None)
        if ratios:
            lines.append(f"  speed: {ratios}")
        rec = e["ann_recall"]
        if rec.get("recall_at_k") is not None:
            est = (e.get("ann_meta") or {}).get("recall_estimate")
            lines.append(f"  ann recall@{e['k']} vs exact: {rec['recall_at_k']:.4f} over {rec['rows']} "
                         f"{'sampled ' if rec['sampled'] else ''}rows" + (f" (ann's own estimate {est})" if est is not None else ""))
        eq = e["exact_vs_authors"]
        if eq.get("identical_sets_fraction") is not None:
            lines.append(f"  exact (min_similarity=-1) vs authors: identical top-k sets in "
                         f"{eq['identical_sets_fraction']:.4%} of rows ({eq['rows_differing']} differ, "
                         f"{eq.get('rows_differing_only_by_ties', '?')} of them only by a tie at the k-th place; "
                         f"{eq['rows_padded_in_exact']} rows padded in exact)")
    lines.append(f"total wall time {report['total_seconds']:.1f} s")
    return "\n".join(lines)


def write_json(path: Path, obj) -> None:
    """JSON, atomically (helip's own writer), with numpy values made plain."""
    save_json(path, json.loads(json.dumps(obj, default=_jsonable)))


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


# --------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="50000,200000,1000000", help="comma-separated N values")
    p.add_argument("--quick", action="store_true", help="smoke test: sizes 5000,20000")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distribution", default="hierarchical", choices=DISTRIBUTIONS,
                   help="synthetic embeddings: hierarchical (low intrinsic dimension), isotropic (clusters in all "
                        "256 dims), heavy-tailed (power-law cluster sizes), real (the built-in world encoded by "
                        "the demo's model, tiled and perturbed beyond 20k rows)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--ann-only-from", type=int, default=1_000_000,
                   help="sizes at or above this run only ann, with sampled recall")
    p.add_argument("--recall-sample", type=int, default=200, help="targets for sampled recall")
    p.add_argument("--nlist", type=int, default=None, help="passed to ann mode when given")
    p.add_argument("--nprobe", type=int, default=None, help="passed to ann mode when given")
    p.add_argument("--repeats", type=int, default=1, help="fresh workers per method; the fastest is kept")
    p.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's default)")
    p.add_argument("--tmpdir", default=None, help="where the temporary embeddings go (2 GB at N=1M)")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where every method runs")
    p.add_argument("--precision", default="auto", help="exact mode's similarity precision (auto: fp16 on GPU)")
    p.add_argument("--authors-targets", type=int, default=None,
                   help="authors' procedure on only the first T targets, its time extrapolated to N")
    p.add_argument("--out", default="benchmarks/results/bench_mining.json")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--emb-dir", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = [5000, 20000] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = set(args.methods) - set(METHODS)
    if bad:
        p.error(f"unknown methods {sorted(bad)}; choose from {','.join(METHODS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    report = {"benchmark": "hard-pair mining: authors' procedure vs helip exact vs helip ann",
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "git_commit": git_commit(),
              "machine": machine_info(args.threads),
              "settings": {"distribution": args.distribution, "k": args.k, "seed": args.seed, "d": D,
                           "dup_threshold": DUP_THRESHOLD,
                           "device": args.device, "precision": args.precision,
                           "authors_targets": args.authors_targets,
                           "repeats": args.repeats, "threads": args.threads,
                           "ann_only_from": args.ann_only_from, "recall_sample": args.recall_sample,
                           "exact_options": {"min_similarity": -1.0},
                           "exact_options_why": "matches the authors' candidate rules for the equality check",
                           "ann_options": {key: v for key, v in (("nlist", args.nlist), ("nprobe", args.nprobe))
                                           if v is not None}},
              "sizes": []}
    for n in args.sizes:
        if args.k > n - 1:
            log(f"[N={n}] skipped: k={args.k} needs at least {args.k + 1} pairs")
            continue
        report["sizes"].append(bench_size(n, args, log))
        report["total_seconds"] = round(time.perf_counter() - t0, 1)
        write_json(Path(args.out), report)        # after every size, so a long run keeps partial results
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(Path(args.out), report)
    print(summary(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
