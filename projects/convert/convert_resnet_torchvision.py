#!/usr/bin/env python
"""Convert a torchvision ResNet state dict to detectron2's ResNet naming (the up2_R50 backbone).

    python projects/convert/convert_resnet_torchvision.py --input resnet50.pth --output R-50.safetensors

Then set ``MODEL.WEIGHTS R-50.safetensors`` with ``MODEL.RESNETS.STRIDE_IN_1X1 False`` (torchvision
puts the stride on the 3x3 conv), ``MODEL.RESNETS.DEPTH 50`` and the RGB ImageNet pixel mean / std
(``add_up2_config``'s defaults). The output holds tensors only (``.safetensors`` with metadata
``__author__: torchvision, matching_heuristics: True``, or a ``.pth`` of
``{"model": tensors, "__author__", "matching_heuristics"}``): keys are relative to the ResNet
(``stem.conv1.weight``, ``res2.0.conv1.norm.weight``...), and the checkpointer's name matching
finds them under any module path (``backbone.``, ``backbone.bottom_up.``...).

Renames: ``conv1`` -> ``stem.conv1``; ``bn1`` -> ``stem.conv1.norm``; ``layer<s>.<b>.conv<j>``
-> ``res<s+1>.<b>.conv<j>``; ``layer<s>.<b>.bn<j>`` -> ``res<s+1>.<b>.conv<j>.norm``;
``downsample.0`` -> ``shortcut``; ``downsample.1`` -> ``shortcut.norm``. ``fc.*`` (classifier)
and ``num_batches_tracked`` are dropped.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkpoint_io import load_state_dict, save_d2_checkpoint  # noqa: E402

__all__ = ["convert_resnet_state_dict", "main"]

_BN_FIELDS = r"(weight|bias|running_mean|running_var)"
_RULES = [
    (re.compile(r"^conv1\.weight$"), lambda m: "stem.conv1.weight"),
    (re.compile(rf"^bn1\.{_BN_FIELDS}$"), lambda m: f"stem.conv1.norm.{m.group(1)}"),
    (
        re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\.weight$"),
        lambda m: f"res{int(m.group(1)) + 1}.{m.group(2)}.conv{m.group(3)}.weight",
    ),
    (
        re.compile(rf"^layer(\d)\.(\d+)\.bn(\d)\.{_BN_FIELDS}$"),
        lambda m: f"res{int(m.group(1)) + 1}.{m.group(2)}.conv{m.group(3)}.norm.{m.group(4)}",
    ),
    (
        re.compile(r"^layer(\d)\.(\d+)\.downsample\.0\.weight$"),
        lambda m: f"res{int(m.group(1)) + 1}.{m.group(2)}.shortcut.weight",
    ),
    (
        re.compile(rf"^layer(\d)\.(\d+)\.downsample\.1\.{_BN_FIELDS}$"),
        lambda m: f"res{int(m.group(1)) + 1}.{m.group(2)}.shortcut.norm.{m.group(3)}",
    ),
]


def convert_resnet_state_dict(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Rename a torchvision ResNet (any depth) state dict to detectron2's ResNet keys.

    Args:
        state_dict: str -> Tensor as saved by ``torchvision.models.resnet50().state_dict()``.

    Returns:
        (converted state dict, sorted list of dropped input keys: ``fc.*``, ``num_batches_tracked``).

    Raises:
        ValueError: a key that is not part of a torchvision ResNet (names the key), or no
            ``conv1.weight`` at all.
    """
    if "conv1.weight" not in state_dict:
        raise ValueError(f"not a torchvision ResNet state dict: no 'conv1.weight' (keys e.g. {sorted(state_dict)[:5]})")
    out, dropped = {}, []
    for k, v in state_dict.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            dropped.append(k)
            continue
        for pattern, rename in _RULES:
            m = pattern.match(k)
            if m:
                out[rename(m)] = v
                break
        else:
            raise ValueError(f"key {k!r} is not part of a torchvision ResNet; cannot convert it")
    return out, sorted(dropped)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="torchvision ResNet state dict (.pth)")
    parser.add_argument("--output", required=True, help="weights to write (.safetensors, or .pth of tensors)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read a .pkl input (or a torch file with non-tensor objects) with pickle, which runs any "
                             "code it holds: trusted files only")
    args = parser.parse_args(argv)

    state_dict = load_state_dict(args.input, allow_pickle=args.allow_pickle)
    try:
        converted, dropped = convert_resnet_state_dict(state_dict)
    except ValueError as e:
        raise ValueError(f"input checkpoint {args.input!r}: {e}") from e
    save_d2_checkpoint(converted, args.output, author="torchvision", matching_heuristics=True)
    print(f"wrote {len(converted)} tensors to {args.output}; dropped {len(dropped)}: {dropped[:8]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
