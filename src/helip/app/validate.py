"""Checks of command-line values made before any heavy work starts.

A run that would fail at its very end (an ``--out`` that is a file, a CSV path
that is a directory, ``--lr nan``) fails here instead, in a second, with one
line naming the flag and what to do.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Optional

from ..errors import ConfigError, InputError


def check_finite_options(values: dict, command: str = "") -> None:
    """Every float option is a finite number (NaN passes ``x <= 0`` checks, infinity passes ``x > 0``)."""
    for name, v in values.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"--{name.replace('_', '-')} {v}: must be a finite number; pass a real value.")


def _writable_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` is a directory this process may create entries in."""
    parent = path.parent if str(path.parent) else Path(".")
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: {parent} is a file, not a directory; choose another {flag}.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: no permission to write in {parent}; choose an {flag} you can write to.")


def check_out_dir(path, flag: str = "--out", must_write: Iterable[str] = ()) -> Path:
    """``path`` is (or can be created as) a writable directory; ``must_write`` names files in it that
    will be replaced, which must not be directories."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{flag} {path} is a file; {flag} names a directory, pass another path.")
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"{flag} {path}: no permission to write there; choose an {flag} you can write to.")
        for name in must_write:
            if (path / name).is_dir():
                raise InputError(f"{flag} {path}: {path / name} is a directory where a file will be written; "
                                 f"remove it or choose another {flag}.")
    else:
        _writable_parent(path, flag)
    return path


def check_out_file(path, flag: str = "--out") -> Path:
    """``path`` is (or can be created as) a file: not a directory, in a writable directory."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory; {flag} names a file (e.g. {path / 'results.json'}).")
    if path.exists() and not os.access(path, os.W_OK):
        # atomic writes replace the file, which needs only the directory's permission
        pass
    _writable_parent(path, flag)
    return path


def check_positive(values: dict, names: Iterable[str], flag_of: Optional[dict] = None) -> None:
    for name in names:
        v = values.get(name)
        if v is not None and v < 1:
            flag = (flag_of or {}).get(name, f"--{name.replace('_', '-')}")
            raise ConfigError(f"{flag} {v}: must be at least 1.")


_OUTPUT_FILES = {
    "train": ("model.pt", "train_config.json", "train_log.jsonl"),
    "pretrain": ("model.pt", "train_config.json", "train_log.jsonl"),
    "embed": ("image.npy", "text.npy", "meta.json", "skipped.json"),
    "mine": ("hard_pairs.npy", "hard_scores.npy", "meta.json"),
    "demo": ("results.json", "report.html"),
    "report": ("report.html",),
}


def precheck(args) -> None:
    """What the CLI checks of a parsed command line before calling the command (cheap checks only)."""
    values = vars(args)
    command = values.get("command", "")
    check_finite_options(values, command)
    if command in _OUTPUT_FILES:
        check_out_dir(values["out"], "--out", _OUTPUT_FILES[command])
    if command == "eval":
        check_out_file(values["out"], "--out")
        for name in ("n_probe_train", "n_val", "n_test", "batch_size"):
            check_positive(values, [name])
    if command == "convert-slip":
        check_out_dir(values["output"], "output", ("model.pt", "simclr_head.pt", "slip_meta.json"))
    if values.get("csv"):
        check_out_file(values["csv"], "--csv")
    if values.get("data", "world") == "world" and "n_train" in values:
        check_positive(values, ["n_train"])
    if command == "embed" and values.get("pretrained") and values.get("text_encoder") and values.get("image_encoder"):
        raise ConfigError(f"--pretrained {values['pretrained']} would not be used: --text-encoder and "
                          f"--image-encoder replace both towers of the model; drop --pretrained or one of them.")
    if command == "train":  # the option checks of TrainConfig, before the data and the model are loaded
        import dataclasses

        from ..training import TrainConfig

        names = {f.name for f in dataclasses.fields(TrainConfig)} - {"slip", "device"}
        TrainConfig(**{k: values[k] for k in names if values.get(k) is not None}).validate()  # --steps None: epochs
        if values.get("steps") is None and not values.get("epochs", 1) > 0:
            raise ConfigError(f"--epochs {values['epochs']}: must be positive; pass e.g. --epochs 2.")
