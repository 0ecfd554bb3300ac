"""helip's training engine: the loop behind `helip train` and the demo."""
from .loop import FREEZE, OBJECTIVES, PRECISIONS, TrainConfig, Trainer, TrainResult, check_fresh_out_dir, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "train", "check_fresh_out_dir", "FREEZE", "OBJECTIVES",
           "PRECISIONS"]
