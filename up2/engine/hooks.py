"""Training hooks."""
from __future__ import annotations

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["ProgressBar"]


class ProgressBar(HookBase):
    """A tqdm bar over iterations with the latest total loss (main process only)."""

    def __init__(self, max_iter: int, start_iter: int = 0):
        self.max_iter = max_iter
        self.start_iter = start_iter
        self._bar = None

    def before_train(self):
        if comm.is_main_process():
            from tqdm import tqdm

            self._bar = tqdm(total=self.max_iter, initial=self.trainer.start_iter, desc="train", unit="it", dynamic_ncols=True)

    def after_step(self):
        if self._bar is None:
            return
        self._bar.update(1)
        latest = self.trainer.storage.latest()
        if "total_loss" in latest:
            self._bar.set_postfix(loss=f"{latest['total_loss'][0]:.3f}", refresh=False)

    def after_train(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
