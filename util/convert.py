"""Pretraining checkpoint -> encoder-only state dict in timm ViT names, and loading it for fine-tuning.

A DAMA pretraining state dict holds `student1.<name>`, `student2.<name>` (encoder + decoder of each
student) and `head.*` (projection head). The encoder names are timm's, so stripping the student prefix
and dropping the decoder, mask token and projection head gives a state dict that loads into
`models_vit` and into `timm.create_model('vit_*', ...)` (only the classifier head is missing).
The reference code's `base_encoder.` / `momentum_encoder.` prefixes are accepted as students 1 / 2.
"""
import argparse
import math
import os

import torch

from models_dama import ARCH_CONFIGS
from models_vit import init_head, uses_fc_norm
from util.channels import check_channel_names, checkpoint_description
from util.checkpoint import save_checkpoint, torch_load
from util.errors import CheckpointError, ConfigError
from util.features import DEFAULT_POOL
from util.pos_embed import resample_pos_embed

STUDENT_PREFIXES = {1: ("student1.", "base_encoder."), 2: ("student2.", "momentum_encoder.")}
DDP_PREFIX = "module."
FINAL_NORM_KEYS = ("norm.weight", "norm.bias")
HEAD_KEYS = ("head.weight", "head.bias")
FC_NORM_KEYS = ("fc_norm.weight", "fc_norm.bias")


def is_pretraining_only(key: str) -> bool:
    """Decoder, mask token and projection head exist only for pretraining."""
    return key.startswith("decoder_") or key == "mask_token" or key.startswith("head.")


def has_student_prefixes(state_dict: dict) -> bool:
    prefixes = STUDENT_PREFIXES[1] + STUDENT_PREFIXES[2]
    return any(key.startswith(prefixes) for key in state_dict)


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def select_student(state_dict: dict, student: int) -> dict:
    """The keys of one student, prefix stripped (whichever of the accepted prefixes the file uses)."""
    for prefix in STUDENT_PREFIXES[student]:
        selected = strip_prefix(state_dict, prefix)
        if selected:
            return selected
    raise CheckpointError(f"no student {student} weights (keys starting with "
                          f"{' or '.join(STUDENT_PREFIXES[student])}) in this pretraining state dict")


def extract_encoder(state_dict: dict, student: int = 1) -> dict:
    """Encoder-only state dict in timm names from a pretraining (or already encoder-only) state dict."""
    if student not in STUDENT_PREFIXES:
        raise ConfigError(f"--student must be 1 or 2, got {student}")
    if any(key.startswith(DDP_PREFIX) for key in state_dict):
        state_dict = strip_prefix(state_dict, DDP_PREFIX)
    if has_student_prefixes(state_dict):
        state_dict = select_student(state_dict, student)
    return {key: value for key, value in state_dict.items() if not is_pretraining_only(key)}


