"""Host-device synchronisations of one training iteration and one inference forward, counted on
the CPU with ``up2.utils.host_sync`` (what would block the host on a GPU)."""
import pytest
import torch
from detectron2.utils.events import EventStorage

from conftest import add_task, seed_everything, tiny_cfg
from up2.engine import UP2Trainer
from up2.utils.host_sync import count_host_syncs

TASKS = {
    "instance_segmentation": ("test_shapes_train", "test_shapes_val", {}),
    "detection": ("test_shapes_train", "test_shapes_val", {}),
    "classification": ("test_shapes_cls_train", "test_shapes_cls_val", {}),
    "retrieval": ("test_shapes_caption_train", "test_shapes_caption_val", {}),
    "captioning": ("test_shapes_caption_train", "test_shapes_caption_val",
                   {"VOCABULARY": "dataset", "MAX_CAPTION_LENGTH": 6}),
    "masked_lm": ("test_shapes_text_train", "test_shapes_text_val", {"VOCABULARY": "dataset"}),
}
TRAIN_LIMIT = 10  # per training iteration (issue 17 item 2)
INFERENCE_LIMIT = 5  # per inference forward, besides copying the result out


@pytest.fixture(scope="module")
def trainer(shapes_datasets, tmp_path_factory):
    """One tiny trainer with every task type (task name = type), MoE on, TBGN, 2 images per batch."""
    cfg = tiny_cfg(task_type=None, **{"OUTPUT_DIR": str(tmp_path_factory.mktemp("host_syncs")),
                                      "SOLVER.OPTIMIZER": "TBGN", "SOLVER.MAX_ITER": 4,
                                      "MODEL.UNIFIED_DECODER.MOE.ENABLED": True})
    for task_type, (train, test, keys) in TASKS.items():
        add_task(cfg, task_type, task_type, train, test, IMS_PER_BATCH=2, **keys)
    cfg.freeze()
    seed_everything(0)
    trainer = UP2Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def count_training_iteration(trainer, name: str):
    """HostSyncReport of a training iteration of task ``name`` after an uncounted one (which
    initialises optimizer state and caches), its batch drawn before counting (data loading stays
    on the host on a GPU too)."""
    step = trainer._trainer
    loader = step.loader
    step.model.train()
    sampler_pick = loader.sampler.task_for_iteration
    loader.sampler.task_for_iteration = lambda it: name
    try:
        with EventStorage(0) as storage:
            for it in range(2):
                step.iter = storage.iter = it
                batch = loader.next_batch(it)
                draw = loader.next_batch
                loader.next_batch = lambda _it: batch
                try:
                    if it == 0:
                        step.run_step()
                        continue
                    counters = [s["step"] for s in step.optimizer.state.values()
                                if isinstance(s.get("step"), torch.Tensor)]
                    with count_host_syncs(ignore=counters) as report:
                        step.run_step()
                finally:
                    loader.next_batch = draw
    finally:
        loader.sampler.task_for_iteration = sampler_pick
    return report


@pytest.mark.parametrize("task_type", sorted(TASKS))
def test_training_iteration_host_syncs(trainer, task_type):
    report = count_training_iteration(trainer, task_type)
    print(task_type, report.summary(40))
    assert report.total <= TRAIN_LIMIT, report.summary(40)


def count_inference_forward(trainer, name: str):
    """HostSyncReport of one eval-mode forward of 2 test images of task ``name`` (mapped before
    counting; the first forward, which builds the target caches, is not counted)."""
    from task_models import mapped_inputs

    model = trainer.model
    model.eval()
    inputs = mapped_inputs(trainer.cfg, model, name, n=2)
    try:
        with torch.no_grad():
            model(inputs, task=name)
            with count_host_syncs() as report:
                model(inputs, task=name)
    finally:
        model.train()
    return report


@pytest.mark.parametrize("task_type", sorted(TASKS))
def test_inference_forward_host_syncs(trainer, task_type):
    report = count_inference_forward(trainer, task_type)
    print(task_type, report.summary(40))
    assert report.total <= INFERENCE_LIMIT, report.summary(40)


def test_counter_counts_each_kind_and_leaves_host_work_out():
    """The counter itself: every listed kind is counted once per call; host tensors (from
    ``.cpu()``, built without a device, derived from those), ``cpu_only`` blocks and passing
    ``device_assert`` checks are not; a failing ``device_assert`` raises ValueError on the CPU."""
    from up2.utils.host_sync import cpu_only, device_assert, to_device

    x = torch.arange(6.0)
    mask = x > 2
    with count_host_syncs() as report:
        x.sum().item()
        x.nonzero()
        torch.unique(x)
        x[mask]
        x.tolist()
        host = x.cpu()
        torch.tensor([1, 2], device=x.device)
        host.tolist(), host[host > 2], (host * 2).sum().item()  # host work: free
        torch.tensor([3.0, 4.0]).max().item()  # built on the host: free
        with cpu_only():
            x.max().item()
        device_assert(x >= 0, "never raised")
        to_device([1, 2, 3], x.device)
    kinds = report.by_kind()
    assert kinds == {"item": 1, "nonzero": 1, "unique": 1, "bool_index": 1, "tolist": 1, "cpu": 1,
                     "tensor(device=)": 1}, report.summary()
    assert all(e.site.startswith("test_host_syncs.py:") for e in report.events), report.summary()
    with pytest.raises(ValueError, match="negative"):
        device_assert(x < 3, "negative")
