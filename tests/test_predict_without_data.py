"""A trained checkpoint predicts without its training data (class names travel with the config
and the checkpoint), from another working directory; so does the inference checkpoint folder the
trainer writes (and ``python -m up2.export`` rewrites), without the training config; where data is
really needed, the error says where up2 looked."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO_ROOT

SHRINK = [
    "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "TASKS.INSTANCE_SEGMENTATION.IMS_PER_BATCH", "2",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64", "MODEL.PROPOSAL.NUM_QUERIES", "12", "MODEL.PROPOSAL.DN_NUM", "4",
    "MODEL.PROPOSAL.TRAIN_NUM_POINTS", "256", "MODEL.PROPOSAL.TEST_TOPK", "10",
]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("UP2_DATASETS", "DETECTRON2_DATASETS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2", **extra)
    return env


def _run(args, cwd, env, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train inst_shapes for 2 iterations on a small shapes set under $UP2_DATASETS; keep one
    val image; then delete the data."""
    from up2.data.datasets.shapes import generate_shapes_dataset

    tmp = tmp_path_factory.mktemp("no_data")
    data = tmp / "data"
    generate_shapes_dataset(str(data / "shapes"), num_train=8, num_val=2, image_size=64, seed=0)
    out = tmp / "out"
    train_cwd = tmp / "train_cwd"
    train_cwd.mkdir()
    proc = _run([str(REPO_ROOT / "train_net.py"), "--config-file", str(REPO_ROOT / "configs/tiny/inst_shapes.yaml"),
                 *SHRINK, "OUTPUT_DIR", str(out)], train_cwd, _env(UP2_DATASETS=str(data)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(data / "shapes" / "annotations" / "instances_train.json") as f:
        class_names = [c["name"] for c in sorted(json.load(f)["categories"], key=lambda c: c["id"])]
    photo = tmp / "photo.png"
    shutil.copy(next((data / "shapes").rglob("*.png")), photo)
    shutil.rmtree(data)
    return {"tmp": tmp, "out": out, "photo": photo, "class_names": class_names}


def test_checkpoint_and_dumped_config_carry_the_class_names(trained):
    from detectron2.config import get_cfg

    from up2 import add_up2_config
    from up2.modeling.tasks.task_data import TASK_DATA_KEY

    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(str(trained["out"] / "config.yaml"))
    assert list(cfg.TASKS.INSTANCE_SEGMENTATION.CLASS_NAMES) == trained["class_names"]
    ckpt = torch.load(trained["out"] / "model_final.pth", map_location="cpu", weights_only=True)
    assert ckpt[TASK_DATA_KEY]["tasks"]["INSTANCE_SEGMENTATION"]["class_names"] == trained["class_names"]


def test_readme_snippets_predict_from_another_folder_without_the_data(trained):
    elsewhere = trained["tmp"] / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    weights, photo = trained["out"] / "model_final.pth", trained["photo"]
    shared = trained["out"] / "model_final_inference"  # written by the trainer: no training config needed
    source, dumped = REPO_ROOT / "configs/tiny/inst_shapes.yaml", trained["out"] / "config.yaml"
    script = textwrap.dedent(f"""
        import json
        import up2
        from detectron2.config import get_cfg
        from detectron2.data import DatasetCatalog
        from detectron2.engine import DefaultPredictor
        from up2 import add_up2_config
        from up2.data import read_image
        from up2.predictor import BatchPredictor, GeneralistPredictor

        def load_cfg(config, weights):
            cfg = get_cfg(); add_up2_config(cfg)
            cfg.merge_from_file(config)
            cfg.merge_from_list({SHRINK[6:]!r})
            cfg.MODEL.WEIGHTS = weights
            return cfg

        assert not [n for n in DatasetCatalog.list() if n.startswith("shapes")], "shapes must not be registered"
        res = {{}}
        for config in [{str(source)!r}, {str(dumped)!r}]:
            predictor = DefaultPredictor(load_cfg(config, {str(weights)!r}))
            instances = predictor(read_image({str(photo)!r}, format="BGR"))["instances"]
            res[config] = {{"n": len(instances), "scores": instances.scores.tolist(),
                           "classes": instances.pred_classes.tolist(), "masks": instances.has("pred_masks")}}
        p = GeneralistPredictor.from_config_file({str(source)!r}, {str(weights)!r}, opts={SHRINK[6:]!r})
        res["generalist"] = {{"n": len(p.segment({str(photo)!r})),
                             "names": list(p.model.tasks["INSTANCE_SEGMENTATION"].spec.class_names)}}
        # the shareable folder alone: from_pretrained, and MODEL.WEIGHTS <folder> with its config.yaml
        for key, instances in [
                ("shared", GeneralistPredictor.from_pretrained({str(shared)!r}).segment({str(photo)!r})),
                ("batch_shared", BatchPredictor(load_cfg({str(shared / "config.yaml")!r}, {str(shared)!r}))(
                    read_image({str(photo)!r}, format="BGR"))["instances"])]:
            res[key] = {{"scores": instances.scores.tolist(), "classes": instances.pred_classes.tolist()}}
        print("RESULT" + json.dumps(res))
    """)
    env = _env(PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))  # this checkout's up2
    proc = _run(["-c", script], elsewhere, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    a, b = res[str(source)], res[str(dumped)]
    assert a["n"] == b["n"] > 0 and a["masks"] and b["masks"]
    assert a["classes"] == b["classes"]
    torch.testing.assert_close(torch.tensor(a["scores"]), torch.tensor(b["scores"]))
    assert res["generalist"]["names"] == trained["class_names"] and res["generalist"]["n"] == a["n"]
    for key in ("shared", "batch_shared"):  # the inference checkpoint predicts as model_final.pth
        assert res[key]["classes"] == a["classes"], key
        torch.testing.assert_close(torch.tensor(res[key]["scores"]), torch.tensor(a["scores"]))

    drawn = trained["tmp"] / "drawn"  # the demo draws with the shareable folder: its config and weights
    proc = _run([str(REPO_ROOT / "projects/demo/demo.py"), "--config-file", str(shared / "config.yaml"), "--input",
                 str(photo), "--output", str(drawn), "--confidence-threshold", "0", "--opts", "MODEL.WEIGHTS",
                 str(shared)], elsewhere, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (drawn / "photo.png").is_file()


def test_evaluation_without_the_data_names_the_dataset_and_where_up2_looked(trained):
    elsewhere = trained["tmp"] / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    proc = _run([str(REPO_ROOT / "train_net.py"), "--config-file", str(REPO_ROOT / "configs/tiny/inst_shapes.yaml"),
                 "--eval-only", *SHRINK, "MODEL.WEIGHTS", str(trained["out"] / "model_final.pth"),
                 "OUTPUT_DIR", str(trained["tmp"] / "eval")], elsewhere, _env())
    assert proc.returncode != 0
    assert "'shapes_val' is not registered" in proc.stderr
    assert "UP2_DATASETS" in proc.stderr and str(elsewhere / "datasets" / "shapes") in proc.stderr


def test_training_writes_a_shareable_checkpoint_of_the_weights_size(trained):
    """OUTPUT_DIR/model_final_inference (written at the end of training) holds the weights alone:
    no optimizer or trainer state (the README test below loads it from another folder)."""
    from safetensors import safe_open

    weights = trained["out"] / "model_final_inference" / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        weight_bytes = sum(f.get_tensor(k).nbytes for k in f.keys())
    assert weight_bytes > 0 and weights.stat().st_size < weight_bytes + 100_000
    assert weights.stat().st_size < 0.5 * (trained["out"] / "model_final.pth").stat().st_size


def test_export_of_a_training_checkpoint_equals_what_training_wrote(trained, tmp_path):
    from safetensors.torch import load_file

    from up2.export import main

    out = tmp_path / "exported"
    weights = str(trained["out"] / "model_final.pth")
    # the README's order: the KEY VALUE overrides before --output
    assert main(["--config-file", str(trained["out"] / "config.yaml"), "MODEL.WEIGHTS", weights,
                 "--output", str(out)]) == 0
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(trained["out"] / "model_final_inference" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    card = (out / "README.md").read_text()
    assert f"exported from: {weights}" in card and "| INSTANCE_SEGMENTATION | instance_segmentation |" in card
    assert "weights after 2" in card

    partial = tmp_path / "backbone_only.pth"
    full = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    torch.save({"model": {k: v for k, v in full.items() if k.startswith("backbone.")}}, partial)
    with pytest.raises(ValueError, match=r"not a complete checkpoint of this config's model: \d+ weights missing"):
        from up2.export import export

        export(str(trained["out"] / "config.yaml"), str(tmp_path / "bad"), ["MODEL.WEIGHTS", str(partial)])
    assert not (tmp_path / "bad").exists()
