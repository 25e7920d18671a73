"""Reconstruction figure of a DAMA pretraining checkpoint: masks, reconstructions and student 1's loss map.

    python visualize.py --checkpoint output_dir/checkpoint.pth --out recon.png
    python visualize.py --checkpoint ckpt.pth --dataset folder --data_path /data/cells --num_images 6 --per_channel

Columns: input | mask1 | rec1 | mask2 | rec2 | loss1 (see util/visualize.py). The model, image size and data
settings come from the checkpoint's saved args: --arch, --patch_size and --in_chans may be given but must agree
with them (one error line names both values otherwise); the data flags and --img_size override them. With the
same --seed the images and masks are those of the --vis_freq figures written during training.
"""
import argparse
import sys
from pathlib import Path

import torch

import main_pretrain
from models_dama import ARCHS
from util.checkpoint import fill_from_checkpoint, load_checkpoint
from util.cli import CommandLineParser, DescribedHelpFormatter, run_tool
from util.datasets import build_pretrain_dataset
from util.errors import CheckpointError
from util.transforms import build_finetune_transform
from util.visualize import fixed_batch, parse_channels, reconstruction_figure, save_figure

# Flags whose default is "whatever the checkpoint was trained with"
DATA_OVERRIDES = ("dataset", "data_path", "img_size", "synthetic_size", "seed")
# ... and the model flags, which must agree with it when given (the weights only fit that model)
MODEL_FLAGS = ("arch", "patch_size", "in_chans")


def get_args_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(Path(__file__).name, description=__doc__, formatter_class=DescribedHelpFormatter)
    parser.add_argument("--checkpoint", "--resume", dest="checkpoint", required=True,
                        help="pretraining checkpoint (checkpoint.pth; keeps both decoders)")
    parser.add_argument("--out", default="reconstruction.png", help="PNG to write")
    parser.add_argument("--arch", default=None, choices=sorted(ARCHS),
                        help="default: the checkpoint's; another value is an error")
    parser.add_argument("--patch_size", default=None, type=int,
                        help="default: the checkpoint's; another value is an error")
    parser.add_argument("--in_chans", default=None, type=int,
                        help="default: the checkpoint's; another value is an error")
    parser.add_argument("--dataset", default=None, choices=["folder", "synthetic"],
                        help="default: the checkpoint's")
    parser.add_argument("--data_path", default=None, help="image folder (default: the checkpoint's)")
    parser.add_argument("--img_size", default=None, type=int,
                        help="default: the checkpoint's; another size regenerates the fixed sin-cos position "
                             "embeddings for the new patch grid")
    parser.add_argument("--synthetic_size", default=None, type=int, help="default: the checkpoint's")
    parser.add_argument("--seed", default=None, type=int,
                        help="seed of the augmentation and the masks (default: the checkpoint's --seed)")
    parser.add_argument("--num_images", default=4, type=int, help="images (rows) in the figure")
    parser.add_argument("--vis_channels", "--channels", dest="vis_channels", default=None,
                        help="three channel indices shown as R,G,B, e.g. 0,3,5 (default: the checkpoint's "
                             "--vis_channels, else 2,3,4 = NeuN,S100,Olig2 for 7 channels, the first three for 3 to 6, "
                             "channel 0 red and 1 green for 2, grey for 1)")
    parser.add_argument("--per_channel", action="store_true", help="add one grey-scale row per channel")
    parser.add_argument("--view", default="train", choices=["train", "center"],
                        help="train: the pretraining augmentation (fixed seed); center: the central half of "
                             "each image resized to --img_size, no rotation or flip")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def run_args(cli: argparse.Namespace, checkpoint: dict) -> argparse.Namespace:
    """The pretraining args: main_pretrain defaults < the checkpoint's saved args < this script's flags."""
    args = main_pretrain.get_args_parser().parse_args([])
    saved = checkpoint.get("args") or {}
    if not saved:
        print(f"note: {cli.checkpoint} has no saved args; using main_pretrain.py defaults (--arch {args.arch})")
    defaults = {key: getattr(args, key) for key in MODEL_FLAGS}
    fill_from_checkpoint(cli, defaults, saved, f"checkpoint {cli.checkpoint}", strict=True)
    for key, value in saved.items():
        setattr(args, key, value)
    for key in MODEL_FLAGS:
        setattr(args, key, getattr(cli, key))
    for key in DATA_OVERRIDES:
        if getattr(cli, key) is not None:
            setattr(args, key, getattr(cli, key))
    return args


def load_model(checkpoint: dict, args, path) -> torch.nn.Module:
    """The pretraining model with the checkpoint's weights; at another --img_size the fixed sin-cos position
    tables are the new model's (they are not learnt), everything else must match."""
    model = main_pretrain.build_model(args)
    state_dict = checkpoint["model"]
    own = model.state_dict()
    resized = {key for key in state_dict if key.endswith("pos_embed") and key in own
               and state_dict[key].shape != own[key].shape}
    state_dict = {key: value for key, value in state_dict.items() if key not in resized}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if set(missing) != resized or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match --arch {args.arch}: missing "
                              f"{sorted(set(missing) - resized)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model


def figure_dataset(args, view: str):
    """The pretraining dataset, optionally with the deterministic central view instead of the augmentation."""
    dataset = build_pretrain_dataset(args)
    if view == "center":  # same crop size (half the side) as the augmentation, so the scale matches training
        dataset.transform = build_finetune_transform(False, args.img_size, args.img_size // 2)
    return dataset


def main(cli: argparse.Namespace) -> Path:
    checkpoint = load_checkpoint(cli.checkpoint)
    args = run_args(cli, checkpoint)
    vis_channels = cli.vis_channels or getattr(args, "vis_channels", None)  # checked before the model is built
    channels = parse_channels(vis_channels, args.in_chans, "--vis_channels") if vis_channels else None
    device = torch.device(cli.device)
    model = load_model(checkpoint, args, cli.checkpoint).to(device)
    imgs = fixed_batch(figure_dataset(args, cli.view), cli.num_images, args.seed).to(device)
    image = reconstruction_figure(model, imgs, channels=channels, per_channel=cli.per_channel, seed=args.seed)
    path = save_figure(image, cli.out)
    print(f"Wrote {path} ({image.shape[2]}x{image.shape[1]} px, {imgs.shape[0]} images, epoch "
          f"{checkpoint.get('epoch', '?')} of {cli.checkpoint})")
    return path


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
