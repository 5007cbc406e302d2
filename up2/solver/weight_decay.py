"""Which parameters are exempt from weight decay (paper §4.4 trains with AdamW / TBGN; the
exemptions follow MaskDINO's recipe, ``weight_decay_embed = 0``, and BERT/CLIP practice).

Not decayed:
    * the weight of every ``nn.Embedding``: the text encoder's token / position / type embeddings,
      the image encoder's token-type embedding, the denoising label embedding;
    * every parameter a module names in its ``no_weight_decay()`` method (timm's convention:
      names relative to that module): the temperature tau (``Likelihood``), the ``[SPE]`` token
      (``UnifiedDecoder``), the learned attention-pool queries (``AttentionPool``), the level
      embedding of the pixel decoder, Swin's position tables (``D2SwinTransformer``).

Norm layers are handled by detectron2's ``get_default_optimizer_params(weight_decay_norm=...)``;
:func:`exclude_from_weight_decay` only splits the groups it returns.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List

import torch
from detectron2.solver.build import reduce_param_groups
from torch import nn

__all__ = ["no_weight_decay_parameters", "exclude_from_weight_decay"]


def no_weight_decay_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The parameters of ``model`` that must not be decayed (module docstring), by full name.

    A name that a module's ``no_weight_decay()`` returns but that is not one of its parameters
    is ignored (timm lists optional ones, e.g. ``absolute_pos_embed``).

    Args:
        model: any module (a DDP wrapper's ``.module`` or the model itself).

    Returns:
        {full parameter name: parameter}; shared parameters appear once, under their first name.
    """
    found: Dict[str, nn.Parameter] = {}
    seen = set()

    def add(name: str, p: nn.Parameter) -> None:
        if id(p) not in seen:
            seen.add(id(p))
            found[name] = p

    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, nn.Embedding):
            add(prefix + "weight", module.weight)
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            own = dict(module.named_parameters())
            for name in declared():
                if name in own:
                    add(prefix + name, own[name])
    return found


def exclude_from_weight_decay(param_groups: Iterable[Dict[str, Any]], params: Iterable[torch.Tensor]
                              ) -> List[Dict[str, Any]]:
    """Split optimizer parameter groups so that ``params`` get ``weight_decay = 0``.

    Args:
        param_groups: groups as ``torch.optim`` takes them (``{"params": [...], "lr": ...,
            "weight_decay": ...}``), e.g. from detectron2's ``get_default_optimizer_params``.
        params: the parameters to exempt (e.g. ``no_weight_decay_parameters(model).values()``).

    Returns:
        New groups, each parameter in exactly one of them, with the same options except
        ``weight_decay = 0.0`` for ``params``; groups with equal options merged
        (detectron2's ``reduce_param_groups``).

    Raises:
        ValueError: a group without a "params" list.
    """
    exempt = {id(p) for p in params}
    split: List[Dict[str, Any]] = []
    for i, group in enumerate(param_groups):
        if "params" not in group:
            raise ValueError(f"exclude_from_weight_decay: param group {i} has no 'params' (keys: {sorted(group)})")
        options = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            extra = {"weight_decay": 0.0} if id(p) in exempt else {}
            split.append({"params": [p], **options, **extra})
    return reduce_param_groups(split)
