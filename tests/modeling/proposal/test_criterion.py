"""ProposalCriterion: minimal at the ground truth, fixed keys (also for empty images), gradients,
hand-computed normalisation, denoising supervision."""
import pytest
import torch

from up2.modeling.proposal.criterion import ProposalCriterion
from up2.modeling.proposal.decoder import ProposalDecoderOutput, ProposalPredictions
from up2.modeling.proposal.denoising import build_denoising_queries
from up2.modeling.proposal.matcher import HungarianMatcher
from up2.structures import ProposalTargets

Q, HM, HP, D = 5, 32, 64, 8
GT_BOXES = torch.tensor([[0.3, 0.3, 0.25, 0.25], [0.7, 0.6, 0.3, 0.4]])


def _box_mask(box, size):
    """(size, size) bool mask of a normalised cxcywh box."""
    cx, cy, w, h = box.tolist()
    c = (torch.arange(size) + 0.5) / size
    inside_x = (c >= cx - w / 2) & (c <= cx + w / 2)
    inside_y = (c >= cy - h / 2) & (c <= cy + h / 2)
    return inside_y[:, None] & inside_x[None, :]


def _targets(with_masks=True, boxes=GT_BOXES):
    masks = torch.stack([_box_mask(b, HP) for b in boxes]) if with_masks and len(boxes) else (
        torch.zeros(0, HP, HP, dtype=torch.bool) if with_masks else None)
    return ProposalTargets(boxes.clone(), masks, torch.zeros(len(boxes), dtype=torch.long))


def _perfect_stage(perturb=0.0, requires_grad=False):
    """Queries 1 and 3 predict the ground truth exactly (confident), others background."""
    logits = torch.full((1, Q), -12.0)
    logits[0, [1, 3]] = 12.0
    boxes = torch.full((1, Q, 4), 0.5)
    boxes[0, 1], boxes[0, 3] = GT_BOXES[0], GT_BOXES[1]
    masks = torch.full((1, Q, HM, HM), -12.0)
    masks[0, 1] = _box_mask(GT_BOXES[0], HM).float() * 24 - 12
    masks[0, 3] = _box_mask(GT_BOXES[1], HM).float() * 24 - 12
    g = torch.Generator().manual_seed(1)
    logits = logits * (1 - 9 * perturb)  # less confident
    boxes = (boxes + perturb * torch.randn(boxes.shape, generator=g)).clamp(0.05, 0.95)
    masks = masks + perturb * 150 * torch.randn(masks.shape, generator=g)
    tensors = [t.clone().requires_grad_(requires_grad) for t in (logits, boxes, masks)]
    return ProposalPredictions(*tensors), tensors


def _output(num_stages, perturb=0.0, requires_grad=False, n_images=1, dn=None):
    stages, leaves = [], []
    for _ in range(num_stages + 1):
        p, t = _perfect_stage(perturb, requires_grad)
        if n_images > 1:
            p = ProposalPredictions(*(x.expand(n_images, *x.shape[1:]) for x in (p.objectness, p.boxes, p.masks)))
        stages.append(p)
        leaves += t
    return ProposalDecoderOutput(interm=stages[0], layers=stages[1:], query_features=torch.zeros(n_images, Q, D),
                                 dn_layers=None, denoising=dn), leaves


def _criterion(num_stages=3, **kw):
    kw.setdefault("with_denoising", False)
    return ProposalCriterion(matcher=HungarianMatcher(num_points=256), num_stages=num_stages, num_points=256,
                             oversample_ratio=2.0, importance_sample_ratio=0.5, **kw)


def test_minimal_at_ground_truth_and_larger_when_perturbed():
    torch.manual_seed(0)
    crit = _criterion()
    perfect, _ = crit(_output(3)[0], [_targets()])
    for key, v in perfect.items():
        # point-sampled mask losses keep a floor from the blurred boundary of the coarse mask
        # (0.5 to 1.4 over the point draws of seeds 0-5)
        assert v.item() < (1.5 if ("mask" in key or "dice" in key) else 1e-3), key
    for key in ("loss_box", "loss_giou", "loss_box_interm"):
        assert perfect[key].item() == pytest.approx(0.0, abs=1e-5)
    noisy, _ = crit(_output(3, perturb=0.1)[0], [_targets()])
    assert set(noisy) == set(perfect)
    for key in perfect:
        assert noisy[key].item() > perfect[key].item() + 0.05, key


def test_matches_and_hand_computed_box_loss():
    torch.manual_seed(0)
    crit = _criterion(box_weight=2.0, giou_weight=0.0)
    out, _ = _output(3)
    shift = torch.tensor([0.01, -0.02, 0.03, 0.0])
    out.layers[-1].boxes[0, 1] += shift  # last layer only
    losses, matches = crit(out, [_targets()])
    (pi, ti), = matches
    assert dict(zip(ti.tolist(), pi.tolist())) == {0: 1, 1: 3}
    # L1 summed over matches / (K_tot = 2), times the weight
    assert losses["loss_box"].item() == pytest.approx(2.0 * shift.abs().sum().item() / 2, rel=1e-5)
    assert losses["loss_giou"].item() == 0.0


