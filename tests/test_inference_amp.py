"""cfg.TEST.AMP: eval-mode forwards under bf16 autocast return float32 results close to the
float32 model's, the target-set cache keeps one entry per precision, and a bad dtype is an error."""
import copy

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from conftest import add_task, tiny_cfg
from up2.modeling.tasks import resolve_task_data
from up2.predictor import GeneralistPredictor


@pytest.fixture(scope="module")
def predictors(shapes_datasets, tmp_path_factory):
    """The same weights twice: float32 and TEST.AMP bf16."""
    cfg = tiny_cfg(task_type=None)
    add_task(cfg, "DET", "instance_segmentation", "test_shapes_train", "test_shapes_val")
    add_task(cfg, "CLS", "classification", "test_shapes_cls_train", "test_shapes_cls_val")
    add_task(cfg, "RET", "retrieval", "test_shapes_caption_train", "test_shapes_caption_val")
    add_task(cfg, "CAP", "captioning", "test_shapes_caption_train", "test_shapes_caption_val",
             VOCABULARY="dataset", MAX_CAPTION_LENGTH=4)
    cfg = resolve_task_data(cfg)
    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("amp") / "model.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    cfg.MODEL.WEIGHTS = str(weights)
    amp = copy.deepcopy(cfg)
    amp.TEST.AMP.ENABLED = True
    return GeneralistPredictor(cfg), GeneralistPredictor(amp)


def _photo():
    return np.ascontiguousarray(skimage.data.chelsea()[:, :, ::-1])  # BGR, as DefaultPredictor takes


def _float_fields(instances):
    return [v.tensor if hasattr(v, "tensor") else v for v in instances.get_fields().values()]


def test_results_are_float32_and_close_to_float32_model(predictors):
    fp32, bf16 = predictors
    assert fp32.model.inference_amp is None and bf16.model.inference_amp is torch.bfloat16
    photo = _photo()
    names = ["cat", "dog", "square"]
    for a, b in ((fp32.segment(photo, class_names=names), bf16.segment(photo, class_names=names)),):
        assert len(a) == len(b)
        for field in _float_fields(b):
            assert field.dtype in (torch.float32, torch.bool, torch.int64), field.dtype
        assert b.pred_masks.dtype == torch.bool
    p32 = fp32.classify(photo, names)
    p16 = bf16.classify(photo, names)
    assert p16["scores"].dtype == torch.float32
    # bf16 keeps 8 mantissa bits: probabilities agree to a few 1e-2
    torch.testing.assert_close(p16["scores"], p32["scores"], atol=3e-2, rtol=0)
    s32 = fp32.retrieve([photo, photo[::2, ::2]], ["a cat", "a red square"])
    s16 = bf16.retrieve([photo, photo[::2, ::2]], ["a cat", "a red square"])
    assert s16.dtype == torch.float32
    torch.testing.assert_close(s16, s32, atol=3e-2, rtol=0)


def test_autocast_really_runs_in_bf16(predictors):
    _, bf16 = predictors
    seen = []
    handle = bf16.model.unified_decoder.register_forward_hook(lambda m, i, o: seen.append(o.features.dtype))
    try:
        bf16.classify(_photo(), ["cat", "dog"])
    finally:
        handle.remove()
    assert torch.bfloat16 in seen


def test_target_cache_is_per_precision(predictors):
    """Switching the precision of one model must not hand a bf16 cached target set to a
    float32 forward (or the reverse)."""
    fp32, _ = predictors
    model = fp32.model
    photo = _photo()
    names = ["cat", "dog", "hexagon"]
    first = fp32.classify(photo, names)["scores"]
    model.inference_amp = torch.bfloat16
    try:
        amp = fp32.classify(photo, names)["scores"]
    finally:
        model.inference_amp = None
    again = fp32.classify(photo, names)["scores"]
    torch.testing.assert_close(again, first)  # float32 again: the float32 entry, exactly
    assert amp.dtype == torch.float32 and not torch.equal(amp, first)
    keys = [k for k in model.target_cache._store if k[3:] == tuple(names)]  # (precision, "texts", family, *names)
    assert sorted(k[0] for k in keys) == ["torch.bfloat16", "torch.float32"]


def test_training_ignores_inference_amp(predictors):
    _, bf16 = predictors
    model = bf16.model
    assert isinstance(model.inference_autocast(), type(torch.autocast("cpu")))
    model.train()
    try:
        with model.inference_autocast():
            assert not torch.is_autocast_enabled("cpu")
    finally:
        model.eval()


def test_bad_dtype_is_a_clear_error(shapes_datasets):
    cfg = resolve_task_data(tiny_cfg())
    cfg.TEST.AMP.ENABLED = True
    cfg.TEST.AMP.DTYPE = "int8"
    with pytest.raises(ValueError, match=r"TEST\.AMP\.DTYPE.*'int8'"):
        build_model(cfg)


def test_float32_results_walks_instances():
    from detectron2.structures import Boxes, Instances

    from up2.modeling.meta_arch import _float32_results

    inst = Instances((4, 5), pred_boxes=Boxes(torch.ones(2, 4, dtype=torch.bfloat16)),
                     scores=torch.tensor([0.5, 0.25], dtype=torch.float16), pred_classes=torch.tensor([1, 2]))
    out = _float32_results([{"instances": inst, "x": (torch.zeros(1, dtype=torch.bfloat16), "s")}])
    got = out[0]["instances"]
    assert got.pred_boxes.tensor.dtype == torch.float32 and got.scores.dtype == torch.float32
    assert got.pred_classes.dtype == torch.int64 and got.image_size == (4, 5)
    assert out[0]["x"][0].dtype == torch.float32 and out[0]["x"][1] == "s"
    assert F.mse_loss(got.scores, torch.tensor([0.5, 0.25])) == 0
