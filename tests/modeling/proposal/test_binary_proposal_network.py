"""BinaryProposalNetwork end to end on a tiny config: API, loss keys, backward, overfitting one image."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from torchvision.ops import box_convert, box_iou

from up2.config import add_up2_config
from up2.modeling.proposal.binary_proposal_network import BinaryProposalNetwork
from up2.structures import ProposalOutput, ProposalTargets

IMG = 64
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def _cfg():
    cfg = get_cfg()
    add_up2_config(cfg)
    p = cfg.MODEL.PROPOSAL
    p.HIDDEN_DIM, p.NHEADS, p.ENC_LAYERS, p.DEC_LAYERS = 32, 2, 1, 2
    p.ENC_FFN_DIM = p.DEC_FFN_DIM = 64
    p.NUM_QUERIES, p.DN_NUM, p.TRAIN_NUM_POINTS = 10, 8, 256
    return cfg


def _net(seed=0):
    torch.manual_seed(seed)
    shapes = {f: ShapeSpec(channels=16, stride=s) for f, s in STRIDES.items()}
    return BinaryProposalNetwork(_cfg(), shapes)


def _features(n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f: torch.randn(n, 16, IMG // s, IMG // s, generator=g) for f, s in STRIDES.items()}


def _targets():
    boxes_px = torch.tensor([[10.0, 10.0, 40.0, 30.0], [20.0, 40.0, 50.0, 60.0]])  # xyxy pixels
    masks = torch.zeros(2, IMG, IMG, dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes_px.long().tolist()):
        masks[k, y0:y1, x0:x1] = True
    boxes = box_convert(boxes_px / IMG, "xyxy", "cxcywh")
    return ProposalTargets(boxes=boxes, masks=masks, labels=torch.tensor([3, 7]))


def _empty():
    return ProposalTargets(torch.zeros(0, 4), torch.zeros(0, IMG, IMG, dtype=torch.bool),
                           torch.zeros(0, dtype=torch.long))


def test_training_and_inference_api():
    net = _net().train()
    feats = _features(n=2)
    out, losses = net(feats, [_targets(), _empty()])
    assert isinstance(out, ProposalOutput)
    assert out.sem.shape == (2, 10, 32) and out.boxes.shape == (2, 10, 4)
    assert out.masks_of().shape == (2, 10, IMG // 4, IMG // 4) and out.objectness.shape == (2, 10)
    assert list(losses) == net.loss_keys and "loss_objectness" in losses and "loss_dice_dn" in losses
    assert len(out.matches) == 2 and out.matches[0][0].numel() == 2 and out.matches[1][0].numel() == 0
    sum(losses.values()).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.norm() ** 2 for g in grads).sqrt() > 1e-2  # the losses do train the network

    # a batch with no ground truth at all still gives every key
    net.zero_grad()
    _, empty_losses = net(feats, [_empty(), _empty()])
    assert list(empty_losses) == list(losses)
    sum(empty_losses.values()).backward()

    net.eval()
    with torch.no_grad():
        out, losses = net(feats)
        assert losses == {} and out.matches is None
        pad = torch.zeros(2, IMG, IMG, dtype=torch.bool)
        pad[1, :, 32:] = True
        out, _ = net(feats, padding_mask=pad)
    assert bool(((out.boxes >= 0) & (out.boxes <= 1)).all())


def test_bad_targets():
    net = _net()
    t = _targets()
    with pytest.raises(ValueError, match="targets\\[0\\].boxes"):
        net(_features(), [ProposalTargets(t.boxes * IMG, t.masks, t.labels)])
    with pytest.raises(ValueError, match="targets\\[0\\].masks"):
        net(_features(), [ProposalTargets(t.boxes, t.masks[:1], t.labels)])
    with pytest.raises(ValueError, match="2 targets for 1 images"):
        net(_features(), [t, t])


def test_overfits_one_image():
    net = _net().train()
    feats, target = _features(), _targets()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(40):
        out, losses = net(feats, [target])
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        out, _ = net(feats)
    iou = box_iou(box_convert(out.boxes[0], "cxcywh", "xyxy"), box_convert(target.boxes, "cxcywh", "xyxy"))
    assert bool((iou.max(0).values > 0.5).all()), iou.max(0).values


def test_bf16_autocast_forward_backward():
    net = _net().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, losses = net(_features(n=2), [_targets(), _empty()])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_masks_of_gives_the_mask_logits_of_any_proposals():
    """The network returns masks as embeddings (training and inference alike);
    ``ProposalOutput.masks_of`` gives the logits of any subset of proposals (and of all of them),
    equal to the last layer's full mask logits; with targets the output is the same kind."""
    net = _net().eval()
    feats = _features(n=2, seed=3)
    with torch.no_grad():
        out, _ = net(feats)
        full = net.decoder(net.pixel_decoder(feats)).layers[-1].mask_logits()  # (N, Q, Hm, Wm)
    assert out.masks is None and out.mask_embed.shape == (2, 10, 32) and out.mask_features.shape[:2] == (2, 32)
    index = torch.tensor([[3, 0, 9], [9, 9, 1]])
    picked = out.masks_of(index)
    assert picked.shape == (2, 3) + full.shape[2:]
    for n in range(2):
        for r in range(3):
            torch.testing.assert_close(picked[n, r], full[n, index[n, r]], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.masks_of(), full, rtol=0, atol=1e-5)
    given = ProposalOutput(sem=out.sem, boxes=out.boxes, masks=full, objectness=out.objectness)
    torch.testing.assert_close(given.masks_of(index), picked, rtol=0, atol=1e-5)
    net.train()
    trained, _ = net(feats, [_targets(), _targets()])
    assert trained.masks is None and trained.mask_embed.shape == (2, 10, 32)
    for bad in (torch.tensor([[0, 1]]), torch.tensor([0, 1]), index.int(), index.float()):  # wrong N, rank, dtype
        for o in (out, given):
            with pytest.raises(ValueError, match=r"index must be \(N=2, R\) int64"):
                o.masks_of(bad)
    with pytest.raises(ValueError, match="no masks"):
        ProposalOutput(sem=out.sem, boxes=out.boxes, masks=None, objectness=out.objectness).masks_of(index)
