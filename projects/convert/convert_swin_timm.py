#!/usr/bin/env python
"""Convert a timm (or original Microsoft) Swin Transformer state dict for up2's ``D2SwinTransformer``.

    python projects/convert/convert_swin_timm.py --input swin_base_patch4_window12_384.pth --output swin_b.safetensors

Then set ``MODEL.WEIGHTS swin_b.safetensors`` (``up2.checkpoint.UP2Checkpointer`` loads it; a
``.pth`` output of tensors works too).

Key mapping (timm -> up2): ``patch_embed.*`` -> ``<prefix>patch_embed.*`` and
``layers.<i>.*`` -> ``<prefix>layers_<i>.*`` with ``<prefix>`` = ``backbone.swin.`` (the module
path of the wrapped timm feature extractor inside ``UniPerceiverV2``). The classifier
(``head.*``) and the final ``norm.*`` are dropped (a detection backbone has neither), and so are
the non-persistent buffers ``relative_position_index`` / ``attn_mask`` of old checkpoints.
Original Microsoft checkpoints keep a stage's patch merging at its END (``layers.0.downsample``)
whereas timm keeps it at the START of the next stage: those are re-indexed (+1). Relative
position tables of a different window size are NOT resized: build the backbone with the
checkpoint's window size (the checkpointer skips shape-mismatched tensors with a warning).

The Swin backbone of a detection checkpoint (e.g. a Swin-L pretrained on Objects365, which the
paper's Swin-L starts from, §5.2) is converted with ``--input-prefix``: only the keys under that
module path are kept, without it (``backbone.0.`` for IDEA's DINO, ``backbone.`` for a
detectron2 / MaskDINO ``D2SwinTransformer``); the rest of the detector is dropped.
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

__all__ = ["convert_swin_state_dict", "select_prefix", "main"]

_LAYER = re.compile(r"^layers\.(\d+)\.")
_OLD_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_BUFFERS = ("relative_position_index", "attn_mask")


def select_prefix(state_dict: Dict[str, torch.Tensor], input_prefix: str) -> Dict[str, torch.Tensor]:
    """The entries of ``state_dict`` under the module path ``input_prefix``, with it removed
    (``"backbone.0."``: ``backbone.0.layers.0...`` -> ``layers.0...``); ``""`` keeps everything.

    Raises:
        ValueError: no key starts with ``input_prefix`` (names the prefix and a few keys).
    """
    if not input_prefix:
        return state_dict
    out = {k[len(input_prefix):]: v for k, v in state_dict.items() if k.startswith(input_prefix)}
    if not out:
        raise ValueError(f"no key starts with --input-prefix {input_prefix!r}; keys are e.g. {sorted(state_dict)[:5]}")
    return out


def convert_swin_state_dict(
    state_dict: Dict[str, torch.Tensor], prefix: str = "backbone.swin."
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Rename a timm / Microsoft Swin state dict to up2's ``D2SwinTransformer`` keys.

    Args:
        state_dict: str -> Tensor as saved by ``timm.create_model(...).state_dict()`` (or an
            original Swin ``model`` dict). Tensors are kept as they are (no copy).
        prefix: module path of ``D2SwinTransformer.swin`` inside the model being loaded.

    Returns:
        (converted state dict, sorted list of the input keys that were dropped).

    Raises:
        ValueError: no ``patch_embed.*`` / ``layers.*`` key, i.e. not a Swin state dict.
    """
    if not any(k.startswith("patch_embed.") for k in state_dict) or not any(_LAYER.match(k) for k in state_dict):
        raise ValueError(
            "not a Swin Transformer state dict: expected 'patch_embed.*' and 'layers.<i>.*' keys, got e.g. "
            f"{sorted(state_dict)[:5]}"
        )
    old_layout = "layers.0.downsample.reduction.weight" in state_dict
    out, dropped = {}, []
    for k, v in state_dict.items():
        if any(b in k for b in _BUFFERS) or not (k.startswith("patch_embed.") or _LAYER.match(k)):
            dropped.append(k)
            continue
        if old_layout:
            k = _OLD_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k)
        k = _LAYER.sub(lambda m: f"layers_{m.group(1)}.", k)
        out[prefix + k] = v
    return out, sorted(dropped)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="timm / Swin state dict (.pth, .bin, .safetensors)")
    parser.add_argument("--output", required=True, help="weights to write (.safetensors, or .pth of tensors)")
    parser.add_argument("--prefix", default="backbone.swin.", help="module path of the timm Swin in the model")
    parser.add_argument("--input-prefix", default="",
                        help="module path of the Swin inside the input ('backbone.0.' in a DINO detection checkpoint)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read a .pkl input (or a torch file with non-tensor objects) with pickle, which runs any "
                             "code it holds: trusted files only")
    args = parser.parse_args(argv)

    state_dict = load_state_dict(args.input, allow_pickle=args.allow_pickle)
    try:
        converted, dropped = convert_swin_state_dict(select_prefix(state_dict, args.input_prefix), args.prefix)
    except ValueError as e:
        raise ValueError(f"input checkpoint {args.input!r}: {e}") from e
    save_d2_checkpoint(converted, args.output, author="timm", matching_heuristics=False)
    print(f"wrote {len(converted)} tensors to {args.output}; dropped {len(dropped)}: {dropped[:8]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
