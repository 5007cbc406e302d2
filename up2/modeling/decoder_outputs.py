"""What the unified decoder g gives its callers: named output segments and the key/value cache
of incremental decoding (paper §4.3).

Shape shorthand: B sequences, S positions, H heads, d width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from up2.utils.host_sync import device_assert

__all__ = ["SPE", "DecoderOutput", "DecoderCache", "segment_span"]

SPE = "spe"  # the name of g's sequence-level output, position 0 (paper §4.3)


def segment_span(segments: Dict[str, slice], read: Optional[Sequence[str]], length: int) -> slice:
    """The positions from the first to the last segment in ``read`` (all ``length`` for None).

    Raises:
        ValueError: ``read`` is empty or names a segment that is not in ``segments``.
    """
    if read is None:
        return slice(0, length)
    if isinstance(read, str):
        read = (read,)
    unknown = [name for name in read if name not in segments]
    if unknown or not read:
        raise ValueError(f"read={list(read)}: g's segments are {sorted(segments)}")
    return slice(min(segments[n].start for n in read), max(segments[n].stop for n in read))


@dataclass
class DecoderOutput:
    """What g gives a task: features of named token segments (paper §4.3, Eq. 6).

    Attributes:
        features: (B, S, d) float, the positions of the read span.
        segments: name -> slice of ``features``: ``"spe"`` (position 0 of the sequence) and the
            input batch's segments (e.g. "global", "regional", "text") that lie in the span.
        aux_loss: 0-dim float, the MoE load-balancing loss summed over layers (already weighted
            by its BALANCE_LOSS_WEIGHT), or None with dense FFNs.
    """

    features: torch.Tensor
    segments: Dict[str, slice]
    aux_loss: Optional[torch.Tensor] = None

    def __getitem__(self, name: str) -> torch.Tensor:
        """(B, n, d) features of the segment ``name``.

        Raises:
            KeyError: ``name`` is not a segment of this output.
        """
        if name not in self.segments:
            raise KeyError(f"g's output has no segment {name!r}; it has {sorted(self.segments)}")
        return self.features[:, self.segments[name]]

    @property
    def spe(self) -> torch.Tensor:
        """(B, d): the sequence-level feature at [SPE]."""
        return self[SPE][:, 0]


@dataclass
class DecoderCache:
    """Keys and values of a token prefix at every layer of g, for incremental decoding.

    Captioning attends prefix-causally (paper §4.3, Eq. 7): no position depends on a later
    one, so the features of the tokens seen so far never change and their keys and values can
    be kept instead of recomputed at every generated token.

    Attributes:
        layers: per layer (keys, values), each (B, H, S, d / H) in the compute dtype.
        padding_mask: (B, S) bool, True on padded tokens (never attended).
    """

    layers: List[Tuple[torch.Tensor, torch.Tensor]]
    padding_mask: torch.Tensor

    def reorder(self, index: torch.Tensor) -> "DecoderCache":
        """The cache of sequences ``index`` (B',) int64, e.g. the parents of the kept beams (a
        copy; a caller whose index is 0 .. B-1 by construction, as greedy decoding, skips the call).

        Raises:
            ValueError: ``index`` not a 1-D int64 tensor of values in [0, B).
        """
        B = self.padding_mask.shape[0]
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype != torch.long:
            raise ValueError(f"DecoderCache.reorder: index must be a 1-D int64 tensor, got {index!r}")
        if index.numel():
            device_assert((index >= 0) & (index < B), f"DecoderCache.reorder: index values must be in [0, {B})")
        return DecoderCache([(k.index_select(0, index), v.index_select(0, index)) for k, v in self.layers],
                            self.padding_mask.index_select(0, index))
