"""Embed every image of a folder (or the synthetic set) with a DAMA encoder and save the features to one .npz.

    python extract_features.py --checkpoint output_dir/checkpoint.pth --data_path /data/cells/val
    python extract_features.py --checkpoint finetune_dir/checkpoint-best.pth --dataset synthetic --out feats.npz

--checkpoint: a pretraining checkpoint (student 1 or 2 with --student), an encoder exported by
convert_checkpoint.py, or a fine-tuned checkpoint (its classifier is dropped). Arch, patch size, channels, image size
and pooling come from the checkpoint (a flag that disagrees is an error; --img_size may differ: the position
embedding is resampled). Images get the deterministic validation view (centre crop --val_crop, default the
fine-tuning run's or 48, resized to the image size) and go through the encoder with every patch visible.
--pool mean (the default, as fine-tuning, the linear probe and the kNN monitor): the mean of the patch tokens after
the final norm (for a model fine-tuned with global pooling: fc_norm of the mean, its pre-logits); --pool cls: the
class token after the final norm. A fine-tuned classifier keeps the pooling it was trained with.

A prepared dataset (prepare_cells.py) gives every cell of both splits, with labels from its cells.csv (-1 where
none) and paths '<slide>:<cell_id>'. The checkpoint's normalisation recipe is applied to raw folder data, and its
channel names are compared with the data's (--channel_names, --ignore_channel_names).

Output: --out, by default next to the checkpoint (<checkpoint stem>-features-<data>.npz); an existing file is
replaced only with --overwrite. It holds features float32 [N, D], labels int64 [N] (class index of the image's
sub-folder, -1 for images directly in --data_path; the synthetic cell type), paths [N] str (file path, or
'synthetic:<index>'), classes [K] str, and pool, student, checkpoint. Load with np.load(path) (no pickle needed).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from util.channels import add_channel_name_args, check_data_channels
from util.cli import CommandLineParser, DescribedHelpFormatter, run_tool
from util.datasets import checked, data_root, dataset_kind, synthetic_size
from util.errors import ConfigError
from util.features import extract_features
from util.inference import (add_model_flags, build_model, build_view, describe_checkpoint, describe_in_words,
                            embed_and_classify, open_image_folder, resolve_model_flags, view_crop)
from util.output import atomic_file
from util.packed import open_packed_dataset, prepared_layout
from util.synthetic import SyntheticCells


def get_args_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(Path(__file__).name, description=__doc__, formatter_class=DescribedHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="pretraining, exported or fine-tuned checkpoint")
    parser.add_argument("--out", default=None,
                        help=".npz file to write (default: <checkpoint stem>-features-<data>.npz next to the "
                             "checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file (default: refuse)")
    parser.add_argument("--student", type=int, choices=(1, 2), default=1,
                        help="which student of a pretraining checkpoint (ignored for other checkpoints; default: 1)")
    add_model_flags(parser, img_size_help="encoder input size (default: the checkpoint's; another size resamples "
                                          "the position embedding)")
    parser.add_argument("--dataset", default=None, choices=("folder", "synthetic"),
                        help="default: folder when --data_path is given, else synthetic")
    parser.add_argument("--data_path", default=None,
                        help="folder of images: class sub-folders (<class>/**/<image>) and/or images directly in it")
    parser.add_argument("--val_crop", default=None, type=int,
                        help="centre crop in pixels before the resize (default: the fine-tuning run's, else 48; "
                             "synthetic: at most the image size)")
    parser.add_argument("--synthetic_size", default=None, type=int, help="number of synthetic images (default: 1000)")
    parser.add_argument("--split", default="val",
                        help="synthetic split name (a different image stream per name; default: %(default)s)")
    parser.add_argument("--seed", default=0, type=int, help="synthetic seed (default: %(default)s)")
    parser.add_argument("--batch_size", default=64, type=int, help="images per batch (default: %(default)s)")
    parser.add_argument("--num_workers", default=4, type=int, help="DataLoader workers (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: %(default)s)")
    parser.add_argument("--print_freq", default=20, type=int,
                        help="progress line every N batches (default: %(default)s)")
    add_channel_name_args(parser)
    return parser


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------
def load_encoder(path: str, student: int = 1, img_size: int = None, pool: str = None):
    """(timm VisionTransformer without classifier in eval mode, geometry dict) for any checkpoint kind.

    geometry: util.inference.describe_checkpoint's description (arch, img_size, patch_size, in_chans, embed_dim,
    depth, pool, val_crop, channel names, recipe, ...), with img_size replaced when given. A fine-tuned global-pool
    model keeps its fc_norm (and has no final norm); the others keep the final norm and pool as `pool` says.
    """
    description, weights = describe_checkpoint(path, student)
    return headless_model(description, weights, img_size, pool)


def headless_model(description: dict, weights: dict, img_size: int = None, pool: str = None):
    """load_encoder's (model, geometry) from a checkpoint already described."""
    if description["student"] == 2 and not description["from_students"]:
        print(f"note: {description['path']} is not a pretraining checkpoint; --student 2 has no effect")
    model = build_model(description, weights, img_size=img_size, pool=pool, with_head=False)
    return model, dict(description, img_size=img_size or description["img_size"])


