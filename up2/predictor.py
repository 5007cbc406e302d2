"""GeneralistPredictor: every task of one trained UP2 checkpoint on user images and texts;
BatchPredictor: detectron2's DefaultPredictor for a list of images.

Shape shorthand: C class names, I images, J texts, d width, B images per batch.

    from up2.predictor import GeneralistPredictor
    p = GeneralistPredictor.from_pretrained("output/tiny_joint_shapes/model_final_inference")
    # or: GeneralistPredictor.from_config_file("configs/tiny/joint_shapes.yaml", "output/model_final.pth")
    p.detect("photo.jpg", class_names=["cat", "dog"])      # Instances in image pixels
    p.detect(["a.jpg", "b.jpg"], batch_size=8)             # [Instances, Instances], in input order
    p.classify("photo.jpg", ["circle", "square"])          # {"scores": (C,), "label": str}
    p.classify("photo.jpg")                                # over the trained classes, p.class_names()
    p.caption("photo.jpg", beam_size=3)                    # str
    p.retrieve(["a.jpg", "b.jpg"], ["a red circle", "two stars"])  # (I, J) similarity

Images are file paths (any mode, EXIF honoured; errors name the file), PIL images, or arrays
(H, W, 3) BGR uint8 as detectron2's DefaultPredictor takes, (H, W) grayscale or (H, W, 4).
Class names given at call time replace the training classes (open vocabulary).

Weights (``MODEL.WEIGHTS``) are read by :class:`up2.checkpoint.UP2Checkpointer`: an inference
checkpoint folder (``up2.checkpoint``), a training checkpoint ``.pth`` (``weights_only``) or a
``.safetensors`` file; ``.pkl`` only with ``MODEL.ALLOW_PICKLE_WEIGHTS True``.

Batching: a list of images runs in chunks of ``batch_size`` consecutive images; inside a chunk,
images whose padded size (resized size rounded up to the model's size divisibility) is the same
run as one batch. Each image is therefore padded exactly as it would be alone, so a batched
result equals the one-image result (up to float rounding of batched kernels); a chunk of images
of different padded sizes runs as several smaller batches.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from PIL import Image

from up2.checkpoint import UP2Checkpointer, config_for_weights, inference_config
from up2.config import add_up2_config
from up2.data.image_io import read_image, to_rgb_array
from up2.modeling.inference import prepare_for_inference
from up2.modeling.tasks.base import check_class_names, task_input_config
from up2.modeling.tasks.task import TaskFamily
from up2.utils.paths import expand_path

__all__ = ["GeneralistPredictor", "BatchPredictor", "group_by_padded_size"]

ImageLike = Union[str, os.PathLike, np.ndarray, Image.Image]
ImagesLike = Union[ImageLike, Sequence[ImageLike]]


def group_by_padded_size(sizes: Sequence[Tuple[int, int]], divisibility: int) -> List[List[int]]:
    """Indices of ``sizes`` grouped by padded size, groups in order of first appearance.

    Args:
        sizes: (h, w) of each image after resizing, pixels.
        divisibility: the model pads each side up to a multiple of this (<= 1: no rounding).

    Returns:
        list of index lists; indices ascend inside a group and every index appears once.
    """
    d = max(int(divisibility), 1)
    groups: Dict[Tuple[int, int], List[int]] = {}
    for i, (h, w) in enumerate(sizes):
        groups.setdefault((-(-int(h) // d) * d, -(-int(w) // d) * d), []).append(i)
    return list(groups.values())


def _test_resize(cfg) -> T.ResizeShortestEdge:
    """detectron2's test-time resize of ``cfg.INPUT`` (shorter side MIN_SIZE_TEST, longer <= MAX_SIZE_TEST)."""
    return T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)


def _size_divisibility(model) -> int:
    """The padding multiple of a detectron2 model (UniPerceiverV2, GeneralizedRCNN, ...)."""
    d = getattr(model, "size_divisibility", None)
    if d is None:
        d = getattr(getattr(model, "backbone", None), "size_divisibility", 0)
    return int(d or 0)


