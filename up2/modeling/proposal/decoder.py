"""Two-stage query selection and DINO-style decoder of the binary proposal network (paper §4.1,
App. A; MaskDINO with a foreground/background classifier).

Shape shorthand (see ``up2.structures``):
    N  images        S  encoder pixels over all levels      L  levels
    Q  matching queries (``num_queries``)                   T  denoising queries (0 at inference)
    D  width         Hm, Wm  mask-feature size (stride 4)

Pipeline:
    1. Query selection: every valid encoder pixel of level l proposes an anchor box centred on
       it, of side ``0.05 * 2**r`` (r = 0 for the finest level, +1 per coarser level). A head
       on the (linearly projected, normalised) memory gives an objectness logit and a box
       delta (added in inverse-sigmoid space). The Q most confident pixels are kept: their
       features (detached) become content queries, their boxes the reference boxes. The
       selection itself is supervised (``interm``); with ``init_box_from_mask`` the reference
       boxes are re-initialised from the bounding boxes of the selected queries' masks.
    2. ``num_layers`` decoder layers over [denoising ++ matching] queries: self-attention (with
       the denoising mask), deformable cross-attention to the memory around each reference box,
       FFN (post-norm). The query position embedding is an MLP of the reference box's sine
       encoding. After each layer i the shared box head predicts a delta_i and refines the
       reference box, ``ref_i = sigmoid(delta_i + inverse_sigmoid(ref_{i-1}.detach()))``; the
       next layer reads ``ref_i.detach()``. With ``look_forward_twice`` (DINO §3.5, MaskDINO)
       the box that layer i PREDICTS (its loss, its output) is
       ``sigmoid(delta_i + inverse_sigmoid(ref_{i-1}))`` with ``ref_{i-1}`` NOT detached, so the
       box loss of layer i also trains delta_{i-1} (the box head as applied after layer i-1, and
       the layers below it). The values are the same either way; only the gradient differs.
    3. Shared heads on the normalised queries: objectness ``Linear(D, 1)``, box ``MLP(D, D, 4)``
       and mask embedding ``MLP(D, D, D)`` whose dot product with the mask features gives the
       mask logits.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from detectron2.config import configurable
from torch import nn

from up2.modeling.proposal.decoder_layer import DecoderLayer
from up2.modeling.proposal.denoising import build_denoising_queries
from up2.modeling.proposal.position_encoding import box_sine_encoding
from up2.modeling.proposal.predictions import MLP, ProposalDecoderOutput, ProposalPredictions, inverse_sigmoid
from up2.modeling.proposal.query_selection import boxes_from_mask_embed, pixel_anchors
from up2.structures import PixelDecoderOutput
from up2.utils.host_sync import device_assert

# the predictions and heads are defined in ``predictions``; importable from here as before
__all__ = ["ProposalDecoder", "proposal_masks_supervised", "ProposalPredictions", "ProposalDecoderOutput", "MLP",
           "inverse_sigmoid"]


def proposal_masks_supervised(cfg) -> bool:
    """Whether a task of ``cfg.TASKS`` supervises the proposal network's masks (its task class has
    ``with_masks``: instance segmentation). Mask-initialised reference boxes (MaskDINO) need a
    trained mask head: with detection alone, every mask of the untrained head covers about half
    the pixels and its box is the whole image, for all Q queries, and nothing trains them (the
    boxes are read detached). A config without tasks (a proposal network built on its own)
    returns True, so that ``MODEL.PROPOSAL.INIT_BOX_FROM_MASK`` alone decides.

    Raises:
        ValueError: a task whose TYPE is not a registered task type.
    """
    from up2.modeling.tasks import TASK_REGISTRY  # registers every task type; import here: no cycle

    if not cfg.TASKS:
        return True
    supervised = False
    for name, node in cfg.TASKS.items():
        ttype = node.get("TYPE") if hasattr(node, "get") else None
        if ttype not in TASK_REGISTRY:
            raise ValueError(f"cfg.TASKS.{name}.TYPE={ttype!r} is not a known task type; known: "
                             f"{sorted(k for k, _ in TASK_REGISTRY)}")
        supervised = supervised or bool(TASK_REGISTRY.get(ttype).with_masks)
    return supervised


class ProposalDecoder(nn.Module):
    """Query selection + DINO decoder with a binary classifier (module docstring).

    Args:
        hidden_dim: D (divisible by ``num_heads`` and by 4).
        num_heads: attention heads.  num_levels: L of the memory.  num_points: deformable points.
        num_layers: decoder layers (>= 1).  ffn_dim: FFN width.  dropout: probability.
        num_queries: Q (must not exceed the number of valid encoder pixels at run time).
        dn_num: denoising queries per image in training (0 disables).
        dn_box_noise: lambda of the denoising box noise.
        init_box_from_mask: initialise reference boxes from the selected queries' masks.
            Only meaningful when a task supervises the masks (instance segmentation): without
            mask losses the mask head is untrained and its boxes are whole-image boxes.
            ``from_config`` decides it from the task list (``MODEL.PROPOSAL.INIT_BOX_FROM_MASK``).
        look_forward_twice: the box a layer predicts is refined from the previous layer's
            undetached box (module docstring, step 2); False detaches it (Deformable DETR).

    Raises:
        ValueError: on non-positive sizes or a ``hidden_dim`` not divisible by 4 / ``num_heads``.
    """

    @configurable
    def __init__(
        self,
        *,
        hidden_dim: int,
        num_heads: int,
        num_levels: int,
        num_points: int,
        num_layers: int,
        ffn_dim: int,
        num_queries: int,
        dropout: float = 0.0,
        dn_num: int = 0,
        dn_box_noise: float = 0.4,
        init_box_from_mask: bool = True,
        look_forward_twice: bool = True,
    ):
        super().__init__()
        for name, v in (("hidden_dim", hidden_dim), ("num_heads", num_heads), ("num_levels", num_levels),
                        ("num_points", num_points), ("num_layers", num_layers), ("ffn_dim", ffn_dim),
                        ("num_queries", num_queries)):
            if v < 1:
                raise ValueError(f"ProposalDecoder: {name} must be >= 1, got {v}")
        if hidden_dim % 4 != 0 or hidden_dim % num_heads != 0:
            raise ValueError(f"ProposalDecoder: hidden_dim ({hidden_dim}) must be divisible by 4 and by "
                             f"num_heads ({num_heads})")
        self.hidden_dim = hidden_dim
        self.num_levels = num_levels
        self.num_queries = num_queries
        self.dn_num = dn_num
        self.dn_box_noise = dn_box_noise
        self.init_box_from_mask = init_box_from_mask
        self.look_forward_twice = look_forward_twice

        # query selection
        self.enc_output = nn.Linear(hidden_dim, hidden_dim)
        self.enc_output_norm = nn.LayerNorm(hidden_dim)
        self.enc_objectness = nn.Linear(hidden_dim, 1)
        self.enc_box = MLP(hidden_dim, hidden_dim, 4, 3)
        # decoder
        self.dn_label_embed = nn.Embedding(1, hidden_dim)
        self.layers = nn.ModuleList(
            DecoderLayer(hidden_dim, num_heads, num_levels, num_points, ffn_dim, dropout) for _ in range(num_layers)
        )
        self.ref_point_head = MLP(2 * hidden_dim, hidden_dim, hidden_dim, 2)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        # heads shared by all layers
        self.objectness_head = nn.Linear(hidden_dim, 1)
        self.box_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.mask_embed = MLP(hidden_dim, hidden_dim, hidden_dim, 3)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # DINO: objectness bias for a 1% prior, box deltas start at zero.
        prior = -math.log((1 - 0.01) / 0.01)
        for head in (self.objectness_head, self.enc_objectness):
            nn.init.constant_(head.bias, prior)
        for mlp in (self.box_head, self.enc_box):
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)

    @classmethod
    def from_config(cls, cfg):
        p = cfg.MODEL.PROPOSAL
        return {
            "hidden_dim": p.HIDDEN_DIM,
            "num_heads": p.NHEADS,
            "num_levels": len(p.IN_FEATURES),
            "num_points": p.N_POINTS,
            "num_layers": p.DEC_LAYERS,
            "ffn_dim": p.DEC_FFN_DIM,
            "num_queries": p.NUM_QUERIES,
            "dropout": p.DROPOUT,
            "dn_num": p.DN_NUM,
            "dn_box_noise": p.DN_BOX_NOISE,
            "init_box_from_mask": p.INIT_BOX_FROM_MASK and proposal_masks_supervised(cfg),
            "look_forward_twice": p.LOOK_FORWARD_TWICE,
        }

    # ------------------------------------------------------------------ heads
    def predict(
        self,
        queries: torch.Tensor,
        boxes: torch.Tensor,
        mask_features: torch.Tensor,
        objectness: Optional[torch.Tensor] = None,
        with_masks: bool = True,
    ) -> ProposalPredictions:
        """Shared heads on the normalised queries.

        Args:
            queries: (N, X, D) un-normalised.  boxes: (N, X, 4) normalised cxcywh.
            mask_features: (N, D, Hm, Wm), kept by reference for the mask logits.
            objectness: (N, X) logits replacing the objectness head's, or None.
            with_masks: False skips the mask head (``mask_embed`` None: a stage no mask is read of).

        Returns:
            ProposalPredictions with mask embeddings (N, X, D) and the mask features; the
            logits are computed by their consumer (``ProposalPredictions.mask_logits``).
        """
        normed = self.decoder_norm(queries)
        mask_embed = self.mask_embed(normed) if with_masks else None
        if objectness is None:
            objectness = self.objectness_head(normed)[..., 0]
        return ProposalPredictions(objectness, boxes, mask_embed=mask_embed, mask_features=mask_features)

    # ------------------------------------------------------------------ query selection
    def select_queries(self, enc: PixelDecoderOutput):
        """Top-Q pixels by selection objectness (module docstring, step 1).

        Args:
            enc: the pixel decoder's output.

        Returns:
            interm: ProposalPredictions of the selection head on the Q pixels (for the loss);
            content (N, Q, D) detached content queries; ref_boxes (N, Q, 4) detached normalised
            cxcywh reference boxes (from the selected queries' masks with ``init_box_from_mask``).

        Raises:
            ValueError: if an image has fewer than Q valid encoder pixels (on a GPU a device-side
                assert, ``up2.utils.host_sync.device_assert``).
        """
        anchors, valid = pixel_anchors(enc)
        device_assert(valid.sum(1) >= self.num_queries,
                      f"ProposalDecoder: num_queries ({self.num_queries}, MODEL.PROPOSAL.NUM_QUERIES) exceeds the "
                      "valid encoder pixels of an image; use a larger input or fewer queries")
        memory = enc.memory.masked_fill(~valid[..., None], 0.0)
        memory = self.enc_output_norm(self.enc_output(memory))  # (N, S, D), zero-input on invalid pixels
        scores = self.enc_objectness(memory)[..., 0]  # (N, S)
        scores = scores.masked_fill(~valid, float("-inf"))
        top = scores.topk(self.num_queries, dim=1).indices  # (N, Q)
        feats = memory.gather(1, top[..., None].expand(-1, -1, memory.shape[-1]))  # (N, Q, D)
        anchors_unact = inverse_sigmoid(anchors).gather(1, top[..., None].expand(-1, -1, 4))
        boxes = (self.enc_box(feats) + anchors_unact).sigmoid()
        interm = self.predict(feats, boxes, enc.mask_features, objectness=scores.gather(1, top))
        ref_boxes = boxes.detach()
        if self.init_box_from_mask:
            ref_boxes = boxes_from_mask_embed(interm.mask_embed, interm.mask_features, ref_boxes)
        return interm, feats.detach(), ref_boxes

    # ------------------------------------------------------------------ decoder
    def forward(self, enc: PixelDecoderOutput, gt_boxes: Optional[Sequence[torch.Tensor]] = None
                ) -> ProposalDecoderOutput:
        """Select queries and decode them.

        Args:
            enc: the pixel decoder's output (memory (N, S, D), mask_features (N, D, Hm, Wm), ...).
            gt_boxes: in training, N tensors (K_i, 4) normalised cxcywh to build denoising queries
                from (ignored when ``dn_num`` is 0 or the module is in eval mode); None otherwise.
                With targets every stage carries mask embeddings (the losses read them); without,
                only the selection and the last layer do (the others' ``mask_embed`` is None).

        Returns:
            ProposalDecoderOutput (interm, ``num_layers + 1`` predictions, q^sem, denoising).
            Predictions carry mask embeddings, not logits (``ProposalPredictions.mask_logits``).

        Raises:
            ValueError: if the memory's levels disagree with ``num_levels`` or Q is too large.
        """
        if len(enc.level_shapes) != self.num_levels:
            raise ValueError(f"ProposalDecoder: memory has {len(enc.level_shapes)} levels, built for "
                             f"{self.num_levels} (len(MODEL.PROPOSAL.IN_FEATURES))")
        interm, content, ref_boxes = self.select_queries(enc)
        n, q, _ = content.shape
        dn = None
        if self.training and gt_boxes is not None and self.dn_num > 0:
            dn = build_denoising_queries(gt_boxes, num_dn=self.dn_num, box_noise_scale=self.dn_box_noise,
                                         num_matching=q, label_embedding=self.dn_label_embed.weight[0])
        attn_mask = key_padding_mask = None
        if dn is not None:
            content = torch.cat((dn.content.to(content.dtype), content), dim=1)
            ref_boxes = torch.cat((dn.boxes.to(ref_boxes.dtype), ref_boxes), dim=1)
            attn_mask = dn.attn_mask
            key_padding_mask = torch.cat((dn.padding_mask, dn.padding_mask.new_zeros(n, q)), dim=1)
        t = 0 if dn is None else dn.num_queries

        tgt = content
        prev_boxes = ref_boxes  # the previous layer's box, undetached (the initial boxes are detached)
        # Intermediate layers' masks feed only the losses: without targets (inference, and the
        # image-level tasks in training) only the last layer has a mask head.
        all_masks = gt_boxes is not None
        stages = [self.predict(tgt, ref_boxes, enc.mask_features, with_masks=all_masks or not self.layers)]
        for i, layer in enumerate(self.layers):
            pos = self.ref_point_head(box_sine_encoding(ref_boxes, 2 * self.hidden_dim))
            refs = ref_boxes[:, :, None].expand(-1, -1, self.num_levels, -1)
            tgt = layer(tgt, pos, refs, enc.memory, enc.level_shapes, None, enc.padding_mask,
                        attn_mask, key_padding_mask)
            delta = self.box_head(tgt)
            new_boxes = (delta + inverse_sigmoid(ref_boxes)).sigmoid()  # ref_i; its input ref is detached
            # the predicted box: from the previous layer's undetached box (look forward twice)
            pred_boxes = (delta + inverse_sigmoid(prev_boxes)).sigmoid() if self.look_forward_twice else new_boxes
            last = i == len(self.layers) - 1
            stages.append(self.predict(tgt, pred_boxes, enc.mask_features, with_masks=all_masks or last))
            prev_boxes, ref_boxes = new_boxes, new_boxes.detach()

        return ProposalDecoderOutput(
            interm=interm,
            layers=[p.part(slice(t, None)) for p in stages],
            query_features=self.decoder_norm(tgt[:, t:]),
            dn_layers=[p.part(slice(0, t)) for p in stages] if dn is not None else None,
            denoising=dn,
        )
