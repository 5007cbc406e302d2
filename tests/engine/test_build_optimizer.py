"""up2.engine.trainer.build_optimizer: parameter groups, full-model clipping and the fused AdamW
kernel, against torch's per-parameter AdamW with the clipping done by hand."""
import pytest
import torch
from torch import nn

from up2.engine.trainer import build_optimizer


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(6, 5)
        self.head = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4))


def _cfg(**overrides):
    from detectron2.config import get_cfg

    from up2 import add_up2_config

    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.05
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg


def _grads(net, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=g)
    net.zero_grad()
    net.head(net.backbone(x)).pow(2).sum().backward()


def test_fused_adamw_equals_per_parameter_adamw_with_clipping_by_hand():
    torch.manual_seed(0)
    net, ref = _Net(), _Net()
    ref.load_state_dict(net.state_dict())
    opt = build_optimizer(_cfg(), net)
    assert opt.defaults.get("fused") is True
    # the reference: the same groups by hand (backbone lr x 0.1, no decay on the LayerNorm)
    norm = [ref.head[1].weight, ref.head[1].bias]
    groups = [
        {"params": list(ref.backbone.parameters()), "lr": 0.001, "weight_decay": 0.05},
        {"params": list(ref.head[0].parameters()), "lr": 0.01, "weight_decay": 0.05},
        {"params": norm, "lr": 0.01, "weight_decay": 0.0},
    ]
    ref_opt = torch.optim.AdamW(groups, lr=0.01, foreach=False)
    for step in range(3):
        _grads(net, step)
        _grads(ref, step)
        total = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
        assert total > 0.05  # the clipping really acts
        for p in ref.parameters():
            p.grad.mul_(0.05 / (total + 1e-6))
        opt.step()
        ref_opt.step()
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_float16_grad_scaler_keeps_the_unfused_step():
    opt = build_optimizer(_cfg(**{"SOLVER.AMP.ENABLED": True, "SOLVER.AMP.DTYPE": "float16"}), _Net())
    assert not opt.defaults.get("fused")
    opt = build_optimizer(_cfg(**{"SOLVER.AMP.ENABLED": True, "SOLVER.AMP.DTYPE": "bfloat16"}), _Net())
    assert opt.defaults.get("fused") is True


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER='LION'"):
        build_optimizer(_cfg(**{"SOLVER.OPTIMIZER": "LION"}), _Net())


def test_resume_keeps_the_kernel_chosen_now():
    """Optimizer.load_state_dict copies the saved "fused" flag; build_optimizer's choice wins."""
    net = _Net()
    _grads(net, 0)
    opt = build_optimizer(_cfg(), net)
    opt.step()
    older = opt.state_dict()  # as written before the fused kernel was used: fused None
    for group in older["param_groups"]:
        group["fused"] = None
    opt.load_state_dict(older)
    assert all(g["fused"] is True for g in opt.param_groups)
    fp16 = build_optimizer(_cfg(**{"SOLVER.AMP.ENABLED": True, "SOLVER.AMP.DTYPE": "float16"}), net)
    fp16.load_state_dict(opt.state_dict())  # a fused checkpoint resumed where fused cannot serve
    assert not any(g["fused"] for g in fp16.param_groups)
