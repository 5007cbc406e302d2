"""projects/convert: timm Swin and torchvision ResNet checkpoints -> safetensors / .pth of tensors,
loaded by up2's checkpointer (MODEL.WEIGHTS), checked weight by weight and against the source
networks' outputs; pickles are neither written nor read without --allow-pickle."""
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling.backbone import build_resnet_backbone  # noqa: E402

from up2.checkpoint import PickleRefusedError, UP2Checkpointer  # noqa: E402
from up2.modeling.backbone.swin import D2SwinTransformer  # noqa: E402

CONVERT = Path(__file__).resolve().parents[2] / "projects" / "convert"
TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)
NAMES = ["res2", "res3", "res4", "res5"]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, CONVERT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


swin_cv = _script("convert_swin_timm")
resnet_cv = _script("convert_resnet_torchvision")


class Holder(nn.Module):
    """The smallest detectron2-style model: a backbone under ``.backbone``."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Random values in every parameter and float buffer (BN statistics included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.dim() == 1:  # norm weights
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (1.0 / t[0].numel()) ** 0.5)


def _timm_swin():
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=64, strict_img_size=False,
        always_partition=True, drop_path_rate=0.0, **TINY
    ).eval()
    _randomise(model)
    return model


def _our_swin():
    return Holder(
        D2SwinTransformer(model_name="swin_tiny_patch4_window7_224", out_features=NAMES, img_size=64, model_kwargs=TINY)
    ).eval()


@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
def test_swin_timm_roundtrip(tmp_path, ext):
    ref = _timm_swin()
    src = tmp_path / "timm_swin.pth"
    torch.save(ref.state_dict(), src)
    dst = tmp_path / f"d2{ext}"
    assert swin_cv.main(["--input", str(src), "--output", str(dst)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, dst.name])  # no temp file left

    if ext == ".pth":  # tensors only: readable without unpickling code
        assert torch.load(dst, weights_only=True)["__author__"] == "timm"
    model = _our_swin()
    UP2Checkpointer(model).load(str(dst))
    ours = model.state_dict()
    converted, dropped = swin_cv.convert_swin_state_dict(ref.state_dict())
    assert set(converted) == set(ours)  # nothing missing, nothing unexpected
    assert set(dropped) == {k for k in ref.state_dict() if k.startswith(("head.", "norm."))}
    ref_sd = ref.state_dict()
    for k, v in ours.items():
        src_key = re.sub(r"^backbone\.swin\.layers_(\d+)\.", r"layers.\1.", k).replace("backbone.swin.", "")
        assert torch.equal(v, ref_sd[src_key]), k

    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model.backbone(x)
        expected = ref.forward_intermediates(x, intermediates_only=True)
    for name, t in zip(NAMES, expected):
        torch.testing.assert_close(out[name], t)


def test_swin_microsoft_layout_matches_timm_layout():
    """An original Swin checkpoint (patch merging at the end of a stage, index buffers saved)
    converts to the same tensors as timm's layout."""
    sd = _timm_swin().state_dict()
    old = {}
    for k, v in sd.items():
        m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", k)
        old[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k] = v
    old["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    old["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    new, _ = swin_cv.convert_swin_state_dict(sd)
    from_old, dropped = swin_cv.convert_swin_state_dict(old)
    assert set(new) == set(from_old) and all(torch.equal(new[k], from_old[k]) for k in new)
    assert "layers.0.blocks.0.attn.relative_position_index" in dropped


def _d2_resnet50():
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["stem", "res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return Holder(build_resnet_backbone(cfg, ShapeSpec(channels=3))).eval()


def test_resnet_torchvision_roundtrip(tmp_path):
    tv = torchvision.models.resnet50(weights=None).eval()
    _randomise(tv, seed=1)
    src = tmp_path / "resnet50.pth"
    torch.save(tv.state_dict(), src)
    dst = tmp_path / "R-50.safetensors"
    assert resnet_cv.main(["--input", str(src), "--output", str(dst)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, dst.name])

    model = _d2_resnet50()
    UP2Checkpointer(model).load(str(dst))  # ResNet-relative keys: the metadata asks for name matching
    converted, dropped = resnet_cv.convert_resnet_state_dict(tv.state_dict())
    assert {"backbone." + k for k in converted} == set(model.state_dict())
    assert {"fc.weight", "fc.bias"} <= set(dropped)
    ours = model.state_dict()
    for k, v in converted.items():
        assert torch.equal(ours["backbone." + k], v), k

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model.backbone(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        expected = {"stem": y}
        for i, layer in enumerate([tv.layer1, tv.layer2, tv.layer3, tv.layer4]):
            y = layer(y)
            expected[f"res{i + 2}"] = y
    for name, t in expected.items():
        torch.testing.assert_close(out[name], t, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("script", [swin_cv, resnet_cv])
def test_bad_inputs_name_the_file(tmp_path, script):
    dst = tmp_path / "out.safetensors"
    missing = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        script.main(["--input", str(missing), "--output", str(dst)])
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth"):
        script.main(["--input", str(corrupt), "--output", str(dst)])
    foreign = tmp_path / "foreign.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="foreign.pth"):
        script.main(["--input", str(foreign), "--output", str(dst)])
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.pth", "foreign.pth"]


def test_resnet_unknown_key_is_named():
    sd = {"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.se.fc.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"layer1\.0\.se\.fc\.weight"):
        resnet_cv.convert_resnet_state_dict(sd)


class _RunsCode:
    """Unpickling this object writes a marker file (as a malicious checkpoint could run anything)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_converters_write_no_pickle_and_read_one_only_with_allow_pickle(tmp_path):
    import pickle

    from safetensors.torch import load_file

    with pytest.raises(ValueError, match=r"R-50.pkl.*expected a .safetensors or .pth file name"):
        resnet_cv.save_d2_checkpoint({"a": torch.zeros(1)}, tmp_path / "R-50.pkl", "torchvision", True)
    tv = torchvision.models.resnet18(weights=None).state_dict()
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as f:  # detectron2's model-zoo layout, plus an object that runs code when unpickled
        pickle.dump({"model": {k: v.numpy() for k, v in tv.items()}, "__author__": _RunsCode(marker)}, f)
    evil_pth = tmp_path / "evil.pth"
    torch.save({"model": tv, "extra": _RunsCode(marker)}, evil_pth)
    out = tmp_path / "R-18.safetensors"
    for src in (evil, evil_pth):
        with pytest.raises(PickleRefusedError, match=rf"{src.name}.*--allow-pickle"):
            resnet_cv.main(["--input", str(src), "--output", str(out)])
        assert not marker.exists() and not out.exists()  # nothing was unpickled, nothing written

    plain = tmp_path / "zoo.pkl"  # a trusted model-zoo pickle of numpy arrays converts with the opt-in
    with open(plain, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in tv.items()}, "__author__": "torchvision"}, f)
    assert resnet_cv.main(["--input", str(plain), "--output", str(out), "--allow-pickle"]) == 0
    converted, _ = resnet_cv.convert_resnet_state_dict(tv)
    written = load_file(str(out))
    assert set(written) == set(converted) and all(torch.equal(written[k], converted[k]) for k in converted)
