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

from ..errors import ConfigError, exit_status
from . import worlds  # noqa: F401  (registers the synthetic worlds as --data world)

log = logging.getLogger("helip")
DEVICE_HELP = "cpu, cuda, cuda:N, or auto (default: cuda when present, else cpu)"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("helip").setLevel(logging.DEBUG if verbose else logging.INFO)


def _training_data(args, hard_pairs: Optional[str] = None):
    """Every ``--data`` form (world, CSV/TSV, JSONL, shards) through one path: ``(dataset, hard pairs)``.

    Pairs are read lazily with the model's OpenCLIP transform and tokenizer, and
    unusable ones (empty captions, images ``helip embed`` could not read) are
    left out of sampling (``helip.data.training``). The hard pairs are checked
    against the dataset's fingerprint before any expensive work.
    """
    from ..data.sources import data_config_from_args, open_pairs
    from ..data.training import build_training_data
    from ..mining import load_hard_pairs
    from ..models import load_model

    source = open_pairs(data_config_from_args(args), progress=False)
    hard = load_hard_pairs(Path(hard_pairs), source.fingerprint()) if hard_pairs else None
    lm = load_model(args.model, args.pretrained, device="cpu")  # only for its transform and tokenizer
    data = build_training_data(source, lm.preprocess, lm.tokenizer, hard, getattr(args, "max_bad_fraction", 0.01))
    return data.dataset, data.hard


def cmd_demo(args) -> None:
    from .demo import run_demo

    results = run_demo(Path(args.out), seed=args.seed, quick=args.quick,
                       cache_dir=Path(args.cache_dir) if args.cache_dir else None, objective=args.objective,
                       world=args.world)
    for v in ("pretrained", "baseline", "helip"):
        r = results[v]
        print(f"{v:>10}: zero-shot mean {100 * r['zeroshot_mean']:.1f}  linear probe {100 * r['linear_probe']:.1f}"
              f"  i2t R@1 {100 * r['retrieval']['i2t_r1']:.1f}  t2i R@1 {100 * r['retrieval']['t2i_r1']:.1f}")
    gain = {k: 100 * (results["helip"][k] - results["baseline"][k]) for k in ("zeroshot_mean", "linear_probe")}
    print(f"helip - baseline: zero-shot mean {gain['zeroshot_mean']:+.1f} points, "
          f"linear probe {gain['linear_probe']:+.1f} points")
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'report.html'}")


def cmd_pretrain(args) -> None:
    from ..training import TrainConfig, train

    args.pretrained = None
    pairs, _ = _training_data(args)
    cfg = TrainConfig(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      warmup_steps=args.warmup_steps, seed=args.seed, hard_per_target=0, device=args.device)
    res = train(cfg, pairs, Path(args.out))
    print(f"wrote {res.checkpoint}")


def cmd_embed(args) -> None:
    import os

    from ..data.sources import data_config_from_args, open_pairs
    from ..embed import EmbedConfig, build_encoders, embed_source
    from ..models import load_model

    from ..training.distributed import auto_device

    args.device = auto_device(args.device)
    need_model = not (args.text_encoder and args.image_encoder)
    if need_model and not args.model:
        raise ConfigError("pass --model: the OpenCLIP model name or JSON config whose towers encode the pairs "
                          "(e.g. --model ViT-B-32 --pretrained laion2b_s34b_b79k), or both --text-encoder and "
                          "--image-encoder.")
    cfg = EmbedConfig(batch_size=args.batch_size, device=args.device, dtype=args.dtype, chunk_size=args.chunk_size,
                      workers=args.workers, max_bad_fraction=args.max_bad_fraction, progress=not args.no_progress)
    cfg.validate()
    rank = _init_distributed(args.device)
    if args.device == "cuda" and "LOCAL_RANK" in os.environ:
        cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
    source = open_pairs(data_config_from_args(args), progress=cfg.progress)  # bad --data fails before the model loads
    lm = load_model(args.model, args.pretrained, device=cfg.device) if need_model else None
    encoders = build_encoders(lm, cfg.device, text_encoder=args.text_encoder, image_encoder=args.image_encoder,
                              image_encoder_weights=args.image_encoder_weights, pretrained=args.pretrained)
    out = embed_source(source, encoders, Path(args.out), cfg)
    if rank == 0:
        meta = json.loads((out / "meta.json").read_text())
        sk = meta["skipped"]
        print(f"wrote {out} ({meta['n']} pairs, {sk['count']} skipped: {sk['empty_caption']} empty captions, "
              f"{sk['unreadable_image']} unreadable images; listed in {out / 'skipped.json'})")


