"""Distributed training through the real entry point: ``train_net.py --num-gpus 2`` on the CPU
(detectron2's ``launch`` picks gloo without CUDA) runs a few joint iterations of every task
on a tiny shapes set, with one iteration where rank 1's detection image has no annotation
while rank 0's has some (that rank must give the same loss keys, nothing hangs).
Rank 1 is the empty one on purpose: detectron2 averages the logged losses over the keys of
rank 0, so a key missing on the empty rank fails the run instead of passing unnoticed.

The shapes data is generated here and handed to train_net.py through ``$UP2_DATASETS``
(``up2.data.datasets.builtin`` registers ``shapes_*`` from it in every process). The task
sequence (unmixed sampler) and each rank's image stream (detectron2's TrainingSampler) are
pure functions of the seed, so the test picks a seed under which every task is sampled and
empties the image rank 1 trains on at the last detection iteration; the run's own metrics
(``DETECTION/gt_instances_min|max``, per-rank counts gathered by the trainer) confirm it.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog

import up2  # noqa: F401
from conftest import REPO_ROOT
from up2 import add_up2_config
from up2.data.datasets.shapes import generate_shapes_dataset, register_shapes
from up2.data.multitask import UnmixedTaskSampler

WORLD = 2
ITERS = 6
TIMEOUT_S = 300

SHRINK = [  # as conftest.tiny_cfg: the smallest model that still runs every task
    "MODEL.PROPOSAL.HIDDEN_DIM", 32, "MODEL.PROPOSAL.NHEADS", 2, "MODEL.PROPOSAL.ENC_LAYERS", 1,
    "MODEL.PROPOSAL.DEC_LAYERS", 2, "MODEL.PROPOSAL.NUM_QUERIES", 12, "MODEL.PROPOSAL.DN_NUM", 8,
    "MODEL.PROPOSAL.TRAIN_NUM_POINTS", 256, "MODEL.PROPOSAL.TEST_TOPK", 10,
    "MODEL.IMAGE_ENCODER.NUM_REGIONAL_TOKENS", 8,
    "MODEL.UNIFIED_DECODER.EMBED_DIM", 32, "MODEL.UNIFIED_DECODER.NUM_HEADS", 2,
    "MODEL.UNIFIED_DECODER.FFN_DIM", 64, "MODEL.UNIFIED_DECODER.NUM_LAYERS", 1,
    "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 64, "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64,
    "SOLVER.MAX_ITER", ITERS, "SOLVER.STEPS", (ITERS - 1,), "SOLVER.WARMUP_ITERS", 1,
    "SOLVER.CHECKPOINT_PERIOD", 100000,
    "DATALOADER.NUM_WORKERS", 0, "DATALOADER.FILTER_EMPTY_ANNOTATIONS", False, "SEED", 3,
]


def _joint_cfg(out_dir):
    """configs/tiny/joint_shapes.yaml shrunk, plus a box-only DETECTION task with 1 image per rank."""
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / "tiny" / "joint_shapes.yaml"))
    cfg.merge_from_list(SHRINK + ["OUTPUT_DIR", str(out_dir)])
    cfg.TASKS.DETECTION = type(cfg)({
        "TYPE": "detection", "DATASETS": {"TRAIN": ["shapes_train"], "TEST": ["shapes_val"]},
        "IMS_PER_BATCH": WORLD, "SAMPLING_RATIO": 0.2, "LOSS_WEIGHT": 4.0, "GRAD_WEIGHT": 1.0})
    for name, node in cfg.TASKS.items():
        if name != "DETECTION":
            node.IMS_PER_BATCH = 2 * WORLD
    cfg.TASKS.CAPTIONING.MAX_CAPTION_LENGTH = 4
    return cfg


def _seed_visiting_every_task(cfg):
    """(seed, task sequence of iterations 0..ITERS-1) for the first seed whose draws visit every
    task; tasks in the trainer's order (sorted names)."""
    names = sorted(cfg.TASKS.keys())
    ratios = [cfg.TASKS[n].SAMPLING_RATIO for n in names]
    for seed in range(10000):
        sampler = UnmixedTaskSampler(names, ratios, seed=seed)
        seq = [sampler.task_for_iteration(i) for i in range(ITERS)]
        if set(seq) == set(names):
            return seed, seq
    raise AssertionError("no seed visits every task")  # pragma: no cover


