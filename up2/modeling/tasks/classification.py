"""Image classification in the unified formulation (paper §4.3, "Tasks without Localization").

Shape shorthand: N images, C classes, d width.

x = the image token sequence read at [SPE]; Y = the class names, each through f_text and g
and read at [SPE]; loss = Eq. 7 (softmax cross-entropy over the C classes, weight w_k).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from up2.data.mappers import ClassificationDatasetMapper
from up2.evaluation import ClassificationEvaluator
from up2.modeling.tasks.base import register_task
from up2.modeling.tasks.task import Task, TaskFamily, TaskInputs
from up2.modeling.token_attributes import Modality, input_modalities
from up2.modeling.decoder_outputs import SPE
from up2.utils.host_sync import to_device

__all__ = ["ClassificationTask"]


@register_task("classification")
class ClassificationTask(Task):
    """Inputs: mapper dicts with "image" (3, H, W) uint8 and, in training, "class_id" (int,
    contiguous). Option: ``class_names`` (inference only; replaces the training classes: open
    vocabulary). Training loss {"loss_cls"}; eval output per image: {"pred_class_scores": (C,)
    float32 probabilities, "pred_class": int}."""

    family = TaskFamily.CLASSIFICATION
    input_modalities = input_modalities(Modality.IMAGE)
    reads = (SPE,)
    options = ("class_names",)
    needs_class_names = True

    def encode_inputs(self, model, batched_inputs: Sequence[dict]) -> TaskInputs:
        enc = model.encode_image(batched_inputs, self.input_modalities)
        return TaskInputs(batch=enc.tokens.batch, image=enc)

    def encode_targets(self, model, batched_inputs, inputs, class_names: Optional[Sequence[str]] = None):
        return self.class_name_targets(model, class_names)

    def losses(self, model, outputs, targets, inputs, batched_inputs):
        """Raises: KeyError for a training input without "class_id"."""
        logits = model.likelihood(outputs.spe, targets.embeddings)  # (N, C)
        target = to_device([_class_id(d, i) for i, d in enumerate(batched_inputs)], logits.device, torch.int64)
        return {"loss_cls": model.likelihood.loss(logits, target, self.spec.loss_weight)}

    def postprocess(self, model, outputs, targets, inputs, batched_inputs, **options):
        probs = model.likelihood(outputs.spe, targets.embeddings).softmax(-1)
        classes = probs.argmax(-1).tolist()  # the results' one copy to the host
        return [{"pred_class_scores": p, "pred_class": c} for p, c in zip(probs, classes)]

    def build_mapper(self, cfg, is_train: bool):
        return ClassificationDatasetMapper(cfg, is_train=is_train)

    def build_evaluator(self, cfg, dataset_name: str, output_dir: Optional[str] = None):
        return ClassificationEvaluator()


def _class_id(d: dict, i: int) -> int:
    if "class_id" not in d:
        raise KeyError(f"classification input {i} ({d.get('file_name', '?')}) has no 'class_id'")
    return int(d["class_id"])
