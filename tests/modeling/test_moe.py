import pytest
import torch
import torch.nn.functional as F
from conftest import assert_grad_norm, random_projection
from detectron2.config import CfgNode as CN

from up2.modeling.moe import ConditionalMoE, switch_balance_loss
from up2.modeling.token_attributes import (
    ATTRIBUTE_DIM,
    Modality,
    Role,
    TaskFamily,
    TokenAttention,
    TokenAttributes,
    concat_attributes,
    constant_attributes,
    encode_attributes,
)
from up2.modeling.unified_decoder import FeedForward, UnifiedDecoder
from up2.structures import TokenBatch

D, F_DIM = 16, 32


def _attrs(B, T, modality=Modality.IMAGE, attention=TokenAttention.BIDIRECTIONAL, task=TaskFamily.CAPTIONING):
    return constant_attributes(B, T, modality=modality, role=Role.INPUT, attention=attention, task=task)


def _mixed_attributes(B=2, T_img=3, T_txt=4):
    """Image prefix (bidirectional) ++ caption (causal): two attribute groups."""
    return concat_attributes([
        _attrs(B, T_img),
        _attrs(B, T_txt, modality=Modality.TEXT, attention=TokenAttention.CAUSAL),
    ])


def _reference_moe(moe, x, attributes):
    """Per-token loop over the full gate: independent of the grouped dispatch."""
    out = torch.zeros_like(x)
    flat_x, flat_a = x.reshape(-1, D), attributes.reshape(-1, ATTRIBUTE_DIM)
    flat_out = out.view(-1, D)
    for t in range(flat_x.shape[0]):
        logits = moe.gate(flat_a[t])
        top, idx = logits.topk(moe.top_k)
        w = top.softmax(-1)
        for j, e in enumerate(idx.tolist()):
            h = F.gelu(flat_x[t] @ moe.w1[e] + moe.b1[e])
            flat_out[t] += w[j] * (h @ moe.w2[e] + moe.b2[e])
    return out


def test_encode_attributes_is_one_hot_per_block():
    a = TokenAttributes(Modality.TEXT, Role.TARGET, TokenAttention.CAUSAL, TaskFamily.MLM).encode()
    assert a.shape == (ATTRIBUTE_DIM,) and ATTRIBUTE_DIM == 2 + 2 + 2 + len(TaskFamily)
    assert a.tolist() == [0, 1, 0, 1, 0, 1] + [0] * (len(TaskFamily) - 1) + [1]
    # index tensors broadcast and agree with the Enum path
    mod = torch.tensor([[0, 1, 1]])
    enc = encode_attributes(mod, Role.TARGET, TokenAttention.CAUSAL, TaskFamily.MLM)
    assert enc.shape == (1, 3, ATTRIBUTE_DIM)
    assert torch.equal(enc[0, 1], a) and enc[0, 0, 0] == 1 and enc.sum(-1).eq(4).all()
    with pytest.raises(ValueError, match="modality"):
        encode_attributes(torch.tensor([2]), Role.INPUT, TokenAttention.CAUSAL, TaskFamily.MLM)
    with pytest.raises(TypeError, match="Role"):
        encode_attributes(Modality.TEXT, Modality.TEXT, TokenAttention.CAUSAL, TaskFamily.MLM)
    with pytest.raises(ValueError, match="batch size"):
        concat_attributes([_attrs(2, 3), _attrs(3, 3)])
    assert _mixed_attributes().shape == (2, 7, ATTRIBUTE_DIM)


