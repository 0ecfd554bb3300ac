"""What every world of the family produces: captioned image splits and zero-shot tasks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass
class WorldSplit:
    """One split: uint8 images [N, 32, 32, 3], captions, and ground-truth attributes.

    ``attrs`` holds int arrays of length N. Object A is the single object, or the
    left/top one of two; B fields are -1 for single-object images.
    ``n_objects`` is 1 or 2 (or the number of copies in a family world's
    ``copies`` scenes); ``position`` indexes the world's positions (single
    objects); ``relation`` indexes its relations (two objects), -1 otherwise.
    """

    images: np.ndarray
    captions: List[str]
    attrs: Dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class ZeroShotTask:
    """A zero-shot classification task: which images, their labels, the class prompts."""

    name: str
    classnames: List[str]
    templates: List[str]
    indices: np.ndarray  # rows of the split that belong to the task
    labels: np.ndarray   # class index per row in ``indices``
    fine_grained: bool
