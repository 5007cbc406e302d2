import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cfg
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

from up2 import add_up2_config
from up2.modeling.image_encoder import ImageEncoder, select_regional_proposals
from up2.modeling.proposal.position_encoding import box_sine_encoding
from up2.structures import ProposalOutput


def _encoder(**kw):
    args = dict(global_channels=8, global_stride=32, proposal_dim=16, embed_dim=24, num_attn_pools=2,
                num_regional_tokens=3, mask_pool_size=4, num_heads=2)
    args.update(kw)
    return ImageEncoder(**args)


def _proposals(N=2, Q=5, D=16, Hm=8, Wm=8):
    return ProposalOutput(sem=torch.randn(N, Q, D), boxes=torch.rand(N, Q, 4), masks=torch.randn(N, Q, Hm, Wm),
                          objectness=torch.randn(N, Q))


def test_selection_is_topk_with_matches_forced_in():
    obj = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    assert select_regional_proposals(obj, 2).tolist() == [[0, 1]]
    matches = [(torch.tensor([4, 3]), torch.tensor([0, 1]))]
    assert sorted(select_regional_proposals(obj, 2, matches)[0].tolist()) == [3, 4]
    assert select_regional_proposals(obj, 10).shape == (1, 5)


def test_regional_token_is_sum_of_eq2_terms():
    enc = _encoder()
    props = _proposals()
    index = torch.tensor([[4, 0, 2], [1, 1, 3]])
    tokens = enc.regional_tokens(props, index)
    n, r = 1, 0
    q = index[n, r]
    pooled = F.adaptive_avg_pool2d(props.masks[n, q].sigmoid()[None, None], 4).flatten()
    expected = (enc.sem_proj(props.sem[n, q]) + enc.box_proj(box_sine_encoding(props.boxes[n, q][None, None], 16)[0, 0])
                + enc.mask_proj(pooled) + enc.type_embed.weight[2])
    assert torch.allclose(tokens[n, r], expected, atol=1e-5)


def test_sequence_layout_and_padding():
    enc = _encoder()
    feat = torch.randn(2, 8, 3, 4)  # F_L of a padded 96 x 128 batch
    out = enc(feat, [(96, 128), (40, 60)], _proposals())
    T = 2 + 3 * 4 + 3
    assert out.batch.tokens.shape == (2, T, 24)
    assert out.regional_start == 2 + 12
    pad = out.batch.padding_mask
    assert not pad[0].any()
    # image 2 covers ceil(40/32)=2 rows x ceil(60/32)=2 cols of the 3 x 4 grid
    grid = pad[1, 2:14].view(3, 4)
    assert grid.tolist() == [[False, False, True, True], [False, False, True, True], [True, True, True, True]]
    assert not pad[1, :2].any() and not pad[1, 14:].any()


def test_no_attention_pool():
    enc = _encoder(num_attn_pools=0)
    out = enc(torch.randn(1, 8, 2, 2), [(64, 64)], _proposals(N=1))
    assert out.batch.tokens.shape == (1, 4 + 3, 24) and out.regional_start == 4


def test_default_keeps_every_proposal_as_a_regional_token():
    """MODEL.IMAGE_ENCODER.NUM_REGIONAL_TOKENS defaults to 0 = all O proposals (paper §4.1, §4.3):
    a tiny config that leaves the key at its default gets one regional token per proposal."""
    fresh = get_cfg()
    add_up2_config(fresh)
    assert fresh.MODEL.IMAGE_ENCODER.NUM_REGIONAL_TOKENS == 0
    cfg = tiny_cfg(None, **{"MODEL.IMAGE_ENCODER.NUM_REGIONAL_TOKENS": 0})  # the default, not the tiny value
    q = cfg.MODEL.PROPOSAL.NUM_QUERIES
    shapes = {"res5": ShapeSpec(channels=8, stride=32)}
    enc = ImageEncoder(cfg, shapes)
    assert enc.num_regional_tokens == q
    d = cfg.MODEL.UNIFIED_DECODER.EMBED_DIM
    out = enc(torch.randn(2, 8, 2, 2), [(64, 64)] * 2, _proposals(Q=q, D=cfg.MODEL.PROPOSAL.HIDDEN_DIM))
    assert out.regional_index.shape == (2, q) and out.batch.tokens.shape[1] == out.regional_start + q
    assert out.batch.tokens.shape[-1] == d
    assert sorted(out.regional_index[0].tolist()) == list(range(q))  # every proposal once
    # an explicit N stays an explicit N; a negative one is an error naming the key
    explicit = ImageEncoder(tiny_cfg(None, **{"MODEL.IMAGE_ENCODER.NUM_REGIONAL_TOKENS": 5}), shapes)
    assert explicit.num_regional_tokens == 5
    with pytest.raises(ValueError, match="NUM_REGIONAL_TOKENS must be >= 0"):
        ImageEncoder(tiny_cfg(None, **{"MODEL.IMAGE_ENCODER.NUM_REGIONAL_TOKENS": -1}), shapes)
