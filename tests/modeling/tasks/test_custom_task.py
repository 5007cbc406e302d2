"""Adding a task adds one file (paper §4.3: a new task is a new pair of inputs and targets):
a shape-counting task defined here, outside ``up2/``, trains and evaluates through UP2Trainer
with its own mapper, targets, loss, evaluator and test batch size."""
import copy

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, detection_utils
from detectron2.data import transforms as T
from detectron2.evaluation import DatasetEvaluator

from conftest import add_task, seed_everything, tiny_cfg
from up2.engine import UP2Trainer
from up2.modeling.tasks.base import TASK_REGISTRY, register_task
from up2.modeling.tasks.task import Task, TaskFamily, TaskInputs
from up2.modeling.token_attributes import Modality, input_modalities
from up2.modeling.decoder_outputs import SPE

COUNT_NAMES = ("no shape", "one shape", "two shapes", "three shapes", "four shapes", "five shapes")


class CountMapper:
    """A dataset dict -> {"image": (3, H, W) uint8 resized, "count": number of objects (capped at 5)}."""

    def __init__(self, cfg):
        self.resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        self.format = cfg.INPUT.FORMAT
        self.calls = 0

    def __call__(self, d):
        d = copy.deepcopy(d)
        image = detection_utils.read_image(d["file_name"], format=self.format)
        image = self.resize.get_transform(image).apply_image(image)
        self.calls += 1
        return {"image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "count": min(len(d.get("annotations", [])), len(COUNT_NAMES) - 1),
                "image_id": d["image_id"]}


class CountEvaluator(DatasetEvaluator):
    """Accuracy of the predicted count, and the batch sizes it saw."""

    def reset(self):
        self.correct, self.total, self.batch_sizes = 0, 0, []

    def process(self, inputs, outputs):
        self.batch_sizes.append(len(inputs))
        for x, out in zip(inputs, outputs):
            self.correct += int(out["count"] == x["count"])
            self.total += 1

    def evaluate(self):
        return {"count": {"accuracy": 100.0 * self.correct / max(self.total, 1), "images": self.total}}


@register_task("test_count_shapes")
class CountShapesTask(Task):
    """How many shapes: the image at [SPE] against the texts "no shape" ... "five shapes"."""

    family = TaskFamily.CLASSIFICATION
    input_modalities = input_modalities(Modality.IMAGE)
    reads = (SPE,)
    test_batch_size = 3
    evaluators = []

    def encode_inputs(self, model, batched_inputs):
        return TaskInputs(batch=model.encode_image(batched_inputs, self.input_modalities).tokens.batch)

    def encode_targets(self, model, batched_inputs, inputs, **options):
        return model.embed_texts(COUNT_NAMES, self.input_modalities)

    def losses(self, model, outputs, targets, inputs, batched_inputs):
        logits = model.likelihood(outputs.spe, targets.embeddings)
        target = torch.tensor([x["count"] for x in batched_inputs], device=logits.device)
        return {"loss_count": model.likelihood.loss(logits, target, self.spec.loss_weight)}

    def postprocess(self, model, outputs, targets, inputs, batched_inputs, **options):
        logits = model.likelihood(outputs.spe, targets.embeddings)
        return [{"count": int(row.argmax())} for row in logits]

    def build_mapper(self, cfg, is_train):
        return CountMapper(cfg)

    def build_evaluator(self, cfg, dataset_name, output_dir=None):
        evaluator = CountEvaluator()
        CountShapesTask.evaluators.append(evaluator)
        return evaluator


def test_a_task_defined_outside_up2_trains_and_evaluates(shapes_datasets, tmp_path):
    assert "test_count_shapes" in TASK_REGISTRY
    cfg = tiny_cfg(task_type=None, **{"OUTPUT_DIR": str(tmp_path), "SOLVER.MAX_ITER": 6, "SOLVER.BASE_LR": 1e-3})
    add_task(cfg, "COUNT", "test_count_shapes", "test_shapes_train", "test_shapes_val")
    cfg.freeze()
    seed_everything(0)
    trainer = UP2Trainer(cfg)
    model = trainer.model
    assert isinstance(model.tasks["COUNT"], CountShapesTask) and model.default_task == "COUNT"
    batch = [CountMapper(cfg)(d) for d in DatasetCatalog.get("test_shapes_train")[:4]]
    model.train()
    with torch.no_grad():
        before = model(batch)["loss_count"]
    trainer.train()
    history = trainer.storage.history("COUNT/loss_count").values()
    assert len(history) == 6 and all(np.isfinite(v) for v, _ in history)
    model.train()
    with torch.no_grad():
        after = model(batch)["loss_count"]
    assert after < before  # six steps on this data lower its loss

    CountShapesTask.evaluators.clear()
    results = UP2Trainer.test(cfg, model)
    assert set(results["count"]) == {"accuracy", "images"} and results["count"]["images"] == 8
    assert 0 <= results["count"]["accuracy"] <= 100
    (evaluator,) = CountShapesTask.evaluators
    assert evaluator.batch_sizes == [3, 3, 2]  # the task's own test batch size
    with pytest.raises(TypeError, match="takes the options"):
        model.eval()
        model(batch, class_names=["a"])
