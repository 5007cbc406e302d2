"""The vocabulary as a target set (captioning, masked LM; paper §4.3, App. B).

Shape shorthand: V vocabulary entries, B sequences, T tokens, d width.

Each vocabulary token v is a target y = [SPE] ++ f_text(v) through g, read at [SPE] (paper §4.2:
the text encoder encodes the vocabulary; ``up2.modeling.target_set.encode_vocabulary``). A task may use
the whole tokenizer vocabulary or only the tokens of its training texts (small runs); the latter
is resolved once when training is set up (``TaskSpec.vocabulary_ids``) and travels with the
config and the checkpoint, so inference never reads the training texts.
"""
from __future__ import annotations

from typing import AbstractSet, Any, Iterable, List, Optional, Sequence, Tuple

import torch

from up2.modeling.target_set import TargetEmbeddings
from up2.modeling.text_encoder import special_token_ids
from up2.modeling.token_attributes import Modality

__all__ = ["VocabularyTargets", "vocabulary_ids_of_texts"]

IGNORE = -100


def vocabulary_ids_of_texts(tokenizer: Any, texts: Iterable[str], chunk: int = 512) -> Tuple[int, ...]:
    """Ascending ids of every token that occurs in ``texts`` (no truncation) plus the special
    tokens the tasks use (cls/bos, sep/eos, pad, mask).

    Args:
        tokenizer: a Hugging Face tokenizer (the text encoder's).
        texts: the training texts.
    """
    texts = list(texts)
    ids = set()
    for start in range(0, len(texts), chunk):
        for seq in tokenizer(texts[start : start + chunk], add_special_tokens=True)["input_ids"]:
            ids.update(seq)
    sp = special_token_ids(tokenizer)
    ids.update(i for i in (sp.cls, sp.sep, sp.pad, sp.mask) if i is not None)
    return tuple(sorted(int(i) for i in ids))


class VocabularyTargets:
    """Which token ids form the target set, and their embeddings.

    Args:
        token_ids: (V,) int64 ids of the subset in ascending order, or None = the full vocabulary
            (set by :meth:`resolve` from the tokenizer).
    """

    def __init__(self, token_ids: Optional[torch.Tensor] = None):
        self.token_ids = token_ids
        self._host_ids = None if token_ids is None else token_ids.detach().cpu()
        self._positions = {}
        self._lookup: Optional[torch.Tensor] = None
        # exact identity of the set for the evaluation cache: the ids themselves (read once, on CPU)
        self._key = None if token_ids is None else ("ids", token_ids.detach().cpu().to(torch.int64).numpy().tobytes())

    @classmethod
    def for_task(cls, spec, text_encoder=None) -> "VocabularyTargets":
        """The target set a task's config asks for: ``spec.vocabulary`` "full", or "dataset" (the
        resolved ``spec.vocabulary_ids``).

        Raises:
            ValueError: "dataset" without resolved ids, or ids beyond the tokenizer's vocabulary.
        """
        if spec.vocabulary != "dataset":
            return cls()
        if not spec.vocabulary_ids:
            raise ValueError(f"task {spec.name}: VOCABULARY 'dataset' but no VOCABULARY_IDS; they are resolved from "
                             "the training texts by up2.modeling.tasks.resolve_task_data(cfg) when training is set up")
        if text_encoder is not None and max(spec.vocabulary_ids) >= text_encoder.vocab_size:
            raise ValueError(f"task {spec.name}: VOCABULARY_IDS has id {max(spec.vocabulary_ids)}, beyond the text "
                             f"encoder's vocabulary of {text_encoder.vocab_size} tokens (another tokenizer?)")
        return cls(torch.tensor(spec.vocabulary_ids, dtype=torch.long))

    def resolve(self, text_encoder) -> torch.Tensor:
        """(V,) ids of the target set on the text encoder's device."""
        device = text_encoder.proj.weight.device
        if self.token_ids is None:
            self.token_ids = torch.arange(text_encoder.vocab_size)
        if self.token_ids.device != device:
            self.token_ids = self.token_ids.to(device)
        return self.token_ids

    def host_ids(self, text_encoder) -> torch.Tensor:
        """(V,) ids of the target set on the CPU (for host-side work such as drawing random
        replacement tokens, which must not read device memory)."""
        if self._host_ids is None:
            self._host_ids = torch.arange(text_encoder.vocab_size)
        return self._host_ids

    def positions_of(self, tokens: Sequence[int], text_encoder) -> List[int]:
        """Positions of the token ids ``tokens`` in the target set (-100 for an id outside it),
        computed on the host once per set of ids and kept."""
        key = tuple(int(t) for t in tokens)
        if key not in self._positions:
            where = {int(t): i for i, t in enumerate(self.host_ids(text_encoder).tolist())}
            self._positions[key] = [where.get(t, IGNORE) for t in key]
        return self._positions[key]

    def index_of(self, token_ids: torch.Tensor, text_encoder) -> torch.Tensor:
        """Map token ids (any shape) to positions in the target set; ids outside it -> -100."""
        ids = self.resolve(text_encoder)
        if self._lookup is None or self._lookup.device != ids.device:
            lookup = torch.full((text_encoder.vocab_size,), IGNORE, dtype=torch.long, device=ids.device)
            lookup[ids] = torch.arange(len(ids), device=ids.device)
            self._lookup = lookup
        valid = token_ids >= 0  # a gather and a select: no boolean indexing, no host synchronisation
        return torch.where(valid, self._lookup[token_ids.clamp(min=0)], torch.full_like(token_ids, IGNORE))

    def embed(self, model, inputs: AbstractSet[Modality]) -> TargetEmbeddings:
        """(V, d) target embeddings (``UniPerceiverV2.embed_tokens_as_targets``)."""
        ids = self.resolve(model.text_encoder)
        return model.embed_tokens_as_targets(ids, inputs, self._key or ("full", len(ids)))
