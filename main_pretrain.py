"""DAMA pretraining (single process, torchrun, or SLURM through submitit_pretrain.py).

    python main_pretrain.py --dataset synthetic --arch main_vit_tiny --img_size 64 --epochs 3 --batch_size 32
"""
import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

import models_dama
import util.misc as misc
from engine_pretrain import train_one_epoch
from util.checkpoint import (add_resume_args, check_save_schedule, describing_checkpoint, fill_from_checkpoint,
                              find_resume_checkpoint, load_checkpoint, load_model_strict, resume, run_identity,
                              run_is_finished, save_model, saved_args)
from util.channels import add_channel_name_args, data_channel_names
from util.cli import add_bool_flag, make_parser, run_tool
from util.datasets import (add_loader_args, build_pretrain_dataset, check_one_batch_per_process,
                           resolve_num_workers)
from util.errors import ConfigError
from util.gpu_augment import build_gpu_augment, build_gpu_pretrain_dataset
from util.imagenet import (DeviceDecode, add_recipe_arg, build_encoded_pretrain_dataset, recipe_in_chans,
                           resolve_recipe)
from util.knn import KnnMonitor, add_knn_args, build_knn_datasets
from util.lr_decay import param_groups_weight_decay
from util.lr_sched import resolve_lr
from util.normalize import add_normalize_args, check_percentiles, describe
from util.output import exclusive_output_dir, prepare_output_dir
from util.run_control import MidEpochCheckpoints, SaveSchedule, StopSignals
from util.sampling import resumable_loader
from util.transforms import add_augmentation_flags, augmentation_options
from util.visualize import parse_channels, write_training_figure

INIT_CHECKPOINT = "checkpoint-init.pth"  # --save_init / --epochs 0


