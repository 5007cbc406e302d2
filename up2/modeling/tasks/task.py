"""The task interface: everything one task type owns (paper §4.3, Fig. 2).

A task turns its inputs into a token batch for g, its targets into embeddings, and g's output
into losses (training) or results (inference); it also names its dataset mapper, its
evaluator and its test batch size, so the trainer, the multi-task step and the predictor hold
no switch on task types. The meta-architecture runs the steps in the order of Fig. 2
(``UniPerceiverV2.forward``).

Adding a task adds one file: subclass :class:`Task`, decorate it with
``@register_task("<type>")`` and name that type in ``cfg.TASKS.<NAME>.TYPE``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch

from up2.modeling.decoder_outputs import DecoderOutput
from up2.modeling.target_set import TargetEmbeddings
from up2.modeling.tasks.base import TaskSpec, check_class_names
from up2.modeling.token_attributes import Modality
from up2.structures import TokenBatch

__all__ = ["Task", "TaskFamily", "TaskInputs"]


class TaskFamily(Enum):
    """The kind of a task type (the predictor and the benchmarks pick tasks by it). It is NOT a
    MoE routing attribute: routing sees the modalities of the task's input (``Task.input_modalities``),
    never the task (paper §4.3; Uni-Perceiver-MoE attribute routing)."""

    LOCALIZATION = "localization"  # detection, instance segmentation
    CLASSIFICATION = "classification"
    RETRIEVAL = "retrieval"
    CAPTIONING = "captioning"
    MLM = "mlm"  # masked language modelling


@dataclass
class TaskInputs:
    """A task's inputs as g takes them.

    Attributes:
        batch: the token batch x (paper Eq. 5), with named segments.
        image: the image encoding (``up2.modeling.meta_arch.ImageEncoding``) for image tasks,
            else None.
        labels: (B, T) int64 token labels of text tasks (-100 where unsupervised), else None.
        label_index: (M,) int64 flat positions ``b * T + t`` of the supervised labels, when the
            task knows them on the host (selecting them by ``labels != -100`` would synchronise
            with a GPU), else None.
        losses: losses computed while encoding (the proposal network's), {} otherwise.
    """

    batch: TokenBatch
    image: Optional[Any] = None
    labels: Optional[torch.Tensor] = None
    label_index: Optional[torch.Tensor] = None
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)


class Task:
    """One task type (paper §4.3). Subclasses set the class attributes and implement
    :meth:`encode_inputs`, :meth:`encode_targets`, :meth:`losses`, :meth:`postprocess`,
    :meth:`build_mapper` and :meth:`build_evaluator`.

    Class attributes:
        family: the kind of task (``TaskFamily``; the predictor picks tasks by it).
        input_modalities: the modalities of the task's input x (``token_attributes.input_modalities``),
            a MoE routing attribute of every token of the task, its targets' included.
        reads: the segments of g's output the task reads (``unified_decoder.SPE`` and the token
            batch's segment names).
        options: keyword options ``model(inputs, task=..., **options)`` accepts at inference.
        localization: predictions are boxes / masks (training drops images without
            annotations when DATALOADER.FILTER_EMPTY_ANNOTATIONS and groups aspect ratios; the
            default task when it is the only such task).
        with_masks: the task supervises the proposal network's masks (instance segmentation);
            the proposal decoder initialises its reference boxes from masks only then.
        needs_class_names: the task's targets are class names (resolved from the datasets).
        has_vocabulary: the targets are the text encoder's vocabulary (``TaskSpec.vocabulary``).
        test_batch_size: images (or texts) per batch at evaluation.
    """

    family: TaskFamily
    input_modalities: FrozenSet[Modality]
    reads: Tuple[str, ...] = ()
    options: Tuple[str, ...] = ()
    localization = False
    with_masks = False
    needs_class_names = False
    has_vocabulary = False
    test_batch_size = 8

    def __init__(self, spec: TaskSpec, test_topk: int = 100):
        """
        Args:
            spec: the task's config (``cfg.TASKS.<NAME>``).
            test_topk: detections kept per image at inference (localization tasks).
        """
        self.spec = spec
        self.test_topk = test_topk

    # ------------------------------------------------------------------ model (paper Fig. 2)
    def encode_inputs(self, model, batched_inputs: Sequence[dict]) -> TaskInputs:
        """Images / texts -> the token batch x (f_image, f_text)."""
        raise NotImplementedError

    def encode_targets(self, model, batched_inputs: Sequence[dict], inputs: TaskInputs,
                       **options) -> TargetEmbeddings:
        """The target set Y -> (C, d) embeddings g(f_text(y)) (paper Eq. 6)."""
        raise NotImplementedError

    def class_name_targets(self, model, class_names: Optional[Sequence[str]] = None) -> TargetEmbeddings:
        """Class names as targets (paper Eq. 6): ``class_names`` when given (inference: open
        vocabulary), else the spec's; (C, d) embeddings.

        Raises:
            ValueError: no class names, a single string, an empty or repeated name.
        """
        names = self.spec.class_names if class_names is None else check_class_names(class_names)
        if len(names) == 0:
            raise ValueError("class_names is empty: give at least one class name")
        return model.embed_texts(names, self.input_modalities)

    def losses(self, model, outputs: DecoderOutput, targets: TargetEmbeddings, inputs: TaskInputs,
               batched_inputs: Sequence[dict]) -> Dict[str, torch.Tensor]:
        """Training loss of Eq. 7 from g's output and the targets: {name: 0-dim float}."""
        raise NotImplementedError

    def postprocess(self, model, outputs: DecoderOutput, targets: TargetEmbeddings, inputs: TaskInputs,
                    batched_inputs: Sequence[dict], **options) -> List[dict]:
        """Results from g's output (the likelihood of every target): one dict per input."""
        raise NotImplementedError

    def predict(self, model, inputs: TaskInputs, targets: TargetEmbeddings, batched_inputs: Sequence[dict],
                **options) -> List[dict]:
        """Inference: g over the inputs, then :meth:`postprocess`. Tasks that decode step by step
        (captioning) override it."""
        outputs = model.unified_decoder(inputs.batch, read=self.reads)
        return self.postprocess(model, outputs, targets, inputs, batched_inputs, **options)

    # ------------------------------------------------------------------ data and evaluation
    def build_mapper(self, cfg, is_train: bool):
        """The detectron2 dataset mapper of this task's datasets."""
        raise NotImplementedError

    def build_evaluator(self, cfg, dataset_name: str, output_dir: Optional[str] = None):
        """The detectron2 ``DatasetEvaluator`` of this task on ``dataset_name``."""
        raise NotImplementedError

    def log_batch(self, batch: Sequence[dict], storage) -> None:
        """Write per-iteration statistics of a training batch to the event storage (called on
        every rank after the step; default: nothing)."""

    def check_options(self, options: Dict[str, Any]) -> None:
        """Raises TypeError for an inference option the task does not take."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(f"task {self.spec.name} ({self.spec.type}) takes the options {list(self.options)}, "
                            f"got {unknown}")
