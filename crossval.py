"""k-fold cross-validation of pretrained checkpoints: the paper's classification table, without selection on the test data.

    python crossval.py --data_path DATA --folds 10 --output_dir cv --mode finetune --group_by parent \
        --checkpoints random DAMA=pre/dama/checkpoint-499.pth MAE=pre/mae/checkpoint-499.pth \
        -- --arch main_vit_base --img_size 128 --epochs 150 --blr 5e-4 ...

The labelled images (ImageFolder: all of <data_path>/train and, when present, <data_path>/val, pooled; or
<data_path>/<class>/ directly), or the labelled cells of a packed cell dataset (prepare_cells.py: dataset.json,
cells.npy, cells.csv; all its splits pooled), are split into --folds folds, stratified by class, seeded by --seed
and, with --group_by, grouped (no group, e.g. one animal's, one section's or one slide's crops, lands on both sides
of a split): 'parent' (folders) or a column of a prepared dataset's cells.csv (e.g. slide; prepare_cells.py
--format tiff folders find each image's row by the table's file column). Each fold's training part is split again
the same way into train and an inner validation set (--val_fraction). The split is saved in
<output_dir>/folds.json, every sample (an image's path or a packed cell's index) with its label and group (reused
by later calls, so every row sees the same folds).

For each checkpoint and fold i, main_finetune.py (or main_linprobe.py) runs on <output_dir>/fold_data/fold_<i>/: a
tree of symlinks {train,val,test}/<class>/ for images, or for a packed dataset a packed dataset of its own (cells.npy
linked to the source's, dataset.json copied, cells.csv with the split column set to train / val / test). It chooses
the epoch (checkpoint-best) on val, the inner validation set, and scores test, fold i, once at that choice (--metric
val, the default). --metric last takes the last epoch's accuracy on fold i (no selection); --metric max_test the
best epoch's accuracy on fold i, the reference's number, which selects on the test data (the table says so). Both
train on the whole training part (fold_data_no_inner_val/, runs_no_inner_val/). Everything after `--` goes to the
training script unchanged.

The "Random init." row (`random`) fine-tunes from the pretraining model before training: --random_init (a
pretraining run's checkpoint-init.pth, main_pretrain.py --save_init) or, by default, what main_pretrain.py
--epochs 0 writes to <output_dir>/random_init/ with the run's --arch, --img_size, --patch_size, --in_chans,
--seed and the default decoder: the initial state of a pretraining run with those settings (the encoder's init
depends on the decoder size too, through the order of the random draws), fixed sin-cos position embeddings
included.

The table: one row per checkpoint, one column per fold, the mean ± sample standard deviation over folds with the
difference to the random-init row, and Err = 100 - mean; the selection rule heads the first column. Written as
<output_dir>/table.md and table.json. Runs that already finished with the same arguments are reused, interrupted
ones resume from their checkpoint.pth. Runs go one after another as subprocesses, or as submitit jobs (--submitit,
util/launch.py: SLURM or local, launcher flags after `--`).
--dataset synthetic first writes --synthetic_size synthetic cells as float32 TIFFs to <output_dir>/synthetic/.
"""
import csv
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from util.cli import CommandLineParser, run_tool
from util.output import prepare_output_dir
from util.errors import UserError

REPO = Path(__file__).resolve().parent
FOLDS_FILE = "folds.json"
# 3: per fold its test, train and inner validation lists (every sample with its label and group), and the data
# layout: FOLDER and TIFF samples are image paths, PACKED ones cell indices; 2 is 3 without layout (a folder)
FOLDS_FORMAT = 3
READABLE_FOLDS_FORMATS = (2, 3)
FOLDER, TIFF, PACKED = "folder", "tiff", "packed"
MODES = {"finetune": "main_finetune", "linprobe": "main_linprobe"}
RANDOM = "random"
RANDOM_ROW_NAME = "Random init."
METRICS = ("val", "last", "max_test")
# Each metric's runs: the default selects on an inner validation split and scores the test fold once; the other
# two evaluate the test fold after every epoch (the reference's setup) and train on the whole training part.
INNER_VAL, NO_INNER_VAL = "inner_val", "no_inner_val"
LAYOUT = {"val": INNER_VAL, "last": NO_INNER_VAL, "max_test": NO_INNER_VAL}
RUNS_DIR = {INNER_VAL: "runs", NO_INNER_VAL: "runs_no_inner_val"}
FOLD_DATA_DIR = {INNER_VAL: "fold_data", NO_INNER_VAL: "fold_data_no_inner_val"}
# flags that crossval sets for every run; the same flags after `--` would silently change the experiment
OWN_FLAGS = ("--data_path", "--dataset", "--output_dir", "--log_dir", "--finetune", "--job_dir", "--resume")
# settings that do not change a run's result: a finished run is reused whatever they were
RUNTIME_ONLY = ("num_workers", "pin_mem", "device", "world_size", "local_rank", "dist_on_itp", "dist_url",
                "dist_eval")
# the pretraining settings the random-init checkpoint takes from the training flags
INIT_SETTINGS = ("arch", "img_size", "patch_size", "in_chans", "seed")


