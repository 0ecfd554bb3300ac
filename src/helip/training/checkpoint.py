"""Resumable checkpoints of a training run: where they live, which one to resume, whether it fits.

A checkpoint ``OUT/checkpoints/step_N.pt`` holds the model (``state_dict``:
stock OpenCLIP loads it), optimiser, scaler, RNG states, the step and sampler
epoch, the run's config, and what the objective and hooks add (SLIP's head,
re-mining's state). A run resumes only with the options that shape its
trajectory (``TRAJECTORY``).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Tuple

from ..errors import ConfigError, InputError
from ..io import save_text, torch_load
from .config import TrainConfig

CHECKPOINT_DIR = "checkpoints"
log = logging.getLogger(__name__)
_CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
# options that change the trajectory: a resumed run must use the same values
TRAJECTORY = ("model", "steps", "batch_size", "accum_steps", "lr", "weight_decay", "warmup_steps", "seed",
              "hard_per_target", "hard_fraction", "top_k", "hnml_weight", "hnml_margin", "freeze",
              "local_loss", "gather_with_grad", "grad_clip_norm", "objective", "slip", "remine_every",
              "hard_temperature", "hard_temperature_mode")
# what an option added later meant for checkpoints written before it existed (default: its current default)
LEGACY = {"hard_temperature_mode": "absolute"}  # before it existed, the temperature was in score units


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(out_dir: Path) -> List[Tuple[int, Path]]:
    """Resumable checkpoints in ``out_dir/checkpoints``, by step (temporary files of a killed save ignored)."""
    d = Path(out_dir) / CHECKPOINT_DIR
    found = []
    if d.is_dir():
        for p in d.iterdir():
            m = _CKPT_RE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return sorted(found)


def check_fresh_out_dir(out_dir: Path) -> None:
    """Refuse to start a fresh run over an earlier run's checkpoints."""
    found = list_checkpoints(out_dir)
    if found:
        raise ConfigError(f"{out_dir} holds checkpoints of an earlier run (latest: step {found[-1][0]}); "
                          f"pass --resume auto to continue it, or choose another --out (from Python: "
                          f"TrainConfig(resume='auto'), or train(..., overwrite=True) to replace it).")


def resume_path(resume: Optional[str], out_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from: None (fresh run), the latest in ``out_dir`` ("auto"), or a path."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(out_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise InputError(f"--resume {path}: no such checkpoint; pass --resume auto or a checkpoints/step_N.pt file.")
    return path


def resume_state(resume: Optional[str], out_dir: Path) -> Tuple[Optional[Path], Optional[dict]]:
    """(path, state) of the checkpoint to resume from, or (None, None) for a fresh start.

    Read before any work starts, so an unreadable checkpoint fails in a second.
    ``--resume auto`` skips a latest checkpoint that cannot be read (a damaged
    file; a killed save leaves only a temporary file) for the newest readable
    one, saying so; a named checkpoint must be readable.
    """
    path = resume_path(resume, out_dir)
    if path is None:
        return None, None
    fix = "pass --resume auto or another checkpoints/step_N.pt file."
    if resume != "auto":
        return path, checkpoint_state(path, fix)
    found = [p for _, p in reversed(list_checkpoints(out_dir))]
    for p in found:
        try:
            state = checkpoint_state(p, fix)
        except InputError as e:
            log.warning("%s; trying the checkpoint before it", e)
            continue
        if p != found[0]:
            log.warning("resuming from %s, the newest readable checkpoint (newer ones are damaged)", p)
        return p, state
    raise InputError(f"--resume auto: none of the {len(found)} checkpoints in {out_dir / CHECKPOINT_DIR} can be "
                     f"read; remove them to start afresh, or choose another --out.")


def checkpoint_state(path: Path, fix: str) -> dict:
    """A resumable checkpoint's contents; anything else (damaged, model.pt, OpenCLIP's) is one InputError."""
    state = torch_load(path, "checkpoint", fix)
    if not isinstance(state, dict) or not all(k in state for k in ("state_dict", "optimizer", "step", "config")):
        raise InputError(f"checkpoint {path} is not a resumable helip checkpoint (model.pt and OpenCLIP "
                         f"checkpoints are not); {fix}")
    return state


def check_compatible(saved: dict, cfg: TrainConfig, extra: dict, path: Path) -> None:
    """Raise ``ConfigError`` unless ``cfg`` (and the run's ``extra`` facts) match the checkpoint's run."""
    # options newer than the checkpoint: what they meant before they existed (LEGACY), else their defaults
    now, default = asdict(cfg), {**asdict(TrainConfig()), **LEGACY}
    old = {k: saved["config"].get(k, default[k]) for k in TRAJECTORY}
    if old["hard_temperature"] == now["hard_temperature"] == 0:  # a uniform draw has no temperature units
        old["hard_temperature_mode"] = now["hard_temperature_mode"]
    diff = [f"{k}: {old[k]!r} -> {now[k]!r}" for k in TRAJECTORY if old[k] != now[k]]
    data_now, data_then = extra.get("data_fingerprint"), saved.get("data_fingerprint")
    if data_now is not None and data_then is not None and data_now != data_then:  # (older checkpoints: none)
        raise ConfigError(f"cannot resume from {path}: it was trained on another dataset ({data_then.get('count')} "
                          f"pairs, caption hash {str(data_then.get('captions_sha256'))[:12]}; this one: "
                          f"{data_now.get('count')} pairs, {str(data_now.get('captions_sha256'))[:12]}); "
                          f"pass the --data it was trained on, or choose another --out.")
    if saved["config"].get("pretrained") != cfg.pretrained:  # the run's weights would not be the ones asked for
        diff.append(f"pretrained: {saved['config'].get('pretrained')!r} -> {cfg.pretrained!r}")
    diff += [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in extra.items()
             if k != "data_fingerprint" and saved.get(k) != v]
    if diff:
        raise ConfigError(f"cannot resume from {path}: options differ from the run that wrote it "
                          f"({'; '.join(diff)}); rerun with the same options or choose another --out.")


def prune_log(path: Path, step: int) -> List[dict]:
    """Keep the log records up to the resumed step (a killed run may have logged steps it then lost)."""
    if not path.is_file():
        return []
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    save_text(path, "".join(line + "\n" for line in keep))
    return [json.loads(line) for line in keep]
