import inspect
import os
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_grad_norm, random_projection
from detectron2.config import CfgNode as CN
from torch.utils.checkpoint import checkpoint

from up2.modeling.moe import AttributeGate, ConditionalMoE, switch_balance_loss
from up2.modeling.tasks import TASK_REGISTRY
from up2.modeling.token_attributes import (
    ATTRIBUTE_DIM,
    Modality,
    Role,
    TokenAttention,
    TokenAttributes,
    concat_attributes,
    constant_attributes,
    encode_attributes,
    input_modalities,
)
from up2.modeling.unified_decoder import FeedForward, UnifiedDecoder
from up2.structures import TokenBatch

D, F_DIM = 16, 32
IMAGE_TEXT = input_modalities(Modality.IMAGE, Modality.TEXT)


def _attrs(B, T, modality=Modality.IMAGE, attention=TokenAttention.BIDIRECTIONAL, inputs=IMAGE_TEXT, role=Role.INPUT):
    return constant_attributes(B, T, modality=modality, role=role, attention=attention, inputs=inputs)


def _mixed_attributes(B=2, T_img=3, T_txt=4):
    """Image prefix (bidirectional) ++ caption (causal): two attribute groups."""
    return concat_attributes([
        _attrs(B, T_img),
        _attrs(B, T_txt, modality=Modality.TEXT, attention=TokenAttention.CAUSAL),
    ])


def _interleaved_attributes(B=3):
    """Five attribute groups interleaved along the sequence (modality, role and attention vary)."""
    modality = torch.tensor([[0, 1, 0, 1, 1, 0, 1]])
    role = torch.tensor([[0, 0, 0, 1, 1, 1, 0]])
    attention = torch.tensor([[0, 1, 0, 0, 0, 0, 1]])
    return encode_attributes(modality, role, attention, IMAGE_TEXT).expand(B, -1, -1)


def _reference_moe(moe, x, attributes):
    """Per token, in a loop: its own gate (eval), then each linear layer as the gate-weighted sum
    of the chosen experts' outputs, sum_e g_e (x W_e + b_e) -- no merged weights, no groups."""
    out = torch.zeros_like(x)
    flat_x, flat_a = x.reshape(-1, D), attributes.reshape(-1, ATTRIBUTE_DIM)
    flat_out = out.view(-1, D)
    gate = moe.gate
    for t in range(flat_x.shape[0]):
        logits = gate.logits(gate.norm(gate.embed(flat_a[t])))
        top, idx = logits.topk(moe.top_k)
        w = top.softmax(-1)
        h = sum(w[j] * (flat_x[t] @ moe.w1[e] + moe.b1[e]) for j, e in enumerate(idx.tolist()))
        h = F.gelu(h)
        flat_out[t] = sum(w[j] * (h @ moe.w2[e] + moe.b2[e]) for j, e in enumerate(idx.tolist()))
    return out


def test_attribute_layout_has_no_task_identity():
    a = TokenAttributes(Modality.TEXT, Role.TARGET, TokenAttention.CAUSAL, IMAGE_TEXT).encode()
    # [modality | role | attention | task input modalities (multi-hot)]
    assert ATTRIBUTE_DIM == 8 and a.tolist() == [0, 1, 0, 1, 0, 1, 1, 1]
    image_only = TokenAttributes(Modality.IMAGE, Role.INPUT, TokenAttention.BIDIRECTIONAL,
                                 input_modalities(Modality.IMAGE)).encode()
    assert image_only.tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    assert [f for f in TokenAttributes.__dataclass_fields__] == ["modality", "role", "attention", "inputs"]
    # tasks with the same input modalities give their tokens the same attributes, whatever the task
    by_type = {t: TASK_REGISTRY.get(t).input_modalities for t in
               ("classification", "detection", "instance_segmentation", "retrieval", "captioning", "masked_lm")}
    assert by_type["classification"] == by_type["detection"] == by_type["retrieval"] == {Modality.IMAGE}
    assert by_type["captioning"] == IMAGE_TEXT and by_type["masked_lm"] == {Modality.TEXT}
    # the gate reads A attribute numbers and nothing else; forward takes no task
    moe = ConditionalMoE(D, F_DIM, num_experts=4, top_k=2, attribute_dim=ATTRIBUTE_DIM)
    assert moe.gate.embed.in_features == ATTRIBUTE_DIM
    assert list(inspect.signature(moe.forward).parameters) == ["x", "attributes"]
    # index tensors broadcast and agree with the Enum path
    enc = encode_attributes(torch.tensor([[0, 1, 1]]), Role.TARGET, TokenAttention.CAUSAL, IMAGE_TEXT)
    assert enc.shape == (1, 3, ATTRIBUTE_DIM) and torch.equal(enc[0, 1], a) and enc.sum(-1).eq(5).all()


