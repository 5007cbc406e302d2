"""Picture sheets of one multi-task UP2 checkpoint: every task on the same image, one PNG each,
collected in a self-contained ``index.html``.

    from up2.predictor import GeneralistPredictor
    from projects.demo.sheets import write_sheets
    p = GeneralistPredictor.from_pretrained("output/tiny_joint_shapes/model_final_inference")
    write_sheets(p, "shapes_val", "output/sheets", num_images=8, photos=["photo.jpg"])

A sheet of a val image shows, on the left, the image upscaled by an integer factor (nearest
neighbour, so a 128 px shapes image becomes 512 px) with the instance-segmentation predictions
(boxes, masks, class and score) drawn by detectron2's ``Visualizer``; on the right, as text:

- the true class (the image label of ``metadata.labels_file``) and the top-3 classes of
  :meth:`GeneralistPredictor.classify` with their probabilities;
- the generated caption (:meth:`GeneralistPredictor.caption`) and the true captions
  (``metadata.captions_file``);
- retrieval: the rank (1 = best) of the image's best-scoring true caption among all DISTINCT
  caption texts of the split, by :meth:`GeneralistPredictor.retrieve` (cosine similarity; a text
  identical to one of the image's captions counts as true, so templated captions shared by many
  images are neither a miss nor counted twice; ties go in the image's favour), and the text the
  model ranks first.

A task the checkpoint lacks, or data the dataset's metadata lacks, is said so on the sheet.
A real photo gets a sheet whose title says that the model learned only synthetic shapes.
"""
from __future__ import annotations

import html
import io
import os
import re
import textwrap
from typing import Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import quote

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.structures import Boxes, Instances
from detectron2.utils.visualizer import ColorMode, Visualizer
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from up2.data.datasets.captions import load_coco_caption_dicts
from up2.data.datasets.coco import read_coco_categories
from up2.data.datasets.shapes_tasks import load_image_labels_json
from up2.data.image_io import read_image
from up2.modeling.tasks.task import TaskFamily
from up2.utils import atomic_write

__all__ = ["write_sheets", "retrieval_rank", "upscale_instances"]

DISPLAY_SIDE = 512  # images are upscaled by the largest integer factor that keeps their longer side <= this (>= 1)
_WRAP = 78  # characters per text line on a sheet (monospace)
_LINE_IN = 0.21  # inches per text line


def upscale_instances(instances: Instances, factor: int) -> Instances:
    """``instances`` (pred_boxes XYXY pixels, scores, pred_classes, optional pred_masks (N, H, W)
    bool) on an image ``factor`` times larger: boxes times ``factor``, masks repeated per pixel
    (nearest neighbour, as the image)."""
    h, w = instances.image_size
    out = Instances((h * factor, w * factor))
    out.pred_boxes = Boxes(instances.pred_boxes.tensor * factor)
    out.scores = instances.scores
    out.pred_classes = instances.pred_classes
    if instances.has("pred_masks"):
        out.pred_masks = instances.pred_masks.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    return out


def retrieval_rank(similarity: torch.Tensor, texts: Sequence[str], true_texts: Iterable[str]) -> Tuple[int, int]:
    """Rank (1 = best) of an image's best true text among ``texts``.

    Args:
        similarity: (J,) float image-text similarities, one per text.
        texts: the J candidate texts (distinct).
        true_texts: the image's captions; a candidate equal to one of them is true.

    Returns:
        (rank, index of the best-scoring true text in ``texts``): rank = 1 + the number of false
        texts scoring strictly higher than it.

    Raises:
        ValueError: ``similarity`` is not (J,), or no candidate is one of ``true_texts``.
    """
    if similarity.shape != (len(texts),):
        raise ValueError(f"similarity must be ({len(texts)},), one per text, got {tuple(similarity.shape)}")
    true_set = set(true_texts)
    is_true = torch.tensor([t in true_set for t in texts], dtype=torch.bool)
    if not bool(is_true.any()):
        raise ValueError(f"none of the image's captions {sorted(true_set)!r} is among the {len(texts)} texts")
    sim = similarity.float().cpu()
    best = int(torch.where(is_true, sim, torch.tensor(float("-inf"))).argmax())
    return 1 + int(((sim > sim[best]) & ~is_true).sum()), best


