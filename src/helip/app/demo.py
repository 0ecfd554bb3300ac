"""`helip demo`: the whole pipeline on the built-in world, offline, on a CPU.

    world -> pretrain (cached) -> embed -> mine -> eval the starting model
          -> train + eval baseline | train + eval HELIP (side by side) -> results.json + report.html

The comparison is fair by construction: baseline and HELIP continue from the
same pretrained checkpoint with the same batch size, optimiser steps, schedule
and seed; they differ only in batch composition (hard pairs) and the HNML term.
Defaults were chosen on the validation split (benchmarks/); numbers are
reported on the test split, with validation numbers beside them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..data.pairs import PairTensors, prepare_pairs
from ..embed import EmbedConfig, embed, load_embeddings
from ..io import save_json
from ..mining import MineConfig, mine_hard_pairs
from ..models import CONFIG_DIR, DEMO_MODEL, load_model
from ..slip import HEAD_FILE, SlipConfig
from ..training import TrainConfig, train
from . import worlds
from .side_by_side import CONTEXT, run_side_by_side
from .worlds import EvalConfig, evaluate_model

log = logging.getLogger(__name__)

VARIANTS = ("pretrained", "baseline", "helip")


def default_cache_dir() -> Path:
    root = os.environ.get("HELIP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "helip")
    return Path(root)


@dataclass
class DemoConfig:
    """Sizes and hyperparameters of the demo. ``quick()`` gives the test-sized run."""

    world: str = "builtin"  # a world of the family (helip.app.worlds); world_seed is its sample seed
    world_seed: int = 0
    n_train: int = 20000
    n_val: int = 2000
    n_test: int = 3000
    n_probe_train: int = 5000
    # the demo's own values: its tiny model from scratch on the CPU, learning rates chosen on the world's validation.
    # Pretraining uses random batches, so the hard-pair options cannot matter: they are pinned to the values its
    # cached checkpoints were trained with, which keeps the cache key when helip.defaults changes
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(
        model=DEMO_MODEL, steps=600, batch_size=128, lr=2e-3, warmup_steps=100, seed=0, hard_per_target=0,
        log_every=50, device="cpu", hard_fraction=1.0, top_k=50, hnml_weight=1.0, hnml_margin=0.2))
    # 600 pretraining steps and 700 continued ones fit a fresh demo in 7 minutes on a 2-core CPU (373 s); among the
    # lengths that fit, 700 continued steps had the best validation zero-shot mean (benchmarks/RESULTS.md, "The
    # demo's length"). HELIP's options (partners, temperature, HNML) are helip.defaults, what helip train uses
    # (700 steps = 4.5 epochs of pairs seen on 20,000 pairs; `helip train` defaults to the paper's 2 epochs)
    continued: TrainConfig = field(default_factory=lambda: TrainConfig(
        model=DEMO_MODEL, steps=700, batch_size=128, lr=1e-3, warmup_steps=20, log_every=10, device="cpu"))
    mine: MineConfig = field(default_factory=lambda: MineConfig(k=50))
    # baseline and HELIP train side by side, each in its own process on half the cores: on a 2-core CPU that
    # ends sooner than one after the other at two threads (helip.app.side_by_side); 1 runs them here in turn
    jobs: int = 2
    progress: bool = True
    # "slip": pretrain and continue with SLIP's loss (CLIP + SimCLR); the tiny model gets a small SimCLR head
    objective: str = "clip"
    slip: SlipConfig = field(default_factory=lambda: SlipConfig(mlp_dim=256, out_dim=64))

    def with_objective(self) -> "DemoConfig":
        """Copy ``objective`` and ``slip`` into both training configs (pretraining and continued)."""
        self.pretrain = replace(self.pretrain, objective=self.objective, slip=self.slip)
        self.continued = replace(self.continued, objective=self.objective, slip=self.slip)
        return self

    @classmethod
    def quick(cls) -> "DemoConfig":
        c = cls(n_train=1200, n_val=300, n_test=300, n_probe_train=600)
        c.pretrain = replace(c.pretrain, steps=30, batch_size=64, warmup_steps=5, log_every=10)
        c.continued = replace(c.continued, steps=12, batch_size=64, warmup_steps=2, top_k=10, log_every=4)
        c.mine = replace(c.mine, k=10)
        return c


def _pretrain_key(cfg: DemoConfig) -> str:
    """Cache key: everything that determines the pretrained weights."""
    model_cfg = (CONFIG_DIR / f"{cfg.pretrain.model}.json")
    pretrain = asdict(cfg.pretrain)
    if pretrain.get("objective") == "clip":  # CLIP runs keep the keys they had before the SLIP options existed
        pretrain.pop("objective")
        pretrain.pop("slip", None)
    for later, old in (("remine_every", 0), ("interpolate", 1.0)):  # likewise, later options at the values
        if pretrain.get(later) == old:                                # that keep old keys
            pretrain.pop(later)
    if pretrain["hard_per_target"] == 0 or pretrain.get("hard_temperature") == 0:  # random batches or a uniform
        pretrain.pop("hard_temperature", None)  # draw: the partner temperature (and its units) cannot matter
        pretrain.pop("hard_temperature_mode", None)
    key = {"world_seed": cfg.world_seed, "n_train": cfg.n_train, "pretrain": pretrain,
           "model_cfg": model_cfg.read_text() if model_cfg.exists() else cfg.pretrain.model,
           "world_version": worlds.get_world(cfg.world).version}
    if cfg.world != "builtin":  # the built-in world keeps the key it had before the family existed
        key["world"] = worlds.get_world(cfg.world).describe()
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrained_checkpoint(cfg: DemoConfig, train_pairs: PairTensors, cache_dir: Path) -> Path:
    """The "existing checkpoint" the demo starts from: trained from scratch once, then cached."""
    run_dir = cache_dir / f"pretrain-{_pretrain_key(cfg)}"
    ckpt = run_dir / "model.pt"
    # a SLIP run writes its SimCLR head before model.pt, so model.pt alone marks a complete run
    if ckpt.is_file() and (cfg.pretrain.objective != "slip" or (run_dir / HEAD_FILE).is_file()):
        log.info("using cached pretrained checkpoint %s", ckpt)
        return ckpt
    log.info("pretraining the starting model (%d steps); cached at %s", cfg.pretrain.steps, run_dir)
    return train(replace(cfg.pretrain, pretrained=None, progress=cfg.progress), train_pairs, run_dir,
                 overwrite=True).checkpoint  # a run killed before model.pt is redone


@dataclass
class DemoWorld:
    """The demo's splits, prepared for the model, with their evaluation tasks."""

    splits: Dict[str, worlds.WorldSplit]
    tensors: Dict[str, PairTensors]
    tasks: Dict[str, List[worlds.ZeroShotTask]]
    probe_train: PairTensors
    probe_labels: Dict[str, np.ndarray]


