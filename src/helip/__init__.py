"""helip: continue training CLIP-family models on their own data with mined hard pairs (HELIP).

The public API is the three pieces that drop into an existing OpenCLIP loop::

    from helip import mine_hard_pairs, HardPairBatchSampler, HardNegativeMarginLoss
"""
from .errors import HelipError
from .losses import HardNegativeMarginLoss, HelipLoss, hard_partner_mask
from .mining import MineConfig, mine_hard_pairs
from .sampler import HardPairBatchSampler

__version__ = "0.1.0"
__all__ = ["mine_hard_pairs", "MineConfig", "HardPairBatchSampler", "HardNegativeMarginLoss", "HelipLoss",
           "hard_partner_mask", "HelipError", "__version__"]