def _kinds(predictor) -> set:
    """The task kinds the predictor's model has (``GeneralistPredictor`` method names)."""
    tasks = predictor.model.tasks.values()
    kinds = {k for k, fam in (("classify", TaskFamily.CLASSIFICATION), ("caption", TaskFamily.CAPTIONING),
                              ("retrieve", TaskFamily.RETRIEVAL)) if any(t.family is fam for t in tasks)}
    if any(t.localization and t.with_masks for t in tasks):
        kinds.add("segment")
    elif any(t.localization for t in tasks):
        kinds.add("detect")
    return kinds


def _wrap(text: str, indent: str = "  ") -> List[str]:
    """``text`` in lines of at most ``_WRAP`` characters, the first after ``indent``, the others
    aligned under the text."""
    return textwrap.wrap(text, _WRAP, initial_indent=indent, subsequent_indent=" " * len(indent)) or [indent]


def _drawing(rgb: np.ndarray, instances: Optional[Instances], class_names: Sequence[str],
             threshold: float, max_detections: int) -> Tuple[np.ndarray, int]:
    """(the upscaled (H', W', 3) uint8 drawing of the at most ``max_detections`` highest-scoring
    instances with score >= ``threshold``, number of instances drawn)."""
    h, w = rgb.shape[:2]
    factor = max(1, DISPLAY_SIDE // max(h, w))
    big = np.ascontiguousarray(np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1))
    if instances is None:
        return big, 0
    kept = instances.to("cpu")
    kept = kept[kept.scores >= threshold]
    kept = kept[torch.argsort(kept.scores, descending=True)[:max_detections]]
    vis = Visualizer(big, metadata=Metadata(name="up2-sheet").set(thing_classes=list(class_names)),
                     instance_mode=ColorMode.IMAGE)
    return vis.draw_instance_predictions(upscale_instances(kept, factor)).get_image(), len(kept)


def _save_sheet(path: str, drawing: np.ndarray, title: str, lines: List[Tuple[str, str]]) -> None:
    """A PNG: ``drawing`` on the left, ``lines`` ((text, style): "head", "text", "good", "bad",
    "note") on the right, ``title`` above; written atomically."""
    img_in = 5.6
    height = max(img_in + 1.0, 0.9 + _LINE_IN * (len(lines) + 1))
    fig = Figure(figsize=(img_in + 8.4, height), dpi=100)
    FigureCanvasAgg(fig)
    fig.suptitle(title, x=0.01, y=1 - 0.12 / height, ha="left", va="top", fontsize=12, fontweight="bold", wrap=True)
    ax = fig.add_axes((0.2 / fig.get_figwidth(), (height - 0.7 - img_in) / height,
                       img_in / fig.get_figwidth(), img_in / height))
    ax.imshow(drawing, interpolation="nearest")
    ax.set_axis_off()
    styles = {"head": {"fontweight": "bold", "color": "black"}, "text": {"color": "black"},
              "good": {"color": "#137a2a"}, "bad": {"color": "#b3261e"}, "note": {"color": "#555555", "style": "italic"}}
    x = (img_in + 0.5) / fig.get_figwidth()
    for i, (text, style) in enumerate(lines):
        y = 1 - (0.75 + _LINE_IN * i) / height
        fig.text(x, y, text, ha="left", va="top", family="monospace", fontsize=9.5, **styles[style])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def _val_records(dataset_name: str, num_images: int) -> Tuple[List[dict], Dict[int, List[str]]]:
    """(the first ``num_images`` records of ``dataset_name`` by image id, each with "captions"
    (list, maybe empty) and "true_class" (str or None) added from its metadata's files;
    image id -> captions of the whole split ({} without ``captions_file``))."""
    records = sorted(DatasetCatalog.get(dataset_name), key=lambda r: r["image_id"])[:num_images]
    meta = MetadataCatalog.get(dataset_name)
    image_root = meta.get("image_root", "")
    captions: Dict[int, List[str]] = {}
    if meta.get("captions_file"):
        captions = {r["image_id"]: r["captions"] for r in load_coco_caption_dicts(meta.captions_file, image_root)}
    labels: Dict[int, str] = {}
    if meta.get("labels_file"):
        names, _ = read_coco_categories(meta.labels_file)
        labels = {r["image_id"]: names[r["class_id"]] for r in load_image_labels_json(meta.labels_file, image_root)}
    out = [dict(r, captions=captions.get(r["image_id"], []), true_class=labels.get(r["image_id"])) for r in records]
    return out, captions


