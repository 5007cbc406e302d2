"""UniPerceiverV2: one model, one set of weights, every task (paper §4; DESIGN §3).

Shape shorthand: N images, Hp x Wp padded input, Q proposals, R regional tokens, T image
tokens, C classes, d unified-decoder width.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList
from torch import nn

from up2.modeling.image_encoder import ImageEncoder, gather_proposals
from up2.modeling.likelihood import Likelihood
from up2.modeling.proposal.binary_proposal_network import BinaryProposalNetwork
from up2.modeling.target_set import TargetCache, encode_texts
from up2.modeling.tasks.base import TASK_REGISTRY, TaskSpec, task_specs_from_config
from up2.modeling.text_encoder import TextEncoder
from up2.modeling.unified_decoder import UnifiedDecoder

__all__ = ["UniPerceiverV2"]


@META_ARCH_REGISTRY.register()
class UniPerceiverV2(nn.Module):
    """The generalist model: f_image, f_text, the shared decoder g and the likelihood.

    ``forward(batched_inputs)`` follows detectron2: in training it returns a dict of losses,
    in eval a list with one result dict per image. The task is a value: pass ``task=`` (a
    name of ``cfg.TASKS``); without it the first configured task runs, so detectron2's
    ``DefaultPredictor`` and evaluators work unchanged.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        proposal_network: BinaryProposalNetwork,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        unified_decoder: UnifiedDecoder,
        likelihood: Likelihood,
        tasks: Mapping[str, TaskSpec],
        global_feature: str,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int = 32,
        test_topk: int = 100,
    ):
        super().__init__()
        if not tasks:
            raise ValueError("UniPerceiverV2 needs at least one task")
        self.backbone = backbone
        self.proposal_network = proposal_network
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.unified_decoder = unified_decoder
        self.likelihood = likelihood
        self.tasks = {name: TASK_REGISTRY.get(spec.type)(spec, test_topk=test_topk) for name, spec in tasks.items()}
        self.default_task = next(iter(self.tasks))
        self.global_feature = global_feature
        self.size_divisibility = max(size_divisibility, backbone.size_divisibility)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.target_cache = TargetCache()

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        return {
            "backbone": backbone,
            "proposal_network": BinaryProposalNetwork(cfg, shapes),
            "image_encoder": ImageEncoder(cfg, shapes),
            "text_encoder": TextEncoder(cfg),
            "unified_decoder": UnifiedDecoder(cfg),
            "likelihood": Likelihood(cfg),
            "tasks": task_specs_from_config(cfg),
            "global_feature": cfg.MODEL.IMAGE_ENCODER.GLOBAL_FEATURE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "test_topk": cfg.MODEL.PROPOSAL.TEST_TOPK,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ pieces
    def preprocess_image(self, batched_inputs: Sequence[dict]) -> Tuple[ImageList, torch.Tensor]:
        """Normalise and pad. Returns the ImageList (N, 3, Hp, Wp) float and a padding mask
        (N, Hp, Wp) bool (True on padding).

        Raises:
            ValueError: an input whose "image" is not a (3, H, W) tensor.
        """
        images = []
        for i, x in enumerate(batched_inputs):
            img = x.get("image")
            if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 3:
                got = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
                raise ValueError(f"input {i}: 'image' must be a (3, H, W) tensor, got {got}")
            images.append((img.to(self.device).float() - self.pixel_mean) / self.pixel_std)
        images = ImageList.from_tensors(images, self.size_divisibility)
        pad = torch.ones(images.tensor.shape[0], *images.tensor.shape[-2:], dtype=torch.bool, device=self.device)
        for i, (h, w) in enumerate(images.image_sizes):
            pad[i, :h, :w] = False
        return images, pad

    def text_parameters(self):
        """Parameters that target embeddings depend on (for the cache stamp)."""
        return itertools.chain(self.text_encoder.parameters(), self.unified_decoder.parameters())

    def embed_targets(self, texts: Sequence[str]) -> torch.Tensor:
        """(C, d) target embeddings of ``texts``; cached at evaluation (DESIGN §7)."""
        if self.training:
            return encode_texts(self.text_encoder, self.unified_decoder, texts)
        return self.target_cache.get(
            texts, self.text_parameters(), lambda: encode_texts(self.text_encoder, self.unified_decoder, texts)
        )

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[dict], task: Optional[str] = None, class_names: Optional[Sequence[str]] = None):
        """Run one task on a batch.

        Args:
            batched_inputs: detectron2 mapper dicts ("image" (3, H, W) uint8 in cfg.INPUT.FORMAT,
                "height"/"width", and "instances" when training a localization task).
            task: a name of cfg.TASKS; default: the first one.
            class_names: override the task's class names at inference (open vocabulary).

        Returns:
            training: dict of scalar losses. eval: list of {"instances": Instances}.

        Raises:
            KeyError: an unknown task name.
        """
        name = task or self.default_task
        if name not in self.tasks:
            raise KeyError(f"unknown task {name!r}; this model has {sorted(self.tasks)}")
        handler = self.tasks[name]
        names = tuple(class_names) if class_names is not None else handler.spec.class_names
        if class_names is not None and len(names) == 0:
            raise ValueError("class_names is empty: give at least one class name")
        return self._localization(handler, batched_inputs, names)

    def _localization(self, handler, batched_inputs, class_names):
        from up2.modeling.tasks.detection import instances_to_targets

        images, pad = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        targets = instances_to_targets(batched_inputs, images, handler.with_masks) if self.training else None
        proposals, losses = self.proposal_network(features, targets, padding_mask=pad)
        tokens = self.image_encoder(features[self.global_feature], images.image_sizes, proposals)
        out = self.unified_decoder(tokens.batch)  # (N, 1 + T, d)
        start = 1 + tokens.regional_start
        region = out[:, start : start + tokens.regional_index.shape[1]]
        class_emb = self.embed_targets(class_names)
        if self.training:
            losses.update(
                handler.losses(region, tokens.regional_index, class_emb, self.likelihood, proposals.matches, targets)
            )
            return losses
        logits = self.likelihood(region, class_emb)
        idx = tokens.regional_index
        return handler.postprocess(
            logits,
            gather_proposals(proposals.objectness, idx),
            gather_proposals(proposals.boxes, idx),
            gather_proposals(proposals.masks, idx),
            images,
            batched_inputs,
        )
