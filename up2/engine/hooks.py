"""Training hooks."""
from __future__ import annotations

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["ProgressBar", "ExportInferenceCheckpoint"]


class ProgressBar(HookBase):
    """A tqdm bar over iterations showing the task(s) sampled at the last iteration and their
    loss (main process only); a trainer without per-task losses shows its total loss."""

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
        # the sampled task and its loss (MultiTaskStep), else the total loss; set before update(),
        # which redraws the bar: the line shows this iteration's values, not the previous one's
        task_losses = getattr(getattr(self.trainer, "_trainer", None), "last_task_losses", None)
        if task_losses:
            task = "+".join(task_losses)
            self._bar.set_postfix_str(f"task={task} loss={sum(task_losses.values()):.3f}", refresh=False)
        elif "total_loss" in self.trainer.storage.latest():
            self._bar.set_postfix(loss=f"{self.trainer.storage.latest()['total_loss'][0]:.3f}", refresh=False)
        self._bar.update(1)

    def after_train(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class ExportInferenceCheckpoint(HookBase):
    """At the end of training, write the inference checkpoint (``up2.checkpoint``: weights as
    safetensors, config, class names and vocabularies, model card with the last evaluation's
    metrics) to ``folder``, next to detectron2's ``model_final.pth`` (main process only).

    Nothing is written when training stopped early (an exception before the last iteration).
    Register it after detectron2's EvalHook, whose ``after_train`` runs the final evaluation.
    """

    def __init__(self, folder: str):
        self.folder = folder

    def after_train(self):
        trainer = self.trainer
        # detectron2's train loop leaves iter == max_iter only after its last step succeeded
        if not comm.is_main_process() or trainer.iter < trainer.max_iter:
            return
        from up2.checkpoint import save_inference_checkpoint

        save_inference_checkpoint(trainer.model, trainer.cfg, self.folder,
                                  metrics=getattr(trainer, "_last_eval_results", None), iteration=trainer.max_iter,
                                  source=f"training in {trainer.cfg.OUTPUT_DIR}")
