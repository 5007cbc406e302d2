"""ProposalDecoder (query selection + DINO decoder) and contrastive denoising queries."""
import pytest
import torch
from conftest import assert_grad_norm, random_projection
from torchvision.ops import box_convert

from up2.modeling.proposal.decoder import ProposalDecoder
from up2.modeling.proposal.query_selection import boxes_from_mask_embed, pixel_anchors
from up2.modeling.proposal.denoising import build_denoising_queries
from up2.structures import PixelDecoderOutput

D, SHAPES, HM = 32, [(2, 2), (4, 4), (8, 8)], 16


def _enc(n=2, padding=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(SHAPES, dtype=torch.long)
    sizes = shapes.prod(1)
    s = int(sizes.sum())
    memory = torch.randn(n, s, D, generator=g)
    pad = None
    if padding:  # image 1: right half padded on every level
        pad = torch.cat([torch.zeros(n, h, w, dtype=torch.bool).index_fill(2, torch.arange(w // 2, w), True)
                         .flatten(1) for h, w in SHAPES], dim=1)
        pad[0] = False
    return PixelDecoderOutput(
        mask_features=torch.randn(n, D, HM, HM, generator=g),
        memory=memory,
        spatial_shapes=shapes,
        level_start_index=torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1])),
        level_shapes=tuple(SHAPES),
        padding_mask=pad,
        multi_scale_features=[],
    )


def _decoder(**kw):
    args = dict(hidden_dim=D, num_heads=2, num_levels=len(SHAPES), num_points=2, num_layers=2, ffn_dim=64,
                num_queries=6, dn_num=8, dn_box_noise=0.4, init_box_from_mask=True)
    args.update(kw)
    torch.manual_seed(0)
    return ProposalDecoder(**args)


GT = [torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.7, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]]),
      torch.tensor([[0.5, 0.4, 0.3, 0.3]])]