class CrossvalError(UserError, ValueError):
    """A bad flag, file or run; the message names it."""


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------
def get_args_parser():
    parser = CommandLineParser(
        "crossval.py", usage="crossval.py [options] -- [flags of main_finetune.py / main_linprobe.py]",
        description="DAMA cross-validation")
    parser.add_argument("--data_path", default=None,
                        help="labelled ImageFolder: <data_path>/{train,val}/<class>/ or <data_path>/<class>/, or a "
                             "packed cell dataset (prepare_cells.py; its labelled cells, all splits pooled)")
    parser.add_argument("--dataset", default="folder", choices=("folder", "synthetic"))
    parser.add_argument("--synthetic_size", default=500, type=int, help="images of --dataset synthetic")
    parser.add_argument("--synthetic_img_size", default=64, type=int, help="side of the synthetic images")
    parser.add_argument("--in_chans", default=7, type=int, help="channels of the synthetic images")
    parser.add_argument("--folds", default=10, type=int, help="number of folds k")
    parser.add_argument("--seed", default=0, type=int, help="seed of the fold split (and the synthetic set)")
    parser.add_argument("--group_by", default=None,
                        help="keep groups together: 'parent' (the image's folder below its class folder, for "
                             "<class>/<group>/<image> layouts, e.g. one folder per animal or section), or a column "
                             "of a prepared cell dataset's cells.csv (e.g. slide; packed, or prepare_cells.py --format "
                             "tiff); no group is on both sides of a fold or of the inner validation split (default: "
                             "every image on its own)")
    parser.add_argument("--val_fraction", default=0.1, type=float,
                        help="share of each fold's training part held out as the inner validation set that "
                             "chooses the epoch (--metric val)")
    parser.add_argument("--checkpoints", nargs="+", required=True,
                        help="table rows: NAME=PATH (pretraining or encoder-only checkpoint), NAME=random or "
                             "just 'random' for the random-init row the other rows are compared with")
    parser.add_argument("--random_init", default=None,
                        help="checkpoint the random-init row fine-tunes from: a pretraining run's checkpoint-init.pth "
                             "(main_pretrain.py --save_init), so that the row is exactly that run's starting point "
                             "(default: written by main_pretrain.py --epochs 0 with the training flags' --arch, "
                             "--img_size, --patch_size, --in_chans, --seed and the default, the paper's, decoder)")
    parser.add_argument("--mode", default="finetune", choices=sorted(MODES), help="fine-tune or linear-probe")
    parser.add_argument("--metric", default="val", choices=METRICS,
                        help="val: epoch chosen on the inner validation split, test fold scored once there; "
                             "last: the last epoch's test accuracy (no selection); max_test: the best epoch's test "
                             "accuracy (the reference's number: selects on the test fold, biased upward)")
    parser.add_argument("--output_dir", required=True, help="folds.json, fold data, runs/, table.md, table.json")
    parser.add_argument("--submitit", action="store_true",
                        help="submit every run as a submitit job (util/launch.py; pass --ngpus, --partition, "
                             "--cluster ... after --) and wait for all of them")
    parser.add_argument("--launcher", default="",
                        help="command that starts each run instead of this Python, e.g. "
                             "'torchrun --nproc_per_node 4' (sequential mode)")
    parser.add_argument("--rerun", action="store_true", help="delete earlier runs' folders and run again")
    return parser


