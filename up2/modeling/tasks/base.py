"""Task registry and the frozen task description that travels with a batch, read and
validated from ``cfg.TASKS`` (paper §4, Eq. 5-7).

A task is a value: a :class:`TaskSpec` built from ``cfg.TASKS.<NAME>`` plus a task object
from ``TASK_REGISTRY`` (keyed by the spec's TYPE). Adding a task adds a file here. The class
names and vocabularies a spec carries are resolved by ``up2.modeling.tasks.task_data``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from fvcore.common.registry import Registry

__all__ = [
    "TASK_REGISTRY", "TaskSpec", "register_task", "task_specs_from_config", "default_task_name",
    "implicit_default_task", "check_class_names", "TASK_KEYS", "task_input_config",
]

TASK_REGISTRY = Registry("UP2_TASK")
TASK_REGISTRY.__doc__ = "Task adapters of UniPerceiverV2, keyed by cfg.TASKS.<NAME>.TYPE."

# Every key a task node may have (cfg.TASKS.<NAME>.<KEY>); anything else is a typo.
TASK_KEYS = {
    "TYPE": "task type, a key of TASK_REGISTRY",
    "DATASETS": "{TRAIN: [...], TEST: [...]} detectron2 dataset names",
    "IMS_PER_BATCH": "images (or texts) per iteration over all ranks",
    "SAMPLING_RATIO": "s_k, paper §4.4",
    "LOSS_WEIGHT": "w_k, paper Eq. 7",
    "GRAD_WEIGHT": "omega_k, paper §4.4 (TBGN)",
    "VOCABULARY": "captioning / masked LM: 'full' or 'dataset'",
    "VOCABULARY_IDS": "resolved 'dataset' vocabulary: token ids (filled by task_data.resolve_task_data)",
    "CLASS_NAMES": "class names of a classification-like task (filled by task_data.resolve_task_data)",
    "BEAM_SIZE": "captioning beam width (1 = greedy)",
    "LENGTH_PENALTY": "captioning: final beams ranked by sum log-prob / length ** LENGTH_PENALTY",
    "MAX_CAPTION_LENGTH": "captioning: most generated tokens",
    "GATHER_FEATURES": "retrieval: negatives from all ranks (Gather Feature)",
    "MATCH_IDENTICAL_CAPTIONS": "retrieval evaluation: identical caption texts are right for every image they describe",
    "IMAGE_SIZE": "shorter image side in pixels for this task, training and test (0: cfg.INPUT's sizes)",
}
_DATASET_KEYS = ("TRAIN", "TEST")


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
        class_names: the target set of a classification-like task (``thing_classes`` of the
            first training dataset, resolved when training is set up); empty for tasks without one.
        vocabulary: target vocabulary of captioning / masked LM: "full" (every token of the
            tokenizer) or "dataset" (only tokens that occur in the training texts; small runs).
        vocabulary_ids: the resolved "dataset" vocabulary, ascending token ids; empty otherwise.
        beam_size / max_caption_length / length_penalty: captioning decoding (beam 1 = greedy;
            most generated tokens; the K final beams ranked by sum log-prob / |y| ** length_penalty,
            ``up2.modeling.beam_search``). The defaults are Uni-Perceiver's COCO caption protocol
            (its zero-shot mscoco_caption config: BEAM_SIZE 2, LEN_PENALTY 2.0); the ONE place
            they are defined (the config reader takes them from here).
        gather_features: retrieval negatives from all ranks (paper's Gather Feature).
        match_identical_captions: retrieval evaluation counts a caption right for every image
            that has a caption of the same text (``up2.evaluation.RetrievalEvaluator``); the
            paper's protocol (False) counts only the caption's own image.
        image_size: shorter image side (pixels) of this task's images in training and test; 0
            keeps cfg.INPUT's sizes. Lets image-level tasks run at a lower resolution than the
            dense ones that share the backbone (:func:`task_input_config`).
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
    vocabulary_ids: Tuple[int, ...] = ()
    beam_size: int = 2
    max_caption_length: int = 20
    length_penalty: float = 2.0
    gather_features: bool = True
    match_identical_captions: bool = False
    image_size: int = 0

    @property
    def task_class(self) -> type:
        """The registered task class of ``type`` (``up2.modeling.tasks.task.Task``)."""
        return TASK_REGISTRY.get(self.type)

    @property
    def needs_class_names(self) -> bool:
        return self.task_class.needs_class_names

    @property
    def needs_vocabulary_ids(self) -> bool:
        return self.task_class.has_vocabulary and self.vocabulary == "dataset"

    @property
    def resolved(self) -> bool:
        """Whether the spec carries every datum its type needs for inference."""
        return (not self.needs_class_names or bool(self.class_names)) and (
            not self.needs_vocabulary_ids or bool(self.vocabulary_ids))


def _default(field_name: str):
    """The default of a TaskSpec field (a config key left out takes it)."""
    return TaskSpec.__dataclass_fields__[field_name].default


def _check_keys(where: str, node) -> None:
    unknown = sorted(set(node.keys()) - set(TASK_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; a task takes {sorted(TASK_KEYS)}")
    datasets = node.get("DATASETS", None)
    if datasets is not None:
        if not hasattr(datasets, "keys"):
            raise ValueError(f"{where}.DATASETS must be a mapping {{TRAIN: [...], TEST: [...]}}, got {datasets!r}")
        bad = sorted(set(datasets.keys()) - set(_DATASET_KEYS))
        if bad:
            raise ValueError(f"{where}.DATASETS: unknown key(s) {bad}; expected {list(_DATASET_KEYS)}")


def check_class_names(value, where: str = "class_names") -> Tuple[str, ...]:
    """``value`` as a tuple of class names, checked: a list or tuple of distinct, non-empty strings
    (an empty one is allowed here; callers that need names reject it).

    Raises:
        ValueError: a single string (it would be split into letters), a non-string or empty
            name, or a repeated name (two classes would share one target); names ``where``.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{where} must be a list of class names, got {type(value).__name__} {value!r}"
                         + (f" (did you mean [{value!r}]?)" if isinstance(value, str) else ""))
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{where} must be a list of non-empty strings, got {list(value)!r}")
    names = tuple(value)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{where}: class names must be unique (two classes would share one target); repeated: {dup}")
    return names


