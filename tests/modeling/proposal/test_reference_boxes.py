"""Reference boxes of the proposal decoder in a detection-only task mix (issue 16 item 1).

MaskDINO initialises the selected queries' reference boxes from their predicted masks. Without a
task that supervises masks (the R50 mix: detection, classification, retrieval, captioning) the
mask head is untrained and every such box is the whole image; ``from_config`` then keeps the
query-selection boxes.
"""
import pytest
import torch
from conftest import seed_everything, tiny_cfg

from task_models import mapped_inputs, tiny_model
from up2.modeling.proposal.decoder import ProposalDecoder, proposal_masks_supervised

# the task types of configs/up2_R50.yaml (paper §5.3: no instance segmentation in the R50 runs)
R50_MIX = {"DETECTION": ("detection", {}), "CLASSIFICATION": ("classification", {}),
           "RETRIEVAL": ("retrieval", {}), "CAPTIONING": ("captioning", {"VOCABULARY": "dataset"})}


def _initial_boxes(model, inputs):
    """(N, Q, 4) reference boxes of the matching queries at the decoder's input (stage 0), from a
    training forward of the detection task; also returns that forward's losses."""
    grabbed = []
    hook = model.proposal_network.decoder.register_forward_hook(
        lambda module, args, out: grabbed.append(out.layers[0].boxes.detach()))
    losses = model(inputs, task="DETECTION")
    hook.remove()
    return grabbed[0], losses


def test_r50_mix_reference_boxes_are_not_the_whole_image_and_detection_trains(shapes_datasets):
    cfg, model = tiny_model(R50_MIX)
    assert model.proposal_network.decoder.init_box_from_mask is False  # no task supervises masks
    seed_everything(0)
    inputs = mapped_inputs(cfg, model, "DETECTION", n=1, is_train=True)
    model.train()
    boxes, losses = _initial_boxes(model, inputs)
    area = boxes[..., 2] * boxes[..., 3]
    # query-selection anchors (side 0.05 * 2**level); a whole-image box has area 1 (0.01 here)
    assert float(area.max()) < 0.25, float(area.max())

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    first = float(sum(losses.values()).detach())
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
        losses = model(inputs, task="DETECTION")
    last = float(sum(losses.values()).detach())
    assert last < 0.9 * first, (first, last)


def test_a_mask_supervising_task_turns_mask_initialised_boxes_on(shapes_datasets):
    """The contrast: with instance segmentation in the mix the boxes come from the (untrained)
    masks, and at initialisation they are the whole image, which is what the R50 mix avoids."""
    cfg, model = tiny_model(dict(R50_MIX, SEGMENTATION=("instance_segmentation", {})))
    assert model.proposal_network.decoder.init_box_from_mask is True
    seed_everything(0)
    model.train()
    boxes, _ = _initial_boxes(model, mapped_inputs(cfg, model, "DETECTION", n=2, is_train=True))
    area = boxes[..., 2] * boxes[..., 3]
    assert float(area.mean()) > 0.9, float(area.mean())


def test_config_key_is_an_upper_bound_and_the_task_list_decides():
    seg = tiny_cfg("instance_segmentation")
    det = tiny_cfg("detection")
    assert proposal_masks_supervised(seg) and not proposal_masks_supervised(det)
    assert ProposalDecoder.from_config(seg)["init_box_from_mask"] is True
    assert ProposalDecoder.from_config(det)["init_box_from_mask"] is False
    seg.MODEL.PROPOSAL.INIT_BOX_FROM_MASK = False  # the key turns it off even with masks
    assert ProposalDecoder.from_config(seg)["init_box_from_mask"] is False
    # no task (a proposal network on its own): the key alone decides
    assert proposal_masks_supervised(tiny_cfg(None))
    bad = tiny_cfg("segmentation")
    with pytest.raises(ValueError, match="TASKS.TASK.TYPE='segmentation'"):
        proposal_masks_supervised(bad)
