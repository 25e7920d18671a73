"""Fine-tuning ViT: the DAMA encoder as a plain timm `VisionTransformer` classifier.

Built directly on timm (no subclass) so that parameter names are timm's: an encoder exported by
`convert_checkpoint.py` loads into `timm.create_model('vit_*_patch16_224', ...)` and vice versa.
Arch names are the pretraining ones (`main_vit_tiny`, `mae_vit_tiny`, ...; models_dama.ARCH_CONFIGS), so one
`--arch` fits both scripts.
"""
from functools import partial

import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from models_dama import ARCH_CONFIGS
from util.errors import ConfigError


def build_vit(arch: str, img_size: int = 128, patch_size: int = 16, in_chans: int = 7, num_classes: int = 5,
              drop_path_rate: float = 0.1, global_pool: bool = True) -> VisionTransformer:
    """A timm ViT classifier of the named size.

    global_pool=True: mean of the patch tokens (cls excluded) -> fc_norm -> head; timm then makes the
    final `norm` an Identity. global_pool=False: final norm -> cls token -> head.
    """
    if arch not in ARCH_CONFIGS:
        raise ConfigError(f"--arch {arch!r} is not a fine-tuning arch; expected one of {sorted(ARCH_CONFIGS)}")
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        drop_path_rate=drop_path_rate, global_pool="avg" if global_pool else "token",
        **ARCH_CONFIGS[arch])


def init_head(model: VisionTransformer) -> None:
    """MAE fine-tuning convention: a near-zero classifier so the pretrained features are not disturbed early."""
    if isinstance(model.head, nn.Linear):
        trunc_normal_(model.head.weight, std=2e-5)
        nn.init.zeros_(model.head.bias)


def uses_fc_norm(model: VisionTransformer) -> bool:
    """True when the model pools with fc_norm (so the encoder's final `norm` is not used)."""
    return not isinstance(model.fc_norm, nn.Identity)
