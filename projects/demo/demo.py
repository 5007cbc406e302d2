#!/usr/bin/env python
"""Draw UniPerceiverV2 detections / instance masks on images with detectron2's Visualizer.

    python projects/demo/demo.py --config-file configs/tiny/inst_shapes.yaml \
        --input photo1.jpg photo2.png --output out/ --opts MODEL.WEIGHTS output/model_final.pth

``MODEL.WEIGHTS`` may be an inference checkpoint folder (``up2.checkpoint``), with
``--config-file <folder>/config.yaml``.

Any image mode works (grayscale, RGBA, CMYK, 16-bit; EXIF orientation honoured). For every
input ``X.ext`` it writes ``<output>/X.png`` (the drawing) and prints the detection count.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List

from PIL import Image

from detectron2.config import get_cfg
from detectron2.data.catalog import Metadata
from detectron2.utils.visualizer import ColorMode, Visualizer

import up2  # noqa: F401  (registers the model and datasets)
from up2 import add_up2_config
from up2.data.image_io import read_image
from up2.predictor import BatchPredictor
from up2.utils import atomic_write


def setup_cfg(config_file: str, opts: List[str]):
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.freeze()
    return cfg


def save_png(array, path: str) -> None:
    """Write an (H, W, 3) uint8 RGB array atomically (temp file, then rename)."""
    with atomic_write(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")


def drawing_paths(inputs: List[str], output: str) -> List[str]:
    """``<output>/<input name>.png`` for every input.

    Raises:
        ValueError: a drawing would overwrite one of the inputs, or two inputs share a name
            (e.g. ``a/x.png`` and ``b/x.jpg``); nothing has been written then.
    """
    paths = [os.path.join(output, os.path.splitext(os.path.basename(p))[0] + ".png") for p in inputs]
    real_inputs = {os.path.realpath(p): p for p in inputs}
    seen = {}
    for src, dst in zip(inputs, paths):
        if os.path.realpath(dst) in real_inputs:
            raise ValueError(f"the drawing of {src} would overwrite the input {real_inputs[os.path.realpath(dst)]}: "
                             "choose another --output folder")
        if dst in seen:
            raise ValueError(f"inputs {seen[dst]} and {src} would both be drawn to {dst}: run them with different "
                             "--output folders")
        seen[dst] = src
    return paths


def run(cfg, inputs: List[str], output: str, threshold: float = 0.3) -> List[dict]:
    """Predict on ``inputs`` and write drawings to ``output``.

    Returns one summary dict per image: {"file", "output", "num_detections", "detections":
    [{"class", "score", "box" (XYXY pixels)}]}.

    Raises:
        FileNotFoundError / ValueError: a missing or unreadable image (names the file), or an
            output that would overwrite an input or another drawing (:func:`drawing_paths`).
    """
    out_paths = drawing_paths(inputs, output)
    os.makedirs(output, exist_ok=True)
    predictor = BatchPredictor(cfg)  # DefaultPredictor + up2's checkpoint formats and inference rewrites
    model = predictor.model
    if model.default_task is None:
        raise ValueError(f"{cfg.MODEL.WEIGHTS or 'the model'}: several tasks {sorted(model.tasks)} and no "
                         "MODEL.DEFAULT_TASK; add --opts MODEL.DEFAULT_TASK <a detection task>")
    spec = model.tasks[model.default_task].spec
    if not model.tasks[model.default_task].localization:
        raise ValueError(f"demo.py draws detections, but the default task {spec.name} is {spec.type!r}; "
                         "set MODEL.DEFAULT_TASK to a detection or instance-segmentation task")
    # class names travel with the config / checkpoint: no dataset needs to be registered
    metadata = Metadata(name=f"up2:{spec.name}").set(thing_classes=list(spec.class_names))
    summaries = []
    for path, out_path in zip(inputs, out_paths):
        bgr = read_image(path, format="BGR")
        inst = predictor(bgr)["instances"].to("cpu")
        inst = inst[inst.scores >= threshold]
        vis = Visualizer(bgr[:, :, ::-1], metadata=metadata, instance_mode=ColorMode.IMAGE)
        drawing = vis.draw_instance_predictions(inst).get_image()
        save_png(drawing, out_path)
        dets = [
            {"class": metadata.thing_classes[int(c)], "score": round(float(s), 4), "box": [round(float(v), 1) for v in b]}
            for c, s, b in zip(inst.pred_classes, inst.scores, inst.pred_boxes.tensor)
        ]
        summaries.append({"file": path, "output": out_path, "num_detections": len(dets), "detections": dets})
        print(f"{path}: {len(dets)} detections -> {out_path}")
    return summaries


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="image files")
    parser.add_argument("--output", required=True, help="folder for the drawings")
    parser.add_argument("--confidence-threshold", type=float, default=0.3)
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    cfg = setup_cfg(args.config_file, args.opts)
    try:
        run(cfg, args.input, args.output, args.confidence_threshold)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