def test_keys_fixed_for_empty_images_and_flags():
    torch.manual_seed(0)
    for with_masks in (True, False):
        for deep in (True, False):
            crit = _criterion(with_masks=with_masks, deep_supervision=deep, with_denoising=True)
            full, _ = crit(_output(3)[0], [_targets(with_masks)])
            out, leaves = _output(3, requires_grad=True, n_images=2)
            empty, matches = crit(out, [_targets(with_masks, torch.zeros(0, 4))] * 2)
            assert list(full) == list(empty) == crit.loss_keys()
            assert [m[0].numel() for m in matches] == [0, 0]
            assert all(("mask" in k or "dice" in k) == False for k in full) != with_masks
            assert ("loss_box_0" in full) == deep and "loss_box_interm" in full and "loss_box_dn" in full
            total = sum(empty.values())
            assert torch.isfinite(total)
            for key, v in empty.items():
                if "objectness" not in key:
                    assert v.item() == 0.0, key
                assert v.requires_grad, key
            total.backward()  # graph-connected
            # no ground truth: only the background objectness term pushes the logits
            assert leaves[0].grad is not None and leaves[0].grad.abs().sum() > 0


def test_box_only_targets_give_zero_mask_losses():
    torch.manual_seed(0)
    crit = _criterion()
    losses, _ = crit(_output(3, perturb=0.1)[0], [_targets(with_masks=False)])
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    assert losses["loss_box"].item() > 0


def test_gradients_flow_to_all_predictions():
    torch.manual_seed(0)
    crit = _criterion()
    out, leaves = _output(3, perturb=0.1, requires_grad=True)
    losses, _ = crit(out, [_targets()])
    sum(losses.values()).backward()
    for t in leaves:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_denoising_losses_use_known_targets():
    torch.manual_seed(0)
    crit = _criterion(num_stages=2, with_denoising=True)
    dn = build_denoising_queries([GT_BOXES], num_dn=8, box_noise_scale=0.4, num_matching=Q,
                                 label_embedding=torch.zeros(D))
    t = dn.num_queries
    pos = dn.objectness_target.bool()
    logits = torch.where(pos, torch.tensor(12.0), torch.tensor(-12.0))
    boxes = torch.full((1, t, 4), 0.5)
    masks = torch.full((1, t, HM, HM), -12.0)
    q_idx, k_idx = dn.positive_matches[0]
    boxes[0, q_idx] = GT_BOXES[k_idx]
    masks[0, q_idx] = torch.stack([_box_mask(b, HM) for b in GT_BOXES])[k_idx].float() * 24 - 12
    good = ProposalPredictions(logits, boxes, masks)
    out, _ = _output(2, dn=dn)
    out.dn_layers = [good] * 3
    losses, _ = crit(out, [_targets()])
    for key in [k for k in losses if "_dn" in k]:
        assert losses[key].item() < (1.0 if ("mask" in key or "dice" in key) else 1e-3), key
    # a negative predicted as foreground is penalised; its box is not supervised
    neg = (~pos[0]).nonzero()[0, 0]
    bad_logits, bad_boxes = logits.clone(), boxes.clone()
    bad_logits[0, neg] = 12.0
    bad_boxes[0, neg] = torch.tensor([0.9, 0.9, 0.1, 0.1])
    out.dn_layers = [ProposalPredictions(bad_logits, bad_boxes, masks)] * 3
    worse, _ = crit(out, [_targets()])
    assert worse["loss_objectness_dn"].item() > losses["loss_objectness_dn"].item() + 1.0
    assert worse["loss_box_dn"].item() == pytest.approx(losses["loss_box_dn"].item(), abs=1e-6)


def test_bad_inputs():
    crit = _criterion()
    with pytest.raises(ValueError, match="stages"):
        crit(_output(2)[0], [_targets()])
    with pytest.raises(ValueError, match="targets"):
        crit(_output(3)[0], [_targets(), _targets()])


def test_giou_loss_matches_torchvision():
    """giou_loss (clamps, no boolean indexing) against torchvision's generalized_box_iou_loss on
    overlapping, disjoint, nested, touching and degenerate (zero-area) box pairs."""
    from torchvision.ops import generalized_box_iou_loss

    from up2.modeling.proposal.criterion import giou_loss

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(64, 2, generator=g)
    wh = torch.rand(64, 2, generator=g) * 0.5
    a = torch.cat([xy, xy + wh], 1)
    b = a + torch.randn(64, 4, generator=g) * 0.2
    b = torch.cat([torch.min(b[:, :2], b[:, 2:]), torch.max(b[:, :2], b[:, 2:])], 1)
    special_a = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.2, 0.2], [0.3, 0.3, 0.3, 0.5]])
    special_b = torch.tensor([[0.5, 0.5, 0.7, 0.9], [0.2, 0.2, 0.4, 0.4], [0.2, 0.0, 0.4, 0.2], [0.1, 0.1, 0.6, 0.6]])
    a, b = torch.cat([a, special_a]), torch.cat([b, special_b])
    ours = giou_loss(a, b)
    torch.testing.assert_close(ours, generalized_box_iou_loss(a, b), rtol=0, atol=1e-6)
    assert ours[-4] > 1.0 and ours[-2] == pytest.approx(1.0, abs=1e-6)  # disjoint > 1; touching: IoU 0, no gap
