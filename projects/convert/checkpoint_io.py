"""Reading foreign state dicts and writing detectron2 checkpoints, shared by the converters.

A state dict here is ``dict[str, Tensor]`` (any shapes / dtypes). Outputs are written to a
temporary file next to the destination, then renamed, so a failed run leaves nothing behind.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Dict

import torch

from up2.utils.atomic import atomic_write

__all__ = ["load_state_dict", "save_d2_checkpoint"]

_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module")


def load_state_dict(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """Read a state dict from a ``.pth`` / ``.pt`` / ``.bin`` (torch.load, tensors only) or
    ``.safetensors`` file. A checkpoint that wraps it under ``state_dict`` / ``model`` /
    ``model_state`` / ``module`` is unwrapped, and a leading ``module.`` (DDP) is stripped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read, or holds no ``str -> Tensor`` mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input checkpoint {str(path)!r} does not exist (or is not a file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
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
    """Write ``{"model": state_dict, "__author__": author, "matching_heuristics": ...}``
    atomically, in the format ``DetectionCheckpointer`` reads for the extension of ``path``:
    ``.pkl`` (pickle of numpy arrays, detectron2 model-zoo format) or ``.pth`` (torch.save).

    Raises:
        ValueError: ``path`` has another extension.
        FileNotFoundError: the output folder does not exist.
    """
    path = Path(path)
    if path.suffix not in (".pkl", ".pth"):
        raise ValueError(f"output {str(path)!r}: expected a .pkl or .pth file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(path.parent)!r} does not exist")
    if path.suffix == ".pkl":
        # numpy has no bfloat16: such tensors are stored as float32.
        model = {
            k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy() for k, v in state_dict.items()
        }
    else:
        model = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    ckpt = {"model": model, "__author__": author, "matching_heuristics": matching_heuristics}
    with atomic_write(str(path), "wb") as f:
        if path.suffix == ".pkl":
            pickle.dump(ckpt, f, protocol=pickle.HIGHEST_PROTOCOL)
        else:
            torch.save(ckpt, f)
    return path
