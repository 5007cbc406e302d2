"""No weight decay on tau, embeddings, [SPE] and learned queries (issue 16 item 5(b);
``up2.solver.weight_decay`` used by ``up2.engine.trainer.build_optimizer``), for AdamW and TBGN."""
import pytest
import torch
from torch import nn

from task_models import tiny_model
from up2.engine.trainer import build_optimizer
from up2.solver import TBGN, exclude_from_weight_decay, no_weight_decay_parameters


@pytest.fixture(scope="module")
def model_and_cfg(shapes_datasets):
    cfg, model = tiny_model({"CLS": ("classification", {})})
    cfg.defrost()
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    return model, cfg


def _options(optimizer):
    """{id(param): (lr, weight_decay)}, checking that every parameter is in exactly one group."""
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in out, "a parameter in two groups"
            out[id(p)] = (group["lr"], group["weight_decay"])
    return out


@pytest.mark.parametrize("kind", ["ADAMW", "TBGN"])
def test_tau_embeddings_spe_and_queries_are_not_decayed(model_and_cfg, kind):
    model, cfg = model_and_cfg
    cfg.SOLVER.OPTIMIZER = kind
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, TBGN) == (kind == "TBGN")
    options = _options(opt)
    assert set(options) == {id(p) for p in model.parameters() if p.requires_grad}

    text_embeddings = [m.weight for m in model.text_encoder.modules() if isinstance(m, nn.Embedding)]
    assert len(text_embeddings) >= 2  # token and position embeddings (+ token type) of the HF encoder
    exempt = {
        "tau": model.likelihood.log_inv_tau,
        "[SPE]": model.unified_decoder.spe,
        "attention-pool queries": model.image_encoder.attn_pool.queries,
        "image token-type embedding": model.image_encoder.type_embed.weight,
        "level embedding": model.proposal_network.pixel_decoder.level_embed,
        "denoising label embedding": model.proposal_network.decoder.dn_label_embed.weight,
        **{f"text embedding {i}": w for i, w in enumerate(text_embeddings)},
    }
    for name, p in exempt.items():
        assert options[id(p)][1] == 0.0, f"{name} is decayed ({kind})"
    # ordinary weights are decayed, with their lr factors intact
    assert options[id(model.text_encoder.proj.weight)] == (0.01, 0.05)
    assert options[id(model.unified_decoder.layers[0].ffn.fc1.weight)] == (0.01, 0.05)
    conv = next(p for n, p in model.backbone.named_parameters() if p.dim() == 4)
    assert options[id(conv)] == (pytest.approx(0.001), 0.05)
    # and the norms keep detectron2's WEIGHT_DECAY_NORM (0 in Base-UP2)
    assert options[id(model.unified_decoder.input_norm.weight)][1] == cfg.SOLVER.WEIGHT_DECAY_NORM


def test_an_exempt_parameter_is_not_shrunk_by_a_step():
    """The group option is what the optimizer applies: with a zero gradient, AdamW's decoupled
    decay shrinks the decayed weight by lr * wd and leaves the exempt embedding as it was."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 3))
    groups = exclude_from_weight_decay([{"params": list(net.parameters()), "lr": 0.1, "weight_decay": 0.5}],
                                       no_weight_decay_parameters(net).values())
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    torch.optim.AdamW(groups).step()
    torch.testing.assert_close(net[0].weight, before[0], rtol=0, atol=0)
    torch.testing.assert_close(net[1].weight, before[1] * (1 - 0.1 * 0.5))
    with pytest.raises(ValueError, match="group 0 has no 'params'"):
        exclude_from_weight_decay([{"lr": 0.1}], [])


def test_swin_position_tables_are_exempt():
    pytest.importorskip("timm")
    from up2.modeling.backbone.swin import D2SwinTransformer

    swin = D2SwinTransformer(model_name="swin_tiny_patch4_window7_224", out_features=["res5"], img_size=64,
                             model_kwargs=dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                                               window_size=4))
    names = set(no_weight_decay_parameters(swin))
    tables = {n for n, _ in swin.named_parameters() if n.endswith("relative_position_bias_table")}
    assert tables and tables <= names
    assert not any(n.endswith("qkv.weight") for n in names)
