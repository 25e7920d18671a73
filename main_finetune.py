"""Fine-tune a DAMA-pretrained ViT for cell classification (MAE's main_finetune layout).

    python main_finetune.py --arch main_vit_tiny --finetune OUT/checkpoint.pth --data_path DATA --output_dir FT
    python main_finetune.py --dataset synthetic --arch main_vit_tiny --img_size 64 --finetune OUT/checkpoint.pth
    python main_finetune.py --eval --resume FT/checkpoint-best.pth --data_path DATA

--finetune takes a raw pretraining checkpoint (student 1, or --student 2 / --is_momentum) or an encoder-only
checkpoint written by convert_checkpoint.py. Single process, torchrun and submitit_finetune.py all work.
"""
import argparse
import datetime
import json
import os
import sys
import time

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models_dama
import models_vit
import util.lr_decay as lrd
import util.misc as misc
from engine_finetune import evaluate, train_one_epoch
from util.checkpoint import find_resume_checkpoint, load_checkpoint, load_model_strict, resume, save_model
from util.cli import add_bool_flag, run_tool
from util.convert import load_pretrained_encoder
from util.datasets import build_finetune_dataset, build_finetune_test_dataset
from util.errors import ConfigError, DataError
from util.lr_sched import resolve_lr
from util.transforms import add_augmentation_flags, augmentation_options

# big enough that ViT-T learns the synthetic cell types in a few CPU epochs, small enough to take minutes
DEFAULT_SYNTHETIC_SIZE = 2000


def add_model_args(parser):
    parser.add_argument("--arch", default="main_vit_tiny", choices=sorted(models_dama.ARCH_CONFIGS),
                        help="encoder size; the same name as the pretraining run")
    parser.add_argument("--img_size", default=128, type=int, help="fine-tuning image size (pos_embed is resampled)")
    parser.add_argument("--patch_size", default=16, type=int)
    parser.add_argument("--in_chans", default=7, type=int, help="image channels (7 for the brain-cell TIFFs)")
    parser.add_argument("--num_classes", default=None, type=int,
                        help="number of classes (default: the number of class folders found)")
    parser.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth rate")
    add_bool_flag(parser, "global_pool", True, help="classify from the mean of the patch tokens -> fc_norm (default "
                                                    "on); --no_global_pool: from the final-normed cls token")
    parser.add_argument("--cls_token", action="store_false", dest="global_pool",
                        help="the same as --no_global_pool (MAE's spelling)")


def add_optimizer_args(parser):
    parser.add_argument("--batch_size", default=64, type=int, help="batch size per GPU/process")
    parser.add_argument("--epochs", default=50, type=int)
    parser.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    parser.add_argument("--clip_grad", default=None, type=float, help="max gradient norm (default: no clipping)")
    parser.add_argument("--weight_decay", default=0.05, type=float)
    parser.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr * eff. batch / 256)")
    parser.add_argument("--blr", default=1e-3, type=float, help="base lr for an effective batch of 256")
    parser.add_argument("--layer_decay", default=0.75, type=float, help="layer-wise lr decay (BEiT/MAE)")
    parser.add_argument("--min_lr", default=1e-6, type=float, help="lr floor of the cosine schedule")
    parser.add_argument("--warmup_epochs", default=5, type=int)
    parser.add_argument("--amp_dtype", default=None, choices=("bf16", "fp16", "none"),
                        help="autocast dtype (default: bf16 on cuda, none on cpu)")


def add_augmentation_args(parser):
    parser.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    parser.add_argument("--mixup", default=0, type=float, help="mixup alpha (0: off)")
    parser.add_argument("--cutmix", default=0, type=float, help="cutmix alpha (0: off)")
    parser.add_argument("--cutmix_minmax", default=None, type=float, nargs="+",
                        help="cutmix min/max box ratio (overrides --cutmix)")
    parser.add_argument("--mixup_prob", default=1.0, type=float, help="probability of mixup or cutmix per batch")
    parser.add_argument("--mixup_switch_prob", default=0.5, type=float, help="probability of cutmix over mixup")
    parser.add_argument("--mixup_mode", default="batch", choices=("batch", "pair", "elem"))
    add_augmentation_flags(parser)  # --crop_scale, --rotation, --max_shift of the training images


