"""The inference checkpoint: a folder that holds everything a trained UP2 needs to predict.

    <folder>/
      up2_checkpoint.json   {"format": "up2-inference-checkpoint", "format_version": 1, ...}
      model.safetensors     every tensor of the model's state_dict (no optimizer, no trainer state)
      config.yaml           the training config (class names and vocabulary ids included; MODEL.WEIGHTS "")
      task_data.json        class names of every task and the dataset vocabularies (``task_data_of``)
      text_encoder/         the text encoder's Hugging Face config and tokenizer (its weights are in
                            model.safetensors), so the folder does not need MODEL.TEXT_ENCODER.NAME
      README.md             the model card (``up2.checkpoint.model_card``)

It is written by the trainer at the end of training (``OUTPUT_DIR/model_final_inference``, next to
detectron2's ``model_final.pth``, which stays for ``--resume``) and by ``python -m up2.export``
for an existing training checkpoint. Its size is that of the weights (plus a few small files).

Loading needs neither the training data nor the training config: ``inference_config(folder)`` is
the config to build the model from, ``load_inference_state(folder)`` the weights;
``GeneralistPredictor.from_pretrained(folder)``, ``BatchPredictor`` and ``train_net.py`` (through
:class:`up2.checkpoint.UP2Checkpointer`) accept the folder as ``MODEL.WEIGHTS``.

Format versions: a reader accepts :data:`FORMAT_VERSION` and the older versions it has an upgrade
for (none yet); any other version is refused with a message naming it.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
import sys
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from up2.utils.atomic import atomic_write, to_strict_json, write_json_atomic

__all__ = [
    "FORMAT", "FORMAT_VERSION", "FORMAT_FILE", "WEIGHTS_FILE", "CONFIG_FILE", "TASK_DATA_FILE", "CARD_FILE",
    "TEXT_ENCODER_DIR", "FINAL_FOLDER", "is_inference_checkpoint", "read_format", "save_inference_checkpoint",
    "load_inference_state", "read_safetensors", "read_task_data", "inference_config", "config_for_weights", "state_dict_for_saving",
]

FORMAT = "up2-inference-checkpoint"
FORMAT_VERSION = 1
FORMAT_FILE = "up2_checkpoint.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TASK_DATA_FILE = "task_data.json"
CARD_FILE = "README.md"
TEXT_ENCODER_DIR = "text_encoder"
FINAL_FOLDER = "model_final_inference"  # the trainer writes OUTPUT_DIR/<FINAL_FOLDER>

# Older format versions this up2 can read: version -> function upgrading the loaded
# (state_dict, task_data) to the current version. Empty: version 1 is the first.
_UPGRADES: Dict[int, object] = {}
# safetensors metadata (str -> str): the format version, and {duplicate key: stored key} of
# tensors that share storage in the model (tied weights are stored once).
_META_VERSION, _META_ALIASES = "up2_format_version", "up2_aliases"

logger = logging.getLogger(__name__)


def is_inference_checkpoint(path: str) -> bool:
    """Whether ``path`` is a folder with an ``up2_checkpoint.json`` (a local path; ``$VAR`` not expanded)."""
    return bool(path) and os.path.isdir(path) and os.path.isfile(os.path.join(path, FORMAT_FILE))


def read_format(folder: str) -> dict:
    """The validated content of ``<folder>/up2_checkpoint.json``.

    Returns:
        the dict, with ``format_version`` an int this up2 reads.

    Raises:
        FileNotFoundError: ``folder`` is not a folder, or has no ``up2_checkpoint.json`` (then it
            is not an inference checkpoint; the message says how to make one).
        ValueError: the file is not JSON, names another format, or a format version this up2
            cannot read (the message names the version, and whether up2 or the checkpoint is
            the older one).
    """
    path = os.path.join(folder, FORMAT_FILE)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder; an up2 inference checkpoint is a folder with "
                                f"{FORMAT_FILE}")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{folder!r} is not an up2 inference checkpoint: no {FORMAT_FILE} in it. Training writes one to "
            f"OUTPUT_DIR/{FINAL_FOLDER}; `python -m up2.export --config-file CONFIG MODEL.WEIGHTS model_final.pth "
            "--output FOLDER` makes one from a training checkpoint")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise ValueError(f"{path}: format {got!r}; expected {FORMAT!r}")
    version = info.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{path}: format_version {version!r}; expected an integer")
    readable = sorted([FORMAT_VERSION, *_UPGRADES])
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{folder}: up2 inference checkpoint format version {version} is newer than this up2 reads "
            f"(versions {readable}); it was written by up2 {info.get('up2_version', '?')}: upgrade up2 to load it")
    if version != FORMAT_VERSION and version not in _UPGRADES:
        raise ValueError(
            f"{folder}: up2 inference checkpoint format version {version} is older than any this up2 reads "
            f"(versions {readable}); re-export it with the up2 that wrote it (up2 {info.get('up2_version', '?')}, "
            "`python -m up2.export`) from its training checkpoint")
    return info


# ---------------------------------------------------------------------------------- writing
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def state_dict_for_saving(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The model's ``state_dict`` as contiguous CPU tensors that safetensors can store.

    Tensors that are the same view of one storage (tied weights) are stored once; partial
    views of a shared storage are copied.

    Returns:
        (tensors, aliases): ``aliases`` maps a left-out key to the stored key it equals.

    Raises:
        TypeError: a state_dict entry that is not a tensor (names the key).
    """
    tensors: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    storages = set()
    for key, value in _unwrap(model).state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor: it cannot be "
                            "stored in model.safetensors")
        view = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()),
                value.dtype)
        if value.numel() and view in seen:
            aliases[key] = seen[view]
            continue
        shared = value.numel() and value.untyped_storage().data_ptr() in storages
        seen[view] = key
        storages.add(value.untyped_storage().data_ptr())
        t = value.detach().to("cpu")
        tensors[key] = t.clone(memory_format=torch.contiguous_format) if shared or not t.is_contiguous() else t
    return tensors, aliases


