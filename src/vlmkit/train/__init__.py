"""Training: the one `Trainer`, its config, stages, parallelism, optimizer policy and checkpoints."""

from vlmkit.train.config import TrainConfig
from vlmkit.train.stages import train
from vlmkit.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "train"]
