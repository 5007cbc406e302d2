"""Checkpoints a user can share: the inference checkpoint folder (weights as safetensors, config,
class names and vocabularies, format version, model card) and ``UP2Checkpointer``, the
checkpointer of every up2 loading path (no pickle without consent, ``weights_only`` torch loads)."""
from up2.checkpoint.checkpointer import PickleRefusedError, UP2Checkpointer
from up2.checkpoint.inference_checkpoint import (
    FINAL_FOLDER, FORMAT_VERSION, config_for_weights, inference_config, is_inference_checkpoint,
    load_inference_state, read_format, save_inference_checkpoint)

__all__ = [
    "UP2Checkpointer", "PickleRefusedError", "FINAL_FOLDER", "FORMAT_VERSION", "config_for_weights",
    "inference_config", "is_inference_checkpoint", "load_inference_state", "read_format",
    "save_inference_checkpoint",
]
