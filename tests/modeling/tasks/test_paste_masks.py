"""DetectionTask.paste_masks (chunked mask pasting) against the one-shot computation it replaced:
bilinear upsampling of all K masks to the padded size, crop, bilinear resize to the original
size (skipped when it equals the resized size), threshold at 0."""
import pytest
import torch
import torch.nn.functional as F

from up2.modeling.tasks.detection import DetectionTask

PADDED = (64, 96)  # Hp, Wp
SIZE = (50, 90)  # resized image inside the padding
LOGITS_HW = (16, 24)  # stride 4


def _reference(logits, size, padded, out):
    """All K masks in one interpolate call, written out independently of paste_masks."""
    h, w = size
    m = F.interpolate(logits[None].float(), size=padded, mode="bilinear", align_corners=False)[:, :, :h, :w]
    if tuple(out) != tuple(size):
        m = F.interpolate(m, size=out, mode="bilinear", align_corners=False)
    return (m > 0)[0]


def _logits(k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, *LOGITS_HW, generator=g).to(dtype)


K = 7  # not a multiple of 3 or 4


@pytest.mark.parametrize("out", [SIZE, (100, 180), (37, 61), (50, 45)], ids=["same", "up", "down", "mixed"])
@pytest.mark.parametrize("chunk", [1, 3, 4, K, K + 5])
def test_equals_one_shot_reference(chunk, out):
    logits = _logits(K)
    got = DetectionTask.paste_masks(logits, SIZE, PADDED, out, chunk=chunk)
    want = _reference(logits, SIZE, PADDED, out)
    assert got.dtype == torch.bool and got.shape == (K, *out)
    assert torch.equal(got, want)
    # a real test: both foreground and background pixels in every mask
    assert want.flatten(1).any(1).all() and (~want).flatten(1).any(1).all()


def test_default_chunk_and_each_mask_is_independent():
    logits = _logits(K, seed=1)
    got = DetectionTask.paste_masks(logits, SIZE, PADDED, (37, 61))
    assert torch.equal(got, _reference(logits, SIZE, PADDED, (37, 61)))
    # mask k pasted alone is mask k of the batch (no mixing between chunks)
    for k in range(K):
        alone = DetectionTask.paste_masks(logits[k : k + 1], SIZE, PADDED, (37, 61))
        assert torch.equal(alone[0], got[k])


def test_same_size_skips_the_identity_resize():
    """out == size: one interpolation only; a second same-size bilinear resize is the identity."""
    logits = _logits(K, seed=2)
    got = DetectionTask.paste_masks(logits, SIZE, PADDED, SIZE, chunk=3)
    up = F.interpolate(logits[None], size=PADDED, mode="bilinear", align_corners=False)[0, :, : SIZE[0], : SIZE[1]]
    assert torch.equal(got, up > 0)


@pytest.mark.parametrize("out", [SIZE, (37, 61)])
def test_no_masks(out):
    got = DetectionTask.paste_masks(torch.zeros(0, *LOGITS_HW), SIZE, PADDED, out)
    assert got.shape == (0, *out) and got.dtype == torch.bool


@pytest.mark.parametrize("out", [SIZE, (100, 180), (37, 61)])
@pytest.mark.parametrize("chunk", [1, 3, 4, K + 5])
def test_bf16_logits_are_pasted_in_float32(chunk, out):
    logits = _logits(K, seed=3, dtype=torch.bfloat16)
    got = DetectionTask.paste_masks(logits, SIZE, PADDED, out, chunk=chunk)
    assert got.dtype == torch.bool
    assert torch.equal(got, _reference(logits.float(), SIZE, PADDED, out))


def test_postprocess_masks_are_paste_masks():
    """InstanceSegmentationTask.postprocess hands the top-k proposals' logits to paste_masks
    with the image's resized, padded and original sizes."""
    from detectron2.structures import ImageList

    from up2.modeling.tasks.base import TaskSpec
    from up2.modeling.tasks.detection import InstanceSegmentationTask

    spec = TaskSpec(name="DET", type="instance_segmentation", datasets_train=("x",), datasets_test=(),
                    ims_per_batch=2, loss_weight=1.0, class_names=("a", "b"))
    task = InstanceSegmentationTask(spec, test_topk=5)
    g = torch.Generator().manual_seed(4)
    r = 6
    images = ImageList(torch.zeros(2, 3, *PADDED), [SIZE, (64, 40)])
    logits = torch.randn(2, r, 2, generator=g)
    objectness = torch.randn(2, r, generator=g)
    boxes = torch.rand(2, r, 4, generator=g) * 0.5 + 0.25
    masks = torch.randn(2, r, *LOGITS_HW, generator=g)
    outs = task.postprocess(logits, objectness, boxes, masks, images,
                            [{"height": 37, "width": 61}, {}])  # the second keeps its resized size
    scores = objectness.sigmoid()[..., None] * logits.softmax(-1)
    for i, (out, hw) in enumerate(zip(outs, [(37, 61), (64, 40)])):
        inst = out["instances"]
        _, flat = scores[i].flatten().topk(5)
        want = _reference(masks[i, flat // 2], images.image_sizes[i], PADDED, hw)
        assert torch.equal(inst.pred_masks, want)


def test_chunk_below_one_is_refused():
    logits = torch.randn(3, 8, 10)
    with pytest.raises(ValueError, match="chunk must be >= 1, got 0"):
        DetectionTask.paste_masks(logits, (30, 38), (32, 40), (30, 38), chunk=0)
