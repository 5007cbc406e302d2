"""The vocabulary as a target set (captioning, masked LM; paper §4.3, App. B).

Shape shorthand: V vocabulary entries, B sequences, T tokens, d width.

Each vocabulary token v is a target y = [SPE] ++ f_tok(v) through g, read at [SPE], where f_tok
is the text encoder's context-free embedding layer (``TextEncoder.embed_tokens``). A task may use
the whole tokenizer vocabulary or only the tokens of its training texts (small runs).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from detectron2.data import DatasetCatalog

from up2.modeling.token_attributes import Modality, Role, TaskFamily, TokenAttention, constant_attributes
from up2.modeling.unified_decoder import SPE_POSITION
from up2.structures import TokenBatch

__all__ = ["VocabularyTargets", "dataset_texts"]

IGNORE = -100


def dataset_texts(dataset_names: Iterable[str]) -> list:
    """All texts of detectron2 datasets: each record's "captions" (list) or "text" (str).

    Raises:
        ValueError: a dataset without any text.
    """
    texts = []
    for name in dataset_names:
        found = 0
        for r in DatasetCatalog.get(name):
            if "captions" in r:
                texts.extend(r["captions"])
                found += len(r["captions"])
            elif "text" in r:
                texts.append(r["text"])
                found += 1
        if not found:
            raise ValueError(f"dataset {name!r} has no 'captions' or 'text' to build a vocabulary from")
    return texts


class VocabularyTargets:
    """Which token ids form the target set, and their embeddings.

    Args:
        token_ids: (V,) int64 ids of the subset in ascending order, or None = the full vocabulary
            (set by :meth:`resolve` from the tokenizer).
    """

    def __init__(self, token_ids: Optional[torch.Tensor] = None):
        self.token_ids = token_ids
        self._lookup: Optional[torch.Tensor] = None

    @classmethod
    def for_task(cls, spec, text_encoder) -> "VocabularyTargets":
        """The target set a task's config asks for: ``spec.vocabulary`` "full" or "dataset"
        (the tokens of ``spec.datasets_train``)."""
        if spec.vocabulary == "dataset":
            return cls.from_texts(text_encoder, dataset_texts(spec.datasets_train))
        return cls()

    @classmethod
    def from_texts(cls, tokenizer_encoder, texts: Iterable[str]) -> "VocabularyTargets":
        """The tokens that occur in ``texts`` plus every special token (cls, sep, pad, mask)."""
        texts = list(texts)
        ids = set()
        for start in range(0, len(texts), 512):
            enc = tokenizer_encoder.tokenize(texts[start : start + 512])
            ids.update(enc["input_ids"][enc["attention_mask"].bool()].tolist())
        sp = tokenizer_encoder.special_ids
        ids.update(i for i in (sp.cls, sp.sep, sp.pad, sp.mask) if i is not None)
        return cls(torch.tensor(sorted(ids), dtype=torch.long))

    def resolve(self, text_encoder) -> torch.Tensor:
        """(V,) ids of the target set on the text encoder's device."""
        device = text_encoder.proj.weight.device
        if self.token_ids is None:
            self.token_ids = torch.arange(text_encoder.vocab_size)
        if self.token_ids.device != device:
            self.token_ids = self.token_ids.to(device)
        return self.token_ids

    def index_of(self, token_ids: torch.Tensor, text_encoder) -> torch.Tensor:
        """Map token ids (any shape) to positions in the target set; ids outside it -> -100."""
        ids = self.resolve(text_encoder)
        if self._lookup is None or self._lookup.device != ids.device:
            lookup = torch.full((text_encoder.vocab_size,), IGNORE, dtype=torch.long, device=ids.device)
            lookup[ids] = torch.arange(len(ids), device=ids.device)
            self._lookup = lookup
        out = torch.full_like(token_ids, IGNORE)
        valid = token_ids >= 0
        out[valid] = self._lookup[token_ids[valid]]
        return out

    def embed(self, model, family: TaskFamily, chunk: int = 4096) -> torch.Tensor:
        """(V, d) target embeddings; cached by the model at evaluation."""
        ids = self.resolve(model.text_encoder)

        def compute():
            outs = []
            for start in range(0, len(ids), chunk):
                part = ids[start : start + chunk, None]  # (v, 1)
                feats = model.text_encoder.embed_tokens(part)
                pad = torch.zeros(part.shape, dtype=torch.bool, device=part.device)
                attributes = constant_attributes(*part.shape, modality=Modality.TEXT, role=Role.TARGET,
                                                 attention=TokenAttention.BIDIRECTIONAL, task=family,
                                                 device=feats.device, dtype=feats.dtype)
                batch = TokenBatch(tokens=feats, padding_mask=pad, attributes=attributes)
                outs.append(model.unified_decoder(batch, outputs=SPE_POSITION)[:, 0])
            return torch.cat(outs)

        if model.training:
            return compute()
        key = ("vocabulary", family.value, len(ids), int(ids.sum()), int(ids[-1]))
        return model.target_cache.get(key, model.text_parameters(), compute)