def test_routing_depends_only_on_attributes_and_matches_reference():
    torch.manual_seed(0)
    moe = ConditionalMoE(D, F_DIM, num_experts=4, top_k=2, attribute_dim=ATTRIBUTE_DIM)
    with torch.no_grad():  # make the two groups pick different experts, whatever the seed
        moe.gate.weight.zero_()
        moe.gate.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0]))
        moe.gate.weight[:2, 0] = torch.tensor([3.0, 2.0])  # image -> experts 0, 1
        moe.gate.weight[2:, 1] = torch.tensor([2.0, 3.0])  # text -> experts 3, 2
    attributes = _mixed_attributes()
    idx, w = moe.route(attributes)
    assert idx.shape == (2, 7, 2) and w.shape == (2, 7, 2)
    assert (idx[:, :3] == torch.tensor([0, 1])).all() and (idx[:, 3:] == torch.tensor([3, 2])).all()
    assert torch.allclose(w.sum(-1), torch.ones(2, 7))
    x = torch.randn(2, 7, D)
    # same attributes, different content -> same experts and weights; output is the same function
    x2 = x.clone()
    x2[1, 3:] = x[0, 3:]
    out, out2 = moe(x, attributes)[0], moe(x2, attributes)[0]
    assert torch.allclose(out2[1, 3:], out[0, 3:], atol=1e-6)
    assert torch.allclose(out, _reference_moe(moe, x, attributes), atol=1e-5)
    # observed through the gradients: two tokens with equal attributes and different content
    # use exactly the experts ``route`` chose for them
    for b, t in ((0, 4), (1, 6)):
        moe.zero_grad()
        moe(torch.randn(1, 1, D) * (b + 1), attributes[b, t][None, None])[0].sum().backward()
        used = moe.w1.grad.flatten(1).abs().sum(1).nonzero().flatten().tolist()
        assert sorted(used) == sorted(idx[b, t].tolist()) == [2, 3]


def test_random_gate_matches_reference_and_groups_route_alike():
    torch.manual_seed(1)
    moe = ConditionalMoE(D, F_DIM, num_experts=8, top_k=2, attribute_dim=ATTRIBUTE_DIM)
    tasks = torch.tensor([[0, 3, 0, 4, 3, 1]])  # interleaved groups
    attributes = encode_attributes(Modality.TEXT, Role.TARGET, TokenAttention.BIDIRECTIONAL, tasks).expand(3, -1, -1)
    x = torch.randn(3, 6, D)
    assert torch.allclose(moe(x, attributes)[0], _reference_moe(moe, x, attributes), atol=1e-5)
    # ``route`` gates every token's row in one GEMM, where BLAS may compute some rows with another
    # micro-kernel: equal attribute rows give logits equal up to fp32 rounding, not bit for bit.
    # The chosen experts are integers and must agree exactly; for that to be a property of the
    # code and not of the rounding, the top-k boundary of every row is far from a tie.
    logits = moe.gate(attributes[0])
    top = logits.sort(-1, descending=True).values
    assert (top[:, moe.top_k - 1] - top[:, moe.top_k]).min() > 1e-3
    idx, w = moe.route(attributes)
    for a, b in ((0, 2), (1, 4)):  # same task at both positions, in every sequence
        assert torch.equal(idx[:, a], idx[:, b]) and torch.equal(idx[:, a], idx[:1, a].expand(3, -1))
        torch.testing.assert_close(w[:, a], w[:, b], rtol=1e-5, atol=1e-6)
    assert not torch.equal(idx[0, 0], idx[0, 1])  # different tasks route differently here


