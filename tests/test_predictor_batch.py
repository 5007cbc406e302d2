"""Batched inference of up2.predictor: GeneralistPredictor on lists of images and BatchPredictor
against detectron2's DefaultPredictor, one image at a time, on the same model."""
import numpy as np
import pytest
import skimage.data
import torch
from detectron2.engine import DefaultPredictor
from skimage.transform import resize

from conftest import add_task, tiny_cfg
from up2.predictor import BatchPredictor, GeneralistPredictor, group_by_padded_size

# With MIN_SIZE_TEST 64 / MAX_SIZE_TEST 128 and padding to 32: coffee, chelsea and rocket become
# 64x96 (padded 64x96); astronaut and camera 64x64 (padded 64x64); the small one 32x40 -> 64x80 (64x96).
NAMES = ("coffee", "astronaut", "chelsea", "camera", "rocket")


def _photos():
    photos = [getattr(skimage.data, n)() for n in NAMES]
    small = (resize(skimage.data.coffee(), (32, 40), anti_aliasing=True) * 255).astype(np.uint8)
    return photos + [small]


def _bgr(img):
    rgb = np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img[:, :, :3]
    return np.ascontiguousarray(rgb[:, :, ::-1])


@pytest.fixture(scope="module")
def cfg(shapes_datasets, tmp_path_factory):
    cfg = tiny_cfg(task_type=None, **{"INPUT.MIN_SIZE_TEST": 64, "INPUT.MAX_SIZE_TEST": 128})
    add_task(cfg, "DET", "instance_segmentation", "test_shapes_train", "test_shapes_val")
    add_task(cfg, "CLS", "classification", "test_shapes_cls_train", "test_shapes_cls_val")
    add_task(cfg, "CAP", "captioning", "test_shapes_caption_train", "test_shapes_caption_val",
             VOCABULARY="dataset", MAX_CAPTION_LENGTH=4)
    add_task(cfg, "RET", "retrieval", "test_shapes_caption_train", "test_shapes_caption_val")
    from detectron2.modeling import build_model

    from up2.modeling.tasks import resolve_task_data

    cfg = resolve_task_data(cfg)
    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("predictor_batch") / "model.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.freeze()
    return cfg


@pytest.fixture(scope="module")
def predictor(cfg):
    return GeneralistPredictor(cfg)


def _record_batches(model):
    sizes = []
    handle = model.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    return sizes, handle


def _assert_same_instances(a, b):
    assert a.image_size == b.image_size and len(a) == len(b)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=0.05, rtol=1e-3)  # pixels
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-4)
    assert torch.equal(a.pred_classes, b.pred_classes)
    if a.has("pred_masks"):
        assert (a.pred_masks != b.pred_masks).float().mean() < 1e-3


def test_group_by_padded_size_by_hand():
    sizes = [(64, 96), (64, 64), (60, 90), (64, 64), (65, 64), (64, 97), (33, 64)]
    assert group_by_padded_size(sizes, 32) == [[0, 2], [1, 3, 6], [4], [5]]
    assert group_by_padded_size(sizes, 0) == [[0], [1, 3], [2], [4], [5], [6]]  # no rounding: exact sizes


def test_batched_equals_one_by_one(predictor):
    photos = _photos()
    sizes, handle = _record_batches(predictor.model)
    try:
        seg = predictor.segment(photos, batch_size=4)
        assert sizes == [2, 2, 2]  # chunk 1: {coffee, chelsea} {astronaut, camera}; chunk 2: {rocket, small}
        sizes.clear()
        det = predictor.detect(photos, class_names=["cup", "cat", "rocket"], batch_size=6)
        assert sizes == [4, 2]
        cls = predictor.classify(photos, ["circle", "square", "star"], batch_size=3)
        caps = predictor.caption(photos, batch_size=6)
        sim = predictor.retrieve(photos, ["a red circle", "two squares"], batch_size=6)
    finally:
        handle.remove()
    assert len(seg) == len(det) == len(cls) == len(caps) == len(photos)
    for i, photo in enumerate(photos):
        _assert_same_instances(seg[i], predictor.segment(photo))
        assert seg[i].image_size == photo.shape[:2]  # in input order
        _assert_same_instances(det[i], predictor.detect(photo, class_names=["cup", "cat", "rocket"]))
        one = predictor.classify(photo, ["circle", "square", "star"])
        torch.testing.assert_close(cls[i]["scores"], one["scores"], atol=1e-5, rtol=1e-4)
        assert cls[i]["label"] == one["label"]
        assert caps[i] == predictor.caption(photo)
    torch.testing.assert_close(sim, predictor.retrieve(photos, ["a red circle", "two squares"], batch_size=1),
                               atol=1e-5, rtol=1e-4)


