import pytest
import torch
from conftest import assert_grad_norm, random_projection

from up2.modeling.unified_decoder import UnifiedDecoder, build_attention_mask
from up2.structures import TokenAttention, TokenBatch


def _batch(B=2, T=5, d=16, pad_last=(0, 2), prefix=None, kind=TokenAttention.BIDIRECTIONAL):
    pad = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(pad_last):
        if n:
            pad[b, -n:] = True
    return TokenBatch(tokens=torch.randn(B, T, d), padding_mask=pad, attention=kind, prefix_length=prefix)


def test_prefix_causal_mask_matches_brute_force():
    torch.manual_seed(0)
    batch = _batch(T=6, pad_last=(0, 1), prefix=torch.tensor([2, 4]), kind=TokenAttention.CAUSAL)
    mask = build_attention_mask(batch)[:, 0]
    for b in range(2):
        for t in range(6):
            for s in range(6):
                expected = (not batch.padding_mask[b, s]) and (s <= t or s < batch.prefix_length[b])
                expected = expected or s == t
                assert bool(mask[b, t, s]) == expected, (b, t, s)


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    dec = UnifiedDecoder(embed_dim=16, num_layers=2, num_heads=2, ffn_dim=32, dropout=0.0).eval()
    x = torch.randn(1, 3, 16)
    short = dec(TokenBatch(tokens=x, padding_mask=torch.zeros(1, 3, dtype=torch.bool))).features
    padded = torch.cat([x, torch.randn(1, 4, 16)], dim=1)
    pad = torch.tensor([[False] * 3 + [True] * 4])
    long = dec(TokenBatch(tokens=padded, padding_mask=pad)).features
    assert torch.allclose(short, long[:, :4], atol=1e-5)


def test_causal_future_does_not_leak():
    torch.manual_seed(0)
    dec = UnifiedDecoder(embed_dim=16, num_layers=2, num_heads=2, ffn_dim=32, dropout=0.0).eval()
    x = torch.randn(1, 6, 16)
    pad = torch.zeros(1, 6, dtype=torch.bool)
    kw = dict(attention=TokenAttention.CAUSAL, prefix_length=torch.tensor([2]))
    a = dec(TokenBatch(tokens=x, padding_mask=pad, **kw)).features
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, 16)  # change the future of token 3
    b = dec(TokenBatch(tokens=y, padding_mask=pad, **kw)).features
    # outputs (with [SPE] at 0) up to input token 3 are unchanged; token 4 changes
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-5)
    assert not torch.allclose(a[:, 5], b[:, 5])


