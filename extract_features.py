"""Embed every image of a folder (or the synthetic set) with a DAMA encoder and save the features to one .npz.

    python extract_features.py --checkpoint output_dir/checkpoint.pth --data_path /data/cells/val --out val.npz
    python extract_features.py --checkpoint finetune_dir/checkpoint-best.pth --dataset synthetic --pool mean

--checkpoint: a pretraining checkpoint (student 1 or 2 with --student), an encoder exported by
convert_checkpoint.py, or a fine-tuned checkpoint (its classifier is dropped). Images get the deterministic
validation transform (centre crop --val_crop, resize to --img_size) and go through the encoder with every patch
visible. --pool cls: the class token after the final norm; --pool mean: the mean of the patch tokens after the
final norm. A model fine-tuned with global pooling has no final norm: mean gives fc_norm of the mean (its
pre-logits), cls the raw class token.

A prepared dataset (prepare_cells.py) gives every cell of both splits, with labels from its cells.csv (-1 where
none) and paths '<slide>:<cell_id>'. The checkpoint's normalisation recipe is applied to raw folder data, and its
channel names are compared with the data's (--channel_names, --ignore_channel_names).

Output .npz: features float32 [N, D], labels int64 [N] (class index of the image's sub-folder, -1 for images
directly in --data_path; the synthetic cell type), paths [N] str (file path, or 'synthetic:<index>'),
classes [K] str, and pool, student, checkpoint. Load with np.load(path) (no pickle needed).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import models_dama
import models_vit
from util.channels import add_channel_name_args, check_data_channels
from util.cli import run_tool
from util.convert import check_shapes, encoder_metadata, fit_pos_embed, read_encoder
from util.datasets import (ImageFileDataset, checked, class_folders, data_root, dataset_kind, image_folder_samples,
                           list_images, no_images_error, synthetic_size)
from util.errors import CheckpointError, ConfigError
from util.features import POOLINGS, extract_features
from util.packed import describe_folder_dataset, open_packed_dataset, prepared_layout
from util.features import pool_tokens as pool_encoder_tokens
from util.synthetic import SyntheticCells
from util.transforms import DEFAULT_VAL_CROP, build_finetune_transform


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DAMA feature extraction", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="pretraining, exported or fine-tuned checkpoint")
    parser.add_argument("--out", default="features.npz", help=".npz file to write")
    parser.add_argument("--student", type=int, choices=(1, 2), default=1,
                        help="which student of a pretraining checkpoint (ignored for other checkpoints)")
    parser.add_argument("--pool", default="cls", choices=POOLINGS, help="image embedding: cls token or "
                                                                        "mean of the patch tokens")
    parser.add_argument("--dataset", default=None, choices=("folder", "synthetic"),
                        help="default: folder when --data_path is given, else synthetic")
    parser.add_argument("--data_path", default=None,
                        help="folder of images: class sub-folders (<class>/**/<image>) and/or images directly in it")
    parser.add_argument("--img_size", default=None, type=int,
                        help="encoder input size (default: the checkpoint's; another size resamples pos_embed)")
    parser.add_argument("--val_crop", default=DEFAULT_VAL_CROP, type=int,
                        help="centre crop in pixels before the resize (synthetic: at most the image size)")
    parser.add_argument("--synthetic_size", default=None, type=int, help="number of synthetic images (1000)")
    parser.add_argument("--split", default="val", help="synthetic split name (a different image stream per name)")
    parser.add_argument("--seed", default=0, type=int, help="synthetic seed")
    parser.add_argument("--batch_size", default=64, type=int)
    parser.add_argument("--num_workers", default=4, type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--print_freq", default=20, type=int, help="progress line every N batches")
    add_channel_name_args(parser)
    return parser


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------
def load_encoder(path: str, student: int = 1, img_size: int = None):
    """(timm VisionTransformer without classifier, geometry dict) for any checkpoint kind, in eval mode.

    geometry: util.convert.encoder_metadata (arch, img_size, patch_size, in_chans, embed_dim, depth, ...), with
    img_size replaced when given. A fine-tuned global-pool model keeps its fc_norm (and has no final norm); the
    others keep the final norm.
    """
    encoder, checkpoint, from_students = read_encoder(path, student)
    if student == 2 and not from_students:
        print(f"note: {path} is not a pretraining checkpoint; --student 2 has no effect")
    geometry = encoder_metadata(encoder, checkpoint, student, path)
    arch = geometry["arch"]
    if not arch:
        raise CheckpointError(f"checkpoint {path}: width {geometry['embed_dim']} and depth {geometry['depth']} "
                              f"match none of {sorted(models_dama.ARCH_CONFIGS)}")
    geometry["img_size"] = img_size or geometry["img_size"]
    model = models_vit.build_vit(arch, img_size=geometry["img_size"], patch_size=geometry["patch_size"],
                                 in_chans=geometry["in_chans"], num_classes=0, drop_path_rate=0.0,
                                 global_pool="fc_norm.weight" in encoder)
    check_shapes(encoder, model, path, arch)
    fit_pos_embed(encoder, model)
    missing, unexpected = model.load_state_dict(encoder, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit a {arch} encoder: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    return model.eval(), geometry


def pool_tokens(model, tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """Encoder output tokens [N, 1+L, D] (cls first, after the final norm) -> image features [N, D].

    mean goes through fc_norm, which is the Identity unless the model was fine-tuned with global pooling.
    """
    return pool_encoder_tokens(tokens, pool, model.num_prefix_tokens, model.fc_norm)


def vit_encoder(model, pool: str):
    """imgs [N, C, H, W] -> [N, D]: util.features' encoder function for the timm model of `load_encoder`."""
    return lambda imgs: pool_tokens(model, model.forward_features(imgs), pool)  # tokens [N, 1+L, D]


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def folder_samples(root: Path):
    """(samples [(path, label)], classes): images in class sub-folders, plus images directly in `root` (label -1)."""
    classes = class_folders(root)
    samples = image_folder_samples(root, classes) + [(path, -1) for path in list_images(root, recursive=False)]
    if not samples:
        raise no_images_error(root)
    return samples, classes


