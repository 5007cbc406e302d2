"""Mask pasting (``up2.layers.paste_masks``, behind ``DetectionTask.paste_masks``) against the
one-shot computation it replaced: bilinear upsampling of all K masks to the padded size, crop,
bilinear resize to the original size (skipped when it equals the resized size), threshold at 0.
Both paths: PyTorch (chunked ``F.interpolate``, bit-exact) and the compiled CPU kernel (the same
masks up to float rounding: only pixels whose value is within 1e-5 of 0 may differ)."""
import pytest
import torch
import torch.nn.functional as F

from up2.layers import cpp_library
from up2.layers import paste_masks as pm
from up2.layers.paste_masks_library import PASTE_LIBRARY
from up2.modeling.tasks.detection import DetectionTask

PADDED = (64, 96)  # Hp, Wp
SIZE = (50, 90)  # resized image inside the padding
LOGITS_HW = (16, 24)  # stride 4


def _reference_values(logits, size, padded, out):
    """All K masks in one interpolate call, written out independently of paste_masks (float)."""
    h, w = size
    m = F.interpolate(logits[None].float(), size=padded, mode="bilinear", align_corners=False)[:, :, :h, :w]
    if tuple(out) != tuple(size):
        m = F.interpolate(m, size=out, mode="bilinear", align_corners=False)
    return m[0]


def _reference(logits, size, padded, out):
    return _reference_values(logits, size, padded, out) > 0


@pytest.fixture(scope="module")
def kernel():
    if not pm.compiled_paste_available():
        if not cpp_library.compiler_available():
            pytest.skip("no C++ compiler / ninja on PATH: the compiled kernels cannot be built")
        PASTE_LIBRARY.build()
    assert pm.compiled_paste_available(), "the compiled library was built but paste_positive does not load"


@pytest.fixture(params=["pytorch", "compiled"])
def path(request):
    if request.param == "compiled":
        request.getfixturevalue("kernel")
    return request.param


def _paste(path, logits, size, padded, out, **kw):
    return pm.paste_masks(logits, size, padded, out, compiled=path == "compiled", **kw)


