"""Hooks: work the training loop calls at fixed points without knowing what it is (re-mining is one).

A hook may hand the loop new hard pairs (the sampler and HNML switch to them),
adds its state to every checkpoint, restores it on resume, and adds a summary
to ``train_config.json``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..mining.store import HardPairs


class TrainHook:
    def on_epoch_start(self, epoch: int, step: int, model: torch.nn.Module, dataset,
                       autocast: Callable[[], Any]) -> Optional[HardPairs]:
        """Called before each epoch's first step (with the unwrapped model); new hard pairs or None."""
        return None

    def state_dict(self) -> dict:
        """Entries added to every checkpoint."""
        return {}

    def load_state_dict(self, state: dict, n: int) -> Optional[HardPairs]:
        """Restore from a checkpoint of a dataset of ``n`` pairs; the hard pairs it trained with, or None."""
        return None

    def summary(self) -> dict:
        """Entries added to ``train_config.json`` at the end of the run."""
        return {}
