"""The `helip` command. Thin: parse flags, call a stage, print where the output went.

A ``HelipError`` (bad input, bad flag, stale file) is printed as one line and
exits with status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

from .errors import ConfigError, HelipError

log = logging.getLogger("helip")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("helip").setLevel(logging.DEBUG if verbose else logging.INFO)


def _world_split(args):
    """The built-in world's training split (the only dataset until CSV/shards land)."""
    from .data import world

    if args.data != "world":
        raise ConfigError(f"--data {args.data!r}: only the built-in world ('world') is supported so far.")
    return world.generate(args.n_train, args.world_seed, "train")


def _model_and_pairs(args, split):
    from .data.pairs import prepare_pairs
    from .models import load_model

    lm = load_model(args.model, args.pretrained, device=args.device)
    return lm, prepare_pairs(split.images, split.captions, lm)


def cmd_demo(args) -> None:
    from .demo import run_demo

    results = run_demo(Path(args.out), seed=args.seed, quick=args.quick,
                       cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    for v in ("pretrained", "baseline", "helip"):
        r = results[v]
        print(f"{v:>10}: zero-shot mean {100 * r['zeroshot_mean']:.1f}  linear probe {100 * r['linear_probe']:.1f}"
              f"  i2t R@1 {100 * r['retrieval']['i2t_r1']:.1f}  t2i R@1 {100 * r['retrieval']['t2i_r1']:.1f}")
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'report.html'}")


def cmd_pretrain(args) -> None:
    from .train import TrainConfig, train

    args.pretrained = None
    _, pairs = _model_and_pairs(args, _world_split(args))
    cfg = TrainConfig(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      warmup_steps=args.warmup_steps, seed=args.seed, hard_per_target=0)
    res = train(cfg, pairs, Path(args.out))
    print(f"wrote {res.checkpoint}")


def cmd_embed(args) -> None:
    from .embed import EmbedConfig, embed

    lm, pairs = _model_and_pairs(args, _world_split(args))
    out = embed(lm, pairs, Path(args.out), EmbedConfig(batch_size=args.batch_size, device=args.device))
    print(f"wrote {out}")


def cmd_mine(args) -> None:
    from .embed import load_embeddings
    from .mining import MineConfig, mine_hard_pairs, write_csv

    img, txt, meta = load_embeddings(Path(args.embeddings))
    cfg = MineConfig(**{name: getattr(args, name) for name in MineConfig.__dataclass_fields__ if hasattr(args, name)})
    rank = _init_distributed(args.device)
    extra = {"fingerprint": meta.get("fingerprint"), "embeddings": str(Path(args.embeddings).resolve())}
    hard = mine_hard_pairs(img, txt, cfg, out_dir=Path(args.out), extra_meta=extra)
    if rank != 0:
        return
    if args.csv:
        write_csv(Path(args.csv), hard)
    recall = hard.meta.get("recall_estimate")
    recall = f", estimated recall@{hard.k} {recall['recall_at_k']:.4f}" if recall else ""
    print(f"wrote {args.out} ({len(hard)} targets, k={hard.k}, {hard.meta['padded_rows']} rows padded with -1"
          f"{recall}, {hard.meta['timings']['mine_seconds']:.1f}s)")


