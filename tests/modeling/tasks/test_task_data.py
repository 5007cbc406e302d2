"""Task data (class names, dataset vocabularies), config validation and the default task
(issue items: a dumped config behaves like its source; config typos are errors; exact cache keys)."""
import numpy as np
import pytest
import torch

from conftest import add_task, tiny_cfg


def _joint_cfg():
    """DETECTION first in config order, CAPTIONING first once keys are sorted (as config dumps do)."""
    cfg = tiny_cfg(None)
    add_task(cfg, "DETECTION", "detection", "test_shapes_train", "test_shapes_val")
    add_task(cfg, "CAPTIONING", "captioning", "test_shapes_caption_train", "test_shapes_caption_val",
             VOCABULARY="dataset")
    add_task(cfg, "CLASSIFICATION", "classification", "test_shapes_cls_train", "test_shapes_cls_val")
    return cfg


def test_unknown_task_key_is_an_error_naming_it_and_the_allowed_ones():
    from up2.modeling.tasks import task_specs_from_config

    cfg = tiny_cfg("detection")
    cfg.TASKS.TASK.SAMPLNG_RATIO = 2.0
    with pytest.raises(ValueError, match=r"cfg\.TASKS\.TASK.*SAMPLNG_RATIO.*SAMPLING_RATIO"):
        task_specs_from_config(cfg)
    cfg = tiny_cfg("detection")
    cfg.TASKS.TASK.DATASETS.TSET = ["x"]
    with pytest.raises(ValueError, match=r"DATASETS.*TSET"):
        task_specs_from_config(cfg)


def test_default_task_is_explicit_or_the_only_localization_task(shapes_datasets):
    from up2.modeling.tasks import default_task_name, task_specs_from_config

    cfg = _joint_cfg()
    assert default_task_name(cfg) == "DETECTION"
    cfg.MODEL.DEFAULT_TASK = "CAPTIONING"
    assert default_task_name(cfg) == "CAPTIONING"
    cfg.MODEL.DEFAULT_TASK = "CAPTIONIGN"
    with pytest.raises(ValueError, match="CAPTIONIGN"):
        default_task_name(cfg)
    cfg.MODEL.DEFAULT_TASK = ""
    add_task(cfg, "SEGMENTATION", "instance_segmentation", "test_shapes_train", "test_shapes_val")
    assert default_task_name(cfg, task_specs_from_config(cfg)) is None  # two localization tasks: ambiguous


def test_ambiguous_default_task_asks_for_one_when_called(shapes_datasets):
    from detectron2.modeling import build_model

    from up2.modeling.tasks import resolve_task_data

    cfg = tiny_cfg(None)
    add_task(cfg, "CAPTIONING", "captioning", "test_shapes_caption_train", "test_shapes_caption_val")
    add_task(cfg, "CLASSIFICATION", "classification", "test_shapes_cls_train", "test_shapes_cls_val")
    model = build_model(resolve_task_data(cfg)).eval()
    with pytest.raises(ValueError, match=r"CAPTIONING.*CLASSIFICATION.*MODEL.DEFAULT_TASK"):
        model([{"image": torch.zeros(3, 64, 64, dtype=torch.uint8)}])


def test_dumped_config_predicts_like_its_source(shapes_datasets, tmp_path):
    """detectron2 dumps OUTPUT_DIR/config.yaml with sorted keys: the default task must not move."""
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor
    from detectron2.modeling import build_model

    from up2 import add_up2_config
    from up2.modeling.tasks import resolve_task_data

    torch.manual_seed(0)
    cfg = resolve_task_data(_joint_cfg())
    weights = tmp_path / "model.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    cfg.MODEL.WEIGHTS = str(weights)
    (tmp_path / "config.yaml").write_text(cfg.dump())
    dumped = get_cfg()
    add_up2_config(dumped)
    dumped.merge_from_file(str(tmp_path / "config.yaml"))
    assert list(dumped.TASKS.keys())[0] == "CAPTIONING"  # the dump really reorders the tasks

    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    a = DefaultPredictor(cfg)(image)
    b = DefaultPredictor(dumped)(image)
    assert set(a) == set(b) == {"instances"}
    torch.testing.assert_close(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)
    torch.testing.assert_close(a["instances"].scores, b["instances"].scores)
    assert torch.equal(a["instances"].pred_classes, b["instances"].pred_classes)