def _table_html(rows: Sequence[dict]) -> str:
    if not isinstance(rows, (list, tuple)) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"table_rows must be a list of dicts (task, dataset, metric, value), got {rows!r:.200}")
    # as eval_table.md: the headline metrics (up2.evaluation.report), values with their unit
    shown = [r for r in rows if r.get("headline", True)]
    columns = ["task", "dataset", "metric", "value"]

    def cell(r, c):
        v = r.get(c)
        if c == "value" and isinstance(v, (int, float)):
            return f"{v:.2f}{r.get('unit', '')}"
        return "n/a" if v is None else str(v)

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(cell(r, c))}</td>" for c in columns) + "</tr>"
                     for r in shown)
    note = ""
    if len(shown) < len(rows):
        note = f"\n<p>{len(rows) - len(shown)} more metrics in eval_table.json.</p>"
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>{note}"


def _write_index(out_dir: str, checkpoint: str, dataset_name: str, tasks: str, sheets: List[Tuple[str, str]],
                 table_rows: Optional[Sequence[dict]]) -> str:
    """index.html (written last, atomically) linking ``sheets`` [(file name, summary)]."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        "<title>up2: one checkpoint, every task</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1500px}figure{margin:1.5em 0}"
        "img{max-width:100%;border:1px solid #ccc}table{border-collapse:collapse}"
        "td,th{border:1px solid #aaa;padding:.2em .6em;text-align:left}</style>",
        "</head>", "<body>",
        "<h1>up2: one checkpoint, every task</h1>",
        f"<p>Checkpoint: <code>{esc(checkpoint)}</code>. Images of <code>{esc(dataset_name)}</code>: "
        f"{esc(tasks)}, all from the same weights.</p>",
    ]
    if table_rows is not None:
        parts += ["<h2>Evaluation</h2>", _table_html(table_rows)]
    parts.append("<h2>Sheets</h2>")
    for name, summary in sheets:
        parts.append(f'<figure><a href="{esc(quote(name))}"><img src="{esc(quote(name))}" alt="{esc(summary)}">'
                     f"</a><figcaption>{esc(summary)}</figcaption></figure>")
    parts += ["</body>", "</html>", ""]
    path = os.path.join(out_dir, "index.html")
    with atomic_write(path) as f:
        f.write("\n".join(parts))
    return path


def write_sheets(predictor, dataset_name: str, out_dir: str, num_images: int = 8, threshold: float = 0.5,
                 photos: Sequence[str] = (), table_rows: Optional[Sequence[dict]] = None,
                 checkpoint: Optional[str] = None, max_detections: int = 20) -> str:
    """Write one sheet (module docstring) per val image and per photo, then ``index.html``.

    Args:
        predictor: a :class:`up2.predictor.GeneralistPredictor` (ideally with instance
            segmentation, classification, captioning and retrieval tasks).
        dataset_name: a registered detection dataset (e.g. ``shapes_val``); its metadata's
            ``captions_file`` and ``labels_file`` (set by ``register_shapes``) give the true
            captions and image classes.
        out_dir: output folder (created); sheets ``sheet_<file stem>.png`` (``000001.png`` ->
            ``sheet_000001.png``) and ``photo_<k>.png`` (k = 1, 2, ... in ``photos`` order), and
            ``index.html``. Sheets of an earlier run in the same folder that this run did not
            write again are deleted (other files are left alone).
        num_images: the first ``num_images`` images by image id (>= 0; fewer when the dataset
            has fewer).
        threshold: detections with score >= this are drawn, in [0, 1].
        max_detections: at most this many of them (the highest scores) are drawn, >= 1.
        photos: paths of real photos, each drawn with a warning title.
        table_rows: optional evaluation rows {"task", "dataset", "metric", "value", ...} shown
            as a table in index.html.
        checkpoint: the name shown in the header (default: the predictor's MODEL.WEIGHTS).

    Returns:
        the path of ``index.html``, written after every sheet (temp file + rename), so a crash
        leaves no index.

    Raises:
        ValueError: ``num_images`` < 0, ``threshold`` outside [0, 1], ``max_detections`` < 1,
            nothing to draw, or ``table_rows`` not a list of dicts.
        KeyError: ``dataset_name`` is not registered; the model has no detection task.
        FileNotFoundError: a missing photo (names it).
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"num_images must be an int >= 0, got {num_images!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    if isinstance(max_detections, bool) or not isinstance(max_detections, int) or max_detections < 1:
        raise ValueError(f"max_detections must be an int >= 1, got {max_detections!r}")
    if isinstance(photos, (str, bytes, os.PathLike)):
        photos = [photos]
    photos = [os.fspath(p) for p in photos]
    if table_rows is not None:
        _table_html(table_rows)  # fail before any drawing
    records, all_captions = _val_records(dataset_name, num_images)
    if not records and not photos:
        raise ValueError(f"nothing to draw: num_images={num_images} of {dataset_name!r} and no photos")
    for p in photos:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"photo not found: {p}")
    kinds = _kinds(predictor)
    if not kinds & {"segment", "detect"}:
        raise KeyError(f"the model has no detection or instance-segmentation task to draw; tasks: "
                       f"{ {n: t.spec.type for n, t in predictor.model.tasks.items()} }")
    localize = "segment" if "segment" in kinds else "detect"
    det_names = predictor.class_names("instance_segmentation" if localize == "segment" else "detection")
    cls_names = predictor.class_names("classification") if "classify" in kinds else ()
    os.makedirs(out_dir, exist_ok=True)

    # distinct caption texts of the whole split, embedded once
    texts = list(dict.fromkeys(c for caps in all_captions.values() for c in caps))
    paths = [r["file_name"] for r in records] + photos
    n_val = len(records)
    dets = getattr(predictor, localize)(paths)
    cls = predictor.classify(paths) if "classify" in kinds else None  # over the stored class names
    caps = predictor.caption(paths) if "caption" in kinds else None
    sims = predictor.retrieve(paths, texts) if "retrieve" in kinds and texts else None  # (I, J)

    sheets: List[Tuple[str, str]] = []
    for i, path in enumerate(paths):
        rgb = read_image(path, format="RGB")
        drawing, n_drawn = _drawing(rgb, dets[i], det_names, threshold, max_detections)
        lines: List[Tuple[str, str]] = []
        summary: List[str] = [f"{n_drawn} detections drawn"]
        is_val = i < n_val
        rec = records[i] if is_val else None
        if is_val and rec["true_class"] is not None:
            lines.append((f"True class (largest shape): {rec['true_class']}", "head"))

        top_score = f"; highest score {float(dets[i].scores.max()):.3f}" if len(dets[i]) else ""
        lines.append((f"Instance segmentation: {n_drawn} of {len(dets[i])} detections drawn", "head"))
        lines.append((f"  (score >= {threshold:g}, at most {max_detections}{top_score})", "text"))
        if cls is not None:
            scores = cls[i]["scores"].float()
            top = torch.topk(scores, min(3, scores.numel()))
            lines.append(("Classification, top 3:", "head"))
            for s, k in zip(top.values.tolist(), top.indices.tolist()):
                style = "good" if is_val and cls_names[k] == rec["true_class"] else "text"
                lines.append((f"  {cls_names[k]:<12s} {s:6.3f}", style))
            summary.append(f"class {cls[i]['label']} ({float(top.values[0]):.2f})")
        else:
            lines.append(("(this checkpoint has no classification task)", "note"))
        if caps is not None:
            lines.append(("Generated caption:", "head"))
            lines += [(t, "text") for t in _wrap(f'"{caps[i]}"')]
            summary.append(f'caption "{caps[i]}"')
        else:
            lines.append(("(this checkpoint has no captioning task)", "note"))
        if is_val:
            if rec["captions"]:
                lines.append(("True captions:", "head"))
                for k, c in enumerate(rec["captions"]):
                    lines += [(t, "text") for t in _wrap(c, f"  {k + 1}. ")]
            else:
                lines.append((f"(no captions for this image in the metadata of {dataset_name})", "note"))
            if sims is not None and rec["captions"]:
                rank, best = retrieval_rank(sims[i], texts, rec["captions"])
                lines.append((f"Retrieval: best true caption ranks {rank} of {len(texts)} distinct val captions "
                              "(1 = best)", "head"))
                lines += [(t, "good" if rank == 1 else "text") for t in _wrap(f'"{texts[best]}"', "  best true:   ")]
                if rank > 1:
                    lines += [(t, "bad") for t in _wrap(f'"{texts[int(sims[i].argmax())]}"', "  ranked first: ")]
                summary.append(f"retrieval rank {rank}/{len(texts)}")
            elif "retrieve" not in kinds:
                lines.append(("(this checkpoint has no retrieval task)", "note"))
            name = _sheet_name(path, rec["image_id"], {n for n, _ in sheets})
            title = f"{dataset_name} image {rec['image_id']} ({os.path.basename(path)})"
            if rec["true_class"] is not None:
                summary.insert(0, f"true class {rec['true_class']}")
        else:
            name = f"photo_{i - n_val + 1}.png"
            title = (f"Real photo {os.path.basename(path)}: this model learned only synthetic shapes "
                     f"({', '.join(det_names)}), so its labels on a photo are not meaningful")
            lines.insert(0, ("The model has never seen a photo; read what follows as a curiosity.", "bad"))
        _save_sheet(os.path.join(out_dir, name), drawing, title, lines)
        sheets.append((name, f"{title}: " + "; ".join(summary)))

    done = [f"{'instance segmentation' if localize == 'segment' else 'detection'} (the at most "
            f"{max_detections} best detections with score >= {float(threshold):g} drawn)"]
    done += [what for kind, what in (("classify", "classification"), ("caption", "captioning"),
                                     ("retrieve", "retrieval")) if kind in kinds]
    index = _write_index(out_dir, checkpoint or str(predictor.cfg.MODEL.WEIGHTS) or "(random weights)",
                         dataset_name, ", ".join(done), sheets, table_rows)
    _remove_stale_sheets(out_dir, {n for n, _ in sheets})
    return index


def _sheet_name(path: str, image_id, taken: set) -> str:
    """``sheet_<file stem>.png`` (``000001.png`` -> ``sheet_000001.png``); the image id is added
    when two images share a stem."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.splitext(os.path.basename(path))[0])
    name = f"sheet_{stem}.png"
    return name if name not in taken else f"sheet_{stem}_id{image_id}.png"


def _remove_stale_sheets(out_dir: str, keep: set) -> None:
    """Delete the sheets of an earlier run in a reused folder (only the ``sheet_*.png`` and
    ``photo_*.png`` names that write_sheets gives), so index.html and the folder agree."""
    for name in os.listdir(out_dir):
        if name not in keep and re.fullmatch(r"(sheet|photo)_[A-Za-z0-9._-]+\.png", name):
            os.remove(os.path.join(out_dir, name))