def cmd_mine(args) -> None:
    from ..embed import load_embeddings, load_skipped
    from ..mining import MineConfig, mine_hard_pairs, write_csv

    from ..training.distributed import auto_device

    args.device = auto_device(args.device)
    img, txt, meta = load_embeddings(Path(args.embeddings))
    skipped = load_skipped(Path(args.embeddings))  # unusable pairs: never targets, never hard pairs
    cfg = MineConfig(**{name: getattr(args, name) for name in MineConfig.__dataclass_fields__ if hasattr(args, name)})
    rank = _init_distributed(args.device)
    extra = {"fingerprint": meta.get("fingerprint"), "embeddings": str(Path(args.embeddings).resolve())}
    hard = mine_hard_pairs(img, txt, cfg, out_dir=Path(args.out), extra_meta=extra, exclude=skipped)
    if rank != 0:
        return
    if args.csv:
        write_csv(Path(args.csv), hard)
    recall = hard.meta.get("recall_estimate")
    recall = f", estimated recall@{hard.k} {recall['recall_at_k']:.4f}" if recall else ""
    print(f"wrote {args.out} ({len(hard)} targets, k={hard.k}, mode {hard.meta['mode']}, "
          f"{hard.meta['padded_rows']} rows padded with -1{recall}, {hard.meta['timings']['mine_seconds']:.1f}s)")


