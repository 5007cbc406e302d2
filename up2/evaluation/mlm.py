"""Masked-token accuracy of masked language modelling (paper §5.1 training tasks).

Shape shorthand:
    T  tokens of one text (its padded length)

Format consumed by :meth:`MaskedLMEvaluator.process` (one pair per text), dense and aligned:
    input  ``"mlm_labels"``: (T,) int64, the original token id at masked positions and
        ``IGNORE_INDEX`` (-100, the Hugging Face / ``cross_entropy`` convention) elsewhere.
    output ``"mlm_predictions"``: (T,) int64, the predicted token id per position; only the
        positions whose label is not -100 are read (the model may put anything elsewhere).
"""
from __future__ import annotations

import logging
from typing import Dict

import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table

__all__ = ["MaskedLMEvaluator", "IGNORE_INDEX"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of positions that were not masked


class MaskedLMEvaluator(DatasetEvaluator):
    """Accuracy (percent) = correctly predicted masked tokens / all masked tokens, over all ranks.

    Only two counters are kept per rank. Results (main process): ``{"mlm": {"accuracy": float}}``.
    Other ranks return ``{}``; an evaluator that saw no masked token warns and returns ``{}``.
    """

    def __init__(self, distributed: bool = True, task_key: str = "mlm"):
        """
        Args:
            distributed: gather from all ranks (detectron2 ``comm``); False evaluates this rank only.
            task_key: the key of the result dict.
        """
        self._distributed = distributed
        self._task_key = task_key
        self.reset()

    def reset(self):
        self._correct = 0
        self._total = 0

    def process(self, inputs, outputs):
        """Count the masked positions and the correct predictions among them.

        Args:
            inputs: B dicts with ``"mlm_labels"`` ((T,) int64, -100 = not masked), unless the
                output carries them (the model masks the text itself: ``MaskedLMTask``).
            outputs: B dicts with ``"mlm_predictions"`` ((T,) int64) and optionally ``"mlm_labels"``.

        Raises:
            ValueError: a missing field, a non-integer tensor, or shapes that differ (names both
                fields and their shapes).
        """
        if len(inputs) != len(outputs):
            raise ValueError(f"got {len(inputs)} inputs but {len(outputs)} outputs")
        for i, (inp, out) in enumerate(zip(inputs, outputs)):
            source = out if "mlm_labels" in out else inp
            if "mlm_labels" not in source:
                raise ValueError(f"input {i} has no 'mlm_labels' ((T,) int64, -100 = not masked); keys: {sorted(inp)}")
            if "mlm_predictions" not in out:
                raise ValueError(f"output {i} has no 'mlm_predictions' ((T,) int64); keys: {sorted(out)}")
            labels = torch.as_tensor(source["mlm_labels"]).detach()
            preds = torch.as_tensor(out["mlm_predictions"]).detach()
            for name, t in (("mlm_labels", labels), ("mlm_predictions", preds)):
                if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                    raise ValueError(f"{name!r} of text {i} must hold integer token ids, got dtype {t.dtype}")
            if labels.dim() != 1 or preds.shape != labels.shape:
                raise ValueError(
                    f"'mlm_predictions' {tuple(preds.shape)} and 'mlm_labels' {tuple(labels.shape)} of text {i} "
                    "must both have shape (T,)"
                )
            masked = labels != IGNORE_INDEX
            self._total += int(masked.sum())
            self._correct += int((preds.to(labels.device)[masked] == labels[masked]).sum())

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        counts = [(self._correct, self._total)]
        if self._distributed:
            comm.synchronize()
            counts = comm.gather(counts[0], dst=0)
            if not comm.is_main_process():
                return {}
        correct = sum(c for c, _ in counts)
        total = sum(t for _, t in counts)
        if total == 0:
            logger.warning("[MaskedLMEvaluator] did not receive any masked token; returning no result")
            return {}
        res = {"accuracy": 100.0 * correct / total}
        logger.info(f"Masked-LM accuracy (%) over {total} masked tokens:\n" + create_small_table(res))
        return {self._task_key: res}
