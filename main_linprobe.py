"""Linear probe of a frozen pretrained encoder (MAE's main_linprobe, with SGD instead of LARS).

    python main_linprobe.py --arch main_vit_tiny --finetune OUT/checkpoint.pth --data_path DATA --output_dir LP
    python main_linprobe.py --dataset synthetic --arch main_vit_tiny --img_size 64 --finetune OUT/checkpoint.pth

The encoder is loaded exactly as main_finetune.py loads --finetune (student 1 by default, or an encoder-only
file) and frozen; only the head BatchNorm1d(affine=False) -> Linear is trained. The flags are main_finetune's
with linear-probe defaults (SGD momentum 0.9, blr 0.1, no weight decay, no mixup/cutmix/smoothing,
no drop path); log.txt and checkpoints have the same format as fine-tuning's.
MAE trains its probe with LARS at batch 16384; SGD with momentum is the usual choice at the batch sizes
of cell data sets, and the BatchNorm in front of the linear layer makes it insensitive to the feature scale.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

import main_finetune
import models_vit
import util.misc as misc
from engine_finetune import NonFiniteLossError, evaluate
from util.checkpoint import CheckpointError, find_resume_checkpoint, resume
from util.convert import load_pretrained_encoder
from util.datasets import DataError, build_finetune_dataset
from util.lr_sched import resolve_lr

LINPROBE_DEFAULTS = dict(batch_size=256, epochs=90, blr=0.1, min_lr=0.0, weight_decay=0.0, warmup_epochs=10,
                         smoothing=0.0, mixup=0.0, cutmix=0.0, drop_path=0.0)


def get_args_parser():
    """main_finetune's flags with linear-probe defaults, plus the optimiser choice."""
    parser = main_finetune.get_args_parser()
    parser.description = "DAMA linear probe (frozen encoder)"
    parser.set_defaults(**LINPROBE_DEFAULTS)
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"),
                        help="sgd (momentum, default; blr 0.1) or adamw (use e.g. --blr 1e-3); --layer_decay is unused")
    parser.add_argument("--momentum", default=0.9, type=float, help="SGD momentum")
    return parser


def check_args(args):
    if args.drop_path != 0:
        raise ValueError(f"--drop_path must be 0 for a linear probe (the encoder is frozen), got {args.drop_path}")


def build_probe_model(args, num_classes: int) -> nn.Module:
    """models_vit classifier with the pretrained (or random) encoder frozen and a BN + Linear head."""
    model = models_vit.build_vit(args.arch, img_size=args.img_size, patch_size=args.patch_size,
                                 in_chans=args.in_chans, num_classes=num_classes, drop_path_rate=0.0,
                                 global_pool=args.global_pool)
    if args.finetune and not args.resume:  # a resumed probe restores all its weights instead
        load_pretrained_encoder(model, args.finetune, student=args.student)  # before the head is wrapped
    linear = model.head
    trunc_normal_(linear.weight, std=0.01)  # MAE's probe init
    nn.init.zeros_(linear.bias)
    # the BN whitens the frozen features, so one lr suits encoders whose features differ in scale
    model.head = nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False, eps=1e-6), linear)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")
    return model


def build_optimizer(args, model_without_ddp):
    params = [p for p in model_without_ddp.head.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def setup(args):
    """main_finetune.setup with the frozen model and the head-only optimiser."""
    check_args(args)
    main_finetune.resolve_defaults(args)
    misc.init_distributed_mode(args)
    print(json.dumps(vars(args), indent=1, default=str))
    misc.seed_everything(args.seed)

    dataset_train = build_finetune_dataset(True, args)
    dataset_val = build_finetune_dataset(False, args)
    num_classes = main_finetune.check_num_classes(args, dataset_train, dataset_val)
    print(f"train: {len(dataset_train)} images, val: {len(dataset_val)} images, {num_classes} classes")
    loaders = main_finetune.build_loaders(args, dataset_train, dataset_val)
    criterion, mixup_fn = main_finetune.build_criterion(args, num_classes)

    if not args.eval and not args.resume:
        find_resume_checkpoint(args)  # a requeued job continues from its own checkpoint.pth
    model = build_probe_model(args, num_classes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"linear probe: {trainable} trainable parameters (head), encoder frozen")
    model.to(args.device)
    model_without_ddp = model
    model = main_finetune.wrap_ddp(args, model)

    resolve_lr(args, misc.get_world_size())
    print(f"lr: {args.lr:.3e} ({args.optimizer}, blr {args.blr:.3e})")
    optimizer = build_optimizer(args, model_without_ddp)
    loss_scaler = misc.LossScaler(args.amp_dtype, args.device)
    checkpoint = resume(args, model_without_ddp, optimizer, loss_scaler)
    max_accuracy = float(checkpoint.get("max_accuracy", 0.0)) if checkpoint else 0.0
    return dict(model=model, model_without_ddp=model_without_ddp, loaders=loaders, criterion=criterion,
                mixup_fn=mixup_fn, optimizer=optimizer, loss_scaler=loss_scaler, num_classes=num_classes,
                max_accuracy=max_accuracy)


def main(args):
    run = setup(args)
    loader_val = run["loaders"][1]
    if args.eval:
        test_stats = evaluate(loader_val, run["model_without_ddp"], args.device, args.amp_dtype, run["num_classes"],
                              sharded=args.dist_eval)
        main_finetune.print_eval_accuracy(len(loader_val.dataset), test_stats)
        return test_stats
    # the epoch loop, checkpoints and log.txt are fine-tuning's
    return main_finetune.train(args, run["model"], run["model_without_ddp"], run["loaders"], run["criterion"],
                               run["mixup_fn"], run["optimizer"], run["loss_scaler"], run["num_classes"],
                               run["max_accuracy"])


def run_cli(argv=None) -> int:
    """Exit code 2 with one `error: ...` line for bad flags/files, 1 for a diverged run (as main_finetune)."""
    args = argparse.ArgumentParser("DAMA linear probe", parents=[get_args_parser()]).parse_args(argv)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    try:
        main(args)
    except (DataError, CheckpointError, ValueError) as exc:
        sys.stderr.write(f"error: {main_finetune.one_line(exc)}\n")
        return 2
    except NonFiniteLossError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    finally:
        misc.cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli())
