"""Image captioning in the unified formulation (paper §4.3, App. B).

Shape shorthand: N images, K beams, Ti image tokens, T text tokens, V vocabulary targets, d width.

Input x = image tokens ++ caption tokens under a prefix-causal mask (text sees every image
token and the earlier text); each text position is compared with the vocabulary targets and
trained with next-token cross-entropy (Eq. 7). Caption tokens enter g through the text
encoder's context-free embedding layer, so no later token leaks into an earlier one.
Inference: batched beam search (beam 1 = greedy), stopping at the end token, final beams ranked by
sum log-prob / length ** length_penalty (``up2.modeling.beam_search``; Uni-Perceiver's COCO
protocol: beam 2, length penalty 2.0).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from up2.data.mappers import ImageTextDatasetMapper
from up2.evaluation import CaptioningEvaluator
from up2.modeling.beam_search import beam_search, check_beam_int
from up2.modeling.target_set import TargetEmbeddings
from up2.modeling.tasks.base import register_task
from up2.modeling.tasks.task import Task, TaskFamily, TaskInputs
from up2.modeling.tasks.vocabulary import IGNORE, VocabularyTargets
from up2.modeling.token_attributes import Modality, Role, TokenAttention, constant_attributes, input_modalities
from up2.structures import TokenBatch

__all__ = ["CaptioningTask", "TEXT_SEGMENT"]

TEXT_SEGMENT = "text"  # the caption tokens of the token batch


@register_task("captioning")
class CaptioningTask(Task):
    """Inputs: image-text mapper dicts ("image"; "caption" (str) in training). Options
    (inference): ``beam_size`` / ``max_length`` / ``length_penalty``, None = the config's
    BEAM_SIZE / MAX_CAPTION_LENGTH / LENGTH_PENALTY (defaults in ``TaskSpec``: Uni-Perceiver's
    COCO protocol, beam 2 and length penalty 2.0). Training loss {"loss_caption"}; eval output
    per image: {"caption": str, "caption_ids": (t,) int64 token ids without specials}."""

    family = TaskFamily.CAPTIONING
    input_modalities = input_modalities(Modality.IMAGE, Modality.TEXT)
    reads = (TEXT_SEGMENT,)
    options = ("beam_size", "max_length", "length_penalty")
    has_vocabulary = True

    def __init__(self, spec, **kwargs):
        super().__init__(spec, **kwargs)
        self._vocab: Optional[VocabularyTargets] = None

    def vocabulary(self, text_encoder) -> VocabularyTargets:
        if self._vocab is None:
            self._vocab = VocabularyTargets.for_task(self.spec, text_encoder)
        return self._vocab

    def _sequence(self, image_batch: TokenBatch, text_feats: torch.Tensor, text_pad: torch.Tensor) -> TokenBatch:
        """image tokens (B, Ti, d) ++ text (B, T, d) with the prefix-causal mask and attributes."""
        B, Ti = image_batch.padding_mask.shape
        T = text_pad.shape[1]
        text_attr = constant_attributes(B, T, modality=Modality.TEXT, role=Role.INPUT, attention=TokenAttention.CAUSAL,
                                        inputs=self.input_modalities, device=text_feats.device, dtype=text_feats.dtype)
        return TokenBatch(
            tokens=torch.cat([image_batch.tokens, text_feats.to(image_batch.tokens.dtype)], dim=1),
            padding_mask=torch.cat([image_batch.padding_mask, text_pad], dim=1),
            attributes=torch.cat([image_batch.attributes, text_attr.to(image_batch.attributes.dtype)], dim=1),
            attention=TokenAttention.CAUSAL,
            prefix_length=torch.full((B,), Ti, dtype=torch.long, device=text_pad.device),
            segments={**image_batch.segments, TEXT_SEGMENT: slice(Ti, Ti + T)},
        )

    def encode_inputs(self, model, batched_inputs: Sequence[dict]) -> TaskInputs:
        """Training: image tokens ++ the caption's tokens but the last (teacher forcing), labels
        (B, T-1) the next tokens; inference: the image tokens (``predict`` decodes).

        Raises: KeyError for a training input without "caption"; ValueError for an empty caption."""
        enc = model.encode_image(batched_inputs, self.input_modalities)
        if not model.training:
            return TaskInputs(batch=enc.tokens.batch, image=enc)
        captions = []
        for i, d in enumerate(batched_inputs):
            if "caption" not in d:
                raise KeyError(f"captioning input {i} ({d.get('file_name', '?')}) has no 'caption'")
            if not d["caption"].strip():
                raise ValueError(f"captioning input {i} (image_id {d.get('image_id')}) has an empty caption")
            captions.append(d["caption"])
        tok = model.text_encoder.tokenize(captions)
        ids = tok["input_ids"].to(model.device)
        keep = tok["attention_mask"].to(model.device).bool()
        inputs, labels = ids[:, :-1], ids[:, 1:].masked_fill(~keep[:, 1:], IGNORE)
        seq = self._sequence(enc.tokens.batch, model.text_encoder.embed_tokens(inputs), ~keep[:, :-1])
        return TaskInputs(batch=seq, image=enc, labels=labels)

    def encode_targets(self, model, batched_inputs, inputs, **options) -> TargetEmbeddings:
        return self.vocabulary(model.text_encoder).embed(model, self.input_modalities)  # (V, d)

    def losses(self, model, outputs, targets, inputs, batched_inputs):
        logits = model.likelihood(outputs[TEXT_SEGMENT], targets.embeddings)  # (B, T-1, V)
        target = self.vocabulary(model.text_encoder).index_of(inputs.labels, model.text_encoder)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE)
        return {"loss_caption": self.spec.loss_weight * loss}

    def predict(self, model, inputs, targets, batched_inputs, beam_size: Optional[int] = None,
                max_length: Optional[int] = None, length_penalty: Optional[float] = None) -> List[dict]:
        """Raises: ValueError for a beam_size / max_length that is not an int >= 1 (bool and float
        too) or a length_penalty that is not a finite float >= 0; None = the config's value, 0 or a
        negative value is an error, not the default."""
        spec = self.spec
        return self.generate(model, inputs.batch, self.vocabulary(model.text_encoder), targets.embeddings,
                             spec.beam_size if beam_size is None else beam_size,
                             spec.max_caption_length if max_length is None else max_length,
                             spec.length_penalty if length_penalty is None else length_penalty)

    def build_mapper(self, cfg, is_train: bool):
        return ImageTextDatasetMapper(cfg, is_train=is_train)

    def build_evaluator(self, cfg, dataset_name: str, output_dir: Optional[str] = None):
        return CaptioningEvaluator.from_dataset(dataset_name, output_dir=output_dir)

    @torch.no_grad()
    def generate(self, model, image_batch: TokenBatch, vocab: VocabularyTargets, targets: torch.Tensor,
                 beam_size: int, max_length: int, length_penalty: float = 0.0) -> List[dict]:
        """Batched beam search over the vocabulary targets (``up2.modeling.beam_search``): partial
        captions ranked by their sum of log-probabilities, the K final ones by
        ``sum log p / |y| ** length_penalty`` (|y| counts the end token), so beam 1 is exactly
        greedy decoding. Decoding stops at the end (or padding) token.

        Returns:
            per image {"caption": str, "caption_ids": (t,) int64 without special tokens}.

        Raises:
            ValueError: beam_size / max_length not an int >= 1, length_penalty not a float >= 0.
        """
        te = model.text_encoder
        sp = te.special_ids
        ids_v = vocab.resolve(te)
        N = image_batch.padding_mask.shape[0]
        K = check_beam_int("beam_size", beam_size)
        rep = lambda t: t.repeat_interleave(K, dim=0)  # noqa: E731
        img = TokenBatch(tokens=rep(image_batch.tokens), padding_mask=rep(image_batch.padding_mask),
                         attributes=rep(image_batch.attributes))
        # Key/value cache: the image prefix runs through g once; each step runs only the newest
        # token (it attends to the prefix and the earlier text, as in the prefix-causal sequence).
        g = model.unified_decoder
        dtype = image_batch.tokens.dtype
        text_attr = constant_attributes(N * K, 1, modality=Modality.TEXT, role=Role.INPUT,
                                        attention=TokenAttention.CAUSAL, inputs=self.input_modalities, device=model.device,
                                        dtype=dtype).to(image_batch.attributes.dtype)
        ends = [i for i in vocab.positions_of((sp.sep, sp.pad), te) if i >= 0]
        if not ends:
            raise ValueError(f"task {self.spec.name}: the vocabulary targets hold neither the end token "
                             f"({sp.sep}) nor padding ({sp.pad}); a caption could never end")
        start = torch.full((N * K, 1), sp.cls, dtype=torch.long, device=model.device)
        cache = None

        def step(generated: torch.Tensor, parents: Optional[torch.Tensor]) -> torch.Tensor:
            """(N*K, t) generated target indices -> (N*K, V) log-probabilities of the next target."""
            nonlocal cache
            if parents is None:
                cache = g.prefill(img)
            elif K > 1:  # with one beam the parents are 0 .. N-1: the cache stays as it is
                cache = cache.reorder(parents)
            seqs = torch.cat([start, ids_v[generated]], dim=1)
            # the newest token's context-free embedding (its position counts the tokens before it)
            newest = te.embed_tokens(seqs)[:, -1:].to(dtype)
            out, cache = g.extend(cache, newest, text_attr)
            return model.likelihood(out[:, 0], targets).log_softmax(-1)  # (N*K, V)

        found = beam_search(step, N, beam_size, max_length, end_indices=ends, filler_index=ends[-1],
                            length_penalty=length_penalty, device=model.device)
        specials = {sp.cls, sp.sep, sp.pad}
        results = []
        for row in ids_v[found.indices].tolist():
            words = []
            for t in row:
                if t in (sp.sep, sp.pad):
                    break
                if t not in specials:
                    words.append(t)
            results.append({"caption": te.tokenizer.decode(words, skip_special_tokens=True).strip(),
                            "caption_ids": torch.tensor(words, dtype=torch.long)})
        return results