def _ids(where: str, value) -> Tuple[int, ...]:
    if isinstance(value, str) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"{where} must be a list of token ids (ints >= 0), got {str(value)[:80]}")
    return tuple(sorted(set(value)))


def _field_of(key: str) -> str:
    return key.lower()


def _int(node, key: str, where: str) -> int:
    """``node[key]`` (or the TaskSpec default) as an int; ValueError naming the key for anything
    that is not a whole number (a string, a bool, 64.9)."""
    value = node.get(key, _default(_field_of(key)))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{where}.{key} must be a whole number, got {value!r}")
    return int(value)


def _bool(node, key: str, where: str) -> bool:
    """``node[key]`` (or the TaskSpec default) as a bool; ValueError naming the key for anything
    but True / False (a quoted "false" is not read as True)."""
    value = node.get(key, _default(_field_of(key)))
    if not isinstance(value, bool):
        raise ValueError(f"{where}.{key} must be True or False, got {value!r}")
    return value


def task_specs_from_config(cfg) -> Dict[str, TaskSpec]:
    """Read and validate ``cfg.TASKS`` (the config alone: no dataset is looked up).

    Returns:
        name -> TaskSpec, in config order. ``class_names`` / ``vocabulary_ids`` are what the
        config gives (empty until ``task_data.resolve_task_data`` fills them).

    Raises:
        ValueError: no task, a key that is not in :data:`TASK_KEYS`, a TYPE not in TASK_REGISTRY,
            a ratio/weight <= 0, a task without training datasets, malformed class names or ids,
            a BEAM_SIZE / MAX_CAPTION_LENGTH / IMAGE_SIZE that is not a whole number, a
            GATHER_FEATURES / MATCH_IDENTICAL_CAPTIONS that is not True / False, or
            MATCH_IDENTICAL_CAPTIONS on a task whose TYPE is not retrieval (each names the key).
    """
    if not cfg.TASKS:
        raise ValueError("cfg.TASKS is empty: define at least one task, e.g. TASKS.DETECTION.TYPE: detection")
    specs = {}
    for name, node in cfg.TASKS.items():
        where = f"cfg.TASKS.{name}"
        if not hasattr(node, "keys"):
            raise ValueError(f"{where} must be a mapping of task keys {sorted(TASK_KEYS)}, got {node!r}")
        _check_keys(where, node)
        ttype = node.get("TYPE")
        if ttype not in TASK_REGISTRY:
            raise ValueError(f"{where}.TYPE={ttype!r} is not a known task type; known: {sorted(k for k, _ in TASK_REGISTRY)}")
        datasets = node.get("DATASETS", {})
        train, test = tuple(datasets.get("TRAIN", ())), tuple(datasets.get("TEST", ()))
        if not train:
            raise ValueError(f"{where}.DATASETS.TRAIN is empty: name at least one registered dataset")
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
            class_names=check_class_names(node.get("CLASS_NAMES", []), f"{where}.CLASS_NAMES"),
            vocabulary=vocabulary,
            vocabulary_ids=_ids(f"{where}.VOCABULARY_IDS", node.get("VOCABULARY_IDS", [])),
            beam_size=_int(node, "BEAM_SIZE", where),
            max_caption_length=_int(node, "MAX_CAPTION_LENGTH", where),
            length_penalty=float(node.get("LENGTH_PENALTY", _default("length_penalty"))),
            gather_features=_bool(node, "GATHER_FEATURES", where),
            match_identical_captions=_bool(node, "MATCH_IDENTICAL_CAPTIONS", where),
            image_size=_int(node, "IMAGE_SIZE", where),
        )
        if specs[name].match_identical_captions and ttype != "retrieval":
            raise ValueError(f"{where}.MATCH_IDENTICAL_CAPTIONS applies to retrieval tasks only; this task's TYPE "
                             f"is {ttype!r}")
        if specs[name].image_size < 0:
            raise ValueError(f"{where}.IMAGE_SIZE must be >= 0 pixels (0: cfg.INPUT's sizes), got {specs[name].image_size}")
        if specs[name].beam_size < 1 or specs[name].max_caption_length < 1:
            raise ValueError(f"{where}: BEAM_SIZE and MAX_CAPTION_LENGTH must be >= 1")
        if not 0 <= specs[name].length_penalty < float("inf"):
            raise ValueError(f"{where}.LENGTH_PENALTY must be a finite float >= 0, got {specs[name].length_penalty}")
    return specs


