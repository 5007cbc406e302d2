"""Per-token routing attributes for the conditional MoE (paper §4.3, §5.2; Uni-Perceiver-MoE,
arXiv 2206.04674, attribute-level routing).

Shape shorthand: B sequences, T tokens, A = ``ATTRIBUTE_DIM`` attribute width.

A token's attributes say what KIND of token it is, never what it contains and never which task
it belongs to: its modality (image / text), its role (part of the input x or of a target y),
how it attends (bidirectionally or causally) and which modalities the task's INPUT x has (e.g.
image only for classification and detection, text only for masked LM, image and text for
captioning). The conditional MoE gate sees only this vector, so tokens with equal attributes
are routed to the same experts, and two tasks whose tokens have equal attributes share routing.

The encoding is the concatenation of three one-hot blocks and one multi-hot block::

    [ modality (2) | role (2) | attention (2) | task input modalities (2, multi-hot) ]  -> A = 8

Typical use in a task's ``build_inputs`` (captioning: the task's input is image + text)::

    inputs = input_modalities(Modality.IMAGE, Modality.TEXT)
    image = constant_attributes(B, T_img, modality=Modality.IMAGE, role=Role.INPUT,
                                attention=TokenAttention.BIDIRECTIONAL, inputs=inputs)
    text = constant_attributes(B, T_txt, modality=Modality.TEXT, role=Role.INPUT,
                               attention=TokenAttention.CAUSAL, inputs=inputs)
    TokenBatch(..., attributes=concat_attributes([image, text]))
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import FrozenSet, Iterable, Optional, Sequence, Union

import torch

from up2.structures import TokenAttention
from up2.utils.host_sync import device_assert

__all__ = [
    "Modality",
    "Role",
    "TokenAttention",
    "TokenAttributes",
    "input_modalities",
    "input_modalities_key",
    "ATTRIBUTE_DIM",
    "encode_attributes",
    "constant_attributes",
    "concat_attributes",
]


class Modality(Enum):
    """Which encoder f produced the token."""

    IMAGE = "image"
    TEXT = "text"


class Role(Enum):
    """Whether the token belongs to an input x or to a target y (paper Eq. 5)."""

    INPUT = "input"
    TARGET = "target"


def input_modalities(*modalities: Modality) -> FrozenSet[Modality]:
    """The modalities of a task's input x, e.g. ``input_modalities(Modality.IMAGE, Modality.TEXT)``.

    Raises:
        ValueError: no modality given.
        TypeError: an argument is not a ``Modality``.
    """
    return _check_inputs(modalities)


def _check_inputs(inputs: Iterable[Modality]) -> FrozenSet[Modality]:
    if isinstance(inputs, (Enum, str)) or not isinstance(inputs, Iterable):
        raise TypeError(f"attribute 'inputs': expected a collection of Modality members, got {inputs!r}")
    inputs = frozenset(inputs)
    for m in inputs:
        if not isinstance(m, Modality):
            raise TypeError(f"attribute 'inputs': expected Modality members, got {m!r}")
    if not inputs:
        raise ValueError("attribute 'inputs': a task's input has at least one modality, got none")
    return inputs


def input_modalities_key(inputs: Iterable[Modality]) -> str:
    """A stable string for a set of input modalities (cache keys): e.g. ``"image+text"``."""
    inputs = _check_inputs(inputs)
    return "+".join(m.value for m in Modality if m in inputs)


_BLOCKS = (Modality, Role, TokenAttention)  # one-hot blocks; then the multi-hot task input modalities
_FIELDS = ("modality", "role", "attention")
ATTRIBUTE_DIM = sum(len(block) for block in _BLOCKS) + len(Modality)  # A: width of the attribute vector


def _index(member: Enum, block: type) -> int:
    if not isinstance(member, block):
        raise TypeError(f"expected a {block.__name__} member, got {member!r}")
    return list(block).index(member)


@dataclass(frozen=True)
class TokenAttributes:
    """The attributes of one kind of token; ``encode()`` gives its (A,) vector.

    ``inputs`` is the set of modalities of the task's input x (``input_modalities(...)``).
    """

    modality: Modality
    role: Role
    attention: TokenAttention
    inputs: FrozenSet[Modality]

    def encode(self, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(A,) ``dtype`` tensor: the three one-hot blocks and the multi-hot input modalities.

        Raises:
            TypeError: a field is not a member of its Enum (``inputs``: not Modality members).
            ValueError: ``inputs`` is empty.
        """
        return encode_attributes(self.modality, self.role, self.attention, self.inputs, device=device, dtype=dtype)


AttributeField = Union[Enum, torch.Tensor]