def test_spe_is_prepended_and_gradients_flow():
    """The output is post-LayerNorm (unit weight, zero bias at init), so ``out[:, 0].sum()`` has
    an exactly-zero gradient (only rounding noise, ~1e-6, reached [SPE]); a fixed random
    projection of the [SPE] row has a real one."""
    torch.manual_seed(0)
    dec = UnifiedDecoder(embed_dim=16, num_layers=1, num_heads=2, ffn_dim=32, dropout=0.0)
    batch = _batch()
    out = dec(batch).features
    assert out.shape == (2, 6, 16)
    # [SPE] is position 0 of every sequence: changing it (not by a constant, which a LayerNorm
    # removes) moves row 0
    step = torch.randn(dec.spe.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dec.spe.add_(step)
        moved = dec(batch).features
        dec.spe.sub_(step)
    assert (moved[:, 0] - out[:, 0]).abs().max() > 0.1
    random_projection(out[:, 0]).backward()
    assert_grad_norm(dec.spe.grad, 1.0, "spe")


def _mean_offdiagonal_cosine(x: torch.Tensor) -> float:
    x = torch.nn.functional.normalize(x, dim=-1)
    c = x @ x.T
    n = c.shape[0]
    return float((c.sum() - c.diagonal().sum()) / (n * n - n))


def test_spe_output_follows_the_content_at_initialisation():
    """Sequences sharing a large common component (as a from-scratch backbone's image tokens do,
    mean pairwise cosine about 0.9): with [SPE] outside the input LayerNorm the [SPE] outputs at
    initialisation keep several times more of the sequences' differences than when [SPE] is
    normalised to unit scale like the content (which then outweighs the attention's average)."""
    g = torch.Generator().manual_seed(0)
    B, T, d = 16, 25, 64
    tokens = 3.0 * torch.randn(1, T, d, generator=g) + torch.randn(B, T, d, generator=g)
    batch = TokenBatch(tokens=tokens, padding_mask=torch.zeros(B, T, dtype=torch.bool))
    content = _mean_offdiagonal_cosine(tokens.mean(1))
    spread = {}
    for norm in (False, True):
        torch.manual_seed(0)  # the same weights for both
        dec = UnifiedDecoder(embed_dim=d, num_layers=2, num_heads=4, ffn_dim=128, dropout=0.0,
                             spe_input_norm=norm).eval()
        with torch.no_grad():
            spread[norm] = 1.0 - _mean_offdiagonal_cosine(dec(batch, read=("spe",)).spe)
    assert 0.85 < content < 0.98
    assert spread[True] < 0.02  # nearly one vector for every sequence
    assert spread[False] > 3 * spread[True], spread


@pytest.mark.parametrize("spe_input_norm", [False, True])
def test_incremental_decoding_matches_forward_with_either_spe_input(spe_input_norm):
    torch.manual_seed(0)
    dec = UnifiedDecoder(embed_dim=16, num_layers=2, num_heads=2, ffn_dim=32, dropout=0.0,
                         spe_input_norm=spe_input_norm).eval()
    prefix, text, _, full = _prefix_and_text()
    full.attributes = prefix.attributes = None
    expected = dec(full).features[:, 1 + prefix.tokens.shape[1]:]
    out, _ = dec.extend(dec.prefill(prefix), text)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_spe_input_norm_config_defaults(tmp_path):
    """Configs built on Base-UP2.yaml leave [SPE] out of the input LayerNorm; a config.yaml
    written before the key existed (no SPE_INPUT_NORM) builds the model it was trained as."""
    import os

    from detectron2.config import get_cfg

    from up2 import add_up2_config

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = get_cfg()
    add_up2_config(cfg)
    assert cfg.MODEL.UNIFIED_DECODER.SPE_INPUT_NORM is True
    cfg.merge_from_file(os.path.join(repo, "configs", "tiny", "joint_shapes.yaml"))
    assert cfg.MODEL.UNIFIED_DECODER.SPE_INPUT_NORM is False
    assert UnifiedDecoder(cfg).spe_input_norm is False

    older = cfg.clone()  # a config.yaml dumped before the key existed
    del older.MODEL.UNIFIED_DECODER["SPE_INPUT_NORM"]
    path = tmp_path / "config.yaml"
    path.write_text(older.dump())
    reloaded = get_cfg()
    add_up2_config(reloaded)
    reloaded.merge_from_file(str(path))
    assert UnifiedDecoder(reloaded).spe_input_norm is True


def _moe_decoder(d=16):
    from functools import partial

    from up2.modeling.moe import ConditionalMoE
    from up2.modeling.token_attributes import ATTRIBUTE_DIM

    torch.manual_seed(0)
    moe = partial(ConditionalMoE, embed_dim=d, ffn_dim=32, num_experts=4, top_k=2, attribute_dim=ATTRIBUTE_DIM)
    return UnifiedDecoder(embed_dim=d, num_layers=3, num_heads=2, ffn_dim=32, dropout=0.0, ffn_factory=moe).eval()


def _prefix_and_text(B=2, Ti=5, T=4, d=16):
    from up2.modeling.token_attributes import Modality, Role, TokenAttention, constant_attributes, input_modalities

    inputs = input_modalities(Modality.IMAGE, Modality.TEXT)
    g = torch.Generator().manual_seed(1)
    img_pad = torch.zeros(B, Ti, dtype=torch.bool)
    img_pad[1, -2:] = True  # image 1 has 2 padded tokens
    img_attr = constant_attributes(B, Ti, modality=Modality.IMAGE, role=Role.INPUT,
                                   attention=TokenAttention.BIDIRECTIONAL, inputs=inputs)
    txt_attr = constant_attributes(B, T, modality=Modality.TEXT, role=Role.INPUT,
                                   attention=TokenAttention.CAUSAL, inputs=inputs)
    prefix = TokenBatch(tokens=torch.randn(B, Ti, d, generator=g), padding_mask=img_pad, attributes=img_attr)
    text = torch.randn(B, T, d, generator=g)
    full = TokenBatch(tokens=torch.cat((prefix.tokens, text), 1),
                      padding_mask=torch.cat((img_pad, torch.zeros(B, T, dtype=torch.bool)), 1),
                      attributes=torch.cat((img_attr, txt_attr), 1), attention=TokenAttention.CAUSAL,
                      prefix_length=torch.full((B,), Ti))
    return prefix, text, txt_attr, full


def test_incremental_decoding_equals_the_full_prefix_causal_forward():
    """prefill + extend (one token at a time, or several at once) give the text features of one
    forward over [SPE] ++ prefix ++ text, with padding in the prefix and MoE FFNs."""
    dec = _moe_decoder()
    prefix, text, txt_attr, full = _prefix_and_text()
    Ti = prefix.tokens.shape[1]
    expected = dec(full).features[:, 1 + Ti:]  # the text positions
    cache = dec.prefill(prefix)
    assert len(cache.layers) == 3 and cache.layers[0][0].shape == (2, 2, 1 + Ti, 8)
    steps = []
    for t in range(text.shape[1]):
        out, cache = dec.extend(cache, text[:, t : t + 1], txt_attr[:, t : t + 1])
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), expected, rtol=0, atol=1e-5)
    assert cache.padding_mask.shape == (2, 1 + Ti + text.shape[1])
    two, _ = dec.extend(dec.prefill(prefix), text[:, :2], txt_attr[:, :2])  # a block of two causal tokens
    torch.testing.assert_close(two, expected[:, :2], rtol=0, atol=1e-5)