def test_single_expert_equals_dense_ffn():
    torch.manual_seed(0)
    dense = FeedForward(D, F_DIM, dropout=0.0)
    moe = ConditionalMoE(D, F_DIM, num_experts=1, top_k=1, attribute_dim=ATTRIBUTE_DIM)
    with torch.no_grad():
        moe.w1[0].copy_(dense.fc1.weight.t())
        moe.b1[0].copy_(dense.fc1.bias)
        moe.w2[0].copy_(dense.fc2.weight.t())
        moe.b2[0].copy_(dense.fc2.bias)
    x = torch.randn(2, 7, D)
    assert torch.allclose(moe(x, _mixed_attributes())[0], dense(x)[0], rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_routed_experts():
    torch.manual_seed(0)
    moe = ConditionalMoE(D, F_DIM, num_experts=6, top_k=2, attribute_dim=ATTRIBUTE_DIM)
    attributes = _mixed_attributes()
    routed = set(moe.route(attributes)[0].unique().tolist())
    assert 2 <= len(routed) < 6
    x = torch.randn(2, 7, D, requires_grad=True)
    moe(x, attributes)[0].square().sum().backward()
    for name in ("w1", "b1", "w2", "b2"):
        per_expert = getattr(moe, name).grad.flatten(1).abs().sum(1)
        for e in range(6):
            assert (per_expert[e] > 0) == (e in routed), (name, e)
    assert moe.gate.weight.grad.abs().sum() > 0  # top-2 weights carry the task gradient to the gate
    assert x.grad.abs().sum() > 0


def test_balance_loss_hand_computation_and_pop():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    idx = torch.tensor([[0], [2]])
    counts = torch.tensor([3, 1])
    # f = [3/4, 0, 1/4]; P = (3*[.7,.2,.1] + [.1,.1,.8]) / 4 = [.55, .175, .275]
    expected = 3 * (0.75 * 0.55 + 0.25 * 0.275)
    assert torch.isclose(switch_balance_loss(probs, idx, counts), torch.tensor(expected))
    uniform = torch.full((2, 4), 0.25)
    assert torch.isclose(switch_balance_loss(uniform, torch.tensor([[0, 1], [2, 3]]), torch.tensor([5, 5])),
                         torch.tensor(1.0))

    torch.manual_seed(0)
    moe = ConditionalMoE(D, F_DIM, num_experts=4, top_k=2, attribute_dim=ATTRIBUTE_DIM, balance_loss_weight=0.5)
    x, attributes = torch.randn(2, 7, D), _mixed_attributes()
    _, loss = moe(x, attributes)
    _, again = moe(x, attributes)
    assert loss.dim() == 0 and loss > 0
    torch.testing.assert_close(again, loss)  # returned by each call, not accumulated on the module
    loss.backward()
    assert_grad_norm(moe.gate.weight.grad, 0.05, "gate.weight")  # 0.6 here
    assert ConditionalMoE(D, F_DIM, num_experts=4, top_k=2, attribute_dim=ATTRIBUTE_DIM)(x, attributes)[1] is None


def test_bad_inputs_raise():
    torch.manual_seed(0)
    moe = ConditionalMoE(D, F_DIM, num_experts=2, top_k=1, attribute_dim=ATTRIBUTE_DIM)
    with pytest.raises(ValueError, match="attributes"):
        moe(torch.randn(1, 3, D), None)
    with pytest.raises(ValueError, match="shape"):
        moe(torch.randn(1, 3, D), _attrs(1, 2))
    with pytest.raises(ValueError, match="top_k"):
        ConditionalMoE(D, F_DIM, num_experts=2, top_k=3, attribute_dim=ATTRIBUTE_DIM)


def test_bf16_autocast_cpu():
    torch.manual_seed(0)
    moe = ConditionalMoE(D, F_DIM, num_experts=4, top_k=2, attribute_dim=ATTRIBUTE_DIM)
    x, attributes = torch.randn(2, 7, D), _mixed_attributes()
    ref = moe(x, attributes)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x, attributes)[0]
        idx, _ = moe.route(attributes)
    assert torch.equal(idx, moe.route(attributes)[0])  # routing is fp32 under autocast
    assert torch.isfinite(out).all() and torch.allclose(out.float(), ref, atol=0.1)
    random_projection(out).backward()
    assert moe.w1.grad.dtype == torch.float32
    for name in ("w1", "b1", "w2", "b2"):  # norms 4..20 here
        assert_grad_norm(getattr(moe, name).grad, 1.0, name)
    assert_grad_norm(moe.gate.weight.grad, 0.1, "gate.weight")  # 5 here


def _moe_cfg(enabled=True):
    cfg = CN()
    cfg.MODEL = CN()
    g = cfg.MODEL.UNIFIED_DECODER = CN()
    g.EMBED_DIM, g.NUM_LAYERS, g.NUM_HEADS, g.FFN_DIM, g.DROPOUT = D, 2, 2, F_DIM, 0.0
    g.MOE = CN({"ENABLED": enabled, "NUM_EXPERTS": 4, "TOP_K": 2, "BALANCE_LOSS_WEIGHT": 0.01})
    return cfg