def feature_dataset(args, geometry: dict):
    """(dataset yielding (image [C, S, S], label), paths [N], classes) with the deterministic validation view."""
    img_size, in_chans = geometry["img_size"], geometry["in_chans"]
    if dataset_kind(args) == "synthetic":
        crop = min(args.val_crop, img_size)  # synthetic images are only img_size wide
        transform = build_finetune_transform(False, img_size, crop)
        dataset = SyntheticCells(synthetic_size(args), img_size, in_chans, seed=args.seed, split=args.split,
                                 transform=transform)
        return dataset, [f"synthetic:{i}" for i in range(len(dataset))], dataset.classes
    root = data_root(args)
    transform = build_finetune_transform(False, img_size, args.val_crop)
    args.normalization, args.in_chans = geometry.get("normalization"), in_chans  # the checkpoint's recipe
    if prepared_layout(root) == "packed":  # every cell, both splits; paths are '<slide>:<cell_id>'
        dataset = open_packed_dataset(root, args, transform, split=None)
        paths = [f"{slide}:{cell}" for slide, cell in zip(dataset.table["slide"].tolist(),
                                                            dataset.table["cell_id"].tolist())]
        return dataset, paths, dataset.classes
    samples, classes = folder_samples(root)
    dataset = describe_folder_dataset(ImageFileDataset(samples, classes, in_chans, transform), root, args,
                                      estimate=False)
    return checked(dataset), [str(path) for path, _ in samples], classes


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------
def main(args) -> Path:
    if args.batch_size < 1 or args.print_freq < 1:
        raise ConfigError(f"--batch_size and --print_freq must be at least 1, got {args.batch_size}, {args.print_freq}")
    device = torch.device(args.device)
    model, geometry = load_encoder(args.checkpoint, args.student, args.img_size)
    model.to(device)
    dataset, paths, classes = feature_dataset(args, geometry)
    check_data_channels(geometry.get("channel_names"), dataset, args, f"checkpoint {args.checkpoint}")
    print(f"Embedding {len(dataset)} images with the {geometry['arch']} encoder of {args.checkpoint} "
          f"(student {args.student}, {args.pool} pooling, {geometry['img_size']} px) on {device}")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda")
    features, labels = extract_features(vit_encoder(model, args.pool), loader, device, print_freq=args.print_freq)
    features, labels = features.cpu().numpy(), labels.cpu().numpy()
    out = Path(args.out)
    out = out if out.suffix == ".npz" else out.with_name(out.name + ".npz")  # what np.savez writes anyway
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, features=features, labels=labels, paths=np.array(paths, dtype=str),
             classes=np.array(classes, dtype=str), pool=args.pool, student=args.student,
             checkpoint=str(args.checkpoint))
    print(f"Wrote {out}: features {features.shape}, {len(classes)} classes")
    return out


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