def add_checkpoint_args(parser):
    parser.add_argument("--finetune", default="", help="pretraining or encoder-only checkpoint to start from")
    parser.add_argument("--student", default=1, type=int, choices=(1, 2), help="which DAMA student to load")
    parser.add_argument("--is_momentum", action="store_const", const=2, dest="student",
                        help="the reference's name for --student 2")
    parser.add_argument("--output_dir", default="./output_dir", help="checkpoints and log.txt go here")
    parser.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    parser.add_argument("--resume", default="", help="fine-tuning checkpoint to resume from")
    parser.add_argument("--start_epoch", default=0, type=int)
    parser.add_argument("--save_freq", default=50, type=int, help="also keep checkpoint-<epoch>.pth this often")
    parser.add_argument("--eval", action="store_true", help="evaluate (--resume CKPT) and exit")
    parser.add_argument("--dist_eval", action="store_true", help="shard the validation set over the ranks")


def add_data_args(parser):
    parser.add_argument("--dataset", default="folder", choices=("folder", "synthetic"),
                        help="folder: <data_path>/{train,val}/<class>/*; synthetic: built-in cells")
    parser.add_argument("--data_path", default="", help="dataset root with train/ and val/ (and optionally test/: "
                                                          "the epoch is then chosen on val and test scored once)")
    parser.add_argument("--synthetic_size", default=DEFAULT_SYNTHETIC_SIZE, type=int,
                        help="training images of --dataset synthetic")
    parser.add_argument("--val_crop", default=48, type=int, help="centre crop of validation images before resize")
    parser.add_argument("--num_workers", default=10, type=int)
    add_bool_flag(parser, "pin_mem", True, help="pin CPU memory in the data loaders (default on)")