def _init_distributed(device: str) -> int:
    """Join the torchrun process group when launched by torchrun; return this process's rank."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank() if dist.is_initialized() else 0


def cmd_train(args) -> None:
    from .io import fingerprint
    from .mining import load_hard_pairs
    from .train import TrainConfig, check_fresh_out_dir, train

    if args.resume is None:
        check_fresh_out_dir(Path(args.out))
    _init_distributed(args.device)
    split = _world_split(args)
    # check the hard pairs belong to this dataset before any expensive work
    hard = load_hard_pairs(Path(args.hard_pairs), fingerprint(split.captions)) if args.hard_pairs else None
    _, pairs = _model_and_pairs(argparse.Namespace(**{**vars(args), "device": "cpu"}), split)
    cfg = TrainConfig(model=args.model, pretrained=args.pretrained, steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed,
                      hard_per_target=args.hard_per_target if hard is not None else 0, top_k=args.top_k,
                      hnml_weight=args.hnml_weight if hard is not None else 0.0, hnml_margin=args.hnml_margin,
                      device=args.device, weight_decay=args.weight_decay, log_every=args.log_every,
                      precision=args.precision, accum_steps=args.accum_steps, freeze=args.freeze,
                      workers=args.workers, save_every=args.save_every, resume=args.resume,
                      local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                      grad_clip_norm=args.grad_clip_norm, tensorboard=args.tensorboard)
    res = train(cfg, pairs, Path(args.out), hard)
    import torch.distributed as dist

    if dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return
    resumed = f" (resumed from step {res.resumed_from})" if res.resumed_from is not None else ""
    print(f"wrote {res.checkpoint}{resumed}")


def cmd_eval(args) -> None:
    from .data import world
    from .data.pairs import prepare_pairs
    from .evaluate import EvalConfig, evaluate_model
    from .io import save_json
    from .models import load_model

    if len(args.name) != len(args.pretrained):
        raise ConfigError("give one --name per --pretrained checkpoint.")
    splits = {s: world.generate(n, args.world_seed, s)
              for s, n in (("train", args.n_probe_train), ("val", args.n_val), ("test", args.n_test))}
    tasks = {s: world.zeroshot_tasks(splits[s]) for s in ("val", "test")}
    labels = {s: world.probe_labels(splits[s]) for s in splits}
    results, t = {}, None
    for name, ckpt in zip(args.name, args.pretrained):
        lm = load_model(args.model, ckpt)
        if t is None:  # one --model for every checkpoint: the same transform and tokenizer, prepared once
            t = {s: prepare_pairs(splits[s].images, splits[s].captions, lm) for s in splits}
        r = evaluate_model(lm, {"val": t["val"], "test": t["test"]}, tasks, labels, t["train"],
                           EvalConfig(device=args.device))
        results[name] = {**r["test"], "val": r["val"], "checkpoint": ckpt}
    results["meta"] = {"model": args.model, "world_seed": args.world_seed, "reported_split": "test"}
    save_json(Path(args.out), results)
    print(f"wrote {args.out}")


def cmd_report(args) -> None:
    from .report import write_report

    with open(args.results) as f:
        results = json.load(f)
    out = write_report(Path(args.out), results)
    print(f"wrote {out}")


def _add_world(p: argparse.ArgumentParser, model=True) -> None:
    p.add_argument("--data", default="world", help="dataset: 'world' (the built-in world)")
    p.add_argument("--n-train", type=int, default=20000, help="pairs in the built-in world's training split")
    p.add_argument("--world-seed", type=int, default=0)
    if model:
        p.add_argument("--model", default="helip-tiny-vit", help="OpenCLIP model name or JSON model config path")
        p.add_argument("--pretrained", default=None, help="checkpoint file or OpenCLIP pretrained tag")
    p.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="helip", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="whole pipeline on the built-in world")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small, fast run (for tests)")
    p.add_argument("--cache-dir", default=None, help="where the pretrained starting model is cached")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pretrain", help="train the demo's starting model from scratch on the built-in world")
    _add_world(p)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("embed", help="encode every pair with the model's two towers")
    _add_world(p)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=512)
    p.set_defaults(func=cmd_embed)

    from .mining import MODES, MineConfig
    from .mining.score import METHODS

    m = MineConfig()
    p = sub.add_parser("mine", help="mine hard pairs from an embeddings directory")
    p.add_argument("--embeddings", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=m.k)
    p.add_argument("--mode", default=m.mode, choices=MODES)
    p.add_argument("--method", default=m.method, choices=METHODS)
    p.add_argument("--dup-threshold", type=float, default=m.dup_threshold)
    p.add_argument("--min-similarity", type=float, default=m.min_similarity)
    p.add_argument("--block-size", type=int, default=m.block_size)
    p.add_argument("--device", default=m.device)
    p.add_argument("--seed", type=int, default=m.seed)
    p.add_argument("--candidates", type=int, default=m.candidates, help="subset mode: random candidate pool size")
    p.add_argument("--redraw-every", type=int, default=m.redraw_every, help="subset mode: targets per pool")
    p.add_argument("--nlist", type=int, default=m.nlist, help="ann mode: k-means cells (0: about 2 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=m.nprobe, help="ann mode: cells searched per target's cell")
    p.add_argument("--recall-sample", type=int, default=m.recall_sample, help="targets checked against exact")
    p.add_argument("--chunk-size", type=int, default=m.chunk_size, help="targets per resumable chunk")
    p.add_argument("--csv", default=None, help="also write the authors' CSV format here")
    p.set_defaults(func=cmd_mine)

    from .train import FREEZE, PRECISIONS, TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="continue training with hard-pair batches and HNML")
    _add_world(p)
    p.add_argument("--out", required=True)
    p.add_argument("--hard-pairs", default=None, help="hard-pairs directory; omit for random batches")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--hard-per-target", type=int, default=d.hard_per_target)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--hnml-weight", type=float, default=d.hnml_weight)
    p.add_argument("--hnml-margin", type=float, default=d.hnml_margin)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between JSONL log records")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="AMP on CUDA (auto: bf16 where supported); fp32 on CPU whatever is asked")
    p.add_argument("--accum-steps", type=int, default=d.accum_steps,
                   help="micro-batches per optimiser step; the losses see them as one batch (feature caching)")
    p.add_argument("--freeze", default=None, choices=FREEZE, help="keep this tower's weights as loaded")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    p.add_argument("--save-every", type=int, default=d.save_every,
                   help="resumable checkpoint every N steps in OUT/checkpoints (0: only the final one)")
    p.add_argument("--resume", default=None,
                   help="'auto': continue from the latest checkpoint in --out (fresh start if none); or a path")
    p.add_argument("--local-loss", action="store_true", help="OpenCLIP ClipLoss local_loss (multi-GPU)")
    p.add_argument("--gather-with-grad", action="store_true", help="OpenCLIP ClipLoss gather_with_grad (multi-GPU)")
    p.add_argument("--grad-clip-norm", type=float, default=None)
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars (needs tensorboard)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="zero-shot, linear probe and retrieval on the built-in world")
    p.add_argument("--model", default="helip-tiny-vit")
    p.add_argument("--pretrained", action="append", required=True, help="checkpoint (repeat for several)")
    p.add_argument("--name", action="append", required=True, help="variant name per checkpoint")
    p.add_argument("--out", required=True, help="results.json path")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--n-probe-train", type=int, default=5000)
    p.add_argument("--n-val", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=3000)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="results.json -> report.html with plots")
    p.add_argument("--results", required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_report)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        args.func(args)
    except HelipError as e:
        print(f"helip {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
