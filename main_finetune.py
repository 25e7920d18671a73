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
from engine_finetune import PRINT_FREQ, evaluate, train_one_epoch
from util.channels import (add_channel_name_args, check_data_channels, data_channel_names,
                           read_checkpoint_description)
from util.checkpoint import (add_resume_args, check_save_schedule, describing_checkpoint, fill_from_checkpoint,
                              find_resume_checkpoint, load_checkpoint, load_model_strict, resume, run_identity,
                              run_is_finished, save_model, saved_args)
from util.cli import add_bool_flag, make_parser, run_tool
from util.convert import load_pretrained_encoder
from util.datasets import (add_loader_args, build_finetune_dataset, build_finetune_test_dataset,
                           check_one_batch_per_process, resolve_num_workers)
from util.errors import ConfigError, DataError
from util.features import add_classifier_pool_flag
from util.imagenet import add_finetune_augment_args, add_recipe_arg, recipe_in_chans, resolve_recipe
from util.lr_sched import resolve_lr
from util.normalize import add_normalize_args, check_percentiles, describe, is_percentile
from util.output import exclusive_output_dir, prepare_output_dir
from util.run_control import MidEpochCheckpoints, SaveSchedule, StopSignals
from util.sampling import resumable_loader
from util.transforms import add_augmentation_flags, augmentation_options

# big enough that ViT-T learns the synthetic cell types in a few CPU epochs, small enough to take minutes
DEFAULT_SYNTHETIC_SIZE = 2000


# The model flags a checkpoint answers when the command leaves them out (--resume / --eval: that checkpoint, whose
# values a given flag must match; a restarted run: its own checkpoint.pth; --finetune: the pretraining run's arch,
# patch size, channels and recipe); the values here apply when there is no checkpoint to ask.
MODEL_DEFAULTS = dict(arch="main_vit_tiny", img_size=128, patch_size=16, in_chans=None, global_pool=True,
                      recipe="cells")
FROM_PRETRAINING = ("arch", "patch_size", "in_chans", "recipe")  # img_size may differ: pos_embed is resampled


def add_model_args(parser):
    parser.add_argument("--arch", default=None,
                        help=f"encoder size, the same name as the pretraining run, one of "
                             f"{sorted(models_dama.ARCH_CONFIGS)} (default: the checkpoint's, else main_vit_tiny)")
    parser.add_argument("--img_size", default=None, type=int,
                        help="fine-tuning image size; pos_embed is resampled from the pretraining size (default: "
                             "the checkpoint's when resuming or evaluating, else 128)")
    parser.add_argument("--patch_size", default=None, type=int,
                        help="patch side in pixels (default: the checkpoint's, else 16)")
    parser.add_argument("--in_chans", default=None, type=int,
                        help="image channels (default: the checkpoint's, else 7 for the brain-cell data, 3 with "
                             "--recipe imagenet)")
    parser.add_argument("--num_classes", default=None, type=int,
                        help="number of classes (default: the number of classes found in the data)")
    parser.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth rate")
    add_bool_flag(parser, "global_pool", None, help="classify from the mean of the patch tokens -> fc_norm "
                                                    "(default: the checkpoint's, else on)")
    parser.add_argument("--cls_token", action="store_false", dest="global_pool",
                        help="the same as --no_global_pool (MAE's spelling): classify from the final-normed cls token")
    add_classifier_pool_flag(parser)  # --pool mean|cls, as in every other script