def get_args_parser():
    # add_help=False: submitit_finetune.py builds its own parser on top of this one
    parser = argparse.ArgumentParser("DAMA fine-tuning for image classification", add_help=False)
    add_model_args(parser)
    add_optimizer_args(parser)
    add_augmentation_args(parser)
    add_checkpoint_args(parser)
    add_data_args(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", default=0, type=int)
    misc.add_distributed_args(parser)
    return parser


def resolve_defaults(args):
    """Fill the defaults that depend on other flags."""
    if args.amp_dtype is None:
        args.amp_dtype = "bf16" if str(args.device).startswith("cuda") else "none"
    if args.log_dir is None:
        args.log_dir = args.output_dir
    if args.accum_iter < 1:
        raise ConfigError(f"--accum_iter must be >= 1, got {args.accum_iter}")
    augmentation_options(args)  # --crop_scale, --rotation, --max_shift


def mixup_active(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def check_num_classes(args, dataset_train, dataset_val) -> int:
    """--num_classes defaults to the data's class count; an explicit value must agree with the data."""
    train_classes, val_classes = list(dataset_train.classes), list(dataset_val.classes)
    if train_classes != val_classes:
        raise DataError(f"train and val class folders differ: {train_classes} vs {val_classes} "
                        f"(under --data_path {args.data_path})")
    if args.num_classes is not None and args.num_classes != len(train_classes):
        raise DataError(f"--num_classes {args.num_classes} disagrees with the {len(train_classes)} classes "
                        f"found in the data ({train_classes}); drop --num_classes or fix the data")
    return len(train_classes)


class ShardSampler(torch.utils.data.Sampler):
    """Every rank-th sample starting at `rank`, no padding: each val image is counted exactly once."""

    def __init__(self, dataset_len: int, rank: int, world_size: int):
        self.indices = list(range(rank, dataset_len, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def build_loaders(args, dataset_train, dataset_val, keep_last_batch: bool = False):
    """Train: DistributedSampler always (a fresh order per epoch via set_epoch), drop_last (mixup needs even
    batches) unless keep_last_batch (the linear probe; a last batch of one image is still dropped, BatchNorm needs
    two). Val: sharded with --dist_eval, else every rank reads the whole set in order. Prints the steps per epoch."""
    world_size, rank = misc.get_world_size(), misc.get_rank()
    sampler_train = torch.utils.data.DistributedSampler(
        dataset_train, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    if args.dist_eval:
        sampler_val = ShardSampler(len(dataset_val), rank, world_size)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    common = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and str(args.device).startswith("cuda"),
                  persistent_workers=args.num_workers > 0)
    drop_last = not keep_last_batch or len(sampler_train) % args.batch_size == 1
    loader_train = torch.utils.data.DataLoader(dataset_train, sampler=sampler_train, batch_size=args.batch_size,
                                               drop_last=drop_last, **common)
    loader_val = torch.utils.data.DataLoader(dataset_val, sampler=sampler_val, batch_size=args.batch_size,
                                             drop_last=False, **common)
    if len(loader_train) == 0:
        raise DataError(f"{len(dataset_train)} training images are fewer than one batch of {args.batch_size} "
                        f"x {world_size} processes; lower --batch_size")
    dropped = len(sampler_train) - len(loader_train) * args.batch_size if drop_last else 0
    print(f"{len(loader_train)} steps per epoch: {len(sampler_train)} training images per process in batches of "
          f"{args.batch_size}" + (f", the last {dropped} dropped" if dropped else ""))
    return loader_train, loader_val


def build_criterion(args, num_classes: int):
    """(criterion, mixup_fn): soft-target CE under mixup/cutmix, else label smoothing or plain CE."""
    if mixup_active(args):
        if args.batch_size % 2:
            raise ConfigError(f"--mixup/--cutmix need an even --batch_size, got {args.batch_size}")
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup_fn  # smoothing is already in the soft targets
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing), None
    return torch.nn.CrossEntropyLoss(), None


def build_model(args, num_classes: int):
    return models_vit.build_vit(args.arch, img_size=args.img_size, patch_size=args.patch_size,
                                in_chans=args.in_chans, num_classes=num_classes,
                                drop_path_rate=args.drop_path, global_pool=args.global_pool)


def build_finetune_model(args, num_classes: int):
    """The classifier with the --finetune encoder loaded; a resumed run restores its fine-tuned weights instead."""
    model = build_model(args, num_classes)
    if args.finetune and not args.resume:
        load_pretrained_encoder(model, args.finetune, student=args.student)
    return model


def build_optimizer(args, model_without_ddp):
    # param_groups_lrd adds the model's no_weight_decay() names (pos_embed, cls_token, ...) itself
    param_groups = lrd.param_groups_lrd(model_without_ddp, args.weight_decay, layer_decay=args.layer_decay)
    fused = torch.device(args.device).type == "cuda"  # one kernel for all parameters
    return torch.optim.AdamW(param_groups, lr=args.lr, fused=fused)


def build_log_writer(args):
    if not misc.is_main_process() or not args.log_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported here: slow, and only rank 0 needs it
    os.makedirs(args.log_dir, exist_ok=True)
    return SummaryWriter(log_dir=args.log_dir)


def wrap_ddp(args, model):
    if not args.distributed:
        return model
    device_ids = [args.local_rank] if str(args.device).startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def print_eval_accuracy(num_images: int, stats: dict):
    print(f"Accuracy of the network on the {num_images} test images: {stats['acc1']:.2f}%")


def save_epoch_checkpoints(args, epoch, model_without_ddp, optimizer, loss_scaler, max_accuracy, improved):
    """Rolling checkpoint.pth every epoch, checkpoint-<epoch>.pth every --save_freq, checkpoint-best.pth."""
    if not args.output_dir:
        return
    extra = {"max_accuracy": max_accuracy}
    save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, extra=extra)
    if args.save_freq > 0 and (epoch + 1) % args.save_freq == 0:
        save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, name=str(epoch), extra=extra)
    if improved:
        save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, name="checkpoint-best", extra=extra)


