"""Pretrained weights at training start: present, or explicitly declined (paper §5.2).

The paper starts every variant from pretrained encoders: ResNet-50 on ImageNet-1k, Swin-B on
ImageNet-21k, Swin-L on ImageNet-21k then Objects365 detection, and RoBERTa-base as f_text
(§4.2, §5.2); only g is trained from scratch. A config whose pretrained files are missing
would otherwise train those parts from random weights without a word, so a training start
(not a resume from OUTPUT_DIR) checks them first:

- backbone: ``MODEL.WEIGHTS`` (the initial checkpoint, loaded by
  ``up2.checkpoint.UP2Checkpointer``) must name an existing file (or an up2 inference
  checkpoint folder; a ``.pkl`` only with ``MODEL.ALLOW_PICKLE_WEIGHTS``), unless
  ``MODEL.BACKBONE.RANDOM_INIT`` is True (then MODEL.WEIGHTS must be empty);
- text encoder: the folder ``MODEL.TEXT_ENCODER.NAME`` must hold weights, unless
  ``MODEL.TEXT_ENCODER.RANDOM_INIT`` is True.

Paths may use environment variables (the paper configs use ``$UP2_WEIGHTS``); an unset one is an
error. docs/pretrained_weights.md says where each checkpoint comes from.
"""
from __future__ import annotations

import os

from up2.checkpoint.checkpointer import PickleRefusedError, pickle_refused_message
from up2.checkpoint.inference_checkpoint import is_inference_checkpoint, read_format
from up2.modeling.text_encoder import check_text_model_weights
from up2.utils.paths import expand_path

__all__ = ["check_pretrained_weights", "check_backbone_weights", "backbone_weights_recipe", "will_resume"]

_CONVERT = "projects/convert"


def _torchvision_resnet_url(depth: int) -> str:
    """URL of torchvision's ImageNet-1k ResNet-<depth> (``IMAGENET1K_V1``, the weights detectron2's
    ``ImageNetPretrained/torchvision/R-50.pkl`` was converted from), or "" if torchvision has none."""
    import torchvision.models as tvm

    weights = getattr(tvm, f"ResNet{depth}_Weights", None)
    return weights.IMAGENET1K_V1.url if weights is not None else ""


def backbone_weights_recipe(cfg, output: str) -> str:
    """The commands that write the pretrained backbone of ``cfg`` to ``output`` (one line of text).

    Args:
        cfg: a config with ``MODEL.BACKBONE.NAME`` (and ``MODEL.RESNETS.DEPTH`` /
            ``MODEL.SWIN.MODEL_NAME``).
        output: the file to write (the expanded MODEL.WEIGHTS).
    """
    name = cfg.MODEL.BACKBONE.NAME
    if name == "build_resnet_backbone":
        depth = cfg.MODEL.RESNETS.DEPTH
        url = _torchvision_resnet_url(depth)
        source = url or f"an ImageNet state dict of torchvision's resnet{depth}"
        local = os.path.basename(url) if url else f"resnet{depth}.pth"
        return (f"download {source}, then `python {_CONVERT}/convert_resnet_torchvision.py --input {local} "
                f"--output {output}`")
    if name == "D2SwinTransformer":
        model = cfg.MODEL.SWIN.MODEL_NAME

        def in22k(out):
            return (f"`hf download timm/{model}.ms_in22k model.safetensors --local-dir swin_in22k`, then `python "
                    f"{_CONVERT}/convert_swin_timm.py --input swin_in22k/model.safetensors --output {out}`")

        if model.startswith("swin_large"):  # §5.2: ImageNet-21k, then Objects365 detection
            substitute = os.path.join(os.path.dirname(output), f"{model}_in22k.safetensors")
            return ("the paper's Swin-L is ImageNet-21k then Objects365 pretrained: convert the Swin of such a "
                    f"detection checkpoint with `python {_CONVERT}/convert_swin_timm.py --input <ckpt> --input-prefix "
                    f"<its backbone prefix, e.g. backbone.0.> --output {output}`; an ImageNet-21k-only substitute "
                    f"(not the paper's): {in22k(substitute)} and set MODEL.WEIGHTS to it")
        return in22k(output)
    return (f"convert your {name} weights with a script of {_CONVERT}/ (or write a detectron2 checkpoint) "
            f"to {output}")