def _rank_image_stream(seed: int, size: int, rank: int, count: int):
    """Dataset indices rank ``rank`` reads, in order: detectron2's TrainingSampler shuffles with
    ``torch.randperm`` from a generator seeded once with ``seed``, epoch after epoch, and rank r
    takes every WORLD-th index starting at r."""
    g = torch.Generator()
    g.manual_seed(seed)
    stream = []
    while len(stream) < WORLD * count:
        stream += torch.randperm(size, generator=g).tolist()
    return stream[rank::WORLD][:count]


def _make_data(root, seed, n_det_iters):
    """Shapes data under ``root/shapes`` whose image read by rank 1 at the last detection
    iteration has no annotation (rank 0's image there keeps its annotations)."""
    shapes = root / "shapes"
    generate_shapes_dataset(str(shapes), num_train=8, num_val=4, image_size=64, seed=0)
    register_shapes(str(shapes), prefix="ddp_test_shapes")  # same json as train_net's shapes_train: its record order
    records = DatasetCatalog.get("ddp_test_shapes_train")
    rank0 = records[_rank_image_stream(seed, len(records), 0, n_det_iters)[-1]]["image_id"]
    rank1 = records[_rank_image_stream(seed, len(records), 1, n_det_iters)[-1]]["image_id"]
    if rank0 == rank1:
        pytest.skip("both ranks read the same image at that iteration (choose another seed)")  # pragma: no cover
    path = shapes / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != rank1]
    assert any(a["image_id"] == rank0 for a in coco["annotations"])
    path.write_text(json.dumps(coco))


def _metrics(path):
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {rec["iteration"]: rec for rec in lines}


def test_train_net_two_gloo_processes(tmp_path):
    out = tmp_path / "out"
    cfg = _joint_cfg(out)
    seed, seq = _seed_visiting_every_task(cfg)
    cfg.DATALOADER.TASK_SAMPLER_SEED = seed
    last_det = max(i for i, n in enumerate(seq) if n == "DETECTION")
    _make_data(tmp_path, seed, n_det_iters=seq.count("DETECTION"))
    config_file = tmp_path / "joint_ddp.yaml"
    config_file.write_text(cfg.dump())

    env = dict(os.environ, UP2_DATASETS=str(tmp_path), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, str(REPO_ROOT / "train_net.py"), "--num-gpus", str(WORLD), "--dist-url", "auto",
           "--config-file", str(config_file)]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # own process group: a hang kills every rank
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"train_net.py --num-gpus {WORLD} did not finish in {TIMEOUT_S} s; last output:\n{log[-4000:]}")
    print(f"train_net.py --num-gpus {WORLD}: {time.time() - start:.1f} s, tasks by iteration {seq}")
    assert proc.returncode == 0, log[-6000:]
    assert f"World size: {WORLD}" in log and (out / "log.txt.rank1").is_file()  # detectron2's default_setup, per rank
    assert "Evaluation results of task DETECTION" in log  # up2's logger is set up by train_net.py

    assert (out / "model_final.pth").is_file()
    metrics = _metrics(out / "metrics.json")
    assert "total_loss" in metrics[ITERS - 1]  # the last iteration was logged
    keys = set().union(*(rec for it, rec in metrics.items() if it < ITERS))
    for name in cfg.TASKS:
        assert any(k.startswith(f"{name}/loss") for k in keys), (name, sorted(keys))
        assert f"task_count/{name}" in keys
        # the final evaluation (EvalHook after the last iteration, at iteration ITERS) ran every task
        assert any(k.startswith(f"{name}/") for k in metrics[ITERS]), (name, sorted(metrics[ITERS]))
    # the last detection iteration: one rank's batch had no annotation, the other's had some
    det = metrics[last_det]
    assert det["DETECTION/gt_instances_min"] == 0 and det["DETECTION/gt_instances_max"] > 0, det
    assert det["task_count/DETECTION"] == seq.count("DETECTION")
    assert all(torch.isfinite(torch.tensor(v)) for k, v in det.items() if k.startswith("DETECTION/loss"))
