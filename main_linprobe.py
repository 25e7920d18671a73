"""Linear probe of a frozen pretrained encoder (MAE's main_linprobe; SGD by default, LARS as MAE with --optimizer lars).

    python main_linprobe.py --arch main_vit_tiny --finetune OUT/checkpoint.pth --data_path DATA --output_dir LP
    python main_linprobe.py --dataset synthetic --arch main_vit_tiny --img_size 64 --finetune OUT/checkpoint.pth

The encoder is loaded exactly as main_finetune.py loads --finetune (student 1 by default, or an encoder-only
file) and frozen; only the head BatchNorm1d(affine=False) -> Linear is trained. The flags are main_finetune's
with linear-probe defaults (SGD momentum 0.9, blr 0.1, no weight decay, no mixup/cutmix/smoothing,
no drop path); log.txt and checkpoints have the same format as fine-tuning's, and the same selection rule (the
epoch is chosen on val; a test/ split is scored once at that epoch). The last partial training batch is kept (a
batch of one is dropped: BatchNorm), so small data sets train every image every epoch.
MAE trains its probe with LARS at batch 16384 (--optimizer lars, --batch_size x --accum_iter x GPUs = 16384);
SGD with momentum is the usual choice at the batch sizes of cell data sets, and the BatchNorm in front of the
linear layer makes it insensitive to the feature scale. With --recipe imagenet the images get MAE's probe
transform (RandomResizedCrop, flip, mean/std: the defaults --aa none --reprob 0 turn RandAugment and erasing off).
"""
import sys

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

import main_finetune
from util.errors import ConfigError
from util.lars import LARS

LINPROBE_DEFAULTS = dict(batch_size=256, epochs=90, blr=0.1, min_lr=0.0, weight_decay=0.0, warmup_epochs=10,
                         smoothing=0.0, mixup=0.0, cutmix=0.0, drop_path=0.0, aa="none", reprob=0.0)


def get_args_parser():
    """main_finetune's flags with linear-probe defaults, plus the optimiser choice."""
    parser = main_finetune.get_args_parser()
    parser.description = "DAMA linear probe (frozen encoder)"
    parser.set_defaults(**LINPROBE_DEFAULTS)
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "lars", "adamw"),
                        help="sgd (momentum, default; blr 0.1), lars (MAE's ImageNet probe: blr 0.1 at batch 16384, "
                             "with --accum_iter) or adamw (use e.g. --blr 1e-3); --layer_decay is unused")
    parser.add_argument("--momentum", default=0.9, type=float, help="SGD and LARS momentum")
    return parser


def check_args(args):
    if args.drop_path != 0:
        raise ConfigError(f"--drop_path must be 0 for a linear probe (the encoder is frozen), got {args.drop_path}")


def build_probe_model(args, num_classes: int) -> nn.Module:
    """models_vit classifier with the pretrained (or random) encoder frozen and a BN + Linear head."""
    # --finetune's encoder is loaded before the head is wrapped (check_args: --drop_path is 0)
    model = main_finetune.build_finetune_model(args, num_classes)
    linear = model.head
    trunc_normal_(linear.weight, std=0.01)  # MAE's probe init
    nn.init.zeros_(linear.bias)
    # the BN whitens the frozen features, so one lr suits encoders whose features differ in scale
    model.head = nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False, eps=1e-6), linear)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"linear probe: {trainable} trainable parameters (head), encoder frozen; {args.optimizer} optimiser")
    return model


def build_optimizer(args, model_without_ddp):
    params = [p for p in model_without_ddp.head.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.optimizer == "lars":
        return LARS(params, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def setup(args, identity: dict):
    """main_finetune.setup with the frozen model, the head-only optimiser, and the last partial batch kept: linear
    probes run on a few hundred crops, where batch 256 with drop_last would train one step per epoch (the steps
    per epoch are printed)."""
    check_args(args)
    return main_finetune.setup(args, identity, make_model=build_probe_model, make_optimizer=build_optimizer,
                               keep_last_batch=True)


def preflight(args, world_size: int) -> None:
    """The submitit launcher's start-up checks (util/launch.py): main_finetune.preflight with the probe's model (a
    --resume checkpoint holds the BatchNorm + Linear head) and its last partial batch kept."""
    check_args(args)
    main_finetune.preflight(args, world_size, make_model=build_probe_model, keep_last_batch=True)


def main(args):
    # the evaluation, the epoch loop, checkpoints and log.txt are fine-tuning's
    return main_finetune.main(args, setup_fn=setup)


def run_cli(argv=None) -> int:
    """Exit codes as every script (util/cli.py): 2 for bad flags or files, 3 for a diverged run."""
    return main_finetune.run_cli(argv, get_args_parser(), "DAMA linear probe", main)


if __name__ == "__main__":
    sys.exit(run_cli())
