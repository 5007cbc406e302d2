"""The paper configs (configs/up2_*.yaml) parse, their task specs validate and the sampling ratios
normalise -- without the datasets on disk (up2 registers the paper's datasets lazily, the way
detectron2 registers COCO; nothing is read here)."""
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog

import up2  # noqa: F401
from conftest import REPO_ROOT
from up2 import add_up2_config
from up2.data.multitask import UnmixedTaskSampler
from up2.modeling.tasks import check_datasets_registered, resolve_task_data, task_specs_from_config

R50_TASKS = {"DETECTION": "detection", "CLASSIFICATION": "classification", "RETRIEVAL": "retrieval",
             "CAPTIONING": "captioning"}
FULL_TASKS = {**R50_TASKS, "INSTANCE_SEGMENTATION": "instance_segmentation", "MASKED_LM": "masked_lm"}


def _load(name):
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / f"{name}.yaml"))
    return cfg


@pytest.mark.parametrize("name,tasks,backbone", [
    ("up2_R50", R50_TASKS, "build_resnet_backbone"),
    ("up2_swin_base", FULL_TASKS, "D2SwinTransformer"),
    ("up2_swin_large", FULL_TASKS, "D2SwinTransformer"),
])
def test_paper_config_task_mix(name, tasks, backbone):
    cfg = _load(name)
    assert cfg.MODEL.BACKBONE.NAME == backbone
    assert cfg.DATALOADER.TASK_SAMPLING == "unmixed" and cfg.SOLVER.OPTIMIZER == "TBGN"  # Tab. 4 last row
    assert cfg.MODEL.UNIFIED_DECODER.MOE.ENABLED  # §5.2
    specs = task_specs_from_config(cfg)  # raises on unknown keys or types, ratios <= 0
    check_datasets_registered(specs)
    # class names come from the registered datasets' metadata (no file is read)
    specs = task_specs_from_config(resolve_task_data(cfg))
    assert {n: s.type for n, s in specs.items()} == tasks
    for spec in specs.values():
        assert spec.ims_per_batch >= 1 and spec.datasets_test
        assert set(spec.datasets_train + spec.datasets_test) <= set(DatasetCatalog.list())
    names = sorted(specs)
    probs = UnmixedTaskSampler(names, [specs[n].sampling_ratio for n in names]).probabilities
    assert sum(probs.values()) == pytest.approx(1.0)
    raw = sum(s.sampling_ratio for s in specs.values())
    for n in names:
        assert probs[n] == pytest.approx(specs[n].sampling_ratio / raw)
    assert len(specs["CLASSIFICATION"].class_names) == 1000 and specs["DETECTION"].class_names[0] == "person"
    assert "flickr30k_karpathy_train" not in specs["RETRIEVAL"].datasets_train  # §5.1: Flickr30k is never trained on
    if "MASKED_LM" in specs:  # §5.4: YFCC joins the image-text data of the larger models
        assert "yfcc_train" in specs["RETRIEVAL"].datasets_train and "yfcc_train" in specs["CAPTIONING"].datasets_train
    else:  # §5.3: the R50 runs leave out YFCC
        assert "yfcc_train" not in specs["RETRIEVAL"].datasets_train


def test_swin_large_differs_from_base_only_in_backbone():
    base, large = _load("up2_swin_base"), _load("up2_swin_large")
    assert large.MODEL.SWIN.MODEL_NAME == "swin_large_patch4_window12_384"
    assert large.TASKS == base.TASKS


def test_paper_configs_reference_boxes_and_regional_tokens():
    """Issue 16 items 1 and 5(c): the R50 mix supervises no masks, so its reference boxes are the
    query-selection boxes (the Swin mixes have instance segmentation: mask-initialised boxes); all
    O = 300 proposals become regional tokens."""
    from detectron2.layers import ShapeSpec

    from up2.modeling.image_encoder import ImageEncoder
    from up2.modeling.proposal.decoder import ProposalDecoder

    r50, swin = _load("up2_R50"), _load("up2_swin_base")
    assert ProposalDecoder.from_config(r50)["init_box_from_mask"] is False
    assert ProposalDecoder.from_config(swin)["init_box_from_mask"] is True
    for cfg in (r50, swin):
        assert cfg.MODEL.PROPOSAL.NUM_QUERIES == 300
        args = ImageEncoder.from_config(cfg, {cfg.MODEL.IMAGE_ENCODER.GLOBAL_FEATURE: ShapeSpec(channels=8, stride=32)})
        assert args["num_regional_tokens"] == 300
