"""Classify and embed every cell of a prepared slide: a fine-tuned classifier (or, with --embed_only, a pretraining
checkpoint or an exported encoder) and a cell dataset in; per-cell tables, AnnData and maps out.

    python predict_cells.py --checkpoint ft/checkpoint-best.pth --data_path cells/brain1 --output_dir pred/brain1
    python predict_cells.py --checkpoint pre/checkpoint.pth --embed_only --data_path cells/brain1 --output_dir emb
    torchrun --nproc_per_node 4 predict_cells.py ...      # each process takes every 4th cell; rank 0 writes

--data_path: a packed dataset or a TIFF folder written by prepare_cells.py (every cell with its slide, id, position,
area and label), or any folder of images (class sub-folders and/or images directly in it; no positions). Each crop
is shown to the model as fine-tuning's validation showed it: centre crop --val_crop (default: the fine-tuning
run's), resized to the model's input size, with the checkpoint's normalisation recipe for raw folder data and its
mean/std when it has them. Crops smaller than that centre crop are refused unless --resize (each crop is then
first resized to the input size). The data's channel names must match the checkpoint's (as in fine-tuning).

Outputs in --output_dir (written into a temporary folder and renamed at the end; a folder holding the results of
another checkpoint, other data or other options is refused without --overwrite):
  predictions.csv  one row per cell: the dataset's cell table (index, slide, cell_id, x, y, crop_x, crop_y, area,
                   label, split; file for TIFF folders), then predicted (class name), probability (of that class)
                   and prob_<class> for every class (without --embed_only)
  cells.h5ad       AnnData: obs = that table (obs_names = index), obsm["X_dama"] = the embeddings [N, D] (the mean of
                   the patch tokens, as fine-tuning pools them, or the checkpoint's own pooling), obsm["spatial"] =
                   x, y (when positions are known); uns: checkpoint, arch, class_names, channel_names, normalization,
                   pool, img_size, patch_size, epoch, ...
  map_<slide>.png  per slide (with positions and predictions): each cell a dot coloured by its predicted class, a
                   legend, and with true labels the confusion matrix and the accuracy beside it
  predict.json     what was run (checkpoint, data, options), counts and accuracies per slide, speed
"""
import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import util.misc as misc
from util.cellmap import accuracy_of, cell_map_figure, comparable
from util.channels import add_channel_name_args, check_data_channels
from util.cli import CommandLineParser, DescribedHelpFormatter, run_tool
from util.datasets import data_root
from util.errors import CheckpointError, ConfigError, DataError
from util.features import gather_to_main, run_batches
from util.inference import (add_model_flags, build_model, build_view, describe_checkpoint, describe_in_words,
                            embed_and_classify, open_image_folder, parse_class_names, resolve_class_names,
                            resolve_model_flags, view_crop)
from util.output import prepare_output_dir
from util.packed import TABLE_COLUMNS, StagedOutput, open_packed_dataset, prepared_layout, safe_name

RESULT_FILE, PREDICTIONS_CSV, H5AD_FILE = "predict.json", "predictions.csv", "cells.h5ad"
SPLITS = ("all", "train", "val")
GATHER_CHUNK_ROWS = 8192  # rows per collective when rank 0 collects the results (bounded communication buffers)


