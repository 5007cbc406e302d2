"""cfg.MODEL.CHANNELS_LAST: ``prepare_for_inference`` stores the backbone's and the proposal
network's conv weights NHWC, and the padded image batch follows them; the model's constructor
leaves the layout alone. The layout must not change what the model computes: the same weights
in NHWC and NCHW give the same eval outputs and the same training losses and gradients up to
float32 rounding, and checkpoints move freely between the two."""
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

from conftest import add_task, tiny_cfg
from up2.modeling.inference import prepare_for_inference
from up2.modeling.tasks import resolve_task_data
from up2.modeling.token_attributes import Modality, input_modalities

CL = torch.channels_last


def _cfg(channels_last: bool):
    cfg = tiny_cfg(task_type=None)
    add_task(cfg, "SEG", "instance_segmentation", "test_shapes_train", "test_shapes_val")
    add_task(cfg, "DET", "detection", "test_shapes_train", "test_shapes_val")
    add_task(cfg, "CLS", "classification", "test_shapes_cls_train", "test_shapes_cls_val")
    cfg.MODEL.CHANNELS_LAST = channels_last
    return resolve_task_data(cfg)


def _build(channels_last: bool, seed: int):
    """A model in training mode whose conv weights are NHWC (``channels_last``, converted by
    ``prepare_for_inference``'s channels-last rewrite alone) or NCHW."""
    torch.manual_seed(seed)
    model = build_model(_cfg(channels_last))
    _assert_layout(model, False)  # the constructor does not convert
    return prepare_for_inference(model, ["channels_last"]).train()


@pytest.fixture(scope="module")
def pair(shapes_datasets):
    """(channels-last model, contiguous model) with the same weights."""
    nhwc = _build(True, seed=0)
    # the box heads' last layers start at zero (boxes = anchors, whatever the image): give
    # them weights so that the compared boxes depend on the features
    with torch.no_grad():
        dec = nhwc.proposal_network.decoder
        for mlp in (dec.box_head, dec.enc_box):
            mlp.layers[-1].weight.normal_(0, 0.02)
            mlp.layers[-1].bias.normal_(0, 0.02)
    nchw = _build(False, seed=1)
    nchw.load_state_dict(nhwc.state_dict())
    for (name, a), b in zip(nhwc.state_dict().items(), nchw.state_dict().values()):
        assert torch.equal(a, b), name
    return nhwc, nchw


def _conv_weights(model):
    """(name, parameter) of every 4-D parameter of the backbone and the proposal network."""
    return [(f"{part}.{n}", p) for part in ("backbone", "proposal_network")
            for n, p in getattr(model, part).named_parameters() if p.dim() == 4]