def _init_distributed(device: str) -> int:
    """Join the torchrun process group when launched by torchrun; return this process's rank."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.startswith("cuda"):  # one GPU per process: "cuda" means this rank's own
            import torch
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank() if dist.is_initialized() else 0


def cmd_train(args) -> None:
    from ..slip import SlipConfig
    from ..training import TrainConfig, check_fresh_out_dir, steps_for_epochs, train
    from ..training.distributed import auto_device, dist_info

    if args.resume is None:
        check_fresh_out_dir(Path(args.out))
    args.device = auto_device(args.device)
    _init_distributed(args.device)
    pairs, hard = _training_data(args, args.hard_pairs)
    steps = args.steps if args.steps is not None else steps_for_epochs(
        len(pairs), args.epochs, args.batch_size, args.accum_steps, dist_info().world_size)
    cfg = TrainConfig(model=args.model, pretrained=args.pretrained, steps=steps, batch_size=args.batch_size,
                      lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed,
                      hard_per_target=args.hard_per_target if hard is not None else 0, top_k=args.top_k,
                      hnml_weight=args.hnml_weight if hard is not None else 0.0, hnml_margin=args.hnml_margin,
                      hard_temperature=args.hard_temperature,
                      hard_temperature_mode=args.hard_temperature_mode, remine_every=args.remine_every,
                      hard_fraction=args.hard_fraction, device=args.device, objective=args.objective,
                      slip=SlipConfig(ssl_scale=args.ssl_scale, ssl_temperature=args.ssl_temperature,
                                      head=args.slip_head, mlp_dim=args.simclr_mlp_dim, out_dim=args.simclr_out_dim),
                      weight_decay=args.weight_decay, log_every=args.log_every,
                      precision=args.precision, accum_steps=args.accum_steps, freeze=args.freeze,
                      workers=args.workers, save_every=args.save_every, resume=args.resume,
                      local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                      grad_clip_norm=args.grad_clip_norm, tensorboard=args.tensorboard,
                      interpolate=args.interpolate)
    res = train(cfg, pairs, Path(args.out), hard)
    import torch.distributed as dist

    if dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return
    resumed = f" (resumed from step {res.resumed_from})" if res.resumed_from is not None else ""
    print(f"wrote {res.checkpoint}{resumed}")


def cmd_convert_slip(args) -> None:
    from ..slip import convert_slip_checkpoint

    r = convert_slip_checkpoint(Path(args.input), Path(args.output), size=args.size, model=args.model,
                                trust=args.trust_checkpoint)
    head = f" and {r.head}" if r.head else " (no SimCLR head: a CLIP checkpoint)"
    print(f"wrote {r.checkpoint}{head}; use --model {r.model_name} --pretrained {r.checkpoint}")


def cmd_eval(args) -> None:
    from .eval_command import eval_from_args

    out = eval_from_args(args)
    print(f"wrote {out}")


def cmd_report(args) -> None:
    from ..io import load_json
    from .report import is_benchmark, merge_results, write_benchmark_report, write_report

    items = [(Path(r).stem if Path(r).stem != "results" else Path(r).parent.name or f"r{i}",
              load_json(r, "--results")) for i, r in enumerate(args.results)]
    results = merge_results(items)
    if is_benchmark(results):
        out = write_benchmark_report(Path(args.out), results, args.baseline)
    else:
        out = write_report(Path(args.out), results)
    print(f"wrote {out}")


WORLD_HELP = "which synthetic world of the family: builtin (default), w1 ... w7 (docs/worlds.md)"


def _add_world(p: argparse.ArgumentParser, model=True) -> None:
    from .demo import DemoConfig

    p.add_argument("--data", default="world", help="dataset: 'world' (the built-in world)")
    p.add_argument("--n-train", type=int, default=20000, help="pairs in the built-in world's training split")
    p.add_argument("--world-seed", type=int, default=0, help="sample seed inside the world")
    p.add_argument("--world", default="builtin", help=WORLD_HELP)
    if model:
        p.add_argument("--model", default=DemoConfig().pretrain.model,
                       help="OpenCLIP model name or JSON model config path (default: the demo's)")
        p.add_argument("--pretrained", default=None, help="checkpoint file or OpenCLIP pretrained tag")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


class _UsageError(Exception):
    def __init__(self, prog: str, message: str):
        super().__init__(f"{prog}: error: {message} (see `{prog} --help`)")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (no usage block), exit status 2 like every user error."""

    def error(self, message: str):
        raise _UsageError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="helip", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="whole pipeline on the built-in world")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small, fast run (for tests)")
    p.add_argument("--cache-dir", default=None, help="where the pretrained starting model is cached")
    p.add_argument("--objective", default="clip", choices=("clip", "slip"),
                   help="train the demo's models with CLIP's loss or SLIP's (CLIP + SimCLR)")
    p.add_argument("--world", default="builtin", help=WORLD_HELP)
    p.set_defaults(func=cmd_demo)

    from .demo import DemoConfig

    dp = DemoConfig().pretrain  # the demo's own values
    p = sub.add_parser("pretrain", help="train the demo's starting model from scratch on the built-in world")
    _add_world(p)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=dp.steps)
    p.add_argument("--batch-size", type=int, default=dp.batch_size)
    p.add_argument("--lr", type=float, default=dp.lr)
    p.add_argument("--warmup-steps", type=int, default=dp.warmup_steps)
    p.add_argument("--seed", type=int, default=dp.seed)
    p.set_defaults(func=cmd_pretrain)

    from ..data.sources import add_data_arguments
    from ..embed import EmbedConfig

    e = EmbedConfig()
    p = sub.add_parser("embed", help="encode every pair with the model's two towers (or external encoders)")
    add_data_arguments(p)
    p.add_argument("--model", default=None, help="OpenCLIP model name or JSON model config path, e.g. ViT-B-32 "
                                                 "(required unless both external encoders are given)")
    p.add_argument("--pretrained", default=None,
                   help="checkpoint file (OpenCLIP or open_clip_train epoch_N.pt) or OpenCLIP pretrained tag")
    p.add_argument("--text-encoder", default=None, help="sentence-transformers model (path or name) as text tower")
    p.add_argument("--image-encoder", default=None, help="timm model name as image tower")
    p.add_argument("--image-encoder-weights", default="hub",
                   help="timm weights: 'hub' (timm's pretrained, downloaded), 'none' (random init) or a file")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=e.batch_size)
    p.add_argument("--chunk-size", type=int, default=e.chunk_size, help="pairs per resumable chunk")
    p.add_argument("--workers", type=int, default=e.workers, help="DataLoader processes decoding images")
    p.add_argument("--dtype", default=e.dtype, choices=("float16", "float32"))
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_embed)

    from ..mining import MODES, MineConfig
    from ..mining.score import METHODS

    m = MineConfig()
    p = sub.add_parser("mine", help="mine hard pairs from an embeddings directory")
    p.add_argument("--embeddings", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=m.k)
    p.add_argument("--mode", default=m.mode, choices=MODES,
                   help="auto: exact search, or ANN where it reaches --target-recall faster (see docs/mining.md)")
    p.add_argument("--method", default=m.method, choices=METHODS)
    p.add_argument("--dup-threshold", type=float, default=m.dup_threshold)
    p.add_argument("--min-similarity", type=float, default=m.min_similarity)
    p.add_argument("--block-size", type=int, default=m.block_size)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--precision", default=m.precision, choices=("auto", "fp32", "fp16", "bf16"),
                   help="exact mode's similarity matmuls; low precision is re-scored in fp32 and certified "
                        "exact (auto: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=m.seed)
    p.add_argument("--candidates", type=int, default=m.candidates, help="subset mode: random candidate pool size")
    p.add_argument("--redraw-every", type=int, default=m.redraw_every, help="subset mode: targets per pool")
    p.add_argument("--nlist", type=int, default=m.nlist, help="ann mode: k-means cells (0: about 2 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=m.nprobe,
                   help="ann mode: cells nearest each target whose members it is scored against (0: the fewest "
                        "whose recall reaches --target-recall, measured on a sample)")
    p.add_argument("--target-recall", type=float, default=m.target_recall,
                   help="auto and ann modes: recall@k whose 95%% lower confidence bound ANN must reach, else "
                        "exact search runs")
    p.add_argument("--tune-sample", type=int, default=m.tune_sample,
                   help="auto and ann modes: targets searched exactly to choose the operating point")
    p.add_argument("--recall-sample", type=int, default=m.recall_sample, help="targets checked against exact")
    p.add_argument("--chunk-size", type=int, default=m.chunk_size, help="targets per resumable chunk")
    p.add_argument("--csv", default=None, help="also write the authors' CSV format here")
    p.set_defaults(func=cmd_mine)

    from ..sampler import TEMPERATURE_MODES
    from ..training import FREEZE, PRECISIONS, TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="continue training with hard-pair batches and HNML")
    add_data_arguments(p)
    p.add_argument("--model", required=True, help="OpenCLIP model name or JSON model config path, e.g. ViT-B-32")
    p.add_argument("--pretrained", default=None, help="checkpoint file or OpenCLIP pretrained tag")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--out", required=True)
    p.add_argument("--hard-pairs", default=None, help="hard-pairs directory; omit for random batches")
    p.add_argument("--epochs", type=float, default=2.0,
                   help="length of training in epochs of image-text pairs seen (default %(default)s): "
                        "epochs x pairs / (batch size x accum steps x ranks) steps, the same for random "
                        "batches and hard-pair batches (a HELIP batch of B holds B/2 targets and B/2 "
                        "partners, so one epoch does not make every pair a target)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps; overrides --epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr,
                   help="peak learning rate (default %(default)s: continued training of a pretrained checkpoint; "
                        "a model trained from scratch, like the demo's, wants far more, e.g. 1e-3)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--hard-per-target", type=int, default=d.hard_per_target)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--hnml-weight", type=float, default=d.hnml_weight)
    p.add_argument("--hnml-margin", type=float, default=d.hnml_margin)
    p.add_argument("--hard-fraction", type=float, default=d.hard_fraction,
                   help="share of each batch in target+hard-partner groups; the rest are random targets")
    p.add_argument("--hard-temperature", type=float, default=d.hard_temperature,
                   help="draw partners by mining score over the top-k (0: uniformly): "
                        "P ~ exp((s - s_1) / (T * unit)), the unit set by --hard-temperature-mode "
                        "(default %(default)s)")
    p.add_argument("--hard-temperature-mode", default=d.hard_temperature_mode, choices=TEMPERATURE_MODES,
                   help="relative: unit = the median over targets of their top-k score spread s_1 - s_k "
                        "(scale-free, default); per_target: each target's own spread; absolute: score units")
    p.add_argument("--remine-every", type=int, default=d.remine_every,
                   help="re-mine the hard pairs with the current model every N epochs, with the options that "
                        "mined them (0: never); results in OUT/remined/epoch_N")
    p.add_argument("--objective", default=d.objective, choices=("clip", "slip"),
                   help="slip: add SLIP's SimCLR loss on two augmented views (SLIP models)")
    p.add_argument("--ssl-scale", type=float, default=d.slip.ssl_scale, help="slip: weight of the SimCLR loss")
    p.add_argument("--ssl-temperature", type=float, default=d.slip.ssl_temperature, help="slip: SimCLR temperature")
    p.add_argument("--slip-head", default=None,
                   help="slip: SimCLR head file (default: simclr_head.pt beside --pretrained, else a fresh head)")
    p.add_argument("--simclr-mlp-dim", type=int, default=d.slip.mlp_dim, help="slip: hidden width of a fresh head")
    p.add_argument("--simclr-out-dim", type=int, default=d.slip.out_dim, help="slip: output width of a fresh head")
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
    p.add_argument("--interpolate", type=float, default=d.interpolate, metavar="A",
                   help="write model.pt = start + A x (trained - start), a weight-space ensemble with the starting "
                        "model (WiSE-FT); checkpoints keep the trained weights (default %(default)s: no mixing)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars (needs tensorboard)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert-slip", help="convert a facebookresearch/SLIP checkpoint to OpenCLIP + SimCLR head")
    p.add_argument("input", help="SLIP checkpoint (.pt), e.g. slip_base_cc3m_40ep.pt")
    p.add_argument("output", help="output directory: model.pt, simclr_head.pt, slip_meta.json")
    p.add_argument("--size", default=None, help="S, B or L (default: the checkpoint's args.model)")
    p.add_argument("--model", default=None, help="convert into this OpenCLIP config instead (a SLIP variant)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle arbitrary objects in the checkpoint (only for files you trust)")
    p.set_defaults(func=cmd_convert_slip)

    from .eval_command import add_eval_arguments

    p = sub.add_parser("eval", help="zero-shot, linear probe and retrieval: benchmark datasets or the built-in world")
    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="results.json files -> report.html with a comparison table and plots")
    p.add_argument("--results", required=True, action="append", help="results.json (repeat to compare several)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--baseline", default=None, help="variant the 'before vs after' plot compares against "
                                                      "(default: the first)")
    p.set_defaults(func=cmd_report)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    from .validate import precheck

    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        print(e, file=sys.stderr)
        return 2
    _setup_logging(args.verbose)

    def command(args) -> None:
        precheck(args)  # output paths, option values: before any heavy work
        args.func(args)
    return exit_status(f"helip {args.command}", command, args)


if __name__ == "__main__":
    sys.exit(main())
