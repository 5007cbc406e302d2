"""Target sets: texts (class names, ...) encoded as g(f_text(y)) read at [SPE] (paper Eq. 6).

Shape shorthand: C candidate texts, T text tokens, d width.

Target embeddings do not depend on the input, so training computes them once per
batch and evaluation reuses them through :class:`TargetCache`, which is invalidated whenever a
weight they depend on changes (tracked by the parameters' in-place version counters, which
optimizer steps and ``load_state_dict`` both bump).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Sequence, Tuple

import torch
from torch import nn

from up2.modeling.token_attributes import Modality, Role, TaskFamily, TokenAttention, constant_attributes
from up2.structures import TokenBatch

__all__ = ["encode_texts", "TargetCache"]


def encode_texts(
    text_encoder: nn.Module, decoder: nn.Module, texts: Sequence[str], family: TaskFamily = TaskFamily.LOCALIZATION
) -> torch.Tensor:
    """Embed texts as targets.

    Args:
        text_encoder: ``up2.modeling.text_encoder.TextEncoder`` (``encode(texts)`` ->
            features (C, T, d), padding_mask (C, T) bool).
        decoder: the unified decoder g.
        texts: C strings; must not be empty.
        family: task family, part of the tokens' MoE routing attributes (text, target, bidirectional).

    Returns:
        (C, d) float, g's output at [SPE] for each text (not normalised).

    Raises:
        ValueError: an empty list of texts.
    """
    if len(texts) == 0:
        raise ValueError("the target set is empty: give at least one class name / text")
    feats, pad = text_encoder.encode(list(texts))
    attributes = constant_attributes(
        *pad.shape, modality=Modality.TEXT, role=Role.TARGET, attention=TokenAttention.BIDIRECTIONAL,
        task=family, device=feats.device, dtype=feats.dtype,
    )
    return decoder(TokenBatch(tokens=feats, padding_mask=pad, attributes=attributes))[:, 0]


class TargetCache:
    """Caches target embeddings at evaluation time; never used while training.

    ``get(key, params, compute)`` returns the cached (C, d) tensor when the same key (texts and task family) was
    embedded with the same weights (same parameter identities and version counters) and
    grad mode is off; otherwise it calls ``compute()`` and stores the result.
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
        if not torch.is_grad_enabled():
            if len(self._store) >= self.max_entries:
                self._store.pop(next(iter(self._store)))
            self._store[key] = (stamp, value.detach())
        return value