def vit_encoder(model):
    """imgs [N, C, H, W] -> [N, D]: util.features' encoder function for the model of `load_encoder` (its pooling)."""
    return lambda imgs: embed_and_classify(model, imgs)[0]


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def feature_dataset(args, geometry: dict):
    """(dataset yielding (image [C, S, S], label), paths [N], classes) with the deterministic validation view."""
    img_size, in_chans = geometry["img_size"], geometry["in_chans"]
    crop = view_crop(args, geometry)
    if dataset_kind(args) == "synthetic":
        crop = min(crop, img_size)  # synthetic images are only img_size wide
        transform = build_view(img_size, crop, geometry["mean"], geometry["std"])
        dataset = SyntheticCells(synthetic_size(args), img_size, in_chans, seed=args.seed, split=args.split,
                                 transform=transform)
        return dataset, [f"synthetic:{i}" for i in range(len(dataset))], dataset.classes
    root = data_root(args)
    transform = build_view(img_size, crop, geometry["mean"], geometry["std"])
    args.normalization, args.in_chans = geometry.get("normalization"), in_chans  # the checkpoint's recipe
    if prepared_layout(root) == "packed":  # every cell, both splits; paths are '<slide>:<cell_id>'
        dataset = open_packed_dataset(root, args, transform, split=None)
        paths = [f"{slide}:{cell}" for slide, cell in zip(dataset.table["slide"].tolist(),
                                                            dataset.table["cell_id"].tolist())]
        return dataset, paths, dataset.classes
    # every image: class sub-folders (and loose images, label -1), or a prepared TIFF folder's cells by cells.csv
    dataset, table = open_image_folder(root, in_chans, transform, geometry.get("normalization"),
                                       args.channel_names)
    return checked(dataset), [str(root / path) for path in table["file"].tolist()], dataset.classes


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------
def default_out(args) -> Path:
    """<checkpoint folder>/<checkpoint stem>-features-<data>.npz, data = the data folder's name or synthetic-<split>."""
    checkpoint = Path(args.checkpoint)
    data = f"synthetic-{args.split}" if dataset_kind(args) == "synthetic" else \
        Path(args.data_path).expanduser().resolve().name
    return checkpoint.parent / f"{checkpoint.stem}-features-{data}.npz"


def output_path(args) -> Path:
    """--out (with .npz appended, as np.savez does) or default_out; an existing file needs --overwrite."""
    out = Path(args.out) if args.out else default_out(args)
    out = out if out.suffix == ".npz" else out.with_name(out.name + ".npz")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it, or --out another file")
    return out


def save_npz(out: Path, **arrays) -> None:
    """np.savez through util.output.atomic_file: never a half-written file."""
    with atomic_file(out) as f:
        np.savez(f, **arrays)


def main(args) -> Path:
    if args.batch_size < 1 or args.print_freq < 1:
        raise ConfigError(f"--batch_size and --print_freq must be at least 1, got {args.batch_size}, {args.print_freq}")
    device = torch.device(args.device)
    description, weights = describe_checkpoint(args.checkpoint, args.student)
    resolve_model_flags(args, description, loose=("img_size",))
    out = output_path(args)
    model, geometry = headless_model(description, weights, args.img_size, args.pool)
    model.to(device)
    dataset, paths, classes = feature_dataset(args, geometry)
    check_data_channels(geometry.get("channel_names"), dataset, args, f"checkpoint {args.checkpoint}")
    print(f"Embedding {len(dataset)} images with the {describe_in_words(geometry, args.pool)} of {args.checkpoint} "
          f"on {device}")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda")
    features, labels = extract_features(vit_encoder(model), loader, device, print_freq=args.print_freq)
    features, labels = features.cpu().numpy(), labels.cpu().numpy()
    save_npz(out, features=features, labels=labels, paths=np.array(paths, dtype=str),
             classes=np.array(classes, dtype=str), pool=args.pool, student=args.student,
             checkpoint=str(args.checkpoint))
    print(f"Wrote {out}: features {features.shape}, {len(classes)} classes")
    return out


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
