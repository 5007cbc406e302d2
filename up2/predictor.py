"""GeneralistPredictor: every task of one trained UP2 checkpoint on user images and texts.

Shape shorthand: C class names, I images, J texts, d width.

    from up2.predictor import GeneralistPredictor
    p = GeneralistPredictor.from_config_file("configs/tiny/joint_shapes.yaml", "output/model_final.pth")
    p.detect("photo.jpg", class_names=["cat", "dog"])      # Instances in image pixels
    p.classify("photo.jpg", ["circle", "square"])          # {"scores": (C,), "label": str}
    p.caption("photo.jpg", beam_size=3)                    # str
    p.retrieve(["a.jpg", "b.jpg"], ["a red circle", "two stars"])  # (I, J) similarity

Images are file paths (any mode, EXIF honoured; errors name the file) or arrays (H, W, 3) BGR
uint8 as detectron2's DefaultPredictor takes, (H, W) grayscale or (H, W, 4). Class names given
at call time replace the training classes (open vocabulary).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from up2.config import add_up2_config
from up2.data.image_io import read_image, to_rgb_array
from up2.modeling.tasks.retrieval import RetrievalTask

__all__ = ["GeneralistPredictor"]

ImageLike = Union[str, np.ndarray]


class GeneralistPredictor:
    """Wraps a UniPerceiverV2 in eval mode; each method runs one task (by task type)."""

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg).eval()
        if cfg.MODEL.WEIGHTS:
            DetectionCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT

    @classmethod
    def from_config_file(cls, config_file: str, weights: str = "", opts: Sequence = ()) -> "GeneralistPredictor":
        cfg = get_cfg()
        add_up2_config(cfg)
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
        cfg.MODEL.WEIGHTS = weights
        cfg.freeze()
        return cls(cfg)

    # ------------------------------------------------------------------ helpers
    def _task(self, *types: str) -> str:
        for name, task in self.model.tasks.items():
            if task.spec.type in types:
                return name
        raise KeyError(f"this model's config has no task of type {types}; configured: "
                       f"{ {n: t.spec.type for n, t in self.model.tasks.items()} }")

    def _input(self, image: ImageLike) -> dict:
        if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
            rgb = read_image(image, format="RGB")
        elif isinstance(image, np.ndarray):
            rgb = to_rgb_array(image, format="RGB", input_format="BGR")
        else:
            raise TypeError(f"image must be a path or a numpy array, got {type(image).__name__}")
        h, w = rgb.shape[:2]
        arr = rgb if self.input_format == "RGB" else rgb[:, :, ::-1]
        arr = self.resize.get_transform(arr).apply_image(arr)
        return {"image": torch.as_tensor(np.ascontiguousarray(arr.transpose(2, 0, 1))), "height": h, "width": w}

    # ------------------------------------------------------------------ tasks
    @torch.no_grad()
    def detect(self, image: ImageLike, class_names: Optional[Sequence[str]] = None):
        """Detections (detectron2 ``Instances`` in input-image pixels: pred_boxes, scores, pred_classes,
        and pred_masks when the task is instance segmentation). ``class_names`` (optional) replaces
        the training classes. Raises ValueError for an empty ``class_names``."""
        name = self._task("detection", "instance_segmentation")
        return self.model([self._input(image)], task=name, class_names=class_names)[0]["instances"]

    @torch.no_grad()
    def segment(self, image: ImageLike, class_names: Optional[Sequence[str]] = None):
        """As :meth:`detect`, from an instance-segmentation task (masks included)."""
        name = self._task("instance_segmentation")
        return self.model([self._input(image)], task=name, class_names=class_names)[0]["instances"]

    @torch.no_grad()
    def classify(self, image: ImageLike, class_names: Sequence[str]) -> dict:
        """{"scores": (C,) float32 probabilities over ``class_names``, "label": best name}.

        Raises:
            ValueError: empty ``class_names``.
        """
        if class_names is None or len(class_names) == 0:
            raise ValueError("classify needs a non-empty list of class_names")
        name = self._task("classification")
        out = self.model([self._input(image)], task=name, class_names=list(class_names))[0]
        return {"scores": out["pred_class_scores"], "label": class_names[out["pred_class"]]}

    @torch.no_grad()
    def caption(self, image: ImageLike, beam_size: Optional[int] = None, max_length: Optional[int] = None) -> str:
        """A caption by beam search (beam 1 = greedy)."""
        name = self._task("captioning")
        return self.model([self._input(image)], task=name, beam_size=beam_size, max_length=max_length)[0]["caption"]

    @torch.no_grad()
    def retrieve(self, images: Sequence[ImageLike], texts: Sequence[str]) -> torch.Tensor:
        """(I, J) float32 cosine similarity between images and texts (paper Eq. 6 without tau).

        Raises:
            ValueError: no images or no texts, or an empty text.
        """
        if len(images) == 0 or len(texts) == 0:
            raise ValueError("retrieve needs at least one image and one text")
        if any(not t.strip() for t in texts):
            raise ValueError("retrieve: texts must not be empty strings")
        name = self._task("retrieval")
        task: RetrievalTask = self.model.tasks[name]
        enc = self.model.encode_image([self._input(im) for im in images], task.family)
        img = self.model.unified_decoder(enc.tokens.batch)[:, 0]
        txt = task.encode_texts(self.model, list(texts))
        return F.normalize(img.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).t()
