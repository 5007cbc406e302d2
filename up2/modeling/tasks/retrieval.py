"""Image-text retrieval in the unified formulation (paper §4.3, §4.4 "Gather Feature").

Shape shorthand: N images (= captions) in the local batch, G = N x world size, d width.

The image token sequence and the caption (through f_text) are encoded by g SEPARATELY and read
at [SPE]; the loss is the symmetric InfoNCE of Eq. 7 over the batch: every image against all
captions and every caption against all images. With ``gather`` (default) the features of all
ranks are gathered WITH gradient, so the negatives are the global batch.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from up2.modeling.tasks.base import TaskSpec, register_task
from up2.modeling.token_attributes import Modality, Role, TaskFamily, TokenAttention, constant_attributes
from up2.modeling.unified_decoder import SPE_POSITION
from up2.structures import TokenBatch

__all__ = ["RetrievalTask", "gather_with_grad", "infonce", "retrieval_loss"]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(N, d) on each rank -> (G, d), rank-major, differentiable (torch.distributed.nn)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def infonce(logits: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """InfoNCE of one direction: cross-entropy of each local query against the gathered keys.

    Args:
        logits: (N, G) float32, local queries (rows) vs all keys; row i's positive is column
            ``offset + i`` (the rank's slice of the gathered batch).

    Returns:
        0-dim float. RetrievalTask averages image->text and text->image.
    """
    target = torch.arange(logits.shape[0], device=logits.device) + offset
    return F.cross_entropy(logits, target)


def retrieval_loss(img: torch.Tensor, txt: torch.Tensor, likelihood, gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE (Eq. 7 for retrieval) with optional Gather Feature (paper §4.4).

    Args:
        img: (N, d) image features at [SPE]; txt: (N, d) features of their captions (row i pairs
            with row i). likelihood: the Likelihood module (cos / tau). gather: use the features
            of every rank as negatives (gathered with gradient).

    Returns:
        0-dim float: mean of image->text and text->image cross-entropy over the local queries.
    """
    distributed = gather and dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    all_img = gather_with_grad(img) if gather else img
    all_txt = gather_with_grad(txt) if gather else txt
    offset = rank * img.shape[0]
    return 0.5 * (infonce(likelihood(img, all_txt), offset) + infonce(likelihood(txt, all_img), offset))


@register_task("retrieval")
class RetrievalTask:
    """Inputs: image-text mapper dicts ("image"; "caption" (str) in training; "captions" (list of
    str) at evaluation). Eval output per image: {"image_embedding": (d,), "text_embeddings":
    (n_i, d)} for ``up2.evaluation.RetrievalEvaluator``."""

    family = TaskFamily.RETRIEVAL

    def __init__(self, spec: TaskSpec, **_):
        self.spec = spec
        self.gather = spec.gather_features

    def encode_texts(self, model, texts: Sequence[str]) -> torch.Tensor:
        """(B, d) caption features at [SPE] (text, target role, bidirectional)."""
        feats, pad = model.text_encoder.encode(list(texts))
        attributes = constant_attributes(*pad.shape, modality=Modality.TEXT, role=Role.TARGET,
                                         attention=TokenAttention.BIDIRECTIONAL, task=self.family,
                                         device=feats.device, dtype=feats.dtype)
        batch = TokenBatch(tokens=feats, padding_mask=pad, attributes=attributes)
        return model.unified_decoder(batch, outputs=SPE_POSITION)[:, 0]

    def __call__(self, model, batched_inputs: Sequence[dict]):
        """Raises: KeyError for an input without "caption" (training) / "captions" (eval);
        ValueError for an empty caption list."""
        enc = model.encode_image(batched_inputs, self.family)
        img = model.unified_decoder(enc.tokens.batch, outputs=SPE_POSITION)[:, 0]  # (N, d)
        if model.training:
            captions = [_field(d, "caption", i) for i, d in enumerate(batched_inputs)]
            txt = self.encode_texts(model, captions)
            return {"loss_retrieval": self.spec.loss_weight * retrieval_loss(img, txt, model.likelihood, self.gather)}
        results = []
        for i, d in enumerate(batched_inputs):
            caps = _field(d, "captions", i)
            if len(caps) == 0:
                raise ValueError(f"retrieval input {i} (image_id {d.get('image_id')}) has no captions")
            results.append({"image_embedding": img[i], "text_embeddings": self.encode_texts(model, caps)})
        return results


def _field(d: dict, key: str, i: int):
    if key not in d:
        raise KeyError(f"retrieval input {i} ({d.get('file_name', '?')}) has no {key!r}")
    return d[key]