def _run_batched(inputs_fn: Callable[[int], dict], n: int, batch_size: int, divisibility: int,
                 call: Callable[[List[dict]], list]) -> list:
    """Results of ``call`` for inputs 0..n-1, in order (module docstring: how batches form).

    Args:
        inputs_fn: index -> model input dict with "image" (3, H, W) (built lazily, one chunk at a time).
        call: list of B input dicts -> list of B per-image results.

    Raises:
        ValueError: ``batch_size`` < 1.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list = [None] * n
    for start in range(0, n, batch_size):
        chunk = [inputs_fn(i) for i in range(start, min(start + batch_size, n))]
        for group in group_by_padded_size([tuple(x["image"].shape[-2:]) for x in chunk], divisibility):
            outs = call([chunk[i] for i in group])
            for i, out in zip(group, outs):
                results[start + i] = out
    return results


def _as_list(images: ImagesLike, what: str = "images") -> Tuple[list, bool]:
    """(list of images, True when a single image was given)."""
    if isinstance(images, (str, bytes, os.PathLike, np.ndarray, Image.Image)):
        return [images], True
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"{what}: got an empty list; give at least one image")
        return list(images), False
    raise TypeError(f"{what} must be an image (path, numpy array, PIL image) or a list of them, "
                    f"got {type(images).__name__}")


# the task each method runs, by kind: (what an error calls it, which tasks qualify)
_TASK_KINDS: Dict[str, Tuple[str, Callable]] = {
    "detection": ("detection", lambda t: t.localization),
    "instance_segmentation": ("instance segmentation", lambda t: t.localization and t.with_masks),
    "classification": ("classification", lambda t: t.family is TaskFamily.CLASSIFICATION),
    "captioning": ("captioning", lambda t: t.family is TaskFamily.CAPTIONING),
    "retrieval": ("retrieval", lambda t: t.family is TaskFamily.RETRIEVAL),
}


class GeneralistPredictor:
    """Wraps a UniPerceiverV2 in eval mode; each method runs one task (by task type) on one
    image or a list of images (batched, results in input order)."""

    def __init__(self, cfg):
        self.cfg = config_for_weights(cfg).clone()  # an inference checkpoint brings its text encoder
        self.model = build_model(self.cfg)
        if self.cfg.MODEL.WEIGHTS:
            UP2Checkpointer(self.model, allow_pickle=self.cfg.MODEL.ALLOW_PICKLE_WEIGHTS).load(
                expand_path(self.cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS"))
        prepare_for_inference(self.model)  # eval mode + the inference rewrites (up2.modeling.inference)
        self.resize = {name: _test_resize(task_input_config(self.cfg, task.spec)) for name, task in self.model.tasks.items()}
        self.input_format = cfg.INPUT.FORMAT

    @classmethod
    def from_pretrained(cls, path: str, opts: Sequence = (), device: Optional[str] = None) -> "GeneralistPredictor":
        """The model of an inference checkpoint folder (``up2.checkpoint``), from the folder alone:
        neither its training data nor its training config is needed.

        Args:
            path: the folder (``OUTPUT_DIR/model_final_inference`` after training, or what
                ``python -m up2.export`` wrote); ``$VAR`` and ``~`` are expanded.
            opts: config overrides ``[KEY, VALUE, ...]`` (e.g. ``["TEST.AMP.ENABLED", True]``).
            device: "cpu", "cuda", ...; None = the stored MODEL.DEVICE, or the CPU when that is
                CUDA and none is available.

        Raises:
            FileNotFoundError: ``path`` is not an inference checkpoint (no up2_checkpoint.json).
            ValueError: its format version is one this up2 cannot read (the message names it), or
                its config cannot be merged.
        """
        return cls(inference_config(path, opts, device=device))

    @classmethod
    def from_config_file(cls, config_file: str, weights: str = "", opts: Sequence = ()) -> "GeneralistPredictor":
        """The model of ``config_file`` with ``weights`` (any MODEL.WEIGHTS :class:`UP2Checkpointer` reads)."""
        cfg = get_cfg()
        add_up2_config(cfg)
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
        cfg.MODEL.WEIGHTS = weights
        cfg.freeze()
        return cls(cfg)

    # ------------------------------------------------------------------ helpers
    def _task(self, kind: str) -> str:
        """The name of the task a method runs for ``kind`` (a key of ``_TASK_KINDS``): the first
        task, in name order, of that kind; KeyError naming the kind otherwise."""
        what, accepts = _TASK_KINDS[kind]
        for name in sorted(self.model.tasks):
            if accepts(self.model.tasks[name]):
                return name
        raise KeyError(f"this model's config has no {what} task; configured: "
                       f"{ {n: t.spec.type for n, t in self.model.tasks.items()} }")

    def class_names(self, kind: str = "classification") -> Tuple[str, ...]:
        """The class names stored with the checkpoint (``cfg.TASKS.<NAME>.CLASS_NAMES``, resolved
        from the training data) of the task that :meth:`classify` (``kind="classification"``),
        :meth:`detect` ("detection") or :meth:`segment` ("instance_segmentation") runs; the
        order of the scores and class indices those methods return without ``class_names``.

        Raises:
            ValueError: ``kind`` is none of those three.
            KeyError: the model has no task of that kind.
        """
        if kind not in ("classification", "detection", "instance_segmentation"):
            raise ValueError(f"class_names: kind must be 'classification', 'detection' or "
                             f"'instance_segmentation', got {kind!r}")
        return tuple(self.model.tasks[self._task(kind)].spec.class_names)

    def _input(self, image: ImageLike, task: str, index: Optional[int] = None) -> dict:
        """One model input of ``task``: {"image": (3, h, w) uint8 resized to the task's test size
        (channels per cfg.INPUT.FORMAT), "height": H, "width": W (original pixels)}."""
        if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
            rgb = read_image(image, format="RGB")
        elif isinstance(image, (np.ndarray, Image.Image)):
            rgb = to_rgb_array(image, format="RGB", input_format="BGR")
        else:
            where = "image" if index is None else f"images[{index}]"
            raise TypeError(f"{where} must be a path, a numpy array or a PIL image, got {type(image).__name__}")
        h, w = rgb.shape[:2]
        arr = rgb if self.input_format == "RGB" else rgb[:, :, ::-1]
        arr = self.resize[task].get_transform(arr).apply_image(arr)
        return {"image": torch.as_tensor(np.ascontiguousarray(arr.transpose(2, 0, 1))), "height": h, "width": w}

    def _map(self, images: ImagesLike, task: str, batch_size: int, call: Callable[[List[dict]], list]):
        """Run ``call`` over the inputs of ``task`` of one image (-> one result) or a list (-> list,
        in input order)."""
        items, single = _as_list(images)
        out = _run_batched(lambda i: self._input(items[i], task, None if single else i), len(items), batch_size,
                           _size_divisibility(self.model), call)
        return out[0] if single else out

    # ------------------------------------------------------------------ tasks
    @torch.no_grad()
    def detect(self, images: ImagesLike, class_names: Optional[Sequence[str]] = None, batch_size: int = 8):
        """Detections (detectron2 ``Instances`` in input-image pixels: pred_boxes, scores, pred_classes,
        and pred_masks when the task is instance segmentation), one per image (a list for a
        list of images). ``class_names`` (optional) replaces the training classes.

        Raises:
            ValueError: an empty ``class_names`` or list of images, ``batch_size`` < 1.
        """
        name = self._task("detection")
        return self._map(images, name, batch_size,
                         lambda xs: [o["instances"] for o in self.model(xs, task=name, class_names=class_names)])

    @torch.no_grad()
    def segment(self, images: ImagesLike, class_names: Optional[Sequence[str]] = None, batch_size: int = 8):
        """As :meth:`detect`, from an instance-segmentation task (masks included)."""
        name = self._task("instance_segmentation")
        return self._map(images, name, batch_size,
                         lambda xs: [o["instances"] for o in self.model(xs, task=name, class_names=class_names)])

    @torch.no_grad()
    def classify(self, images: ImagesLike, class_names: Optional[Sequence[str]] = None, batch_size: int = 8):
        """Image classification (paper §4: the image's [SPE] feature against the class names'):
        {"scores": (C,) float32 probabilities over the classes, "label": best name} per image (a
        list for a list of images).

        Args:
            class_names: the C classes to choose from (open vocabulary); None = the classes the
                classification task was trained on, stored with the checkpoint
                (:meth:`class_names`, ``cfg.TASKS.<NAME>.CLASS_NAMES``), in that order.

        Raises:
            ValueError: ``class_names`` empty (or a single string, an empty or repeated name);
                None while the checkpoint stores no class names for its classification task;
                an empty list of images; ``batch_size`` < 1.
            KeyError: the model has no classification task.
        """
        name = self._task("classification")
        if class_names is None:
            class_names = self.model.tasks[name].spec.class_names
            if len(class_names) == 0:
                raise ValueError(f"classify: no class_names given and the checkpoint stores none for its "
                                 f"classification task {name} (cfg.TASKS.{name}.CLASS_NAMES is empty); "
                                 "pass class_names=[...]")
        elif len(class_names) == 0:
            raise ValueError("classify needs a non-empty list of class_names")
        names = list(check_class_names(class_names, "classify: class_names"))
        return self._map(images, name, batch_size, lambda xs: [
            {"scores": o["pred_class_scores"], "label": names[o["pred_class"]]}
            for o in self.model(xs, task=name, class_names=names)])

    @torch.no_grad()
    def caption(self, images: ImagesLike, beam_size: Optional[int] = None, max_length: Optional[int] = None,
                batch_size: int = 8, length_penalty: Optional[float] = None):
        """A caption (str) by beam search (beam 1 = greedy) per image (a list for a list of images);
        None = the task's BEAM_SIZE / MAX_CAPTION_LENGTH / LENGTH_PENALTY (``up2.modeling.beam_search``)."""
        name = self._task("captioning")
        return self._map(images, name, batch_size, lambda xs: [
            o["caption"] for o in self.model(xs, task=name, beam_size=beam_size, max_length=max_length,
                                             length_penalty=length_penalty)])

    @torch.no_grad()
    def retrieve(self, images: ImagesLike, texts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        """(I, J) float32 cosine similarity between images and texts (paper Eq. 6 without tau);
        images (one, or a list) are embedded in batches of ``batch_size``.

        Raises:
            ValueError: no images or no texts, texts given as one string (not a list), an empty
                text, ``batch_size`` < 1.
        """
        images, _ = _as_list(images)
        if isinstance(texts, (str, bytes)):
            raise ValueError(f"retrieve: texts must be a list of strings, got one string (did you mean [{texts!r}]?)")
        if len(texts) == 0:
            raise ValueError("retrieve needs at least one text")
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ValueError(f"retrieve: texts must be non-empty strings, got {list(texts)!r}")
        name = self._task("retrieval")
        task = self.model.tasks[name]
        with self.model.inference_autocast():
            img = torch.stack(self._map(list(images), name, batch_size, lambda xs: list(task.embed_images(self.model, xs))))
            txt = task.embed_texts(self.model, list(texts)).embeddings
        return F.normalize(img.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).t()


class BatchPredictor(DefaultPredictor):
    """detectron2's ``DefaultPredictor`` for a list of images: same model building, checkpoint
    loading (cfg.MODEL.WEIGHTS, through :class:`up2.checkpoint.UP2Checkpointer`: an inference
    checkpoint folder works too), BGR input convention and ResizeShortestEdge test resizing,
    per image; the images run in batches (module docstring) and the outputs come back in order.

    ``predictor(images)`` with a list of (H, W, C) BGR uint8 arrays returns a list of the
    model's per-image output dicts (e.g. {"instances": Instances in original pixels}); a single
    array returns a single dict, as DefaultPredictor does. Keyword arguments are passed to the
    model (for UniPerceiverV2: ``task=``, ``class_names=``, ...).

    Args:
        cfg: a detectron2 config (any meta-architecture taking detectron2 input dicts).
        batch_size: images per chunk (>= 1).
    """

    def __init__(self, cfg, batch_size: int = 8):
        # DefaultPredictor.__init__'s steps, with up2's checkpointer (inference checkpoint folders,
        # no pickle without MODEL.ALLOW_PICKLE_WEIGHTS) instead of detectron2's
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = expand_path(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")  # $VAR, ~
        cfg = config_for_weights(cfg)
        cfg.freeze()
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(f"cfg.INPUT.FORMAT={cfg.INPUT.FORMAT!r}: expected 'RGB' or 'BGR'")
        self.cfg = cfg
        self.model = build_model(cfg)
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        UP2Checkpointer(self.model, allow_pickle=cfg.MODEL.get("ALLOW_PICKLE_WEIGHTS", False)).load(cfg.MODEL.WEIGHTS)
        self.aug = self._aug = _test_resize(cfg)
        self.input_format = cfg.INPUT.FORMAT
        prepare_for_inference(self.model)  # eval mode + the inference rewrites (up2.modeling.inference)
        self.batch_size = int(batch_size)

    def preprocess(self, original_image: np.ndarray, index: int = 0) -> dict:
        """DefaultPredictor's preprocessing of one BGR image -> {"image": (C, h, w) float32,
        "height": H, "width": W}.

        Raises:
            ValueError: not a (H, W, C) numpy array.
        """
        if not isinstance(original_image, np.ndarray) or original_image.ndim != 3:
            got = original_image.shape if isinstance(original_image, np.ndarray) else type(original_image).__name__
            raise ValueError(f"images[{index}] must be a (H, W, C) BGR numpy array, got {got}")
        if self.input_format == "RGB":
            original_image = original_image[:, :, ::-1]
        height, width = original_image.shape[:2]
        image = self._aug.get_transform(original_image).apply_image(original_image)
        return {"image": torch.as_tensor(image.astype("float32").transpose(2, 0, 1)), "height": height, "width": width}

    def __call__(self, original_images, **model_kwargs):
        single = isinstance(original_images, np.ndarray)
        images = [original_images] if single else list(original_images)
        if not images:
            raise ValueError("BatchPredictor: got an empty list of images")
        # a task with its own IMAGE_SIZE is resized to it; otherwise cfg.INPUT's test size
        tasks = getattr(self.model, "tasks", {})
        task = tasks.get(model_kwargs.get("task") or getattr(self.model, "default_task", None))
        self._aug = _test_resize(task_input_config(self.cfg, task.spec)) if task is not None else self.aug
        with torch.no_grad():
            out = _run_batched(lambda i: self.preprocess(images[i], i), len(images), self.batch_size,
                               _size_divisibility(self.model), lambda xs: self.model(xs, **model_kwargs))
        return out[0] if single else out
