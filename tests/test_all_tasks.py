"""Every task through the same UniPerceiverV2 weights on a tiny shapes set: a joint training run
through UP2Trainer (unmixed sampling + TBGN), each task's evaluator, and the open-vocabulary and
decoding behaviour of the predictor-facing calls."""
import pytest
import torch

from conftest import add_task, seed_everything, tiny_cfg
from task_models import mapped_inputs
from up2.engine import UP2Trainer


def joint_cfg(out_dir):
    cfg = tiny_cfg(task_type=None, **{"OUTPUT_DIR": str(out_dir), "SOLVER.OPTIMIZER": "TBGN", "SOLVER.MAX_ITER": 8})
    add_task(cfg, "DET", "instance_segmentation", "test_shapes_train", "test_shapes_val")
    add_task(cfg, "CLS", "classification", "test_shapes_cls_train", "test_shapes_cls_val")
    add_task(cfg, "RET", "retrieval", "test_shapes_caption_train", "test_shapes_caption_val")
    add_task(cfg, "CAP", "captioning", "test_shapes_caption_train", "test_shapes_caption_val",
             VOCABULARY="dataset", MAX_CAPTION_LENGTH=6, BEAM_SIZE=2)
    add_task(cfg, "MLM", "masked_lm", "test_shapes_text_train", "test_shapes_text_val", VOCABULARY="dataset")
    cfg.freeze()
    return cfg


@pytest.fixture(scope="module")
def joint(shapes_datasets, tmp_path_factory):
    cfg = joint_cfg(tmp_path_factory.mktemp("joint"))
    seed_everything(0)  # model init and augmentations (a module fixture: before the per-test seeding)
    trainer = UP2Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer.cfg, trainer  # the trainer's config carries the resolved class names / vocabularies


def test_joint_training_samples_several_tasks(joint):
    cfg, trainer = joint
    counts = trainer._trainer.task_counts
    assert sum(counts.values()) == 8 and len(counts) >= 2
    sampler = trainer._trainer.loader.sampler
    assert [sampler.task_for_iteration(i) for i in range(8)] == [
        n for i in range(8) for n in [sampler.task_for_iteration(i)]]


def test_every_task_evaluates(joint):
    cfg, trainer = joint
    results = UP2Trainer.test(cfg, trainer.model)
    assert set(results) == {"DET", "CLS", "RET", "CAP", "MLM"}
    cls = results["CLS"]["test_shapes_cls_val"]["classification"]
    assert 0 <= cls["top1"] <= 100
    ret = results["RET"]["test_shapes_caption_val"]["retrieval"]
    assert {"i2t_R@1", "t2i_R@1"} <= set(ret) and all(0 <= ret[k] <= 100 for k in ("i2t_R@1", "t2i_R@1"))
    cap = results["CAP"]["test_shapes_caption_val"]["captioning"]
    # percentages (x100): BLEU in [0, 100], CIDEr-D in [0, 1000] (at most 10 per caption); NaN fails
    assert 0 <= cap["BLEU-4"] <= 100 and 0 <= cap["CIDEr"] <= 1000
    assert 0 <= results["MLM"]["test_shapes_text_val"]["mlm"]["accuracy"] <= 100


def _inputs(cfg, trainer, name, dataset, n=3):
    return mapped_inputs(cfg, trainer.model, name, n=n, dataset=dataset)


