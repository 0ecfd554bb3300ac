"""helip's training engine: the loop behind `helip train` and the demo.

- :mod:`.config`: ``TrainConfig``, the options of a run;
- :mod:`.loop`: ``train()``, the loop, top to bottom;
- :mod:`.trainer`: ``Trainer``, one optimiser step (accumulation, AMP, DDP);
- :mod:`.objective`: CLIP or SLIP, as objects the loop calls;
- :mod:`.checkpoint`: resumable checkpoints, which to resume, whether they fit;
- :mod:`.distributed`: devices, ranks, precision, seeds;
- :mod:`.hooks` and :mod:`.remine`: work called at epoch starts (re-mining the hard pairs).
"""
from .checkpoint import check_fresh_out_dir, list_checkpoints
from .config import FREEZE, OBJECTIVES, PRECISIONS, TrainConfig, TrainResult, steps_for_epochs
from .loop import train
from .trainer import Trainer

__all__ = ["TrainConfig", "TrainResult", "Trainer", "train", "check_fresh_out_dir", "list_checkpoints",
           "steps_for_epochs", "FREEZE", "OBJECTIVES", "PRECISIONS"]