def _package_versions() -> Dict[str, str]:
    from importlib import metadata

    import up2

    out = {"python": sys.version.split()[0], "up2": up2.__version__}
    for dist in ("torch", "torchvision", "detectron2", "sal-detectron2", "transformers", "tokenizers", "timm",
                 "safetensors", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    if "detectron2" not in out:
        try:
            import detectron2

            out["detectron2"] = getattr(detectron2, "__version__", "?")
        except ImportError:
            pass
    return out


def _new_sibling_folder(path: str, tag: str) -> str:
    """A new empty folder ``.<tag>-<random>-<name>`` next to ``path`` (mode 0o777 & ~umask)."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    for _ in range(100):
        candidate = os.path.join(parent, f".{tag}-{secrets.token_hex(6)}-{os.path.basename(os.path.abspath(path))}")
        try:
            os.mkdir(candidate)  # 0o777 & ~umask, like any new folder (tempfile.mkdtemp would give 0o700)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary folder next to {path}")


def _replace_folder(tmp: str, folder: str) -> None:
    """Move the finished ``tmp`` to ``folder``; a previous ``folder`` is replaced (an existing
    non-checkpoint folder with content is refused, so nothing unrelated is deleted)."""
    if os.path.lexists(folder):
        if not os.path.isdir(folder) or os.path.islink(folder):
            raise FileExistsError(f"output {folder!r} exists and is not a folder")
        if os.listdir(folder) and not is_inference_checkpoint(folder):
            raise FileExistsError(f"output folder {folder!r} exists, is not empty and is not an up2 inference "
                                  "checkpoint: choose another folder (nothing was written there)")
        old = _new_sibling_folder(folder, "old")
        os.rmdir(old)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def save_inference_checkpoint(model: nn.Module, cfg, folder: str, *, metrics: Optional[Mapping] = None,
                              iteration: Optional[int] = None, source: str = "") -> str:
    """Write the inference checkpoint of ``model`` to ``folder`` (module docstring), atomically.

    Everything is written to a temporary sibling folder that replaces ``folder`` at the end, so
    ``folder`` is never half-written; files get the default mode (``0o666 & ~umask``).

    Args:
        model: a ``UniPerceiverV2`` (or its DDP wrapper) holding the trained weights.
        cfg: the config it was built from, with the task data resolved (``resolve_task_data``):
            every task carries its CLASS_NAMES / VOCABULARY_IDS.
        folder: output folder; an existing inference checkpoint there is replaced.
        metrics: results of the last evaluation (``UP2Trainer.test``'s nested dict), or None.
        iteration: training iterations behind the weights (for the card), or None.
        source: where the weights came from (for the card), e.g. the training checkpoint's path.

    Returns:
        ``folder``.

    Raises:
        ValueError: a task of ``cfg`` without its class names / vocabulary ids.
        FileExistsError: ``folder`` is a file, or a non-empty folder that is not an inference checkpoint.
    """
    from safetensors.torch import save_file

    import up2
    from up2.checkpoint.model_card import model_card
    from up2.modeling.tasks.task_data import task_data_of, task_specs_for_model

    model = _unwrap(model)
    stored_cfg = cfg.clone()
    stored_cfg.defrost()
    stored_cfg.MODEL.WEIGHTS = ""  # the weights are model.safetensors, next to this config
    specs = task_specs_for_model(stored_cfg)  # raises when a task lacks its class names / vocabulary
    folder = os.path.abspath(os.fspath(folder))
    tmp = _new_sibling_folder(folder, "tmp")
    try:
        with atomic_write(os.path.join(tmp, CONFIG_FILE)) as f:
            f.write(stored_cfg.dump())
        tensors, aliases = state_dict_for_saving(model)
        weights = os.path.join(tmp, WEIGHTS_FILE)
        save_file(tensors, weights,
                  metadata={_META_VERSION: str(FORMAT_VERSION), _META_ALIASES: json.dumps(aliases, sort_keys=True)})
        # safetensors creates its file 0o600: give it the mode of any new file (that of config.yaml)
        os.chmod(weights, stat.S_IMODE(os.stat(os.path.join(tmp, CONFIG_FILE)).st_mode))
        task_data = task_data_of(specs)
        write_json_atomic(task_data, os.path.join(tmp, TASK_DATA_FILE))
        text = getattr(model, "text_encoder", None)
        if text is not None:
            text_dir = os.path.join(tmp, TEXT_ENCODER_DIR)
            text.model.config.save_pretrained(text_dir)
            text.tokenizer.save_pretrained(text_dir)
        versions = _package_versions()
        weights_bytes = os.path.getsize(os.path.join(tmp, WEIGHTS_FILE))
        with atomic_write(os.path.join(tmp, CARD_FILE)) as f:
            f.write(model_card(model, stored_cfg, specs, metrics=metrics, iteration=iteration, source=source,
                               versions=versions, weights_bytes=weights_bytes))
        info = {"format": FORMAT, "format_version": FORMAT_VERSION, "up2_version": up2.__version__,
                "weights": WEIGHTS_FILE, "config": CONFIG_FILE, "task_data": TASK_DATA_FILE,
                "text_encoder": TEXT_ENCODER_DIR if text is not None else None, "card": CARD_FILE,
                "iteration": iteration, "tensors": len(tensors) + len(aliases), "weights_bytes": weights_bytes,
                "metrics": to_strict_json(dict(metrics)) if metrics else None, "package_versions": versions}
        write_json_atomic(info, os.path.join(tmp, FORMAT_FILE))  # last: marks the folder complete
        _replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(f"wrote the inference checkpoint {folder} ({weights_bytes / 1e6:.1f} MB of weights)")
    return folder


# ---------------------------------------------------------------------------------- reading
def read_task_data(folder: str) -> dict:
    """``<folder>/task_data.json`` of an inference checkpoint (format checked first).

    Raises:
        FileNotFoundError / ValueError: as :func:`read_format`; a missing or unreadable task_data.json.
    """
    read_format(folder)
    path = os.path.join(folder, TASK_DATA_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise ValueError(f"{path}: expected {{'version': ..., 'tasks': {{name: ...}}}}")
    return data


def read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors on the CPU, the file's str -> str metadata) of a safetensors file.

    Raises:
        ValueError: a file safetensors cannot read, naming it and the library's error.
    """
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def load_inference_state(path: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """The weights and the task data of an inference checkpoint.

    Args:
        path: the folder, or its ``model.safetensors``.

    Returns:
        (state_dict: str -> CPU tensor, with tied weights restored under every name; task data).

    Raises:
        FileNotFoundError / ValueError: as :func:`read_format`; a weights file that is missing,
            unreadable or whose recorded format version differs from up2_checkpoint.json's.
    """
    folder = os.path.dirname(path) if os.path.basename(path) == WEIGHTS_FILE and os.path.isfile(path) else path
    info = read_format(folder)
    weights = os.path.join(folder, info.get("weights") or WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{folder}: the weights file {os.path.basename(weights)} is missing")
    state, meta = read_safetensors(weights)
    if meta.get(_META_VERSION) != str(info["format_version"]):
        raise ValueError(f"{weights}: written as format version {meta.get(_META_VERSION)!r}, but {FORMAT_FILE} says "
                         f"{info['format_version']}: the folder mixes files of different exports")
    for dup, stored in json.loads(meta.get(_META_ALIASES) or "{}").items():
        state[dup] = state[stored]
    task_data = read_task_data(folder)
    version = info["format_version"]
    if version != FORMAT_VERSION:
        state, task_data = _UPGRADES[version](state, task_data)
    return state, task_data


def _pick_device(requested: Optional[str], configured: str) -> str:
    if requested:
        return requested
    if configured.startswith("cuda") and not torch.cuda.is_available():
        logger.info(f"MODEL.DEVICE {configured!r} is not available here: loading on the CPU")
        return "cpu"
    return configured


def config_for_weights(cfg):
    """``cfg`` made ready to build the model that ``MODEL.WEIGHTS`` holds.

    When MODEL.WEIGHTS (``$VAR`` and ``~`` expanded) is an inference checkpoint folder, the
    returned clone takes the text encoder's architecture and tokenizer from the folder
    (``MODEL.TEXT_ENCODER.NAME`` = ``<folder>/text_encoder``, ``RANDOM_INIT`` True: its weights come
    from model.safetensors), so the training machine's text-encoder folder is not needed; class
    names and vocabularies missing from ``cfg`` are read from the folder when the model is built
    (``task_specs_for_model``). Any other MODEL.WEIGHTS returns ``cfg`` itself.

    Raises:
        ValueError: MODEL.WEIGHTS uses an unset environment variable, or the folder's format
            version cannot be read (:func:`read_format`).
    """
    from up2.utils.paths import expand_path

    path = expand_path(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
    if not is_inference_checkpoint(path):
        return cfg
    info = read_format(path)
    out = cfg.clone()
    frozen = out.is_frozen()
    out.defrost()
    out.MODEL.WEIGHTS = os.path.abspath(path)
    if info.get("text_encoder"):
        out.MODEL.TEXT_ENCODER.NAME = os.path.join(os.path.abspath(path), info["text_encoder"])
        out.MODEL.TEXT_ENCODER.RANDOM_INIT = True  # the architecture here, the weights in model.safetensors
    if frozen:
        out.freeze()
    return out


def inference_config(folder: str, opts=(), device: Optional[str] = None):
    """The config to build the model of an inference checkpoint, from the folder alone.

    Args:
        folder: the inference checkpoint (``$VAR`` and ``~`` expanded).
        opts: config overrides ``[KEY, VALUE, ...]`` applied after the stored config.
        device: MODEL.DEVICE; None = the stored one, or "cpu" when that is CUDA and none is
            available (``opts`` may still set MODEL.DEVICE).

    Returns:
        a frozen detectron2 config with MODEL.WEIGHTS = the folder (see :func:`config_for_weights`).

    Raises:
        FileNotFoundError / ValueError: as :func:`read_format`; a config.yaml this up2 cannot
            merge (e.g. keys of a newer up2).
    """
    from detectron2.config import get_cfg

    from up2.config import add_up2_config
    from up2.utils.paths import expand_path

    folder = os.path.abspath(expand_path(os.fspath(folder), "folder"))
    info = read_format(folder)
    cfg = get_cfg()
    add_up2_config(cfg)
    path = os.path.join(folder, info.get("config") or CONFIG_FILE)
    try:
        cfg.merge_from_file(path)
    except (KeyError, ValueError, TypeError, OSError) as e:
        raise ValueError(f"{path} (written by up2 {info.get('up2_version', '?')}, format version "
                         f"{info['format_version']}) cannot be merged into this up2's config: {e}") from e
    cfg.MODEL.DEVICE = _pick_device(device, cfg.MODEL.DEVICE)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.WEIGHTS = folder
    cfg = config_for_weights(cfg)
    cfg.freeze()
    return cfg
