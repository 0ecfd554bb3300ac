"""The family of synthetic worlds the demo and the quality benchmark run on, and their evaluation.

A *world* is a procedurally drawn, captioned 32x32 image distribution with its
own structure (attributes, vocabularies, drawing, caption grammar) and its own
zero-shot tasks, linear probe and retrieval. ``builtin`` is the demo's default
(:mod:`.builtin`, unchanged since before the family); the others are drawn by
:func:`.family.make_spec` from a world seed. Worlds are split once, before any
measurement, into *development* worlds (hyperparameters are chosen on their
validation splits) and *held-out* worlds (only ever reported, test split);
docs/worlds.md lists them.

    w = get_world("builtin")                 # or "w1" ... "w7"
    split = w.generate(20000, seed=0, split="train")
    tasks = w.zeroshot_tasks(split); labels = w.probe_labels(split)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from ...data.sources import register_world_generator
from ...errors import ConfigError
from . import builtin, family
from .base import SPLITS, WorldSplit, ZeroShotTask
from .evaluate import EvalConfig, evaluate_model, linear_probe, retrieval_recall, zeroshot_accuracy


@dataclass(frozen=True)
class World:
    """One member of the family: ``spec`` None is the built-in world."""

    name: str
    spec: Optional[family.WorldSpec] = None

    @property
    def version(self):
        """Changes whenever this world's drawing or captions change (cache keys use it)."""
        return builtin.WORLD_VERSION if self.spec is None else f"family{family.FAMILY_VERSION}"

    def generate(self, n: int, seed: int = 0, split: str = "train") -> WorldSplit:
        if self.spec is None:
            return builtin.generate(n, seed, split)
        return family.generate(self.spec, n, seed, split)

    def zeroshot_tasks(self, split: WorldSplit) -> List[ZeroShotTask]:
        if self.spec is None:
            return builtin.zeroshot_tasks(split)
        return family.zeroshot_tasks(self.spec, split)

    def probe_labels(self, split: WorldSplit) -> np.ndarray:
        if self.spec is None:
            return builtin.probe_labels(split)
        return family.probe_labels(self.spec, split)

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version,
                "spec": "builtin" if self.spec is None else self.spec.describe()}


# world name -> world seed of its structure (fixed once; docs/worlds.md shows what each seed drew)
FAMILY_SEEDS = {"w1": 1, "w2": 2, "w3": 3, "w4": 4, "w5": 5, "w6": 6, "w7": 7}
WORLDS: Dict[str, World] = {"builtin": World("builtin"),
                            **{n: World(n, family.make_spec(s, n)) for n, s in FAMILY_SEEDS.items()}}
# fixed before any measurement on the family; nothing is ever selected on a held-out world
DEV_WORLDS = ("builtin", "w1", "w2", "w3")
HELDOUT_WORLDS = ("w4", "w5", "w6", "w7")
WORLD_SETS = {"dev": DEV_WORLDS, "heldout": HELDOUT_WORLDS, "all": DEV_WORLDS + HELDOUT_WORLDS}


def get_world(name: str) -> World:
    if name not in WORLDS:
        raise ConfigError(f"unknown world {name!r}; choose one of {', '.join(WORLDS)}.")
    return WORLDS[name]


def generate(n: int, seed: int = 0, split: str = "train", world: str = "builtin") -> WorldSplit:
    """``n`` captioned images of ``split`` from ``world`` with sample seed ``seed``."""
    return get_world(world).generate(n, seed, split)


def zeroshot_tasks(split: WorldSplit, world: str = "builtin") -> List[ZeroShotTask]:
    return get_world(world).zeroshot_tasks(split)


def probe_labels(split: WorldSplit, world: str = "builtin") -> np.ndarray:
    return get_world(world).probe_labels(split)


__all__ = ["World", "WorldSplit", "ZeroShotTask", "WORLDS", "DEV_WORLDS", "HELDOUT_WORLDS", "WORLD_SETS", "SPLITS",
           "get_world", "generate", "zeroshot_tasks", "probe_labels", "EvalConfig", "evaluate_model", "linear_probe",
           "retrieval_recall", "zeroshot_accuracy"]


register_world_generator(lambda n, seed, split, world: generate(n, seed, split, world))  # --data world
