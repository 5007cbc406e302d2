"""Training engine: UP2Trainer (detectron2's DefaultTrainer with up2's builders) and hooks."""
from up2.engine.hooks import ProgressBar
from up2.engine.trainer import UP2Trainer, build_optimizer

__all__ = ["UP2Trainer", "ProgressBar", "build_optimizer"]
