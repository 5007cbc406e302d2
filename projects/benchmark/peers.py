"""The models up2 is timed against, with random weights: detectron2's Mask R-CNN R50-FPN and
Hugging Face's Mask2Former R50 (instance segmentation, 80 classes, 100 queries).

Both are set up to do the work up2's 100 outputs do: Mask R-CNN keeps its top 100 boxes
(``SCORE_THRESH_TEST 0``) so that its mask head runs on 100 boxes; Mask2Former's call includes
``post_process_instance_segmentation`` with threshold 0.
"""
from __future__ import annotations

import torch
from torch import nn

LABELS = {"maskrcnn": "detectron2 Mask R-CNN R50-FPN", "mask2former": "HF Mask2Former R50"}


def build_mask_rcnn(device: str) -> nn.Module:
    """detectron2's model-zoo config COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x, random weights."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    return build_model(cfg).eval()


class Mask2Former(nn.Module):
    """Mask2FormerForUniversalSegmentation (ResNet-50) and its instance post-processing.
    forward(pixel_values (N, 3, H, W) normalised float) -> the processor's per-image results;
    ``postprocess=False``: the class and mask logits only (what the FLOP count traces)."""

    def __init__(self, device: str):
        super().__init__()
        from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                                  ResNetConfig)

        backbone = ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck",
                                out_features=["stage1", "stage2", "stage3", "stage4"])
        config = Mask2FormerConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                                   num_labels=80, num_queries=100)
        torch.manual_seed(0)
        self.model = Mask2FormerForUniversalSegmentation(config).to(device).eval()
        self.processor = Mask2FormerImageProcessor()

    def forward(self, pixel_values: torch.Tensor, postprocess: bool = True):
        out = self.model(pixel_values=pixel_values)
        if not postprocess:
            return out.class_queries_logits, out.masks_queries_logits
        sizes = [tuple(pixel_values.shape[-2:])] * pixel_values.shape[0]
        return self.processor.post_process_instance_segmentation(out, threshold=0.0, target_sizes=sizes)


def build_peers(keys, device: str) -> dict:
    """{key: model} for the requested keys of ``LABELS``; one whose library is missing is skipped, with a line saying so."""
    builders = {"maskrcnn": build_mask_rcnn, "mask2former": Mask2Former}
    peers = {}
    for key in (k for k in LABELS if k in keys):
        try:
            peers[key] = builders[key](device)
        except ImportError as e:
            print(f"{LABELS[key]}: skipped ({e})", flush=True)
    return peers


def peer_call(key: str, model: nn.Module, image: torch.Tensor, device: str):
    """For a uint8 image (3, H, W): ``(call, flop_fn, flop_inputs, detectron2_style)``: a
    no-argument call of the peer, and the function and inputs that ``flops.count_flops`` traces
    (Mask2Former without its post-processing)."""
    h, w = image.shape[-2:]
    if key == "maskrcnn":
        inputs = [{"image": image.float().to(device), "height": h, "width": w}]
        return (lambda: model(inputs)), model, (inputs,), True
    pixels = ((image.float() / 255 - 0.45) / 0.225)[None].to(device)
    return (lambda: model(pixels)), (lambda p: model(p, postprocess=False)), (pixels,), False