def _images(seed=0):
    """Two random uint8 images of different sizes (so the batch is padded); the first one has
    an original size different from its (resized) input size."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, (3, 64, 48), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 40, 64), generator=g, dtype=torch.uint8)
    return [{"image": a, "height": 80, "width": 60}, {"image": b}]


def _assert_layout(model, channels_last: bool):
    weights = _conv_weights(model)
    assert len(weights) > 10
    for name, p in weights:
        if channels_last:
            assert p.is_contiguous(memory_format=CL), name
        else:
            assert p.is_contiguous(), name
    # 1x1 convs are both; the 3x3 / 7x7 ones tell the two layouts apart
    other = [n for n, p in weights if not p.is_contiguous(memory_format=torch.contiguous_format if channels_last else CL)]
    assert len(other) >= 10, other


def test_conv_weights_and_image_batch_layout(pair):
    nhwc, nchw = pair
    assert nhwc.channels_last is True and nchw.channels_last is False
    _assert_layout(nhwc, True)
    _assert_layout(nchw, False)
    inputs = _images()
    img_a, pad_a = nhwc.preprocess_image(inputs)
    img_b, pad_b = nchw.preprocess_image(inputs)
    assert img_a.tensor.shape == (2, 3, 64, 64) and img_a.image_sizes == img_b.image_sizes == [(64, 48), (40, 64)]
    assert img_a.tensor.is_contiguous(memory_format=CL) and not img_a.tensor.is_contiguous()
    assert img_b.tensor.is_contiguous() and not img_b.tensor.is_contiguous(memory_format=CL)
    assert torch.equal(img_a.tensor, img_b.tensor) and torch.equal(pad_a, pad_b)
    assert pad_a[0, :, 48:].all() and pad_a[1, 40:].all() and not pad_a[0, :64, :48].any()
    # the feature maps stay NHWC through the backbone (no layout copies in between)
    with torch.no_grad():
        feats = nhwc.backbone(img_a.tensor)
    assert feats and all(f.is_contiguous(memory_format=CL) and not f.is_contiguous() for f in feats.values())


def test_only_prepare_for_inference_converts(shapes_datasets):
    torch.manual_seed(0)
    model = build_model(_cfg(True))
    _assert_layout(model, False)
    images, _ = model.preprocess_image(_images())
    assert images.tensor.is_contiguous() and not images.tensor.is_contiguous(memory_format=CL)
    assert prepare_for_inference(model) is model and not model.training
    _assert_layout(model, True)
    images, _ = model.preprocess_image(_images())
    assert images.tensor.is_contiguous(memory_format=CL) and not images.tensor.is_contiguous()
    prepare_for_inference(model)  # idempotent
    _assert_layout(model, True)


def test_default_config_is_channels_last():
    from detectron2.config import get_cfg

    from up2 import add_up2_config

    cfg = get_cfg()
    add_up2_config(cfg)
    assert cfg.MODEL.CHANNELS_LAST is True


def _close(a, b, what, rtol=1e-4, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def test_image_encoding_matches(pair):
    """Backbone features, proposals and image tokens agree to float32 rounding."""
    nhwc, nchw = pair
    nhwc.eval()
    nchw.eval()
    inputs = _images()
    with torch.no_grad():
        ea = nhwc.encode_image(inputs, input_modalities(Modality.IMAGE))
        eb = nchw.encode_image(inputs, input_modalities(Modality.IMAGE))
        fa = nhwc.backbone(ea.images.tensor)
        fb = nchw.backbone(eb.images.tensor)
    for k in fa:
        scale = fb[k].abs().max().item()
        _close(fa[k], fb[k], f"backbone {k}", atol=1e-5 * scale)
    pa, pb = ea.proposals, eb.proposals
    _close(pa.objectness, pb.objectness, "objectness", atol=1e-5)
    _close(pa.boxes, pb.boxes, "boxes", atol=1e-6)
    _close(pa.sem, pb.sem, "sem", atol=1e-5 * pb.sem.abs().max().item())
    _close(pa.masks_of(), pb.masks_of(), "mask logits", atol=1e-4)
    assert torch.equal(ea.tokens.regional_index, eb.tokens.regional_index)
    tokens = eb.tokens.batch.tokens
    _close(ea.tokens.batch.tokens, tokens, "image tokens", atol=1e-5 * tokens.abs().max().item())


@pytest.mark.parametrize("task", ["SEG", "DET"])
def test_detection_outputs_match(pair, task):
    nhwc, nchw = pair
    nhwc.eval()
    nchw.eval()
    inputs = _images()
    with torch.no_grad():
        out_a = nhwc(inputs, task=task)
        out_b = nchw(inputs, task=task)
    assert len(out_a) == len(out_b) == 2
    for i, (a, b) in enumerate(zip(out_a, out_b)):
        a, b = a["instances"], b["instances"]
        assert a.image_size == b.image_size == ((80, 60) if i == 0 else (40, 64))
        assert len(a) == len(b) > 0
        assert torch.equal(a.pred_classes, b.pred_classes)
        # untrained scores are small (~1e-3): relative tolerance
        _close(a.scores, b.scores, f"image {i} scores", rtol=1e-4, atol=1e-7)
        _close(a.pred_boxes.tensor, b.pred_boxes.tensor, f"image {i} boxes", rtol=1e-4, atol=1e-4)
        if task == "SEG":
            assert a.pred_masks.shape == b.pred_masks.shape == (len(a), *a.image_size)
            agree = (a.pred_masks == b.pred_masks).float().mean().item()
            assert agree >= 0.999, f"image {i}: masks agree on {agree:.6f} of the pixels"
            assert a.pred_masks.any() and not a.pred_masks.all()
        else:
            assert not a.has("pred_masks")
    # the two images really give different results (the comparison is not of constants)
    assert not torch.allclose(out_a[0]["instances"].scores, out_a[1]["instances"].scores)


def test_classification_outputs_match(pair):
    nhwc, nchw = pair
    nhwc.eval()
    nchw.eval()
    inputs = _images()
    with torch.no_grad():
        out_a = nhwc(inputs, task="CLS")
        out_b = nchw(inputs, task="CLS")
    for i, (a, b) in enumerate(zip(out_a, out_b)):
        _close(a["pred_class_scores"], b["pred_class_scores"], f"image {i} class probabilities", rtol=1e-4, atol=1e-6)
        assert a["pred_class"] == b["pred_class"]
    assert not torch.equal(out_a[0]["pred_class_scores"], out_a[1]["pred_class_scores"])


def _differs_from(model, reference):
    ref = reference.state_dict()
    return any(not torch.equal(p, ref[n]) for n, p in _conv_weights(model))


@pytest.mark.parametrize("source_channels_last", [True, False], ids=["nhwc_to_nchw", "nchw_to_nhwc"])
def test_checkpoint_round_trip_keeps_the_destination_layout(pair, tmp_path, source_channels_last):
    source = pair[0] if source_channels_last else pair[1]
    DetectionCheckpointer(source, save_dir=str(tmp_path)).save("model")
    dest = _build(not source_channels_last, seed=2)
    assert _differs_from(dest, source)  # the load below must really change the weights
    DetectionCheckpointer(dest).load(str(tmp_path / "model.pth"))
    src = source.state_dict()
    got = dest.state_dict()
    assert set(got) == set(src)
    for name, t in got.items():
        assert torch.equal(t, src[name]), name
    _assert_layout(dest, not source_channels_last)


def _train_inputs(seed=0):
    """Two padded training images with hand-made boxes, classes and masks."""

    def instances(h, w, boxes, classes):
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.tensor(classes)
        m = torch.zeros(len(boxes), h, w, dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            m[k, y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(m)
        return inst

    a, b = (x["image"] for x in _images(seed))
    return [{"image": a, "instances": instances(64, 48, [[4, 6, 30, 40], [20, 30, 46, 60]], [0, 2])},
            {"image": b, "instances": instances(40, 64, [[10, 5, 50, 35]], [1])}]


def _train_step(model, inputs, seed=0):
    """Losses and gradients of one training forward / backward (no optimizer step). Denoising
    noise and the matcher's / mask loss's point sampling draw from torch's global generator:
    it is seeded identically before each forward."""
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        torch.manual_seed(seed)
        losses = model(inputs, task="SEG")
        sum(losses.values()).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return {k: v.detach() for k, v in losses.items()}, grads


def test_training_step_matches_contiguous_model(pair):
    nhwc, nchw = pair
    inputs = _train_inputs()
    loss_a, grad_a = _train_step(nhwc, inputs)
    # precondition: with a fixed seed the training forward is reproducible, so the two layouts
    # can be compared value by value
    loss_a2, grad_a2 = _train_step(nhwc, inputs)
    assert all(torch.equal(loss_a[k], loss_a2[k]) for k in loss_a), "training forward not reproducible"
    assert all(torch.equal(grad_a[n], grad_a2[n]) for n in grad_a), "training backward not reproducible"

    loss_b, grad_b = _train_step(nchw, inputs)
    assert set(loss_a) == set(loss_b) and {"loss_class", "loss_mask", "loss_box"} <= set(loss_a)
    for k in loss_a:
        assert torch.isfinite(loss_a[k]), k
        _close(loss_a[k], loss_b[k], k, rtol=1e-5, atol=1e-7)
    assert set(grad_a) == set(grad_b)
    assert {n for n, _ in _conv_weights(nhwc)} <= set(grad_a)  # every conv weight got a gradient
    # Per parameter, relative to the gradient's norm: |ga - gb| <= 1e-5 |gb| (element by element
    # 1e-5 is too tight for float32: a stem-conv entry of a long sum differs by ~1.5e-5 of itself).
    # The absolute floor (1e-6 of the largest gradient norm) only matters for gradients that are
    # mathematically zero and hold rounding noise (the biases right before GroupNorm, the
    # attention key biases of the text encoder: ~1e-7 and below).
    floor = 1e-6 * max(g.norm().item() for g in grad_b.values())
    for n in grad_a:
        assert torch.isfinite(grad_a[n]).all(), n
        diff, ref = (grad_a[n] - grad_b[n]).double().norm().item(), grad_b[n].double().norm().item()
        assert diff <= 1e-5 * ref + floor, f"grad {n}: |diff| {diff:.3g} vs |grad| {ref:.3g}"
    # the layouts really differ in the backward too: conv-weight gradients come back NHWC
    stem = "backbone.stem.conv1.weight"
    assert grad_a[stem].is_contiguous(memory_format=CL) and grad_b[stem].is_contiguous()
