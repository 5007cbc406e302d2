"""projects/demo/sheets.py: one picture sheet per image of a multi-task checkpoint, an index.html
linking them; and GeneralistPredictor.classify over the checkpoint's stored class names."""
import dataclasses
import os
from html.parser import HTMLParser

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from detectron2.data import DatasetCatalog

from conftest import add_task, tiny_cfg
from projects.demo.sheets import retrieval_rank, upscale_instances, write_sheets
from up2.predictor import GeneralistPredictor

SHAPES = ("circle", "square", "triangle", "star", "hexagon")  # category id order of the shapes data


@pytest.fixture(scope="module")
def predictor(shapes_datasets, tmp_path_factory):
    """A randomly initialised tiny model with every task the sheets draw, loaded from a checkpoint."""
    from detectron2.modeling import build_model

    from up2.modeling.tasks import resolve_task_data

    cfg = tiny_cfg(task_type=None)
    add_task(cfg, "SEG", "instance_segmentation", "test_shapes_train", "test_shapes_val")
    add_task(cfg, "CLS", "classification", "test_shapes_cls_train", "test_shapes_cls_val")
    add_task(cfg, "CAP", "captioning", "test_shapes_caption_train", "test_shapes_caption_val",
             VOCABULARY="dataset", MAX_CAPTION_LENGTH=4, BEAM_SIZE=1)
    add_task(cfg, "RET", "retrieval", "test_shapes_caption_train", "test_shapes_caption_val")
    cfg = resolve_task_data(cfg)
    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("sheets_model") / "model.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.freeze()
    return GeneralistPredictor(cfg)


class _Links(HTMLParser):
    """The img sources and figure captions (text, unescaped) of a page."""

    def __init__(self):
        super().__init__()
        self.srcs, self.captions, self._in_caption = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])
        self._in_caption = tag == "figcaption"
        if self._in_caption:
            self.captions.append("")

    def handle_endtag(self, tag):
        self._in_caption = False

    def handle_data(self, data):
        if self._in_caption:
            self.captions[-1] += data


def test_sheets_and_index(predictor, tmp_path):
    photo = tmp_path / "coffee.png"
    Image.fromarray(skimage.data.coffee()).save(photo)
    out = tmp_path / "sheets"
    rows = [{"task": "<CLS>", "dataset": "shapes&val", "metric": "top1", "value": 0.25, "unit": "%", "headline": True},
            {"task": "<CLS>", "dataset": "shapes&val", "metric": "AP75", "value": 1.5, "unit": "%", "headline": False}]
    index = write_sheets(predictor, "test_shapes_val", str(out), num_images=2, threshold=0.0, photos=[str(photo)],
                         table_rows=rows, checkpoint="ckpt <v1> & co", max_detections=3)
    assert index == str(out / "index.html")
    stems = [os.path.splitext(d["file_name"])[0].rsplit(os.sep, 1)[-1] for d in DatasetCatalog.get("test_shapes_val")[:2]]
    names = [f"sheet_{stem}.png" for stem in stems] + ["photo_1.png"]
    assert sorted(os.listdir(out)) == sorted(names + ["index.html"])  # no temp files left behind
    for name in names:
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            w, h = im.size
            assert im.format == "PNG" and 1000 <= w <= 2000 and 500 <= h <= 2000, (name, im.size)
            assert np.asarray(im.convert("L")).std() > 10  # not a blank page
    assert oct(os.stat(out / "index.html").st_mode & 0o777) == oct(0o666 & ~_umask())

    text = (out / "index.html").read_text(encoding="utf-8")
    links = _Links()
    links.feed(text)
    assert links.srcs == names
    assert "ckpt &lt;v1&gt; &amp; co" in text and "<v1>" not in text
    assert "<td>&lt;CLS&gt;</td>" in text and "<td>shapes&amp;val</td>" in text and "<td>0.25%</td>" in text
    assert "AP75" not in text and "1 more metrics in eval_table.json" in text  # headline rows only, as eval_table.md
    val, photo_caption = links.captions[:2], links.captions[2]
    assert all("true class" in c and "retrieval rank" in c and 'caption "' in c for c in val), val
    assert all("3 detections drawn" in c for c in links.captions)  # threshold 0: the 3 best of each image
    assert "learned only synthetic shapes" in photo_caption and "true class" not in photo_caption


