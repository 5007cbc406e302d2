"""Reading foreign state dicts and writing up2 / detectron2 checkpoints, shared by the converters.

A state dict here is ``dict[str, Tensor]`` (any shapes / dtypes). Outputs are written to a
temporary file next to the destination, then renamed, so a failed run leaves nothing behind.

No pickle without consent: inputs are read as safetensors or with ``torch.load(weights_only=True)``
(tensors and plain containers only); a ``.pkl`` input, or a torch file that ``weights_only``
refuses, is opened only with ``allow_pickle`` (the converters' ``--allow-pickle`` flag), because
unpickling runs whatever code the file holds. Outputs are ``.safetensors`` (tensors only) or
``.pth`` files of tensors, which ``up2.checkpoint.UP2Checkpointer`` (MODEL.WEIGHTS) reads.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Dict

import torch

from up2.checkpoint.checkpointer import PickleRefusedError, weights_only_reason
from up2.utils.atomic import atomic_write

__all__ = ["load_state_dict", "save_d2_checkpoint", "PickleRefusedError"]

_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module")
_OUTPUT_SUFFIXES = (".safetensors", ".pth")


def _refused(path: Path, detail: str) -> PickleRefusedError:
    return PickleRefusedError(
        f"input checkpoint {str(path)!r} {detail}; unpickling runs whatever code the file holds, so the converter "
        "does not open it unless you trust its source and pass --allow-pickle")


def _read_pickle(path: Path):
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="latin1")  # detectron2 / Caffe2 model-zoo pickles
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if isinstance(data, dict) and isinstance(data.get("blobs"), dict):
        data = data["blobs"]
    if isinstance(data, dict):
        import numpy as np

        data = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                for k, v in data.items()}
    return data


def load_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors``, ``.pth`` / ``.pt`` / ``.bin`` (torch.load with
    ``weights_only=True``) or, with ``allow_pickle``, ``.pkl`` file. A checkpoint that wraps it under
    ``state_dict`` / ``model`` / ``model_state`` / ``module`` is unwrapped, and a leading ``module.``
    (DDP) is stripped.

    Args:
        allow_pickle: open ``.pkl`` files, and torch files that ``weights_only`` refuses, with
            pickle (runs any code they hold: trusted files only).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        PickleRefusedError (a ValueError): a ``.pkl`` or a torch file with non-tensor objects,
            without ``allow_pickle``; nothing of it was unpickled.
        ValueError: the file cannot be read, or holds no ``str -> Tensor`` mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input checkpoint {str(path)!r} does not exist (or is not a file)")
    if path.suffix == ".pkl" and not allow_pickle:
        raise _refused(path, "is a Python pickle")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        elif path.suffix == ".pkl":
            data = _read_pickle(path)
        else:
            try:
                data = torch.load(str(path), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                if not allow_pickle:
                    raise _refused(path, "cannot be read with torch.load(weights_only=True), which accepts tensors "
                                         f"and plain containers only ({weights_only_reason(e)})") from e
                data = torch.load(str(path), map_location="cpu", weights_only=False)
    except PickleRefusedError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure means a corrupt / foreign file
        raise ValueError(f"input checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e})") from e
    while isinstance(data, dict):
        inner = next((data[k] for k in _WRAPPER_KEYS if isinstance(data.get(k), dict)), None)
        if inner is None:
            break
        data = inner
    if not isinstance(data, dict) or not data:
        raise ValueError(f"input checkpoint {str(path)!r} holds no state dict (got {type(data).__name__})")
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"input checkpoint {str(path)!r}: entries {bad[:5]} are not str -> Tensor")
    if all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return data


def save_d2_checkpoint(
    state_dict: Dict[str, torch.Tensor], path: str | os.PathLike, author: str, matching_heuristics: bool
) -> Path:
    """Write ``state_dict`` atomically as weights ``MODEL.WEIGHTS`` can name:

    - ``.safetensors``: the tensors, with metadata ``{"__author__": author, "matching_heuristics":
      "True" | "False"}`` (``up2.checkpoint.UP2Checkpointer`` reads both);
    - ``.pth``: ``torch.save({"model": tensors, "__author__": author, "matching_heuristics": bool})``,
      detectron2's checkpoint layout, readable with ``torch.load(weights_only=True)``.

    ``matching_heuristics`` asks detectron2's checkpointer to find the keys under any module path
    (e.g. ResNet keys without ``backbone.``).

    Raises:
        ValueError: ``path`` has another extension (``.pkl`` included: pickles run code when loaded).
        FileNotFoundError: the output folder does not exist.
    """
    path = Path(path)
    if path.suffix not in _OUTPUT_SUFFIXES:
        raise ValueError(f"output {str(path)!r}: expected a .safetensors or .pth file name (a .pkl would be a pickle, "
                         "which runs code when loaded; up2 refuses to load those by default)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(path.parent)!r} does not exist")
    # own contiguous copies: safetensors refuses tensors that share memory
    tensors = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()}
    with atomic_write(str(path), "wb") as f:
        if path.suffix == ".safetensors":
            from safetensors.torch import save

            meta = {"__author__": author, "matching_heuristics": str(bool(matching_heuristics))}
            f.write(save(tensors, metadata=meta))
        else:
            torch.save({"model": tensors, "__author__": author, "matching_heuristics": bool(matching_heuristics)}, f)
    return path
