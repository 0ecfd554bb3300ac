"""helip: continue training CLIP-family models on their own data with mined hard pairs (HELIP).

The library: everything an OpenCLIP training loop needs to train with HELIP
(docs/library.md shows the recipe)::

    from helip import (mine_hard_pairs, load_hard_pairs, HardPairBatchSampler, IndexedBatches,
                       PartnerMasker, HelipLoss, HardNegativeMarginLoss)

The `helip` command, the demo and its report are the application built on it
(``helip.app``); ``helip.training`` is the loop behind `helip train`.
"""
from . import defaults
from .data.indexed import IndexedBatches, TensorPairs
from .errors import HelipError
from .losses import HardNegativeMarginLoss, HelipLoss, PartnerMasker, SimCLRLoss, SlipLoss, hard_partner_mask
from .mining import HardPairs, MineConfig, load_hard_pairs, mine_hard_pairs, read_csv, save_hard_pairs, write_csv
from .models import load_model, register_configs
from .sampler import HardPairBatchSampler
from .training.remine import embed_dataset

__version__ = "0.1.0"
__all__ = [
    # mining, in memory and on disk
    "mine_hard_pairs", "MineConfig", "HardPairs", "load_hard_pairs", "save_hard_pairs", "read_csv", "write_csv",
    "embed_dataset",
    # batches and losses
    "HardPairBatchSampler", "IndexedBatches", "TensorPairs", "PartnerMasker", "hard_partner_mask",
    "HardNegativeMarginLoss", "HelipLoss", "SimCLRLoss", "SlipLoss",
    # models, defaults, errors
    "load_model", "register_configs", "defaults", "HelipError", "__version__",
]
