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
       encoding. After each layer the shared box head refines the reference box
       (``sigmoid(delta + inverse_sigmoid(ref))``), detached before the next layer.
    3. Shared heads on the normalised queries: objectness ``Linear(D, 1)``, box ``MLP(D, D, 4)``
       and mask embedding ``MLP(D, D, D)`` whose dot product with the mask features gives the
       mask logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn
from torchvision.ops import box_convert

from up2.layers.msda import MSDeformAttn
from up2.modeling.proposal.denoising import DenoisingQueries, build_denoising_queries
from up2.modeling.proposal.position_encoding import box_sine_encoding
from up2.structures import PixelDecoderOutput

__all__ = ["ProposalDecoder", "ProposalPredictions", "ProposalDecoderOutput", "MLP", "inverse_sigmoid"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [eps, 1 - eps] (same shape and dtype as ``x``)."""
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between: in_dim -> hidden_dim ... -> out_dim.

    Input (..., in_dim) float -> output (..., out_dim).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


@dataclass
class ProposalPredictions:
    """Predictions of one supervised stage for a set of queries.

    Attributes:
        objectness: (N, Q) float foreground logits.
        boxes: (N, Q, 4) float, normalised cxcywh in (0, 1).
        masks: (N, Q, Hm, Wm) float mask logits; None for the intermediate layers when the
            decoder runs without targets, where nothing reads them (see ``ProposalDecoder.forward``),
            and for the last layer when it runs with ``lazy_masks``.
        mask_embed: (N, Q, D) float mask embeddings of the last layer with ``lazy_masks``, else None.
    """

    objectness: torch.Tensor
    boxes: torch.Tensor
    masks: Optional[torch.Tensor]
    mask_embed: Optional[torch.Tensor] = None


@dataclass
class ProposalDecoderOutput:
    """Everything the decoder produces for one batch.

    Attributes:
        interm: predictions of the query-selection head on the Q selected pixels.
        layers: ``num_layers + 1`` predictions of the matching queries: on the initial queries,
            then after each decoder layer (the last is the network's output).
        query_features: (N, Q, D) float, q^sem: the last layer's queries after the final norm.
        dn_layers: ``num_layers + 1`` predictions of the T denoising queries, or None.
        denoising: the denoising queries that were used, or None.
    """

    interm: ProposalPredictions
    layers: List[ProposalPredictions]
    query_features: torch.Tensor
    dn_layers: Optional[List[ProposalPredictions]] = None
    denoising: Optional[DenoisingQueries] = None


class DecoderLayer(nn.Module):
    """Post-norm DINO decoder layer: self-attention, deformable cross-attention, FFN.

    Args:
        dim: D.  num_heads: attention heads.  num_levels: L.  num_points: per head and level.
        ffn_dim: FFN hidden width.  dropout: dropout probability.
    """

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MSDeformAttn(dim, num_heads, num_levels, num_points)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, pos, ref_boxes, memory, spatial_shapes, level_start_index, memory_padding_mask,
                attn_mask, key_padding_mask):
        """tgt, pos: (N, T+Q, D); ref_boxes: (N, T+Q, L, 4) normalised cxcywh; memory (N, S, D);
        attn_mask (T+Q, T+Q) bool or None; key_padding_mask (N, T+Q) bool or None -> (N, T+Q, D)."""
        q = k = tgt + pos
        attn = self.self_attn(q, k, tgt, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                              need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout(attn))
        cross = self.cross_attn(tgt + pos, ref_boxes, memory, spatial_shapes, level_start_index, memory_padding_mask)
        tgt = self.norm2(tgt + self.dropout(cross))
        return self.norm3(tgt + self.dropout(self.ffn(tgt)))


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
        prior = -torch.log(torch.tensor((1 - 0.01) / 0.01)).item()
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
            "init_box_from_mask": p.INIT_BOX_FROM_MASK,
        }

    # ------------------------------------------------------------------ query selection
    def pixel_proposals(self, enc: PixelDecoderOutput):
        """Anchor box of every encoder pixel and the projected memory.

        Returns:
            memory (N, S, D) projected + normalised memory (zero on invalid pixels);
            anchors_unact (N, S, 4) inverse-sigmoid anchor boxes (cxcywh);
            valid (N, S) bool: un-padded pixels whose anchor lies inside (0.01, 0.99).
        """
        n, s, _ = enc.memory.shape
        shapes = enc.spatial_shapes.tolist()
        areas = torch.tensor([h * w for h, w in shapes])
        rank = torch.argsort(torch.argsort(-areas, stable=True), stable=True).tolist()  # 0 = finest
        device, anchors = enc.memory.device, []
        for (h, w), r in zip(shapes, rank):
            ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
            xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            side = torch.full_like(gx, 0.05 * 2.0**r)
            anchors.append(torch.stack((gx, gy, side, side), dim=-1).reshape(-1, 4))
        anchors = torch.cat(anchors, 0)[None].expand(n, s, 4)  # (N, S, 4)
        valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1)
        if enc.padding_mask is not None:
            valid = valid & ~enc.padding_mask
        memory = enc.memory.masked_fill(~valid[..., None], 0.0)
        memory = self.enc_output_norm(self.enc_output(memory))
        return memory, inverse_sigmoid(anchors), valid

    def predict(
        self,
        queries: torch.Tensor,
        boxes: torch.Tensor,
        mask_features: torch.Tensor,
        objectness: Optional[torch.Tensor] = None,
        with_masks: bool = True,
        lazy_masks: bool = False,
    ) -> ProposalPredictions:
        """Shared heads. queries (N, X, D) un-normalised, boxes (N, X, 4) normalised cxcywh,
        mask_features (N, D, Hm, Wm); ``objectness`` (N, X) replaces the objectness head when
        given; ``with_masks=False`` skips the mask head (masks None); ``lazy_masks`` keeps the
        mask embeddings (N, X, D) instead of their product with the mask features (masks None).
        Returns ProposalPredictions."""
        normed = self.decoder_norm(queries)
        masks = mask_embed = None
        if with_masks:
            mask_embed = self.mask_embed(normed)
            if not lazy_masks:
                masks = torch.einsum("nqd,ndhw->nqhw", mask_embed, mask_features)
                mask_embed = None
        if objectness is None:
            objectness = self.objectness_head(normed)[..., 0]
        return ProposalPredictions(objectness, boxes, masks, mask_embed)

    @staticmethod
    def boxes_from_masks(mask_logits: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """Normalised cxcywh bounding boxes of ``mask_logits > 0``; ``fallback`` where empty.

        Args:
            mask_logits: (N, Q, Hm, Wm) float.  fallback: (N, Q, 4) normalised cxcywh.

        Returns:
            (N, Q, 4) float in [0, 1]; a box covers whole mask pixels (x2 = (last col + 1) / Wm).
        """
        binary = mask_logits.detach() > 0
        return ProposalDecoder._boxes_from_extents(binary.any(3), binary.any(2), fallback)

    @staticmethod
    def boxes_from_mask_embed(mask_embed: torch.Tensor, mask_features: torch.Tensor, fallback: torch.Tensor,
                              chunk: int = 32) -> torch.Tensor:
        """``boxes_from_masks`` of the logits ``mask_embed · mask_features`` without holding them
        (the mask-initialised reference boxes of query selection, paper §4.1 / App. A, MaskDINO):
        ``chunk`` queries at a time, each reduced to its rows and columns holding a positive
        logit (a row holds one iff its maximum is > 0). At 800x1067 the (300, 200, 272) logits
        are a 65 MB buffer the allocator maps fresh on every call; 32-query pieces stay in
        cache. Same boxes as ``boxes_from_masks`` on the einsum's logits, up to the rounding of
        GEMMs over fewer rows (a logit within ~1e-6 of 0 may change sign); with a NaN logit the
        maximum of its row and column is NaN, so both count as empty here (``boxes_from_masks``
        drops only the NaN pixel).

        Args:
            mask_embed: (N, Q, D).  mask_features: (N, D, Hm, Wm).  fallback: (N, Q, 4)
                normalised cxcywh.  chunk: queries per piece (>= 1).

        Returns:
            (N, Q, 4) as ``boxes_from_masks``.

        Raises:
            ValueError: ``chunk`` < 1 or mismatched N / D.
        """
        n, q, d = mask_embed.shape
        if chunk < 1:
            raise ValueError(f"boxes_from_mask_embed: chunk must be >= 1, got {chunk}")
        if mask_features.dim() != 4 or mask_features.shape[:2] != (n, d):
            raise ValueError(f"boxes_from_mask_embed: mask_features must be (N={n}, D={d}, Hm, Wm), got "
                             f"{tuple(mask_features.shape)}")
        h, w = mask_features.shape[-2:]
        feats = mask_features.detach().flatten(2)  # (N, D, Hm*Wm)
        embed = mask_embed.detach()
        rows = torch.empty(n, q, h, dtype=torch.bool, device=embed.device)
        cols = torch.empty(n, q, w, dtype=torch.bool, device=embed.device)
        for a in range(0, q, chunk):
            logits = torch.bmm(embed[:, a : a + chunk], feats).view(n, -1, h, w)
            torch.gt(logits.amax(3), 0, out=rows[:, a : a + chunk])
            torch.gt(logits.amax(2), 0, out=cols[:, a : a + chunk])
        return ProposalDecoder._boxes_from_extents(rows, cols, fallback)

    @staticmethod
    def _boxes_from_extents(rows: torch.Tensor, cols: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """rows (N, Q, Hm) / cols (N, Q, Wm) bool: which rows / columns of each mask hold a
        pixel -> (N, Q, 4) normalised cxcywh boxes of whole pixels; ``fallback`` where empty."""
        h, w = rows.shape[-1], cols.shape[-1]

        def first_last(hit: torch.Tensor):
            size = hit.shape[-1]
            first = hit.to(torch.uint8).argmax(-1)  # the first maximum: the first True
            last = size - 1 - hit.flip(-1).to(torch.uint8).argmax(-1)
            return first, last

        (y1, y2), (x1, x2) = first_last(rows), first_last(cols)
        xyxy = torch.stack((x1, y1, x2 + 1, y2 + 1), dim=-1).to(fallback.dtype)
        xyxy = xyxy / xyxy.new_tensor([w, h, w, h])
        boxes = box_convert(xyxy, "xyxy", "cxcywh")
        return torch.where(cols.any(-1, keepdim=True), boxes, fallback)

    def select_queries(self, enc: PixelDecoderOutput, lazy_masks: bool = False):
        """Top-Q pixels by selection objectness.

        Args:
            enc: the pixel decoder's output.
            lazy_masks: ``interm`` keeps its mask embeddings instead of its (N, Q, Hm, Wm) masks,
                and the mask-initialised reference boxes come from ``boxes_from_mask_embed``
                (same boxes; for inference, where ``interm`` feeds no loss).

        Returns:
            interm: ProposalPredictions of the selection head on the Q pixels (for the loss);
            content (N, Q, D) detached content queries; ref_boxes (N, Q, 4) detached normalised
            cxcywh reference boxes.

        Raises:
            ValueError: if an image has fewer than Q valid encoder pixels.
        """
        memory, anchors_unact, valid = self.pixel_proposals(enc)
        n_valid = int(valid.sum(1).min())
        if n_valid < self.num_queries:
            raise ValueError(f"ProposalDecoder: num_queries ({self.num_queries}, MODEL.PROPOSAL.NUM_QUERIES) "
                             f"exceeds the {n_valid} valid encoder pixels of an image; use a larger input "
                             "or fewer queries")
        scores = self.enc_objectness(memory)[..., 0]  # (N, S)
        scores = scores.masked_fill(~valid, float("-inf"))
        top = scores.topk(self.num_queries, dim=1).indices  # (N, Q)
        index_d = top[..., None].expand(-1, -1, memory.shape[-1])
        feats = memory.gather(1, index_d)  # (N, Q, D)
        boxes_unact = (self.enc_box(feats) + anchors_unact.gather(1, top[..., None].expand(-1, -1, 4)))
        boxes = boxes_unact.sigmoid()
        interm = self.predict(feats, boxes, enc.mask_features, objectness=scores.gather(1, top),
                              lazy_masks=lazy_masks)
        ref_boxes = boxes.detach()
        if self.init_box_from_mask and lazy_masks:
            ref_boxes = self.boxes_from_mask_embed(interm.mask_embed, enc.mask_features, ref_boxes)
        elif self.init_box_from_mask:
            ref_boxes = self.boxes_from_masks(interm.masks, ref_boxes)
        return interm, feats.detach(), ref_boxes

    # ------------------------------------------------------------------ decoder
    def forward(
        self, enc: PixelDecoderOutput, gt_boxes: Optional[Sequence[torch.Tensor]] = None, lazy_masks: bool = False
    ) -> ProposalDecoderOutput:
        """Select queries and decode them.

        Args:
            enc: the pixel decoder's output (memory (N, S, D), mask_features (N, D, Hm, Wm), ...).
            gt_boxes: in training, N tensors (K_i, 4) normalised cxcywh to build denoising queries
                from (ignored when ``dn_num`` is 0 or the module is in eval mode); None otherwise.
                With targets every layer predicts masks (the losses need them); without, only the
                last layer does (the others' ``masks`` are None).
            lazy_masks: without targets, the last layer and ``interm`` keep their mask embeddings
                (``mask_embed``) and leave ``masks`` None, for callers that need the masks of a few
                proposals only (``ProposalOutput.masks_of``). Ignored with targets.

        Returns:
            ProposalDecoderOutput (interm, ``num_layers + 1`` predictions, q^sem, denoising).

        Raises:
            ValueError: if the memory's levels disagree with ``num_levels`` or Q is too large.
        """
        if enc.spatial_shapes.shape[0] != self.num_levels:
            raise ValueError(f"ProposalDecoder: memory has {enc.spatial_shapes.shape[0]} levels, built for "
                             f"{self.num_levels} (len(MODEL.PROPOSAL.IN_FEATURES))")
        interm, content, ref_boxes = self.select_queries(enc, lazy_masks=lazy_masks and gt_boxes is None)
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
        # Intermediate layers' masks feed only the losses: without targets (inference, and the
        # image-level tasks in training) only the last layer's masks are computed (each skipped
        # layer saves a Q x D x Hm x Wm product).
        all_masks = gt_boxes is not None
        stages = [self.predict(tgt, ref_boxes, enc.mask_features, with_masks=all_masks or not self.layers)]
        for i, layer in enumerate(self.layers):
            pos = self.ref_point_head(box_sine_encoding(ref_boxes, 2 * self.hidden_dim))
            refs = ref_boxes[:, :, None].expand(-1, -1, self.num_levels, -1)
            tgt = layer(tgt, pos, refs, enc.memory, enc.spatial_shapes, enc.level_start_index, enc.padding_mask,
                        attn_mask, key_padding_mask)
            new_boxes = (self.box_head(tgt) + inverse_sigmoid(ref_boxes)).sigmoid()
            last = i == len(self.layers) - 1
            stages.append(self.predict(tgt, new_boxes, enc.mask_features, with_masks=all_masks or last,
                                       lazy_masks=last and lazy_masks and not all_masks))
            ref_boxes = new_boxes.detach()

        def split(p: ProposalPredictions, part: slice) -> ProposalPredictions:
            masks = None if p.masks is None else p.masks[:, part]
            embed = None if p.mask_embed is None else p.mask_embed[:, part]
            return ProposalPredictions(p.objectness[:, part], p.boxes[:, part], masks, embed)

        matching = [split(p, slice(t, None)) for p in stages]
        dn_layers = [split(p, slice(0, t)) for p in stages] if dn is not None else None
        return ProposalDecoderOutput(
            interm=interm,
            layers=matching,
            query_features=self.decoder_norm(tgt[:, t:]),
            dn_layers=dn_layers,
            denoising=dn,
        )
