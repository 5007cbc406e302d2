"""HungarianMatcher: cost terms vs per-pair hand computations, assignment vs brute force."""
import itertools
import math

import pytest
import torch

from up2.modeling.proposal.matcher import HungarianMatcher, point_sample, uncertain_point_coords
from up2.structures import ProposalTargets


def _xyxy(b):
    cx, cy, w, h = b.tolist()
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _giou_ref(a, b):
    ax0, ay0, ax1, ay1 = _xyxy(a)
    bx0, by0, bx1, by1 = _xyxy(b)
    iw, ih = max(0.0, min(ax1, bx1) - max(ax0, bx0)), max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _pair_cost(m, logit, box, tbox, mp=None, tp=None):
    """Independent scalar reference of one (query, instance) cost."""
    p = 1 / (1 + math.exp(-logit))
    a, g = m.focal_alpha, m.focal_gamma
    c = m.cost_objectness * (a * (1 - p) ** g * -math.log(p) - (1 - a) * p**g * -math.log(1 - p))
    c += m.cost_box * sum(abs(x - y) for x, y in zip(box.tolist(), tbox.tolist()))
    c -= m.cost_giou * _giou_ref(box, tbox)
    if mp is not None:
        probs = [1 / (1 + math.exp(-x)) for x in mp.tolist()]
        ts = tp.tolist()
        bce = sum(-(t * math.log(q) + (1 - t) * math.log(1 - q)) for q, t in zip(probs, ts)) / len(ts)
        dice = 1 - (2 * sum(q * t for q, t in zip(probs, ts)) + 1) / (sum(probs) + sum(ts) + 1)
        c += m.cost_mask * bce + m.cost_dice * dice
    return c


def _rand_boxes(g, n):
    c = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return torch.cat((c, wh), dim=1)


def _brute_force_min(cost):
    q, k = len(cost), len(cost[0])
    return min(sum(cost[p][j] for j, p in enumerate(perm)) for perm in itertools.permutations(range(q), k))


def test_cost_matrix_matches_pairwise_reference():
    g = torch.Generator().manual_seed(0)
    m = HungarianMatcher(cost_objectness=2.0, cost_box=5.0, cost_giou=2.0, cost_mask=3.0, cost_dice=1.5,
                         num_points=7)
    q, k, p = 4, 3, 7
    logits, boxes, tboxes = torch.randn(q, generator=g), _rand_boxes(g, q), _rand_boxes(g, k)
    mp, tp = torch.randn(q, p, generator=g), (torch.rand(k, p, generator=g) > 0.5).float()
    cost = m.cost_matrix(logits, boxes, tboxes, mp, tp)
    ref = torch.tensor([[_pair_cost(m, logits[i].item(), boxes[i], tboxes[j], mp[i], tp[j]) for j in range(k)]
                        for i in range(q)])
    torch.testing.assert_close(cost, ref, rtol=1e-5, atol=1e-5)
    cost_nomask = m.cost_matrix(logits, boxes, tboxes)
    ref_nomask = torch.tensor([[_pair_cost(m, logits[i].item(), boxes[i], tboxes[j]) for j in range(k)]
                               for i in range(q)])
    torch.testing.assert_close(cost_nomask, ref_nomask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_assignment_is_optimal_vs_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    m = HungarianMatcher(cost_objectness=4.0, cost_box=5.0, cost_giou=2.0)
    n, q = 3, 5
    logits, boxes = torch.randn(n, q, generator=g), torch.stack([_rand_boxes(g, q) for _ in range(n)])
    counts = [3, 0, 5]
    targets = [ProposalTargets(_rand_boxes(g, c), None, torch.zeros(c, dtype=torch.long)) for c in counts]
    matches = m(logits, boxes, targets)
    assert len(matches) == n
    for i, ((pi, ti), c) in enumerate(zip(matches, counts)):
        assert pi.dtype == torch.int64 and ti.dtype == torch.int64
        assert pi.numel() == ti.numel() == min(q, c)
        if c == 0:
            continue
        assert sorted(ti.tolist()) == list(range(c)) and len(set(pi.tolist())) == c
        ref = [[_pair_cost(m, logits[i, a].item(), boxes[i, a], targets[i].boxes[b]) for b in range(c)]
               for a in range(q)]
        total = sum(ref[a][b] for a, b in zip(pi.tolist(), ti.tolist()))
        assert total == pytest.approx(_brute_force_min(ref), abs=1e-4)


def test_mask_terms_steer_the_assignment():
    """Identical boxes and logits: only the (point-sampled) mask terms can decide the match."""
    q, k, size = 3, 2, 16
    box = torch.tensor([0.5, 0.5, 0.4, 0.4])
    boxes = box.expand(1, q, 4).clone()
    logits = torch.zeros(1, q)
    tgt_masks = torch.zeros(k, size, size, dtype=torch.bool)
    tgt_masks[0] = True  # instance 0 covers everything, instance 1 nothing
    pred = torch.tensor([-8.0, 8.0, 0.0])[None, :, None, None].expand(1, q, 8, 8)
    targets = [ProposalTargets(box.expand(k, 4).clone(), tgt_masks, torch.zeros(k, dtype=torch.long))]
    m = HungarianMatcher(cost_objectness=1.0, cost_box=1.0, cost_giou=1.0, cost_mask=5.0, cost_dice=5.0,
                         num_points=20)
    (pi, ti), = m(logits, boxes, targets, pred)
    assign = dict(zip(ti.tolist(), pi.tolist()))
    assert assign == {0: 1, 1: 0}


def test_point_sample_and_uncertain_points():
    img = torch.arange(16.0).view(1, 1, 4, 4)
    # centre of pixel (row 1, col 2) is at ((2 + .5) / 4, (1 + .5) / 4)
    v = point_sample(img, torch.tensor([[[2.5 / 4, 1.5 / 4]]]))
    assert v.shape == (1, 1, 1) and v.item() == pytest.approx(6.0)
    logits = torch.full((2, 1, 8, 8), 10.0)
    logits[:, :, :, 4:] = -10.0  # uncertain only at the vertical edge x = 0.5
    coords = uncertain_point_coords(logits, num_points=20, oversample_ratio=3, importance_sample_ratio=0.5)
    assert coords.shape == (2, 20, 2) and bool(((coords >= 0) & (coords <= 1)).all())
    near_edge = (coords[:, :10, 0] - 0.5).abs()
    assert near_edge.mean() < (coords[:, 10:, 0] - 0.5).abs().mean() + 0.05


def test_empty_and_bad_inputs():
    m = HungarianMatcher()
    out = m(torch.zeros(1, 4), torch.full((1, 4, 4), 0.5), [ProposalTargets(torch.zeros(0, 4), None,
                                                                             torch.zeros(0, dtype=torch.long))])
    assert out[0][0].numel() == 0 and out[0][1].numel() == 0
    with pytest.raises(ValueError, match="targets"):
        m(torch.zeros(2, 4), torch.full((2, 4, 4), 0.5), [])
    with pytest.raises(ValueError, match="cost_box"):
        HungarianMatcher(cost_box=-1.0)
