"""Image-text retrieval in the unified formulation (paper §4.3, §4.4 "Gather Feature").

Shape shorthand: N images (= captions) in the local batch, G = N x world size, d width.

The image token sequence and the caption (through f_text) are encoded by g SEPARATELY and read
at [SPE]; the loss is the symmetric InfoNCE of Eq. 7 over the batch: every image against all
captions and every caption against all images. With ``gather`` (default) the features of all
ranks are gathered WITH gradient, so the negatives are the global batch.
"""
from __future__ import annotations

import zlib
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from up2.data.mappers import ImageTextDatasetMapper
from up2.evaluation import RetrievalEvaluator
from up2.evaluation.retrieval import normalize_caption
from up2.modeling.target_set import TargetEmbeddings
from up2.modeling.tasks.base import register_task
from up2.modeling.tasks.task import Task, TaskFamily, TaskInputs
from up2.modeling.token_attributes import Modality, input_modalities
from up2.modeling.decoder_outputs import SPE
from up2.utils.distributed import gather_with_grad
from up2.utils.host_sync import to_device

__all__ = ["RetrievalTask", "gather_with_grad", "infonce", "retrieval_loss", "caption_keys"]


def infonce(logits: torch.Tensor, offset: int = 0, same_text: Optional[torch.Tensor] = None) -> torch.Tensor:
    """InfoNCE of one direction: cross-entropy of each local query against the gathered keys.

    Args:
        logits: (N, G) float32, local queries (rows) vs all keys; row i's positive is column
            ``offset + i`` (the rank's slice of the gathered batch).
        same_text: optional (N, G) bool, True where key j's caption is the same text as query
            i's pair; those keys other than the positive are left out of the softmax (they are
            no negatives: the same caption describes both images).

    Returns:
        0-dim float. RetrievalTask averages image->text and text->image.
    """
    target = torch.arange(logits.shape[0], device=logits.device) + offset
    if same_text is not None:
        not_negative = same_text.clone()
        not_negative[torch.arange(logits.shape[0], device=logits.device), target] = False
        logits = logits.masked_fill(not_negative, float("-inf"))
    return F.cross_entropy(logits, target)


def caption_keys(captions: Sequence[str], device=None) -> torch.Tensor:
    """(N,) int64 key per caption, equal for equal texts (compared case- and space-insensitively)."""
    keys = [zlib.crc32(normalize_caption(c).encode("utf-8")) for c in captions]
    return to_device(keys, device, torch.int64)


def retrieval_loss(img: torch.Tensor, txt: torch.Tensor, likelihood, gather: bool = True,
                   keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE (Eq. 7 for retrieval) with optional Gather Feature (paper §4.4).

    Args:
        img: (N, d) image features at [SPE]; txt: (N, d) features of their captions (row i pairs
            with row i). likelihood: the Likelihood module (cos / tau). gather: use the features
            of every rank as negatives (gathered with gradient).
        keys: optional (N,) int64 caption keys (:func:`caption_keys`). Pairs whose captions are
            the same text are not used as each other's negatives. Not in the paper: on COCO an
            exact repeat within a batch is rare, but a templated caption set (shapes: "two
            shapes on a gray background") repeats often, and such a pair would ask the model to
            tell apart two images by a text that fits both.

    Returns:
        0-dim float: mean of image->text and text->image cross-entropy over the local queries.

    Raises:
        ValueError: ``keys`` not of shape (N,).
    """
    distributed = gather and dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    all_img = gather_with_grad(img) if gather else img
    all_txt = gather_with_grad(txt) if gather else txt
    offset = rank * img.shape[0]
    same = None
    if keys is not None:
        if keys.shape != (img.shape[0],):
            raise ValueError(f"keys must have shape ({img.shape[0]},), one per pair, got {tuple(keys.shape)}")
        all_keys = gather_with_grad(keys) if gather else keys
        same = keys[:, None] == all_keys[None, :]  # (N, G)
    return 0.5 * (infonce(likelihood(img, all_txt), offset, same) + infonce(likelihood(txt, all_img), offset, same))


@register_task("retrieval")
class RetrievalTask(Task):
    """Inputs: image-text mapper dicts ("image"; "caption" (str) in training; "captions" (list of
    str) at evaluation). The captions are the targets: each through f_text and g, read at [SPE].
    Training loss {"loss_retrieval"}; eval output per image: {"image_embedding": (d,),
    "text_embeddings": (n_i, d)} for ``up2.evaluation.RetrievalEvaluator``."""

    family = TaskFamily.RETRIEVAL
    input_modalities = input_modalities(Modality.IMAGE)  # the captions are the targets
    reads = (SPE,)

    def encode_inputs(self, model, batched_inputs: Sequence[dict]) -> TaskInputs:
        enc = model.encode_image(batched_inputs, self.input_modalities)
        return TaskInputs(batch=enc.tokens.batch, image=enc)

    def encode_targets(self, model, batched_inputs, inputs) -> TargetEmbeddings:
        """Training: the caption of each image (N, d); eval: every caption of every image, in
        order (sum n_i, d).

        Raises: KeyError for an input without "caption" (training) / "captions" (eval);
        ValueError for an empty caption list."""
        return self.embed_texts(model, self._captions(model, batched_inputs))

    def embed_texts(self, model, texts: Sequence[str]) -> TargetEmbeddings:
        """Texts as retrieval targets: (J, d) features at [SPE], not normalised."""
        return model.embed_texts(texts, self.input_modalities, cache=False)

    def embed_images(self, model, batched_inputs: Sequence[dict]) -> torch.Tensor:
        """(N, d) image features at [SPE], not normalised (``GeneralistPredictor.retrieve``)."""
        return model.unified_decoder(self.encode_inputs(model, batched_inputs).batch, read=self.reads).spe

    def losses(self, model, outputs, targets, inputs, batched_inputs):
        keys = caption_keys(self._captions(model, batched_inputs), outputs.spe.device)
        loss = retrieval_loss(outputs.spe, targets.embeddings, model.likelihood, self.spec.gather_features, keys)
        return {"loss_retrieval": self.spec.loss_weight * loss}

    def postprocess(self, model, outputs, targets, inputs, batched_inputs, **options) -> List[dict]:
        counts = [len(d["captions"]) for d in batched_inputs]
        texts = targets.embeddings.split(counts)
        return [{"image_embedding": img, "text_embeddings": txt} for img, txt in zip(outputs.spe, texts)]

    def build_mapper(self, cfg, is_train: bool):
        return ImageTextDatasetMapper(cfg, is_train=is_train)

    def build_evaluator(self, cfg, dataset_name: str, output_dir: Optional[str] = None):
        return RetrievalEvaluator(match_identical_captions=self.spec.match_identical_captions)

    @staticmethod
    def _captions(model, batched_inputs: Sequence[dict]) -> List[str]:
        if model.training:
            return [_field(d, "caption", i) for i, d in enumerate(batched_inputs)]
        captions = []
        for i, d in enumerate(batched_inputs):
            caps = _field(d, "captions", i)
            if len(caps) == 0:
                raise ValueError(f"retrieval input {i} (image_id {d.get('image_id')}) has no captions")
            captions.extend(caps)
        return captions


def _field(d: dict, key: str, i: int):
    if key not in d:
        raise KeyError(f"retrieval input {i} ({d.get('file_name', '?')}) has no {key!r}")
    return d[key]
