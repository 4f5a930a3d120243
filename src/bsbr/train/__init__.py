"""Training: TrainConfig (with presets), train() and evaluate()."""

from .config import PRESETS, TrainConfig
from .evaluate import evaluate
from .loop import TrainResult, lr_at, train

__all__ = ["PRESETS", "TrainConfig", "TrainResult", "evaluate", "lr_at", "train"]
