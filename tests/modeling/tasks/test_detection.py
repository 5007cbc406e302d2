import pytest
import torch
from detectron2.structures import BitMasks, Boxes, ImageList, Instances

from up2.modeling.likelihood import Likelihood
from up2.modeling.tasks.base import TaskSpec
from up2.modeling.tasks.detection import DetectionTask, InstanceSegmentationTask, instances_to_targets

SPEC = TaskSpec(name="DET", type="detection", datasets_train=("x",), datasets_test=(), ims_per_batch=2,
                loss_weight=2.0, class_names=("a", "b", "c"))


def test_targets_are_normalised_to_the_padded_size():
    images = ImageList(torch.zeros(1, 3, 64, 128), [(50, 100)])
    inst = Instances((50, 100))
    inst.gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 64.0, 32.0]]))
    inst.gt_classes = torch.tensor([2])
    m = torch.zeros(1, 50, 100, dtype=torch.bool)
    m[0, :32, :64] = True
    inst.gt_masks = BitMasks(m)
    (t,) = instances_to_targets([{"instances": inst}], images, with_masks=True)
    assert torch.allclose(t.boxes, torch.tensor([[0.25, 0.25, 0.5, 0.5]]))
    assert t.masks.shape == (1, 64, 128) and t.masks.sum() == 32 * 64
    assert t.labels.tolist() == [2]


def test_class_loss_only_on_matched_and_kept_tokens():
    task = DetectionTask(SPEC)
    lik = Likelihood(init_temperature=1.0)
    feats = torch.randn(1, 3, 8, requires_grad=True)
    regional_index = torch.tensor([[7, 2, 5]])  # tokens come from proposals 7, 2, 5
    emb = torch.randn(3, 8)
    targets = [type("T", (), {"labels": torch.tensor([1, 0])})()]
    matches = [(torch.tensor([2, 9]), torch.tensor([1, 0]))]  # proposal 9 was not kept
    loss = task.class_loss(feats, regional_index, emb, lik, matches, targets)["loss_class"]
    expected = Likelihood.loss(lik(feats[0, 1:2], emb), torch.tensor([0]), 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    empty = task.class_loss(feats, regional_index, emb, lik, [(torch.zeros(0, dtype=torch.long),) * 2], targets)
    assert empty["loss_class"].item() == 0.0 and empty["loss_class"].requires_grad


def test_postprocess_scores_boxes_and_masks_in_original_pixels():
    task = InstanceSegmentationTask(SPEC, test_topk=2)
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 48)])  # resized image 64 x 48, padded to 64 x 64
    logits = torch.tensor([[[10.0, 0.0, 0.0], [0.0, 0.0, 10.0]]])
    objectness = torch.tensor([[0.0, 10.0]])
    boxes = torch.tensor([[[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    masks = torch.full((1, 2, 16, 16), -10.0)
    masks[0, 1, :8, :8] = 10.0
    (out,) = task.detections(logits, objectness, boxes, masks, images, [{"height": 128, "width": 96}])
    inst = out["instances"]
    assert inst.image_size == (128, 96)
    assert inst.pred_classes.tolist() == [2, 0]
    assert inst.scores[0] == pytest.approx(torch.sigmoid(torch.tensor(10.0)).item() * (1 / (1 + 2 * torch.exp(torch.tensor(-10.0)).item())), rel=1e-4)
    # box 2 covers the padded image; clipped to the 48-px-wide resized image, then scaled by 2
    assert torch.allclose(inst.pred_boxes.tensor[0], torch.tensor([0.0, 0.0, 96.0, 128.0]))
    # box 1 is xyxy (0, 0, 32, 32) in the resized image, scaled by 2
    assert torch.allclose(inst.pred_boxes.tensor[1], torch.tensor([0.0, 0.0, 64.0, 64.0]))
    assert inst.pred_masks.shape == (2, 128, 96)
    frac = inst.pred_masks[0].float().mean().item()  # top-left 32 x 32 of the 64 x 48 image
    assert frac == pytest.approx((32 * 32) / (64 * 48), abs=0.03)