def get_args_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(Path(__file__).name, description=__doc__, formatter_class=DescribedHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="fine-tuned classifier (main_finetune.py / main_linprobe.py), or with --embed_only a "
                             "pretraining checkpoint or an encoder exported by convert_checkpoint.py")
    parser.add_argument("--data_path", required=True,
                        help="prepared cells (prepare_cells.py: packed or --format tiff) or a folder of images")
    parser.add_argument("--output_dir", required=True, help="folder for predictions.csv, cells.h5ad, map_*.png")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace earlier results of another checkpoint, data or options in --output_dir "
                             "(default: refuse)")
    parser.add_argument("--embed_only", action="store_true",
                        help="embeddings only (no class probabilities or maps): for a checkpoint without a "
                             "classifier head")
    parser.add_argument("--student", type=int, choices=(1, 2), default=1,
                        help="which student of a pretraining checkpoint (default: %(default)s)")
    add_model_flags(parser)
    parser.add_argument("--class_names", default=None, type=parse_class_names,
                        help="names of the classifier's classes in output order, for a checkpoint that stores none "
                             "(default: the checkpoint's, else class_0, class_1, ...)")
    parser.add_argument("--split", default="all", choices=SPLITS,
                        help="cells of a prepared dataset to predict (default: %(default)s)")
    parser.add_argument("--val_crop", default=None, type=int,
                        help="centre crop (pixels) resized to the model's input (default: the fine-tuning run's "
                             "--val_crop, else 48; at most the model's input size)")
    parser.add_argument("--resize", action="store_true",
                        help="resize each crop to the model's input size first, for crops prepared at another size "
                             "(default: such data is refused)")
    parser.add_argument("--batch_size", default=256, type=int,
                        help="cells per batch and process (default: %(default)s)")
    parser.add_argument("--num_workers", default=misc.default_num_workers(), type=int,
                        help="DataLoader workers per process (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: %(default)s)")
    parser.add_argument("--amp_dtype", default=None, choices=("bf16", "fp16", "none"),
                        help="autocast dtype (default: bf16 on cuda, none on cpu)")
    parser.add_argument("--print_freq", default=20, type=int,
                        help="a progress line (cells/s) every N batches (default: %(default)s)")
    add_channel_name_args(parser)
    misc.add_distributed_args(parser)
    return parser


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
def load_predictor(args):
    """(model in eval mode, description, class names): the checkpoint's model with its head unless --embed_only."""
    description, weights = describe_checkpoint(args.checkpoint, args.student)
    resolve_model_flags(args, description)
    if description["kind"] != "classifier" and not args.embed_only:
        what = "a pretraining checkpoint" if description["from_students"] else "an encoder without a classifier"
        raise CheckpointError(f"checkpoint {args.checkpoint} has no classifier head ({what}); pass --embed_only to "
                              f"write its embeddings only, or give a fine-tuned checkpoint (main_finetune.py)")
    class_names = [] if args.embed_only else resolve_class_names(args, description)
    model = build_model(description, weights, pool=args.pool, with_head=not args.embed_only)
    return model, description, class_names


# --------------------------------------------------------------------------------------------------
# The cells
# --------------------------------------------------------------------------------------------------
def split_of(args):
    return None if args.split == "all" else args.split


def open_packed(root, args, description, view):
    """(PackedCells, its cell table, slide extents {name: (height, width)})."""
    data_args = argparse.Namespace(in_chans=description["in_chans"], channel_names=args.channel_names)
    dataset = open_packed_dataset(root, data_args, view, split=split_of(args), require_split=args.split != "all")
    extents = {slide["name"]: (slide["height"], slide["width"]) for slide in dataset.info.get("slides", [])
               if "height" in slide and "width" in slide}
    return dataset, dict(dataset.table), extents


def predict_crop(args, description: dict) -> int:
    """view_crop, at most the model's input size: the crops are that size (or resized to it with --resize)."""
    crop = view_crop(args, description)
    if crop > description["img_size"] and not args.val_crop:
        print(f"note: the centre crop of {crop} px is larger than the model's {description['img_size']} px input; "
              f"showing the whole crop (--val_crop sets it)")
        crop = description["img_size"]
    return crop


def open_cells(args, description, crop: int):
    """(dataset of (view(cell), label), table {column: array, in dataset order}, slide extents), checked against the
    model: channel names, crop size, channel count. The view: centre crop `crop`, resized to the model's input.
    Crops smaller than the view needs (view.min_side) are refused by the dataset openers, naming the file or size."""
    root = data_root(args)
    view = build_view(description["img_size"], crop, description["mean"], description["std"], resize=args.resize)
    if prepared_layout(root) == "packed":
        dataset, table, extents = open_packed(root, args, description, view)
    else:
        dataset, table = open_image_folder(root, description["in_chans"], view, description["normalization"],
                                           args.channel_names, split_of(args), args.split != "all")
        extents = {}
    check_data_channels(description["channel_names"], dataset, args, f"checkpoint {args.checkpoint}")
    if len(dataset) < misc.get_world_size():
        raise DataError(f"--data_path {root}: {len(dataset)} cells are fewer than the {misc.get_world_size()} "
                        f"processes")
    return dataset, table, extents