def _assert_same_masks(path, got, logits, size, padded, out):
    want = _reference(logits, size, padded, out)
    assert got.dtype == torch.bool and got.shape == want.shape
    if path == "pytorch":
        assert torch.equal(got, want)
        return
    differ = got != want  # the kernel composes the resizes without rounding in between
    near_zero = _reference_values(logits, size, padded, out).abs() < 1e-5
    assert not bool((differ & ~near_zero).any())
    assert int(differ.sum()) <= max(1, want.numel() // 100000)


def _logits(k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, *LOGITS_HW, generator=g).to(dtype)


K = 7  # not a multiple of 3 or 4


@pytest.mark.parametrize("out", [SIZE, (100, 180), (37, 61), (50, 45), (1, 1)],
                         ids=["same", "up", "down", "mixed", "one-pixel"])
@pytest.mark.parametrize("chunk", [1, 3, 4, K, K + 5])
def test_equals_one_shot_reference(path, chunk, out):
    logits = _logits(K)
    got = _paste(path, logits, SIZE, PADDED, out, chunk=chunk)
    assert got.shape == (K, *out)
    _assert_same_masks(path, got, logits, SIZE, PADDED, out)
    if out != (1, 1):  # a real test: both foreground and background pixels in every mask
        want = _reference(logits, SIZE, PADDED, out)
        assert want.flatten(1).any(1).all() and (~want).flatten(1).any(1).all()


@pytest.mark.parametrize("size, padded, out, logits_hw", [
    ((800, 1067), (800, 1088), (800, 1067), (200, 272)),  # the benchmark: one x4 resize
    ((800, 1067), (800, 1088), (480, 640), (200, 272)),  # a COCO photo: x4, crop, down to its size
    ((37, 23), (40, 32), (90, 11), (10, 8)),  # odd sizes, up in one axis and down in the other
])
def test_compiled_kernel_at_real_sizes(kernel, size, padded, out, logits_hw):
    g = torch.Generator().manual_seed(5)
    # smooth blobs, as trained masks are, plus noise: many boundary pixels
    logits = F.interpolate(torch.randn(1, 6, 4, 4, generator=g), size=logits_hw, mode="bilinear")[0]
    logits = logits + 0.3 * torch.randn(6, *logits_hw, generator=g)
    got = pm.paste_masks(logits, size, padded, out, compiled=True)
    _assert_same_masks("compiled", got, logits, size, padded, out)


def test_default_chunk_and_each_mask_is_independent(path):
    logits = _logits(K, seed=1)
    got = _paste(path, logits, SIZE, PADDED, (37, 61))
    _assert_same_masks(path, got, logits, SIZE, PADDED, (37, 61))
    # mask k pasted alone is mask k of the batch (no mixing between chunks or rows)
    for k in range(K):
        alone = _paste(path, logits[k : k + 1], SIZE, PADDED, (37, 61))
        assert torch.equal(alone[0], got[k])


def test_same_size_skips_the_identity_resize(path):
    """out == size: one interpolation only; a second same-size bilinear resize is the identity."""
    logits = _logits(K, seed=2)
    got = _paste(path, logits, SIZE, PADDED, SIZE, chunk=3)
    up = F.interpolate(logits[None], size=PADDED, mode="bilinear", align_corners=False)[0, :, : SIZE[0], : SIZE[1]]
    if path == "pytorch":  # the same F.interpolate, in chunks: bit for bit
        assert torch.equal(got, up > 0)
    else:  # the kernel's own arithmetic: only pixels within rounding of 0 may differ
        assert not bool(((got != (up > 0)) & (up.abs() >= 1e-5)).any())


def test_detection_task_uses_the_kernel_when_built(kernel, monkeypatch):
    logits = _logits(K, seed=6)
    calls = []
    real = torch.ops.up2_masks.paste_positive

    class Spy:
        def paste_positive(self, *args):
            calls.append(args[0].shape)
            return real(*args)

    monkeypatch.setattr(torch.ops, "up2_masks", Spy())
    got = DetectionTask.paste_masks(logits, SIZE, PADDED, (37, 61))
    assert calls == [logits.shape]
    _assert_same_masks("compiled", got, logits, SIZE, PADDED, (37, 61))


def test_resize_taps_rebuild_the_interpolation():
    """The taps, as a dense matrix, resample a signal as F.interpolate does (one and two resizes)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 1, 13, 1, generator=g, dtype=torch.float64)
    for size, out in ((40, None), (33, 70), (33, 9)):
        index, weight = pm.resize_taps(13, 52, size, out)
        dense = torch.zeros(index.shape[0], 13, dtype=torch.float64).scatter_add_(1, index, weight.double())
        y = F.interpolate(x, size=(52, 1), mode="bilinear", align_corners=False)[:, :, :size]
        if out is not None:
            y = F.interpolate(y, size=(out, 1), mode="bilinear", align_corners=False)
        torch.testing.assert_close(dense @ x[0, 0, :, 0], y[0, 0, :, 0], rtol=0, atol=1e-6)
        assert 1 <= index.shape[1] <= (2 if out is None else 4)  # bilinear: 2 taps per resize


def test_compiled_kernel_rejects_bad_taps(kernel):
    logits = _logits(2)
    index, weight = pm.resize_taps(LOGITS_HW[0], PADDED[0], SIZE[0], None)
    cindex, cweight = pm.resize_taps(LOGITS_HW[1], PADDED[1], SIZE[1], None)
    op = torch.ops.up2_masks.paste_positive
    with pytest.raises(RuntimeError, match="logits must be"):
        op(logits.double(), index, weight, cindex, cweight)
    with pytest.raises(RuntimeError, match="row_index values must be in"):
        op(logits, index + LOGITS_HW[0], weight, cindex, cweight)
    with pytest.raises(RuntimeError, match="col_weight must be float32"):
        op(logits, index, weight, cindex, cweight.double())


def test_compiled_true_without_the_kernel_raises(monkeypatch):
    monkeypatch.setattr(pm, "compiled_paste_available", lambda: False)
    with pytest.raises(RuntimeError, match="compiled kernel"):
        pm.paste_masks(_logits(1), SIZE, PADDED, SIZE, compiled=True)
    # auto falls back to PyTorch
    assert torch.equal(pm.paste_masks(_logits(1), SIZE, PADDED, SIZE), _reference(_logits(1), SIZE, PADDED, SIZE))


@pytest.mark.parametrize("out", [SIZE, (37, 61)])
def test_no_masks(path, out):
    got = _paste(path, torch.zeros(0, *LOGITS_HW), SIZE, PADDED, out)
    assert got.shape == (0, *out) and got.dtype == torch.bool


@pytest.mark.parametrize("out", [SIZE, (100, 180), (37, 61)])
@pytest.mark.parametrize("chunk", [1, 3, 4, K + 5])
def test_bf16_logits_are_pasted_in_float32(path, chunk, out):
    logits = _logits(K, seed=3, dtype=torch.bfloat16)
    got = _paste(path, logits, SIZE, PADDED, out, chunk=chunk)
    _assert_same_masks(path, got, logits.float(), SIZE, PADDED, out)


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
    outs = task.detections(logits, objectness, boxes, masks, images,
                            [{"height": 37, "width": 61}, {}])  # the second keeps its resized size
    scores = objectness.sigmoid()[..., None] * logits.softmax(-1)
    for i, (out, hw) in enumerate(zip(outs, [(37, 61), (64, 40)])):
        inst = out["instances"]
        _, flat = scores[i].flatten().topk(5)
        assert torch.equal(inst.pred_masks, DetectionTask.paste_masks(masks[i, flat // 2], images.image_sizes[i],
                                                                      PADDED, hw))
        path = "compiled" if pm.compiled_paste_available() else "pytorch"
        _assert_same_masks(path, inst.pred_masks, masks[i, flat // 2], images.image_sizes[i], PADDED, hw)


def test_bad_arguments_are_refused():
    logits = torch.randn(3, 8, 10)
    with pytest.raises(ValueError, match="chunk must be an int >= 1, got 0"):
        DetectionTask.paste_masks(logits, (30, 38), (32, 40), (30, 38), chunk=0)
    with pytest.raises(ValueError, match="must fit in the padded size"):
        pm.paste_masks(logits, (33, 38), (32, 40), (30, 38))
    with pytest.raises(ValueError, match="logits must be"):
        pm.paste_masks(logits[0], (30, 38), (32, 40), (30, 38))


@pytest.mark.parametrize("bad, match", [
    (dict(out=(0, 10)), "out must be two positive ints"),
    (dict(out=(37, 61, 3)), "out must be two positive ints"),
    (dict(out=(37.5, 61)), "out must be two positive ints"),
    (dict(size=(50.0, 90)), "size must be two positive ints"),
    (dict(out=(True, 61)), "out must be two positive ints"),
    (dict(out=37), "out must be two positive ints"),
    (dict(out=None), "out must be two positive ints"),
    (dict(chunk=True), "chunk must be an int"),
    (dict(logits=torch.zeros(2, 0, LOGITS_HW[1])), "Hm, Wm >= 1"),
    (dict(out=(torch.tensor(37.0), 61)), "out must be two positive ints"),
    (dict(out=(torch.tensor([37]), 61)), "out must be two positive ints"),
    (dict(size=(torch.tensor(50), 90)), "size must be two positive ints"),  # Python ints only
    (dict(chunk=2.5), "chunk must be an int"),
    (dict(logits=torch.zeros(2, *LOGITS_HW, dtype=torch.long)), "float"),
])
def test_paste_masks_rejects_bad_sizes_and_dtypes(bad, match):
    args = dict(logits=_logits(2), size=SIZE, padded=PADDED, out=(37, 61))
    args.update(bad)
    for compiled in (False, None):  # both paths check before computing anything
        with pytest.raises(ValueError, match=match):
            pm.paste_masks(args["logits"], args["size"], args["padded"], args["out"], chunk=args.get("chunk", 4),
                           compiled=compiled)
    with pytest.raises(ValueError, match="size <= padded"):
        pm.resize_taps(20, 80, -5, None)


def test_environment_picks_the_path(monkeypatch):
    """UP2_PASTE_PATH chooses the path when the caller does not; an explicit argument wins; a bad
    value or a compiled path that cannot run is an error naming the variable."""
    calls = []
    real = pm.F.interpolate

    def counting_interpolate(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pm.F, "interpolate", counting_interpolate)
    logits = _logits(2)
    ref = pm.paste_masks(logits, SIZE, PADDED, (37, 61), compiled=False)
    monkeypatch.setenv("UP2_PASTE_PATH", "pytorch")
    calls.clear()
    assert torch.equal(pm.paste_masks(logits, SIZE, PADDED, (37, 61)), ref)
    assert calls  # F.interpolate pasted the masks
    monkeypatch.setenv("UP2_PASTE_PATH", "bogus")
    with pytest.raises(ValueError, match="UP2_PASTE_PATH must be one of auto, pytorch, compiled"):
        pm.paste_masks(logits, SIZE, PADDED, (37, 61))
    assert torch.equal(pm.paste_masks(logits, SIZE, PADDED, (37, 61), compiled=False), ref)  # argument wins
    monkeypatch.setenv("UP2_PASTE_PATH", "compiled")
    if pm.compiled_paste_available():
        pm.paste_masks(logits, SIZE, PADDED, (37, 61), compiled=True)  # resize_taps caches its F.interpolate taps
        calls.clear()
        got = pm.paste_masks(logits, SIZE, PADDED, (37, 61))
        assert not calls  # the kernel, not F.interpolate
        _assert_same_masks("compiled", got, logits, SIZE, PADDED, (37, 61))
    else:
        with pytest.raises(RuntimeError, match="UP2_PASTE_PATH=pytorch"):
            pm.paste_masks(logits, SIZE, PADDED, (37, 61))


def test_environment_without_the_kernel(monkeypatch):
    """No built kernel: auto falls back to F.interpolate; compiled (environment or argument) raises."""
    monkeypatch.setattr(pm, "compiled_paste_available", lambda: False)
    logits = _logits(2)
    ref = pm.paste_masks(logits, SIZE, PADDED, (37, 61), compiled=False)
    for value in ("auto", "", " Auto "):
        monkeypatch.setenv("UP2_PASTE_PATH", value)
        assert torch.equal(pm.paste_masks(logits, SIZE, PADDED, (37, 61)), ref)
    monkeypatch.setenv("UP2_PASTE_PATH", "compiled")
    with pytest.raises(RuntimeError, match="UP2_PASTE_PATH=pytorch or compiled=False"):
        pm.paste_masks(logits, SIZE, PADDED, (37, 61))
    monkeypatch.delenv("UP2_PASTE_PATH")
    with pytest.raises(RuntimeError, match="needs CPU tensors and the built library"):
        pm.paste_masks(logits, SIZE, PADDED, (37, 61), compiled=True)