def task_input_config(cfg, spec: TaskSpec):
    """``cfg`` with the image sizes of task ``spec``: when ``spec.image_size`` is set, a frozen
    copy whose INPUT resizes the shorter side to it in training and test (one scale), keeping
    the config's longer-side cap in proportion (MAX_SIZE_* x image_size / MIN_SIZE_TEST), and
    whose large-scale jitter crops at it; otherwise ``cfg`` itself.

    Raises:
        ValueError: a negative ``spec.image_size`` (names ``TASKS.<NAME>.IMAGE_SIZE``).
    """
    size = spec.image_size
    if size < 0:
        raise ValueError(f"cfg.TASKS.{spec.name}.IMAGE_SIZE must be >= 0 pixels (0: cfg.INPUT's sizes), got {size}")
    if not size:
        return cfg
    inp = cfg.INPUT
    ratio = inp.MAX_SIZE_TEST / inp.MIN_SIZE_TEST if inp.MIN_SIZE_TEST > 0 else 1.0
    cfg = cfg.clone()
    cfg.defrost()
    cfg.INPUT.MIN_SIZE_TRAIN = (size,)
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.INPUT.MIN_SIZE_TEST = size
    cfg.INPUT.MAX_SIZE_TRAIN = cfg.INPUT.MAX_SIZE_TEST = max(size, int(round(size * ratio)))
    cfg.INPUT.LSJ.IMAGE_SIZE = size
    cfg.freeze()
    return cfg


def default_task_name(cfg, specs: Optional[Dict[str, TaskSpec]] = None) -> Optional[str]:
    """The task that ``model(batched_inputs)`` runs without ``task=`` (detectron2's
    ``DefaultPredictor`` and evaluators): ``cfg.MODEL.DEFAULT_TASK`` when set, else the only
    task, else the only localization task; None when that is ambiguous (the model then asks
    for ``task=``). Never the config order: dumped configs sort their keys.

    Raises:
        ValueError: ``MODEL.DEFAULT_TASK`` names no task of ``cfg.TASKS``.
    """
    specs = specs if specs is not None else task_specs_from_config(cfg)
    chosen = cfg.MODEL.get("DEFAULT_TASK", "")
    if chosen:
        if chosen not in specs:
            raise ValueError(f"cfg.MODEL.DEFAULT_TASK={chosen!r} is not a task of cfg.TASKS {sorted(specs)}")
        return chosen
    return implicit_default_task(specs)


def implicit_default_task(specs: Dict[str, TaskSpec]) -> Optional[str]:
    """The default task when none is configured: the only task, else the only localization
    task, else None (ambiguous)."""
    if len(specs) == 1:
        return next(iter(specs))
    localization = [n for n, s in specs.items() if s.task_class.localization]
    return localization[0] if len(localization) == 1 else None