def add_optimizer_args(parser):
    parser.add_argument("--batch_size", default=64, type=int, help="batch size per GPU/process")
    parser.add_argument("--epochs", default=50, type=int, help="training epochs (paper: 150)")
    parser.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    parser.add_argument("--clip_grad", default=None, type=float, help="max gradient norm (default: no clipping)")
    parser.add_argument("--weight_decay", default=0.05, type=float,
                        help="AdamW weight decay (none on biases, norms and embeddings)")
    parser.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr * eff. batch / 256)")
    parser.add_argument("--blr", default=1e-3, type=float, help="base lr for an effective batch of 256")
    parser.add_argument("--layer_decay", default=0.75, type=float, help="layer-wise lr decay (BEiT/MAE)")
    parser.add_argument("--min_lr", default=1e-6, type=float, help="lr floor of the cosine schedule")
    parser.add_argument("--warmup_epochs", default=5, type=int,
                        help="epochs of linear lr warm-up from 0 (per iteration), before the cosine decay")
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
    parser.add_argument("--mixup_mode", default="batch", choices=("batch", "pair", "elem"),
                        help="timm Mixup: one mixing per batch, per pair or per image")
    add_finetune_augment_args(parser)
    add_augmentation_flags(parser)  # --crop_scale, --rotation, --max_shift of the training images


def add_checkpoint_args(parser):
    parser.add_argument("--finetune", default="", help="pretraining or encoder-only checkpoint to start from")
    parser.add_argument("--student", default=1, type=int, choices=(1, 2), help="which DAMA student to load")
    parser.add_argument("--is_momentum", action="store_const", const=2, dest="student",
                        help="the reference's name for --student 2")
    parser.add_argument("--output_dir", default="./output_dir", help="checkpoints and log.txt go here")
    parser.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    parser.add_argument("--resume", default="", help="fine-tuning checkpoint to resume from")
    parser.add_argument("--start_epoch", default=0, type=int,
                        help="first epoch when not resuming (a resumed run continues where its checkpoint stopped)")
    parser.add_argument("--save_freq", default=50, type=int, help="also keep checkpoint-<epoch>.pth this often")
    parser.add_argument("--print_freq", default=PRINT_FREQ, type=int, help="log every N steps")
    parser.add_argument("--eval", action="store_true", help="evaluate (--resume CKPT) and exit")
    parser.add_argument("--dist_eval", action="store_true", help="shard the validation set over the ranks")
    add_resume_args(parser)


def add_data_args(parser):
    parser.add_argument("--dataset", default="folder", choices=("folder", "synthetic"),
                        help="folder: <data_path>/{train,val}/<class>/*; synthetic: built-in cells")
    parser.add_argument("--data_path", default="", help="dataset root with train/ and val/ (and optionally test/: "
                                                          "the epoch is then chosen on val and test scored once)")
    parser.add_argument("--synthetic_size", default=DEFAULT_SYNTHETIC_SIZE, type=int,
                        help="training images of --dataset synthetic")
    parser.add_argument("--val_crop", default=48, type=int, help="centre crop of validation images before resize")
    add_recipe_arg(parser)
    add_loader_args(parser, "the data loaders")
    add_normalize_args(parser, what="the training files, unless the checkpoint carries a recipe (then that one)")
    add_channel_name_args(parser)


def get_args_parser():
    # add_help=False: submitit_finetune.py builds its own parser on top of this one
    parser = argparse.ArgumentParser("DAMA fine-tuning for image classification", add_help=False)
    add_model_args(parser)
    add_optimizer_args(parser)
    add_augmentation_args(parser)
    add_checkpoint_args(parser)
    add_data_args(parser)
    misc.add_device_and_seed_args(parser)
    misc.add_distributed_args(parser)
    return parser


def describe_model(args) -> None:
    """Fill the model flags the command left out from the checkpoint that describes this run (MODEL_DEFAULTS)."""
    path, strict = describing_checkpoint(args)
    if path:
        fill_from_checkpoint(args, MODEL_DEFAULTS, saved_args(path), f"checkpoint {path}", strict)
    elif args.finetune:  # a missing or unreadable file is reported when it is loaded
        pretraining = saved_args(args.finetune, tolerant=True)
        fill_from_checkpoint(args, {k: MODEL_DEFAULTS[k] for k in FROM_PRETRAINING}, pretraining)
    fill_from_checkpoint(args, MODEL_DEFAULTS, {})
    if args.in_chans is None:
        args.in_chans = recipe_in_chans(args.recipe)