def test_single_image_and_bad_input(predictor):
    photo = skimage.data.coffee()
    assert not isinstance(predictor.segment(photo), list)
    assert isinstance(predictor.caption([photo]), list)
    with pytest.raises(ValueError, match="batch_size"):
        predictor.segment([photo], batch_size=0)
    with pytest.raises(ValueError, match="empty list"):
        predictor.classify([], ["a"])
    with pytest.raises(TypeError, match=r"images\[1\]"):
        predictor.segment([photo, 3])
    one = predictor.retrieve(photo, ["a red circle", "two squares"])  # one image: a (1, J) matrix
    assert one.shape == (1, 2)
    torch.testing.assert_close(one, predictor.retrieve([photo], ["a red circle", "two squares"]))
    with pytest.raises(ValueError, match=r"did you mean \['a red circle'\]"):
        predictor.retrieve([photo], "a red circle")  # not split into letters
    with pytest.raises(ValueError, match="non-empty strings"):
        predictor.retrieve([photo], ["a red circle", " "])


def test_batch_predictor_matches_default_predictor_up2(cfg):
    bp = BatchPredictor(cfg, batch_size=4)
    dp = DefaultPredictor(cfg)
    dp.model = bp.model
    images = [_bgr(p) for p in _photos()]
    sizes, handle = _record_batches(bp.model)
    try:
        outs = bp(images)
        assert sizes == [2, 2, 2]
        cls = bp(images, task="CLS", class_names=["circle", "square"])
    finally:
        handle.remove()
    assert isinstance(bp, DefaultPredictor) and len(outs) == len(images)
    for img, out, c in zip(images, outs, cls):
        _assert_same_instances(out["instances"], dp(img)["instances"])
        with torch.no_grad():
            ref = bp.model([bp.preprocess(img)], task="CLS", class_names=["circle", "square"])[0]
        torch.testing.assert_close(c["pred_class_scores"], ref["pred_class_scores"], atol=1e-5, rtol=1e-4)
    single = bp(images[0])
    assert isinstance(single, dict)
    _assert_same_instances(single["instances"], outs[0]["instances"])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        bp([images[0], images[0][:, :, 0]])
    with pytest.raises(ValueError, match="empty"):
        bp([])


def test_batch_predictor_matches_default_predictor_mask_rcnn():
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", 64,
                         "INPUT.MAX_SIZE_TEST", 128, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
                         "TEST.DETECTIONS_PER_IMAGE", 20, "MODEL.RESNETS.DEPTH", 18,  # R18: a faster test
                         "MODEL.RESNETS.RES2_OUT_CHANNELS", 64])
    torch.manual_seed(0)
    bp, dp = BatchPredictor(cfg, batch_size=1), DefaultPredictor(cfg)
    dp.model = bp.model
    images = [_bgr(p) for p in _photos()]
    ref = [dp(img)["instances"] for img in images]
    for out, r in zip(bp(images), ref):  # same preprocessing, same order: identical
        assert torch.equal(out["instances"].pred_boxes.tensor, r.pred_boxes.tensor)
        assert torch.equal(out["instances"].scores, r.scores)
    # Batched convolutions round differently and a random-weight Mask R-CNN amplifies that
    # through box regression and NMS, so batches are compared loosely.
    bp.batch_size = 8
    for out, r in zip(bp(images), ref):
        inst = out["instances"]
        assert inst.image_size == r.image_size and len(inst) == len(r)
        torch.testing.assert_close(inst.scores.sort().values, r.scores.sort().values, atol=1e-3, rtol=0)