def epoch_log_line(epoch, train_stats, test_stats, n_parameters, eval_prefix="test") -> dict:
    """eval_prefix 'test' (MAE's name for the per-epoch evaluation of val/), or 'val' when a test split is held out."""
    return {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
            **{f"{eval_prefix}_{k}": v for k, v in test_stats.items()}, "n_parameters": n_parameters}


def score_test_split(args, model_without_ddp, loader_test, num_classes) -> dict:
    """The held-out test split scored once, with the weights of checkpoint-best.pth (the best val epoch)."""
    path = os.path.join(args.output_dir, "checkpoint-best.pth")
    if args.distributed:
        torch.distributed.barrier()  # rank 0 wrote the file
    best = load_checkpoint(path)
    load_model_strict(model_without_ddp, best["model"], path)
    stats = evaluate(loader_test, model_without_ddp, args.device, args.amp_dtype, num_classes,
                     sharded=args.dist_eval)
    print(f"Test accuracy at the best val epoch {best['epoch']} ({path}): {stats['acc1']:.2f}% on "
          f"{len(loader_test.dataset)} test images (scored once)")
    return {**{f"test_{k}": v for k, v in stats.items()}, "test_scored_at_epoch": best["epoch"]}


def log_test_scalars(log_writer, test_stats, epoch):
    if log_writer is None:
        return
    for name, value in test_stats.items():
        log_writer.add_scalar(f"perf/test_{name}", value, epoch)
    log_writer.flush()


def train(args, model, model_without_ddp, loaders, criterion, mixup_fn, optimizer, loss_scaler,
          num_classes, max_accuracy, loader_test=None):
    """Epoch loop: train, evaluate, checkpoint, log. Returns the best top-1 on val.

    The best epoch is chosen on val (top-1, ties to the later epoch). With loader_test (a held-out test split) the
    per-epoch lines log val_*, and the test split is scored once at the end with checkpoint-best.pth: test_* in
    the final line. Without one the per-epoch keys are MAE's test_* (measured on val), and the final line says so.
    """
    loader_train, loader_val = loaders
    log_writer = build_log_writer(args)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        loader_train.sampler.set_epoch(epoch)  # a new shuffle every epoch, the same on all ranks
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, args.device, epoch, loss_scaler,
                                      args, mixup_fn=mixup_fn, log_writer=log_writer)
        test_stats = evaluate(loader_val, model_without_ddp, args.device, args.amp_dtype, num_classes,
                              sharded=args.dist_eval)
        print_eval_accuracy(len(loader_val.dataset), test_stats)
        improved = test_stats["acc1"] >= max_accuracy  # >= as the reference: the first epoch always saves a best
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        print(f"Max accuracy: {max_accuracy:.2f}%")
        save_epoch_checkpoints(args, epoch, model_without_ddp, optimizer, loss_scaler, max_accuracy, improved)
        log_test_scalars(log_writer, test_stats, epoch)
        misc.append_json_log(args.output_dir, epoch_log_line(epoch, train_stats, test_stats, n_parameters,
                                                             "val" if loader_test is not None else "test"))
    final = {"max_accuracy": max_accuracy, "selected_on": "val"}  # the set max_accuracy was chosen (and measured) on
    if loader_test is not None:
        final.update(score_test_split(args, model_without_ddp, loader_test, num_classes))
    misc.append_json_log(args.output_dir, final)
    if log_writer is not None:
        log_writer.close()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    return max_accuracy


def build_test_loader(args, dataset_test):
    """The held-out test split (or None), read like val."""
    if dataset_test is None:
        return None
    sampler = ShardSampler(len(dataset_test), misc.get_rank(), misc.get_world_size()) if args.dist_eval else \
        torch.utils.data.SequentialSampler(dataset_test)
    return torch.utils.data.DataLoader(dataset_test, sampler=sampler, batch_size=args.batch_size,
                                       num_workers=args.num_workers, drop_last=False)


