"""The packed cell dataset that prepare_cells.py writes and every --data_path reader understands.

A folder holding `dataset.json` is a prepared dataset. Format version 1, layout "packed":

    cells.npy     uint16 [N, C, S, S], C-order .npy (np.load(..., mmap_mode="r") maps it); crops after the
                  normalisation recipe, zero outside the slide
    cells.csv     one row per crop, in the order of cells.npy:
                  index, slide, cell_id, x, y, crop_x, crop_y, area, label, split
                  (x, y: centroid in full-resolution pixels, x = column; crop_x, crop_y: the pixel at the crop's
                  centre, row S//2 and column S//2 of the crop; area in pixels, empty for table input; label empty
                  when unknown; split 'train' / 'val', empty without --val_fraction)
    dataset.json  {"format": "dama-cells", "format_version": 1, "layout": "packed", "channel_names": [...],
                   "crop_size": S, "dtype": "uint16", "shape": [N, C, S, S], "num_cells": N,
                   "classes": [...] (sorted label names), "counts": {"cells", "per_slide", "per_class", "per_split"},
                   "normalization": <recipe, util/normalize.py>, "split": {"val_fraction", "split_by", "seed"} | null,
                   "slides": [{"name", "image", "cells", "height", "width", "dtype", "channels"}],
                   "files": {"crops": "cells.npy", "table": "cells.csv"}, "created_by": "prepare_cells.py"}

Layout "tiff" (prepare_cells.py --format tiff) has the same dataset.json and cells.csv (plus a `file` column)
beside `train/<class>/*.tif` (and `val/<class>/`); the folder readers take its channel names and know that its
pixels are already normalised.

`PackedCells` is the map-style dataset over it (item: (transform(crop / 65535) [C, S, S] float32, label));
it maps cells.npy lazily in each process, so DataLoader workers and DDP ranks each open their own map.
This module needs numpy only; torch is imported when an item is read.
"""
import csv
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from util.channels import check_flag_names
from util.errors import DataError
from util.normalize import UINT16_MAX, check_recipe, estimate_folder_recipe, is_percentile

FORMAT_NAME = "dama-cells"
FORMAT_VERSION = 1
LAYOUTS = ("packed", "tiff")
DATASET_JSON, CELLS_NPY, CELLS_CSV = "dataset.json", "cells.npy", "cells.csv"
TABLE_COLUMNS = ("index", "slide", "cell_id", "x", "y", "crop_x", "crop_y", "area", "label", "split")
SPLITS = ("train", "val")


# --------------------------------------------------------------------------------------------------
# Reading the description
# --------------------------------------------------------------------------------------------------
def prepared_layout(root) -> str:
    """'packed' or 'tiff' when `root` holds a dataset.json (after checking its format and version), else ''."""
    path = Path(root) / DATASET_JSON
    return read_dataset_info(root)["layout"] if path.is_file() else ""


def read_dataset_info(root) -> dict:
    """dataset.json of a prepared dataset; DataError naming the file for anything this code cannot read."""
    path = Path(root) / DATASET_JSON
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the dataset description ({type(exc).__name__}: {exc})") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise DataError(f"{path}: not a prepared cell dataset (expected \"format\": \"{FORMAT_NAME}\"; written by "
                        f"prepare_cells.py)")
    if info.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format version {info.get('format_version')!r} is not known to this code, which "
                        f"reads version {FORMAT_VERSION}; prepare the data again or update the code")
    if info.get("layout") not in LAYOUTS:
        raise DataError(f"{path}: layout {info.get('layout')!r} is not one of {LAYOUTS}")
    for key in ("channel_names", "crop_size", "num_cells", "classes"):
        if key not in info:
            raise DataError(f"{path}: the key {key!r} is missing")
    if info.get("normalization") is not None:
        check_recipe(info["normalization"], str(path))
    return info


INT_COLUMNS, FLOAT_COLUMNS = ("index", "crop_x", "crop_y", "area"), ("x", "y")


