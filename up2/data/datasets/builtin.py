"""Datasets registered when ``up2`` is imported.

Synthetic shapes, under ``$UP2_DATASETS`` (default ``./datasets``), registered only when present:

- ``shapes_train`` / ``shapes_val``: ``<root>/shapes`` written by ``datasets/prepare_shapes.py``.
- ``shapes_{cls,caption,text}_{train,val}``: the same data for classification, captioning /
  retrieval and masked LM (``shapes_tasks.register_shapes_tasks``).

The paper's training and evaluation data (paper §5.1, §5.4), under ``$DETECTRON2_DATASETS``
(default ``./datasets``, as detectron2's own COCO), ALWAYS registered the way detectron2
registers its built-ins: the names exist even when the files do not, so the paper configs
parse, validate and build a model anywhere; reading a dataset whose files are absent raises
FileNotFoundError naming the expected path. Layouts (``<D>`` = ``$DETECTRON2_DATASETS``)::

    coco_2017_{train,val}                       detectron2's built-in (COCO instances)
    imagenet_1k_{train,val}                     <D>/imagenet/{train,val}/<wnid>/*.JPEG (the 1000 ILSVRC-2012
                                                wnids; distinct names from timm's ImageNet-1k synset table)
    coco_caption_karpathy_{train,val,test}      <D>/coco/annotations/captions_karpathy_{split}.json,
                                                images <D>/coco/{train2014,val2014}/ (Karpathy "filepath")
    flickr30k_karpathy_{train,val,test}         <D>/flickr30k/annotations/captions_karpathy_{split}.json,
                                                images <D>/flickr30k/flickr30k-images/
    sbu_captions_train                          <D>/sbu/annotations/captions_train.json, images <D>/sbu/images/
    vg_captions_train                           <D>/visual_genome/annotations/captions_train.json,
                                                images <D>/visual_genome/images/
    cc3m_train, cc12m_train, yfcc_train         <D>/{cc3m,cc12m,yfcc}/annotations/captions_train.json,
                                                images <D>/{cc3m,cc12m,yfcc}/images/
    bookswiki_{train,val}                       <D>/bookswiki/corpus_{train,val}.txt (one document per line)

Caption files use the COCO captions format (``captions.py``); a Karpathy split json
(``dataset_coco.json``, ``dataset_flickr30k.json``) converts to it with
``karpathy_to_coco_captions(karpathy_json, split, include_restval=(split == "train"))`` written
to the path above (the usual COCO train split folds "restval" in). Web-scale pair sets (SBU,
CC3M, CC12M, YFCC, VG region descriptions as captions) must be downloaded and converted to the
same format by the user; nothing is downloaded here.

A name that is already registered is left alone (import twice, or a user's own registration).
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .captions import load_coco_caption_dicts
from .imagenet import load_imagenet_folder, unique_class_names
from .shapes import register_shapes
from .shapes_tasks import register_shapes_tasks
from .text_corpus import load_text_corpus

__all__ = ["register_all_builtin", "register_paper_datasets", "datasets_root", "detectron2_datasets_root",
           "imagenet_1k_classes", "PAPER_CAPTION_DATASETS", "PAPER_TEXT_DATASETS", "PAPER_IMAGENET_DATASETS"]

# name -> (annotation json, image root), relative to $DETECTRON2_DATASETS
PAPER_CAPTION_DATASETS = {
    **{f"coco_caption_karpathy_{s}": (f"coco/annotations/captions_karpathy_{s}.json", "coco")
       for s in ("train", "val", "test")},
    **{f"flickr30k_karpathy_{s}": (f"flickr30k/annotations/captions_karpathy_{s}.json", "flickr30k/flickr30k-images")
       for s in ("train", "val", "test")},
    "sbu_captions_train": ("sbu/annotations/captions_train.json", "sbu/images"),
    "vg_captions_train": ("visual_genome/annotations/captions_train.json", "visual_genome/images"),
    "cc3m_train": ("cc3m/annotations/captions_train.json", "cc3m/images"),
    "cc12m_train": ("cc12m/annotations/captions_train.json", "cc12m/images"),
    "yfcc_train": ("yfcc/annotations/captions_train.json", "yfcc/images"),
}
PAPER_TEXT_DATASETS = {"bookswiki_train": "bookswiki/corpus_train.txt", "bookswiki_val": "bookswiki/corpus_val.txt"}
PAPER_IMAGENET_DATASETS = {"imagenet_1k_train": "imagenet/train", "imagenet_1k_val": "imagenet/val"}


def datasets_root() -> str:
    """``$UP2_DATASETS`` or ``./datasets``, as an absolute path (the shapes data)."""
    return os.path.abspath(os.environ.get("UP2_DATASETS", "datasets"))


def detectron2_datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` or ``./datasets``, as an absolute path (detectron2's convention)."""
    return os.path.abspath(os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets")))


# Distinguishing words for ImageNet-1k synsets whose lemmas are all shared (WordNet hypernyms).
_IMAGENET_HINTS = {"n02012849": "bird", "n03126707": "machine"}


def imagenet_1k_classes() -> Tuple[List[str], List[str]]:
    """(wnids, names) of the 1000 ImageNet-1k classes in sorted-wnid order (= class ids of an
    ImageNet folder), read from timm's offline synset table. A name is the first lemma of the
    synset ("tench", "goldfish"). The 1000 names are distinct (:func:`unique_class_names`): of two
    synsets with one first lemma, one takes its next free lemma ("maillot" and "tank suit"), and
    where none is left both get a hint ("crane (bird)", "crane (machine)")."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    pairs = sorted(zip(info.label_names(), info.label_descriptions()))
    wnids = [w for w, _ in pairs]
    lemmas = [[lemma.strip() for lemma in d.split(",")] for _, d in pairs]
    names = unique_class_names([ls[0] for ls in lemmas], alternatives=[ls[1:] for ls in lemmas],
                               hints=[_IMAGENET_HINTS.get(w, w) for w in wnids])
    return wnids, names


def _missing(name: str, path: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"dataset {name!r}: {what} {path} not found "
                             "(set $DETECTRON2_DATASETS; layouts in up2/data/datasets/builtin.py)")


def _checked(name: str, paths: List[Tuple[str, str]], load: Callable[[], list]) -> Callable[[], list]:
    def loader():
        for path, what in paths:
            if not os.path.exists(path):
                raise _missing(name, path, what)
        return load()

    return loader


def register_paper_datasets(root: Optional[str] = None, replace: bool = False) -> List[str]:
    """Register the paper's datasets (module docstring) lazily under ``root``.

    Args:
        root: default :func:`detectron2_datasets_root`.
        replace: re-register names that already exist (default: leave them alone).
    Returns:
        the names registered by this call.
    Raises (when a dataset is read, not here):
        FileNotFoundError: its files are absent (names the path); see the ``load_*`` functions
            for malformed files.
    """
    root = os.path.abspath(root or detectron2_datasets_root())
    done = []

    def fresh(name: str) -> bool:
        if name not in DatasetCatalog.list():
            return True
        if not replace:
            return False
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        return True

    wnids, names = imagenet_1k_classes()
    for name, rel in PAPER_IMAGENET_DATASETS.items():
        if fresh(name):
            folder = os.path.join(root, rel)
            DatasetCatalog.register(name, _checked(name, [(folder, "image folder")],
                                                   lambda f=folder: load_imagenet_folder(f, wnids)))
            MetadataCatalog.get(name).set(thing_classes=list(names), class_folders=list(wnids),
                                          evaluator_type="classification", image_root=folder)
            done.append(name)
    for name, (rel_json, rel_images) in PAPER_CAPTION_DATASETS.items():
        if fresh(name):
            json_file, image_root = os.path.join(root, rel_json), os.path.join(root, rel_images)
            DatasetCatalog.register(name, _checked(
                name, [(json_file, "captions file"), (image_root, "image folder")],
                lambda j=json_file, r=image_root: load_coco_caption_dicts(j, r)))
            MetadataCatalog.get(name).set(evaluator_type="captioning", captions_file=json_file, image_root=image_root)
            done.append(name)
    for name, rel in PAPER_TEXT_DATASETS.items():
        if fresh(name):
            path = os.path.join(root, rel)
            DatasetCatalog.register(name, _checked(name, [(path, "text corpus")], lambda p=path: load_text_corpus(p)))
            MetadataCatalog.get(name).set(evaluator_type="mlm", corpus_file=path)
            done.append(name)
    return done


def register_all_builtin(root: str | None = None) -> None:
    """Register the shapes data found under ``root`` (default :func:`datasets_root`) and the
    paper's datasets under ``$DETECTRON2_DATASETS`` (module docstring)."""
    root = root or datasets_root()
    shapes = os.path.join(root, "shapes")
    if os.path.isfile(os.path.join(shapes, "annotations", "instances_train.json")):
        register_shapes(shapes)
    if os.path.isfile(os.path.join(shapes, "annotations", "labels_train.json")):
        register_shapes_tasks(shapes)
    register_paper_datasets()
