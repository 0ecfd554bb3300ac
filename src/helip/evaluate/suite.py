"""`helip eval` on benchmark datasets: any mix of zero-shot, linear probe and retrieval, for several models.

Datasets are opened and checked (layouts, class names against class folders,
templates) before any model is loaded, so a bad flag fails in a second, not
after an hour of encoding. Features come from :mod:`.features` (cached).
Images that do not decode are skipped and counted per dataset; past
``max_bad_fraction`` of a dataset the run stops with an error instead of
reporting a number computed on what is left.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError, InputError
from ..io import save_json
from ..models import load_model
from .datasets import ClassificationSet, ImageSet, open_classification, open_retrieval
from .features import FeatureCache, FeatureConfig, ImageFeatures, encode_images, encode_texts, model_identity, \
    zeroshot_weights
from .linear_probe import ProbeConfig, fit_linear_probe, holdout_split
from .metrics import classification_metrics, retrieval_metrics
from .prompts import resolve_prompts

log = logging.getLogger(__name__)

RESULTS_FORMAT = "helip-eval/benchmarks-1"
TASKS = ("zeroshot", "linear_probe", "retrieval")


@dataclass
class DatasetSpec:
    """One dataset of one task; ``classnames``/``templates`` (zero-shot only) override files beside the data."""

    task: str
    name: str
    path: Path
    classnames: Optional[str] = None
    templates: Optional[str] = None


@dataclass
class ModelSpec:
    model: str
    pretrained: Optional[str]
    name: str


@dataclass
class SuiteConfig:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    split: str = "test"                 # WebDataset split read for zero-shot and retrieval
    recall_ks: Sequence[int] = (1, 5, 10)
    max_bad_fraction: float = 0.01      # of a dataset's images that may fail to decode (skipped, counted)


def parse_named(values: Sequence[str], flag: str) -> List[Tuple[str, str]]:
    """``NAME=VALUE`` pairs of a repeated flag."""
    out = []
    for v in values or ():
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            raise ConfigError(f"{flag} {v!r}: write NAME=PATH, e.g. {flag} imagenet=/data/imagenet/val.")
        out.append((name, rest))
    names = [n for n, _ in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{flag}: dataset name(s) {', '.join(sorted(dup))} given twice; names must be unique.")
    return out


def default_variant_name(model: str, pretrained: Optional[str]) -> str:
    if pretrained is None:
        return f"{model}/random-init"
    p = Path(pretrained)
    if p.suffix in (".pt", ".pth", ".bin", ".safetensors") or "/" in pretrained:
        generic = p.stem in ("model", "checkpoint", "open_clip_pytorch_model", "epoch_latest")
        return p.parent.name if generic and p.parent.name else p.stem
    return f"{model}/{pretrained}"


# ---------------------------------------------------------------------------- preparing datasets


@dataclass
class _ZeroShot:
    spec: DatasetSpec
    data: ClassificationSet
    prompts: dict


@dataclass
class _Probe:
    spec: DatasetSpec
    splits: Dict[str, ClassificationSet]   # train, test, and val when the dataset has one


@dataclass
class _Retrieval:
    spec: DatasetSpec
    images: ImageSet


def prepare_zeroshot(spec: DatasetSpec, split: str) -> _ZeroShot:
    data = open_classification(spec.path, split)
    prompts = resolve_prompts(spec.name, data.meta_dirs, spec.classnames, spec.templates,
                              fallback_classnames=[c.replace("_", " ") for c in data.folder_classes]
                              if data.folder_classes else None)
    if data.folder_classes is not None and len(prompts["classnames"]) != len(data.folder_classes):
        raise InputError(f"zero-shot {spec.name}: {prompts['classnames_source']} has {len(prompts['classnames'])} "
                         f"class names but {spec.path} has {len(data.folder_classes)} class folders; give one name "
                         f"per folder, in sorted folder order.")
    if data.folder_classes is not None:
        norm = [c.replace("_", " ").lower() for c in data.folder_classes]
        given = [c.replace("_", " ").lower() for c in prompts["classnames"]]
        if sorted(norm) == sorted(given) and norm != given:
            raise InputError(f"zero-shot {spec.name}: {prompts['classnames_source']} names the class folders in "
                             f"another order than the sorted folders, which define the labels; list them sorted "
                             f"({', '.join(data.folder_classes[:3])}, ...).")
    return _ZeroShot(spec, data, prompts)


def prepare_probe(spec: DatasetSpec) -> _Probe:
    root = Path(spec.path)
    splits = {}
    for s in ("train", "val", "test"):
        if (root / s).is_dir():
            splits[s] = open_classification(root / s, s)
    missing = [s for s in ("train", "test") if s not in splits]
    if missing:
        raise InputError(f"linear probe {spec.name}: {root} needs train/ and test/ (and optionally val/) "
                         f"sub-directories; {' and '.join(missing)} missing.")
    folders = {s: d.folder_classes for s, d in splits.items() if d.folder_classes is not None}
    if len({tuple(v) for v in folders.values()}) > 1:
        raise InputError(f"linear probe {spec.name}: the class folders of {', '.join(folders)} differ; every split "
                         f"needs the same class sub-folders so labels mean the same class.")
    return _Probe(spec, splits)


def prepare(specs: Sequence[DatasetSpec], split: str) -> list:
    out = []
    for spec in specs:
        if spec.task == "zeroshot":
            out.append(prepare_zeroshot(spec, split))
        elif spec.task == "linear_probe":
            out.append(prepare_probe(spec))
        elif spec.task == "retrieval":
            out.append(_Retrieval(spec, open_retrieval(spec.path, split)))
        else:
            raise ConfigError(f"unknown evaluation task {spec.task!r}; one of {', '.join(TASKS)}.")
    return out


# ---------------------------------------------------------------------------- running


def _check_failures(f: ImageFeatures, what: str, max_fraction: float) -> None:
    n, bad = len(f.ok), f.n_failed
    if bad == 0:
        return
    if bad > max_fraction * n:
        raise InputError(f"{what}: {bad} of {n} images do not decode (first: {f.errors[0]}); repair or remove them, "
                         f"or let them be skipped and counted with --max-bad-fraction {bad / n:.3g}.")
    log.warning("%s: skipped %d of %d images that do not decode (first: %s)", what, bad, n, f.errors[0])


def _labels(f: ImageFeatures, what: str, n_classes: Optional[int]) -> np.ndarray:
    try:
        y = np.asarray([int(a) for a in f.annotations], dtype=np.int64)
    except ValueError:
        bad = next(a for a in f.annotations if not a.lstrip("-").isdigit())
        raise InputError(f"{what}: label {bad!r} is not an integer class index (the '.cls' entry of each sample).")
    if len(y) and (y.min() < 0 or (n_classes is not None and y.max() >= n_classes)):
        i = int(np.argmax((y < 0) | (y >= (n_classes or 1 << 62))))
        raise InputError(f"{what}: image {f.names[i]} has label {y[i]} but there are {n_classes} class names; the "
                         f"class-name file must list one name per label 0..{y.max()}.")
    return y


def _encode(lm, mid, images: ImageSet, what: str, cfg: SuiteConfig, cache: FeatureCache) -> ImageFeatures:
    f = encode_images(lm, images, mid, cfg.features, cache, desc=what)
    _check_failures(f, what, cfg.max_bad_fraction)
    return f


def run_zeroshot(lm, mid, task: _ZeroShot, cfg: SuiteConfig, cache: FeatureCache) -> dict:
    what = f"zero-shot {task.spec.name}"
    f = _encode(lm, mid, task.data.images, what, cfg, cache)
    classnames, templates = task.prompts["classnames"], task.prompts["templates"]
    y = _labels(f, what, len(classnames))
    w = zeroshot_weights(lm, classnames, templates, mid, cfg.features, cache, desc=what)
    logits = torch.from_numpy(f.features[f.ok]) @ torch.from_numpy(w)
    m = classification_metrics(logits, torch.from_numpy(y[f.ok]), len(classnames))
    return {**m, "n_images": int(f.ok.sum()), "n_skipped": f.n_failed, "n_classes": len(classnames),
            "n_templates": len(templates)}


def run_probe(lm, mid, task: _Probe, cfg: SuiteConfig, cache: FeatureCache) -> dict:
    xs, ys, skipped = {}, {}, 0
    for s, data in task.splits.items():
        what = f"linear probe {task.spec.name} ({s})"
        f = _encode(lm, mid, data.images, what, cfg, cache)
        y = _labels(f, what, None)
        xs[s], ys[s] = f.features[f.ok], y[f.ok]
        skipped += f.n_failed
    if "val" in xs:
        tr_x, tr_y, va_x, va_y, val_from = xs["train"], ys["train"], xs["val"], ys["val"], "val split"
    else:
        tr, va = holdout_split(ys["train"], cfg.probe.val_fraction, cfg.probe.seed)
        if len(va) == 0:
            raise InputError(f"linear probe {task.spec.name}: too few training images to hold out a validation "
                             f"split; add a val/ split or more images per class.")
        tr_x, tr_y, va_x, va_y = xs["train"][tr], ys["train"][tr], xs["train"][va], ys["train"][va]
        val_from = f"{cfg.probe.val_fraction:g} of train (seed {cfg.probe.seed})"
    if len(np.unique(tr_y)) < 2:
        raise InputError(f"linear probe {task.spec.name}: the training split has fewer than 2 classes.")
    r = fit_linear_probe(tr_x, tr_y, va_x, va_y, xs["test"], ys["test"], cfg=cfg.probe)
    return {**r, "validation": val_from, "n_train": int(len(tr_y)), "n_val": int(len(va_y)),
            "n_test": int(len(ys["test"])), "n_skipped": skipped}


def run_retrieval(lm, mid, task: _Retrieval, cfg: SuiteConfig, cache: FeatureCache) -> dict:
    what = f"retrieval {task.spec.name}"
    f = _encode(lm, mid, task.images, what, cfg, cache)
    keep = np.flatnonzero(f.ok)
    captions, owner = [], []
    for new, i in enumerate(keep):
        caps = [c for c in f.annotations[i].splitlines() if c.strip()]
        if not caps:
            raise InputError(f"{what}: image {f.names[i]} has no caption.")
        captions += caps
        owner += [new] * len(caps)
    skipped_caps = sum(len(f.annotations[i].splitlines()) for i in np.flatnonzero(~f.ok))
    t = encode_texts(lm, captions, mid, cfg.features, cache, desc=what)
    m = retrieval_metrics(f.features[keep], t, np.asarray(owner), cfg.recall_ks, device=cfg.features.device)
    return {**m, "n_images": int(len(keep)), "n_captions": len(captions), "n_skipped": f.n_failed,
            "n_captions_skipped": skipped_caps}


def run_suite(models: Sequence[ModelSpec], specs: Sequence[DatasetSpec], cfg: Optional[SuiteConfig] = None,
              out: Optional[Path] = None) -> dict:
    """Evaluate every model on every dataset; write ``out`` (results.json) atomically when given."""
    cfg = cfg or SuiteConfig()
    if not specs:
        raise ConfigError("no dataset to evaluate on; pass --zeroshot, --linear-probe or --retrieval NAME=PATH.")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"variant names {names} are not unique; pass one distinct --name per --pretrained.")
    tasks = prepare(specs, cfg.split)
    cache = FeatureCache(cfg.features.cache_dir)
    results: Dict[str, dict] = {}
    for ms in models:
        lm = load_model(ms.model, ms.pretrained, device="cpu")
        mid = model_identity(lm)
        lm.model.to(cfg.features.device)
        r = {"model": ms.model, "pretrained": ms.pretrained, "weights_sha256": mid["weights_sha256"],
             "zeroshot": {}, "linear_probe": {}, "retrieval": {}}
        for t in tasks:
            run = {"zeroshot": run_zeroshot, "linear_probe": run_probe, "retrieval": run_retrieval}[t.spec.task]
            r[t.spec.task][t.spec.name] = run(lm, mid, t, cfg, cache)
            log.info("%s %s %s: %s", ms.name, t.spec.task, t.spec.name, r[t.spec.task][t.spec.name])
        results[ms.name] = r
        del lm
    datasets = {}
    for t in tasks:
        d = {"task": t.spec.task, "path": str(Path(t.spec.path).resolve())}
        if isinstance(t, _ZeroShot):
            d.update(layout=t.data.layout, classnames_source=t.prompts["classnames_source"],
                     templates_source=t.prompts["templates_source"], templates=t.prompts["templates"])
        datasets[f"{t.spec.task}/{t.spec.name}"] = d
    results["meta"] = {"format": RESULTS_FORMAT, "split": cfg.split, "device": cfg.features.device,
                       "cache_dir": str(cfg.features.cache_dir) if cfg.features.cache_dir else None,
                       "max_bad_fraction": cfg.max_bad_fraction, "linear_probe": asdict(cfg.probe),
                       "recall_ks": list(cfg.recall_ks), "datasets": datasets}
    if out is not None:
        save_json(Path(out), results)
    return results
