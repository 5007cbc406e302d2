"""Dataset mapper for text-only data: masked language modelling (paper §5.1).

Input: one corpus record (``up2.data.datasets.text_corpus``): ``text`` and optionally ``doc_id``.
Output dict:
    text:   str, the document unchanged (tokenisation, truncation and masking happen in the model:
            ``TextEncoder.tokenize`` truncates with the tokenizer, never by slicing ids).
    doc_id: copied from the record when present.
"""
from __future__ import annotations

from detectron2.config import configurable

__all__ = ["TextDatasetMapper"]


class TextDatasetMapper:
    """Corpus record -> ``{"text", "doc_id"?}`` (module docstring), after validation.

    Raises (from ``__call__``):
        TypeError: the record is not a dict.
        ValueError: ``text`` missing, not a str, or empty / whitespace only (the message names
            the ``doc_id``).
    """

    @configurable
    def __init__(self, is_train: bool = True):
        """
        Args:
            is_train: training or eval mode (the output is the same; kept for the mapper interface).
        """
        self.is_train = is_train

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        """Reads nothing from cfg."""
        return {"is_train": is_train}

    def __call__(self, dataset_dict: dict) -> dict:
        """Map one record; see the class docstring for errors."""
        if not isinstance(dataset_dict, dict):
            raise TypeError(f"dataset record must be a dict, got {type(dataset_dict).__name__}")
        text = dataset_dict.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"text record (doc_id {dataset_dict.get('doc_id')!r}): 'text' must be a non-empty str, got {text!r:.80}"
            )
        out = {"text": text}
        if "doc_id" in dataset_dict:
            out["doc_id"] = dataset_dict["doc_id"]
        return out
