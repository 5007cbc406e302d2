"""UP2Checkpointer: detectron2's ``DetectionCheckpointer`` that reads up2 inference checkpoints and
safetensors, never unpickles without consent, and writes checkpoints atomically.

What ``load(path)`` accepts:

- an inference checkpoint folder (``up2.checkpoint.inference_checkpoint``) or its ``model.safetensors``;
- any ``.safetensors`` file (e.g. a converted backbone of ``projects/convert/``; its metadata may
  ask for detectron2's name matching with ``matching_heuristics: "True"``);
- ``.pth`` / ``.pt`` / ``.pyth`` and other torch files, read with ``torch.load(weights_only=True)``:
  tensors and plain containers only, so loading runs no code (detectron2's training checkpoints,
  which ``--resume`` reads, are such files: up2's trainer state is tensors, numbers and tuples);
- ``.pkl`` (detectron2 / Caffe2 model-zoo pickles) only with ``allow_pickle=True``
  (``MODEL.ALLOW_PICKLE_WEIGHTS``): unpickling a file runs whatever code it holds.
  ``allow_pickle`` also lets a torch file that ``weights_only`` refuses be read in full.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Dict, IO, cast

import torch
from detectron2.checkpoint import DetectionCheckpointer

from up2.checkpoint.inference_checkpoint import (
    WEIGHTS_FILE, is_inference_checkpoint, load_inference_state, read_format, read_safetensors)
from up2.utils.atomic import atomic_write

__all__ = ["UP2Checkpointer", "PickleRefusedError", "pickle_refused_message", "weights_only_reason"]

ALLOW_PICKLE_KEY = "MODEL.ALLOW_PICKLE_WEIGHTS"


class PickleRefusedError(ValueError):
    """A pickle file was not opened because unpickling was not allowed."""


def pickle_refused_message(path: str, detail: str = "") -> str:
    """Why ``path`` was not opened, and the explicit opt-in (``MODEL.ALLOW_PICKLE_WEIGHTS``)."""
    return (f"{path}: {detail or 'a .pkl file is a Python pickle'}; unpickling runs whatever code the file holds, "
            f"so up2 does not open it unless you trust its source and opt in with {ALLOW_PICKLE_KEY} True "
            "(`--allow-pickle` for the converters). Safer: convert it once to .safetensors with projects/convert/ "
            "(or save its state_dict of tensors with torch.save)")


def weights_only_reason(error: BaseException) -> str:
    """The specific line of torch's "Weights only load failed" error (e.g. "Trying to load
    unsupported GLOBAL posix.system ..."), without its generic advice."""
    lines = [ln.strip() for ln in str(error).splitlines()[1:] if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Please file an issue", "Check the documentation"))]
    return " ".join(lines) or type(error).__name__


class UP2Checkpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with up2's formats and safety rules (module docstring).

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        allow_pickle: open ``.pkl`` files and torch files that ``weights_only=True`` refuses
            (``cfg.MODEL.ALLOW_PICKLE_WEIGHTS``).

    After ``load``, ``last_incompatible`` holds the missing / unexpected keys of the model load.
    """

    def __init__(self, model, save_dir: str = "", *, allow_pickle: bool = False, save_to_disk=None,
                 **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.allow_pickle = bool(allow_pickle)
        self.last_incompatible = None

    # ------------------------------------------------------------------ loading
    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        """Load ``path`` (module docstring: what it may be).

        Raises:
            IsADirectoryError: a folder that is not an inference checkpoint.
            FileNotFoundError / ValueError: an inference checkpoint of a format version this up2
                cannot read (the message names it), an unreadable file.
            PickleRefusedError: a pickle without ``allow_pickle`` (the message names the opt-in).
        """
        if path and os.path.isdir(path):
            if not is_inference_checkpoint(path):
                raise IsADirectoryError(
                    f"checkpoint {path!r} is a folder without up2_checkpoint.json; expected a checkpoint file "
                    "(e.g. model_final.pth) or an up2 inference checkpoint folder")
            read_format(path)  # the version message before anything else
            path = os.path.join(path, WEIGHTS_FILE)
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pkl"):
            if not self.allow_pickle:
                raise PickleRefusedError(pickle_refused_message(filename))
            self.logger.warning(f"unpickling {filename} ({ALLOW_PICKLE_KEY} is True)")
            return super()._load_file(filename)
        if filename.endswith(".safetensors"):
            return self._load_safetensors(filename)
        if filename.endswith(".pyth"):  # pycls; detectron2 reads it with a plain torch.load
            data = self._torch_load(filename)
            if "model_state" not in data:
                raise ValueError(f"{filename}: a .pyth (pycls) checkpoint must contain 'model_state'")
            state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)  # detectron2's query handling; torch files via _torch_load

    def _torch_load(self, f: str) -> Dict[str, Any]:
        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            if not self.allow_pickle:
                raise PickleRefusedError(pickle_refused_message(
                    f, "cannot be read with torch.load(weights_only=True), which accepts tensors and plain containers "
                       f"only ({weights_only_reason(e)})")) from e
            self.logger.warning(f"reading {f} with torch.load(weights_only=False) ({ALLOW_PICKLE_KEY} is True)")
            return torch.load(f, map_location=torch.device("cpu"), weights_only=False)

    def _load_safetensors(self, filename: str) -> Dict[str, Any]:
        from up2.modeling.tasks.task_data import TASK_DATA_KEY

        folder = os.path.dirname(filename)
        if os.path.basename(filename) == WEIGHTS_FILE and is_inference_checkpoint(folder):
            state, task_data = load_inference_state(folder)
            return {"model": state, TASK_DATA_KEY: task_data, "__author__": "up2", "matching_heuristics": False}
        state, meta = read_safetensors(filename)
        return {"model": state, "__author__": meta.get("__author__", "safetensors"),
                "matching_heuristics": meta.get("matching_heuristics", "False") == "True"}

    def _load_model(self, checkpoint: Any):
        self.last_incompatible = super()._load_model(checkpoint)
        return self.last_incompatible

    # ------------------------------------------------------------------ saving
    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's ``save`` (``<save_dir>/<name>.pth`` with the model and the checkpointables,
        then ``last_checkpoint``), written atomically: a crash never leaves a truncated file."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        with atomic_write(save_file, "wb") as f:
            torch.save(data, cast(IO[bytes], f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_write(os.path.join(self.save_dir, "last_checkpoint")) as f:
            f.write(last_filename_basename)

