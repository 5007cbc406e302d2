"""Top-k accuracy of image classification (paper §5.1 evaluation, Tab. 2 / Tab. 6: ImageNet-1k Acc).

Shape shorthand:
    B  images in one ``process`` call      C  candidate classes      n  images evaluated

Format consumed by :meth:`ClassificationEvaluator.process` (one pair per image):
    input  ``"class_id"``: int (or 0-d integer tensor), the ground-truth class, contiguous in [0, C).
    output ``"pred_class_scores"``: (C,) float tensor, one score per class, higher = more likely
        (logits, cosine / tau or probabilities: only the order matters).

Ties are counted against the model: the rank of the true class is the number of OTHER classes
whose score is >= its score, so a model that scores every class alike is never right by luck.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence

import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table

__all__ = ["ClassificationEvaluator"]

logger = logging.getLogger(__name__)


class ClassificationEvaluator(DatasetEvaluator):
    """Top-k accuracy (percent) over a whole test set, gathered over all ranks.

    Only the rank of the true class is kept per image (one int64), never the (C,) scores, so
    memory does not grow with C.

    Results (main process): ``{"classification": {"top1": float, "top5": float}}`` in percent
    (one ``"top{k}"`` per k of ``topk``; k larger than C counts every image as a hit).
    Other ranks return ``{}``; an evaluator that saw no image warns and returns ``{}``.
    """

    def __init__(self, topk: Sequence[int] = (1, 5), distributed: bool = True, task_key: str = "classification"):
        """
        Args:
            topk: the k of the reported top-k accuracies, each >= 1.
            distributed: gather from all ranks (detectron2 ``comm``); False evaluates this rank only.
            task_key: the key of the result dict.

        Raises:
            ValueError: an empty ``topk`` or a k < 1.
        """
        topk = tuple(int(k) for k in topk)
        if not topk or min(topk) < 1:
            raise ValueError(f"topk must be a non-empty sequence of ints >= 1, got {topk}")
        self._topk = topk
        self._distributed = distributed
        self._task_key = task_key
        self.reset()

    def reset(self):
        self._ranks: List[torch.Tensor] = []
        self._num_classes = None

    def process(self, inputs, outputs):
        """Record the rank of the true class of each image.

        Args:
            inputs: B dicts with ``"class_id"`` (int in [0, C)).
            outputs: B dicts with ``"pred_class_scores"`` ((C,) float tensor).

        Raises:
            ValueError: a missing field, scores that are not (C,) or change C, NaN scores, or a
                class_id outside [0, C) (the message names the field and the value).
        """
        if len(inputs) != len(outputs):
            raise ValueError(f"got {len(inputs)} inputs but {len(outputs)} outputs")
        if not inputs:
            return
        scores, labels = [], []
        for i, (inp, out) in enumerate(zip(inputs, outputs)):
            if "pred_class_scores" not in out:
                raise ValueError(f"output {i} has no 'pred_class_scores' (expected a (C,) tensor); keys: {sorted(out)}")
            if "class_id" not in inp:
                raise ValueError(f"input {i} has no 'class_id' (expected an int in [0, C)); keys: {sorted(inp)}")
            s = torch.as_tensor(out["pred_class_scores"])
            if s.dim() != 1 or s.numel() == 0:
                raise ValueError(f"'pred_class_scores' of output {i} must have shape (C,), got {tuple(s.shape)}")
            if self._num_classes is None:
                self._num_classes = s.numel()
            if s.numel() != self._num_classes:
                raise ValueError(
                    f"'pred_class_scores' of output {i} has C={s.numel()} but earlier outputs had C={self._num_classes}"
                )
            scores.append(s.detach().float().cpu())
            labels.append(int(inp["class_id"]))
        scores = torch.stack(scores)  # (B, C)
        labels = torch.tensor(labels, dtype=torch.int64)
        bad = (labels < 0) | (labels >= self._num_classes)
        if bad.any():
            raise ValueError(
                f"'class_id' {labels[bad][0].item()} is outside [0, {self._num_classes}) (C = len(pred_class_scores))"
            )
        if torch.isnan(scores).any():
            raise ValueError("'pred_class_scores' contains NaN")
        true = scores.gather(1, labels[:, None])  # (B, 1)
        self._ranks.append((scores >= true).sum(1) - 1)  # (B,) other classes scored >= the true one

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        ranks = self._ranks
        if self._distributed:
            comm.synchronize()
            ranks = [r for part in comm.gather(ranks, dst=0) for r in part]
            if not comm.is_main_process():
                return {}
        if not ranks:
            logger.warning("[ClassificationEvaluator] did not receive any prediction; returning no result")
            return {}
        ranks = torch.cat(ranks)  # (n,)
        res = {f"top{k}": 100.0 * (ranks < k).double().mean().item() for k in self._topk}
        logger.info(f"Classification top-k accuracy (%) over {ranks.numel()} images:\n" + create_small_table(res))
        return {self._task_key: res}