def encode_attributes(
    modality: AttributeField,
    role: AttributeField,
    attention: AttributeField,
    inputs: Iterable[Modality],
    *,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Encode token attributes.

    ``modality``, ``role`` and ``attention`` are each either an Enum member (same value for
    every token) or an int64 tensor of member indices (position in the Enum's definition order,
    e.g. ``list(Modality).index(m)``); tensors broadcast against each other. ``inputs``, the
    modalities of the task's input, is the same for every token of a call.

    Args:
        modality / role / attention: a ``Modality`` / ``Role`` / ``TokenAttention`` member, or an
            integer tensor of shape (...) with indices into it.
        inputs: a non-empty collection of ``Modality`` members (``input_modalities(...)``).
        device: device of the result when no field is a tensor (else the tensors' device).
        dtype: floating dtype of the result.

    Returns:
        (..., A) ``dtype`` tensor with exactly one 1 in each of the three one-hot blocks and a 1
        for each input modality in the last block; (...) is the broadcast shape of the tensor
        fields, () when all fields are Enum members.

    Raises:
        TypeError: a field is neither a member of its Enum nor an integer tensor, or ``inputs``
            holds something other than ``Modality`` members.
        ValueError: an index tensor holds a value outside [0, len(Enum)), or ``inputs`` is empty.
    """
    inputs = _check_inputs(inputs)
    values = (modality, role, attention)
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if tensors:
        device = tensors[0].device
    # Built with comparisons and fills on the device: no host-to-device copy and no host sync
    # (F.one_hot would read the indices' range back to the host).
    parts = []
    for name, value, block in zip(_FIELDS, values, _BLOCKS):
        positions = torch.arange(len(block), device=device)
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"attribute {name!r}: expected an integer index tensor, got dtype {value.dtype}")
            _check_index_range(name, value, block)
            parts.append(value.to(device=device)[..., None] == positions)
        else:
            parts.append(positions == _index(value, block))
    # multi-hot input modalities: bit i of the Python int ``mask`` is set for the i-th Modality
    mask = sum(1 << i for i, m in enumerate(Modality) if m in inputs)
    bits = torch.arange(len(Modality), device=device)
    parts.append(torch.bitwise_and(torch.bitwise_left_shift(torch.ones_like(bits), bits), mask) != 0)
    shape = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return torch.cat([p.expand(*shape, p.shape[-1]) for p in parts], dim=-1).to(dtype)


def _check_index_range(name: str, value: torch.Tensor, block: type) -> None:
    """ValueError unless every index lies in [0, len(block)) (checked on the device: no host sync)."""
    if value.numel():
        device_assert((value >= 0) & (value < len(block)),
                      f"attribute {name!r}: indices must lie in [0, {len(block)}) for {block.__name__}")


def constant_attributes(
    batch_size: int,
    length: int,
    *,
    modality: Modality,
    role: Role,
    attention: TokenAttention,
    inputs: Iterable[Modality],
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The same attributes for every token of a (B, T) block (``inputs``: the modalities of the
    task's input, see ``encode_attributes``).

    Returns:
        (B, T, A) ``dtype`` tensor (contiguous) on ``device``.

    Raises:
        ValueError: negative ``batch_size`` or ``length``, or empty ``inputs``.
        TypeError: a field is not a member of its Enum.
    """
    if batch_size < 0 or length < 0:
        raise ValueError(f"constant_attributes: batch_size and length must be >= 0, got {batch_size}, {length}")
    vector = TokenAttributes(modality, role, attention, _check_inputs(inputs)).encode(device=device, dtype=dtype)
    return vector.expand(batch_size, length, ATTRIBUTE_DIM).contiguous()


def concat_attributes(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate attribute blocks along the token axis, in sequence order.

    Args:
        parts: tensors (B, T_i, A), same B, A, dtype and device.

    Returns:
        (B, sum T_i, A).

    Raises:
        ValueError: no parts, a part that is not 3-D with last dim A, or mismatched batch sizes.
    """
    if not parts:
        raise ValueError("concat_attributes: got no parts")
    for i, p in enumerate(parts):
        if p.dim() != 3 or p.shape[-1] != ATTRIBUTE_DIM:
            raise ValueError(
                f"concat_attributes: part {i} has shape {tuple(p.shape)}, expected (B, T, {ATTRIBUTE_DIM})"
            )
        if p.shape[0] != parts[0].shape[0]:
            raise ValueError(f"concat_attributes: part {i} has batch size {p.shape[0]}, part 0 has {parts[0].shape[0]}")
    return torch.cat(list(parts), dim=1)