def setup(args, make_model=build_finetune_model, make_optimizer=build_optimizer, keep_last_batch=False):
    """Everything before the first step; errors here are the user's flags or files.

    make_model(args, num_classes) and make_optimizer(args, model_without_ddp) are what main_linprobe.py
    replaces (a frozen encoder, a head-only optimiser), and keep_last_batch (its small data sets); everything
    else is shared.
    """
    resolve_defaults(args)
    misc.init_distributed_mode(args)
    print(f"job dir: {os.path.dirname(os.path.realpath(__file__))}")
    print(json.dumps(vars(args), indent=1, default=str))
    misc.seed_everything(args.seed)

    dataset_train = build_finetune_dataset(True, args)
    dataset_val = build_finetune_dataset(False, args)
    num_classes = check_num_classes(args, dataset_train, dataset_val)
    dataset_test = build_finetune_test_dataset(args, dataset_train.classes)
    if dataset_test is not None and not args.output_dir:
        raise ConfigError("the data has a test split, scored at the end with <output_dir>/checkpoint-best.pth; "
                          "set --output_dir")
    print(f"train: {len(dataset_train)} images, val: {len(dataset_val)} images, {num_classes} classes"
          + (f"; test: {len(dataset_test)} images, scored once at the best val epoch" if dataset_test else
             "; no test split: the best accuracy is chosen and measured on val"))
    loaders = build_loaders(args, dataset_train, dataset_val, keep_last_batch)
    criterion, mixup_fn = build_criterion(args, num_classes)

    if not args.eval and not args.resume:
        find_resume_checkpoint(args)  # a requeued job continues from its own checkpoint.pth
    model = make_model(args, num_classes)
    model.to(args.device)
    model_without_ddp = model
    model = wrap_ddp(args, model)

    resolve_lr(args, misc.get_world_size())
    effective_batch = args.batch_size * args.accum_iter * misc.get_world_size()
    print(f"lr: {args.lr:.3e} (blr {args.blr:.3e} x effective batch {effective_batch} / 256 unless --lr)")
    optimizer = make_optimizer(args, model_without_ddp)
    loss_scaler = misc.LossScaler(args.amp_dtype, args.device)
    checkpoint = resume(args, model_without_ddp, optimizer, loss_scaler)
    max_accuracy = float(checkpoint.get("max_accuracy", 0.0)) if checkpoint else 0.0
    return dict(model=model, model_without_ddp=model_without_ddp, loaders=loaders, criterion=criterion,
                mixup_fn=mixup_fn, optimizer=optimizer, loss_scaler=loss_scaler, num_classes=num_classes,
                max_accuracy=max_accuracy, loader_test=build_test_loader(args, dataset_test))


def main(args, setup_fn=setup):
    """--eval: one evaluation pass; otherwise the training loop. setup_fn: main_linprobe.py's setup."""
    run = setup_fn(args)
    loader_val = run["loaders"][1]
    if args.eval:
        test_stats = evaluate(loader_val, run["model_without_ddp"], args.device, args.amp_dtype,
                              run["num_classes"], sharded=args.dist_eval)
        print_eval_accuracy(len(loader_val.dataset), test_stats)
        if run["loader_test"] is not None:  # the held-out split as well, reported on its own line
            stats = evaluate(run["loader_test"], run["model_without_ddp"], args.device, args.amp_dtype,
                             run["num_classes"], sharded=args.dist_eval)
            print(f"Accuracy on the {len(run['loader_test'].dataset)} images of the test split: {stats['acc1']:.2f}%")
        return test_stats
    return train(args, run["model"], run["model_without_ddp"], run["loaders"], run["criterion"], run["mixup_fn"],
                 run["optimizer"], run["loss_scaler"], run["num_classes"], run["max_accuracy"], run["loader_test"])


def run_cli(argv=None, parent_parser=None, prog="DAMA fine-tuning", main_fn=main) -> int:
    """Exit code 2 with one `error: ...` line for bad flags/files, 3 for a diverged run (util/cli.py).

    parent_parser (default: get_args_parser()), prog and main_fn: main_linprobe.py's.
    """
    parser = argparse.ArgumentParser(prog, parents=[parent_parser or get_args_parser()])
    args = parser.parse_args(argv)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    return run_tool(main_fn, args)


if __name__ == "__main__":
    sys.exit(run_cli())
