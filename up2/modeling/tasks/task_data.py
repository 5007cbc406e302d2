"""Task data: the class names and dataset vocabularies a trained model carries (paper §4.2-4.3:
class names and vocabulary tokens are the target sets Y of Eq. 5-6).

They are data, not weights, but inference needs them. They are read from the training datasets
once, when training is set up (:func:`resolve_task_data` writes them into the config as
``TASKS.<NAME>.CLASS_NAMES`` / ``VOCABULARY_IDS``, so the dumped ``config.yaml`` carries them),
and the trainer stores them in every checkpoint under :data:`TASK_DATA_KEY`. Building a model
never reads ``DatasetCatalog``: it takes them from the config, else from the checkpoint at
``MODEL.WEIGHTS`` (:func:`task_specs_for_model`).
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Tuple

from up2.modeling.tasks.base import TaskSpec, task_specs_from_config
from up2.utils.paths import expand_path

__all__ = [
    "TASK_DATA_KEY", "task_data_of", "read_checkpoint_task_data", "resolve_task_data", "task_specs_for_model",
    "check_datasets_registered", "unregistered_dataset_message",
]

# Key of the task data in up2 checkpoints: {"version": 1, "tasks": {name: {"type", "class_names", "vocabulary_ids"}}}
TASK_DATA_KEY = "up2_task_data"
_TASK_DATA_VERSION = 1


def task_data_of(specs: Dict[str, TaskSpec]) -> dict:
    """The task data to store in a checkpoint under :data:`TASK_DATA_KEY` (plain lists, so
    ``torch.load(weights_only=True)`` reads it)."""
    return {
        "version": _TASK_DATA_VERSION,
        "tasks": {n: {"type": s.type, "class_names": list(s.class_names), "vocabulary_ids": list(s.vocabulary_ids)}
                  for n, s in specs.items()},
    }


def read_checkpoint_task_data(path: str) -> Optional[dict]:
    """The task data stored in an up2 checkpoint (a training checkpoint file, or an inference
    checkpoint folder: its task_data.json), or None when ``path`` is empty, a ``.pkl`` (detectron2
    model-zoo format), a ``.safetensors`` file or a checkpoint without it (e.g. a converted backbone).

    Read with ``torch.load(weights_only=True, mmap=True)``: nothing is unpickled beyond
    tensors and plain containers, and the weights are not read into memory.

    Raises:
        FileNotFoundError / IsADirectoryError: ``path`` is set but is neither a file nor an
            inference checkpoint folder.
        ValueError: not a torch checkpoint, an inference checkpoint of a format version this up2
            cannot read, the stored task data has another format version, or
            ``path`` uses an environment variable that is not set (``$VAR`` and ``~`` are expanded).
    """
    if not path:
        return None
    from detectron2.utils.file_io import PathManager

    local = PathManager.get_local_path(expand_path(path, "MODEL.WEIGHTS"))
    if os.path.isdir(local):
        from up2.checkpoint.inference_checkpoint import is_inference_checkpoint, read_task_data

        if not is_inference_checkpoint(local):
            raise IsADirectoryError(f"MODEL.WEIGHTS={path!r} is a folder without up2_checkpoint.json; expected a "
                                    "checkpoint file (e.g. model_final.pth) or an up2 inference checkpoint folder")
        data = read_task_data(local)  # up2.checkpoint: the folder's task_data.json, format version checked
    elif not os.path.isfile(local):
        raise FileNotFoundError(f"MODEL.WEIGHTS={path!r}: no such file")
    elif local.endswith((".pkl", ".safetensors")):  # model-zoo pickles, converted backbones: no task data
        return None
    else:
        data = _torch_checkpoint_task_data(local, path)
    if data is None:
        return None
    if data.get("version") != _TASK_DATA_VERSION:
        raise ValueError(f"{path}: task data format version {data.get('version')!r}; "
                         f"this up2 reads version {_TASK_DATA_VERSION}")
    return data


def _torch_checkpoint_task_data(local: str, path: str) -> Optional[dict]:
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
    return ckpt.get(TASK_DATA_KEY) if isinstance(ckpt, dict) else None


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
