"""Per-token routing attributes for the conditional MoE (paper §4.3; Uni-Perceiver-MoE).

Shape shorthand: B sequences, T tokens, A = ``ATTRIBUTE_DIM`` attribute width.

A token's attributes say what KIND of token it is, never what it contains: its modality
(image / text), its role (part of the input x or of a target y), how it attends
(bidirectionally or causally) and the task family of the batch. The conditional MoE gate
sees only this vector, so tokens with equal attributes are routed to the same experts.

The encoding is the concatenation of four one-hot blocks, in this order::

    [ modality (2) | role (2) | attention (2) | task family (5) ]   -> A = 11

Typical use in a task's ``build_inputs``::

    image = constant_attributes(B, T_img, modality=Modality.IMAGE, role=Role.INPUT,
                                attention=TokenAttention.BIDIRECTIONAL, task=TaskFamily.CAPTIONING)
    text = constant_attributes(B, T_txt, modality=Modality.TEXT, role=Role.INPUT,
                               attention=TokenAttention.CAUSAL, task=TaskFamily.CAPTIONING)
    TokenBatch(..., attributes=concat_attributes([image, text]))
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional, Sequence, Union

import torch

from up2.structures import TokenAttention

__all__ = [
    "Modality",
    "Role",
    "TokenAttention",
    "TaskFamily",
    "TokenAttributes",
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


class TaskFamily(Enum):
    """The family of task a batch belongs to (paper §4.3, Conditional MoE routing)."""

    LOCALIZATION = "localization"  # detection, instance segmentation
    CLASSIFICATION = "classification"
    RETRIEVAL = "retrieval"
    CAPTIONING = "captioning"
    MLM = "mlm"  # masked language modelling


_BLOCKS = (Modality, Role, TokenAttention, TaskFamily)
_FIELDS = ("modality", "role", "attention", "task")
ATTRIBUTE_DIM = sum(len(block) for block in _BLOCKS)  # A: width of the one-hot attribute vector


def _index(member: Enum, block: type) -> int:
    if not isinstance(member, block):
        raise TypeError(f"expected a {block.__name__} member, got {member!r}")
    return list(block).index(member)


@dataclass(frozen=True)
class TokenAttributes:
    """The attributes of one kind of token; ``encode()`` gives its (A,) one-hot vector."""

    modality: Modality
    role: Role
    attention: TokenAttention
    task: TaskFamily

    def encode(self, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(A,) ``dtype`` tensor: the four one-hot blocks concatenated.

        Raises:
            TypeError: a field is not a member of its Enum.
        """
        return encode_attributes(self.modality, self.role, self.attention, self.task, device=device, dtype=dtype)


AttributeField = Union[Enum, torch.Tensor]


def encode_attributes(
    modality: AttributeField,
    role: AttributeField,
    attention: AttributeField,
    task: AttributeField,
    *,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One-hot encode token attributes.

    Each field is either an Enum member (same value for every token) or an int64 tensor of
    member indices (position in the Enum's definition order, e.g. ``list(Modality).index(m)``).
    Tensors broadcast against each other.

    Args:
        modality / role / attention / task: a ``Modality`` / ``Role`` / ``TokenAttention`` /
            ``TaskFamily`` member, or an integer tensor of shape (...) with indices into it.
        device: device of the result when no field is a tensor (else the tensors' device).
        dtype: floating dtype of the result.

    Returns:
        (..., A) ``dtype`` tensor with exactly one 1 in each of the four blocks; (...) is the
        broadcast shape of the tensor fields, () when all fields are Enum members.

    Raises:
        TypeError: a field is neither a member of its Enum nor an integer tensor.
        ValueError: an index tensor holds a value outside [0, len(Enum)).
    """
    values = (modality, role, attention, task)
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if tensors:
        device = tensors[0].device
    indices = []
    for name, value, block in zip(_FIELDS, values, _BLOCKS):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"attribute {name!r}: expected an integer index tensor, got dtype {value.dtype}")
            if value.numel() and (int(value.min()) < 0 or int(value.max()) >= len(block)):
                raise ValueError(
                    f"attribute {name!r}: indices must lie in [0, {len(block)}) for {block.__name__}, "
                    f"got range [{int(value.min())}, {int(value.max())}]"
                )
            indices.append(value.to(device=device, dtype=torch.int64))
        else:
            indices.append(torch.tensor(_index(value, block), device=device))
    indices = torch.broadcast_tensors(*indices)
    parts = [torch.nn.functional.one_hot(idx, len(block)) for idx, block in zip(indices, _BLOCKS)]
    return torch.cat(parts, dim=-1).to(dtype)


def constant_attributes(
    batch_size: int,
    length: int,
    *,
    modality: Modality,
    role: Role,
    attention: TokenAttention,
    task: TaskFamily,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The same attributes for every token of a (B, T) block.

    Returns:
        (B, T, A) ``dtype`` tensor (contiguous) on ``device``.

    Raises:
        ValueError: negative ``batch_size`` or ``length``.
        TypeError: a field is not a member of its Enum.
    """
    if batch_size < 0 or length < 0:
        raise ValueError(f"constant_attributes: batch_size and length must be >= 0, got {batch_size}, {length}")
    vector = TokenAttributes(modality, role, attention, task).encode(device=device, dtype=dtype)
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
