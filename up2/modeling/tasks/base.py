"""Task registry and the frozen task description that travels with a batch (DESIGN §5).

A task is a value: a :class:`TaskSpec` built from ``cfg.TASKS.<NAME>`` plus a task object
from ``TASK_REGISTRY`` (keyed by the spec's TYPE). Adding a task adds a file here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from fvcore.common.registry import Registry

__all__ = ["TASK_REGISTRY", "TaskSpec", "register_task", "task_specs_from_config"]

TASK_REGISTRY = Registry("UP2_TASK")
TASK_REGISTRY.__doc__ = "Task adapters of UniPerceiverV2, keyed by cfg.TASKS.<NAME>.TYPE."


def register_task(type_name: str):
    """Class decorator: register a task adapter under the config TYPE ``type_name``."""

    def deco(cls):
        TASK_REGISTRY._do_register(type_name, cls)
        return cls

    return deco


@dataclass(frozen=True)
class TaskSpec:
    """One task of the multi-task mix (paper Eq. 7, §4.4).

    Attributes:
        name: the key under cfg.TASKS (e.g. "DETECTION").
        type: registry key of the task adapter ("detection", "instance_segmentation").
        datasets_train / datasets_test: detectron2 dataset names.
        ims_per_batch: images per iteration over all ranks.
        sampling_ratio: s_k (un-normalised here). loss_weight: w_k. grad_weight: omega_k.
        class_names: the target set of a classification-like task (thing_classes of the first
            training dataset); empty for tasks without one.
        vocabulary: target vocabulary of captioning / masked LM: "full" (every token of the
            tokenizer) or "dataset" (only tokens that occur in the training texts; small runs).
        beam_size / max_caption_length: captioning decoding (beam 1 = greedy; tokens, no specials).
        gather_features: retrieval negatives from all ranks (paper's Gather Feature).
    """

    name: str
    type: str
    datasets_train: Tuple[str, ...]
    datasets_test: Tuple[str, ...]
    ims_per_batch: int
    sampling_ratio: float = 1.0
    loss_weight: float = 1.0
    grad_weight: float = 1.0
    class_names: Tuple[str, ...] = ()
    vocabulary: str = "full"
    beam_size: int = 1
    max_caption_length: int = 20
    gather_features: bool = True


_NEEDS_CLASSES = ("detection", "instance_segmentation", "classification")


def _class_names(dataset: str) -> Tuple[str, ...]:
    meta = MetadataCatalog.get(dataset)
    if not hasattr(meta, "thing_classes"):
        DatasetCatalog.get(dataset)  # detectron2's COCO loader fills thing_classes while loading
    names = getattr(MetadataCatalog.get(dataset), "thing_classes", None)
    if not names:
        raise ValueError(f"dataset {dataset!r} has no thing_classes in its metadata")
    return tuple(names)


def task_specs_from_config(cfg) -> Dict[str, TaskSpec]:
    """Read and validate ``cfg.TASKS``.

    Returns:
        name -> TaskSpec, in config order.

    Raises:
        ValueError: no task, a TYPE not in TASK_REGISTRY, a ratio/weight <= 0, a task without
            training or test datasets, or a dataset that is not registered.
    """
    if not cfg.TASKS:
        raise ValueError("cfg.TASKS is empty: define at least one task, e.g. TASKS.DETECTION.TYPE: detection")
    known = set(DatasetCatalog.list())
    specs = {}
    for name, node in cfg.TASKS.items():
        where = f"cfg.TASKS.{name}"
        ttype = node.get("TYPE")
        if ttype not in TASK_REGISTRY:
            raise ValueError(f"{where}.TYPE={ttype!r} is not a known task type; known: {sorted(k for k, _ in TASK_REGISTRY)}")
        datasets = node.get("DATASETS", {})
        train, test = tuple(datasets.get("TRAIN", ())), tuple(datasets.get("TEST", ()))
        if not train:
            raise ValueError(f"{where}.DATASETS.TRAIN is empty: name at least one registered dataset")
        for d in train + test:
            if d not in known:
                raise ValueError(f"{where}: dataset {d!r} is not registered (registered: {sorted(known)[:20]} ...)")
        values = {k: float(node.get(k, 1.0)) for k in ("SAMPLING_RATIO", "LOSS_WEIGHT", "GRAD_WEIGHT")}
        for k, v in values.items():
            if not v > 0:
                raise ValueError(f"{where}.{k} must be > 0, got {v}")
        vocabulary = str(node.get("VOCABULARY", "full"))
        if vocabulary not in ("full", "dataset"):
            raise ValueError(f"{where}.VOCABULARY must be 'full' or 'dataset', got {vocabulary!r}")
        ims = int(node.get("IMS_PER_BATCH", cfg.SOLVER.IMS_PER_BATCH))
        if ims < 1:
            raise ValueError(f"{where}.IMS_PER_BATCH must be >= 1, got {ims}")
        specs[name] = TaskSpec(
            name=name,
            type=ttype,
            datasets_train=train,
            datasets_test=test,
            ims_per_batch=ims,
            sampling_ratio=values["SAMPLING_RATIO"],
            loss_weight=values["LOSS_WEIGHT"],
            grad_weight=values["GRAD_WEIGHT"],
            class_names=_class_names(train[0]) if ttype in _NEEDS_CLASSES else (),
            vocabulary=vocabulary,
            beam_size=int(node.get("BEAM_SIZE", 1)),
            max_caption_length=int(node.get("MAX_CAPTION_LENGTH", 20)),
            gather_features=bool(node.get("GATHER_FEATURES", True)),
        )
        if specs[name].beam_size < 1 or specs[name].max_caption_length < 1:
            raise ValueError(f"{where}: BEAM_SIZE and MAX_CAPTION_LENGTH must be >= 1")
    return specs
