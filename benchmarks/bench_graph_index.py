"""Would a graph index reach ANN's recall target where helip's k-means cells do not? FAISS HNSW, measured.

    .venv/bin/python benchmarks/bench_graph_index.py --distribution isotropic --n 200000 \\
        [--m 32] [--ef-construction 40] [--ef 32,64,128,256] [--candidates 32] [--k 10] \\
        --out benchmarks/results/graph_index_200k_isotropic.json

On the isotropic and heavy-tailed benchmark embeddings no nprobe up to 64 reaches recall 0.98 (so
``helip mine``'s auto mode runs exact search there). This script asks whether a proximity graph would
do better, as ANN libraries suggest for data whose neighbourhoods spread over many dimensions:

- the embeddings of ``bench_mining.generate`` (same distributions, same seed);
- a FAISS ``IndexHNSWFlat`` (inner product) over the joint representation [text, image] / sqrt(2)
  that helip's cells use (``helip.mining.ann.joint``), built on all N pairs, timed;
- for a random sample of targets, each target's ``--candidates`` nearest pairs on the graph at each
  ``--ef`` (search breadth), re-scored exactly with helip's rules and cut to k (as an ANN mode would),
  against exact search of the same targets (helip's tiled search): recall@k, mean over targets, and the graph
  search's time per target extrapolated to N;
- the same check with the joint inner product computed exactly (no graph): the share of the exact hard
  pairs among each target's ``--candidates`` best by the joint inner product, which separates what the
  candidate count loses from what the graph search loses;
- exact search's time, as ``helip mine``'s auto mode estimates it (the sample's time x N / sample x 0.35,
  the symmetric search's share), for comparison in the same run.

Prints a summary and writes JSON atomically to --out with provenance (commit, machine, options).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance  # noqa: E402
from bench_mining import DISTRIBUTIONS, generate, recall_at_k, write_json  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--distribution", default="isotropic", choices=DISTRIBUTIONS)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--m", type=int, default=32, help="HNSW links per pair")
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--ef", default="32,64,128,256", help="search breadths to measure")
    p.add_argument("--candidates", type=int, default=32, help="nearest pairs re-scored per target")
    p.add_argument("--sample", type=int, default=500, help="targets measured against exact search")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import faiss

    from helip.mining.ann import joint
    from helip.mining.exact import _rescore
    from helip.mining.mine import MineConfig
    from helip.mining.score import select_topk
    from helip.mining.tiled import search_rows
    from helip.mining.tune import SYMMETRIC_SHARE

    defaults = MineConfig()   # helip's default rules, as `helip mine` applies them
    rules = (defaults.method, defaults.dup_threshold, defaults.min_similarity)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        data = generate(args.distribution, args.n, Path(tmp), seed=args.seed)
        img, txt = np.load(Path(tmp) / "img.npy"), np.load(Path(tmp) / "txt.npy")
    t = torch.nn.functional.normalize(torch.from_numpy(txt), dim=1)
    i = torch.nn.functional.normalize(torch.from_numpy(img), dim=1)
    sample = np.sort(np.random.default_rng([args.seed, 5]).choice(args.n, args.sample, replace=False))
    t0 = time.perf_counter()   # helip's exact search of these targets, as auto mode times it
    exact = search_rows(t, i, sample, args.k, *rules)[0]
    exact_sample_s = time.perf_counter() - t0
    exact_est = exact_sample_s / len(sample) * args.n * SYMMETRIC_SHARE

    x = joint(t, i, defaults.method)
    q = torch.as_tensor(sample)

    def rescored(cand: np.ndarray) -> np.ndarray:
        c = torch.from_numpy(np.asarray(cand, dtype=np.int64))
        sc = _rescore(t, i, q, c.clamp(min=0), *rules).masked_fill_(c < 0, float("-inf"))
        return select_topk(sc, c, args.k)[0]

    # no graph: the exact joint top-m (a selection, not a sort of every row's N scores)
    best_joint = torch.topk(torch.from_numpy(x[sample] @ x.T), args.candidates, dim=1).indices.numpy()
    joint_recall = recall_at_k(rescored(best_joint), exact)

    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(x.shape[1], args.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = args.ef_construction
    index.add(x)
    build_s = time.perf_counter() - t0
    points = []
    for ef in [int(v) for v in args.ef.split(",")]:
        params = faiss.SearchParametersHNSW()
        params.efSearch = ef
        t0 = time.perf_counter()
        _, cand = index.search(x[sample], args.candidates, params=params)
        found = rescored(cand)
        search_s = time.perf_counter() - t0
        points.append({"ef_search": ef, "recall": recall_at_k(found, exact),
                       "search_seconds_estimate": round(search_s / len(sample) * args.n, 1)})
    report = {"data": data, "n": args.n, "k": args.k, "hnsw": {"m": args.m, "ef_construction": args.ef_construction},
              "candidates": args.candidates, "sample_targets": len(sample),
              "joint_top_candidates_recall": joint_recall, "build_seconds": round(build_s, 1), "grid": points,
              "exact_seconds_estimate": round(exact_est, 1), "exact_sample_seconds": round(exact_sample_s, 3),
              "provenance": provenance(args)}
    write_json(Path(args.out), report)
    print(f"{args.distribution} N={args.n:,}: graph built in {build_s:.0f} s; exact search estimated at {exact_est:.0f} s; "
          f"the joint top {args.candidates} hold {joint_recall['recall']:.4f} of the exact hard pairs")
    for pt in points:
        print(f"  ef_search {pt['ef_search']:4d}: recall@{args.k} {pt['recall']['recall']:.4f}, "
              f"search of all N estimated at {pt['search_seconds_estimate']:.0f} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
