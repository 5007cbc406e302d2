"""UniPerceiverV2: one model, one set of weights, every task (paper §4, Fig. 2).

Shape shorthand: N images, Hp x Wp padded input, Q proposals, R regional tokens, T image
tokens, C classes, d unified-decoder width.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import AbstractSet, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from up2.modeling.image_encoder import ImageEncoder, ImageTokens
from up2.modeling.likelihood import Likelihood
from up2.modeling.proposal.binary_proposal_network import BinaryProposalNetwork
from up2.modeling.target_set import TargetCache, TargetEmbeddings, encode_targets, encode_text_targets, encode_vocabulary
from up2.modeling.tasks.base import TASK_REGISTRY, TaskSpec, default_task_name, implicit_default_task
from up2.modeling.tasks.task_data import task_specs_for_model
from up2.modeling.text_encoder import TextEncoder
from up2.modeling.token_attributes import Modality, Role, TokenAttention, constant_attributes, input_modalities_key
from up2.modeling.unified_decoder import UnifiedDecoder
from up2.structures import ProposalOutput

__all__ = ["UniPerceiverV2", "ImageEncoding", "inference_amp_dtype"]

_AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def inference_amp_dtype(cfg) -> Optional[torch.dtype]:
    """The autocast dtype of eval-mode forwards from ``cfg.TEST.AMP`` (None = float32).

    Raises:
        ValueError: TEST.AMP.DTYPE is not "bfloat16" or "float16".
    """
    if not cfg.TEST.AMP.ENABLED:
        return None
    if cfg.TEST.AMP.DTYPE not in _AMP_DTYPES:
        raise ValueError(f"TEST.AMP.DTYPE must be one of {sorted(_AMP_DTYPES)}, got {cfg.TEST.AMP.DTYPE!r}")
    return _AMP_DTYPES[cfg.TEST.AMP.DTYPE]


def _float32_results(x):
    """Results of an autocast forward with every bf16/fp16 tensor cast to float32 (lists,
    tuples, dicts, Instances and Boxes are walked; other values are returned as they are)."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    if isinstance(x, Boxes):
        return Boxes(_float32_results(x.tensor))
    if isinstance(x, Instances):
        out = Instances(x.image_size)
        for k, v in x.get_fields().items():
            out.set(k, _float32_results(v))
        return out
    if isinstance(x, dict):
        return {k: _float32_results(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_float32_results(v) for v in x)
    return x


@dataclass
class ImageEncoding:
    """What :meth:`UniPerceiverV2.encode_image` gives a task.

    Attributes:
        images: the normalised, padded batch (N, 3, Hp, Wp).
        proposals: the proposal network's output (``matches`` set when trained with targets).
        proposal_losses: proposal losses ({} without targets).
        tokens: the image token sequence (N, M' + h*w + R, d) with routing attributes.
        targets: the ProposalTargets used (None without ``targets_fn``).
    """

    images: ImageList
    proposals: ProposalOutput
    proposal_losses: Dict[str, torch.Tensor]
    tokens: ImageTokens
    targets: Optional[list] = None


def _pad_to_batch(images: Sequence[torch.Tensor], size_divisibility: int) -> ImageList:
    """detectron2's ``ImageList.from_tensors`` (zero padding at the bottom/right to a multiple of
    ``size_divisibility``) with the batch size computed from Python ints, so it needs no host
    synchronisation (from_tensors reads its sizes back from tensors)."""
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    stride = max(size_divisibility, 1)
    hp = -(-max(h for h, _ in sizes) // stride) * stride
    wp = -(-max(w for _, w in sizes) // stride) * stride
    batch = images[0].new_zeros(len(images), images[0].shape[0], hp, wp)
    for out, im in zip(batch, images):
        out[:, : im.shape[-2], : im.shape[-1]].copy_(im)
    return ImageList(batch, sizes)


@META_ARCH_REGISTRY.register()
class UniPerceiverV2(nn.Module):
    """The generalist model: f_image, f_text, the shared decoder g and the likelihood.

    ``forward(batched_inputs)`` follows detectron2: in training it returns a dict of losses,
    in eval a list with one result dict per image. The task is a value: pass ``task=`` (a
    name of ``cfg.TASKS``); without it the default task runs (``cfg.MODEL.DEFAULT_TASK``, else
    the only task, else the only localization task), so detectron2's ``DefaultPredictor`` and
    evaluators work unchanged.

    ``forward`` runs the data flow of paper Fig. 2 with the task's steps
    (``up2.modeling.tasks.task.Task``): inputs -> token batch x, targets -> embeddings of Y,
    g(x) -> named segments, likelihood -> losses or results. Tasks use the model's parts
    through ``encode_image``, ``embed_texts``, ``embed_tokens_as_targets``, ``text_encoder``,
    ``unified_decoder`` and ``likelihood``.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        proposal_network: BinaryProposalNetwork,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        unified_decoder: UnifiedDecoder,
        likelihood: Likelihood,
        tasks: Mapping[str, TaskSpec],
        global_feature: str,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int = 32,
        test_topk: int = 100,
        inference_amp: Optional[torch.dtype] = None,
        channels_last: bool = True,
        default_task: Optional[str] = None,
        target_chunk_tokens: int = 2048,
        target_recompute: bool = True,
        target_shard: bool = False,
    ):
        """
        Args:
            inference_amp: autocast dtype of eval-mode forwards (cfg.TEST.AMP); None = float32.
                Results are returned in float32 either way.
            channels_last: cfg.MODEL.CHANNELS_LAST: ``up2.modeling.inference.prepare_for_inference``
                stores the conv weights of the backbone and the proposal network channels-last
                (NHWC), and then the padded image batch is made channels-last too, so every
                feature map stays NHWC; values are unchanged up to float rounding. The
                constructor leaves its modules as given.
            default_task: the task of ``forward`` without ``task=``; None = the only task, else
                the only localization task (none when ambiguous: ``forward`` then asks for one).
            target_chunk_tokens / target_recompute / target_shard: how fixed target sets (class names,
                vocabularies) are encoded in training (``up2.modeling.target_set.encode_text_targets``;
                cfg.MODEL.TARGET_SETS; sharding only with unmixed task sampling).

        Raises:
            ValueError: no task, or a ``default_task`` that is not one of ``tasks``.
        """
        super().__init__()
        if not tasks:
            raise ValueError("UniPerceiverV2 needs at least one task")
        self.backbone = backbone
        self.proposal_network = proposal_network
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.unified_decoder = unified_decoder
        self.likelihood = likelihood
        self.tasks = {name: TASK_REGISTRY.get(spec.type)(spec, test_topk=test_topk) for name, spec in tasks.items()}
        if default_task is not None and default_task not in self.tasks:
            raise ValueError(f"default_task={default_task!r} is not one of the tasks {sorted(self.tasks)}")
        self.default_task = default_task if default_task is not None else implicit_default_task(dict(tasks))
        self.global_feature = global_feature
        self.size_divisibility = max(size_divisibility, backbone.size_divisibility)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.target_cache: Optional[TargetCache] = None  # set by up2.modeling.inference.prepare_for_inference
        # rewrites of prepare_for_inference after which the model cannot train (up2.modeling.inference)
        self.inference_only_rewrites: Tuple[str, ...] = ()
        self.inference_amp = inference_amp
        self.channels_last = channels_last
        if target_chunk_tokens < 1:
            raise ValueError(f"MODEL.TARGET_SETS.CHUNK_TOKENS must be >= 1, got {target_chunk_tokens}")
        self.target_chunk_tokens = int(target_chunk_tokens)
        self.target_recompute = bool(target_recompute)
        self.target_shard = bool(target_shard)

    @classmethod
    def from_config(cls, cfg):
        tasks = task_specs_for_model(cfg)  # class names / vocabularies: config, else checkpoint (never datasets)
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        return {
            "backbone": backbone,
            "proposal_network": BinaryProposalNetwork(cfg, shapes),
            "image_encoder": ImageEncoder(cfg, shapes),
            "text_encoder": TextEncoder(cfg),
            "unified_decoder": UnifiedDecoder(cfg),
            "likelihood": Likelihood(cfg),
            "tasks": tasks,
            "default_task": default_task_name(cfg, tasks),
            "global_feature": cfg.MODEL.IMAGE_ENCODER.GLOBAL_FEATURE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "test_topk": cfg.MODEL.PROPOSAL.TEST_TOPK,
            "inference_amp": inference_amp_dtype(cfg),
            "channels_last": cfg.MODEL.CHANNELS_LAST,
            "target_chunk_tokens": cfg.MODEL.TARGET_SETS.CHUNK_TOKENS,
            "target_recompute": cfg.MODEL.TARGET_SETS.RECOMPUTE,
            # every rank must encode together: only when all ranks run the same task (paper §4.4)
            "target_shard": cfg.MODEL.TARGET_SETS.SHARD and cfg.DATALOADER.TASK_SAMPLING == "unmixed",
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ pieces
    def preprocess_image(self, batched_inputs: Sequence[dict]) -> Tuple[ImageList, torch.Tensor]:
        """Normalise and pad. Returns the ImageList (N, 3, Hp, Wp) float (channels-last strides
        when the backbone's first conv weight is channels-last: ``prepare_for_inference`` with
        ``self.channels_last``) and a padding mask (N, Hp, Wp) bool (True on padding).

        Raises:
            ValueError: an input whose "image" is not a (3, H, W) tensor.
        """
        images = []
        for i, x in enumerate(batched_inputs):
            img = x.get("image")
            if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 3:
                got = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
                raise ValueError(f"input {i}: 'image' must be a (3, H, W) tensor, got {got}")
            # non_blocking: asynchronous from pinned batches (DATALOADER.PIN_MEMORY); same result otherwise
            images.append((img.to(self.device, non_blocking=True).float() - self.pixel_mean) / self.pixel_std)
        images = _pad_to_batch(images, self.size_divisibility)
        if self._backbone_channels_last():
            images.tensor = images.tensor.contiguous(memory_format=torch.channels_last)
        pad = torch.ones(images.tensor.shape[0], *images.tensor.shape[-2:], dtype=torch.bool, device=self.device)
        for i, (h, w) in enumerate(images.image_sizes):
            pad[i, :h, :w] = False
        return images, pad

    def _backbone_channels_last(self) -> bool:
        """Whether the backbone's first 4-D weight is stored channels-last (and not also contiguous)."""
        w = next((p for p in self.backbone.parameters() if p.dim() == 4), None)
        return w is not None and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)

    def text_parameters(self):
        """Parameters that target embeddings depend on (for the cache stamp)."""
        return itertools.chain(self.text_encoder.parameters(), self.unified_decoder.parameters())

    def _targets(self, key: tuple, compute: Callable[[], TargetEmbeddings]) -> TargetEmbeddings:
        """``compute()``, or its cached embeddings in a model prepared for inference."""
        if self.target_cache is None or self.training:
            return compute()
        device = self.device.type
        precision = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        return TargetEmbeddings(self.target_cache.get(
            (str(precision), *key), self.text_parameters(), lambda: compute().embeddings))

    def embed_texts(self, texts: Sequence[str], inputs: AbstractSet[Modality], cache: bool = True) -> TargetEmbeddings:
        """Texts (class names, captions) as targets: g(f_text(y)) at [SPE] (paper Eq. 6).

        Args:
            texts: C strings. inputs: the modalities of the task's input x (MoE routing).
            cache: whether a model prepared for inference may keep them (class names: yes;
                the captions of one batch: no).

        Returns:
            TargetEmbeddings, embeddings (C, d).

        Raises:
            ValueError: an empty list of texts.
        """
        texts = list(texts)
        if not texts:
            raise ValueError("the target set is empty: give at least one class name / text")

        if not cache:  # the captions of one batch: activations like any other, kept per rank
            return encode_targets(self.unified_decoder, *self.text_encoder.encode(texts), inputs)

        def compute():
            batch = self.text_encoder.tokenize(texts)
            return encode_text_targets(self.text_encoder, self.unified_decoder,
                                       batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                                       inputs, **self._target_set_memory())

        return self._targets(("texts", input_modalities_key(inputs), *texts), compute)

    def _target_set_memory(self) -> dict:
        """chunk / recompute / shard of a fixed target set: the memory savers only apply when
        gradients are taken (training)."""
        grad = self.training and torch.is_grad_enabled()
        return {"chunk_tokens": self.target_chunk_tokens, "recompute": grad and self.target_recompute,
                "shard": grad and self.target_shard}

    def embed_tokens_as_targets(self, token_ids: torch.Tensor, inputs: AbstractSet[Modality], key: tuple) -> TargetEmbeddings:
        """Single vocabulary tokens as targets (captioning, masked LM): each token through f_text
        as a text of its own, then g, read at [SPE] (paper §4.2, Eq. 6). In training the
        vocabulary is encoded in chunks with recomputed activations and split across ranks
        (``up2.modeling.target_set.encode_vocabulary``; cfg.MODEL.TARGET_SETS).

        Args:
            token_ids: (V,) int64. inputs: the modalities of the task's input x. key: identifies the token set in
                the inference cache.

        Returns:
            TargetEmbeddings, embeddings (V, d).
        """
        def compute():
            return encode_vocabulary(self.text_encoder, self.unified_decoder, token_ids, inputs,
                                     **self._target_set_memory())

        return self._targets(("tokens", input_modalities_key(inputs), *key), compute)

    def encode_image(
        self,
        batched_inputs: Sequence[dict],
        inputs: AbstractSet[Modality],
        targets_fn: Optional[Callable[[ImageList], list]] = None,
    ) -> ImageEncoding:
        """f_image (paper §4.1): backbone, proposals and the image token sequence.

        Args:
            batched_inputs: mapper dicts with "image" (3, H, W) uint8.
            inputs: the modalities of the task's input x (the tokens' MoE routing attributes).
            targets_fn: in training, builds the proposal network's ProposalTargets from the
                padded ImageList (localization tasks); None = no proposal losses.

        Returns:
            ImageEncoding (see its docstring).
        """
        images, pad = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        targets = targets_fn(images) if (self.training and targets_fn is not None) else None
        # masks as embeddings: the image encoder computes the R regional proposals' mask logits
        proposals, losses = self.proposal_network(features, targets, padding_mask=pad)
        tokens = self.image_encoder(features[self.global_feature], images.image_sizes, proposals)
        batch = tokens.batch
        batch.attributes = constant_attributes(
            *batch.padding_mask.shape, modality=Modality.IMAGE, role=Role.INPUT,
            attention=TokenAttention.BIDIRECTIONAL, inputs=inputs, device=batch.tokens.device, dtype=batch.tokens.dtype,
        )
        return ImageEncoding(images=images, proposals=proposals, proposal_losses=losses, tokens=tokens, targets=targets)

    def inference_autocast(self):
        """Context of eval-mode computations: autocast to ``inference_amp`` (cfg.TEST.AMP), or
        a no-op in training and in float32."""
        if self.training or self.inference_amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.inference_amp)

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[dict], task: Optional[str] = None, **options):
        """Run one task on a batch (paper Fig. 2).

        Args:
            batched_inputs: detectron2 mapper dicts of that task (see each task's docstring).
            task: a name of cfg.TASKS; default: ``self.default_task``.
            options: inference options of the task, e.g. ``class_names=[...]`` (open
                vocabulary) for detection, ``beam_size=`` for captioning.

        Returns:
            training: dict of scalar losses (plus "loss_moe_balance" when MoE balancing is on).
            eval: list with one result dict per input (detectron2 format); float tensors in
            float32, also when ``inference_amp`` runs the forward under autocast.

        Raises:
            KeyError: an unknown task name.
            TypeError: an option the task does not take.
            RuntimeError: training a model prepared for inference (``up2.modeling.inference``).
            ValueError: an empty batch; no ``task`` given and no default task (several tasks, not
                exactly one of them a localization task, and no ``MODEL.DEFAULT_TASK``).
        """
        name = task or self.default_task
        if name is None:
            raise ValueError(f"which task? this model has {sorted(self.tasks)} and no default: pass task=<name> "
                             "or set cfg.MODEL.DEFAULT_TASK")
        if name not in self.tasks:
            raise KeyError(f"unknown task {name!r}; this model has {sorted(self.tasks)}")
        if len(batched_inputs) == 0:
            raise ValueError(f"task {name}: got an empty batch; give at least one input")
        if self.training and self.inference_only_rewrites:
            raise RuntimeError(f"this model was prepared for inference with {list(self.inference_only_rewrites)} "
                               "(computed in place, without a usable gradient); build a fresh model to train")
        t = self.tasks[name]
        t.check_options(options)
        with self.inference_autocast():
            x = t.encode_inputs(self, batched_inputs)  # images / texts -> token batch (f_image, f_text)
            y = t.encode_targets(self, batched_inputs, x, **options)  # target set -> g(f_text(Y)) at [SPE]
            if not self.training:
                return _float32_results(t.predict(self, x, y, batched_inputs, **options))
            out = self.unified_decoder(x.batch, read=t.reads)  # g(x), named segments
            losses = dict(x.losses)
            losses.update(t.losses(self, out, y, x, batched_inputs))  # likelihood, Eq. 7
        balance = [a for a in (out.aux_loss, y.aux_loss) if a is not None]
        if balance:
            losses["loss_moe_balance"] = torch.stack(balance).sum()
        return losses
