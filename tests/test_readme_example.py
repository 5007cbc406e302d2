"""The README's ``GeneralistPredictor`` example (section "Inference") runs as written on the
checkpoint ``make demo`` writes: from a working directory holding
``output/demo/model_final_inference`` and ``datasets/shapes/val/000001.png`` / ``000002.png``,
without ``$UP2_DATASETS`` and offline.

``make demo`` trains ``configs/tiny/joint_shapes.yaml`` for 20 minutes; here the same config (every
task: instance segmentation, classification, retrieval, captioning, masked LM; its per-task
IMAGE_SIZE kept) trains a shrunk model for 2 iterations on a generated shapes set of 8 + 2
images, which writes an inference checkpoint folder of the same layout."""
import ast
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

MARKER = 'GeneralistPredictor.from_pretrained("output/demo/model_final_inference")'
TASKS = ("INSTANCE_SEGMENTATION", "CLASSIFICATION", "RETRIEVAL", "CAPTIONING", "MASKED_LM")
# the tiny test model (conftest.tiny_cfg's sizes), 2 iterations, batches of 2 for every task
SHRINK = [
    "SEED", "0", "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2",
    *[item for task in TASKS for item in (f"TASKS.{task}.IMS_PER_BATCH", "2")],
    "MODEL.PROPOSAL.HIDDEN_DIM", "32", "MODEL.PROPOSAL.NHEADS", "2", "MODEL.PROPOSAL.ENC_LAYERS", "1",
    "MODEL.PROPOSAL.DEC_LAYERS", "2", "MODEL.PROPOSAL.NUM_QUERIES", "12", "MODEL.PROPOSAL.DN_NUM", "8",
    "MODEL.PROPOSAL.TRAIN_NUM_POINTS", "256", "MODEL.PROPOSAL.TEST_TOPK", "10",
    "MODEL.IMAGE_ENCODER.NUM_REGIONAL_TOKENS", "8", "MODEL.UNIFIED_DECODER.EMBED_DIM", "32",
    "MODEL.UNIFIED_DECODER.NUM_HEADS", "2", "MODEL.UNIFIED_DECODER.FFN_DIM", "64",
    "MODEL.UNIFIED_DECODER.NUM_LAYERS", "1", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
]
# what the example prints: the segment() detections above 0.25 as [(name, score), ...], the
# classify() label, the caption, the (2, 2) retrieve() similarities
PRINTED = re.compile(
    r"(?P<detections>\[[^\n]*\])\n(?P<label>[^\n]+)\n(?P<caption>[^\n]*)\n"
    r"(?P<retrieve>tensor\(\[\[(?P<sims>[^\]]*\],\s*\[[^\]]*)\]\]\))\n?\Z")
NUMBER = re.compile(r"-?\d+\.\d*(?:e[+-]?\d+)?")


def check_printed(text: str, what: str) -> None:
    """``text`` is what the README example prints (``what`` names whose output it is in errors)."""
    from up2.data.datasets.shapes import SHAPES_CATEGORIES

    names = [c["name"] for c in SHAPES_CATEGORIES]
    printed = PRINTED.match(text)
    assert printed, f"{what}: not the README example's output format:\n{text[-3000:]}"
    detections = ast.literal_eval(printed["detections"])
    assert isinstance(detections, list), (what, printed["detections"])
    for det in detections:
        assert isinstance(det, tuple) and len(det) == 2 and det[0] in names and 0.25 < det[1] <= 1.0, (what, det)
    assert printed["label"] in names, (what, printed["label"])
    caption = printed["caption"]  # one line of words (an untrained model's words need not make sense)
    assert caption.strip() and caption == caption.strip() and "tensor(" not in caption, (what, caption)
    sims = [float(v) for v in NUMBER.findall(printed["sims"])]
    assert len(sims) == 4 and all(-1.0001 <= v <= 1.0001 for v in sims), (what, printed["retrieve"])


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("UP2_DATASETS", "DETECTRON2_DATASETS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


@pytest.fixture(scope="module")
def example():
    """(code, documented output): the README's fenced python block that loads the ``make demo``
    checkpoint (exactly one) and the fenced text block after it (what it prints); requested
    before ``demo_cwd`` so that a README without them fails before any training."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = list(re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S))
    hits = [m for m in blocks if MARKER in m[1]]
    assert len(hits) == 1, f"expected one ```python block of README.md containing {MARKER}, found {len(hits)}"
    shown = re.compile(r"^```text\n(.*?)^```", re.M | re.S).search(text, hits[0].end())
    assert shown, "README.md: no ```text block (the example's output) after the GeneralistPredictor example"
    return hits[0][1], shown[1]


@pytest.fixture(scope="module")
def demo_cwd(tmp_path_factory):
    """A folder laid out as after ``make demo``: output/demo/model_final_inference (2 iterations
    of joint_shapes.yaml, shrunk) and datasets/shapes/val/000001.png, 000002.png; the training
    data lives elsewhere."""
    from up2.data.datasets.shapes import generate_shapes_dataset

    tmp = tmp_path_factory.mktemp("readme")
    data = tmp / "data"
    generate_shapes_dataset(str(data / "shapes"), num_train=8, num_val=2, image_size=64, seed=0)
    out = tmp / "train_out"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_net.py"), "--config-file",
         str(REPO_ROOT / "configs/tiny/joint_shapes.yaml"), *SHRINK, "OUTPUT_DIR", str(out)],
        cwd=tmp, env=_env(UP2_DATASETS=str(data)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cwd = tmp / "cwd"
    (cwd / "output" / "demo").mkdir(parents=True)
    (cwd / "output" / "demo" / "model_final_inference").symlink_to(out / "model_final_inference",
                                                                   target_is_directory=True)
    val = cwd / "datasets" / "shapes" / "val"
    val.mkdir(parents=True)
    for src, dst in (("000000.png", "000001.png"), ("000001.png", "000002.png")):
        shutil.copy(data / "shapes" / "val" / src, val / dst)
    return cwd


def test_readme_shown_output_has_the_example_format(example):
    check_printed(example[1], "the README's shown output")


def test_readme_generalist_example_runs_as_written(example, demo_cwd):
    env = _env(PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", example[0]], cwd=demo_cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the README example failed:\n{proc.stderr[-3000:]}"
    check_printed(proc.stdout, "the README example")
