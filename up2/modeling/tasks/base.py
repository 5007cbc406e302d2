"""Task registry, the frozen task description that travels with a batch, and the task data
(class names, dataset vocabularies) that a trained model carries (paper §4, Eq. 5-7).

A task is a value: a :class:`TaskSpec` built from ``cfg.TASKS.<NAME>`` plus a task object
from ``TASK_REGISTRY`` (keyed by the spec's TYPE). Adding a task adds a file here.

Class names and dataset vocabularies are data, not weights, but inference needs them. They are
read from the training datasets once, when training is set up (:func:`resolve_task_data`
writes them into the config as ``TASKS.<NAME>.CLASS_NAMES`` / ``VOCABULARY_IDS``, so the dumped
``config.yaml`` carries them), and the trainer stores them in every checkpoint under
:data:`TASK_DATA_KEY`. Building a model never reads ``DatasetCatalog``: it takes them from the
config, else from the checkpoint at ``MODEL.WEIGHTS`` (:func:`task_specs_for_model`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from fvcore.common.registry import Registry

__all__ = [
    "TASK_REGISTRY", "TaskSpec", "register_task", "task_specs_from_config", "task_specs_for_model",
    "resolve_task_data", "task_data_of", "read_checkpoint_task_data", "check_datasets_registered",
    "default_task_name", "implicit_default_task", "check_class_names", "TASK_KEYS", "TASK_DATA_KEY", "LOCALIZATION_TYPES",
]

TASK_REGISTRY = Registry("UP2_TASK")
TASK_REGISTRY.__doc__ = "Task adapters of UniPerceiverV2, keyed by cfg.TASKS.<NAME>.TYPE."

# Key of the task data in up2 checkpoints: {"version": 1, "tasks": {name: {"type", "class_names", "vocabulary_ids"}}}
TASK_DATA_KEY = "up2_task_data"
_TASK_DATA_VERSION = 1

# Tasks whose predictions are boxes / masks (paper §4.1 "tasks with localization").
LOCALIZATION_TYPES = ("detection", "instance_segmentation")
_NEEDS_CLASSES = LOCALIZATION_TYPES + ("classification",)
_HAS_VOCABULARY = ("captioning", "masked_lm")

# Every key a task node may have (cfg.TASKS.<NAME>.<KEY>); anything else is a typo.
TASK_KEYS = {
    "TYPE": "task type, a key of TASK_REGISTRY",
    "DATASETS": "{TRAIN: [...], TEST: [...]} detectron2 dataset names",
    "IMS_PER_BATCH": "images (or texts) per iteration over all ranks",
    "SAMPLING_RATIO": "s_k, paper §4.4",
    "LOSS_WEIGHT": "w_k, paper Eq. 7",
    "GRAD_WEIGHT": "omega_k, paper §4.4 (TBGN)",
    "VOCABULARY": "captioning / masked LM: 'full' or 'dataset'",
    "VOCABULARY_IDS": "resolved 'dataset' vocabulary: token ids (filled by resolve_task_data)",
    "CLASS_NAMES": "class names of a classification-like task (filled by resolve_task_data)",
    "BEAM_SIZE": "captioning beam width (1 = greedy)",
    "MAX_CAPTION_LENGTH": "captioning: most generated tokens",
    "GATHER_FEATURES": "retrieval: negatives from all ranks (Gather Feature)",
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
    vocabulary_ids: Tuple[int, ...] = ()
    beam_size: int = 1
    max_caption_length: int = 20
    gather_features: bool = True

    @property
    def needs_class_names(self) -> bool:
        return self.type in _NEEDS_CLASSES

    @property
    def needs_vocabulary_ids(self) -> bool:
        return self.type in _HAS_VOCABULARY and self.vocabulary == "dataset"

    @property
    def resolved(self) -> bool:
        """Whether the spec carries every datum its type needs for inference."""
        return (not self.needs_class_names or bool(self.class_names)) and (
            not self.needs_vocabulary_ids or bool(self.vocabulary_ids))


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


def task_specs_from_config(cfg) -> Dict[str, TaskSpec]:
    """Read and validate ``cfg.TASKS`` (the config alone: no dataset is looked up).

    Returns:
        name -> TaskSpec, in config order. ``class_names`` / ``vocabulary_ids`` are what the
        config gives (empty until :func:`resolve_task_data` fills them).

    Raises:
        ValueError: no task, a key that is not in :data:`TASK_KEYS`, a TYPE not in TASK_REGISTRY,
            a ratio/weight <= 0, a task without training datasets, malformed class names or ids.
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
            beam_size=int(node.get("BEAM_SIZE", 1)),
            max_caption_length=int(node.get("MAX_CAPTION_LENGTH", 20)),
            gather_features=bool(node.get("GATHER_FEATURES", True)),
        )
        if specs[name].beam_size < 1 or specs[name].max_caption_length < 1:
            raise ValueError(f"{where}: BEAM_SIZE and MAX_CAPTION_LENGTH must be >= 1")
    return specs


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
    localization = [n for n, s in specs.items() if s.type in LOCALIZATION_TYPES]
    return localization[0] if len(localization) == 1 else None