def test_bad_attributes_raise():
    with pytest.raises(ValueError, match="modality"):
        encode_attributes(torch.tensor([2]), Role.INPUT, TokenAttention.CAUSAL, IMAGE_TEXT)
    with pytest.raises(TypeError, match="Role"):
        encode_attributes(Modality.TEXT, Modality.TEXT, TokenAttention.CAUSAL, IMAGE_TEXT)
    with pytest.raises(ValueError, match="inputs"):
        encode_attributes(Modality.TEXT, Role.INPUT, TokenAttention.CAUSAL, [])
    with pytest.raises(TypeError, match="inputs"):
        _attrs(1, 2, inputs=Modality.TEXT)  # a member, not a collection
    with pytest.raises(TypeError, match="inputs"):
        _attrs(1, 2, inputs=["text"])
    with pytest.raises(ValueError, match="batch size"):
        concat_attributes([_attrs(2, 3), _attrs(3, 3)])


def test_merged_weight_forward_matches_per_token_reference():
    torch.manual_seed(0)
    moe = ConditionalMoE(D, F_DIM, num_experts=8, top_k=2, attribute_dim=ATTRIBUTE_DIM).eval()
    attributes = _interleaved_attributes()
    x = torch.randn(3, 7, D)
    idx, _ = moe.route(attributes)
    assert len({tuple(sorted(r)) for r in idx[0].tolist()}) >= 3  # several distinct expert pairs
    torch.testing.assert_close(moe(x, attributes)[0], _reference_moe(moe, x, attributes), rtol=1e-4, atol=1e-5)
    k1 = ConditionalMoE(D, F_DIM, num_experts=4, top_k=1, attribute_dim=ATTRIBUTE_DIM).eval()
    torch.testing.assert_close(k1(x, attributes)[0], _reference_moe(k1, x, attributes), rtol=1e-4, atol=1e-5)


def test_routing_depends_only_on_attributes():
    torch.manual_seed(1)
    moe = ConditionalMoE(D, F_DIM, num_experts=8, top_k=2, attribute_dim=ATTRIBUTE_DIM).eval()
    attributes = _interleaved_attributes()
    idx, w = moe.route(attributes)
    assert idx.shape == (3, 7, 2) and torch.allclose(w.sum(-1), torch.ones(3, 7))
    for a, b in ((0, 2), (3, 4)):  # equal attribute rows at two positions, in every sequence
        assert torch.equal(idx[:, a], idx[:, b]) and torch.equal(idx[:, a], idx[:1, a].expand(3, -1))
        assert torch.equal(w[:, a], w[:, b])
    # same attributes, other content -> the same merged FFN: moving a token's content next to
    # another token with its attributes gives that token's output
    x = torch.randn(3, 7, D)
    x2 = x.clone()
    x2[1, 2] = x[0, 0]
    torch.testing.assert_close(moe(x2, attributes)[0][1, 2], moe(x, attributes)[0][0, 0], rtol=1e-5, atol=1e-6)
    # the routing of a row does not depend on the other rows of the batch
    one = moe.route(attributes[:1, 3:4])[0]
    assert torch.equal(one[0, 0], idx[0, 3])


def test_gradients_reach_selected_experts_and_gate():
    torch.manual_seed(0)
    moe = ConditionalMoE(D, F_DIM, num_experts=6, top_k=2, attribute_dim=ATTRIBUTE_DIM).eval()
    attributes = _mixed_attributes()
    routed = set(moe.route(attributes)[0].unique().tolist())
    assert 2 <= len(routed) < 6
    x = torch.randn(2, 7, D, requires_grad=True)
    random_projection(moe(x, attributes)[0]).backward()
    for name in ("w1", "b1", "w2", "b2"):
        per_expert = getattr(moe, name).grad.flatten(1).abs().sum(1)
        for e in range(6):
            assert (per_expert[e] > 0) == (e in routed), (name, e)
    # the merge weights carry the task gradient into every layer of the gate
    for name in ("embed.weight", "norm.weight", "logits.weight"):
        assert_grad_norm(moe.gate.get_parameter(name).grad, 1e-3, f"gate.{name}")
    assert_grad_norm(x.grad, 1e-3, "x")


def test_gate_noise_only_in_training():
    torch.manual_seed(0)
    moe = ConditionalMoE(D, F_DIM, num_experts=8, top_k=2, attribute_dim=ATTRIBUTE_DIM, noise_std=1.0)
    with torch.no_grad():
        moe.gate.logits.weight.zero_()  # all logits equal: only the noise can break the tie
    attributes, x = _mixed_attributes(), torch.randn(2, 7, D)
    moe.eval()
    first = moe(x, attributes)[0]
    assert all(torch.equal(moe(x, attributes)[0], first) for _ in range(3))  # eval: deterministic
    assert all(torch.equal(moe.route(attributes)[0], moe.route(attributes)[0]) for _ in range(3))
    moe.train()
    chosen = {tuple(moe.route(attributes)[0][0, 0].sort().values.tolist()) for _ in range(20)}
    assert len(chosen) > 1  # 28 equally likely pairs: 20 draws all alike has probability 28^-19
    assert not torch.equal(moe(x, attributes)[0], moe(x, attributes)[0])
    _, _, weights = moe.gate(attributes[0, :1])
    assert 0 < (weights[0, 0] - weights[0, 1]).abs() < 1  # noisy logits: unequal weights
    quiet = ConditionalMoE(D, F_DIM, num_experts=8, top_k=2, attribute_dim=ATTRIBUTE_DIM, noise_std=0.0).train()
    assert torch.equal(quiet.route(attributes)[0], quiet.eval().route(attributes)[0])


