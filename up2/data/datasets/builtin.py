"""Datasets registered when ``up2`` is imported, found under ``$UP2_DATASETS`` (default ``./datasets``).

- ``shapes_train`` / ``shapes_val``: ``<root>/shapes`` written by ``datasets/prepare_shapes.py``.
- ``shapes_{cls,caption,text}_{train,val}``: the same data for classification, captioning /
  retrieval and masked LM (``shapes_tasks.register_shapes_tasks``).
- ``coco_2017_train`` / ``coco_2017_val`` are detectron2's own built-ins (``$DETECTRON2_DATASETS``).

A dataset whose files are absent is simply not registered; configs that name it then fail
with "dataset ... is not registered" (see ``up2.modeling.tasks.base``).
"""
import os

from .shapes import register_shapes
from .shapes_tasks import register_shapes_tasks

__all__ = ["register_all_builtin", "datasets_root"]


def datasets_root() -> str:
    """``$UP2_DATASETS`` or ``./datasets``, as an absolute path."""
    return os.path.abspath(os.environ.get("UP2_DATASETS", "datasets"))


def register_all_builtin(root: str | None = None) -> None:
    root = root or datasets_root()
    shapes = os.path.join(root, "shapes")
    if os.path.isfile(os.path.join(shapes, "annotations", "instances_train.json")):
        register_shapes(shapes)
    if os.path.isfile(os.path.join(shapes, "annotations", "labels_train.json")):
        register_shapes_tasks(shapes)