# ---------------------------------------------------------------------------- task data
def task_data_of(specs: Dict[str, TaskSpec]) -> dict:
    """The task data to store in a checkpoint under :data:`TASK_DATA_KEY` (plain lists, so
    ``torch.load(weights_only=True)`` reads it)."""
    return {
        "version": _TASK_DATA_VERSION,
        "tasks": {n: {"type": s.type, "class_names": list(s.class_names), "vocabulary_ids": list(s.vocabulary_ids)}
                  for n, s in specs.items()},
    }


def read_checkpoint_task_data(path: str) -> Optional[dict]:
    """The task data stored in an up2 checkpoint, or None when ``path`` is empty, a ``.pkl``
    (detectron2 model-zoo format), or a checkpoint without it (e.g. a converted backbone).

    Read with ``torch.load(weights_only=True, mmap=True)``: nothing is unpickled beyond
    tensors and plain containers, and the weights are not read into memory.

    Raises:
        FileNotFoundError / IsADirectoryError: ``path`` is set but is not a file.
        ValueError: not a torch checkpoint, or the stored task data has another format version.
    """
    if not path:
        return None
    from detectron2.utils.file_io import PathManager

    local = PathManager.get_local_path(path)
    if os.path.isdir(local):
        raise IsADirectoryError(f"MODEL.WEIGHTS={path!r} is a folder; expected a checkpoint file (e.g. model_final.pth)")
    if not os.path.isfile(local):
        raise FileNotFoundError(f"MODEL.WEIGHTS={path!r}: no such file")
    if local.endswith(".pkl"):  # detectron2 model-zoo pickles (converted backbones) carry no task data
        return None
    import pickle

    import torch

    try:
        try:
            ckpt = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # an old (non-zip) serialization cannot be memory-mapped
            ckpt = torch.load(local, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"MODEL.WEIGHTS={path!r} is not a readable torch checkpoint (read with weights_only=True): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    data = ckpt.get(TASK_DATA_KEY) if isinstance(ckpt, dict) else None
    if data is None:
        return None
    if data.get("version") != _TASK_DATA_VERSION:
        raise ValueError(f"{path}: task data format version {data.get('version')!r}; "
                         f"this up2 reads version {_TASK_DATA_VERSION}")
    return data


def _with_task_data(cfg, fill) -> "object":
    """A clone of ``cfg`` whose unresolved tasks got ``fill(name, spec) -> (class_names, ids)``."""
    specs = task_specs_from_config(cfg)
    out = cfg.clone()
    frozen = out.is_frozen()
    out.defrost()
    for name, spec in specs.items():
        if spec.resolved:
            continue
        got = fill(name, spec)
        if got is None:
            continue
        names, ids = got
        if spec.needs_class_names and not spec.class_names and names:
            out.TASKS[name].CLASS_NAMES = list(names)
        if spec.needs_vocabulary_ids and not spec.vocabulary_ids and ids:
            out.TASKS[name].VOCABULARY_IDS = [int(i) for i in ids]
    task_specs_from_config(out)  # validate what was filled in
    if frozen:
        out.freeze()
    return out


def _from_checkpoint(data: Optional[dict]):
    def fill(name: str, spec: TaskSpec):
        entry = (data or {}).get("tasks", {}).get(name)
        if entry is None or entry.get("type") != spec.type:
            return None
        return entry.get("class_names", []), entry.get("vocabulary_ids", [])

    return fill


def unregistered_dataset_message(dataset: str, where: str) -> str:
    """Why ``dataset`` is not registered and where up2 looked for it."""
    from up2.data.datasets.builtin import datasets_root, detectron2_datasets_root

    shapes = os.path.join(datasets_root(), "shapes")
    return (
        f"{where}: dataset {dataset!r} is not registered. up2 registers the shapes datasets when it finds "
        f"{shapes}/annotations/*.json ($UP2_DATASETS={os.environ.get('UP2_DATASETS', '<unset>')}; "
        f"`make shapes` writes them to ./datasets/shapes), the paper's datasets under $DETECTRON2_DATASETS "
        f"({detectron2_datasets_root()}); register your own with detectron2's DatasetCatalog.register "
        f"(or up2.data.register_coco_instances_checked) before building the trainer."
    )


def check_datasets_registered(specs: Dict[str, TaskSpec], train: bool = True, test: bool = True) -> None:
    """Raise when a training (with ``train``) or test (with ``test``) dataset of a task is not registered.

    Raises:
        ValueError: names the task, the dataset, the folder searched and ``$UP2_DATASETS``.
    """
    from detectron2.data import DatasetCatalog

    known = set(DatasetCatalog.list())
    for name, spec in specs.items():
        for d in (spec.datasets_train if train else ()) + (spec.datasets_test if test else ()):
            if d not in known:
                raise ValueError(unregistered_dataset_message(d, f"cfg.TASKS.{name}"))


def _dataset_class_names(dataset: str) -> Tuple[str, ...]:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    meta = MetadataCatalog.get(dataset)
    if not hasattr(meta, "thing_classes"):
        DatasetCatalog.get(dataset)  # detectron2's COCO loader fills thing_classes while loading
    names = getattr(MetadataCatalog.get(dataset), "thing_classes", None)
    if not names:
        raise ValueError(f"dataset {dataset!r} has no thing_classes in its metadata")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ValueError(f"dataset {dataset!r}: thing_classes repeat {repeated}; two classes would share one "
                         "target: rename them in the dataset's categories")
    return tuple(names)


def _dataset_texts(dataset_names: Iterable[str]) -> List[str]:
    """All texts of detectron2 datasets: each record's "captions" (list) or "text" (str).

    Raises:
        ValueError: a dataset without any text.
    """
    from detectron2.data import DatasetCatalog

    texts: List[str] = []
    for name in dataset_names:
        found = 0
        for r in DatasetCatalog.get(name):
            if "captions" in r:
                texts.extend(r["captions"])
                found += len(r["captions"])
            elif "text" in r:
                texts.append(r["text"])
                found += 1
        if not found:
            raise ValueError(f"dataset {name!r} has no 'captions' or 'text' to build a vocabulary from")
    return texts


def _from_datasets(cfg):
    tokenizer = []

    def fill(name: str, spec: TaskSpec):
        names = _dataset_class_names(spec.datasets_train[0]) if spec.needs_class_names else ()
        ids: Tuple[int, ...] = ()
        if spec.needs_vocabulary_ids:
            from up2.modeling.text_encoder import load_tokenizer
            from up2.modeling.tasks.vocabulary import vocabulary_ids_of_texts

            if not tokenizer:
                tokenizer.append(load_tokenizer(cfg.MODEL.TEXT_ENCODER.NAME))
            ids = vocabulary_ids_of_texts(tokenizer[0], _dataset_texts(spec.datasets_train))
        return names, ids

    return fill


def resolve_task_data(cfg, use_checkpoint: bool = False):
    """A clone of ``cfg`` (frozen if ``cfg`` was) in which every task carries the data inference
    needs: ``TASKS.<NAME>.CLASS_NAMES`` (``thing_classes`` of its first training dataset) for
    detection, instance segmentation and classification, ``TASKS.<NAME>.VOCABULARY_IDS`` (the
    token ids of its training texts) for captioning / masked LM with ``VOCABULARY: dataset``.
    Values already in the config are kept. Called once when training is set up.

    Args:
        use_checkpoint: first take what the checkpoint at ``MODEL.WEIGHTS`` carries (evaluation
            of a trained model); datasets are read only for what is still missing.

    Raises:
        ValueError: a dataset that is not registered (the message says where up2 looked), or
            one without ``thing_classes`` / texts.
    """
    specs = task_specs_from_config(cfg)
    if all(s.resolved for s in specs.values()):
        return cfg
    if use_checkpoint:
        cfg = _with_task_data(cfg, _from_checkpoint(read_checkpoint_task_data(cfg.MODEL.WEIGHTS)))
        specs = task_specs_from_config(cfg)
    missing = {n: s for n, s in specs.items() if not s.resolved}
    if missing:
        check_datasets_registered(missing, test=False)
        cfg = _with_task_data(cfg, _from_datasets(cfg))
    return cfg


def task_specs_for_model(cfg) -> Dict[str, TaskSpec]:
    """The task specs a model is built from: the config's, completed from the checkpoint at
    ``MODEL.WEIGHTS`` where the config lacks class names or vocabulary ids. No dataset is read.

    Raises:
        ValueError: a task still lacks them; the message names the task, the key and how to
            provide it.
    """
    specs = task_specs_from_config(cfg)
    if not all(s.resolved for s in specs.values()):
        specs = task_specs_from_config(
            _with_task_data(cfg, _from_checkpoint(read_checkpoint_task_data(cfg.MODEL.WEIGHTS))))
    for name, spec in specs.items():
        if spec.resolved:
            continue
        key = "CLASS_NAMES" if spec.needs_class_names and not spec.class_names else "VOCABULARY_IDS"
        weights = (f"MODEL.WEIGHTS={cfg.MODEL.WEIGHTS!r} is not an up2 checkpoint that carries it"
                   if cfg.MODEL.WEIGHTS else "MODEL.WEIGHTS is empty")
        raise ValueError(
            f"cfg.TASKS.{name} ({spec.type}) has no {key}, and {weights}. Use the config.yaml that training wrote next to its checkpoints, point "
            f"MODEL.WEIGHTS at an up2 checkpoint, set TASKS.{name}.{key} yourself, or resolve it from the "
            f"registered training datasets with up2.modeling.tasks.resolve_task_data(cfg) (what training does)."
        )
    return specs
