"""Tiny UniPerceiverV2 models and mapped inputs for the task and meta-architecture tests.

Every builder goes through the public entry points only (``tiny_cfg`` / ``add_task`` from
conftest, ``resolve_task_data``, detectron2's ``build_model``, the trainer's mappers), so the
tests survive rewrites of the task classes' internals. Needs the ``shapes_datasets`` fixture.
"""
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from conftest import add_task, tiny_cfg

# (train, test) shapes datasets of each task type (registered by conftest.shapes_datasets)
TASK_DATASETS = {
    "instance_segmentation": ("test_shapes_train", "test_shapes_val"),
    "detection": ("test_shapes_train", "test_shapes_val"),
    "classification": ("test_shapes_cls_train", "test_shapes_cls_val"),
    "retrieval": ("test_shapes_caption_train", "test_shapes_caption_val"),
    "captioning": ("test_shapes_caption_train", "test_shapes_caption_val"),
    "masked_lm": ("test_shapes_text_train", "test_shapes_text_val"),
}


def tiny_model_cfg(tasks, default_task: str = "", **overrides):
    """The tiny config with the given tasks, class names / vocabularies resolved.

    Args:
        tasks: {name: (task type, {extra TASKS.<name> keys})}.
        default_task: MODEL.DEFAULT_TASK ("" = none configured).
    """
    from up2.modeling.tasks import resolve_task_data

    cfg = tiny_cfg(task_type=None, **overrides)
    for name, (task_type, keys) in tasks.items():
        train, test = TASK_DATASETS[task_type]
        add_task(cfg, name, task_type, train, test, **keys)
    cfg.MODEL.DEFAULT_TASK = default_task
    return resolve_task_data(cfg)


def tiny_model(tasks, default_task: str = "", seed: int = 0, **overrides):
    """(cfg, model) for ``tiny_model_cfg(tasks, default_task)``, initialised from ``seed``, on CPU."""
    cfg = tiny_model_cfg(tasks, default_task, **overrides)
    torch.manual_seed(seed)
    return cfg, build_model(cfg)


def mapped_inputs(cfg, model, name: str, n: int = 4, is_train: bool = False, dataset: str = None):
    """The first ``n`` records of the task's first train (``is_train``) or test dataset, through
    the task's own mapper (training mappers draw augmentations: seed before calling)."""
    from up2.engine.trainer import build_mapper

    spec = model.tasks[name].spec
    if dataset is None:
        dataset = (spec.datasets_train if is_train else spec.datasets_test)[0]
    mapper = build_mapper(cfg, spec, is_train=is_train)
    return [mapper(r) for r in DatasetCatalog.get(dataset)[:n]]
