"""Hard pair mining: scoring, exact / subset / ANN search, and hard pairs on disk."""
from .mine import MODES, MineConfig, mine_hard_pairs
from .store import HardPairs, load_hard_pairs, read_csv, save_hard_pairs, write_csv

__all__ = ["MODES", "MineConfig", "mine_hard_pairs", "HardPairs", "load_hard_pairs", "save_hard_pairs",
           "read_csv", "write_csv"]
