"""Swin Transformer (timm) as a detectron2 ``Backbone`` (paper §5.1: Swin-Base / Swin-Large variants).

Shape shorthand (see ``up2.structures``):
    N  images          Hp, Wp  input size in pixels (any; padded here to a multiple of 32)
    C_f  channels of feature f (``embed_dim * 2**i`` for stage i)

Features: ``res2``..``res5`` = timm stages 0..3 at strides 4 / 8 / 16 / 32, returned NCHW with
size ``ceil(Hp / stride) x ceil(Wp / stride)`` (the same grid as detectron2's ResNet on a padded
image). timm's feature maps are NHWC; they are permuted here. No extra output norm is added:
the proposal network's input projections normalise (GroupNorm) anyway.

Weights are never downloaded (``pretrained=False``). Load a timm / Microsoft Swin checkpoint
converted by ``projects/convert/convert_swin_timm.py`` with detectron2's ``DetectionCheckpointer``
(keys ``backbone.swin.*``).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Set

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = ["D2SwinTransformer", "SWIN_STAGE_NAMES"]

# detectron2 feature name -> timm stage index
SWIN_STAGE_NAMES: Dict[str, int] = {"res2": 0, "res3": 1, "res4": 2, "res5": 3}


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(Backbone):
    """timm's ``SwinTransformer`` (``features_only``) with detectron2's backbone interface.

    Built with ``strict_img_size=False`` (attention masks computed per input size, so any padded
    size works) and, by default, ``always_partition=True``: every stage keeps its full window and
    every second block keeps its shifted windows whatever the input size, as the Swin detection
    backbone does (timm otherwise shrinks windows and drops the shift in stages whose feature map
    at ``img_size`` is no larger than a window, e.g. the last stage of a 384-px Swin-B).

    Args:
        model_name: timm architecture, e.g. ``"swin_base_patch4_window12_384"``.
        out_features: subset of ``res2``..``res5`` (strides 4/8/16/32) to return.
        img_size: image size (pixels) timm builds its default window layout for.
        drop_path_rate: stochastic depth rate (linearly increasing over blocks, timm).
        in_chans: input channels (3 for RGB).
        always_partition: see above.
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``embed_dim``,
            ``depths``, ``num_heads``, ``window_size`` to build a tiny model in tests).

    Raises:
        ValueError: an unknown name in ``out_features`` or an empty ``out_features``.
        RuntimeError: timm does not know ``model_name``.
    """

    @configurable
    def __init__(
        self,
        *,
        model_name: str,
        out_features: Sequence[str],
        img_size: int = 224,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
        always_partition: bool = True,
        model_kwargs: Optional[Mapping[str, Any]] = None,
    ):
        super().__init__()
        import timm  # local: keeps ``import up2`` light for users of the ResNet variant

        out_features = list(out_features)
        if not out_features:
            raise ValueError("D2SwinTransformer: out_features is empty; expected a subset of res2..res5")
        unknown = [f for f in out_features if f not in SWIN_STAGE_NAMES]
        if unknown:
            raise ValueError(
                f"D2SwinTransformer: unknown out_features {unknown}; expected names among {list(SWIN_STAGE_NAMES)}"
            )
        # timm returns features in stage order: keep ours in the same order.
        self._out_features = sorted(out_features, key=SWIN_STAGE_NAMES.__getitem__)
        out_indices = tuple(SWIN_STAGE_NAMES[f] for f in self._out_features)
        if not timm.is_model(model_name):
            raise RuntimeError(f"D2SwinTransformer: timm {timm.__version__} has no model {model_name!r}")
        self.swin = timm.create_model(
            model_name,
            pretrained=False,
            features_only=True,
            out_indices=out_indices,
            img_size=img_size,
            in_chans=in_chans,
            drop_path_rate=drop_path_rate,
            strict_img_size=False,
            always_partition=always_partition,
            **dict(model_kwargs or {}),
        )
        info = self.swin.feature_info
        self._out_feature_channels = dict(zip(self._out_features, info.channels()))
        self._out_feature_strides = dict(zip(self._out_features, info.reduction()))
        self._in_chans = in_chans
        # Input padded to the coarsest stride of the network (res5), whatever is returned.
        self._divisor = int(info.reduction()[-1] * 2 ** (3 - out_indices[-1]))

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec) -> Dict[str, Any]:
        """Reads ``cfg.MODEL.SWIN.{MODEL_NAME, OUT_FEATURES, IMG_SIZE, DROP_PATH_RATE}``."""
        return {
            "model_name": cfg.MODEL.SWIN.MODEL_NAME,
            "out_features": cfg.MODEL.SWIN.OUT_FEATURES,
            "img_size": cfg.MODEL.SWIN.IMG_SIZE,
            "drop_path_rate": cfg.MODEL.SWIN.DROP_PATH_RATE,
            "in_chans": input_shape.channels if input_shape.channels is not None else 3,
        }

    def no_weight_decay(self) -> Set[str]:
        """Swin's relative position bias tables (and absolute position embedding, if any) are
        not decayed (Swin's recipe; ``up2.solver.weight_decay``). Names relative to this module."""
        return {n for n, _ in self.named_parameters()
                if "relative_position_bias_table" in n or "absolute_pos_embed" in n}

    @property
    def size_divisibility(self) -> int:
        """32: the input size a stride-32 stage needs; ``forward`` pads itself when it is not met."""
        return self._divisor

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (N, in_chans, Hp, Wp) float, normalised pixels (any Hp, Wp >= 1).

        Returns:
            dict name -> (N, C_f, ceil(Hp / s_f), ceil(Wp / s_f)) float for each name in
            ``out_features`` (s_f its stride).

        Raises:
            ValueError: ``x`` is not a 4-D floating tensor with ``in_chans`` channels.
        """
        if x.dim() != 4 or x.shape[1] != self._in_chans or not x.is_floating_point():
            raise ValueError(
                f"D2SwinTransformer: expected images (N, {self._in_chans}, H, W) float, "
                f"got {tuple(x.shape)} {x.dtype}"
            )
        h, w = x.shape[-2:]
        pad_h = (-h) % self._divisor
        pad_w = (-w) % self._divisor
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = self.swin(x)
        out = {}
        for name, feat in zip(self._out_features, feats):
            s = self._out_feature_strides[name]
            feat = feat.permute(0, 3, 1, 2)  # NHWC -> NCHW
            out[name] = feat[:, :, : -(-h // s), : -(-w // s)].contiguous()
        return out

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """dict name -> ShapeSpec(channels=C_f, stride=s_f) for ``out_features``."""
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }
