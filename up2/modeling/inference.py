"""Inference-only rewrites of a built model, in one place: :func:`prepare_for_inference`.

Every model module computes the same way in training and inference. The rewrites below are
the exceptions that earn their keep: each changes how an eval-mode forward computes (not what:
the same values up to float rounding) and moved whole-model latency by >= 3% in a paired A/B
(up2 R50 detection + segmentation, 800x1067, float32; docs/inference_rewrites.md, measured by
projects/benchmark/inference_rewrites.py). Rewrites that did not are deleted, not kept here.

A rewrite changes modules in place: the class of a module instance is swapped to a subclass
with another ``forward`` (as ``up2.layers.frozen_bn.fold_frozen_batchnorm`` does), or tensors
change memory format. Parameters, buffers and ``state_dict`` keys stay the same, so checkpoints
load before or after preparation. A prepared model is for inference (eval mode, any grad mode):
after a rewrite of ``INFERENCE_ONLY`` (in-place ops) ``UniPerceiverV2`` refuses to train; train
an unprepared one.

Rewrites (names for ``rewrites=``):

- ``"fold_frozen_bn"``: every detectron2 ``Conv2d`` with a ``FrozenBatchNorm2d`` runs as one
  convolution with the norm folded into its weight and bias, in float32 / float64
  (``up2.layers.frozen_bn``; bf16 / fp16 run conv then norm). No-op for a backbone without
  FrozenBN (Swin).
- ``"channels_last"``: the backbone's and the proposal network's 4-D parameters (the conv
  weights) are stored channels-last, and with them the padded image batch
  (``UniPerceiverV2.preprocess_image`` follows the backbone's weights), so the feature maps run
  NHWC. Applied only when the model was built with ``cfg.MODEL.CHANNELS_LAST`` (a true
  ``channels_last`` attribute; other meta-architectures are left in their layout).
- ``"encoder_ffn_chunks"``: every ``DeformableEncoderLayer`` of the pixel decoder writes its two
  residual sums in place (into the attention's and norm1's fresh outputs) and runs its FFN over
  4,096 tokens at a time (:class:`ChunkedFFNEncoderLayer`): at 800x1067 the (S, ffn_dim) hidden
  of all S = 17,850 tokens is a 73 MB buffer the allocator maps fresh on every call, where
  4,096-token pieces are reused and stay in cache. Row-wise, so the same values up to the
  rounding of GEMMs over fewer rows (~1e-7 in float32). In place: not for autograd.
- ``"target_cache"``: target embeddings (class names, vocabularies; they do not depend on the
  input) are kept between calls in a ``up2.modeling.target_set.TargetCache``, invalidated when a
  weight they depend on changes, keyed by the texts / token ids, the task's input modalities and the
  autocast precision.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from up2.layers.frozen_bn import fold_frozen_batchnorm
from up2.modeling.proposal.pixel_decoder import DeformableEncoderLayer
from up2.modeling.target_set import TargetCache

__all__ = ["REWRITES", "INFERENCE_ONLY", "ChunkedFFNEncoderLayer", "prepare_for_inference"]

REWRITES = ("fold_frozen_bn", "channels_last", "encoder_ffn_chunks", "target_cache")
# rewrites after which the model cannot train (in-place ops overwrite what autograd needs)
INFERENCE_ONLY = ("encoder_ffn_chunks",)


class ChunkedFFNEncoderLayer(DeformableEncoderLayer):
    """``DeformableEncoderLayer`` for inference: in-place residual sums and the FFN over
    ``ffn_chunk`` tokens at a time (module docstring, ``"encoder_ffn_chunks"``). Same arguments,
    shapes and parameters; outputs equal up to float rounding. Records no usable autograd
    history (the residual sums overwrite tensors the backward would need)."""

    ffn_chunk = 4096  # tokens per FFN piece

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(self.dropout1(attn).add_(src))  # a + b == b + a exactly
        for start in range(0, src.shape[1], self.ffn_chunk):
            piece = src[:, start : start + self.ffn_chunk]
            piece.add_(self.dropout3(self._ffn(piece)))  # the FFN has read the piece before the add
        return self.norm2(src)


def _swap(model: nn.Module, cls: type, to: type) -> None:
    """Make every instance of exactly ``cls`` inside ``model`` a ``to`` (same object and tensors)."""
    for m in model.modules():
        if type(m) is cls:
            m.__class__ = to


def _channels_last(model: nn.Module) -> None:
    if not getattr(model, "channels_last", False):
        return
    for part in ("backbone", "proposal_network"):
        module = getattr(model, part, None)
        if module is not None:  # 4-D parameters only (the convs); kept by .to(device) and load_state_dict
            module.to(memory_format=torch.channels_last)


def prepare_for_inference(model: nn.Module, rewrites: Optional[Iterable[str]] = None) -> nn.Module:
    """Put ``model`` in eval mode and apply the inference rewrites (module docstring), in place.

    Idempotent: preparing a prepared model changes nothing. Outputs equal the unprepared eval
    model's up to float rounding; parameters and ``state_dict`` keys are unchanged.

    Args:
        model: a ``UniPerceiverV2`` (or any module tree: each rewrite finds its modules by
            type, and ``"channels_last"`` its ``backbone`` / ``proposal_network`` attributes).
        rewrites: names from ``REWRITES`` to apply; None = all of them. An empty list only
            switches to eval mode (the reference of the A/B measurements).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: an unknown rewrite name, or one string instead of a list.
    """
    if isinstance(rewrites, str):
        raise ValueError(f"prepare_for_inference: rewrites must be a list of names, got one string "
                         f"(did you mean [{rewrites!r}]?)")
    chosen = list(REWRITES if rewrites is None else rewrites)
    unknown = sorted(set(chosen) - set(REWRITES))
    if unknown:
        raise ValueError(f"prepare_for_inference: unknown rewrites {unknown}; known: {list(REWRITES)}")
    model.eval()
    if hasattr(model, "inference_only_rewrites"):  # UniPerceiverV2 then refuses to train
        applied = set(model.inference_only_rewrites) | (set(chosen) & set(INFERENCE_ONLY))
        model.inference_only_rewrites = tuple(sorted(applied))
    if "channels_last" in chosen:
        _channels_last(model)
    if "fold_frozen_bn" in chosen:
        fold_frozen_batchnorm(model)
    if "encoder_ffn_chunks" in chosen:
        _swap(model, DeformableEncoderLayer, ChunkedFFNEncoderLayer)
    if "target_cache" in chosen and getattr(model, "target_cache", False) is None:
        model.target_cache = TargetCache()
    return model