def build_world(cfg: DemoConfig) -> DemoWorld:
    """Generate train/val/test, apply the model's OpenCLIP transform and tokenizer, build the tasks."""
    world = worlds.get_world(cfg.world)
    splits = {"train": world.generate(cfg.n_train, cfg.world_seed, "train"),
              "val": world.generate(cfg.n_val, cfg.world_seed, "val"),
              "test": world.generate(cfg.n_test, cfg.world_seed, "test")}
    lm = load_model(cfg.pretrain.model)
    tensors = {k: prepare_pairs(s.images, s.captions, lm) for k, s in splits.items()}
    n_probe = min(cfg.n_probe_train, cfg.n_train)
    t = tensors["train"]
    probe_train = PairTensors(t.images[:n_probe], t.tokens[:n_probe], t.captions[:n_probe])
    probe_labels = {"train": world.probe_labels(splits["train"])[:n_probe],
                    "val": world.probe_labels(splits["val"]), "test": world.probe_labels(splits["test"])}
    tasks = {k: world.zeroshot_tasks(splits[k]) for k in ("val", "test")}
    return DemoWorld(splits, tensors, tasks, probe_train, probe_labels)


def _evaluate(ckpt: Path, cfg: DemoConfig, w: DemoWorld) -> Dict:
    """Test metrics of one checkpoint, with its validation metrics under ``val``."""
    m = load_model(cfg.pretrain.model, str(ckpt))
    r = evaluate_model(m, {"val": w.tensors["val"], "test": w.tensors["test"]}, w.tasks, w.probe_labels,
                       w.probe_train, EvalConfig())
    return {**r["test"], "val": r["val"]}


