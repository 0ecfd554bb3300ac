"""Does HELIP beat plain continued training? Baseline, HELIP and ablations over seeds, val and test.

Protocol (fair by construction, as in the demo): every run continues from the
same pretrained checkpoint of the built-in world with the same batch size,
optimiser steps, learning-rate schedule and seed set; variants differ only in
how batches are composed and in the HNML term. Hyperparameters are chosen on
the validation split (``selected_on_val`` below names the HELIP-family variant
with the best validation zero-shot mean); test numbers are reported for every
variant, mean and sample standard deviation over seeds, with the pretrained
model's numbers beside them (what continued training alone gives).

Variants:
  baseline          random batches, no HNML
  helip             the demo's defaults: HPM hard pairs (hard_per_target=1) + HNML (weight 1.0, margin 0.2),
                    partners drawn with relative temperature 0.05, 700 steps
  uniform           helip with partners drawn uniformly from the top-k (the paper's way; the default before
                    the partner temperature won on validation)
  hpm_no_hnml       HPM batches, HNML weight 0
  hnml_w0.5/w2      HNML weight 0.5 / 2.0
  hnml_m0.1/m0.4    HNML margin 0.1 / 0.4
  h3                3 hard partners per target
  mix0.5            half of each batch in target+partner groups, half random targets
  mix0.25           a quarter of each batch in target+partner groups
  *_wise0.5         baseline / helip / uniform with --interpolate 0.5: model.pt halfway between the
                    starting and the trained weights (WiSE-FT), to keep the starting model's coarse knowledge
  mined_text        hard pairs mined by caption similarity only (the paper's ablation)
  mined_image       ... by image similarity only
  random_pairs      "hard" pairs drawn at random: batches of the same shape with no mining
  remine1/remine2   helip, re-mining the hard pairs with the current model every 1 / 2 epochs
                    (no-ops unless --steps covers more than 1 / 2 epochs: the demo's 700 steps are 2.2
                    epochs, the quick mode's 12 are under one)
  temp0.01/0.002    partners drawn with P ~ exp(score / T), T in score units (--hard-temperature-mode
                    absolute; on this world a target's top-50 HPM scores span 0.20 at the median)
  rel0.05           relative temperature 0.05: T in units of the median top-k spread (= helip now; on this
                    world the same partner as temp0.01 in 99.95% of draws)
  pertarget0.05     T = 0.05 of each target's own top-k spread (every target equally sharp)

    .venv/bin/python benchmarks/bench_quality.py [--seeds 0,1,2] [--device cpu|cuda]
        [--variants baseline,helip,...] [--steps N] [--pretrain-steps N] (default: the demo's, 700 and 600)
        [--resume-from EARLIER.json ...] [--out benchmarks/results/bench_quality.json]

The headline benchmark (baseline vs the default HELIP, 3 seeds, from
scratch) is ``--variants baseline,helip --jobs 2``; its steps and every other
option are the demo's (``DemoConfig``), so the two cannot disagree. Where its
time goes (numbers in benchmarks/RESULTS.md): pretraining the starting model
once (the demo's 600 steps, cached for later runs in the demo's cache), then
per run almost all of it in the 700 training steps (~0.3 s a step at 1
thread on an idle 2-core CPU), ~10 s of evaluation (val + test zero-shot,
retrieval, linear probe); world, embedding and mining are under a minute. The
stage and per-run times (train / eval, with the load average) are recorded
in the JSON (``timings_seconds``, ``train_seconds``, ``eval_seconds``).

``--resume-from`` (repeatable) keeps runs of earlier JSONs instead of
repeating them: a run is kept under the variant whose *current* definition
it equals (options compared on what both know, older options read as they
meant before they existed), so a variant whose meaning changed since (like
``helip`` when the demo's defaults changed) is relabelled or dropped, never
mislabelled; what it keeps or drops is printed.

The family protocol (docs/worlds.md): ``--worlds dev|heldout|all`` (or a list
of world names) runs baseline vs HELIP on each world of the set from a starting
model trained to the plateau rule, for ``--epochs`` (default 2) epochs of pairs
seen, and compares per world and averaged over the worlds (validation on
development worlds, test on held-out ones; ablation variants are refused on
held-out worlds). ``--quick`` is the 2-core-CPU sized protocol; ``--render
JSON`` re-tables a run, also an interrupted one.

    .venv/bin/python benchmarks/bench_quality.py --worlds dev|heldout|all [--quick] [--variants baseline,helip]
        [--seeds 0,1,2] [--epochs 2] [--lr LR] [--jobs J] [--out PATH]
        [--pretrain-steps N] [--max-pretrain-steps N]   (the plateau rule's first length and its cap)

Writes JSON (after every run, so a killed run keeps what it finished) and a
Markdown table beside it. Not part of the test suite. Mining with an external
encoder is not among the ablations: none is available offline here.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from helip.app.demo import DemoConfig, build_world, default_cache_dir, pretrained_checkpoint
from helip.app.side_by_side import CONTEXT as _RUN, run_side_by_side  # _RUN: what every run needs
from helip.app.worlds import get_world
from helip.app.worlds import EvalConfig, evaluate_model
from helip.embed import encode_pairs
from helip.io import save_json, save_text
from _provenance import provenance
from helip.mining import HardPairs, mine_hard_pairs
from helip.models import load_model
from helip.training.checkpoint import LEGACY as TRAIN_LEGACY
from helip.training import train

# name -> (TrainConfig overrides, hard-pair source); source None means random batches
VARIANTS = {
    "baseline": ({"hard_per_target": 0, "hnml_weight": 0.0}, None),
    "helip": ({}, "hpm"),
    "uniform": ({"hard_temperature": 0.0}, "hpm"),
    "hpm_no_hnml": ({"hnml_weight": 0.0}, "hpm"),
    "hnml_w0.5": ({"hnml_weight": 0.5}, "hpm"),
    "hnml_w2": ({"hnml_weight": 2.0}, "hpm"),
    "hnml_m0.1": ({"hnml_margin": 0.1}, "hpm"),
    "hnml_m0.4": ({"hnml_margin": 0.4}, "hpm"),
    "h3": ({"hard_per_target": 3}, "hpm"),
    "mix0.5": ({"hard_fraction": 0.5}, "hpm"),
    "mix0.25": ({"hard_fraction": 0.25}, "hpm"),
    "baseline_wise0.5": ({"hard_per_target": 0, "hnml_weight": 0.0, "interpolate": 0.5}, None),
    "helip_wise0.5": ({"interpolate": 0.5}, "hpm"),
    "uniform_wise0.5": ({"hard_temperature": 0.0, "interpolate": 0.5}, "hpm"),
    "mined_text": ({}, "text"),
    "mined_image": ({}, "image"),
    "random_pairs": ({}, "random"),
    "remine1": ({"remine_every": 1}, "hpm"),
    "remine2": ({"remine_every": 2}, "hpm"),
    "temp0.01": ({"hard_temperature": 0.01, "hard_temperature_mode": "absolute"}, "hpm"),
    "temp0.002": ({"hard_temperature": 0.002, "hard_temperature_mode": "absolute"}, "hpm"),
    "rel0.05": ({"hard_temperature": 0.05, "hard_temperature_mode": "relative"}, "hpm"),
    "pertarget0.05": ({"hard_temperature": 0.05, "hard_temperature_mode": "per_target"}, "hpm"),
}
HELIP_FAMILY = ("helip", "uniform", "hpm_no_hnml", "hnml_w0.5", "hnml_w2", "hnml_m0.1", "hnml_m0.4", "h3", "mix0.5",
                "mix0.25", "helip_wise0.5", "uniform_wise0.5", "remine1", "remine2", "temp0.01", "temp0.002", "rel0.05",
                "pertarget0.05")
def evaluate_checkpoint(path) -> dict:
    c, w = _RUN["cfg"], _RUN["world"]
    m = load_model(c.pretrain.model, str(path), device=_RUN["device"])
    return evaluate_model(m, {"val": w.tensors["val"], "test": w.tensors["test"]}, w.tasks, w.probe_labels,
                          w.probe_train, EvalConfig(device=_RUN["device"]))


def run_variant(name: str, seed: int) -> dict:
    """Continued training of one variant and seed from the pretrained checkpoint, evaluated: one result row."""
    overrides, source = VARIANTS[name]
    tc = replace(_RUN["cfg"].continued, pretrained=str(_RUN["ckpt"]), seed=seed, **overrides)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        res = train(tc, _RUN["world"].tensors["train"], Path(d), _RUN["hard"].get(source))
        t_train = time.perf_counter() - t0
        r = evaluate_checkpoint(res.checkpoint)
        remining = json.loads((Path(d) / "train_config.json").read_text())["remining"]
    row = {"variant": name, "seed": seed, "overrides": overrides, "pairs": source,
           "seconds": round(time.perf_counter() - t0, 1), "train_seconds": round(t_train, 1),
           "eval_seconds": round(time.perf_counter() - t0 - t_train, 1), "load": os.getloadavg(),
           "torch_threads": torch.get_num_threads(), **r}
    if remining is not None:  # when the hard pairs were re-mined, and how long it took
        row["remining"] = [{k: e[k] for k in ("epoch", "step", "seconds")} for e in remining]
    return row


METRICS = {"zeroshot_mean": lambda r: r["zeroshot_mean"], "linear_probe": lambda r: r["linear_probe"],
           "i2t_r1": lambda r: r["retrieval"]["i2t_r1"], "t2i_r1": lambda r: r["retrieval"]["t2i_r1"]}


def random_pairs(n: int, k: int, seed: int) -> HardPairs:
    """k distinct random partners per row (never the row itself), in the hard-pairs format."""
    rng = np.random.default_rng([seed, 99])
    idx = np.empty((n, k), dtype=np.int32)
    for i in range(n):
        j = rng.choice(n - 1, size=k, replace=False)
        idx[i] = j + (j >= i)
    return HardPairs(indices=idx, scores=np.zeros((n, k), np.float32), meta={"method": "random", "k": k, "n": n})


# options that cannot change a run: how it is shown and logged, and, with random batches (or a uniform
# draw), the partner temperature and its units
_NO_EFFECT = ("progress", "log_every", "tensorboard")


def effective_run(base: dict, overrides: dict, pairs) -> dict:
    """What a run trains with: the base continued-training options with the variant's overrides, normalised.

    Options a run's JSON predates take what they meant before they existed
    (train's ``_LEGACY``: an old temperature was in score units), so runs
    written by older versions of this script compare correctly.
    """
    cfg = {**TRAIN_LEGACY, **base, **overrides}
    for k in _NO_EFFECT:
        cfg.pop(k, None)
    if cfg.get("hard_per_target") == 0 or pairs is None or cfg.get("hard_temperature") == 0:
        cfg.pop("hard_temperature_mode", None)
        if cfg.get("hard_per_target") == 0 or pairs is None:
            cfg.pop("hard_temperature", None)
    return {"config": cfg, "pairs": pairs}


def same_run(a: dict, b: dict) -> bool:
    """Equal pairs and equal options, compared on the options both know (a newer option at its default
    keeps an older run's behaviour, as ``_LEGACY`` guarantees for the ones where it would not)."""
    shared = set(a["config"]) & set(b["config"])
    dropped = set(a["config"]) ^ set(b["config"])  # popped on one side only: a temperature on one, none on the other
    return (a["pairs"] == b["pairs"] and all(a["config"][k] == b["config"][k] for k in shared)
            and not dropped & {"hard_temperature", "hard_temperature_mode"})


def summarise(rows: list) -> dict:
    out = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == name]
        out[name] = {"seeds": [r["seed"] for r in runs]}
        for split in ("val", "test"):
            out[name][split] = {}
            for m, get in METRICS.items():
                v = np.array([get(r[split]) for r in runs])
                out[name][split][m] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
            tasks = runs[0][split]["zeroshot"]
            out[name][split]["zeroshot"] = {t: float(np.mean([r[split]["zeroshot"][t] for r in runs])) for t in tasks}
    return out


def markdown(summary: dict, selected: str) -> str:
    def cell(s, split, m):
        return f"{100 * s[split][m]['mean']:.1f} ± {100 * s[split][m]['std']:.1f}"

    lines = [f"Test split, mean ± std over seeds (val zero-shot mean in the second column). "
             f"Selected on validation among HELIP variants: **{selected}**.", "",
             "| variant | val zs mean | test zs mean | linear probe | i2t R@1 | t2i R@1 |", "|---" * 6 + "|"]
    for name, s in summary.items():
        mark = " (selected)" if name == selected else ""
        lines.append(f"| {name}{mark} | {cell(s, 'val', 'zeroshot_mean')} | {cell(s, 'test', 'zeroshot_mean')} | "
                     f"{cell(s, 'test', 'linear_probe')} | {cell(s, 'test', 'i2t_r1')} | {cell(s, 'test', 't2i_r1')} |")
    tasks = list(next(iter(summary.values()))["test"]["zeroshot"])
    lines += ["", "Test zero-shot accuracy per task (mean over seeds):", "",
              "| variant | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for name, s in summary.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * s['test']['zeroshot'][t]:.1f}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if any(a == "--worlds" or a.startswith("--worlds=") for a in argv):
        return main_worlds(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="continued-training steps (default: the demo's)")
    ap.add_argument("--lr", type=float, default=None, help="continued-training learning rate (default: the demo's)")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="starting model's steps (default: the demo's)")
    ap.add_argument("--quick", action="store_true", help="smoke test on the test suite's tiny world")
    ap.add_argument("--resume-from", action="append", default=[],
                    help="a JSON this script wrote (repeatable): its runs that equal a requested-or-listed "
                         "variant's current definition are kept and not repeated")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs trained at once, each in its own process with cores/jobs torch threads "
                         "(on a 2-core CPU, 2 jobs of 1 thread finish the runs sooner than 1 job of 2 threads)")
    ap.add_argument("--out", default="benchmarks/results/bench_quality.json")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    t_start = time.perf_counter()

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    cfg.progress = False
    cfg.pretrain = replace(cfg.pretrain, device=args.device, steps=args.pretrain_steps or cfg.pretrain.steps)
    cfg.continued = replace(cfg.continued, device=args.device, progress=False,
                            steps=args.steps or cfg.continued.steps, lr=args.lr or cfg.continued.lr)
    timings = {}  # seconds of each stage before the runs: what a run from scratch pays once

    @contextmanager
    def stage(name):
        t0 = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - t0, 1)

    with stage("world"):
        w = build_world(cfg)
    train_pairs = w.tensors["train"]
    with stage("pretrain"):  # about 0 when the demo's cache holds the checkpoint
        ckpt = pretrained_checkpoint(cfg, train_pairs, default_cache_dir())
    with stage("encode"):
        lm = load_model(cfg.pretrain.model, str(ckpt), device=args.device)
        img, txt = encode_pairs(lm, train_pairs, device=args.device)
    hard = {}
    with stage("mine"):
        for source in dict.fromkeys(VARIANTS[v][1] for v in names):
            if source in ("hpm", "text", "image"):
                # exact either way; fp32 skips compiling fp16 kernels
                hard[source] = mine_hard_pairs(img, txt, cfg.mine, method=source, progress=False,
                                               device=args.device, precision="fp32")
            elif source == "random":
                hard[source] = random_pairs(len(train_pairs), cfg.mine.k, seed=0)
    context = {"cfg": cfg, "world": w, "ckpt": ckpt, "hard": hard, "device": args.device}
    _RUN.update(context)

    report = {"benchmark": "HELIP vs plain continued training on the built-in world, with ablations",
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "device": args.device,
              "seeds": seeds, "continued_training": asdict(cfg.continued),
              "pretrain_steps": cfg.pretrain.steps, "mining_k": cfg.mine.k,
              "timings_seconds": timings, "jobs": args.jobs, "runs": [], "provenance": provenance(args)}
    with stage("eval_pretrained"):
        report["pretrained"] = evaluate_checkpoint(ckpt)
    for path in args.resume_from:
        prev = json.loads(Path(path).read_text())
        for key in ("pretrain_steps", "mining_k", "device"):
            if prev[key] != report[key]:
                ap.error(f"--resume-from {path} was run with another {key}; start afresh")
        kept = 0
        for row in prev["runs"]:
            # a run is kept under the variant whose current definition it equals (so a variant whose meaning
            # changed, like helip when the demo's defaults changed, is not mislabelled), or not at all
            ran = effective_run(prev["continued_training"], row["overrides"], row["pairs"])
            own = [row["variant"]] if row["variant"] in names else []  # requested names first, then its own
            same = [v for v in dict.fromkeys([*own, *names, row["variant"], *VARIANTS])
                    if same_run(effective_run(report["continued_training"], *VARIANTS[v]), ran)]
            if not same or any(r["variant"] == same[0] and r["seed"] == row["seed"] for r in report["runs"]):
                print(f"--resume-from {path}: not kept: {row['variant']} seed {row['seed']} (no variant runs it "
                      f"now{'' if not same else ', or already kept'})", flush=True)
                continue
            if same[0] != row["variant"]:
                print(f"--resume-from {path}: {row['variant']} seed {row['seed']} is now {same[0]}", flush=True)
            report["runs"].append({**row, "variant": same[0], "overrides": VARIANTS[same[0]][0]})
            kept += 1
        print(f"--resume-from {path}: kept {kept} of {len(prev['runs'])} runs", flush=True)
        # a fresh machine re-pretrains: record both starting points so a difference would show
        report.setdefault("pretrained_of_resumed_runs", {})[path] = prev["pretrained"]
    pre = report["pretrained"]
    print(f"setup seconds {timings}", flush=True)
    print(f"pretrained: val zs {pre['val']['zeroshot_mean']:.4f} test zs {pre['test']['zeroshot_mean']:.4f}", flush=True)
    todo = [(name, seed) for seed in seeds for name in names
            if not any(r["variant"] == name and r["seed"] == seed for r in report["runs"])]

    def record(r):
        report["runs"].append(r)
        print(f"seed {r['seed']} {r['variant']:>13}: val zs {r['val']['zeroshot_mean']:.4f} test zs "
              f"{r['test']['zeroshot_mean']:.4f} LP {r['test']['linear_probe']:.4f} "
              f"i2t {r['test']['retrieval']['i2t_r1']:.4f} ({r['seconds']} s: train {r['train_seconds']}, "
              f"eval {r['eval_seconds']}; load {r['load'][0]:.2f})", flush=True)
        report["summary"] = summarise(report["runs"])
        report["total_seconds"] = round(time.perf_counter() - t_start, 1)
        save_json(args.out, report)

    for _, row in run_side_by_side(run_variant, todo, context, args.jobs):
        record(row)
    order = {(n, s): i for i, (n, s) in enumerate(todo)}   # the table and JSON in the usual order
    report["runs"].sort(key=lambda r: order.get((r["variant"], r["seed"]), -1))
    report["summary"] = summary = summarise(report["runs"])
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    family = [v for v in HELIP_FAMILY if v in summary]
    selected = max(family, key=lambda v: summary[v]["val"]["zeroshot_mean"]["mean"]) if family else None
    report["selected_on_val"] = selected
    summary = {"pretrained": {"seeds": [], **{s: {**{m: {"mean": get(pre[s]), "std": 0.0} for m, get in METRICS.items()},
                                                  "zeroshot": pre[s]["zeroshot"]} for s in ("val", "test")}},
               **summary}
    save_json(args.out, report)
    text = markdown(summary, selected)
    save_text(Path(args.out).with_suffix(".md"), text)
    print(text)
    print(f"total {report['total_seconds']} s; wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The family protocol: --worlds dev|heldout|all
# ---------------------------------------------------------------------------------------------------------------

# world sizes, model and starting-model schedule of the protocol; "quick" is what fits the 2-core CPU
PROTOCOLS = {
    "quick": {"n_train": 2000, "n_val": 500, "n_test": 1000, "n_probe_train": 1000, "batch_size": 64,
              "pretrain_steps": 600, "max_pretrain_steps": 1200, "mine_k": 20},
    "full": {"n_train": 10000, "n_val": 1000, "n_test": 2000, "n_probe_train": 3000, "batch_size": 128,
             "pretrain_steps": 2000, "max_pretrain_steps": 16000, "mine_k": 50},
    # the test suite's: checks the machinery, measures nothing
    "smoke": {"n_train": 128, "n_val": 64, "n_test": 64, "n_probe_train": 64, "batch_size": 32,
              "pretrain_steps": 16, "max_pretrain_steps": 32, "mine_k": 5, "plateau_points": 2},
}
PROTOCOL_MODEL = "helip-micro-vit"  # small enough that a starting model reaches its plateau on a CPU
# the plateau rule: the starting model's validation zero-shot mean gains less than this over the last quarter of
# its pretraining steps (curve from 8 evenly spaced checkpoints); otherwise pretraining is redone twice as long,
# up to the protocol's max_pretrain_steps (a model still rising there is reported as not at its plateau)
PLATEAU_GAIN = 0.005
PLATEAU_POINTS = 8  # checkpoints on the curve (the smoke protocol uses 2)


def git_commit() -> dict:
    import subprocess

    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine() -> dict:
    import platform

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_at_start": os.getloadavg(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def world_config(world: str, proto: dict, model: str, device: str) -> DemoConfig:
    c = DemoConfig(world=world, n_train=proto["n_train"], n_val=proto["n_val"], n_test=proto["n_test"],
                   n_probe_train=proto["n_probe_train"], progress=False)
    c.pretrain = replace(c.pretrain, model=model, batch_size=proto["batch_size"], device=device, log_every=100)
    c.continued = replace(c.continued, model=model, batch_size=proto["batch_size"], top_k=proto["mine_k"],
                          device=device, progress=False, log_every=50)
    c.mine = replace(c.mine, k=proto["mine_k"])
    return c


def plateau_pretrain(cfg: DemoConfig, w, proto: dict, cache_dir: Path):
    """The world's starting model, pretrained until the plateau rule holds (cached with its curve)."""
    from helip.app.demo import _pretrain_key
    from helip.app.worlds import zeroshot_accuracy
    from helip.embed import encode_images

    steps, attempts = proto["pretrain_steps"], []
    while True:
        points = proto.get("plateau_points", PLATEAU_POINTS)
        cfg.pretrain = replace(cfg.pretrain, steps=steps, save_every=max(1, steps // points))
        run_dir = cache_dir / f"pretrain-{_pretrain_key(cfg)}"
        curve_path = run_dir / "plateau_curve.json"
        t0 = time.perf_counter()
        ckpt = pretrained_checkpoint(cfg, w.tensors["train"], cache_dir)
        if curve_path.is_file():
            curve = json.loads(curve_path.read_text())
        else:
            curve = []
            for path in sorted((run_dir / "checkpoints").glob("step_*.pt")):
                lm = load_model(cfg.pretrain.model, str(path), device=cfg.pretrain.device)
                img = encode_images(lm, w.tensors["val"].images, 512, cfg.pretrain.device)
                zs = zeroshot_accuracy(lm, img, w.tasks["val"], cfg.pretrain.device)
                curve.append({"step": int(path.stem.split("_")[1]), "val_zeroshot_mean": float(np.mean(list(zs.values())))})
            save_json(curve_path, curve)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the curve is kept; model.pt is the model
        quarter = next(c for c in curve if c["step"] >= 0.75 * steps)
        gain = curve[-1]["val_zeroshot_mean"] - quarter["val_zeroshot_mean"]
        attempts.append({"steps": steps, "curve": curve, "last_quarter_gain": gain, "checkpoint": str(ckpt),
                         "seconds_incl_cache": round(time.perf_counter() - t0, 1)})
        if gain < PLATEAU_GAIN or steps * 2 > proto["max_pretrain_steps"]:
            return ckpt, {"rule": f"val zero-shot mean gain over the last quarter of steps < {100 * PLATEAU_GAIN} points",
                          "at_plateau": gain < PLATEAU_GAIN, "steps": steps, "attempts": attempts}
        steps *= 2


def run_world(name: str, args, proto: dict, names: list, seeds: list, on_row) -> dict:
    """The protocol on one world: plateaued starting model, mining, every variant x seed, evaluated."""
    from helip.training import steps_for_epochs

    t0 = time.perf_counter()
    cfg = world_config(name, proto, args.model, args.device)
    w = build_world(cfg)
    ckpt, plateau = plateau_pretrain(cfg, w, proto, default_cache_dir())
    steps = args.steps or steps_for_epochs(cfg.n_train, args.epochs, cfg.continued.batch_size)
    cfg.continued = replace(cfg.continued, steps=steps, lr=args.lr or cfg.continued.lr)
    lm = load_model(cfg.pretrain.model, str(ckpt), device=args.device)
    img, txt = encode_pairs(lm, w.tensors["train"], device=args.device)
    hard = {}
    for source in dict.fromkeys(VARIANTS[v][1] for v in names):
        if source in ("hpm", "text", "image"):
            hard[source] = mine_hard_pairs(img, txt, cfg.mine, method=source, progress=False, device=args.device,
                                           precision="fp32")
        elif source == "random":
            hard[source] = random_pairs(len(w.tensors["train"]), cfg.mine.k, seed=0)
    context = {"cfg": cfg, "world": w, "ckpt": ckpt, "hard": hard, "device": args.device}
    _RUN.update(context)
    out = {"world": get_world(name).describe(), "plateau": plateau, "pretrained": evaluate_checkpoint(ckpt),
           "continued_training": asdict(cfg.continued), "setup_seconds": round(time.perf_counter() - t0, 1),
           "runs": []}
    todo = [(v, s) for s in seeds for v in names]
    for _, row in run_side_by_side(run_variant, todo, context, args.jobs):
        out["runs"].append(row)
        on_row(name, out)
    out["summary"] = summarise(out["runs"])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def compare(results: dict, variant: str, ref: str = "baseline", split: str = "test") -> dict:
    """``variant`` against ``ref`` on each world and averaged over worlds: the issue's goal, term by term."""
    per_world = {}
    for name, r in results.items():
        s = r.get("summary", {})
        if variant not in s or ref not in s:
            continue
        a, b = s[variant][split], s[ref][split]
        gain = a["zeroshot_mean"]["mean"] - b["zeroshot_mean"]["mean"]
        spread = a["zeroshot_mean"]["std"] + b["zeroshot_mean"]["std"]
        drops = {t: a["zeroshot"][t] - b["zeroshot"][t] for t in a["zeroshot"]}
        per_world[name] = {
            "zeroshot_gain": gain, "two_std_added": spread, "gain_beyond_spread": gain > spread,
            "worst_task": min(drops, key=drops.get), "worst_task_delta": min(drops.values()),
            "linear_probe_delta": a["linear_probe"]["mean"] - b["linear_probe"]["mean"],
            "i2t_r1_delta": a["i2t_r1"]["mean"] - b["i2t_r1"]["mean"],
            "t2i_r1_delta": a["t2i_r1"]["mean"] - b["t2i_r1"]["mean"]}
    if not per_world:
        return {}
    mean_gain = float(np.mean([p["zeroshot_gain"] for p in per_world.values()]))
    goal = {"mean_gain_at_least_3_points": mean_gain >= 0.03,
            "every_world_beyond_two_std": all(p["gain_beyond_spread"] for p in per_world.values()),
            "no_task_more_than_1_point_below": all(p["worst_task_delta"] >= -0.01 for p in per_world.values()),
            "retrieval_and_probe_not_below": all(min(p["linear_probe_delta"], p["i2t_r1_delta"], p["t2i_r1_delta"]) >= 0
                                                 for p in per_world.values())}
    return {"variant": variant, "reference": ref, "split": split, "mean_zeroshot_gain": mean_gain,
            "per_world": per_world, "goal": goal, "goal_met": all(goal.values())}


def markdown_worlds(report: dict) -> str:
    lines = [f"Worlds: {report['worlds']} ({report['world_set']}); protocol {report['protocol_name']} "
             f"({report['protocol']}); model {report['model']}; {report['epochs']} epochs "
             f"of continued training; seeds {report['seeds']}; commit {report['git']['commit'][:12]}"
             f"{' (dirty)' if report['git']['dirty'] else ''}. Mean ± std over seeds, in %.", ""]
    for name, r in report["results"].items():
        p = r["plateau"]
        curve = ", ".join(f"{c['step']}: {100 * c['val_zeroshot_mean']:.1f}" for c in p["attempts"][-1]["curve"])
        lines += [f"### {name}", "",
                  f"Starting model: {p['steps']} pretraining steps, {'at' if p['at_plateau'] else 'NOT at'} its "
                  f"plateau (last-quarter val zero-shot gain {100 * p['attempts'][-1]['last_quarter_gain']:+.2f}); "
                  f"curve (step: val zs mean) {curve}.", ""]
        if "summary" not in r:
            lines += ["(runs not finished)", ""]
            continue
        pre = r["pretrained"]
        summary = {"pretrained": {s: {**{m: {"mean": get(pre[s]), "std": 0.0} for m, get in METRICS.items()},
                                      "zeroshot": pre[s]["zeroshot"]} for s in ("val", "test")}, **r["summary"]}
        lines += markdown(summary, report.get("selected_on_val")).splitlines()[2:] + [""]
    for c in report.get("comparisons", []):
        lines += [f"### {c['variant']} - {c['reference']} ({c['split']} split)", "",
                  "| world | zero-shot gain | 2 std added | worst task (delta) | linear probe | i2t R@1 | t2i R@1 |",
                  "|---" * 7 + "|"]
        for name, p in c["per_world"].items():
            lines.append(f"| {name} | {100 * p['zeroshot_gain']:+.1f} | {100 * p['two_std_added']:.1f} | "
                         f"{p['worst_task']} ({100 * p['worst_task_delta']:+.1f}) | {100 * p['linear_probe_delta']:+.1f} | "
                         f"{100 * p['i2t_r1_delta']:+.1f} | {100 * p['t2i_r1_delta']:+.1f} |")
        lines += ["", f"Mean zero-shot gain over these worlds: **{100 * c['mean_zeroshot_gain']:+.2f} points**; "
                  f"goal terms: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in c["goal"].items()), ""]
    return "\n".join(lines) + "\n"


def main_worlds(argv) -> int:
    from helip.app.worlds import WORLD_SETS

    ap = argparse.ArgumentParser(description="the quality protocol over a set of worlds of the family")
    ap.add_argument("--worlds", required=True,
                    help="dev | heldout | all, or a comma-separated list of world names (builtin, w1 ... w7)")
    ap.add_argument("--variants", default="baseline,helip")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=float, default=2.0,
                    help="continued training in epochs of pairs seen (the same steps for every variant)")
    ap.add_argument("--steps", type=int, default=None, help="continued-training steps; overrides --epochs")
    ap.add_argument("--lr", type=float, default=None, help="continued-training learning rate (default: the demo's)")
    ap.add_argument("--quick", action="store_true", help="the quick protocol (small worlds; 2-core CPU sized)")
    ap.add_argument("--protocol", default=None, choices=sorted(PROTOCOLS), help="quick, full (default) or smoke")
    ap.add_argument("--model", default=PROTOCOL_MODEL)
    ap.add_argument("--pretrain-steps", type=int, default=None,
                    help="first pretraining length of the plateau rule (default: the protocol's)")
    ap.add_argument("--max-pretrain-steps", type=int, default=None,
                    help="cap the plateau rule's doubling of pretraining below the protocol's (a model still "
                         "rising at the cap is reported as not at its plateau)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--split", default=None, choices=("val", "test"),
                    help="split of the comparison tables (default: val for dev worlds, test otherwise)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--render", default=None,
                    help="only rewrite the tables of this JSON (also a partial one, from an interrupted run)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.render:
        return render(Path(args.render), args.split)
    worlds = list(WORLD_SETS.get(args.worlds, args.worlds.split(",")))
    for n in worlds:
        get_world(n)  # unknown names fail here, before any work
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    held_out = set(worlds) & set(WORLD_SETS["heldout"])
    if held_out and len(names) > 2:
        ap.error("held-out worlds are only reported, never searched: run them with --variants baseline,helip "
                 "(the defaults), not with ablations")
    seeds = [int(s) for s in args.seeds.split(",")]
    pname = args.protocol or ("quick" if args.quick else "full")
    proto = dict(PROTOCOLS[pname])
    if args.pretrain_steps is not None:
        proto["pretrain_steps"] = args.pretrain_steps
        proto["max_pretrain_steps"] = max(proto["max_pretrain_steps"], args.pretrain_steps)
    if args.max_pretrain_steps is not None:
        if args.max_pretrain_steps < proto["pretrain_steps"]:
            ap.error(f"--max-pretrain-steps must be at least the protocol's first length ({proto['pretrain_steps']})")
        proto["max_pretrain_steps"] = args.max_pretrain_steps
    out = Path(args.out or f"benchmarks/results/bench_quality_worlds_{args.worlds.replace(',', '_')}"
                           f"{'' if pname == 'full' else '_' + pname}.json")
    report = {"benchmark": "HELIP vs plain continued training over a set of worlds, from plateaued starting models",
              "command": " ".join([Path(sys.executable).name, "benchmarks/bench_quality.py", *argv]),
              "git": git_commit(), "machine": machine(), "options": vars(args), "world_set": args.worlds,
              "worlds": worlds, "protocol_name": pname, "protocol": proto, "model": args.model,
              "epochs": args.epochs, "seeds": seeds, "variants": names, "results": {}}
    t_start = time.perf_counter()

    def on_row(name, partial):
        r = partial["runs"][-1]
        print(f"{name} seed {r['seed']} {r['variant']:>12}: val zs {r['val']['zeroshot_mean']:.4f} test zs "
              f"{r['test']['zeroshot_mean']:.4f} LP {r['test']['linear_probe']:.4f} i2t {r['test']['retrieval']['i2t_r1']:.4f}"
              f" ({r['seconds']} s)", flush=True)
        report["results"][name] = {**partial, "summary": summarise(partial["runs"])}
        report["total_seconds"] = round(time.perf_counter() - t_start, 1)
        save_json(out, report)

    for name in worlds:
        report["results"][name] = run_world(name, args, proto, names, seeds, on_row)
        p = report["results"][name]["plateau"]
        print(f"{name}: starting model {p['steps']} steps, at plateau: {p['at_plateau']}; "
              f"pretrained val zs {report['results'][name]['pretrained']['val']['zeroshot_mean']:.4f}", flush=True)
        save_json(out, report)
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    return render(out, args.split, report)


def render(out: Path, split=None, report=None) -> int:
    """Comparisons, selection (development worlds only) and the Markdown tables of a report."""
    from helip.app.worlds import WORLD_SETS

    report = report or json.loads(out.read_text())
    held_out = set(report["results"]) & set(WORLD_SETS["heldout"])
    split = split or ("test" if held_out else "val")
    done = {n: r for n, r in report["results"].items() if "summary" in r}
    report["complete"] = (set(done) == set(report["worlds"]) and all(
        len(r["runs"]) == len(report["variants"]) * len(report["seeds"]) for r in done.values()))
    report["comparisons"] = [compare(done, v, split=split) for v in report["variants"] if v != "baseline"]
    if not held_out and done:  # selection happens on development worlds only, on validation
        val = {v: float(np.mean([r["summary"][v]["val"]["zeroshot_mean"]["mean"] for r in done.values()]))
               for v in report["variants"] if v in HELIP_FAMILY and all(v in r["summary"] for r in done.values())}
        report["selected_on_val"] = max(val, key=val.get) if val else None
        report["val_zeroshot_mean_over_worlds"] = val
    save_json(out, report)
    text = markdown_worlds(report)
    if not report["complete"]:
        text = ("**Partial run**: not every world, variant and seed finished; seeds per row are in the JSON.\n\n"
                + text)
    save_text(out.with_suffix(".md"), text)
    print(text)
    print(f"total {report.get('total_seconds')} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
