"""Image classification in the unified formulation (paper §4.3, "Tasks without Localization").

Shape shorthand: N images, C classes, d width.

x = the image token sequence read at [SPE]; Y = the class names, each through f_text and g
and read at [SPE]; loss = Eq. 7 (softmax cross-entropy over the C classes, weight w_k).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from up2.modeling.tasks.base import TaskSpec, check_class_names, register_task
from up2.modeling.token_attributes import TaskFamily
from up2.modeling.unified_decoder import SPE_POSITION

__all__ = ["ClassificationTask"]


@register_task("classification")
class ClassificationTask:
    """Inputs: mapper dicts with "image" (3, H, W) uint8 and, in training, "class_id" (int,
    contiguous). Eval output per image: {"pred_class_scores": (C,) float32 probabilities,
    "pred_class": int}."""

    family = TaskFamily.CLASSIFICATION

    def __init__(self, spec: TaskSpec, **_):
        self.spec = spec

    def __call__(self, model, batched_inputs: Sequence[dict], class_names: Optional[Sequence[str]] = None):
        """Args: model (the task interface of UniPerceiverV2), batched_inputs, class_names
        (inference only; replaces the training classes: open vocabulary).

        Raises:
            ValueError: empty ``class_names``, a single string, an empty or repeated name; KeyError: a training input without "class_id".
        """
        names = self.spec.class_names if class_names is None else check_class_names(class_names)
        if len(names) == 0:
            raise ValueError("class_names is empty: give at least one class name")
        enc = model.encode_image(batched_inputs, self.family)
        x = model.unified_decoder(enc.tokens.batch, outputs=SPE_POSITION)[:, 0]  # (N, d) at [SPE]
        logits = model.likelihood(x, model.embed_targets(names, self.family))  # (N, C)
        if model.training:
            target = torch.tensor([_class_id(d, i) for i, d in enumerate(batched_inputs)], device=logits.device)
            return {"loss_cls": model.likelihood.loss(logits, target, self.spec.loss_weight)}
        probs = logits.softmax(-1)
        return [{"pred_class_scores": p, "pred_class": int(p.argmax())} for p in probs]


def _class_id(d: dict, i: int) -> int:
    if "class_id" not in d:
        raise KeyError(f"classification input {i} ({d.get('file_name', '?')}) has no 'class_id'")
    return int(d["class_id"])