def get_args_parser():
    parser = argparse.ArgumentParser("DAMA pretraining", add_help=False)
    # Model
    parser.add_argument("--arch", default=None, type=str,
                        help=f"model name, one of {sorted(models_dama.ARCH_CONFIGS)} (mae_*: the MAE baseline; "
                             f"default: the checkpoint's when resuming, else main_vit_base)")
    parser.add_argument("--img_size", default=None, type=int,
                        help="input side in pixels (paper: 128; default: the checkpoint's when resuming, else 224)")
    parser.add_argument("--patch_size", default=None, type=int,
                        help="patch side in pixels (default: the checkpoint's when resuming, else 16)")
    parser.add_argument("--in_chans", default=None, type=int,
                        help="image channels (default: the checkpoint's when resuming, else 7 for the brain-cell "
                             "data, 3 with --recipe imagenet)")
    parser.add_argument("--mask_ratio", default=0.8, type=float, help="fraction of patches each student hides")
    parser.add_argument("--mask_overlap_ratio", default=0.5, type=float,
                        help="fraction of student 1's visible patches that student 2 also sees")
    parser.add_argument("--mask_sampling", default="adaptive", choices=models_dama.MASK_SAMPLINGS,
                        help="student 2's mask: by student 1's loss (DAMA), at random with exactly O patches shared "
                             "(DAMA-rand), 'independent' (its own uniform mask, about K*K/L shared), or 'reference': "
                             "the reference code's batch-wide overlap defect, for comparison runs")
    parser.add_argument("--last_k_blocks", default=6, type=int,
                        help="student 2's last k blocks averaged into the regression target")
    add_bool_flag(parser, "norm_pix_loss", True, help="reconstruct per-patch standardised pixels (default on)")
    parser.add_argument("--loss_beta", default=2.0, type=float, help="smooth-L1 beta of the info loss (0: MSE)")
    parser.add_argument("--loss_alpha", default=1.0, type=float, help="weight of the info loss")
    parser.add_argument("--info_pairing", default="positional", choices=models_dama.INFO_PAIRINGS,
                        help="tokens compared by the info loss: by sequence position (reference) or "
                             "cls + shared patches (aligned)")
    parser.add_argument("--info_reduction", default="sum", choices=models_dama.INFO_REDUCTIONS,
                        help="info loss over tokens and batch: sum (reference) or mean")
    parser.add_argument("--stable_epoch", default=0, type=int,
                        help="train the reconstruction losses only for this many first epochs")
    # The reference decoder (512 wide, 8 blocks, 16 heads) dominates the cost of small models: smaller
    # decoders make CPU tests and quick experiments cheap.
    parser.add_argument("--decoder_embed_dim", default=None, type=int,
                        help="decoder width (default: the checkpoint's when resuming, else 512 as the reference)")
    parser.add_argument("--decoder_depth", default=None, type=int,
                        help="decoder blocks (default: the checkpoint's when resuming, else 8 as the reference)")
    parser.add_argument("--decoder_num_heads", default=None, type=int,
                        help="decoder heads (default: the checkpoint's when resuming, else 16 as the reference)")
    # Optimisation
    parser.add_argument("--batch_size", default=64, type=int, help="images per GPU per step")
    parser.add_argument("--epochs", default=500, type=int,
                        help="epochs to train (0: only write the untrained model as checkpoint-init.pth, see "
                             "--save_init)")
    parser.add_argument("--warmup_epochs", default=40, type=int,
                        help="epochs of linear lr warm-up from 0 (per iteration), before the cosine decay")
    parser.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    parser.add_argument("--weight_decay", default=0.05, type=float,
                        help="AdamW weight decay (none on biases, norms and embeddings)")
    parser.add_argument("--lr", default=None, type=float, help="absolute lr (overrides --blr)")
    parser.add_argument("--blr", default=1.5e-4, type=float,
                        help="base lr: lr = blr * batch_size * accum_iter * world_size / 256")
    parser.add_argument("--min_lr", default=0.0, type=float, help="lr floor of the cosine schedule")
    parser.add_argument("--amp_dtype", default=None, choices=["bf16", "fp16", "none"],
                        help="mixed precision (default: bf16 on cuda, none on cpu)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    # Data
    parser.add_argument("--dataset", default="folder", choices=["folder", "synthetic"],
                        help="'folder': images under --data_path; 'synthetic': built-in synthetic cells")
    parser.add_argument("--data_path", default=None, type=str,
                        help="dataset folder: <data_path>/train/<class>/*.tif, or a flat folder of images")
    parser.add_argument("--synthetic_size", default=1024, type=int, help="number of synthetic images")
    add_recipe_arg(parser)
    parser.add_argument("--decode", default="cpu", choices=["cpu", "gpu"],
                        help="--recipe imagenet: 'gpu' decodes the JPEG files of each batch on --device "
                             "(workers only read bytes), then crops, flips and normalises there (default: %(default)s)")
    add_loader_args(parser)
    add_bool_flag(parser, "gpu_augment", False,
                       help="workers only decode and crop; resize, rotation, shift and flips run on the device "
                            "per batch (for fast GPUs, where the CPU augmentation cannot keep up)")
    add_normalize_args(parser)
    add_channel_name_args(parser, check=False)
    add_augmentation_flags(parser)
    # Run
    parser.add_argument("--output_dir", default="./output_dir", help="checkpoints and log.txt")
    parser.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    misc.add_device_and_seed_args(parser)
    parser.add_argument("--resume", default="", help="checkpoint to resume from (default: <output_dir>/checkpoint.pth "
                                                     "when it exists and its run matches the command)")
    parser.add_argument("--start_epoch", default=0, type=int,
                        help="first epoch when not resuming (a resumed run continues where its checkpoint stopped)")
    parser.add_argument("--save_freq", default=50, type=int, help="keep checkpoint-<epoch>.pth every N epochs")
    parser.add_argument("--print_freq", default=20, type=int, help="log every N steps")
    parser.add_argument("--vis_freq", default=20, type=int,
                        help="every N epochs write <output_dir>/vis/recon_epoch<epoch>.png and a TensorBoard "
                             "image of both students' masks and reconstructions (0: off)")
    parser.add_argument("--vis_num_images", default=4, type=int, help="images in each --vis_freq figure")
    parser.add_argument("--vis_channels", default=None,
                        help="three channel indices shown as R,G,B in the --vis_freq figures, e.g. 0,3,5 (default: "
                             "2,3,4 for 7 channels, the first three for 3 to 6, R/G for 2, grey for 1)")
    add_bool_flag(parser, "save_init", False,
                  help="write the model as built, before any training, to <output_dir>/checkpoint-init.pth (the "
                       "random-init baseline: same init, position embeddings and saved args as the trained run)")
    add_resume_args(parser)
    add_knn_args(parser)
    misc.add_distributed_args(parser)
    return parser


# The model flags a checkpoint answers when the command leaves them out (--resume: that checkpoint, whose values a
# given flag must match; a restarted run: its own checkpoint.pth); the values here apply without a checkpoint.
MODEL_DEFAULTS = dict(arch="main_vit_base", img_size=224, patch_size=16, in_chans=None, decoder_embed_dim=512,
                      decoder_depth=8, decoder_num_heads=16, recipe="cells")


def describe_model(args) -> None:
    """Fill the model flags the command left out from the checkpoint that describes this run (MODEL_DEFAULTS)."""
    path, strict = describing_checkpoint(args)
    fill_from_checkpoint(args, MODEL_DEFAULTS, saved_args(path) if path else {}, f"checkpoint {path}", strict)
    if args.in_chans is None:
        args.in_chans = recipe_in_chans(args.recipe)


def resolve_defaults(args) -> dict:
    """Fill the model flags left out from the checkpoint (describe_model), then the defaults that depend on
    the machine or on other flags. Returns the run identity (util.checkpoint.run_identity): the flags as given
    with the model flags filled in, before the other defaults and the lr."""
    describe_model(args)
    identity = run_identity(args)
    resolve_num_workers(args)
    if args.amp_dtype is None:
        args.amp_dtype = "bf16" if str(args.device).startswith("cuda") else "none"
    args.log_dir = args.log_dir or args.output_dir
    resolve_recipe(args)  # --in_chans default, args.mean / args.std (stored in the checkpoint's args)
    for flag in ("batch_size", "epochs", "accum_iter", "save_freq", "print_freq", "vis_num_images"):
        if getattr(args, flag) < (0 if flag == "epochs" else 1):  # --epochs 0: only the initial checkpoint
            raise ConfigError(f"--{flag} must be at least {0 if flag == 'epochs' else 1}, got {getattr(args, flag)}")
    check_save_schedule(args)
    check_percentiles(args.clip_percentiles)
    augmentation_options(args)  # --crop_scale, --rotation, --max_shift: refused before anything is built
    if args.vis_channels:
        parse_channels(args.vis_channels, args.in_chans, "--vis_channels")
    return identity


def build_model(args):
    return models_dama.build_model(
        args.arch, img_size=args.img_size, patch_size=args.patch_size, in_chans=args.in_chans,
        decoder_embed_dim=args.decoder_embed_dim, decoder_depth=args.decoder_depth,
        decoder_num_heads=args.decoder_num_heads,
        mask_ratio=args.mask_ratio, mask_overlap_ratio=args.mask_overlap_ratio, last_k_blocks=args.last_k_blocks,
        loss_beta=args.loss_beta, loss_alpha=args.loss_alpha, norm_pix_loss=args.norm_pix_loss,
        mask_sampling=args.mask_sampling, info_pairing=args.info_pairing, info_reduction=args.info_reduction)


def record_data_description(args, dataset):
    """The data's channel names and normalisation recipe go into args, and so into every checkpoint."""
    args.channel_names = data_channel_names(dataset, args)
    args.normalization = getattr(dataset, "recipe", None)
    print(f"channels: {args.channel_names or 'unnamed'}; intensities: {describe(args.normalization)}")


def build_loader(dataset, args):
    """Shuffled, drop-last training loader whose order, augmentations and start step are reproducible
    (util.sampling): set_epoch(epoch, start_step) continues an epoch where a mid-epoch checkpoint left it."""
    loader = resumable_loader(dataset, args.batch_size, args.num_workers, args.seed, args.world_size, args.rank,
                              pin_memory=args.pin_mem and str(args.device).startswith("cuda"), drop_last_sampler=True,
                              collate_fn=getattr(dataset, "collate_fn", None))
    check_one_batch_per_process(len(dataset), args.batch_size, args.world_size, "images", padded=False)
    return loader


def save_initial_checkpoint(args, model, identity: dict) -> None:
    """<output_dir>/checkpoint-init.pth: the model as built from --seed, before any step (epoch -1, so resuming from
    it starts at epoch 0); an existing file is kept (a resumed run must not replace its own starting point)."""
    path = Path(args.output_dir) / INIT_CHECKPOINT
    if path.is_file():
        print(f"Keeping the existing initial checkpoint {path}")
        return
    save_model(args, -1, model, None, None, name=INIT_CHECKPOINT, run=identity)
    print(f"Wrote the untrained model to {path}")


def build_training_dataset(args):
    """What the workers read: encoded JPEGs (--decode gpu), worker crops (--gpu_augment) or augmented images."""
    if args.decode == "gpu":
        return build_encoded_pretrain_dataset(args)
    return build_gpu_pretrain_dataset(args) if args.gpu_augment else build_pretrain_dataset(args)


def preflight(args, world_size: int) -> None:
    """The job's start-up checks, run by the submitit launcher in its own process before it submits
    (util/launch.py): flags, the model, another run in the output folder, the data (every file's header, at least
    one batch per process of a `world_size`-process job), the kNN data and a --resume checkpoint. Writes nothing
    but the data index cache in the job's folder, when that folder is known now (a --job_dir without %j)."""
    identity = resolve_defaults(args)
    if not args.overwrite:  # with --overwrite the job sets the earlier run aside itself, not this check
        find_resume_checkpoint(args, identity)
    model = build_model(args)
    dataset = build_training_dataset(args)
    check_one_batch_per_process(len(dataset), args.batch_size, world_size, "images", padded=False)
    if args.knn_freq > 0:
        build_knn_datasets(args)
    if args.resume:
        load_model_strict(model, load_checkpoint(args.resume)["model"], args.resume)
    print(f"pre-flight checks passed: {args.arch}, {len(dataset)} images for {world_size} processes of "
          f"batch {args.batch_size}")


def main(args):
    misc.init_distributed_mode(args)
    identity = resolve_defaults(args)  # arch, sizes, channels and recipe from the checkpoint when left out
    prepare_output_dir(args.output_dir)
    prepare_output_dir(args.log_dir, "--log_dir")
    with exclusive_output_dir(args.output_dir, enabled=misc.is_main_process()):
        train(args, identity)


def train(args, identity: dict):
    print(f"job dir: {Path(__file__).resolve().parent}")
    print(json.dumps(vars(args), indent=1, default=str))
    device = torch.device(args.device)
    misc.seed_everything(args.seed)
    find_resume_checkpoint(args, identity)  # another run in --output_dir is refused before anything is built
    if args.resume:  # a resumed run keeps the intensity recipe it started with (never re-estimated)
        args.normalization = saved_args(args.resume).get("normalization")

    model = build_model(args)  # config errors surface before any data is read
    if args.save_init or args.epochs == 0:
        save_initial_checkpoint(args, model, identity)
        if args.epochs == 0:
            return
    with misc.main_process_first():  # rank 0 lists and scans the files (and writes the index) before the others
        dataset = build_training_dataset(args)
        knn_monitor = KnnMonitor(args) if args.knn_freq > 0 else None  # labelled-data errors surface now
    skipped = getattr(dataset, "skipped_bad_files", 0)  # --skip_bad_files: logged in this run's first log.txt line
    print(f"dataset: {len(dataset)} images" + (f" ({skipped} bad files left out)" if skipped else ""))
    record_data_description(args, dataset)
    data_loader = build_loader(dataset, args)
    model.to(device)
    batch_transform = build_gpu_augment(args).to(device) if args.gpu_augment else None
    if args.decode == "gpu":
        batch_transform = DeviceDecode(args.img_size, args.mean, args.std).to(device)
    vis_dataset = None  # the --vis_freq figures (rank 0): full-size images, which device-side items are not
    if args.vis_freq > 0 and misc.is_main_process():
        vis_dataset = build_pretrain_dataset(args) if batch_transform is not None else dataset
    model_without_ddp = model
    print(f"model: {args.arch}, {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.1f}M "
          f"trainable parameters; {model.mask_summary()}")

    eff_batch_size = args.batch_size * args.accum_iter * args.world_size
    resolve_lr(args, args.world_size)
    print(f"base lr: {args.lr * 256 / eff_batch_size:.2e}, actual lr: {args.lr:.2e}, "
          f"effective batch size: {eff_batch_size}")
    model = misc.wrap_ddp(args, model)
    param_groups = param_groups_weight_decay(model_without_ddp, args.weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    loss_scaler = misc.LossScaler(args.amp_dtype, device.type)
    checkpoint = resume(args, model_without_ddp, optimizer, loss_scaler)
    if run_is_finished(args):
        return
    train_model = torch.compile(model) if args.compile else model

    def save(epoch, name=None, extra=None):
        return save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, name=name, extra=extra, run=identity)

    stop_signals = StopSignals().install()
    checkpoints = MidEpochCheckpoints(
        SaveSchedule(args.save_every_steps, args.save_every_minutes, stop_signals),
        lambda epoch, step, state: save(epoch, extra={"step": step, "epoch_state": state}))
    log_writer = misc.build_log_writer(args)
    where = f"epoch {args.start_epoch}" + (f", step {args.start_step}" if args.start_step else "")
    print(f"Start training for {args.epochs} epochs from {where}")
    start_time = time.time()
    try:
        for epoch in range(args.start_epoch, args.epochs):
            resumed_step = args.start_step if epoch == args.start_epoch else 0
            data_loader.sampler.set_epoch(epoch, resumed_step)
            stats = train_one_epoch(train_model, data_loader, optimizer, device, epoch, loss_scaler, log_writer, args,
                                    batch_transform=batch_transform, checkpoints=checkpoints,
                                    epoch_state=checkpoint.get("epoch_state") if resumed_step else None)
            save(epoch)
            if (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs:
                save(epoch, name=epoch)
            if vis_dataset is not None and (epoch + 1) % args.vis_freq == 0:
                write_training_figure(model_without_ddp, vis_dataset, epoch, log_writer, args)  # fixed images, masks
            knn_stats = knn_monitor.log(epoch, model_without_ddp.student1, device, log_writer) if knn_monitor else {}
            first_line = {"skipped_bad_files": skipped} if args.skip_bad_files and epoch == args.start_epoch else {}
            misc.append_json_log(args.output_dir, {**{f"train_{k}": v for k, v in stats.items()}, **knn_stats,
                                                   **first_line, "epoch": epoch})
            if log_writer is not None:
                log_writer.flush()
    finally:
        stop_signals.uninstall()
        if log_writer is not None:
            log_writer.close()
    total = datetime.timedelta(seconds=int(time.time() - start_time))
    print(f"Training time {total}")


if __name__ == "__main__":
    args = make_parser("DAMA pretraining", parents=[get_args_parser()]).parse_args()
    sys.exit(run_tool(main, args))  # exit codes: util/cli.py