def split_argv(argv):
    """(crossval's own args, the training script's args after the first `--`)."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def check_passthrough(train_args):
    for arg in train_args:
        flag = arg.split("=", 1)[0]
        if flag in OWN_FLAGS:
            raise CrossvalError(f"{flag} after `--`: crossval.py sets {flag} for every run itself; remove it")


def parse_checkpoints(items):
    """[(row name, checkpoint path or None for random init)] in the given order."""
    rows = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            if item != RANDOM:
                raise CrossvalError(f"--checkpoints {item!r}: expected NAME=PATH, NAME=random or random")
            name, path = RANDOM_ROW_NAME, RANDOM
        if not name or not path:
            raise CrossvalError(f"--checkpoints {item!r}: empty name or path")
        if path != RANDOM and not Path(path).is_file():
            raise CrossvalError(f"--checkpoints {item!r}: checkpoint file {path} does not exist")
        rows.append((name, None if path == RANDOM else str(Path(path).resolve())))
    names = [name for name, _ in rows]
    if len({slug(name) for name in names}) != len(names):  # each row needs its own runs/<slug>/ folder
        raise CrossvalError(f"--checkpoints: row names must differ in their letters, digits, '.', '-' or '_', "
                            f"got {names}")
    return rows


# --------------------------------------------------------------------------------------------------
# Labelled samples
# --------------------------------------------------------------------------------------------------
def data_layout(args) -> str:
    """FOLDER (images in class folders, or the synthetic set), TIFF (the same written by prepare_cells.py --format
    tiff, with its cells.csv) or PACKED (prepare_cells.py's cells.npy): read from <data_path>/dataset.json."""
    from util.packed import prepared_layout

    if args.dataset == "synthetic" or not args.data_path:
        return FOLDER
    return prepared_layout(Path(args.data_path).expanduser()) or FOLDER


def data_source(args) -> str:
    """What the split is of, as folds.json records it: the resolved --data_path, or the synthetic set's settings."""
    if args.dataset == "synthetic":
        return (f"synthetic(size={args.synthetic_size}, img_size={args.synthetic_img_size}, "
                f"in_chans={args.in_chans}, seed={args.seed})")
    if not args.data_path:
        raise CrossvalError("--data_path is not set; expected a labelled folder or a packed cell dataset (or use "
                            "--dataset synthetic)")
    return str(Path(args.data_path).expanduser().resolve())


def labelled_samples(args, layout: str):
    """(samples, classes, rows): samples [(key, label)], the key an image's absolute path or, for a packed dataset,
    a cell's index in cells.npy; rows: each sample's cells.csv row (dict) for a prepared dataset, else None."""
    if args.dataset == "synthetic":
        return (*synthetic_samples(args), None)
    if layout == PACKED:
        return packed_samples(args.data_path)
    samples, classes = folder_samples(args.data_path)
    if layout == TIFF:
        return tiff_samples(args.data_path, samples, classes)
    return samples, classes, None


def folder_samples(data_path):
    """(samples [(absolute path, label)], classes) of a labelled folder, train/ and val/ pooled."""
    from util.datasets import class_folders, image_folder_samples  # torch-heavy: imported when needed

    root = Path(data_path).expanduser().resolve()
    if not root.is_dir():
        raise CrossvalError(f"--data_path {data_path} does not exist or is not a folder")
    splits = [root / s for s in ("train", "val") if (root / s).is_dir()] or [root]
    classes = class_folders(splits[0])
    if not classes:
        raise CrossvalError(f"--data_path {data_path}: no class folders in {splits[0]}; expected "
                            f"<data_path>/train/<class>/<image>, <data_path>/<class>/<image> or a packed cell "
                            f"dataset (dataset.json, cells.npy, cells.csv from prepare_cells.py)")
    samples = [(str(path), label) for split in splits for path, label in image_folder_samples(split, classes)]
    return samples, classes


def synthetic_samples(args):
    """Write the synthetic set once as float32 TIFFs (channel-first pages) and return it like a folder."""
    import tifffile
    from util.synthetic import SyntheticCells

    dataset = SyntheticCells(args.synthetic_size, args.synthetic_img_size, args.in_chans, seed=args.seed)
    root = Path(args.output_dir).resolve() / "synthetic"
    samples = []
    for index in range(len(dataset)):
        label = dataset.label(index)
        path = root / dataset.classes[label] / f"{index:05d}.tif"
        if not path.is_file():  # deterministic per index: an existing file is already right
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, dataset.render(index), photometric="minisblack")
        samples.append((str(path), label))
    return samples, list(dataset.classes)


def packed_samples(data_path):
    """(samples [(cell index, label)], classes, rows) of a packed cell dataset: its labelled cells, every split
    pooled (the split prepare_cells.py wrote is not used); classes from dataset.json."""
    from util.packed import CELLS_NPY, read_dataset_info

    root = Path(data_path).expanduser().resolve()
    classes = list(read_dataset_info(root)["classes"])
    if not (root / CELLS_NPY).is_file():
        raise CrossvalError(f"--data_path {data_path}: {root / CELLS_NPY} is missing; prepare the data again")
    _, rows = read_cell_table(root, "--data_path")
    class_index = {name: i for i, name in enumerate(classes)}
    samples, labelled = [], []
    for row in rows:
        if not row.get("label"):
            continue  # an unlabelled cell has no class to predict
        if row["label"] not in class_index:
            raise CrossvalError(f"{root / 'cells.csv'}: cell {row.get('index')} has label {row['label']!r}, which is "
                                f"not one of the classes {classes} in {root / 'dataset.json'}")
        samples.append((cell_index(row, root), class_index[row["label"]]))
        labelled.append(row)
    if not samples:
        raise CrossvalError(f"--data_path {data_path}: none of the {len(rows)} cells has a label; cross-validation "
                            f"needs classes (prepare_cells.py --label_col)")
    return samples, classes, labelled