# --------------------------------------------------------------------------------------------------
# The output folder
# --------------------------------------------------------------------------------------------------
def run_identity(args, description, crop: int) -> dict:
    """What the results in --output_dir depend on: the checkpoint file (path, size, modification time), the data
    and the options that change the numbers."""
    checkpoint = Path(args.checkpoint).expanduser().resolve()
    stat = checkpoint.stat()
    return dict(checkpoint=str(checkpoint), checkpoint_bytes=stat.st_size, checkpoint_mtime_ns=stat.st_mtime_ns,
                data_path=str(Path(args.data_path).expanduser().resolve()), split=args.split,
                embed_only=args.embed_only, student=args.student if description["from_students"] else None,
                pool=args.pool, val_crop=crop, resize=args.resize,
                class_names=args.class_names)


def check_output_dir(output_dir: Path, identity: dict, overwrite: bool) -> None:
    """--output_dir must be new, empty, or hold the results of this very run (which are then replaced); the results
    of another checkpoint, data or options need --overwrite; a folder with anything else is refused."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise ConfigError(f"--output_dir {output_dir} exists and is not a folder")
    if not any(output_dir.iterdir()):
        return
    marker = output_dir / RESULT_FILE
    if not marker.is_file():
        raise ConfigError(f"--output_dir {output_dir} is not empty and holds no predict_cells.py results "
                          f"({RESULT_FILE}); choose a new or empty folder")
    try:
        earlier = json.loads(marker.read_text()).get("run", {})
    except (OSError, ValueError):
        earlier = {}
    if earlier == identity or overwrite:
        return
    if earlier.get("checkpoint") != identity["checkpoint"]:
        reason = f"holds the results of checkpoint {earlier.get('checkpoint')}, not of {identity['checkpoint']}"
    elif (earlier.get("checkpoint_bytes"), earlier.get("checkpoint_mtime_ns")) != \
            (identity["checkpoint_bytes"], identity["checkpoint_mtime_ns"]):
        reason = f"holds the results of an earlier state of checkpoint {identity['checkpoint']} (rewritten since)"
    else:
        changed = [f"{key} {earlier.get(key)!r} (now {value!r})" for key, value in identity.items()
                   if earlier.get(key) != value]
        reason = f"holds results of the same checkpoint with other settings: {'; '.join(changed)}"
    raise ConfigError(f"--output_dir {output_dir} {reason}; pass --overwrite to replace them, or choose another "
                      f"--output_dir")


# --------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------
def predict(model, dataset, args) -> dict:
    """This process's share of the cells (every world_size-th, from its rank: each cell exactly once), batched, under
    autocast; gathered on the main process in dataset order: {'embeddings' [N, D], 'probabilities' [N, K] or None,
    'seconds'} there, None on the other ranks."""
    rank, world_size = misc.get_rank(), misc.get_world_size()
    device = torch.device(args.device)
    positions = torch.arange(rank, len(dataset), world_size)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, positions.tolist()),
                                         batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                                         pin_memory=device.type == "cuda")

    def classify(images):
        embeddings, logits = embed_and_classify(model, images)
        return embeddings, None if logits is None else logits.float().softmax(dim=1)

    start = time.time()
    embeddings, probabilities, _ = run_batches(classify, loader, device, args.amp_dtype, args.print_freq, "cells")
    gathered = [gather_to_main(t.cpu(), GATHER_CHUNK_ROWS) if t is not None else None
                for t in (positions, embeddings, probabilities)]
    if not misc.is_main_process():
        return None
    order = torch.argsort(gathered[0])
    if not torch.equal(gathered[0][order], torch.arange(len(dataset))):
        raise RuntimeError("the processes' shares of the cells do not cover each cell exactly once")
    return dict(embeddings=gathered[1][order].numpy(),
                probabilities=None if gathered[2] is None else gathered[2][order].numpy(),
                seconds=time.time() - start)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def prediction_columns(table: dict, probabilities, class_names) -> dict:
    """The table plus predicted, probability and prob_<class> (none of them without probabilities)."""
    columns = {key: table[key] for key in (*TABLE_COLUMNS, "file") if key in table}
    if probabilities is not None:
        best = probabilities.argmax(axis=1)
        columns["predicted"] = np.array(class_names, dtype=str)[best]
        columns["probability"] = probabilities[np.arange(len(best)), best]
        for j, name in enumerate(class_names):
            columns[f"prob_{name}"] = probabilities[:, j]
    return columns


def csv_value(column: str, value):
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return ""
        return f"{value:.6g}" if column.startswith("prob") else round(float(value), 3)
    if column in ("crop_x", "crop_y", "area") and value < 0:
        return ""
    return value


def write_csv(path: Path, columns: dict) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(columns))
        for row in zip(*(values.tolist() for values in columns.values())):
            writer.writerow([csv_value(column, value) for column, value in zip(columns, row)])


def h5ad_safe(value):
    """uns values h5py can store: None dropped (recursively), tuples as lists."""
    if isinstance(value, dict):
        return {str(k): h5ad_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [h5ad_safe(v) for v in value]
    return value


def write_h5ad(path: Path, columns: dict, embeddings, uns: dict, class_names) -> None:
    """obs = the table (obs_names = index), obsm X_dama and spatial, uns."""
    import anndata  # only this writer needs it
    import pandas as pd

    obs = {}
    for key, values in columns.items():
        if key == "index":
            continue
        if key in ("crop_x", "crop_y", "area"):
            obs[key] = pd.array(np.where(values < 0, None, values).tolist(), dtype="Int64")
        elif key == "predicted":
            obs[key] = pd.Categorical(values.tolist(), categories=class_names)
        elif values.dtype.kind in "US":
            obs[key] = pd.Categorical(values.tolist()) if key in ("slide", "label", "split") else values.tolist()
        else:
            obs[key] = values
    frame = pd.DataFrame(obs, index=pd.Index([str(i) for i in columns["index"].tolist()]))
    obsm = {"X_dama": np.ascontiguousarray(embeddings, dtype=np.float32)}
    positions = np.stack([columns["x"], columns["y"]], axis=1).astype(np.float64)
    if not np.isnan(positions).all():
        obsm["spatial"] = positions
    adata = anndata.AnnData(obs=frame, obsm=obsm, uns=h5ad_safe(uns))
    adata.write_h5ad(path)


def slide_extent(slide: str, x, y, extents: dict) -> tuple:
    if slide in extents:
        return extents[slide]
    return float(np.nanmax(y)) + 16, float(np.nanmax(x)) + 16


def write_maps(folder: Path, columns: dict, class_names, extents: dict, title: str) -> list:
    """map_<slide>.png for every slide with positions; returns the file names."""
    if "predicted" not in columns or np.isnan(columns["x"]).all():
        return []
    names, labels = [], columns["label"]
    has_labels = bool((labels != "").any())
    for slide in dict.fromkeys(columns["slide"].tolist()):
        rows = np.flatnonzero(columns["slide"] == slide)
        x, y = columns["x"][rows], columns["y"][rows]
        name = f"map_{safe_name(slide or 'cells')}.png"
        name = name if name not in names else f"map_{safe_name(slide)}_{len(names)}.png"
        splits = {value: columns["split"][rows] == value for value in dict.fromkeys(columns["split"][rows].tolist())
                  if value}
        figure = cell_map_figure(x, y, columns["predicted"][rows].tolist(), class_names,
                                 slide_extent(slide, x, y, extents), f"{slide or 'cells'}: {len(rows)} cells; {title}",
                                 true_labels=labels[rows].tolist() if has_labels else None, subsets=splits)
        figure.save(folder / name)
        names.append(name)
    return names


def accuracy_counts(columns: dict, rows) -> dict:
    correct, labelled = accuracy_of(columns["label"][rows].tolist(), columns["predicted"][rows].tolist())
    return dict(cells=len(rows), labelled=labelled, correct=correct,
                accuracy=100.0 * correct / labelled if labelled else None)


def accuracies(columns: dict, class_names) -> dict:
    """{'all': counts, 'splits': {split: counts}, 'slides': {slide: counts}}, counts = cells, labelled, correct,
    accuracy (%): when there are predictions and the true labels are (some of) the model's class names."""
    if "predicted" not in columns or not comparable(columns["label"].tolist(), class_names):
        return {}
    groups = {key: {value: np.flatnonzero(columns[key] == value) for value in dict.fromkeys(columns[key].tolist())
                    if value} for key in ("split", "slide")}
    return {"all": accuracy_counts(columns, np.arange(len(columns["index"]))),
            "splits": {name: accuracy_counts(columns, rows) for name, rows in groups["split"].items()},
            "slides": {name: accuracy_counts(columns, rows) for name, rows in groups["slide"].items()}}