def test_resolve_task_data_fills_class_names_and_dataset_vocabulary(shapes_datasets):
    from detectron2.data import MetadataCatalog

    from up2.modeling.tasks import resolve_task_data, task_specs_from_config
    from up2.modeling.text_encoder import load_tokenizer

    cfg = _joint_cfg()
    assert not task_specs_from_config(cfg)["DETECTION"].class_names
    resolved = resolve_task_data(cfg)
    assert "CLASS_NAMES" not in cfg.TASKS.DETECTION  # the input config is left alone
    specs = task_specs_from_config(resolved)
    assert specs["DETECTION"].class_names == tuple(MetadataCatalog.get("test_shapes_train").thing_classes)
    assert specs["CLASSIFICATION"].class_names == tuple(MetadataCatalog.get("test_shapes_cls_train").thing_classes)
    ids = specs["CAPTIONING"].vocabulary_ids
    tok = load_tokenizer("minilm")
    circle = tok("circle", add_special_tokens=False)["input_ids"]
    assert set(circle) <= set(ids) and tok.mask_token_id in ids and list(ids) == sorted(ids)
    assert len(ids) < 200 < tok.vocab_size  # a subset, not the whole vocabulary
    assert resolve_task_data(resolved) is resolved  # nothing left to do


def test_vocabulary_cache_keys_on_the_exact_ids(shapes_datasets):
    """Two id sets with the same length, sum and last id are different target sets."""
    from detectron2.modeling import build_model

    from up2.modeling.tasks import resolve_task_data
    from up2.modeling.tasks.vocabulary import VocabularyTargets
    from up2.modeling.token_attributes import Modality, input_modalities

    captioning = input_modalities(Modality.IMAGE, Modality.TEXT)

    torch.manual_seed(0)
    cfg = tiny_cfg("captioning", "test_shapes_caption_train", "test_shapes_caption_val")
    from up2.modeling.target_set import TargetCache

    model = build_model(resolve_task_data(cfg)).eval()
    model.target_cache = TargetCache()  # as prepare_for_inference sets it
    a_ids, b_ids = torch.tensor([1001, 1004, 1006]), torch.tensor([1002, 1003, 1006])
    assert (len(a_ids), int(a_ids.sum()), int(a_ids[-1])) == (len(b_ids), int(b_ids.sum()), int(b_ids[-1]))
    with torch.no_grad():
        a = VocabularyTargets(a_ids).embed(model, captioning).embeddings
        b = VocabularyTargets(b_ids).embed(model, captioning).embeddings  # a's entry if keyed loosely
        model.target_cache.clear()
        b_fresh = VocabularyTargets(b_ids).embed(model, captioning).embeddings
    torch.testing.assert_close(b, b_fresh)
    assert (a[:2] - b[:2]).abs().max() > 1e-3  # other tokens, other embeddings


def test_class_names_at_call_time_are_checked_like_the_config(shapes_datasets):
    from detectron2.modeling import build_model

    from up2.modeling.tasks import resolve_task_data
    from up2.modeling.tasks.base import check_class_names

    assert check_class_names(["cup", "spoon"]) == ("cup", "spoon")
    for bad, match in (("cup", r"did you mean \['cup'\]"), (["a", "a"], "unique.*'a'"), ([""], "non-empty"),
                       (["cup", 3], "non-empty strings")):
        with pytest.raises(ValueError, match=match):
            check_class_names(bad)
    torch.manual_seed(0)
    model = build_model(resolve_task_data(tiny_cfg("classification", "test_shapes_cls_train",
                                                   "test_shapes_cls_val"))).eval()
    image = [{"image": torch.zeros(3, 64, 64, dtype=torch.uint8)}]
    with torch.no_grad(), pytest.raises(ValueError, match="did you mean"):
        model(image, class_names="cup")  # used to classify among the letters 'c', 'u', 'p'
    with torch.no_grad():
        assert model(image, class_names=["cup", "spoon"])[0]["pred_class_scores"].shape == (2,)