def read_cell_table(root, optional_columns=()) -> dict:
    """cells.csv as column arrays: index, crop_x, crop_y, area int64 (area -1 when unknown), x, y float64, and
    slide, cell_id, label, split as numpy str arrays ('' when empty), plus each of `optional_columns` as a str array
    ('' where the file lacks it; e.g. a --format tiff folder's "file"). Arrays, not dicts per row: a slide can hold
    millions of cells, and every DataLoader worker keeps a copy."""
    path = Path(root) / CELLS_CSV
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None) or []
            missing = [c for c in TABLE_COLUMNS if c not in header]
            if missing:
                raise DataError(f"{path}: columns {missing} are missing; expected {', '.join(TABLE_COLUMNS)}")
            columns = [*TABLE_COLUMNS, *optional_columns]
            values = {c: [] for c in columns}
            positions = [(c, header.index(c) if c in header else len(header)) for c in columns]
            for row in reader:
                for column, position in positions:
                    values[column].append(row[position] if position < len(row) else "")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the cell table ({type(exc).__name__}: {exc})") from exc
    table = {}
    try:
        for column, items in values.items():
            if column in INT_COLUMNS:
                table[column] = np.array([int(v) if v != "" else -1 for v in items], dtype=np.int64)
            elif column in FLOAT_COLUMNS:
                table[column] = np.array([float(v) for v in items], dtype=np.float64)
            else:
                table[column] = np.array(items, dtype=str)
    except ValueError as exc:
        raise DataError(f"{path}: column {column!r} holds a malformed value ({exc})") from exc
    return table


def table_rows(table: dict) -> list:
    """Rows (dicts, None for empty fields) of a column table."""
    rows = []
    for i in range(len(table["index"])):
        row = {}
        for column, values in table.items():
            value = values[i].item()
            row[column] = None if value == "" or (column == "area" and value < 0) else value
        rows.append(row)
    return rows


def take_rows(table: dict, positions) -> dict:
    return {column: values[positions] for column, values in table.items()}


def split_positions(table: dict, split, root, require_split: bool) -> np.ndarray:
    """Row positions of `split` ('train' / 'val'); all rows when split is None, or for 'train' without a split."""
    count = len(table["index"])
    if split is None:
        return np.arange(count)
    has_split = bool((table["split"] != "").any())
    if not has_split:
        if require_split:
            raise DataError(f"--data_path {root}: the prepared dataset has no train/val split; prepare it with "
                            f"--val_fraction (e.g. 0.2) to fine-tune or evaluate on it")
        return np.arange(count) if split == "train" else np.arange(0)
    return np.nonzero(table["split"] == split)[0]


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------
class PackedCells:
    """Map-style dataset over a packed folder: item i -> (transform(crop [C, S, S] float32 = uint16 / 65535),
    label int (the class index, -1 when the cell has none)).

    Attributes: classes, channel_names, recipe (the normalisation already applied to the pixels), crop_size,
    in_chans, root. `cell_table()` gives the cells.csv rows of the items in item order (slide, cell_id, x, y,
    label, split, ...), for grouping folds by slide or writing per-cell outputs. cells.npy is memory-mapped on
    first use in each process (never pickled), so the object is safe to hand to DataLoader workers.
    """

    def __init__(self, root, split=None, transform=None, require_split: bool = False, require_labels: bool = False,
                 table: dict = None):
        self.root = Path(root)
        info = read_dataset_info(self.root)
        if info["layout"] != "packed":
            raise DataError(f"{self.root / DATASET_JSON}: layout {info['layout']!r}; PackedCells reads 'packed'")
        self.info = info
        self.classes = list(info["classes"])
        self.channel_names = list(info["channel_names"])
        self.recipe = info.get("normalization")
        self.crop_size = int(info["crop_size"])
        self.in_chans = len(self.channel_names)
        self.transform = transform
        self.split = split
        table = read_cell_table(self.root) if table is None else table  # table: the caller's read of it
        if len(table["index"]) != info["num_cells"]:
            raise DataError(f"{self.root / CELLS_CSV}: {len(table['index'])} rows but dataset.json says "
                            f"{info['num_cells']} cells")
        self.table = take_rows(table, split_positions(table, split, self.root, require_split))
        self.indices = self.table["index"]
        class_index = {name: i for i, name in enumerate(self.classes)}
        self.labels = np.array([class_index.get(label, -1) for label in self.table["label"].tolist()],
                               dtype=np.int64)
        if require_labels and (self.labels < 0).any():
            missing = int((self.labels < 0).sum())
            raise DataError(f"--data_path {self.root}: {missing} of the {len(self)} {split or ''} cells have no label; "
                            f"fine-tuning needs a class for every cell (a --label_col when preparing)")
        if split is not None and len(self) == 0:
            raise DataError(f"--data_path {self.root}: the prepared dataset has no {split} cells")
        self._cells, self._pid = None, None
        self._check_file()

    def _check_file(self):
        cells = self.cells()
        expected = (int(self.info["num_cells"]), self.in_chans, self.crop_size, self.crop_size)
        if cells.dtype != np.uint16 or tuple(cells.shape) != expected:
            raise DataError(f"{self.root / CELLS_NPY}: holds {cells.dtype} {tuple(cells.shape)}; dataset.json "
                            f"describes uint16 {expected}")

    def cells(self) -> np.ndarray:
        """cells.npy memory-mapped read-only [N, C, S, S] uint16, opened once per process."""
        if self._cells is None or self._pid != os.getpid():
            path = self.root / CELLS_NPY
            try:
                self._cells = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: cannot map the crops ({type(exc).__name__}: {exc})") from exc
            self._pid = os.getpid()
        return self._cells

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cells"], state["_pid"] = None, None  # each worker process maps the file itself
        return state

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int):
        """The untransformed image of item `index`: float32 torch [C, S, S] in [0, 1]."""
        import torch  # numpy-only at import (prepare_cells.py); the training scripts have torch loaded already
        crop = self.cells()[self.indices[index]]  # [C, S, S] uint16, still in the map: astype copies it out
        return torch.from_numpy(crop.astype(np.float32) / np.float32(UINT16_MAX))

    def __getitem__(self, index: int):
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def cell_table(self) -> list:
        """The cells.csv rows of the items, in item order: dicts with index, slide, cell_id, x, y, crop_x, crop_y,
        area, label, split (None where empty)."""
        return table_rows(self.table)