def check_backbone_weights(cfg) -> str:
    """Check ``MODEL.WEIGHTS`` against ``MODEL.BACKBONE.RANDOM_INIT`` before training starts.

    Returns:
        MODEL.WEIGHTS with environment variables expanded ("" with RANDOM_INIT); URLs
        (``detectron2://``, ``https://``) are returned as they are, for detectron2's PathManager.

    Raises:
        FileNotFoundError: MODEL.WEIGHTS is empty without RANDOM_INIT, or names no file; the
            message names the expected file and the converter command.
        IsADirectoryError: MODEL.WEIGHTS is a folder that is not an up2 inference checkpoint.
        ValueError: RANDOM_INIT together with a non-empty MODEL.WEIGHTS, or MODEL.WEIGHTS uses
            an environment variable that is not set, or is an inference checkpoint of a format
            version this up2 cannot read.
        PickleRefusedError (a ValueError): a ``.pkl`` without MODEL.ALLOW_PICKLE_WEIGHTS.
    """
    raw = cfg.MODEL.WEIGHTS
    if cfg.MODEL.BACKBONE.RANDOM_INIT:
        if raw:
            raise ValueError(
                f"MODEL.BACKBONE.RANDOM_INIT=True asks for a randomly initialised backbone, but MODEL.WEIGHTS={raw!r} "
                "is set: set MODEL.WEIGHTS '' to train from random weights, or MODEL.BACKBONE.RANDOM_INIT False to "
                "load MODEL.WEIGHTS")
        return ""
    if not raw:
        raise FileNotFoundError(
            "MODEL.WEIGHTS is empty: the backbone would start from random weights (the paper starts from pretrained "
            f"ones, §5.2). Write them with: {backbone_weights_recipe(cfg, '<file>')}, and set MODEL.WEIGHTS <file>; "
            "or set MODEL.BACKBONE.RANDOM_INIT True to train the backbone from scratch")
    path = expand_path(raw, "MODEL.WEIGHTS")
    if "://" in path:
        return path
    if os.path.isdir(path):
        if is_inference_checkpoint(path):  # fine-tuning a shared up2 model (up2.checkpoint)
            read_format(path)
            return path
        raise IsADirectoryError(f"MODEL.WEIGHTS={raw!r} is the folder {path!r}; expected a checkpoint file or an "
                                "up2 inference checkpoint folder (with up2_checkpoint.json)")
    if path.endswith(".pkl") and not cfg.MODEL.ALLOW_PICKLE_WEIGHTS and os.path.isfile(path):
        raise PickleRefusedError(pickle_refused_message(f"MODEL.WEIGHTS={raw!r}"))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"MODEL.WEIGHTS={raw!r}: the pretrained backbone weights {path!r} do not exist. "
            f"Write them with: {backbone_weights_recipe(cfg, path)} (docs/pretrained_weights.md); or set "
            "MODEL.BACKBONE.RANDOM_INIT True and MODEL.WEIGHTS '' to train the backbone from random weights")
    return path


def check_pretrained_weights(cfg) -> str:
    """Check the backbone's and the text encoder's pretrained weights before training starts
    (not when resuming: the checkpoint in OUTPUT_DIR has every weight).

    Returns:
        MODEL.WEIGHTS expanded, as :func:`check_backbone_weights`.

    Raises:
        FileNotFoundError / IsADirectoryError / ValueError: as :func:`check_backbone_weights`,
            and as ``up2.modeling.text_encoder.check_text_model_weights`` unless
            MODEL.TEXT_ENCODER.RANDOM_INIT.
    """
    weights = check_backbone_weights(cfg)
    if not cfg.MODEL.TEXT_ENCODER.RANDOM_INIT:
        check_text_model_weights(cfg.MODEL.TEXT_ENCODER.NAME)
    return weights


def will_resume(cfg, resume: bool) -> bool:
    """Whether ``resume_or_load(resume)`` resumes from OUTPUT_DIR (detectron2: ``resume`` and an
    ``OUTPUT_DIR/last_checkpoint`` file) rather than starting from MODEL.WEIGHTS."""
    return bool(resume) and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
