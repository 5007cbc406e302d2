"""UP2Trainer: detectron2's DefaultTrainer with up2's data, evaluation and optimizer builders."""
from __future__ import annotations

import os
from collections import OrderedDict

import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from up2.data.mappers import DetectionDatasetMapper
from up2.engine.hooks import ProgressBar
from up2.modeling.tasks.base import task_specs_from_config

__all__ = ["UP2Trainer", "build_optimizer"]


def _lr_factor(cfg):
    def factor(name: str) -> float:
        if name.startswith("backbone."):
            return cfg.SOLVER.BACKBONE_MULTIPLIER
        if name.startswith("text_encoder.model."):
            return cfg.SOLVER.TEXT_ENCODER_MULTIPLIER
        return 1.0

    return factor


def _with_full_model_clipping(optim_cls, max_norm: float, norm_type: float):
    """``optim_cls`` whose ``step`` first clips the gradient norm of ALL parameters together
    (MaskDINO's "full_model" clipping; detectron2 only clips per parameter)."""

    class FullModelClipped(optim_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    FullModelClipped.__name__ = f"FullModelClipped{optim_cls.__name__}"
    return FullModelClipped


def _clipped(cfg, optim_cls):
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        return _with_full_model_clipping(optim_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    return maybe_add_gradient_clipping(cfg, optim_cls)


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (MaskDINO recipe, DESIGN §11): backbone and text encoder at reduced lr, no weight
    decay on norms, and gradient clipping from ``cfg.SOLVER.CLIP_GRADIENTS`` (CLIP_TYPE
    "full_model" clips the norm over all parameters together; "value"/"norm" as detectron2).

    Raises:
        ValueError: ``cfg.SOLVER.OPTIMIZER`` other than "ADAMW" / "SGD".
    """
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        lr_factor_func=_lr_factor(cfg),
    )
    kind = cfg.SOLVER.OPTIMIZER.upper()
    if kind == "ADAMW":
        opt = _clipped(cfg, torch.optim.AdamW)
        return opt(params, lr=cfg.SOLVER.BASE_LR)
    if kind == "SGD":
        opt = _clipped(cfg, torch.optim.SGD)
        return opt(params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV)
    raise ValueError(f"cfg.SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r}: expected 'ADAMW' or 'SGD'")


class UP2Trainer(DefaultTrainer):
    """Trains the first task of ``cfg.TASKS`` (joint multi-task sampling comes with the task sampler)."""

    def build_hooks(self):
        hooks = super().build_hooks()
        if self.cfg.UP2_PROGRESS_BAR:
            hooks.insert(0, ProgressBar(self.cfg.SOLVER.MAX_ITER))
        return hooks

    @classmethod
    def _first_task(cls, cfg):
        return next(iter(task_specs_from_config(cfg).values()))

    @classmethod
    def build_train_loader(cls, cfg):
        spec = cls._first_task(cfg)
        dataset = get_detection_dataset_dicts(
            list(spec.datasets_train), filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        return build_detection_train_loader(
            dataset=dataset,
            mapper=DetectionDatasetMapper(cfg, is_train=True),
            total_batch_size=spec.ims_per_batch,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=DetectionDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        spec = cls._first_task(cfg)
        kinds = ("bbox", "segm") if spec.type == "instance_segmentation" else ("bbox",)
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, tasks=kinds, distributed=True, output_dir=output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate on the task's test datasets (``cfg.DATASETS.TEST`` when set, else the task's)."""
        if not cfg.DATASETS.TEST:
            spec = cls._first_task(cfg)
            cfg = cfg.clone()
            cfg.defrost()
            cfg.DATASETS.TEST = list(spec.datasets_test)
            cfg.freeze()
        if not cfg.DATASETS.TEST:
            return OrderedDict()
        return super().test(cfg, model, evaluators)
