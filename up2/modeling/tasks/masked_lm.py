"""Masked language modelling in the unified formulation (paper §4.3, §5.1 "language modeling").

Shape shorthand: B texts, T tokens, V vocabulary targets, d width.

15% of the (non-special) tokens are chosen; BERT's rule replaces 80% of them by the mask
token, 10% by a random token of the target vocabulary and keeps 10%. The masked text goes
through f_text and g (bidirectional); each chosen position is compared with the vocabulary
targets (Eq. 5-7). Evaluation masks with a fixed seed so the metric is reproducible.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from up2.data.mappers import TextDatasetMapper
from up2.evaluation import MaskedLMEvaluator
from up2.modeling.target_set import TargetEmbeddings
from up2.modeling.tasks.base import register_task
from up2.modeling.tasks.captioning import TEXT_SEGMENT
from up2.modeling.tasks.task import Task, TaskFamily, TaskInputs
from up2.modeling.tasks.vocabulary import IGNORE, VocabularyTargets
from up2.modeling.token_attributes import Modality, Role, TokenAttention, constant_attributes, input_modalities
from up2.structures import TokenBatch
from up2.utils.host_sync import cpu_only, to_device

__all__ = ["MaskedLMTask", "mask_tokens"]


def mask_tokens(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_id: int,
    random_pool: torch.Tensor,
    prob: float = 0.15,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (80% mask token / 10% random / 10% unchanged).

    Args:
        ids: (B, T) int64 token ids. maskable: (B, T) bool, positions that may be chosen (not
            special, not padding). mask_id: the tokenizer's mask token. random_pool: (P,) ids to
            draw random replacements from. prob: share of maskable tokens chosen; every text
            with a maskable token gets at least one.

    Returns:
        (masked ids (B, T), labels (B, T) with the original id at chosen positions, -100 elsewhere).
    """
    u = torch.rand(ids.shape, generator=generator, device="cpu").to(ids.device)
    u = u.masked_fill(~maskable, 2.0)
    chosen = (u < prob) & maskable
    # at least one chosen token per text that has any maskable token
    first = u.argmin(dim=1)
    has = maskable.any(dim=1)
    chosen[has, first[has]] = True
    labels = ids.masked_fill(~chosen, IGNORE)
    r = torch.rand(ids.shape, generator=generator, device="cpu").to(ids.device)
    masked = ids.clone()
    masked[chosen & (r < 0.8)] = mask_id
    swap = chosen & (r >= 0.8) & (r < 0.9)
    pick = torch.randint(len(random_pool), ids.shape, generator=generator, device="cpu").to(ids.device)
    masked[swap] = random_pool.to(ids.device)[pick[swap]]
    return masked, labels


@register_task("masked_lm")
class MaskedLMTask(Task):
    """Inputs: text mapper dicts {"text": str}. Training loss {"loss_mlm"}; eval output per text:
    {"mlm_predictions": (T,) int64 predicted token ids at masked positions (-100 elsewhere),
    "mlm_labels": (T,) int64}."""

    family = TaskFamily.MLM
    input_modalities = input_modalities(Modality.TEXT)
    reads = (TEXT_SEGMENT,)
    has_vocabulary = True
    mask_prob = 0.15

    def __init__(self, spec, **kwargs):
        super().__init__(spec, **kwargs)
        self._vocab: Optional[VocabularyTargets] = None

    def vocabulary(self, text_encoder) -> VocabularyTargets:
        if self._vocab is None:
            self._vocab = VocabularyTargets.for_task(self.spec, text_encoder)
        return self._vocab

    def encode_inputs(self, model, batched_inputs: Sequence[dict]) -> TaskInputs:
        """The masked texts through f_text; labels (B, T) the original ids at the chosen
        positions. Evaluation masks with a fixed seed.

        Raises: KeyError for an input without "text"; ValueError when the tokenizer has no mask token."""
        te = model.text_encoder
        sp = te.special_ids
        if sp.mask is None:
            raise ValueError("masked LM needs a tokenizer with a mask token")
        texts = []
        for i, d in enumerate(batched_inputs):
            if "text" not in d:
                raise KeyError(f"masked-LM input {i} has no 'text'")
            texts.append(d["text"])
        tok = te.tokenize(texts)
        # masking runs on the host (the tokenizer's output, CPU random draws): the chosen
        # positions are then known there and the device needs no synchronisation to select them
        ids, keep = tok["input_ids"], tok["attention_mask"].bool()  # CPU tensors
        maskable = keep & (ids != sp.cls) & (ids != sp.sep) & (ids != sp.pad)
        pool = self.vocabulary(te).host_ids(te)
        generator = None if model.training else torch.Generator().manual_seed(0)
        with cpu_only():  # host tensors throughout: nothing here waits for a device
            masked, labels = mask_tokens(ids, maskable, sp.mask, pool, self.mask_prob, generator)
            label_index = to_device((labels != IGNORE).flatten().nonzero().squeeze(1), model.device)
        masked, labels, keep = (to_device(t, model.device) for t in (masked, labels, keep))
        feats, pad = te(masked, keep.long())
        attributes = constant_attributes(*pad.shape, modality=Modality.TEXT, role=Role.INPUT,
                                         attention=TokenAttention.BIDIRECTIONAL, inputs=self.input_modalities,
                                         device=feats.device, dtype=feats.dtype)
        batch = TokenBatch(tokens=feats, padding_mask=pad, attributes=attributes,
                           segments={TEXT_SEGMENT: slice(0, pad.shape[1])})
        return TaskInputs(batch=batch, labels=labels, label_index=label_index)

    def encode_targets(self, model, batched_inputs, inputs, **options) -> TargetEmbeddings:
        return self.vocabulary(model.text_encoder).embed(model, self.input_modalities)  # (V, d)

    def _chosen_logits(self, model, outputs, targets, inputs) -> torch.Tensor:
        """(M, V) logits of the chosen positions (``inputs.label_index``)."""
        text = outputs[TEXT_SEGMENT]
        chosen = text.reshape(-1, text.shape[-1]).index_select(0, inputs.label_index)
        return model.likelihood(chosen, targets.embeddings)

    def losses(self, model, outputs, targets, inputs, batched_inputs):
        logits = self._chosen_logits(model, outputs, targets, inputs)
        labels = inputs.labels.reshape(-1).index_select(0, inputs.label_index)
        target = self.vocabulary(model.text_encoder).index_of(labels, model.text_encoder)
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE) if len(target) else logits.sum() * 0.0
        return {"loss_mlm": self.spec.loss_weight * loss}

    def postprocess(self, model, outputs, targets, inputs, batched_inputs, **options):
        labels = inputs.labels
        logits = self._chosen_logits(model, outputs, targets, inputs)
        pred = torch.full_like(labels, IGNORE).reshape(-1)
        ids = self.vocabulary(model.text_encoder).resolve(model.text_encoder)
        pred = pred.index_copy(0, inputs.label_index, ids[logits.argmax(-1)]).view_as(labels)
        # the results leave the device in one copy; the padding is cut on the host
        host = torch.stack((pred, labels, inputs.batch.padding_mask.long())).cpu()
        return [{"mlm_predictions": p[k], "mlm_labels": lab[k]}
                for p, lab, k in zip(host[0], host[1], host[2] == 0)]

    def build_mapper(self, cfg, is_train: bool):
        return TextDatasetMapper(cfg, is_train=is_train)

    def build_evaluator(self, cfg, dataset_name: str, output_dir: Optional[str] = None):
        return MaskedLMEvaluator()