def read_state_dict(path: str) -> tuple:
    """(state_dict, checkpoint) from a file holding {'model': sd, ...} or a bare sd."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist (check --finetune / --input)")
    checkpoint = torch_load(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict")
    state_dict = checkpoint.get("model", checkpoint)
    if not isinstance(state_dict, dict) or not any(torch.is_tensor(v) for v in state_dict.values()):
        raise CheckpointError(f"checkpoint {path} holds no model weights (expected {{'model': state_dict}} "
                              f"or a bare state dict)")
    return state_dict, checkpoint


def read_encoder(path: str, student: int = 1) -> tuple:
    """(encoder state dict in timm names, checkpoint, whether the file held students) for any checkpoint kind
    (pretraining, exported encoder, fine-tuned classifier); errors name the file."""
    state_dict, checkpoint = read_state_dict(path)
    try:
        encoder = extract_encoder(state_dict, student)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from exc
    return encoder, checkpoint, has_student_prefixes(state_dict)


def shape_mismatch_hint(key: str, ckpt_shape: torch.Size, model_shape: torch.Size, pretrained_arch: str) -> str:
    """Which flag makes the model match the checkpoint."""
    if key == "patch_embed.proj.weight" and ckpt_shape[0] == model_shape[0]:
        if ckpt_shape[1] != model_shape[1]:
            return f"set --in_chans {ckpt_shape[1]} (the checkpoint was pretrained on {ckpt_shape[1]}-channel images)"
        return f"set --patch_size {ckpt_shape[-1]} (the checkpoint was pretrained with that patch size)"
    if pretrained_arch:
        return f"use --arch {pretrained_arch} as in pretraining"
    return "use the --arch the checkpoint was pretrained with"


def check_shapes(encoder: dict, model: torch.nn.Module, path: str, pretrained_arch: str = "") -> None:
    """Fail with one clear line on the first weight whose shape the model cannot take (pos_embed excepted)."""
    model_state = model.state_dict()
    # patch_embed first: a channel or patch-size mismatch is the most specific hint
    keys = sorted(encoder, key=lambda key: key != "patch_embed.proj.weight")
    for key in keys:
        if key not in model_state:
            continue
        ckpt_shape, model_shape = encoder[key].shape, model_state[key].shape
        same_width = key != "pos_embed" or ckpt_shape[-1] == model_shape[-1]
        if ckpt_shape == model_shape or (key == "pos_embed" and same_width):
            continue
        raise CheckpointError(
            f"checkpoint {path}: '{key}' has shape {list(ckpt_shape)} but the model expects "
            f"{list(model_shape)}; {shape_mismatch_hint(key, ckpt_shape, model_shape, pretrained_arch)}")


def fit_pos_embed(encoder: dict, model: torch.nn.Module) -> None:
    """Resample the checkpoint's position embedding (bicubic) when the fine-tuning grid differs."""
    if "pos_embed" not in encoder:
        return
    ckpt_rows, model_rows = encoder["pos_embed"].shape[1], model.pos_embed.shape[1]
    if ckpt_rows == model_rows:
        return
    new_grid = int(math.isqrt(model_rows - model.num_prefix_tokens))
    old_grid = int(math.isqrt(ckpt_rows - model.num_prefix_tokens))
    print(f"Resampling pos_embed from a {old_grid}x{old_grid} to a {new_grid}x{new_grid} patch grid")
    encoder["pos_embed"] = resample_pos_embed(encoder["pos_embed"].float(), new_grid,
                                              num_prefix_tokens=model.num_prefix_tokens)


def allowed_missing_keys(model: torch.nn.Module) -> set:
    """A fresh classifier head and, with global pooling, a fresh fc_norm."""
    allowed = set(HEAD_KEYS)
    if uses_fc_norm(model):
        allowed |= set(FC_NORM_KEYS)
    return allowed


def key_list(keys, shown: int = 8) -> str:
    """Sorted keys for an error line, the first `shown` of them (a deeper arch can add hundreds)."""
    keys = sorted(keys)
    more = f" ... ({len(keys) - shown} more)" if len(keys) > shown else ""
    return str(keys[:shown]) + more


def checkpoint_args(checkpoint: dict) -> dict:
    """The run's args stored in a checkpoint as a dict ({} when there are none)."""
    args = checkpoint.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    return args if isinstance(args, dict) else {}


def pretrained_arch_of(checkpoint: dict) -> str:
    return checkpoint_args(checkpoint).get("arch", "")


def normalisation_of(checkpoint: dict, in_chans: int) -> tuple:
    """(mean, std) the run normalised its inputs with (--recipe imagenet stores them in args), as lists of
    in_chans floats; (None, None) when the checkpoint has none (raw [0, 1] intensities, the cell recipe)."""
    args = checkpoint_args(checkpoint)
    mean, std = args.get("mean"), args.get("std")
    if isinstance(mean, (list, tuple)) and isinstance(std, (list, tuple)) and len(mean) == len(std) == in_chans:
        return [float(m) for m in mean], [float(s) for s in std]
    return None, None


def load_pretrained_encoder(model: torch.nn.Module, path: str, student: int = 1) -> None:
    """Initialise a models_vit classifier from a pretraining or encoder-only checkpoint (--finetune)."""
    encoder, checkpoint, from_students = read_encoder(path, student)
    if uses_fc_norm(model):
        # pooled features go through fc_norm; the encoder's final norm is not part of this model
        encoder = {key: value for key, value in encoder.items() if key not in FINAL_NORM_KEYS}
    pretrained_arch = pretrained_arch_of(checkpoint)
    check_shapes(encoder, model, path, pretrained_arch)
    fit_pos_embed(encoder, model)
    missing, unexpected = model.load_state_dict(encoder, strict=False)
    arch_hint = f"; use --arch {pretrained_arch} as in pretraining" if pretrained_arch else \
        "; use the --arch the checkpoint was pretrained with"
    if unexpected:
        raise CheckpointError(f"checkpoint {path}: unexpected keys {key_list(unexpected)}{arch_hint}")
    wrongly_missing = set(missing) - allowed_missing_keys(model)
    if wrongly_missing:
        raise CheckpointError(f"checkpoint {path}: missing keys {key_list(wrongly_missing)}{arch_hint}")
    init_head(model)
    source = f"student {student} of " if from_students else ""
    print(f"Loaded the encoder of {source}{path} (newly initialised: {sorted(missing)})")


