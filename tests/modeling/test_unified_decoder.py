import torch

from up2.modeling.unified_decoder import UnifiedDecoder, build_attention_mask
from up2.structures import AttentionKind, TokenBatch


def _batch(B=2, T=5, d=16, pad_last=(0, 2), prefix=None, kind=AttentionKind.BIDIRECTIONAL):
    pad = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(pad_last):
        if n:
            pad[b, -n:] = True
    return TokenBatch(tokens=torch.randn(B, T, d), padding_mask=pad, attention=kind, prefix_length=prefix)


def test_prefix_causal_mask_matches_brute_force():
    batch = _batch(T=6, pad_last=(0, 1), prefix=torch.tensor([2, 4]), kind=AttentionKind.PREFIX_CAUSAL)
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
    short = dec(TokenBatch(tokens=x, padding_mask=torch.zeros(1, 3, dtype=torch.bool)))
    padded = torch.cat([x, torch.randn(1, 4, 16)], dim=1)
    pad = torch.tensor([[False] * 3 + [True] * 4])
    long = dec(TokenBatch(tokens=padded, padding_mask=pad))
    assert torch.allclose(short, long[:, :4], atol=1e-5)


def test_causal_future_does_not_leak():
    torch.manual_seed(0)
    dec = UnifiedDecoder(embed_dim=16, num_layers=2, num_heads=2, ffn_dim=32, dropout=0.0).eval()
    x = torch.randn(1, 6, 16)
    pad = torch.zeros(1, 6, dtype=torch.bool)
    kw = dict(attention=AttentionKind.PREFIX_CAUSAL, prefix_length=torch.tensor([2]))
    a = dec(TokenBatch(tokens=x, padding_mask=pad, **kw))
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, 16)  # change the future of token 3
    b = dec(TokenBatch(tokens=y, padding_mask=pad, **kw))
    # outputs (with [SPE] at 0) up to input token 3 are unchanged; token 4 changes
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-5)
    assert not torch.allclose(a[:, 5], b[:, 5])


def test_spe_is_prepended_and_gradients_flow():
    dec = UnifiedDecoder(embed_dim=16, num_layers=1, num_heads=2, ffn_dim=32, dropout=0.0)
    out = dec(_batch())
    assert out.shape == (2, 6, 16)
    out[:, 0].sum().backward()
    assert dec.spe.grad is not None and dec.spe.grad.abs().sum() > 0
