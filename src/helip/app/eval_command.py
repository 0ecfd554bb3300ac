"""The `helip eval` command: flags -> models and datasets -> one results.json.

With ``--zeroshot``/``--linear-probe``/``--retrieval`` it evaluates benchmark
datasets on disk (:mod:`helip.evaluate.suite`); without them, the built-in world (what the
demo reports), as before.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

from ..errors import ConfigError, InputError
from ..io import save_json
from ..evaluate.features import FeatureConfig
from ..evaluate.linear_probe import ProbeConfig
from ..evaluate.suite import DatasetSpec, ModelSpec, SuiteConfig, default_variant_name, parse_named, run_suite


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    d, pc = SuiteConfig(), ProbeConfig()
    g = p.add_argument_group("models (give --pretrained once per checkpoint)")
    g.add_argument("--model", action="append", default=None,
                   help="OpenCLIP model name or JSON config (e.g. ViT-B-32; helip-tiny-vit for the demo's "
                        "checkpoints); once for all checkpoints or once per --pretrained")
    g.add_argument("--pretrained", action="append", default=None,
                   help="checkpoint file or OpenCLIP pretrained tag (repeat for several)")
    g.add_argument("--name", action="append", default=None, help="variant name per --pretrained (default: derived)")
    g.add_argument("--checkpoints", default=None,
                   help="file with one 'NAME MODEL PRETRAINED' line per checkpoint (instead of the flags above)")
    g = p.add_argument_group("benchmark datasets (repeatable; without any, the built-in world is evaluated)")
    g.add_argument("--zeroshot", action="append", default=[], metavar="NAME=PATH",
                   help="image folder (one sub-folder per class) or CLIP_benchmark WebDataset dir; "
                        "imagenet=PATH uses the built-in ImageNet-1k class names and 80 CLIP templates")
    g.add_argument("--zeroshot-classnames", action="append", default=[], metavar="NAME=FILE",
                   help="class names, one per line in label order (default: classnames.txt beside the data)")
    g.add_argument("--zeroshot-templates", action="append", default=[], metavar="NAME=FILE|openai|simple",
                   help="prompt templates with '{}' (default: zeroshot_classification_templates.txt beside the data)")
    g.add_argument("--linear-probe", action="append", default=[], metavar="NAME=DIR",
                   help="DIR/train, DIR/test and optional DIR/val, each an image folder or WebDataset split")
    g.add_argument("--retrieval", action="append", default=[], metavar="NAME=PATH",
                   help="caption set: CSV/TSV/JSONL file or WebDataset dir, several captions per image")
    g.add_argument("--split", default=d.split, help="WebDataset split to read for zero-shot and retrieval")
    g.add_argument("--cache-dir", default=None, help="feature cache (default $HELIP_CACHE/eval or ~/.cache/helip/eval)")
    g.add_argument("--no-cache", action="store_true", help="compute features without reading or writing the cache")
    g.add_argument("--batch-size", type=int, default=d.features.batch_size)
    g.add_argument("--workers", type=int, default=d.features.workers, help="image-decoding DataLoader workers")
    g.add_argument("--max-bad-fraction", type=float, default=d.max_bad_fraction,
                   help="fraction of a dataset's images allowed to fail decoding (skipped and counted)")
    g.add_argument("--probe-c-min", type=float, default=pc.c_min)
    g.add_argument("--probe-c-max", type=float, default=pc.c_max)
    g.add_argument("--probe-refine-steps", type=int, default=pc.refine_steps)
    g.add_argument("--probe-val-fraction", type=float, default=pc.val_fraction,
                   help="share of train held out for choosing C when a dataset has no val split")
    g.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("built-in world (when no benchmark dataset is given)")
    g.add_argument("--world-seed", type=int, default=0, help="sample seed inside the world")
    g.add_argument("--world", default="builtin", help="which world of the family: builtin (default), w1 ... w7")
    g.add_argument("--n-probe-train", type=int, default=5000)
    g.add_argument("--n-val", type=int, default=2000)
    g.add_argument("--n-test", type=int, default=3000)
    p.add_argument("--out", required=True, help="results.json path")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default: cuda when present, else cpu)")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible; use --device cpu.")
    return device


def model_specs(args) -> List[ModelSpec]:
    if args.checkpoints:
        if args.pretrained or args.name:
            raise ConfigError("give checkpoints either with --checkpoints FILE or with --pretrained, not both.")
        path = Path(args.checkpoints)
        if not path.is_file():
            raise InputError(f"--checkpoints {path} does not exist.")
        specs = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 3:
                raise InputError(f"{path} line {n}: write 'NAME MODEL PRETRAINED' (three fields), got {line!r}.")
            specs.append(ModelSpec(model=parts[1], pretrained=parts[2], name=parts[0]))
        if not specs:
            raise InputError(f"{path} lists no checkpoint.")
        return specs
    pretrained = args.pretrained or []
    if not pretrained:
        raise ConfigError("give at least one --pretrained checkpoint (or --checkpoints FILE).")
    if not args.model:
        raise ConfigError("give --model: the OpenCLIP model name or JSON config of the checkpoints (e.g. ViT-B-32; "
                          "helip-tiny-vit for the demo's), once for all or once per --pretrained.")
    models = args.model
    if len(models) == 1:
        models = models * len(pretrained)
    if len(models) != len(pretrained):
        raise ConfigError(f"{len(models)} --model for {len(pretrained)} --pretrained: give one --model for all "
                          f"checkpoints or one per --pretrained.")
    names = args.name or [default_variant_name(m, p) for m, p in zip(models, pretrained)]
    if len(names) != len(pretrained):
        raise ConfigError("give one --name per --pretrained checkpoint (or none).")
    return [ModelSpec(m, p, n) for m, p, n in zip(models, pretrained, names)]


def dataset_specs(args) -> List[DatasetSpec]:
    specs = [DatasetSpec("zeroshot", n, Path(p)) for n, p in parse_named(args.zeroshot, "--zeroshot")]
    known = {s.name for s in specs}
    for flag, attr in (("--zeroshot-classnames", "classnames"), ("--zeroshot-templates", "templates")):
        for n, v in parse_named(getattr(args, f"zeroshot_{attr}"), flag):
            if n not in known:
                raise ConfigError(f"{flag} {n}=...: no --zeroshot {n}=PATH to apply it to.")
            setattr(next(s for s in specs if s.name == n), attr, v)
    specs += [DatasetSpec("linear_probe", n, Path(p)) for n, p in parse_named(args.linear_probe, "--linear-probe")]
    specs += [DatasetSpec("retrieval", n, Path(p)) for n, p in parse_named(args.retrieval, "--retrieval")]
    return specs


def eval_world(models: List[ModelSpec], args, device: str) -> dict:
    """The built-in world's val and test splits, as ``helip demo`` evaluates them."""
    from .worlds import EvalConfig, evaluate_model, get_world
    from ..data.pairs import prepare_pairs
    from ..models import load_model

    world = get_world(args.world)
    splits = {s: world.generate(n, args.world_seed, s)
              for s, n in (("train", args.n_probe_train), ("val", args.n_val), ("test", args.n_test))}
    tasks = {s: world.zeroshot_tasks(splits[s]) for s in ("val", "test")}
    labels = {s: world.probe_labels(splits[s]) for s in splits}
    results, prepared = {}, {}
    for ms in models:
        lm = load_model(ms.model, ms.pretrained)
        key = (ms.model, repr(lm.preprocess))  # same transform and tokenizer: prepare the pixels once
        if key not in prepared:
            prepared[key] = {s: prepare_pairs(splits[s].images, splits[s].captions, lm) for s in splits}
        t = prepared[key]
        r = evaluate_model(lm, {"val": t["val"], "test": t["test"]}, tasks, labels, t["train"],
                           EvalConfig(device=device))
        results[ms.name] = {**r["test"], "val": r["val"], "checkpoint": ms.pretrained, "model": ms.model}
    results["meta"] = {"model": models[0].model, "world": world.name, "world_seed": args.world_seed,
                       "reported_split": "test"}
    return results


def eval_from_args(args) -> Path:
    models = model_specs(args)
    device = resolve_device(args.device)
    specs = dataset_specs(args)
    out = Path(args.out)
    if not specs:
        save_json(out, eval_world(models, args, device))
        return out
    from .demo import default_cache_dir

    cache: Optional[Path] = None if args.no_cache else Path(args.cache_dir or default_cache_dir() / "eval")
    cfg = SuiteConfig(
        features=FeatureConfig(batch_size=args.batch_size, workers=args.workers, device=device,
                               progress=not args.no_progress, cache_dir=cache),
        probe=ProbeConfig(c_min=args.probe_c_min, c_max=args.probe_c_max, refine_steps=args.probe_refine_steps,
                          val_fraction=args.probe_val_fraction),
        split=args.split, max_bad_fraction=args.max_bad_fraction)
    run_suite(models, specs, cfg, out)
    return out