def count_blocks(encoder: dict) -> int:
    block_ids = {int(key.split(".")[1]) for key in encoder if key.startswith("blocks.")}
    return max(block_ids) + 1 if block_ids else 0


def infer_arch(embed_dim: int, depth: int) -> str:
    for name, cfg in ARCH_CONFIGS.items():
        if cfg["embed_dim"] == embed_dim and cfg["depth"] == depth:
            return name
    return ""


def encoder_metadata(encoder: dict, checkpoint: dict, student: int, path: str = "") -> dict:
    """timm pretrained_cfg-like description of the encoder, read from the weights themselves (any checkpoint
    kind): arch is the run's --arch when it is one of ours, else the size whose width and depth match ('' if
    none does)."""
    if "patch_embed.proj.weight" not in encoder or "pos_embed" not in encoder:
        raise CheckpointError(f"checkpoint {path}: no 'patch_embed.proj.weight' / 'pos_embed'; not a ViT encoder")
    proj = encoder["patch_embed.proj.weight"]  # [D, C, p, p]
    embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = count_blocks(encoder)
    grid = math.isqrt(encoder["pos_embed"].shape[1] - 1)  # cls row + grid x grid patches
    arch = pretrained_arch_of(checkpoint)
    if arch not in ARCH_CONFIGS:  # exported files, foreign checkpoints
        arch = infer_arch(embed_dim, depth)
    num_heads = ARCH_CONFIGS[arch]["num_heads"] if arch in ARCH_CONFIGS else None
    channel_names, normalization = checkpoint_description(checkpoint)  # the data the encoder was trained on
    mean, std = normalisation_of(checkpoint, in_chans)
    return dict(arch=arch, img_size=grid * patch_size, patch_size=patch_size, in_chans=in_chans,
                embed_dim=embed_dim, depth=depth, num_heads=num_heads, student=student,
                epoch=checkpoint.get("epoch"), channel_names=channel_names, normalization=normalization,
                mean=mean, std=std)


TIMM_VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large"}  # embed_dim -> timm's ViT size name
TIMM_POOLS = {"mean": "avg", "cls": "token"}  # --pool -> timm's global_pool


def timm_data_cfg(metadata: dict, num_classes: int = 0) -> dict:
    """The fields of timm's PretrainedCfg that describe the input: in_chans x img_size x img_size, mean/std (the
    run's, e.g. ImageNet's with --recipe imagenet; else 0 / 1: the cell recipe trains on raw [0, 1] intensities), no
    resize before the crop. first_conv is None on purpose: timm before 1.0.31 would otherwise "adapt" the patch
    embedding of any file whose in_chans is not 3 (and, unable to, replace it with a random one, with a warning
    only); the weights fit the model as they are. custom_load False: a plain state dict (the architecture's own
    pretrained config may name a JAX .npz loader, which timm before 1.0.31 would use on this file)."""
    in_chans, img_size = metadata["in_chans"], metadata["img_size"]
    mean = list(metadata.get("mean") or [0.0] * in_chans)
    std = list(metadata.get("std") or [1.0] * in_chans)
    return dict(input_size=(in_chans, img_size, img_size), fixed_input_size=True, mean=tuple(mean), std=tuple(std),
                crop_pct=1.0, interpolation="bicubic", num_classes=num_classes, first_conv=None, classifier="head",
                custom_load=False)