def _continue_and_evaluate(name: str) -> Dict:
    """One continued-training run ("baseline" or "helip") from the starting model, evaluated where it ran."""
    c = CONTEXT
    t0 = time.perf_counter()
    res = train(c["configs"][name], c["world"].tensors["train"], c["out"] / name,
                hard=c["hard"] if name == "helip" else None, overwrite=True)
    t_train = time.perf_counter() - t0
    results = _evaluate(res.checkpoint, c["cfg"], c["world"])
    return {"results": results, "history": res.history, "train_seconds": round(t_train, 2),
            "eval_seconds": round(time.perf_counter() - t0 - t_train, 2)}


def run_demo(out: Path, seed: int = 0, quick: bool = False, cache_dir: Optional[Path] = None,
             config: Optional[DemoConfig] = None, objective: Optional[str] = None,
             world: Optional[str] = None) -> Dict:
    """Run every stage; write ``out/results.json`` and ``out/report.html``; return the results.

    ``objective`` ("clip" or "slip") overrides the config's: with "slip" the
    starting model is pretrained with SLIP's loss and both continued runs
    (baseline and HELIP) use it too, so they differ only in what HELIP adds.
    ``world`` overrides the config's world of the family (default "builtin").
    """
    from .report import write_report  # first: a missing plotting package fails now, not after training

    cfg = config or (DemoConfig.quick() if quick else DemoConfig())
    if objective is not None:
        cfg.objective = objective
    if world is not None:
        worlds.get_world(world)  # an unknown name fails now
        cfg.world = world
    cfg.with_objective()
    cfg.continued = replace(cfg.continued, seed=seed, progress=cfg.progress)
    cfg.mine = replace(cfg.mine, progress=cfg.progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    timings: Dict[str, float] = {}
    t_start = time.perf_counter()

    @contextmanager
    def stage(name):
        log.info("== %s", name)
        t0 = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - t0, 2)

    with stage("world"):
        w = build_world(cfg)
        splits, tensors, tasks = w.splits, w.tensors, w.tasks

    with stage("pretrain"):
        start_ckpt = pretrained_checkpoint(cfg, tensors["train"], cache_dir)

    with stage("embed"):
        lm = load_model(cfg.pretrain.model, str(start_ckpt))
        emb_dir = embed(lm, tensors["train"], out / "embeddings", EmbedConfig(progress=cfg.progress))

    with stage("mine"):
        img, txt, emb_meta = load_embeddings(emb_dir, tensors["train"].fingerprint())
        hard = mine_hard_pairs(img, txt, cfg.mine, out_dir=out / "hard_pairs",
                               extra_meta={"fingerprint": emb_meta["fingerprint"]})

    with stage("eval_pretrained"):  # before the runs, at this process's threads: they need every core
        results: Dict = {"pretrained": _evaluate(start_ckpt, cfg, w)}

    configs = {"baseline": replace(cfg.continued, pretrained=str(start_ckpt), hard_per_target=0, hnml_weight=0.0),
               "helip": replace(cfg.continued, pretrained=str(start_ckpt))}
    # two progress bars on one terminal line would overwrite each other: side by side, only HELIP's shows
    configs["baseline"] = replace(configs["baseline"], progress=cfg.progress and cfg.jobs == 1)
    context = {"configs": configs, "cfg": cfg, "world": w, "hard": hard, "out": out}
    runs = {}
    with stage("continued"):  # train and evaluate baseline and HELIP, side by side when cfg.jobs > 1
        for (name,), run in run_side_by_side(_continue_and_evaluate, [("baseline",), ("helip",)], context, cfg.jobs):
            runs[name] = run
    for name in ("baseline", "helip"):
        results[name] = runs[name]["results"]

    results["meta"] = {
        "seed": seed, "world": cfg.world, "world_seed": cfg.world_seed, "quick": quick, "model": cfg.pretrain.model,
        "objective": cfg.objective,
        "pretrained_checkpoint": str(start_ckpt), "split_sizes": {k: len(v) for k, v in splits.items()},
        "continued_training": asdict(cfg.continued), "mining": hard.meta, "timings_seconds": timings,
        # inside the "continued" stage, overlapping when the runs were side by side
        "run_seconds": {k: {"train": r["train_seconds"], "eval": r["eval_seconds"]} for k, r in runs.items()},
        "jobs": cfg.jobs,
        "reported_split": "test",
    }
    with stage("report"):
        write_report(out, results, {k: r["history"] for k, r in runs.items()}, splits["train"], hard)
    timings["total"] = round(time.perf_counter() - t_start, 2)
    save_json(out / "results.json", results)  # last, so its timings include the report
    return results