def test_beam_one_equals_greedy_and_batch_equals_single(joint):
    cfg, trainer = joint
    model = trainer.model.eval()
    inputs = _inputs(cfg, trainer, "CAP", "test_shapes_caption_val")
    with torch.no_grad():
        beam1 = model(inputs, task="CAP", beam_size=1)
        beam3 = model(inputs, task="CAP", beam_size=3)
        single = [model([x], task="CAP", beam_size=3)[0] for x in inputs]
    task = model.tasks["CAP"]
    sp = model.text_encoder.special_ids
    with torch.no_grad():  # greedy decoding by hand: one image at a time, argmax token by token
        enc = model.encode_image(inputs, task.input_modalities)
        vocab = task.vocabulary(model.text_encoder)
        targets = vocab.embed(model, task.input_modalities).embeddings
        for i, out in enumerate(beam1):
            img = enc.tokens.batch
            one = type(img)(tokens=img.tokens[i : i + 1], padding_mask=img.padding_mask[i : i + 1],
                            attributes=img.attributes[i : i + 1])
            seq = [sp.cls]
            for _ in range(cfg.TASKS.CAP.MAX_CAPTION_LENGTH):
                ids = torch.tensor([seq])
                h = model.unified_decoder(task._sequence(one, model.text_encoder.embed_tokens(ids),
                                                         torch.zeros_like(ids, dtype=torch.bool))).features[0, -1]
                nxt = int(vocab.resolve(model.text_encoder)[model.likelihood(h, targets).argmax()])
                if nxt in (sp.sep, sp.pad):
                    break
                seq.append(nxt)
            assert out["caption_ids"].tolist() == [t for t in seq[1:] if t != sp.cls]
            assert len(out["caption_ids"]) <= cfg.TASKS.CAP.MAX_CAPTION_LENGTH
    for a, b in zip(beam3, single):
        assert torch.equal(a["caption_ids"], b["caption_ids"])



def test_caption_zero_beam_or_length_is_an_error_not_the_default(joint):
    """None means the config's beam size / length; 0 is rejected (it used to fall back to the config)."""
    cfg, trainer = joint
    model = trainer.model.eval()
    inputs = _inputs(cfg, trainer, "CAP", "test_shapes_caption_val", n=1)
    with torch.no_grad():
        for kwargs in ({"beam_size": 0}, {"max_length": 0}, {"beam_size": -1}, {"beam_size": True},
                       {"beam_size": 2.0}, {"max_length": 2.5}, {"max_length": float("inf")}):
            with pytest.raises(ValueError, match="must be an int >= 1"):
                model(inputs, task="CAP", **kwargs)
        short = model(inputs, task="CAP", max_length=1)[0]["caption_ids"]
    assert len(short) <= 1 < cfg.TASKS.CAP.MAX_CAPTION_LENGTH

def test_classify_with_new_class_names(joint):
    cfg, trainer = joint
    model = trainer.model.eval()
    inputs = _inputs(cfg, trainer, "CLS", "test_shapes_cls_val")
    with torch.no_grad():
        out = model(inputs, task="CLS", class_names=["oval", "rhombus", "arrow"])
    assert all(o["pred_class_scores"].shape == (3,) for o in out)
    with pytest.raises(ValueError, match="class_names"):
        model(inputs, task="CLS", class_names=[])


def test_generalist_predictor_every_task(joint, tmp_path):
    import skimage.data
    from PIL import Image

    from up2.predictor import GeneralistPredictor

    cfg, trainer = joint
    DetectionCheckpointerPath = tmp_path / "w.pth"
    torch.save({"model": trainer.model.state_dict()}, DetectionCheckpointerPath)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(DetectionCheckpointerPath)
    p = GeneralistPredictor(cfg)
    photo = tmp_path / "coffee.png"
    Image.fromarray(skimage.data.coffee()).save(photo)
    inst = p.detect(str(photo), class_names=["cup", "spoon"])
    assert inst.image_size == skimage.data.coffee().shape[:2] and int(inst.pred_classes.max()) <= 1
    assert p.segment(skimage.data.camera()).pred_masks.shape[-2:] == skimage.data.camera().shape
    out = p.classify(str(photo), ["circle", "square", "star"])
    assert out["scores"].shape == (3,) and out["label"] in ("circle", "square", "star")
    assert isinstance(p.caption(str(photo), beam_size=2, max_length=5), str)
    sim = p.retrieve([str(photo), skimage.data.logo()], ["a red circle", "two blue squares", "a star"])
    assert sim.shape == (2, 3) and (sim.abs() <= 1 + 1e-5).all()
    with pytest.raises(ValueError, match="class_names"):
        p.classify(str(photo), [])
    with pytest.raises(ValueError, match="empty"):
        p.retrieve([str(photo)], [""])
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        p.classify(str(tmp_path / "missing.jpg"), ["a"])
