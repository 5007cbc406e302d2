"""UniPerceiverV2's public behaviour (``up2/modeling/meta_arch.py``): which task ``forward``
runs without ``task=``, errors for unknown tasks and malformed images, the training output (a
dict of finite scalar losses) and the eval output (one float32 result dict per input)."""
import pytest
import torch
from detectron2.structures import Boxes, Instances

from task_models import mapped_inputs, tiny_model

CLS = {"CLS": ("classification", {})}
CLS_RET = {"CLS": ("classification", {}), "RET": ("retrieval", {})}
DET_CLS = {"DET": ("instance_segmentation", {}), "CLS": ("classification", {})}


@pytest.fixture(scope="module")
def det_cls(shapes_datasets):
    """A detection + classification model (DET, the only localization task, is the default)."""
    return tiny_model(DET_CLS)


def _eval(model, inputs, **kw):
    model.eval()
    with torch.no_grad():
        return model(inputs, **kw)


def test_configured_default_task_runs_without_task(shapes_datasets):
    cfg, model = tiny_model(CLS_RET, default_task="RET")
    inputs = mapped_inputs(cfg, model, "RET", n=2)
    out = _eval(model, inputs)
    assert all({"image_embedding", "text_embeddings"} <= set(o) for o in out)  # retrieval's results


def test_the_only_task_is_the_default(shapes_datasets):
    cfg, model = tiny_model(CLS)
    out = _eval(model, mapped_inputs(cfg, model, "CLS", n=2))
    assert len(out) == 2 and all("pred_class_scores" in o for o in out)


def test_the_only_localization_task_is_the_default(det_cls):
    cfg, model = det_cls
    out = _eval(model, mapped_inputs(cfg, model, "DET", n=2))
    assert len(out) == 2 and all(isinstance(o.get("instances"), Instances) for o in out)


def test_ambiguous_default_asks_for_a_task(shapes_datasets):
    cfg, model = tiny_model(CLS_RET)  # two tasks, neither localization, no MODEL.DEFAULT_TASK
    inputs = mapped_inputs(cfg, model, "CLS", n=1)
    with pytest.raises(ValueError, match="task"):
        _eval(model, inputs)
    assert "pred_class_scores" in _eval(model, inputs, task="CLS")[0]  # naming the task works


def test_configured_default_must_be_a_task(shapes_datasets):
    with pytest.raises(ValueError, match="NOPE"):
        tiny_model(CLS_RET, default_task="NOPE")


def test_unknown_task_is_a_key_error(det_cls):
    cfg, model = det_cls
    inputs = mapped_inputs(cfg, model, "CLS", n=1)
    with pytest.raises(KeyError, match="NOPE"):
        _eval(model, inputs, task="NOPE")
    model.train()
    with pytest.raises(KeyError, match="NOPE"):
        model(inputs, task="NOPE")


def test_empty_batch_is_a_clear_error(det_cls):
    cfg, model = det_cls
    with pytest.raises(ValueError, match="empty batch"):
        _eval(model, [], task="CLS")


@pytest.mark.parametrize("image", [
    torch.zeros(4, 32, 32, dtype=torch.uint8),  # four channels
    torch.zeros(32, 32, 3, dtype=torch.uint8),  # HWC
    torch.zeros(32, 32, dtype=torch.uint8),  # grey
    torch.zeros(1, 3, 32, 32, dtype=torch.uint8),  # batched
    None,
])
def test_preprocess_image_rejects_non_chw_images(det_cls, image):
    _, model = det_cls
    good = {"image": torch.zeros(3, 32, 32, dtype=torch.uint8)}
    with pytest.raises(ValueError, match=r"input 1: 'image' must be a \(3, H, W\) tensor"):
        model.preprocess_image([good, {"image": image}])
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        _eval(model, [{"image": image, "height": 32, "width": 32}], task="CLS")


def test_preprocess_image_pads_and_masks(det_cls):
    _, model = det_cls
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in ((40, 64), (64, 30))]
    images, pad = model.preprocess_image([{"image": i} for i in imgs])
    n, c, hp, wp = images.tensor.shape
    assert (n, c) == (2, 3) and hp % model.size_divisibility == 0 and wp % model.size_divisibility == 0
    assert images.image_sizes == [(40, 64), (64, 30)] and pad.dtype == torch.bool and pad.shape == (2, hp, wp)
    for i, (h, w) in enumerate(images.image_sizes):
        assert not pad[i, :h, :w].any() and pad[i].sum() == hp * wp - h * w


@pytest.mark.parametrize("task", ["DET", "CLS"])
def test_training_returns_finite_scalar_losses(det_cls, task):
    cfg, model = det_cls
    torch.manual_seed(0)
    inputs = mapped_inputs(cfg, model, task, n=2, is_train=True)
    model.train()
    losses = model(inputs, task=task)
    assert isinstance(losses, dict) and losses
    for name, v in losses.items():
        assert name.startswith("loss") and isinstance(v, torch.Tensor) and v.dim() == 0, (name, v)
        assert torch.isfinite(v), name
    assert sum(losses.values()).requires_grad  # something to train


def _float_tensors(x):
    """Every floating-point tensor inside a result (dicts, lists, Instances, Boxes)."""
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if isinstance(x, Boxes):
        return _float_tensors(x.tensor)
    if isinstance(x, Instances):
        return [t for v in x.get_fields().values() for t in _float_tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _float_tensors(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _float_tensors(v)]
    return []


@pytest.mark.parametrize("task", ["DET", "CLS"])
def test_eval_returns_one_float32_result_per_input(det_cls, task):
    cfg, model = det_cls
    inputs = mapped_inputs(cfg, model, task, n=3)
    out = _eval(model, inputs, task=task)
    assert isinstance(out, list) and len(out) == len(inputs) and all(isinstance(o, dict) for o in out)
    tensors = _float_tensors(out)
    assert tensors and all(t.dtype == torch.float32 for t in tensors)