def test_checkpointed_training_forward_replays_the_gate_noise():
    """Vocabulary targets run g under activation checkpointing (target_set.encode_vocabulary): the
    recomputation must draw the same gate noise, or the gradients would be of another routing."""
    torch.manual_seed(0)
    moe = ConditionalMoE(D, F_DIM, num_experts=8, top_k=2, attribute_dim=ATTRIBUTE_DIM).train()
    attributes, x = _mixed_attributes(), torch.randn(2, 7, D)
    grads = []
    for recompute in (False, True):
        moe.zero_grad()
        torch.manual_seed(5)
        y = checkpoint(moe, x, attributes, use_reentrant=False)[0] if recompute else moe(x, attributes)[0]
        random_projection(y).backward()
        grads.append([p.grad.clone() for p in moe.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


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
    for mode in (moe.train, moe.eval):
        mode()
        torch.testing.assert_close(moe(x, _mixed_attributes())[0], dense(x)[0], rtol=1e-5, atol=1e-6)


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
    moe = ConditionalMoE(D, F_DIM, num_experts=4, top_k=2, attribute_dim=ATTRIBUTE_DIM,
                         balance_loss_weight=0.5).eval()
    x, attributes = torch.randn(2, 7, D), _mixed_attributes()
    _, loss = moe(x, attributes)
    _, again = moe(x, attributes)
    assert loss.dim() == 0 and loss > 0
    torch.testing.assert_close(again, loss)  # returned by each call, not accumulated on the module
    loss.backward()
    assert_grad_norm(moe.gate.logits.weight.grad, 1e-3, "gate.logits.weight")
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
    with pytest.raises(ValueError, match="noise_std"):
        AttributeGate(ATTRIBUTE_DIM, D, num_experts=2, top_k=1, noise_std=-1.0)


def test_version_1_checkpoint_is_refused_with_a_clear_error():
    """Version 1 (whole-FFN experts, outputs mixed, one Linear gate over 11 attributes with the task
    family) has no counterpart here: its state dict is refused, not half-loaded."""
    moe = ConditionalMoE(D, F_DIM, num_experts=2, top_k=1, attribute_dim=ATTRIBUTE_DIM)
    old = {k: v for k, v in moe.state_dict().items() if not k.startswith("gate.")}
    old.update({"gate.weight": torch.zeros(2, 11), "gate.bias": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"gate\.weight is a version-1 ConditionalMoE"):
        moe.load_state_dict(old)
    moe.load_state_dict(moe.state_dict())  # this version loads


def test_bf16_autocast_cpu():
    torch.manual_seed(0)
    moe = ConditionalMoE(D, F_DIM, num_experts=4, top_k=2, attribute_dim=ATTRIBUTE_DIM).eval()
    x, attributes = torch.randn(2, 7, D), _mixed_attributes()
    ref = moe(x, attributes)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x, attributes)[0]
        idx, _ = moe.route(attributes)
    assert torch.equal(idx, moe.route(attributes)[0])  # routing is fp32 under autocast
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and torch.allclose(out.float(), ref, atol=0.1)
    random_projection(out).backward()
    assert moe.w1.grad.dtype == torch.float32
    for name in ("w1", "b1", "w2", "b2"):
        assert_grad_norm(getattr(moe, name).grad, 1e-2, name)
    assert_grad_norm(moe.gate.logits.weight.grad, 1e-3, "gate.logits.weight")


def test_deployment_count_of_swin_base_is_the_papers_308m():
    """Tab. 6: Uni-Perceiver-v2 BASE has 308M parameters, counting each MoE layer as k FFNs."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "projects", "benchmark"))
    try:
        import count_params
    finally:
        sys.path.pop(0)
    repo = os.path.join(os.path.dirname(__file__), "..", "..")
    with tempfile.TemporaryDirectory() as folder:
        count_params.write_roberta_base_config(folder)
        model = count_params.build_meta_model(os.path.join(repo, "configs", "up2_swin_base.yaml"), folder)
    full, deployed, parts = count_params.parameter_counts(model)
    assert abs(deployed / 308e6 - 1) < 0.02, deployed
    moe = [m for m in model.modules() if isinstance(m, ConditionalMoE)]
    assert len(moe) == 6 and all((m.num_experts, m.top_k) == (8, 2) for m in moe)
    per_expert = 768 * 3072 * 2 + 3072 + 768
    assert full - deployed == 6 * (8 - 2) * per_expert
    assert full == sum(parts.values())


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
    # (the old objective, out.square().mean(), gave norms of 1e-7 and 5e-6)
    for i, layer in enumerate(dec.layers):
        assert_grad_norm(layer.ffn.gate.logits.weight.grad, 1e-3, f"layers.{i}.ffn.gate.logits.weight")
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
    torch.manual_seed(3)  # the same gate noise in both passes
    full = dec(batch)
    torch.manual_seed(3)
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