def open_packed_dataset(root, args, transform, split, require_split=False, require_labels=False,
                        table=None) -> PackedCells:
    """PackedCells for a training script: checks --in_chans, --channel_names and the crop size against `transform`.
    table: the dataset's cells.csv when the caller has read it already."""
    dataset = PackedCells(root, split, transform, require_split=require_split, require_labels=require_labels,
                          table=table)
    in_chans = getattr(args, "in_chans", None)
    if in_chans is not None and in_chans != dataset.in_chans:
        raise DataError(f"--data_path {root}: the prepared cells have {dataset.in_chans} channels "
                        f"({dataset.channel_names}) but --in_chans is {in_chans}")
    min_side = getattr(transform, "min_side", 0)
    if dataset.crop_size < min_side:
        raise DataError(f"--data_path {root}: crops are {dataset.crop_size} px but this transform needs at least "
                        f"{min_side} px (half of --img_size for training, --val_crop for validation); prepare with "
                        f"--crop_size {min_side} or more")
    check_names_flag(getattr(args, "channel_names", None), dataset.channel_names, root)
    if getattr(args, "normalize", "none") != "none":
        print(f"note: --normalize {args.normalize} is not applied to {root}: a prepared dataset carries its own "
              f"normalisation")
    return dataset


def check_names_flag(flag_names, data_names, root):
    check_flag_names(flag_names, data_names, f"the prepared dataset {root}", error=DataError)


# --------------------------------------------------------------------------------------------------
# Folder data: channel names and normalisation
# --------------------------------------------------------------------------------------------------
def describe_folder_dataset(dataset, root, args, estimate: bool):
    """Set `channel_names`, `recipe` (what the numbers went through) and `normalization` (what load() still has to
    apply, or None) on a folder dataset (util.datasets.ImageFileDataset); returns it.

    A folder written by prepare_cells.py --format tiff is already normalised and named by its dataset.json.
    Otherwise: names from --channel_names; the recipe from args.normalization (a checkpoint's, or pretraining's
    own), or estimated from a bounded sample of the dataset's files when --normalize percentile and `estimate`.
    """
    info = read_dataset_info(root) if (Path(root) / DATASET_JSON).is_file() else None
    flag_names = getattr(args, "channel_names", None)
    if info is not None and info["layout"] == "tiff":
        check_names_flag(flag_names, info["channel_names"], root)
        dataset.channel_names, dataset.recipe, dataset.normalization = (
            list(info["channel_names"]), info.get("normalization"), None)
        return dataset
    if flag_names and len(flag_names) != dataset.in_chans:
        raise DataError(f"--channel_names gives {len(flag_names)} names but --in_chans is {dataset.in_chans}")
    recipe = getattr(args, "normalization", None)
    if not is_percentile(recipe) and getattr(args, "normalize", "none") == "percentile" and estimate:
        recipe = estimate_folder_recipe(dataset.samples, args.clip_percentiles,
                                        channel_names=flag_names, seed=getattr(args, "seed", 0))
        print(f"--normalize percentile: {recipe['sample']['files']} files, {recipe['sample']['pixels_per_channel']:,} "
              f"pixels per channel sampled from {root}")
    if is_percentile(recipe) and len(recipe["low"]) != dataset.in_chans:
        raise DataError(f"the normalisation recipe has {len(recipe['low'])} channels "
                        f"({recipe.get('channel_names')}) but the data under {root} has {dataset.in_chans}")
    dataset.channel_names = list(flag_names) if flag_names else None
    dataset.recipe = recipe if is_percentile(recipe) else None
    dataset.normalization = dataset.recipe
    return dataset


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def check_output_dir(output_dir, overwrite: bool) -> Path:
    """--output_dir as a Path; DataError when it exists and is not an empty folder (without --overwrite)."""
    output_dir = Path(output_dir).expanduser()
    if output_dir.exists():
        if not output_dir.is_dir():
            raise DataError(f"--output_dir {output_dir} exists and is not a folder")
        if any(output_dir.iterdir()) and not overwrite:
            raise DataError(f"--output_dir {output_dir} exists and is not empty; choose a new folder or pass "
                            f"--overwrite to replace it")
    return output_dir