def resolve_defaults(args) -> dict:
    """Fill the model flags left out from the checkpoint (describe_model), then the defaults that depend on
    other flags. Returns the run identity (util.checkpoint.run_identity): the flags as given with the model flags
    filled in, before the other defaults and the lr."""
    describe_model(args)
    identity = run_identity(args)
    resolve_num_workers(args)
    if args.amp_dtype is None:
        args.amp_dtype = "bf16" if str(args.device).startswith("cuda") else "none"
    if args.log_dir is None:
        args.log_dir = args.output_dir
    for flag in ("batch_size", "epochs", "accum_iter", "print_freq"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    check_save_schedule(args)
    check_percentiles(args.clip_percentiles)
    resolve_recipe(args)  # --in_chans default, args.mean / args.std (stored in the checkpoint's args)
    augmentation_options(args)  # --crop_scale, --rotation, --max_shift
    return identity


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


def check_class_names(args, classes: list) -> list:
    """The data's class names, which must be those (in that order) of the checkpoint being resumed or evaluated:
    otherwise every class index would mean another class."""
    trained = saved_args(args.resume).get("class_names") if args.resume else None
    if trained and list(trained) != classes:
        raise DataError(f"the data's classes {classes} (under --data_path {args.data_path or args.dataset}) differ "
                        f"from those checkpoint {args.resume} was trained on, {list(trained)}; evaluate it on data "
                        f"with the same classes")
    return classes


class ShardSampler(torch.utils.data.Sampler):
    """Every rank-th sample starting at `rank`, no padding: each val image is counted exactly once."""

    def __init__(self, dataset_len: int, rank: int, world_size: int):
        self.indices = list(range(rank, dataset_len, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def model_checkpoint(args) -> str:
    """The checkpoint whose channel names and recipe the data must follow: --resume, else --finetune ('' if none)."""
    return args.resume or args.finetune or ""


def build_datasets(args):
    """(train, val): a checkpoint's normalisation recipe is applied to raw folder data (never re-estimated), its
    channel names are compared with the data's; both end up in args (and so in this run's checkpoints)."""
    source = model_checkpoint(args)
    model_names, model_recipe = read_checkpoint_description(source) if source else (None, None)
    if is_percentile(model_recipe):
        args.normalization = model_recipe
    dataset_train = build_finetune_dataset(True, args)
    args.normalization = getattr(dataset_train, "recipe", None)  # the val set gets the same recipe
    dataset_val = build_finetune_dataset(False, args)
    if source:
        args.channel_names = check_data_channels(model_names, dataset_train, args, f"checkpoint {source}")
    else:
        args.channel_names = data_channel_names(dataset_train, args)
    print(f"intensities: {describe(args.normalization)}")
    return dataset_train, dataset_val


def last_batch_kept(num_images: int, batch_size: int, world_size: int, keep_last_batch: bool) -> bool:
    """Whether the training loader keeps each process's last partial batch: only when asked (the linear probe), and
    not when it would hold one image (the probe's BatchNorm needs two). One rule for the job and its pre-flight."""
    per_rank = -(-num_images // world_size)  # the DistributedSampler's share of each rank (padded)
    return keep_last_batch and per_rank % batch_size != 1


def build_eval_loader(args, dataset, **loader_kwargs):
    """Val or the held-out test split, every image once: sharded over the ranks with --dist_eval, else every rank
    reads the whole set in order."""
    if args.dist_eval:
        sampler = ShardSampler(len(dataset), misc.get_rank(), misc.get_world_size())
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, drop_last=False,
                                       num_workers=args.num_workers, **loader_kwargs)


def build_loaders(args, dataset_train, dataset_val, keep_last_batch: bool = False):
    """Train: DistributedSampler always (a fresh order per epoch via set_epoch), drop_last (mixup needs even
    batches) unless keep_last_batch (the linear probe; a last batch of one image is still dropped, BatchNorm needs
    two). Val: sharded with --dist_eval, else every rank reads the whole set in order. Prints the steps per epoch."""
    world_size, rank = misc.get_world_size(), misc.get_rank()
    pin_memory = args.pin_mem and str(args.device).startswith("cuda")
    # reproducible order, augmentation and start step (util.sampling), as pretraining
    per_rank = -(-len(dataset_train) // world_size)  # the DistributedSampler's share of each rank (padded)
    keep_last_batch = last_batch_kept(len(dataset_train), args.batch_size, world_size, keep_last_batch)
    loader_train = resumable_loader(dataset_train, args.batch_size, args.num_workers, args.seed, world_size, rank,
                                    pin_memory=pin_memory, keep_last_batch=keep_last_batch)
    loader_val = build_eval_loader(args, dataset_val, pin_memory=pin_memory, persistent_workers=args.num_workers > 0)
    if not args.eval:  # --eval reads only val (and test)
        check_one_batch_per_process(len(dataset_train), args.batch_size, world_size, drop_last=not keep_last_batch)
    dropped = 0 if keep_last_batch else per_rank - len(loader_train) * args.batch_size
    print(f"{len(loader_train)} steps per epoch: {per_rank} training images per process in batches of "
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


def print_eval_accuracy(num_images: int, stats: dict):
    print(f"Accuracy of the network on the {num_images} test images: {stats['acc1']:.2f}%")


def save_epoch_checkpoints(save, args, epoch, max_accuracy, improved):
    """Rolling checkpoint.pth every epoch, checkpoint-<epoch>.pth every --save_freq, checkpoint-best.pth."""
    extra = {"max_accuracy": max_accuracy}
    save(epoch, extra=extra)
    if args.save_freq > 0 and (epoch + 1) % args.save_freq == 0:
        save(epoch, name=str(epoch), extra=extra)
    if improved:
        save(epoch, name="checkpoint-best", extra=extra)


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


def train(args, run: dict):
    """Epoch loop: train, evaluate, checkpoint, log. Returns the best top-1 on val.

    The best epoch is chosen on val (top-1, ties to the later epoch). With a held-out test split the per-epoch
    lines log val_*, and the test split is scored once at the end with checkpoint-best.pth: test_* in the final
    line. Without one the per-epoch keys are MAE's test_* (measured on val), and the final line says so.
    """
    model, model_without_ddp = run["model"], run["model_without_ddp"]
    optimizer, loss_scaler, num_classes = run["optimizer"], run["loss_scaler"], run["num_classes"]
    loader_train, loader_val, loader_test = *run["loaders"], run["loader_test"]
    max_accuracy = run["max_accuracy"]

    def save(epoch, name=None, extra=None):
        return save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, name=name, extra=extra,
                          run=run["identity"])

    stop_signals = StopSignals().install()
    checkpoints = MidEpochCheckpoints(
        SaveSchedule(args.save_every_steps, args.save_every_minutes, stop_signals),
        lambda epoch, step, state: save(epoch, extra={"step": step, "epoch_state": state,
                                                       "max_accuracy": max_accuracy}))
    log_writer = misc.build_log_writer(args)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    where = f"epoch {args.start_epoch}" + (f", step {args.start_step}" if args.start_step else "")
    print(f"Start training for {args.epochs} epochs from {where}")
    start_time = time.time()
    try:
        for epoch in range(args.start_epoch, args.epochs):
            resumed_step = args.start_step if epoch == args.start_epoch else 0
            loader_train.sampler.set_epoch(epoch, resumed_step)  # a new shuffle every epoch, the same on all ranks
            train_stats = train_one_epoch(
                model, run["criterion"], loader_train, optimizer, args.device, epoch, loss_scaler, args,
                mixup_fn=run["mixup_fn"], log_writer=log_writer, print_freq=args.print_freq,
                checkpoints=checkpoints, epoch_state=run["checkpoint"].get("epoch_state") if resumed_step else None)
            test_stats = evaluate(loader_val, model_without_ddp, args.device, args.amp_dtype, num_classes,
                                  sharded=args.dist_eval)
            print_eval_accuracy(len(loader_val.dataset), test_stats)
            improved = test_stats["acc1"] >= max_accuracy  # >= as the reference: the first epoch always saves a best
            max_accuracy = max(max_accuracy, test_stats["acc1"])
            print(f"Max accuracy: {max_accuracy:.2f}%")
            save_epoch_checkpoints(save, args, epoch, max_accuracy, improved)
            log_test_scalars(log_writer, test_stats, epoch)
            line = epoch_log_line(epoch, train_stats, test_stats, n_parameters,
                                  "val" if loader_test is not None else "test")
            if getattr(args, "skip_bad_files", False) and epoch == args.start_epoch:
                line["skipped_bad_files"] = args.skipped_bad_files
            misc.append_json_log(args.output_dir, line)
    finally:
        stop_signals.uninstall()
        if log_writer is not None:
            log_writer.close()
    write_final_line(args, run, max_accuracy)
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    return max_accuracy


def write_final_line(args, run: dict, max_accuracy: float) -> None:
    """log.txt's last line: the best val top-1, the set it was chosen on, and the test split scored once."""
    final = {"max_accuracy": max_accuracy, "selected_on": "val"}  # the set max_accuracy was chosen (and measured) on
    if run["loader_test"] is not None:
        final.update(score_test_split(args, run["model_without_ddp"], run["loader_test"], run["num_classes"]))
    misc.append_json_log(args.output_dir, final)


def final_line_missing(output_dir) -> bool:
    """True when log.txt ends with an epoch's line: the run stopped after its last checkpoint, before its end."""
    path = os.path.join(output_dir, "log.txt")
    lines = [line for line in open(path).read().splitlines() if line.strip()] if os.path.isfile(path) else []
    return bool(lines) and "max_accuracy" not in json.loads(lines[-1])


def setup(args, identity: dict, make_model=build_finetune_model, make_optimizer=build_optimizer,
          keep_last_batch=False):
    """Everything before the first step; errors here are the user's flags or files.

    make_model(args, num_classes) and make_optimizer(args, model_without_ddp) are what main_linprobe.py
    replaces (a frozen encoder, a head-only optimiser), and keep_last_batch (its small data sets); everything
    else is shared. identity: the run identity (util.checkpoint.run_identity) of the command.
    """
    print(f"job dir: {os.path.dirname(os.path.realpath(__file__))}")
    print(json.dumps(vars(args), indent=1, default=str))
    misc.seed_everything(args.seed)
    if not args.eval:
        find_resume_checkpoint(args, identity)  # another run in --output_dir is refused before anything is built

    with misc.main_process_first():  # rank 0 lists and scans the files (and writes the index) before the others
        dataset_train, dataset_val = build_datasets(args)
        dataset_test = build_finetune_test_dataset(args, dataset_train.classes)
    num_classes = check_num_classes(args, dataset_train, dataset_val)
    args.class_names = check_class_names(args, list(dataset_train.classes))  # stored in every checkpoint
    # --skip_bad_files: how many the header check left out, logged in this run's first log.txt line
    args.skipped_bad_files = sum(getattr(d, "skipped_bad_files", 0) for d in (dataset_train, dataset_val))
    print(f"train: {len(dataset_train)} images, val: {len(dataset_val)} images, {num_classes} classes"
          + (f"; test: {len(dataset_test)} images, scored once at the best val epoch" if dataset_test else
             "; no test split: the best accuracy is chosen and measured on val"))
    loaders = build_loaders(args, dataset_train, dataset_val, keep_last_batch)
    criterion, mixup_fn = build_criterion(args, num_classes)

    model = make_model(args, num_classes)
    model.to(args.device)
    model_without_ddp = model
    model = misc.wrap_ddp(args, model)

    resolve_lr(args, misc.get_world_size())
    effective_batch = args.batch_size * args.accum_iter * misc.get_world_size()
    print(f"lr: {args.lr:.3e} (blr {args.blr:.3e} x effective batch {effective_batch} / 256 unless --lr)")
    optimizer = make_optimizer(args, model_without_ddp)
    loss_scaler = misc.LossScaler(args.amp_dtype, args.device)
    checkpoint = resume(args, model_without_ddp, optimizer, loss_scaler)
    max_accuracy = float(checkpoint.get("max_accuracy", 0.0)) if checkpoint else 0.0
    return dict(model=model, model_without_ddp=model_without_ddp, loaders=loaders, criterion=criterion,
                mixup_fn=mixup_fn, optimizer=optimizer, loss_scaler=loss_scaler, num_classes=num_classes,
                max_accuracy=max_accuracy, identity=identity, checkpoint=checkpoint,
                loader_test=build_eval_loader(args, dataset_test) if dataset_test is not None else None)


def preflight(args, world_size: int, make_model=build_finetune_model, keep_last_batch: bool = False) -> None:
    """The job's start-up checks, run by the submitit launcher in its own process before it submits
    (util/launch.py): flags, another run in the output folder, the data (every file's header, the classes, at least
    one batch per process of a `world_size`-process job), and the --finetune / --resume checkpoints loaded into the
    model they must fit. Writes nothing but the data index cache in the job's folder, when that folder is known now
    (a --job_dir without %j). make_model / keep_last_batch: as setup's (main_linprobe.py passes the probe's)."""
    identity = resolve_defaults(args)
    if not args.overwrite:  # with --overwrite the job sets the earlier run aside itself, not this check
        find_resume_checkpoint(args, identity)
    dataset_train, dataset_val = build_datasets(args)
    num_classes = check_num_classes(args, dataset_train, dataset_val)
    check_class_names(args, list(dataset_train.classes))
    keep_last_batch = last_batch_kept(len(dataset_train), args.batch_size, world_size, keep_last_batch)
    check_one_batch_per_process(len(dataset_train), args.batch_size, world_size, drop_last=not keep_last_batch)
    model = make_model(args, num_classes)  # loads --finetune: another arch or shape is an error
    if args.resume:
        load_model_strict(model, load_checkpoint(args.resume)["model"], args.resume)
    print(f"pre-flight checks passed: {args.arch}, {len(dataset_train)} training images of {num_classes} classes "
          f"for {world_size} processes of batch {args.batch_size}")


def main(args, setup_fn=setup):
    """--eval: one evaluation pass; otherwise the training loop. setup_fn: main_linprobe.py's setup."""
    identity = resolve_defaults(args)  # arch, sizes, channels, pooling and recipe from the checkpoint when left out
    misc.init_distributed_mode(args)
    if args.eval:
        if not args.resume:
            raise ConfigError("--eval evaluates a fine-tuned checkpoint: pass --resume CKPT (without it the model "
                              "would be untrained)")
        run = setup_fn(args, identity)
        loader_val = run["loaders"][1]
        test_stats = evaluate(loader_val, run["model_without_ddp"], args.device, args.amp_dtype,
                              run["num_classes"], sharded=args.dist_eval)
        print_eval_accuracy(len(loader_val.dataset), test_stats)
        if run["loader_test"] is not None:  # the held-out split as well, reported on its own line
            stats = evaluate(run["loader_test"], run["model_without_ddp"], args.device, args.amp_dtype,
                             run["num_classes"], sharded=args.dist_eval)
            print(f"Accuracy on the {len(run['loader_test'].dataset)} images of the test split: {stats['acc1']:.2f}%")
        return test_stats
    prepare_output_dir(args.output_dir)
    prepare_output_dir(args.log_dir, "--log_dir")
    with exclusive_output_dir(args.output_dir, enabled=misc.is_main_process()):
        run = setup_fn(args, identity)
        if run_is_finished(args):
            if final_line_missing(args.output_dir):  # stopped between its last checkpoint and its final line
                write_final_line(args, run, run["max_accuracy"])
            return run["max_accuracy"]
        return train(args, run)


def run_cli(argv=None, parent_parser=None, description="DAMA fine-tuning", main_fn=main) -> int:
    """Exit code 2 with one `error: ...` line for bad flags/files, 3 for a diverged run (util/cli.py).

    parent_parser (default: get_args_parser()), description and main_fn: main_linprobe.py's.
    """
    parser = make_parser(description, parents=[parent_parser or get_args_parser()])
    return run_tool(main_fn, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli())
