"""Optimizer parameter groups: weight decay only on weight matrices, and BEiT-style layer-wise lr decay for ViTs."""

# names of timm VisionTransformer parameters that sit before the first block
_EMBEDDING_NAMES = ("cls_token", "pos_embed", "reg_token", "dist_token")


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """Depth of a timm VisionTransformer parameter: embeddings 0, blocks.i -> i+1, everything after -> num_layers."""
    if name in _EMBEDDING_NAMES or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers  # norm, fc_norm, head


def _skips_weight_decay(name: str, param, no_weight_decay_names) -> bool:
    # norms' weights and biases are 1-D; decaying them (or a bias) towards 0 only hurts
    return param.ndim <= 1 or name.endswith(".bias") or name in no_weight_decay_names


def param_groups_lrd(model, weight_decay: float = 0.05, no_weight_decay_list=(), layer_decay: float = 0.75):
    """One group per (layer, decay or not) with lr_scale = layer_decay ** (num_layers - layer id).

    num_layers = len(model.blocks) + 1, so the head gets scale 1 and patch_embed layer_decay ** num_layers.
    Names from model.no_weight_decay() (timm: pos_embed, cls_token, ...) are added to no_weight_decay_list.
    Frozen parameters (requires_grad False) are left out.
    """
    num_layers = len(model.blocks) + 1
    no_weight_decay_names = set(no_weight_decay_list)
    if hasattr(model, "no_weight_decay"):
        no_weight_decay_names |= set(model.no_weight_decay())
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer_id = layer_id_for_vit(name, num_layers)
        no_decay = _skips_weight_decay(name, param, no_weight_decay_names)
        key = f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (num_layers - layer_id)}
        groups[key]["params"].append(param)
    return list(groups.values())


def param_groups_weight_decay(model, weight_decay: float, no_weight_decay_list=()):
    """Two groups for pretraining: no decay for 1-D parameters and biases, `weight_decay` for the rest.

    Like timm's param_groups_weight_decay; frozen parameters (the fixed sin-cos position embeddings) are left out.
    """
    no_weight_decay_names = set(no_weight_decay_list)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if _skips_weight_decay(name, param, no_weight_decay_names) else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [group for group in groups if group["params"]]