class StagedOutput:
    """A temporary sibling folder renamed to `output_dir` on success and deleted on any failure, so that an
    interrupted or failed run never leaves something that looks like a finished dataset.

        with StagedOutput(output_dir, overwrite) as folder:
            ... write into folder ...
    """

    def __init__(self, output_dir, overwrite: bool = False):
        self.output_dir = check_output_dir(output_dir, overwrite)
        self.folder = self.output_dir.parent / f".{self.output_dir.name}.partial-{os.getpid()}"

    def __enter__(self) -> Path:
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        return self.folder

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            return False
        old = None
        if self.output_dir.exists():
            old = self.output_dir.parent / f".{self.output_dir.name}.old-{os.getpid()}"
            os.replace(self.output_dir, old)  # only reached with --overwrite or for an empty folder
        os.replace(self.folder, self.output_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


class PackedWriter:
    """cells.npy written crop by crop at its index (plain file writes: the crops pass through the page cache, not
    the process's memory). The header comes first, so the finished file is an ordinary .npy."""

    def __init__(self, folder: Path, num_cells: int, num_channels: int, crop_size: int):
        self.shape = (num_cells, num_channels, crop_size, crop_size)
        self.item_bytes = num_channels * crop_size * crop_size * 2
        self.path = Path(folder) / CELLS_NPY
        with open(self.path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<u2", "fortran_order": False, "shape": self.shape})
            self.offset = f.tell()
            f.truncate(self.offset + num_cells * self.item_bytes)  # unwritten crops read as zeros
        self.file = open(self.path, "r+b")

    def write(self, index: int, crop: np.ndarray, row: dict = None):
        """Crop [C, S, S] uint16 of cell `index`."""
        self.file.seek(self.offset + index * self.item_bytes)
        self.file.write(np.ascontiguousarray(crop, dtype="<u2").tobytes())

    def close(self):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def safe_name(text) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "_"


class TiffWriter:
    """--format tiff: one uint16 [C, S, S] TIFF per crop in <split>/<class>/ (or <split>/ for unlabelled data)."""

    def __init__(self, folder: Path, labelled: bool):
        self.folder, self.labelled = Path(folder), labelled

    def write(self, index: int, crop: np.ndarray, row: dict) -> str:
        """Writes crop [C, S, S] for the cell `row` (slide, cell_id, label, split); returns its relative path."""
        import tifffile
        parts = [row.get("split") or "train"]
        if self.labelled:
            parts.append(safe_name(row["label"]) if row.get("label") else "unlabelled")
        name = f"{index:07d}_{safe_name(row['slide'])}_{safe_name(row['cell_id'])}.tif"
        path = self.folder.joinpath(*parts, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, crop, photometric="minisblack")  # planar C x S x S, read back as [C, S, S]
        return str(path.relative_to(self.folder))

    def close(self):
        pass


def write_cell_table(path: Path, table: dict):
    """cells.csv from column arrays (TABLE_COLUMNS, plus 'file' when present); '' for None, '' and area < 0."""
    columns = list(TABLE_COLUMNS) + [c for c in table if c not in TABLE_COLUMNS]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in zip(*(table[c].tolist() for c in columns)):
            writer.writerow(["" if v is None or (c == "area" and v < 0) else (round(v, 3) if isinstance(v, float)
                                                                             else v)
                             for c, v in zip(columns, row)])


def write_dataset_info(path: Path, info: dict):
    path.write_text(json.dumps(info, indent=1) + "\n")