def timm_config(metadata: dict, pool: str, fc_norm: bool, num_classes: int = 0, class_names=None,
                extra: dict = None) -> dict:
    """timm's model config (the config.json of a Hugging Face / local-dir model folder): architecture, num_classes,
    model_args (patch size, image size, channels, pooling: what the architecture name does not say), pretrained_cfg
    (timm_data_cfg), label_names for a classifier; plus, outside timm's keys, the channel names and normalisation
    recipe of the training data and `extra` under "dama" (where the weights come from).

    pool: 'mean' (global_pool 'avg') or 'cls' ('token'); fc_norm: whether the pooled features go through fc_norm (a
    model fine-tuned with global pooling) rather than the final norm being applied to every token (an encoder)."""
    size = TIMM_VIT_SIZES.get(metadata["embed_dim"], "base")
    global_pool = TIMM_POOLS[pool]
    model_args = dict(img_size=metadata["img_size"], patch_size=metadata["patch_size"],
                      in_chans=metadata["in_chans"], num_classes=num_classes, global_pool=global_pool, fc_norm=fc_norm)
    data_cfg = timm_data_cfg(metadata, num_classes)
    config = dict(architecture=f"vit_{size}_patch16_224", num_classes=num_classes,
                  num_features=metadata["embed_dim"], global_pool=global_pool, model_args=model_args,
                  pretrained_cfg=dict(data_cfg, input_size=list(data_cfg["input_size"]), mean=list(data_cfg["mean"]),
                                      std=list(data_cfg["std"])))
    if num_classes:
        config["label_names"] = list(class_names)
    config.update(channel_names=metadata.get("channel_names"), normalization=metadata.get("normalization"),
                  dama=dict(arch=metadata["arch"], pool=pool, **(extra or {})))
    return config


def timm_pretrained_cfg(metadata: dict) -> dict:
    """Fields of timm's PretrainedCfg for the .pth export (kept for files and scripts that read it; timm_config is
    the complete description, with the patch size and pooling)."""
    size = TIMM_VIT_SIZES.get(metadata["embed_dim"], "base")
    return dict(architecture=f"vit_{size}_patch16_224", **timm_data_cfg(metadata))


def export_channel_names(metadata: dict, channel_names, ckpt_path: str, ignore: bool = False):
    """The channel names an export records: the checkpoint's; `channel_names` (--channel_names) are checked against
    them, or name a checkpoint that has none."""
    if not channel_names:
        return metadata["channel_names"]
    if len(channel_names) != metadata["in_chans"]:
        raise ConfigError(f"--channel_names gives {len(channel_names)} names but the encoder of {ckpt_path} takes "
                          f"{metadata['in_chans']} channels")
    check_channel_names(metadata["channel_names"], channel_names, f"checkpoint {ckpt_path}", "--channel_names",
                        ignore=ignore)
    return metadata["channel_names"] or list(channel_names)


def export_encoder(ckpt_path: str, out_path: str, student: int = 1, channel_names=None,
                   ignore_channel_names: bool = False, pool: str = None) -> dict:
    """Write {'model': encoder state dict, 'pretrained_cfg': metadata, 'timm_config': timm's model config
    (timm_config: with the patch size and pooling), 'timm_pretrained_cfg': its PretrainedCfg fields} atomically;
    returns the metadata. The metadata keeps the checkpoint's channel names and normalisation recipe;
    `channel_names` (--channel_names) are checked against the checkpoint's, or name a checkpoint that has none.
    pool: the pooling timm's model(x) applies (default: mean; an encoder fine-tuned with global pooling keeps its
    fc_norm and mean pooling)."""
    encoder, checkpoint, _ = read_encoder(ckpt_path, student)
    return save_encoder(out_path, encoder, checkpoint, ckpt_path, student, channel_names, ignore_channel_names, pool)


def save_encoder(out_path: str, encoder: dict, checkpoint: dict, ckpt_path: str, student: int = 1,
                 channel_names=None, ignore_channel_names: bool = False, pool: str = None) -> dict:
    """export_encoder from read_encoder's encoder and checkpoint, for a caller that has read them already."""
    metadata = encoder_metadata(encoder, checkpoint, student, ckpt_path)
    fc_norm = "fc_norm.weight" in encoder
    pool = DEFAULT_POOL if fc_norm else (pool or DEFAULT_POOL)
    metadata["channel_names"] = export_channel_names(metadata, channel_names, ckpt_path, ignore_channel_names)
    out_dir = os.path.dirname(out_path)
    if out_dir:  # a bare file name means the current directory
        os.makedirs(out_dir, exist_ok=True)
    config = timm_config(metadata, pool, fc_norm, extra=dict(student=student, epoch=metadata["epoch"],
                                                             checkpoint=str(ckpt_path)))
    save_checkpoint(out_path, {"model": encoder, "pretrained_cfg": metadata, "timm_config": config,
                               "timm_pretrained_cfg": timm_pretrained_cfg(metadata)})
    return metadata