def test_shapes_and_ranges():
    dec = _decoder().eval()
    out = dec(_enc())
    assert len(out.layers) == 3 and out.dn_layers is None and out.denoising is None
    for p in [out.interm] + out.layers:
        assert p.objectness.shape == (2, 6) and p.boxes.shape == (2, 6, 4)
        assert bool(((p.boxes >= 0) & (p.boxes <= 1)).all())
    # masks are carried as embeddings: without targets only the last layer's (and the selection
    # stage's) mask head runs
    assert all(p.masks is None for p in [out.interm] + out.layers)
    assert out.interm.mask_logits().shape == (2, 6, HM, HM) and out.layers[-1].mask_logits().shape == (2, 6, HM, HM)
    assert all(p.mask_embed is None and p.mask_logits() is None for p in out.layers[:-1])
    last = out.layers[-1]
    torch.testing.assert_close(last.mask_logits(), torch.einsum("nqd,ndhw->nqhw", last.mask_embed, last.mask_features))
    # with targets every layer has masks (for the losses), and the last layer is the same
    full = dec(_enc(), GT)
    assert all(p.mask_logits().shape == (2, 6, HM, HM) for p in full.layers)
    # (eval: no denoising queries, so the last layer is the same computation on the same inputs)
    for name in ("objectness", "boxes", "mask_embed"):
        torch.testing.assert_close(getattr(full.layers[-1], name), getattr(out.layers[-1], name), rtol=0, atol=0)
    assert out.query_features.shape == (2, 6, D)
    # final LayerNorm: zero mean, unit variance per query (default affine init)
    torch.testing.assert_close(out.query_features.mean(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding", [False, True])
def test_topk_selects_highest_scoring_valid_pixels(padding):
    dec = _decoder(init_box_from_mask=False).eval()
    enc = _enc(padding=padding)
    anchors, valid = pixel_anchors(enc)
    memory = dec.enc_output_norm(dec.enc_output(enc.memory.masked_fill(~valid[..., None], 0.0)))
    scores = dec.enc_objectness(memory)[..., 0]
    out = dec(enc)
    for i in range(2):
        ranked = scores[i][valid[i]].sort(descending=True).values
        torch.testing.assert_close(out.interm.objectness[i].detach().sort(descending=True).values, ranked[:6])
    if padding:
        # image 1's right half is padding: every selected anchor centre has x < 0.5
        sel = scores[1].masked_fill(~valid[1], float("-inf")).topk(6).indices
        assert bool((anchors[1, sel, 0] < 0.5).all())
    # with zero-initialised box deltas, the selected boxes are the anchors: side 0.05 * 2**rank
    sides = out.interm.boxes[..., 2].detach()
    allowed = torch.tensor([0.05, 0.1, 0.2])  # finest (8x8) .. coarsest (2x2)
    assert bool(((sides[..., None] - allowed).abs().min(-1).values < 1e-4).all())


def boxes_from_masks(logits, fallback, chunk=32):
    """``boxes_from_mask_embed`` of given logits (N, Q, H, W): mask features = the one-hot basis
    of the H*W pixels, embeddings = the logits, so every product is exactly one logit."""
    n, q, h, w = logits.shape
    basis = torch.eye(h * w).view(1, h * w, h, w).expand(n, -1, -1, -1)
    return boxes_from_mask_embed(logits.flatten(2), basis, fallback, chunk=chunk)


def test_boxes_from_masks_hand_computed():
    logits = torch.full((1, 2, 8, 8), -1.0)
    logits[0, 0, 2:4, 1:6] = 1.0  # rows 2-3, cols 1-5
    fallback = torch.full((1, 2, 4), 0.5)
    boxes = boxes_from_masks(logits, fallback)
    expected = box_convert(torch.tensor([[1 / 8, 2 / 8, 6 / 8, 4 / 8]]), "xyxy", "cxcywh")[0]
    torch.testing.assert_close(boxes[0, 0], expected)
    torch.testing.assert_close(boxes[0, 1], fallback[0, 1])  # empty mask -> fallback


def _boxes_brute_force(logits, fallback):
    """Per-mask loop over the pixels of ``logits > 0``: the reference for the vectorised boxes."""
    n, q, h, w = logits.shape
    out = fallback.clone()
    for i in range(n):
        for j in range(q):
            ys, xs = torch.nonzero(logits[i, j] > 0, as_tuple=True)
            if ys.numel():
                xyxy = torch.tensor([[xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]])
                out[i, j] = box_convert(xyxy, "xyxy", "cxcywh")[0]
    return out


def test_boxes_from_masks_match_a_pixel_loop():
    g = torch.Generator().manual_seed(3)
    # sparse blobs of every size, including single pixels, borders and empty masks
    logits = torch.randn(2, 9, 12, 17, generator=g) - 2.2
    logits[0, 0] = -1.0  # empty
    logits[1, 1, 11, 16] = 5.0  # the bottom-right pixel
    logits[1, 2] = 1.0  # everything
    fallback = torch.rand(2, 9, 4, generator=g)
    expected = _boxes_brute_force(logits, fallback)
    for chunk in (1, 4, 7, 100):
        torch.testing.assert_close(boxes_from_masks(logits, fallback, chunk), expected)
    torch.testing.assert_close(boxes_from_masks(logits, fallback)[0, 0], fallback[0, 0])


def test_boxes_from_mask_embed_equal_boxes_of_the_full_logits():
    g = torch.Generator().manual_seed(4)
    n, q, d, h, w = 2, 13, 8, 10, 14
    embed = torch.randn(n, q, d, generator=g)
    feats = torch.randn(n, d, h, w, generator=g)
    feats[:, -1] = 1.0  # a constant channel: embed[..., -1] is a bias that makes the masks sparse blobs
    embed[..., -1] = -torch.linspace(0.0, 4.0, q)
    embed[0, 3] = 0.0  # all logits 0: an empty mask
    fallback = torch.rand(n, q, 4, generator=g)
    logits = torch.einsum("nqd,ndhw->nqhw", embed, feats)
    # chunked bmm and einsum round differently; the data keeps every logit (but the all-zero
    # mask's) far from 0, so the boxes must agree exactly
    assert logits.abs().flatten(2).amin(2).masked_fill(embed.abs().amax(2) == 0, 1.0).min() > 1e-5
    expected = _boxes_brute_force(logits, fallback)
    for chunk in (1, 4, 100):
        torch.testing.assert_close(boxes_from_mask_embed(embed, feats, fallback, chunk=chunk), expected)
        cl = feats.contiguous(memory_format=torch.channels_last)  # any layout
        torch.testing.assert_close(boxes_from_mask_embed(embed, cl, fallback, chunk=chunk), expected)


def test_boxes_from_mask_embed_rejects_bad_input():
    embed, feats, fb = torch.randn(1, 3, 8), torch.randn(1, 8, 4, 4), torch.rand(1, 3, 4)
    with pytest.raises(ValueError, match="chunk"):
        boxes_from_mask_embed(embed, feats, fb, chunk=0)
    with pytest.raises(ValueError, match="mask_features"):
        boxes_from_mask_embed(embed, torch.randn(1, 7, 4, 4), fb)


def test_selection_boxes_come_from_the_selection_masks():
    """``init_box_from_mask``: the first layer's reference boxes are the boxes of the selected
    queries' masks (the interm mask logits), not the raw selection boxes."""
    enc = _enc(padding=True)
    with torch.no_grad():
        dec = _decoder().eval()
        interm, _, ref = dec.select_queries(enc)
        torch.testing.assert_close(ref, boxes_from_mask_embed(interm.mask_embed, enc.mask_features, interm.boxes),
                                   rtol=0, atol=0)
        out = dec(enc)
        torch.testing.assert_close(out.layers[0].boxes, ref, rtol=0, atol=0)  # stage 0 predicts on the refs
        plain = _decoder(init_box_from_mask=False).eval()(enc)
    assert not torch.allclose(plain.layers[0].boxes, out.layers[0].boxes)


def test_denoising_groups_noise_and_attention_mask():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(D, generator=g)
    dn = build_denoising_queries(GT, num_dn=20, box_noise_scale=0.4, num_matching=6, label_embedding=emb,
                                 generator=g)
    km, groups = 3, 20 // (2 * 3)
    assert dn.max_boxes == km and dn.num_groups == groups and dn.num_queries == 2 * groups * km
    t = dn.num_queries
    # padding: image 1 has one box -> slots 1, 2 of each half-group are padding
    slot = torch.arange(t) % km
    assert torch.equal(dn.padding_mask[0], torch.zeros(t, dtype=torch.bool))
    assert torch.equal(dn.padding_mask[1], slot >= 1)
    assert bool((dn.content[1, dn.padding_mask[1]] == 0).all())
    torch.testing.assert_close(dn.content[0], emb.expand(t, D))
    # objectness targets: 1 on positive (first half of each group) valid slots
    is_pos = (torch.arange(t) % (2 * km)) < km
    assert torch.equal(dn.objectness_target.bool(), is_pos[None] & ~dn.padding_mask)
    for i, (q, k) in enumerate(dn.positive_matches):
        assert q.numel() == groups * GT[i].shape[0] and bool(is_pos[q].all()) and torch.equal(k, q % km)
    # noise magnitude: positive corners move < lambda * half side, negatives in [lambda, 2 lambda)
    for i in range(2):
        valid = ~dn.padding_mask[i]
        src = GT[i][torch.arange(t) % km % GT[i].shape[0]]
        moved = (box_convert(dn.boxes[i], "cxcywh", "xyxy") - box_convert(src, "cxcywh", "xyxy")).abs()
        half = (src[:, 2:] / 2).repeat(1, 2)
        ratio = moved / (half * 0.4)
        pos, neg = valid & is_pos, valid & ~is_pos
        assert bool((ratio[pos] <= 1 + 1e-4).all())
        unclipped = neg[:, None] & (box_convert(dn.boxes[i], "cxcywh", "xyxy") > 0) & (
            box_convert(dn.boxes[i], "cxcywh", "xyxy") < 1)
        assert bool((ratio[unclipped] >= 1 - 1e-4).all())
        assert bool((ratio[neg[:, None].expand(-1, 4)] <= 2 + 1e-4).all())
    # attention: matching queries see no dn query; dn queries see own group + all matching
    m = dn.attn_mask
    assert m.shape == (t + 6, t + 6)
    assert bool(m[t:, :t].all()) and not bool(m[t:, t:].any()) and not bool(m[:t, t:].any())
    group = torch.arange(t) // (2 * km)
    assert torch.equal(m[:t, :t], group[:, None] != group[None, :])


def test_denoising_none_and_errors():
    torch.manual_seed(0)  # the noise of build_denoising_queries without a generator
    emb = torch.zeros(D)
    assert build_denoising_queries([torch.zeros(0, 4)] * 2, num_dn=8, box_noise_scale=0.4, num_matching=4,
                                   label_embedding=emb) is None
    assert build_denoising_queries(GT, num_dn=0, box_noise_scale=0.4, num_matching=4, label_embedding=emb) is None
    dn = build_denoising_queries(GT, num_dn=2, box_noise_scale=0.4, num_matching=4, label_embedding=emb)
    assert dn.num_groups == 1  # at least one group
    with pytest.raises(ValueError, match="gt_boxes\\[0\\]"):
        build_denoising_queries([torch.zeros(3)], num_dn=8, box_noise_scale=0.4, num_matching=4,
                                label_embedding=emb)


def test_matching_queries_do_not_see_denoising_queries():
    dec = _decoder().train()
    enc = _enc()
    with_dn = dec(enc, GT)
    assert with_dn.denoising is not None and len(with_dn.dn_layers) == 3
    assert with_dn.dn_layers[-1].boxes.shape == (2, with_dn.denoising.num_queries, 4)
    dec.dn_num = 0
    without = dec(enc, GT)
    assert without.denoising is None
    for a, b in zip(with_dn.layers, without.layers):
        torch.testing.assert_close(a.boxes, b.boxes)
        torch.testing.assert_close(a.objectness, b.objectness)
    torch.testing.assert_close(with_dn.query_features, without.query_features)
    assert dec.eval()(enc, GT).denoising is None  # no denoising at inference


def test_gradients_and_bf16_autocast():
    dec = _decoder().train()
    enc = _enc()
    enc.memory.requires_grad_(True)
    out = dec(enc, GT)
    loss = sum(p.objectness.sum() + p.boxes.sum() + p.mask_logits().mean() for p in out.layers + out.dn_layers)
    (loss + out.interm.objectness.sum()).backward()
    # (norms here: memory 5.6, enc_objectness 34, dn_label_embed 14)
    assert_grad_norm(enc.memory.grad, 0.5, "memory")
    assert_grad_norm(dec.enc_objectness.weight.grad, 1.0, "enc_objectness")  # selection head, via interm
    assert_grad_norm(dec.dn_label_embed.weight.grad, 1.0, "dn_label_embed")
    # q^sem is post-LayerNorm (unit weight, zero bias): its sum has an exactly-zero gradient
    # (5e-8 of rounding noise reached the memory); a fixed random projection reaches it (5.3)
    enc.memory.grad = None
    random_projection(dec(enc, GT).query_features).backward()
    assert_grad_norm(enc.memory.grad, 0.5, "memory via query_features")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec.eval()(_enc())
    assert torch.isfinite(out.layers[-1].boxes.float()).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_queries"):
        _decoder(num_queries=100).eval()(_enc())
    with pytest.raises(ValueError, match="levels"):
        _decoder(num_levels=4)(_enc())
    with pytest.raises(ValueError, match="hidden_dim"):
        _decoder(hidden_dim=30)


def _box_deltas_and_stage_boxes(look_forward_twice: bool):
    """Train-mode forward with targets; returns (the box head's output after each decoder layer,
    the decoder output, the box head's last Linear). The box head is shared by the layers, so its
    per-layer outputs delta_i (captured by a forward hook) stand for "layer i's box head"."""
    dec = _decoder(look_forward_twice=look_forward_twice, num_layers=3).train()
    deltas = []
    dec.box_head.register_forward_hook(lambda module, args, out: deltas.append(out))
    out = dec(_enc(), GT)
    return deltas, out, dec.box_head.layers[-1]


def test_look_forward_twice_box_loss_of_layer_i_trains_layer_i_minus_1():
    """DINO §3.5 / MaskDINO: the box predicted after layer i is
    sigmoid(delta_i + inverse_sigmoid(ref_{i-1})) with ref_{i-1} undetached, so the box loss of layer i reaches delta_{i-1}; the reference the
    next layer reads stays detached (no gradient to delta_{i-2}). Without the feature (Deformable
    DETR) no path leads from layer i's box to delta_{i-1}."""
    target = torch.tensor([0.4, 0.45, 0.3, 0.25])
    deltas, out, head = _box_deltas_and_stage_boxes(True)
    assert len(deltas) == 3 and len(out.layers) == 4  # stage j = after layer j-1 (stage 0: initial queries)
    loss = (out.layers[3].boxes - target).abs().sum()  # the box L1 loss of layer 2 (the last layer)
    g = torch.autograd.grad(loss, deltas, allow_unused=True, retain_graph=True)
    assert_grad_norm(g[2], 1e-2, "delta_2 (its own layer)")
    assert_grad_norm(g[1], 1e-2, "delta_1 (the layer before)")
    assert g[0] is None  # ref_0 is detached where ref_1 is computed: two layers back is cut

    deltas0, out0, head0 = _box_deltas_and_stage_boxes(False)
    loss0 = (out0.layers[3].boxes - target).abs().sum()
    g0 = torch.autograd.grad(loss0, deltas0, allow_unused=True, retain_graph=True)
    assert_grad_norm(g0[2], 1e-2, "delta_2 without look-forward-twice")
    assert g0[1] is None and g0[0] is None
    # the same boxes either way (only the gradient differs), denoising queries included
    for a, b in zip(out.layers + out.dn_layers, out0.layers + out0.dn_layers):
        torch.testing.assert_close(a.boxes, b.boxes, rtol=1e-5, atol=1e-6)
    # on the box head's parameters (shared by the layers, same init in both decoders): the part
    # of the gradient that arrives through delta_1 (norms here: 3.6 on the weight, 4.2 on the bias)
    for p, p0 in zip(head.parameters(), head0.parameters()):
        (gp,) = torch.autograd.grad(loss, [p], retain_graph=True)
        (gp0,) = torch.autograd.grad(loss0, [p0], retain_graph=True)
        assert_grad_norm(gp - gp0, 1.0, "box head gradient through the previous layer")