def test_decoder_cache_reorder_follows_the_sequences():
    dec = _moe_decoder()
    prefix, text, txt_attr, full = _prefix_and_text()
    cache = dec.prefill(prefix)
    _, cache = dec.extend(cache, text[:, :1], txt_attr[:, :1])
    swapped = cache.reorder(torch.tensor([1, 0]))
    out, _ = dec.extend(swapped, text[[1, 0], 1:2], txt_attr[:, 1:2])
    expected = dec(full).features[:, 1 + prefix.tokens.shape[1] + 1]
    torch.testing.assert_close(out[:, 0], expected[[1, 0]], rtol=0, atol=1e-5)
    same = cache.reorder(torch.tensor([0, 1]))
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(same.layers, cache.layers))
    with pytest.raises(ValueError, match="index values"):
        cache.reorder(torch.tensor([0, 2]))
    doubled = cache.reorder(torch.tensor([1, 1]))
    for (k, _), (k0, _) in zip(doubled.layers, cache.layers):
        assert torch.equal(k[0], k[1]) and torch.equal(k[0], k0[1])


def test_incremental_decoding_rejects_training_mode_and_bad_shapes():
    import pytest

    torch.manual_seed(0)
    dec = _moe_decoder()
    prefix, text, txt_attr, _ = _prefix_and_text()
    cache = dec.prefill(prefix)
    with pytest.raises(ValueError, match="tokens must be"):
        dec.extend(cache, text[:1, :1], txt_attr[:1, :1])
    with pytest.raises(ValueError, match=r"tokens must be \(B, T, 16\)"):
        dec.prefill(TokenBatch(tokens=torch.randn(2, 3, 8), padding_mask=torch.zeros(2, 3, dtype=torch.bool)))
    dec.train()
    with pytest.raises(RuntimeError, match="eval"):
        dec.prefill(prefix)
    with pytest.raises(RuntimeError, match="eval"):
        dec.extend(cache, text[:, :1], txt_attr[:, :1])


