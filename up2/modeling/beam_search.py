"""Batched beam search over a target set with a length penalty (captioning, paper §4.3 / §5.1).

Shape shorthand: N sequences (images), K beams per sequence, V targets (vocabulary entries),
t tokens generated so far.

The search keeps, per image, the K partial sequences with the highest SUM of log-probabilities
(no length normalisation while searching). A beam that emitted an end target is finished: it
keeps its score and extends only with the filler target at log-probability 0. When every beam
is finished or ``max_length`` steps ran, the K final beams are ranked by the length-normalised
score (the protocol of Uni-Perceiver's caption beam searcher and of fairseq's sequence generator):

    score(y) = sum_{i=1..|y|} log p(y_i | y_<i, x) / |y| ** length_penalty

where |y| counts the generated targets up to and including the first end target; a sequence cut
at ``max_length`` without one counts ``max_length + 1`` (as if the end followed). With
``length_penalty = 0`` the score is the plain sum, so beam 1 is exactly greedy decoding; a
larger penalty favours longer sequences. Uni-Perceiver's COCO caption protocol is beam 2,
length penalty 2.0 (its ``DECODE_STRATEGY.BEAM_SIZE`` / ``LEN_PENALTY``).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from up2.utils.host_sync import to_device

__all__ = ["BeamSearchOutput", "beam_search", "normalized_scores", "check_beam_int", "EARLY_STOP_EVERY"]

EARLY_STOP_EVERY = 8  # steps between the host checks whether every beam has ended

# step(generated (N*K, t) int64 target indices, parents (N*K,) int64 or None) -> (N*K, V) log-probs
StepFn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class BeamSearchOutput:
    """The best sequence of each image.

    Attributes:
        indices: (N, t) int64 target indices; after the first end target the filler repeats.
        lengths: (N,) int64 |y| of the score (generated targets up to and including the first end
            target; ``max_length + 1`` for a sequence cut without one).
        scores: (N,) float32 length-normalised scores (module docstring).
    """

    indices: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor


def normalized_scores(sum_logp: torch.Tensor, lengths: torch.Tensor, length_penalty: float) -> torch.Tensor:
    """``sum_logp / lengths ** length_penalty`` (float32, any matching shapes); the plain sum when
    the penalty is 0."""
    if length_penalty == 0:
        return sum_logp.float()
    return sum_logp.float() / lengths.float().pow(length_penalty)


def _sequence_lengths(generated: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """(B,) |y| of (B, t) generated indices: the position of the first end target + 1, or t + 1."""
    is_end = torch.isin(generated, ends)
    t = generated.shape[1]
    first = torch.where(is_end.any(1), is_end.int().argmax(1), torch.full_like(is_end[:, 0], t, dtype=torch.long))
    return first + 1


def check_beam_int(name: str, value) -> int:
    """``value`` as an int >= 1; ValueError naming ``name`` otherwise (bool, float, None too)."""
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= 1
    except TypeError:  # a float, None, a non-integer tensor
        ok = False
    if not ok:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return operator.index(value)


def beam_search(step: StepFn, batch_size: int, beam_size: int, max_length: int, end_indices: Sequence[int],
                filler_index: int, length_penalty: float = 0.0,
                device: Optional[torch.device] = None) -> BeamSearchOutput:
    """Decode ``batch_size`` sequences at once with ``beam_size`` beams each (module docstring).

    Args:
        step: the model. Called once per generated position with ``generated`` (N*K, t) int64
            target indices so far (t = 0 on the first call; rows n*K .. n*K+K-1 are image n's beams)
            and ``parents`` (N*K,) int64: row j of this call continues row ``parents[j]`` of the
            previous call (None on the first call; reorder any cache with it). Returns (N*K, V)
            log-probabilities of the next target (any float dtype; scored in float32).
        batch_size: N. beam_size: K (1 = greedy). max_length: most generated targets.
        end_indices: target indices that end a sequence (e.g. the end and padding tokens).
        filler_index: the target a finished beam repeats at no cost (e.g. padding).
        length_penalty: the exponent of |y| in the final ranking (>= 0; 0 = plain sum).
        device: where the search state lives (default: the CPU).

    Returns:
        :class:`BeamSearchOutput` with the best of the K final beams per image.

    Raises:
        ValueError: ``beam_size`` / ``max_length`` not an int >= 1, a negative or non-finite
            ``length_penalty``, no end index, or ``step`` returning a tensor of the wrong shape.
    """
    K = check_beam_int("beam_size", beam_size)
    max_length = check_beam_int("max_length", max_length)
    N = int(batch_size)
    try:
        lp = float(length_penalty)
    except (TypeError, ValueError):
        lp = float("nan")
    if isinstance(length_penalty, bool) or not (lp >= 0 and lp != float("inf")):
        raise ValueError(f"length_penalty must be a finite float >= 0, got {length_penalty!r}")
    if len(end_indices) == 0:
        raise ValueError("end_indices is empty: beam search needs at least one target that ends a sequence")
    ends = to_device(list(end_indices), device, torch.long)
    rows = torch.arange(N, device=device)[:, None] * K  # (N, 1) first row of each image
    scores = torch.full((N, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live beam per image at the start
    done = torch.zeros(N * K, dtype=torch.bool, device=device)
    generated = torch.zeros(N * K, 0, dtype=torch.long, device=device)
    parents = None
    for t in range(max_length):
        logp = step(generated, parents)
        if logp.dim() != 2 or logp.shape[0] != N * K:
            raise ValueError(f"step must return (N*K, V) = ({N * K}, V) log-probabilities, got {tuple(logp.shape)}")
        V = logp.shape[1]
        logp = logp.float()
        # finished beams extend with the filler at no cost (a select: no host check whether any is)
        filler = torch.full((V,), float("-inf"), device=logp.device)
        filler[filler_index] = 0.0
        logp = torch.where(done[:, None], filler, logp)
        cand = (scores[:, :, None] + logp.view(N, K, V)).view(N, K * V)
        scores, flat = cand.topk(K, dim=1)  # sorted, per image
        parents = (torch.div(flat, V, rounding_mode="floor") + rows).flatten()
        token = (flat % V).flatten()
        generated = torch.cat([generated[parents], token[:, None]], dim=1)
        done = done[parents] | torch.isin(token, ends)
        # stopping early needs the host to read ``done`` (a GPU synchronisation): look every
        # EARLY_STOP_EVERY steps only; steps after every beam ended change nothing (filler, cost 0)
        if (t + 1) % EARLY_STOP_EVERY == 0 and bool(done.all()):
            break
    lengths = _sequence_lengths(generated, ends).view(N, K)
    final = normalized_scores(scores, lengths, lp)  # (N, K)
    best = final.argmax(1)  # the first of equals: the higher plain sum
    pick = rows[:, 0] + best
    return BeamSearchOutput(indices=generated[pick], lengths=lengths.flatten()[pick],
                            scores=final.gather(1, best[:, None])[:, 0])