def test_a_reused_folder_keeps_only_this_runs_sheets(predictor, tmp_path):
    photo = tmp_path / "coffee.png"
    Image.fromarray(skimage.data.coffee()).save(photo)
    out = tmp_path / "sheets"
    write_sheets(predictor, "test_shapes_val", str(out), num_images=2, threshold=0.0, photos=[str(photo)])
    assert len([n for n in os.listdir(out) if n.endswith(".png")]) == 3
    (out / "notes.txt").write_text("mine")
    write_sheets(predictor, "test_shapes_val", str(out), num_images=1, threshold=0.0)
    links = _Links()
    links.feed((out / "index.html").read_text(encoding="utf-8"))
    assert len(links.srcs) == 1
    assert sorted(os.listdir(out)) == sorted(links.srcs + ["index.html", "notes.txt"])


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_bad_arguments_write_nothing(predictor, tmp_path):
    out = tmp_path / "none"
    with pytest.raises(ValueError, match="threshold"):
        write_sheets(predictor, "test_shapes_val", str(out), threshold=1.5)
    with pytest.raises(ValueError, match="max_detections"):
        write_sheets(predictor, "test_shapes_val", str(out), max_detections=0)
    with pytest.raises(ValueError, match="num_images"):
        write_sheets(predictor, "test_shapes_val", str(out), num_images=-1)
    with pytest.raises(ValueError, match="nothing to draw"):
        write_sheets(predictor, "test_shapes_val", str(out), num_images=0)
    with pytest.raises(ValueError, match="table_rows"):
        write_sheets(predictor, "test_shapes_val", str(out), num_images=1, table_rows=["AP 3"])
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        write_sheets(predictor, "test_shapes_val", str(out), num_images=1, photos=[str(tmp_path / "nope.jpg")])
    assert not out.exists()


def test_retrieval_rank_by_hand():
    texts = ["a", "b", "c", "d"]
    sim = torch.tensor([0.1, 0.9, 0.5, 0.5])
    assert retrieval_rank(sim, texts, ["c"]) == (2, 2)  # only "b" (false) scores higher; the tie "d" does not count
    assert retrieval_rank(sim, texts, ["b", "a"]) == (1, 1)
    assert retrieval_rank(sim, texts, ["a"]) == (4, 0)
    with pytest.raises(ValueError, match="none of the image's captions"):
        retrieval_rank(sim, texts, ["e"])
    with pytest.raises(ValueError, match=r"\(4,\)"):
        retrieval_rank(sim[:3], texts, ["a"])


def test_upscale_instances():
    from detectron2.structures import Boxes, Instances

    inst = Instances((2, 3), pred_boxes=Boxes(torch.tensor([[0.0, 1.0, 2.0, 2.0]])), scores=torch.tensor([0.7]),
                     pred_classes=torch.tensor([1]), pred_masks=torch.tensor([[[1, 0, 0], [0, 1, 1]]], dtype=torch.bool))
    big = upscale_instances(inst, 4)
    assert big.image_size == (8, 12)
    assert big.pred_boxes.tensor.tolist() == [[0.0, 4.0, 8.0, 8.0]]
    assert big.pred_masks.shape == (1, 8, 12) and int(big.pred_masks.sum()) == 3 * 16
    assert bool(big.pred_masks[0, :4, :4].all()) and not bool(big.pred_masks[0, :4, 4:].any())


def test_classify_defaults_to_the_stored_class_names(predictor, monkeypatch):
    photo = skimage.data.coffee()
    assert predictor.class_names() == SHAPES == predictor.class_names("instance_segmentation")
    stored = predictor.classify([photo, skimage.data.astronaut()])
    given = predictor.classify([photo, skimage.data.astronaut()], list(SHAPES))
    for a, b in zip(stored, given):
        assert a["label"] in SHAPES and a["scores"].shape == (len(SHAPES),)
        assert a["label"] == b["label"]
        torch.testing.assert_close(a["scores"], b["scores"])
    with pytest.raises(ValueError, match="non-empty list of class_names"):
        predictor.classify(photo, [])
    with pytest.raises(ValueError, match="must be a list of class names"):
        predictor.classify(photo, "circle")
    with pytest.raises(ValueError, match="kind must be"):
        predictor.class_names("captioning")

    task = predictor.model.tasks["CLS"]
    monkeypatch.setattr(task, "spec", dataclasses.replace(task.spec, class_names=()))
    with pytest.raises(ValueError, match=r"stores none for its classification task CLS .*pass class_names"):
        predictor.classify(photo)
    assert predictor.classify(photo, ["cup", "cat"])["label"] in ("cup", "cat")  # given names still work