def cell_index(row: dict, root: Path) -> int:
    try:
        return int(row["index"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CrossvalError(f"{root / 'cells.csv'}: the index column holds {row.get('index')!r}, not a cell "
                            f"index") from exc


def tiff_samples(data_path, samples, classes):
    """(samples, classes, rows) of a prepared folder (prepare_cells.py --format tiff): each image's cells.csv row
    found by its `file` column (the path below data_path; the listing order is not the table's), unlabelled cells
    (its unlabelled/ folder) left out. rows is None for a cells.csv without `file`: then no column can group."""
    root = Path(data_path).expanduser().resolve()
    columns, rows = read_cell_table(root, "--data_path")
    if "file" not in columns:
        return samples, classes, None
    by_file = {Path(row["file"]).as_posix(): row for row in rows}
    files = [Path(path).relative_to(root).as_posix() for path, _ in samples]
    missing = [file for file in files if file not in by_file]
    if missing:
        raise CrossvalError(f"--data_path {data_path}: {len(missing)} image(s) have no row in {root / 'cells.csv'} "
                            f"(e.g. {missing[0]}, looked up in its file column); prepare the data again")
    sample_rows = [by_file[file] for file in files]
    keep = [i for i, row in enumerate(sample_rows) if row.get("label")]
    if len(keep) < len(samples):
        print(f"note: leaving out the {len(samples) - len(keep)} unlabelled cells of {data_path}")
    used = sorted({samples[i][1] for i in keep})  # class folders that still hold images, in their order
    relabel = {old: new for new, old in enumerate(used)}
    return ([(samples[i][0], relabel[samples[i][1]]) for i in keep], [classes[c] for c in used],
            [sample_rows[i] for i in keep])


# --------------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------------
def group_keys(args, samples, rows, layout: str) -> list:
    """One group key per sample: without --group_by the sample itself; 'parent': the folder below its class folder
    (<class>/<group>/.../<image>); another name: that column of the sample's row in a prepared dataset's cells.csv
    (rows, matched to the samples by labelled_samples)."""
    group_by = args.group_by
    if not group_by:
        return [str(key) for key, _ in samples]
    if group_by == "parent":
        if layout == PACKED:
            raise CrossvalError(f"--group_by parent: {args.data_path} is a packed cell dataset, without image folders; "
                                f"group by a column of its cells.csv instead, e.g. --group_by slide")
        return parent_groups(args.data_path, samples)
    if rows is None:  # a prepared tiff folder whose cells.csv has no file column
        raise CrossvalError(f"--group_by {group_by}: {Path(args.data_path) / 'cells.csv'} has no 'file' column to "
                            f"find each image's row; prepare the data again with prepare_cells.py --format tiff")
    return [row[group_by] for row in rows]


def parent_groups(data_path, samples) -> list:
    """The path between each image's class folder and the image ('animal1/section3'); train/ and val/ share them."""
    if not data_path:
        raise CrossvalError("--group_by parent needs a folder of images in <class>/<group>/<image> layout "
                            "(--data_path); the synthetic set has no groups")
    root = Path(data_path).expanduser().resolve()
    keys, flat = [], []
    for path, _ in samples:
        parts = Path(path).relative_to(root).parts
        parts = parts[1:] if parts[0] in ("train", "val") and (root / parts[0]).is_dir() else parts
        group = "/".join(parts[1:-1])  # parts[0] is the class folder, parts[-1] the image
        if not group:
            flat.append(path)
        keys.append(group)
    if flat:
        raise CrossvalError(f"--group_by parent: {len(flat)} image(s) lie directly in their class folder (e.g. "
                            f"{flat[0]}); expected <class>/<group>/<image>, one sub-folder per group")
    return keys


def read_cell_table(root: Path, flag: str, header_only: bool = False):
    """(columns, rows as dicts, every column kept) of <root>/cells.csv, the cell table of a prepared dataset (rows
    None with header_only); `flag` names what asked for it in the error."""
    table = Path(root) / "cells.csv"
    try:
        with open(table, newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), None if header_only else list(reader)
    except OSError as exc:
        raise CrossvalError(f"{flag}: cannot read {table} ({exc})") from exc


def check_table_column(data_path, column: str) -> None:
    """CrossvalError naming the columns of a prepared dataset's cell table when `column` is not one of them, or
    naming the choices when data_path holds no prepared dataset."""
    root = Path(data_path).expanduser() if data_path else None
    if root is None or not (root / "dataset.json").is_file():
        raise CrossvalError(f"--group_by {column}: expected 'parent' for a folder of images, or a column of cells.csv "
                            f"in a packed cell dataset (a --data_path holding dataset.json); {root} holds no "
                            "dataset.json")
    columns, _ = read_cell_table(root, f"--group_by {column}", header_only=True)
    if column not in columns:
        raise CrossvalError(f"--group_by {column}: {root / 'cells.csv'} has no column {column!r}; its "
                            f"columns are {', '.join(columns)}")


# --------------------------------------------------------------------------------------------------
# Folds
# --------------------------------------------------------------------------------------------------
def stratified_group_folds(labels, groups, num_parts: int, seed: int) -> list:
    """num_parts lists of sample indices; every group whole in one part, class proportions as even as the groups
    allow (sklearn's StratifiedGroupKFold rule), seeded.

    Groups are visited in a seeded random order, those with the most uneven class counts first; each goes to the
    part that keeps the per-class shares most even (mean over classes of the std over parts of the part's share
    of the class), ties to the smallest part, then the first. Without grouping (one sample per group) the parts
    get each class in turn, so their class counts differ by at most one.
    """
    labels = np.asarray(labels)
    group_ids, group_of = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    num_classes = int(labels.max()) + 1
    counts = np.zeros((len(group_ids), num_classes))
    np.add.at(counts, (group_of, labels), 1)
    class_totals = np.maximum(counts.sum(axis=0), 1)
    order = np.random.default_rng(seed).permutation(len(group_ids))
    order = sorted(order, key=lambda g: -counts[g].std())  # stable: the seeded order breaks ties
    part_counts = np.zeros((num_parts, num_classes))
    assignment = np.empty(len(group_ids), dtype=int)
    candidates = np.arange(num_parts)
    for g in order:
        trial = part_counts[None] + np.eye(num_parts)[:, :, None] * counts[g]  # [part tried, part, class]
        spread = (trial / class_totals).std(axis=1).mean(axis=1)  # [part tried]
        best = min(candidates, key=lambda p: (round(spread[p], 12), part_counts[p].sum(), p))
        assignment[g] = best
        part_counts[best] += counts[g]
    return [sorted(np.flatnonzero(assignment[group_of] == part).tolist()) for part in range(num_parts)]


def check_group_count(groups, num_parts: int, what: str, group_by) -> None:
    count = len(set(groups))
    if count < num_parts:
        by = f"--group_by {group_by}" if group_by else "the images"
        raise CrossvalError(f"{by}: {count} group(s), fewer than {what} {num_parts}; every part needs one")


def check_class_sizes(samples, classes, num_folds):
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    if len(samples) < num_folds:
        raise CrossvalError(f"--folds {num_folds}: only {len(samples)} labelled images")
    for name, count in zip(classes, counts):
        if count < 2:  # the fold that tests its only image would train without the class
            raise CrossvalError(f"class {name!r} has {count} image(s); cross-validation needs at least 2 per class")
        if count < num_folds:
            print(f"warning: class {name!r} has {count} images, fewer than --folds {num_folds}: "
                  f"some test folds lack it", file=sys.stderr)


def inner_split(train_part, labels, groups, val_fraction: float, seed: int, fold: int, group_by):
    """(train, val) indices of one fold's training part: val is one of round(1 / val_fraction) stratified, grouped
    parts, the first that leaves every class of the training part in train (the model's classes come from train/)."""
    num_parts = max(2, round(1 / val_fraction))
    part_groups = [groups[i] for i in train_part]
    if len(set(part_groups)) < 2:
        raise CrossvalError(f"fold {fold}: its training part holds {len(set(part_groups))} group(s); the inner "
                            f"validation split needs at least 2 (use fewer --folds or finer --group_by)")
    parts = stratified_group_folds([labels[i] for i in train_part], part_groups, num_parts, seed)
    classes = {labels[i] for i in train_part}
    for part in parts:
        val = {train_part[j] for j in part}
        train = [i for i in train_part if i not in val]
        if val and {labels[i] for i in train} == classes:
            return train, sorted(val)
    raise CrossvalError(f"fold {fold}: no inner validation split of its training part keeps every class in "
                        f"training; each class needs images in at least two {'groups' if group_by else 'places'}")


def make_folds(args) -> dict:
    """The split as stored in folds.json: source, data layout, classes and, per fold, its test, train and val
    samples (each with its label and group; an image by its path, a packed dataset's cell by its index)."""
    if args.group_by not in (None, "parent"):  # a cell-table column: named wrongly, it fails before any listing
        check_table_column(args.data_path, args.group_by)
    source = data_source(args)
    layout = data_layout(args)
    samples, classes, rows = labelled_samples(args, layout)
    groups = group_keys(args, samples, rows, layout)
    check_group_count(groups, args.folds, "--folds", args.group_by)
    check_class_sizes(samples, classes, args.folds)
    labels = [label for _, label in samples]
    test_folds = stratified_group_folds(labels, groups, args.folds, args.seed)
    key = "index" if layout == PACKED else "path"

    def entries(indices):
        return [{key: samples[i][0], "label": samples[i][1], "group": groups[i]} for i in indices]

    folds = []
    for fold, test in enumerate(test_folds):
        in_test = set(test)
        train_part = [i for i in range(len(samples)) if i not in in_test]
        train, val = inner_split(train_part, labels, groups, args.val_fraction, args.seed + 1 + fold, fold,
                                 args.group_by)
        folds.append({"test": entries(test), "train": entries(train), "val": entries(val)})
    return {"format": FOLDS_FORMAT, "source": source, "data_layout": layout, **split_settings(args),
            "classes": classes, "folds": folds}


def split_settings(args) -> dict:
    return {"num_folds": args.folds, "seed": args.seed, "group_by": args.group_by, "val_fraction": args.val_fraction}


def load_or_make_folds(args) -> dict:
    """Reuse <output_dir>/folds.json (it must describe the same data and split settings), else split and save it."""
    path = Path(args.output_dir) / FOLDS_FILE
    if not path.is_file():
        folds = make_folds(args)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(folds, indent=1))
        tmp.replace(path)  # atomic: an interrupted write never leaves a half folds.json
        print(f"Saved a {args.folds}-fold split of {sum(len(f['test']) for f in folds['folds'])} samples to {path}")
        return folds
    try:
        folds = json.loads(path.read_text())
        stored = {key: folds.get(key) for key in split_settings(args)}
        version = folds.get("format")
    except (ValueError, AttributeError) as exc:
        raise CrossvalError(f"{path}: not a folds file written by crossval.py ({exc}); delete it") from exc
    if version not in READABLE_FOLDS_FORMATS:
        raise CrossvalError(f"{path}: folds format {version!r} is not one of {READABLE_FOLDS_FORMATS}, which this "
                            f"code reads; delete it to split again")
    if stored != split_settings(args):
        raise CrossvalError(f"{path} holds a split with {stored}, but this call asks for {split_settings(args)}; "
                            f"use another --output_dir or delete {path}")
    if folds.get("source") != data_source(args):
        raise CrossvalError(f"{path} holds a split of {folds.get('source')}, but this call's data is "
                            f"{data_source(args)}; use another --output_dir or delete {path}")
    folds.setdefault("data_layout", FOLDER)  # format 2: folders only
    print(f"Reusing the {args.folds}-fold split in {path} (source: {folds['source']})")
    return folds


def link_or_copy(source: Path, target: Path):
    try:
        target.symlink_to(source)
    except OSError:  # file systems without symlinks
        shutil.copy2(source, target)


def fold_tree_splits(fold: dict, layout: str) -> dict:
    """Split name -> entries: {train, val, test} (inner validation), or {train: train + val, val: test}."""
    if layout == INNER_VAL:
        return {"train": fold["train"], "val": fold["val"], "test": fold["test"]}
    return {"train": fold["train"] + fold["val"], "val": fold["test"]}


def write_fold_data(folds: dict, fold: int, root: Path, layout: str = INNER_VAL, source_table=None) -> Path:
    """<root>/fold_<i>/, the --data_path of fold i's runs, rebuilt from folds.json every time (never stale): a
    prepared dataset for a packed source, else a tree of links to the images."""
    fold_dir = root / f"fold_{fold}"
    shutil.rmtree(fold_dir, ignore_errors=True)
    fold_dir.mkdir(parents=True)
    if folds.get("data_layout") == PACKED:
        return write_fold_dataset(folds, fold, fold_dir, layout, source_table or read_source_table(folds))
    return write_fold_tree(folds, fold, fold_dir, layout)


def write_fold_tree(folds: dict, fold: int, fold_dir: Path, layout: str) -> Path:
    """<fold_dir>/<split>/<class>/<n>_<file>: links to the images of fold i's splits (fold_tree_splits). The
    running number keeps equal file names from different folders apart. A prepared tiff folder's dataset.json is
    copied beside them, so that the runs take its channel names and know that its pixels are normalised."""
    for split, entries in fold_tree_splits(folds["folds"][fold], layout).items():
        for n, entry in enumerate(entries):
            source = Path(entry["path"])
            if not source.is_file():
                raise CrossvalError(f"{FOLDS_FILE}: image {source} (fold {fold}) no longer exists")
            target = fold_dir / split / folds["classes"][entry["label"]] / f"{n:06d}_{source.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(source, target)
    if folds.get("data_layout") == TIFF:
        shutil.copy2(Path(folds["source"]) / "dataset.json", fold_dir / "dataset.json")
    return fold_dir


def read_source_table(folds: dict):
    """(dataset.json, cells.csv columns, cells.csv rows) of the packed dataset that folds.json splits: read once
    for all folds (write_fold_dataset rewrites each row's split and the counts of dataset.json for every fold)."""
    from util.packed import read_dataset_info

    source = Path(folds["source"])
    return (read_dataset_info(source), *read_cell_table(source, FOLDS_FILE))


def write_fold_dataset(folds: dict, fold: int, fold_dir: Path, layout: str, source_table) -> Path:
    """<fold_dir>/ as a packed dataset the training scripts read directly: cells.npy linked to the source's,
    cells.csv the source's with its split column set to fold i's train / val / test (fold_tree_splits; empty for
    cells outside the split, e.g. unlabelled ones), dataset.json copied with its split counts and split
    description updated (written last: it marks the folder complete). source_table: read_source_table(folds)."""
    from util.packed import CELLS_NPY

    source = Path(folds["source"])
    info, columns, rows = source_table
    split_of = {}
    for split, entries in fold_tree_splits(folds["folds"][fold], layout).items():
        for entry in entries:
            split_of[entry["index"]] = (split, folds["classes"][entry["label"]])
    found = 0
    for row in rows:
        split, label = split_of.get(cell_index(row, source), ("", None))
        if label is not None:
            if row.get("label") != label:
                raise CrossvalError(f"{source / 'cells.csv'}: cell {row['index']} is labelled {row.get('label')!r} "
                                    f"there but {label!r} in {FOLDS_FILE}: the dataset changed since the split; "
                                    f"use another --output_dir or delete {FOLDS_FILE}")
            found += 1
        row["split"] = split
    if found != len(split_of):
        raise CrossvalError(f"{source / 'cells.csv'}: {len(split_of) - found} cell(s) of fold {fold} in {FOLDS_FILE} "
                            f"are no longer in it: the dataset changed since the split; use another --output_dir "
                            f"or delete {FOLDS_FILE}")
    with open(fold_dir / "cells.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns if "split" in columns else [*columns, "split"])
        writer.writeheader()
        writer.writerows(rows)
    link_or_copy(source / CELLS_NPY, fold_dir / CELLS_NPY)
    info["counts"] = {**info.get("counts", {}), "per_split": dict(Counter(row["split"] for row in rows
                                                                          if row["split"]))}
    info["split"] = {"made_by": "crossval.py", "fold": fold, "num_folds": folds["num_folds"], "seed": folds["seed"],
                     "group_by": folds["group_by"], "val_fraction": folds["val_fraction"], "source": str(source)}
    (fold_dir / "dataset.json").write_text(json.dumps(info, indent=1) + "\n")
    return fold_dir


# --------------------------------------------------------------------------------------------------
# The random-init checkpoint
# --------------------------------------------------------------------------------------------------
def random_init_checkpoint(output_dir: Path, script: str, train_args) -> str:
    """<output_dir>/random_init/<settings>/checkpoint-init.pth: main_pretrain.py --epochs 0 with the run's
    --arch, --img_size, --patch_size, --in_chans and --seed (written once, reused by later calls)."""
    import importlib

    import main_finetune
    import main_pretrain

    known, _ = importlib.import_module(script).get_args_parser().parse_known_args(list(train_args))
    # the runs' arch, sizes and channels where the flags leave them out: the defaults, never a checkpoint (the
    # default --output_dir ./output_dir may hold someone's checkpoint.pth; --resume and --finetune are crossval's)
    known.output_dir, known.resume, known.finetune = None, "", ""
    main_finetune.describe_model(known)
    settings = {key: getattr(known, key) for key in INIT_SETTINGS}
    folder = output_dir / "random_init" / slug("_".join(f"{k}{v}" for k, v in settings.items()))
    flags = ["--epochs", "0", "--output_dir", str(folder), "--device", "cpu"]
    for key, value in settings.items():
        flags += [f"--{key}", str(value)]
    pretrain_args = main_pretrain.get_args_parser().parse_args(flags)
    main_pretrain.main(pretrain_args)
    return str(folder / main_pretrain.INIT_CHECKPOINT)


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------
def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "row"


def run_flags(fold_dir: Path, run_dir: Path, checkpoint, train_args) -> list:
    """The training script's flags: the user's, then crossval's own (last, so they win)."""
    own = ["--dataset", "folder", "--data_path", str(fold_dir), "--output_dir", str(run_dir),
           "--log_dir", str(run_dir)]
    return list(train_args) + own + (["--finetune", checkpoint] if checkpoint else [])


def read_result(run_dir: Path, metric: str):
    """The run's accuracy from its log.txt (None while it has not finished): the test split scored once at the
    best val epoch (val), the last epoch's (last) or the best epoch's (max_test) accuracy on the val folder."""
    log = run_dir / "log.txt"
    if not log.is_file():
        return None
    final, last_epoch = None, None
    for line in log.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "max_accuracy" in record:
            final = record  # the last one: a resumed run appends
        elif "test_acc1" in record:
            last_epoch = record
    if final is None:
        return None
    if metric == "val":
        if "test_acc1" not in final:
            raise CrossvalError(f"{log}: the run scored no test split (its final line is {final}); was it trained on "
                                f"a fold tree without test/? Pass --rerun")
        return final["test_acc1"]
    return final["max_accuracy"] if metric == "max_test" else last_epoch["test_acc1"]


def training_config(script: str, flags: list) -> dict:
    """The run's settings as the training script parses them (so '--epochs=1' equals '--epochs 1'), without
    launcher flags (--ngpus, --cluster: unknown to it) and flags that do not change the result."""
    import importlib

    known, _ = importlib.import_module(script).get_args_parser().parse_known_args(flags)
    return {key: value for key, value in sorted(vars(known).items()) if key not in RUNTIME_ONLY}


def prepare_run(run_dir: Path, config: dict, rerun: bool):
    """'done' when an earlier run with the same settings finished, else 'run'; refuses to mix settings."""
    record = run_dir / "crossval_args.json"
    if rerun:
        shutil.rmtree(run_dir, ignore_errors=True)
    config = json.loads(json.dumps(config, default=str))  # as it reads back from the file
    if record.is_file():
        if json.loads(record.read_text()) != config:
            raise CrossvalError(f"{run_dir} holds a run with other settings (see {record}); pass --rerun, "
                                f"delete it, or use another --output_dir")
        if read_result(run_dir, "max_test") is not None:  # a final line: the run finished
            return "done"
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(config, indent=1))
    return "run"  # an interrupted run resumes from its own checkpoint.pth (the scripts auto-resume)


def run_subprocess(script: str, flags: list, run_dir: Path, launcher: str, label: str):
    command = (shlex.split(launcher) if launcher else [sys.executable]) + [str(REPO / f"{script}.py")] + flags
    output = run_dir / "output.txt"
    with open(output, "w") as out:
        code = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        lines = [line for line in output.read_text().splitlines() if line.strip()]
        last = lines[-1] if lines else "(no output)"
        raise CrossvalError(f"{label} failed with exit code {code}: {last} (full output: {output})")


def submit_job(script: str, flags: list, run_dir: Path):
    """One submitit job through util/launch.py; its output_dir is the run folder."""
    import importlib

    from util import launch

    module = importlib.import_module(script)
    args = launch.parse_args(module.get_args_parser(), f"crossval {script}", flags + ["--job_dir", str(run_dir)])
    return launch.submit(args, script)


def run_all(args, rows, folds, train_args) -> dict:
    """Train every (row, fold) not done yet; returns {(row name, fold): run folder}."""
    script = MODES[args.mode]
    output_dir = Path(args.output_dir).resolve()
    layout = LAYOUT[args.metric]
    fold_root = output_dir / FOLD_DATA_DIR[layout]
    source_table = read_source_table(folds) if folds.get("data_layout") == PACKED else None
    fold_dirs = [write_fold_data(folds, i, fold_root, layout, source_table) for i in range(args.folds)]
    run_dirs, jobs = {}, []
    total = len(rows) * args.folds
    for r, (name, checkpoint) in enumerate(rows):
        if checkpoint is None:  # the random-init row: the pretraining model before training
            checkpoint = args.random_init or random_init_checkpoint(output_dir, script, train_args)
        for fold in range(args.folds):
            run_dir = output_dir / RUNS_DIR[layout] / slug(name) / f"fold_{fold}"
            run_dirs[name, fold] = run_dir
            flags = run_flags(fold_dirs[fold], run_dir, checkpoint, train_args)
            label = f"[{r * args.folds + fold + 1}/{total}] {args.mode} {name!r} fold {fold}"
            if prepare_run(run_dir, training_config(script, flags), args.rerun) == "done":
                print(f"{label}: reusing the finished run in {run_dir}")
                continue
            print(f"{label}: running in {run_dir}", flush=True)
            if args.submitit:
                try:  # --cluster debug runs the job inside submit()
                    jobs.append((label, submit_job(script, flags, run_dir)))
                except ValueError as exc:
                    raise CrossvalError(f"{label} failed: {' '.join(str(exc).split())}") from exc
            else:
                run_subprocess(script, flags, run_dir, args.launcher, label)
    for label, job in jobs:
        if job is None:  # --dry_run
            continue
        try:
            job.result()
        except Exception as exc:
            raise CrossvalError(f"{label} failed in submitit job {job.job_id}: {str(exc).splitlines()[-1]} "
                                f"(logs: {job.paths.stderr})") from exc
    return run_dirs


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------
def selection_rule(args) -> str:
    """The rule behind each number, as the table's first header cell."""
    groups = f", grouped by {args.group_by}" if args.group_by else ""
    if args.metric == "val":
        return (f"epoch chosen on an inner validation split ({args.val_fraction:g} of each training part{groups}); "
                "test fold scored once")
    if args.metric == "last":
        return f"last epoch on the test fold (no selection{groups})"
    return f"best epoch selected on the test fold (the reference's number, biased upward{groups})"


def collect_table(args, rows, run_dirs) -> dict:
    """Per row: fold accuracies (from log.txt), mean, sample std, difference to the random-init row, error."""
    table_rows = []
    for name, checkpoint in rows:
        accs, logs = [], []
        for fold in range(args.folds):
            run_dir = run_dirs[name, fold]
            acc = read_result(run_dir, args.metric)
            if acc is None:
                raise CrossvalError(f"{run_dir / 'log.txt'}: no result ({args.metric}); the run did not finish")
            accs.append(float(acc))
            logs.append(str(run_dir / "log.txt"))
        table_rows.append({"name": name, "checkpoint": checkpoint or RANDOM, "folds": accs,
                           "mean": float(np.mean(accs)), "std": float(np.std(accs, ddof=1)),
                           "err": 100.0 - float(np.mean(accs)), "logs": logs})
    reference = next((row for row in table_rows if row["checkpoint"] == RANDOM), None)
    for row in table_rows:
        row["diff"] = row["mean"] - reference["mean"] if reference else None
    return {"mode": args.mode, "metric": args.metric, "selection": selection_rule(args), "group_by": args.group_by,
            "num_folds": args.folds, "reference": reference["name"] if reference else None, "rows": table_rows}


def format_mean(row) -> str:
    text = f"{row['mean']:.2f} ± {row['std']:.2f}"
    return text if row["diff"] is None else f"{text} ({row['diff']:+.2f})"


def markdown_table(table) -> str:
    """The seed README's layout with the selection rule in the first header cell:
    | selection: <rule> | fold 0 .. k-1 | Avg. ± std ↑ (diff to random init) | Err. ↓ |."""
    folds = [str(i) for i in range(table["num_folds"])]
    header = [f"selection: {table['selection']}", *folds, "Avg. ± std ↑", "Err. ↓"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] + [":---:"] * (len(header) - 1)) + "|"]
    for row in table["rows"]:
        cells = [row["name"], *(f"{acc:.2f}" for acc in row["folds"]), format_mean(row), f"{row['err']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_table(table, output_dir: Path):
    (output_dir / "table.json").write_text(json.dumps(table, indent=1))
    (output_dir / "table.md").write_text(markdown_table(table))


def main(argv=None) -> int:
    """Exit code and error line as every script (util/cli.py): 2 with one line for a bad flag, file or run."""
    own_argv, train_args = split_argv(sys.argv[1:] if argv is None else list(argv))
    args = get_args_parser().parse_args(own_argv)
    return run_tool(lambda parsed: crossval(parsed, train_args), args)


def crossval(args, train_args) -> dict:
    """The folds, the runs not done yet, and the table (written as table.md / table.json, returned)."""
    if args.folds < 2:
        raise CrossvalError(f"--folds must be at least 2, got {args.folds}")
    if not 0 < args.val_fraction <= 0.5:
        raise CrossvalError(f"--val_fraction must be in (0, 0.5], got {args.val_fraction}")
    check_passthrough(train_args)
    rows = parse_checkpoints(args.checkpoints)
    if args.random_init:
        if not Path(args.random_init).is_file():
            raise CrossvalError(f"--random_init {args.random_init}: checkpoint file does not exist")
        args.random_init = str(Path(args.random_init).resolve())
    output_dir = prepare_output_dir(args.output_dir)
    folds = load_or_make_folds(args)
    run_dirs = run_all(args, rows, folds, train_args)
    table = collect_table(args, rows, run_dirs)
    save_table(table, output_dir)
    print(markdown_table(table))
    print(f"Saved {output_dir / 'table.md'} and {output_dir / 'table.json'}")
    return table


if __name__ == "__main__":
    sys.exit(main())