def test_incremental_decoding_rejects_mismatched_caches_and_prefixes():
    import pytest

    dec = _moe_decoder()
    prefix, text, txt_attr, full = _prefix_and_text()
    shallow = UnifiedDecoder(embed_dim=16, num_layers=2, num_heads=2, ffn_dim=32, dropout=0.0).eval()
    with pytest.raises(ValueError, match="cache holds 2 layers"):
        dec.extend(shallow.prefill(TokenBatch(prefix.tokens, prefix.padding_mask)), text[:, :1], txt_attr[:, :1])
    four_heads = UnifiedDecoder(embed_dim=16, num_layers=3, num_heads=4, ffn_dim=32, dropout=0.0).eval()
    with pytest.raises(ValueError, match="cache keys must be"):
        dec.extend(four_heads.prefill(TokenBatch(prefix.tokens, prefix.padding_mask)), text[:, :1], txt_attr[:, :1])
    with pytest.raises(ValueError, match="bidirectionally"):  # text already in the "prefix"
        dec.prefill(full)
    with pytest.raises(ValueError, match="padding_mask"):
        dec.prefill(TokenBatch(prefix.tokens, prefix.padding_mask[:, :-1], prefix.attributes))
    with pytest.raises(ValueError, match="tokens must be"):
        dec.extend(dec.prefill(prefix), text[:, 0], txt_attr[:, :1])
    cache = dec.prefill(prefix)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        cache.reorder(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="1-D int64"):
        cache.reorder([0, 1])


def test_unpadded_bidirectional_batch_attends_without_a_mask(monkeypatch):
    """has_padding=False: SDPA runs with no mask (FlashAttention can serve on GPUs), and the
    features, gradients and incremental-decoding cache match the masked path."""
    import up2.modeling.unified_decoder as ud

    masks = []
    real = ud.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        masks.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(ud.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    dec = UnifiedDecoder(embed_dim=16, num_layers=2, num_heads=2, ffn_dim=32, dropout=0.0)
    tokens = torch.randn(3, 7, 16)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    runs = {}
    for declared in (None, False):
        masks.clear()
        x = tokens.clone().requires_grad_(True)
        out = dec(TokenBatch(tokens=x, padding_mask=pad, has_padding=declared, segments={"all": slice(0, 7)}))
        (out.features * random_projection(out.features)).sum().backward()
        runs[declared] = (out.features.detach(), x.grad, [m is None for m in masks])
    assert runs[None][2] == [False, False] and runs[False][2] == [True, True]
    torch.testing.assert_close(runs[False][0], runs[None][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[False][1], runs[None][1], rtol=1e-5, atol=1e-5)

    dec.eval()
    caches = {d: dec.prefill(TokenBatch(tokens=tokens, padding_mask=pad, has_padding=d)) for d in (None, False)}
    for (k0, v0), (k1, v1) in zip(caches[None].layers, caches[False].layers):
        torch.testing.assert_close(k1, k0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-5)


def test_causal_and_padded_batches_keep_the_mask():
    """has_padding=False does not drop the mask of a prefix-causal batch; unknown padding masks."""
    batch = _batch(pad_last=(0, 0), prefix=torch.tensor([2, 3]), kind=TokenAttention.CAUSAL)
    batch.has_padding = False
    mask = build_attention_mask(batch)
    assert mask is not None and not bool(mask[0, 0, 0, 4])  # the prefix does not see the future
    assert build_attention_mask(_batch(pad_last=(0, 0))) is not None