def test_checkpoint_task_data_is_read_from_any_torch_file_and_bad_files_are_named(tmp_path):
    from up2.modeling.tasks.task_data import TASK_DATA_KEY, read_checkpoint_task_data

    data = {"version": 1, "tasks": {"DET": {"type": "detection", "class_names": ["a"], "vocabulary_ids": []}}}
    renamed = tmp_path / "weights.pt"
    torch.save({"model": {}, TASK_DATA_KEY: data}, renamed)
    assert read_checkpoint_task_data(str(renamed)) == data
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"MODEL.WEIGHTS='.*notes.pth' is not a readable torch checkpoint"):
        read_checkpoint_task_data(str(text))
    with pytest.raises(IsADirectoryError, match="is a folder"):
        read_checkpoint_task_data(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_checkpoint_task_data(str(tmp_path / "missing.pth"))
    old = tmp_path / "old.pth"
    torch.save({TASK_DATA_KEY: {**data, "version": 99}}, old)
    with pytest.raises(ValueError, match="version 99"):
        read_checkpoint_task_data(str(old))
    assert read_checkpoint_task_data("") is None


def test_train_net_checks_the_default_task_before_writing_config_yaml(shapes_datasets, tmp_path):
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("train_net_under_test", REPO_ROOT / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    cfg = tiny_cfg("detection")
    config = tmp_path / "source.yaml"
    config.write_text(cfg.dump())
    (tmp_path / "out").mkdir()
    kept = tmp_path / "out" / "config.yaml"
    kept.write_text("# the training run's config\n")
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(config), "--eval-only", "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.DEFAULT_TASK", "TSAK"])
    with pytest.raises(ValueError, match="DEFAULT_TASK='TSAK'"):
        train_net.setup(args)
    assert kept.read_text() == "# the training run's config\n"


def test_caption_decoding_defaults_are_uni_perceivers_coco_protocol():
    """Beam 2, length penalty 2.0 unless the task says otherwise; the default lives in TaskSpec."""
    from detectron2.config import get_cfg

    from conftest import REPO_ROOT
    from up2 import add_up2_config
    from up2.modeling.tasks import TaskSpec, task_specs_from_config

    cfg = tiny_cfg(None)
    add_task(cfg, "CAP", "captioning", "test_shapes_caption_train", "test_shapes_caption_val")
    spec = task_specs_from_config(cfg)["CAP"]
    assert (spec.beam_size, spec.length_penalty) == (2, 2.0)
    assert (TaskSpec.beam_size, TaskSpec.length_penalty) == (2, 2.0)
    cfg.TASKS.CAP.BEAM_SIZE, cfg.TASKS.CAP.LENGTH_PENALTY = 1, 0.5
    spec = task_specs_from_config(cfg)["CAP"]
    assert (spec.beam_size, spec.length_penalty) == (1, 0.5)
    cfg.TASKS.CAP.LENGTH_PENALTY = -1.0
    with pytest.raises(ValueError, match=r"cfg\.TASKS\.CAP\.LENGTH_PENALTY must be a finite float >= 0, got -1"):
        task_specs_from_config(cfg)
    paper = get_cfg()
    add_up2_config(paper)
    paper.merge_from_file(str(REPO_ROOT / "configs" / "up2_R50.yaml"))
    spec = task_specs_from_config(paper)["CAPTIONING"]
    assert (spec.beam_size, spec.length_penalty) == (2, 2.0)
