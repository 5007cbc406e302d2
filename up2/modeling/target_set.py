"""Target sets: texts (class names, captions) and vocabulary tokens encoded as targets,
g(f_text(y)) read at [SPE] (paper Eq. 6).

Shape shorthand: C targets, T text tokens, d width.

Every target set goes through :func:`encode_targets`; only how the texts become token features
differs (the text encoder for class names and captions, its context-free embedding layer for
single vocabulary tokens). Target embeddings do not depend on the input, so a model prepared
for inference (``up2.modeling.inference``) keeps them in a :class:`TargetCache`, which is
invalidated whenever a weight they depend on changes (tracked by the parameters' in-place
version counters, which optimizer steps and ``load_state_dict`` both bump).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from up2.modeling.token_attributes import Modality, Role, TaskFamily, TokenAttention, constant_attributes
from up2.modeling.decoder_outputs import SPE
from up2.structures import TokenBatch

__all__ = ["encode_targets", "TargetEmbeddings", "TargetCache"]


@dataclass
class TargetEmbeddings:
    """Embedded targets.

    Attributes:
        embeddings: (C, d) float, g's output at [SPE] for each target (not normalised).
        aux_loss: 0-dim float, the MoE load-balancing loss of these passes through g, or None.
    """

    embeddings: torch.Tensor
    aux_loss: Optional[torch.Tensor] = None


def encode_targets(decoder: nn.Module, features: torch.Tensor, padding_mask: torch.Tensor, family: TaskFamily,
                   chunk: Optional[int] = None) -> TargetEmbeddings:
    """Targets through g, read at [SPE] (paper Eq. 6): the one place targets are encoded.

    Args:
        decoder: the unified decoder g.
        features: (C, T, d) float token features of the C targets (from ``f_text``).
        padding_mask: (C, T) bool, True on padding.
        family: the task family (part of the tokens' MoE routing attributes: text, target,
            bidirectional).
        chunk: targets per pass through g (None = all at once); the result does not depend on it.

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
                                         attention=TokenAttention.BIDIRECTIONAL, task=family,
                                         device=feats.device, dtype=feats.dtype)
        out = decoder(TokenBatch(tokens=feats, padding_mask=pad, attributes=attributes), read=(SPE,))
        outs.append(out.spe)
        if out.aux_loss is not None:
            aux.append(out.aux_loss)
    return TargetEmbeddings(torch.cat(outs), torch.stack(aux).sum() if aux else None)


class TargetCache:
    """Target embeddings of a model prepared for inference (``up2.modeling.inference``).

    ``get(key, params, compute)`` returns the cached (C, d) tensor when the same key (e.g. texts,
    task family, precision) was embedded with the same weights (same parameter identities and
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
