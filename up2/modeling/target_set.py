"""Target sets: texts (class names, captions) and vocabulary tokens encoded as targets,
g(f_text(y)) read at [SPE] (paper Eq. 6).

Shape shorthand: C targets, T text tokens, d width.

Every target set goes through :func:`encode_targets`; the texts become token features through
the text encoder f_text (paper §4.2), class names and captions as written, each vocabulary
token as a text of its own (:func:`encode_vocabulary`). Fixed target sets can be large (1,000
ImageNet class names, 50,265 RoBERTa tokens) and are encoded at every training step, so
:func:`encode_text_targets` encodes them in chunks whose activations are recomputed in the
backward pass instead of kept, split across the ranks of a distributed run, each rank
encoding 1/G of the set and gathering the rest with gradient. Target embeddings do not depend
on the input, so a model prepared for inference (``up2.modeling.inference``) keeps them in a
:class:`TargetCache`, which is invalidated whenever a weight they depend on changes (tracked
by the parameters' in-place version counters, which optimizer steps and ``load_state_dict``
both bump).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from up2.modeling.token_attributes import Modality, Role, TokenAttention, constant_attributes
from up2.modeling.decoder_outputs import SPE
from up2.structures import TokenBatch
from up2.utils.distributed import gather_with_grad

__all__ = ["encode_targets", "encode_text_targets", "encode_vocabulary", "TargetEmbeddings", "TargetCache"]


@dataclass
class TargetEmbeddings:
    """Embedded targets.

    Attributes:
        embeddings: (C, d) float, g's output at [SPE] for each target (not normalised).
        aux_loss: 0-dim float, the MoE load-balancing loss of these passes through g, or None.
    """

    embeddings: torch.Tensor
    aux_loss: Optional[torch.Tensor] = None


def encode_targets(decoder: nn.Module, features: torch.Tensor, padding_mask: torch.Tensor, inputs: AbstractSet[Modality],
                   chunk: Optional[int] = None) -> TargetEmbeddings:
    """Targets through g, read at [SPE] (paper Eq. 6): the one place targets are encoded.

    Args:
        decoder: the unified decoder g.
        features: (C, T, d) float token features of the C targets (from ``f_text``).
        padding_mask: (C, T) bool, True on padding.
        inputs: the modalities of the task's input x (with text, target, bidirectional: the
            tokens' MoE routing attributes).
        chunk: targets per pass through g (None = all at once); the result does not depend on it
            (except that in training each pass draws its own MoE gate noise).

    Returns:
        TargetEmbeddings: (C, d) embeddings and the summed MoE balance loss of the passes.

    Raises:
        ValueError: no targets (C = 0).
    """
    if features.shape[0] == 0:
        raise ValueError("the target set is empty: give at least one class name / text")
    chunk = chunk or features.shape[0]
    outs, aux = [], []
    for start in range(0, features.shape[0], chunk):
        feats, pad = features[start : start + chunk], padding_mask[start : start + chunk]
        attributes = constant_attributes(*pad.shape, modality=Modality.TEXT, role=Role.TARGET,
                                         attention=TokenAttention.BIDIRECTIONAL, inputs=inputs,
                                         device=feats.device, dtype=feats.dtype)
        out = decoder(TokenBatch(tokens=feats, padding_mask=pad, attributes=attributes), read=(SPE,))
        outs.append(out.spe)
        if out.aux_loss is not None:
            aux.append(out.aux_loss)
    return TargetEmbeddings(torch.cat(outs), torch.stack(aux).sum() if aux else None)


def _world() -> Tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def encode_text_targets(text_encoder: nn.Module, decoder: nn.Module, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor, inputs: AbstractSet[Modality], chunk_tokens: int,
                        recompute: bool = False, shard: bool = False) -> TargetEmbeddings:
    """A fixed set of tokenized texts as targets: g(f_text(y)) at [SPE] (paper §4.2, Eq. 6),
    ``chunk_tokens // T`` texts (at least one) per pass through f_text and g (:func:`encode_targets`),
    so a chunk's activations are bounded whatever the texts' length. Two memory savers for
    training on large target sets (ImageNet's 1,000 class names, a 50,265-token vocabulary),
    neither of which changes the result:

    * ``recompute``: activation checkpointing per chunk. Only the chunk's ids and its (chunk, d)
      embeddings are kept for the backward pass; the text encoder's and g's activations are
      recomputed there (one more forward of the target set per step; checkpointing replays
      the RNG, so a recomputed pass draws the same MoE gate noise).
    * ``shard``: in a distributed run, rank r encodes the r-th of G equal slices of the set (the
      last padded by repeating its final row) and the embeddings are gathered from every rank
      with gradient (``up2.utils.distributed.gather_with_grad``, whose backward sums each slice's
      gradient over the ranks, so DDP's averaging yields the gradient of the mean loss). Every
      rank must run this call together, on the same set (unmixed task sampling, paper §4.4).
      Without a process group, or with one rank, it does nothing.

    Args:
        text_encoder: f_text (``up2.modeling.text_encoder.TextEncoder``).
        decoder: the unified decoder g.
        input_ids: (C, T) int64 token ids. attention_mask: (C, T) int64 or bool, 1 = token.
        inputs: the modalities of the task's input x (MoE routing attribute of the targets).
        chunk_tokens: text tokens (rows x T, padding included) per pass through f_text and g (>= 1).
        recompute: checkpoint each chunk (use it when gradients are needed).
        shard: split the set across the ranks of the default process group.

    Returns:
        TargetEmbeddings: (C, d) embeddings, rows in the order of ``input_ids``, and the MoE
        balance loss of this rank's passes (None without MoE balancing).

    Raises:
        ValueError: an empty set, mismatched shapes, or ``chunk_tokens`` < 1.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"encode_text_targets: expected non-empty (C, T) ids and an attention mask of the same "
                         f"shape, got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"encode_text_targets: chunk_tokens must be >= 1, got {chunk_tokens}")
    chunk = max(1, chunk_tokens // input_ids.shape[1])
    rank, world = _world() if shard else (0, 1)
    C = input_ids.shape[0]
    ids, mask = input_ids, attention_mask
    if world > 1:
        per_rank = -(-C // world)
        rows = torch.arange(per_rank * world, device=ids.device).clamp(max=C - 1)[rank * per_rank : (rank + 1) * per_rank]
        ids, mask = ids[rows], mask[rows]

    def run(part_ids: torch.Tensor, part_mask: torch.Tensor):
        emb = encode_targets(decoder, *text_encoder(part_ids, part_mask), inputs)
        return emb.embeddings, emb.aux_loss

    outs, aux = [], []
    for start in range(0, ids.shape[0], chunk):
        part = (ids[start : start + chunk], mask[start : start + chunk])
        emb, loss = checkpoint(run, *part, use_reentrant=False) if recompute else run(*part)
        outs.append(emb)
        if loss is not None:
            aux.append(loss)
    embeddings = torch.cat(outs)
    if world > 1:
        embeddings = gather_with_grad(embeddings)[:C]
    return TargetEmbeddings(embeddings, torch.stack(aux).sum() if aux else None)


def encode_vocabulary(text_encoder: nn.Module, decoder: nn.Module, token_ids: torch.Tensor,
                      inputs: AbstractSet[Modality],
                      chunk_tokens: int, recompute: bool = False, shard: bool = False) -> TargetEmbeddings:
    """Vocabulary tokens as targets: g(f_text(v)) at [SPE] for every token v (paper §4.2, Eq. 6).

    Each token is a text of its own, framed as the tokenizer frames every text
    (``TextEncoder.frame_single_tokens``), and goes through :func:`encode_text_targets` with its
    ``chunk_tokens`` / ``recompute`` / ``shard`` settings (3 text tokens per vocabulary token).

    Args:
        text_encoder: f_text (``up2.modeling.text_encoder.TextEncoder``).
        decoder: the unified decoder g.
        token_ids: (V,) int64 vocabulary ids.
        inputs, chunk_tokens, recompute, shard: as :func:`encode_text_targets`.

    Returns:
        TargetEmbeddings: (V, d) embeddings, rows in the order of ``token_ids``, and the MoE
        balance loss of this rank's passes (None without MoE balancing).

    Raises:
        ValueError: an empty vocabulary, ``chunk_tokens`` < 1, or ids out of the text encoder's range.
    """
    if token_ids.dim() != 1 or token_ids.numel() == 0:
        raise ValueError(f"encode_vocabulary: expected a non-empty (V,) id tensor, got shape {tuple(token_ids.shape)}")
    return encode_text_targets(text_encoder, decoder, *text_encoder.frame_single_tokens(token_ids), inputs,
                               chunk_tokens=chunk_tokens, recompute=recompute, shard=shard)


class TargetCache:
    """Target embeddings of a model prepared for inference (``up2.modeling.inference``).

    ``get(key, params, compute)`` returns the cached (C, d) tensor when the same key (e.g. texts,
    input modalities, precision) was embedded with the same weights (same parameter identities and
    version counters); otherwise it calls ``compute()`` and stores its result, detached.
    """

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._store: Dict[Tuple, Tuple[tuple, torch.Tensor]] = {}

    @staticmethod
    def _stamp(params: Iterable[torch.Tensor]) -> tuple:
        return tuple((id(p), p._version) for p in params)

    def clear(self) -> None:
        self._store.clear()

    def get(self, key: Tuple, params: Iterable[torch.Tensor], compute: Callable[[], torch.Tensor]):
        key = tuple(key)
        stamp = self._stamp(params)
        hit = self._store.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = compute()
        if len(self._store) >= self.max_entries:
            self._store.pop(next(iter(self._store)))
        self._store[key] = (stamp, value.detach())
        return value