def test_unified_decoder_with_moe_forward_backward():
    torch.manual_seed(0)
    dec = UnifiedDecoder(_moe_cfg())
    assert all(isinstance(layer.ffn, ConditionalMoE) for layer in dec.layers)
    B, T = 2, 7
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, -2:] = True
    batch = TokenBatch(tokens=torch.randn(B, T, D), padding_mask=pad, attributes=_mixed_attributes(B),
                       attention=TokenAttention.CAUSAL, prefix_length=torch.tensor([3, 3]))
    result = dec(batch)
    out, balance = result.features, result.aux_loss
    assert out.shape == (B, T + 1, D) and torch.isfinite(out).all()
    assert balance is not None and balance.dim() == 0
    # the output is post-LayerNorm: out.square().mean() is ~1 whatever the input (zero gradient),
    # a fixed random projection is not
    (random_projection(out) + balance).backward()
    # (norms here: gates 1.6 and 3.7, w1 ~15, spe ~240; the old objective gave 1e-7 and 5e-6)
    for i, layer in enumerate(dec.layers):
        assert_grad_norm(layer.ffn.gate.weight.grad, 0.1, f"layers.{i}.ffn.gate.weight")
        assert_grad_norm(layer.ffn.w1.grad, 1.0, f"layers.{i}.ffn.w1")
    assert_grad_norm(dec.spe.grad, 1.0, "spe")
    with pytest.raises(ValueError, match="attributes"):
        dec(TokenBatch(tokens=torch.randn(B, T, D), padding_mask=pad))


def test_dense_default_is_unchanged_by_config_without_or_disabled_moe():
    cfg = _moe_cfg(enabled=False)
    torch.manual_seed(0)
    a = UnifiedDecoder(cfg)
    del cfg.MODEL.UNIFIED_DECODER["MOE"]
    torch.manual_seed(0)
    b = UnifiedDecoder(cfg)
    torch.manual_seed(0)
    c = UnifiedDecoder(embed_dim=D, num_layers=2, num_heads=2, ffn_dim=F_DIM, dropout=0.0)
    batch = TokenBatch(tokens=torch.randn(1, 3, D), padding_mask=torch.zeros(1, 3, dtype=torch.bool))
    assert isinstance(a.layers[0].ffn, FeedForward) and a(batch).aux_loss is None
    for other in (b, c):
        sa, so = a.state_dict(), other.state_dict()
        assert sa.keys() == so.keys() and all(torch.equal(sa[k], so[k]) for k in sa)


@pytest.mark.parametrize("read", [("spe",), ("image",), ("text",), ("image", "text"), None])
def test_unified_decoder_read_segments_equal_the_full_forward_rows(read):
    """``read`` (the segments a task reads) changes only how much the last layer computes:
    in eval the rows equal the full forward's (prefix-causal, padding, MoE routing by the kept
    rows' attributes); in training they are the full forward's rows, and the balance loss is
    the full forward's."""
    torch.manual_seed(0)
    dec = UnifiedDecoder(_moe_cfg())
    B, T = 2, 7
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, -2:] = True
    batch = TokenBatch(tokens=torch.randn(B, T, D), padding_mask=pad, attributes=_mixed_attributes(B),
                       attention=TokenAttention.CAUSAL, prefix_length=torch.tensor([3, 3]),
                       segments={"image": slice(0, 3), "text": slice(3, 7)})
    rows = {"spe": slice(0, 1), "image": slice(1, 4), "text": slice(4, 8)}
    dec.eval()
    full = dec(batch)
    part = dec(batch, read=read)
    for name in read or rows:
        # fewer rows in the last layer's GEMMs: equal up to fp32 rounding (~1e-6 on unit-size values)
        torch.testing.assert_close(part[name], full.features[:, rows[name]], rtol=1e-5, atol=1e-5)
    dec.train()
    full = dec(batch)
    part = dec(batch, read=read)
    for name in read or rows:
        torch.testing.assert_close(part[name], full.features[:, rows[name]], rtol=0, atol=0)
    torch.testing.assert_close(part.aux_loss, full.aux_loss, rtol=0, atol=0)


def test_unified_decoder_read_must_name_segments():
    torch.manual_seed(0)
    dec = UnifiedDecoder(_moe_cfg()).eval()
    batch = TokenBatch(tokens=torch.randn(1, 3, D), padding_mask=torch.zeros(1, 3, dtype=torch.bool),
                       attributes=_mixed_attributes(1)[:, :3], segments={"text": slice(0, 3)})
    for bad in (("image",), (), ("spe", "regional")):
        with pytest.raises(ValueError, match="segments"):
            dec(batch, read=bad)
    with pytest.raises(KeyError, match="no segment"):
        dec(batch, read=("text",))["spe"]