def write_results(args, results: dict, table: dict, extents: dict, description: dict, class_names, identity) -> dict:
    """Everything into a temporary folder beside --output_dir, renamed over it at the end; returns the summary."""
    columns = prediction_columns(table, results["probabilities"], class_names)
    title = f"{Path(args.checkpoint).name} ({description['arch']}, epoch {description['epoch']})"
    uns = dict(checkpoint=identity["checkpoint"], arch=description["arch"], kind=description["kind"],
               class_names=class_names or None, channel_names=description["channel_names"],
               normalization=description["normalization"], pool=args.pool, img_size=description["img_size"],
               patch_size=description["patch_size"], in_chans=description["in_chans"], epoch=description["epoch"],
               mean=description["mean"], std=description["std"], val_crop=identity["val_crop"], resize=args.resize,
               data_path=identity["data_path"])
    cells = len(table["index"])
    summary = dict(run=identity, cells=cells, model=describe_in_words(description, args.pool),
                   seconds=round(results["seconds"], 3),
                   cells_per_second=round(cells / max(results["seconds"], 1e-9), 1),
                   processes=misc.get_world_size(), device=str(args.device), accuracy=accuracies(columns, class_names),
                   command=sys.argv)
    with StagedOutput(args.output_dir, overwrite=True) as folder:  # check_output_dir has decided already
        write_csv(folder / PREDICTIONS_CSV, columns)
        write_h5ad(folder / H5AD_FILE, columns, results["embeddings"], uns, class_names)
        summary["files"] = [PREDICTIONS_CSV, H5AD_FILE] + write_maps(folder, columns, class_names, extents, title)
        (folder / RESULT_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def check_args(args) -> None:
    for flag in ("batch_size", "print_freq"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.num_workers < 0:
        raise ConfigError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if args.amp_dtype is None:
        args.amp_dtype = "bf16" if str(args.device).startswith("cuda") else "none"


def main(args) -> Path:
    check_args(args)
    misc.init_distributed_mode(args)
    model, description, class_names = load_predictor(args)
    output_dir = Path(args.output_dir).expanduser()
    crop = predict_crop(args, description)
    identity = run_identity(args, description, crop)
    check_output_dir(output_dir, identity, args.overwrite)
    dataset, table, extents = open_cells(args, description, crop)
    if misc.is_main_process():  # the results are renamed into place beside it
        prepare_output_dir(output_dir.parent if output_dir.parent != Path("") else Path("."), "--output_dir's folder")
    model.to(args.device)
    what = "Embedding" if args.embed_only else "Classifying"
    print(f"{what} {len(dataset)} cells of {args.data_path} with the {describe_in_words(description, args.pool)} of "
          f"{args.checkpoint} on {misc.get_world_size()} process(es) ({args.device}, batch {args.batch_size}, "
          f"autocast {args.amp_dtype})")
    results = predict(model, dataset, args)
    if results is None:
        return output_dir
    summary = write_results(args, results, table, extents, description, class_names, identity)
    overall = summary["accuracy"].get("all") or {}
    accuracy = f", accuracy {overall['accuracy']:.2f}% on {overall['labelled']} labelled cells" \
        if overall.get("labelled") else ""
    print(f"Wrote {output_dir}: {', '.join(summary['files'])} ({summary['cells']} cells, "
          f"{summary['cells_per_second']:.0f} cells/s{accuracy})")
    return output_dir


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
