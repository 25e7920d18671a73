"""Cut one crop per cell out of whole-slide multiplexed images into a packed dataset the training scripts read.

    python prepare_cells.py --image slide.ome.tif --cells mask.tif --channels DAPI,NeuN,S100 --output_dir cells
    python prepare_cells.py --image s1.ome.tif --image s2.ome.tif --cells s1.csv --cells s2.csv \\
        --label_col cell_type --val_fraction 0.2 --split_by slide --output_dir cells
    python main_pretrain.py --data_path cells ...        # any script's --data_path reads the result

--image: a multi-channel TIFF / OME-TIFF (any axis order; pyramids at level 0), a folder of single-channel TIFFs
(one per marker, named by file stem) or an OME-Zarr image; repeat it for several slides. --cells: an instance
label mask (same height and width; one crop per label, centred on its centroid) or a CSV/TSV table of centroids
(with an optional class column), one per --image, or one table whose slide column names the images.
Slides and masks are read window by window, never whole.

Output (--output_dir, written to a temporary folder and renamed at the end): cells.npy uint16 [N, C, S, S]
(memory-mappable), cells.csv (one row per crop), dataset.json (channel names, crop size, normalisation recipe,
classes, counts, format version); see util/packed.py. --format tiff writes train/<class>/*.tif instead of cells.npy.
"""
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from util.channels import parse_channel_names
from util.cli import CommandLineParser, DescribedHelpFormatter, run_tool
from util.errors import ConfigError, DataError
from util.normalize import (DEFAULT_PERCENTILES, apply_recipe, check_percentiles, none_recipe, percentile_recipe,
                            sample_pixels)
from util.packed import (CELLS_CSV, CELLS_NPY, DATASET_JSON, FORMAT_NAME, FORMAT_VERSION, PackedWriter, StagedOutput, TABLE_COLUMNS, TiffWriter,
                         check_output_dir, write_cell_table, write_dataset_info)
from util.slides import (anchor_centres, file_stem, measure_mask, open_mask, open_slide, parse_select,
                         read_table_cells, resolve_channels, round_half_up)

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".tab")
WINDOW_BYTES = 48 * 2 ** 20  # working set of one window (raw + normalised + one float channel)
PIXELS_PER_SAMPLED_CELL = 1024  # normalisation sample: this many random pixels of each sampled cell's crop


def get_args_parser():
    parser = CommandLineParser("prepare_cells.py", description=__doc__, formatter_class=DescribedHelpFormatter)
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--image", action="append", required=True,
                        help="slide: multi-channel TIFF / OME-TIFF, folder of per-marker TIFFs, or OME-Zarr; "
                             "repeat for several slides")
    inputs.add_argument("--cells", action="append", required=True,
                        help="instance label mask (TIFF / OME-Zarr) or CSV/TSV table of centroids, one per --image "
                             "(or one table with a slide column for all of them)")
    inputs.add_argument("--channels", default=None, type=parse_channel_names,
                        help="markers to keep, in this order, matched case-insensitively against the channel names "
                             "(default: all channels in file order)")
    inputs.add_argument("--channel_names", default=None, type=parse_channel_names,
                        help="names of the image's channels in file order, for files without names "
                             "(default: OME / ImageJ names, the file stems of a marker folder, or channel_0, ...)")
    inputs.add_argument("--select", default=None,
                        help="plane of images with more axes than channels, Y and X, e.g. T=0 or T=0,Z=3 "
                             "(applies to --image and mask --cells)")
    inputs.add_argument("--mask_channel", default=None,
                        help="the label channel of a multi-channel mask file, by name (default: a mask has one)")
    table = parser.add_argument_group("cell tables")
    table.add_argument("--x_col", default=None, help="column of the centroid x (pixels); default: x, centroid_x, "
                                                     "X, cx, ... whichever is present")
    table.add_argument("--y_col", default=None, help="column of the centroid y (pixels); default: y, centroid_y, ...")
    table.add_argument("--label_col", default=None,
                       help="class column (default: label, class, cell_type, ... if present; 'none': no classes)")
    table.add_argument("--id_col", default=None, help="cell id column (default: cell_id, id, ... if present; "
                                                      "else the table's row number)")
    table.add_argument("--slide_col", default=None,
                       help="column naming each cell's slide (an --image file stem or name), for one table "
                            "covering several slides (default: slide, image, sample, ... if present)")
    crops = parser.add_argument_group("crops and normalisation")
    crops.add_argument("--crop_size", default=64, type=int, help="crop side in pixels, centred on each cell; zero "
                                                                  "padding past the slide border")
    crops.add_argument("--normalize", default="percentile", choices=("percentile", "none"),
                       help="percentile: per-channel --clip_percentiles estimated from a bounded sample of cells, "
                            "rescaled to uint16; none: raw values (uint16 kept, uint8 x 257, floats in [0, 1])")
    crops.add_argument("--clip_percentiles", default=list(DEFAULT_PERCENTILES), type=float, nargs=2,
                       metavar=("LOW", "HIGH"), help="percentiles mapped to 0 and 65535")
    crops.add_argument("--norm_sample_cells", default=1000, type=int,
                       help=f"cells drawn (seeded, over all slides) for the percentile estimate; "
                            f"{PIXELS_PER_SAMPLED_CELL} random pixels of each crop")
    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", required=True, help="folder to create (must not exist, or be empty)")
    output.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    output.add_argument("--format", default="packed", choices=("packed", "tiff"),
                        help="packed: cells.npy + cells.csv + dataset.json; tiff: <split>/<class>/*.tif files "
                             "(+ cells.csv and dataset.json)")
    output.add_argument("--val_fraction", default=0.0, type=float,
                        help="fraction of cells in a validation split (stratified by class; 0: no split column)")
    output.add_argument("--split_by", default="cell", choices=("cell", "slide"),
                        help="split cells at random, or whole slides (no slide on both sides)")
    output.add_argument("--seed", default=0, type=int, help="seed of the split and of the normalisation sample")
    return parser


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------
def check_args(args):
    if args.crop_size < 8:
        raise ConfigError(f"--crop_size must be at least 8 pixels, got {args.crop_size}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise ConfigError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.norm_sample_cells < 1:
        raise ConfigError(f"--norm_sample_cells must be at least 1, got {args.norm_sample_cells}")
    check_percentiles(args.clip_percentiles)
    if len(args.cells) not in (1, len(args.image)):
        raise ConfigError(f"{len(args.cells)} --cells for {len(args.image)} --image; give one --cells per --image, "
                          f"or one table with a slide column")


def open_slides(args) -> list:
    select = parse_select(args.select)
    slides = []
    try:
        for path in args.image:
            slides.append(open_slide(path, select, args.channel_names))
    except BaseException:
        close_all(slides)
        raise
    names = [slide.name for slide in slides]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        close_all(slides)
        raise DataError(f"--image: several slides are named {duplicates} (the file stem); rename the files")
    return slides


def close_all(slides):
    for slide in slides:
        slide.close()


def output_channels(slides, wanted) -> tuple:
    """(names of the dataset's channels, [channel indices per slide]): --channels, or all channels of the first
    slide, matched by name in every other slide."""
    first = slides[0]
    if wanted:
        indices = [resolve_channels(slide, wanted) for slide in slides]
        return [first.channel_names[i] for i in indices[0]], indices
    names = first.channel_names
    for slide in slides[1:]:
        if sorted(n.casefold() for n in slide.channel_names) != sorted(n.casefold() for n in names):
            raise DataError(f"--image {slide.path} has channels {slide.channel_names} but {first.path} has {names}; "
                            f"choose common ones with --channels")
    return list(names), [resolve_channels(slide, names) for slide in slides]


# --------------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------------
def is_table(path) -> bool:
    return Path(path).suffix.lower() in TABLE_SUFFIXES


def mask_cells(slide, path, args) -> dict:
    """Cells of an instance label mask: one per label, centroid and area measured block by block."""
    mask, channel = open_mask(path, parse_select(args.select), args.mask_channel)
    with mask:
        if (mask.height, mask.width) != (slide.height, slide.width):
            raise DataError(f"--cells {path} is {mask.height}x{mask.width} pixels but --image {slide.path} is "
                            f"{slide.height}x{slide.width}; the mask must match the image")
        stats = measure_mask(mask, channel)
        crop_y, crop_x = anchor_centres(mask, channel, stats)
    count = len(stats["label"])
    return {"cell_id": stats["label"].astype(str), "x": stats["x"], "y": stats["y"], "crop_x": crop_x,
            "crop_y": crop_y, "area": stats["area"], "label": np.full(count, "", dtype=object),
            "line": np.full(count, -1)}


def table_cells(table: dict, rows, path, slide) -> dict:
    """Cells of a table's `rows` (positions) for one slide; centres are the rounded centroids, which must lie inside."""
    x, y = np.asarray(table["x"])[rows], np.asarray(table["y"])[rows]
    lines = np.asarray(table["line"])[rows]
    ids = [table["cell_id"][i] for i in rows]
    ids = np.array([str(line - 1) if cell_id is None else cell_id for cell_id, line in zip(ids, lines)], dtype=object)
    crop_x, crop_y = round_half_up(x), round_half_up(y)
    outside = np.nonzero((crop_x < 0) | (crop_x >= slide.width) | (crop_y < 0) | (crop_y >= slide.height))[0]
    if outside.size:
        i = outside[0]
        raise DataError(f"--cells {path}: {outside.size} centroid(s) lie outside the {slide.width}x{slide.height} "
                        f"(width x height) image {slide.path}, e.g. line {lines[i]}: x={x[i]:g}, y={y[i]:g}; "
                        f"coordinates are full-resolution pixels (x = column)")
    labels = np.array(["" if table["label"][i] is None else table["label"][i] for i in rows], dtype=object)
    return {"cell_id": ids, "x": x, "y": y, "crop_x": crop_x, "crop_y": crop_y, "area": np.full(len(rows), -1),
            "label": labels, "line": lines}


def slide_of_table_value(value, slides, path, line):
    for i, slide in enumerate(slides):
        if value in (slide.name, Path(slide.path).name, str(slide.path)) or file_stem(value) == slide.name:
            return i
    raise DataError(f"--cells {path}: line {line} names slide {value!r}, which is none of the --image slides "
                    f"({', '.join(s.name for s in slides)})")


def collect_cells(args, slides) -> list:
    """[cells of slide i] as column dicts, from one mask/table per slide or one table with a slide column."""
    options = dict(x_col=args.x_col, y_col=args.y_col, label_col=args.label_col, id_col=args.id_col,
                   slide_col=args.slide_col)
    if len(args.cells) == 1 and len(slides) > 1:
        path = args.cells[0]
        if not is_table(path):
            raise ConfigError(f"one --cells {path} for {len(slides)} slides must be a table with a slide column "
                              f"(CSV/TSV); or give one --cells per --image")
        table, columns = read_table_cells(path, **options)
        if columns["slide"] is None:
            raise DataError(f"--cells {path}: one table for {len(slides)} slides needs a slide column (--slide_col); "
                            f"columns found: x={columns['x']}, y={columns['y']}")
        owner = np.array([slide_of_table_value(value, slides, path, line)
                          for value, line in zip(table["slide"], table["line"])])
        per_slide = [table_cells(table, np.nonzero(owner == i)[0], path, slide) for i, slide in enumerate(slides)]
        for cells, slide in zip(per_slide, slides):
            check_unique_ids(cells, path, slide)
        return per_slide
    per_slide = []
    for slide, path in zip(slides, args.cells):
        if is_table(path):
            table, columns = read_table_cells(path, **options)
            print(f"{path}: {len(table['x'])} cells; columns x={columns['x']!r}, y={columns['y']!r}, "
                  f"label={columns['label']!r}, id={columns['id']!r}")
            per_slide.append(table_cells(table, np.arange(len(table["x"])), path, slide))
        else:
            per_slide.append(mask_cells(slide, path, args))
        check_unique_ids(per_slide[-1], path, slide)
    return per_slide


def check_unique_ids(cells: dict, path, slide):
    ids = cells["cell_id"].astype(str)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        duplicate = str(unique[counts > 1][0])
        lines = cells["line"][ids == duplicate][:2].tolist()
        where = f" (lines {lines[0]} and {lines[1]})" if lines[0] >= 0 else ""
        raise DataError(f"--cells {path}: cell id {duplicate!r} occurs {counts[counts > 1][0]} times for slide "
                        f"{slide.name}{where}; cell ids must be unique per slide")


def join_cells(per_slide, slides) -> dict:
    """One column table over all slides, in slide order, then each slide's cell order."""
    table = {key: np.concatenate([cells[key] for cells in per_slide])
             for key in ("cell_id", "x", "y", "crop_x", "crop_y", "area", "label")}
    table["slide_index"] = np.concatenate([np.full(len(c["x"]), i) for i, c in enumerate(per_slide)])
    table["slide"] = np.array([slides[i].name for i in table["slide_index"]], dtype=object)
    table["split"] = np.full(len(table["x"]), "", dtype=object)
    table["index"] = np.arange(len(table["x"]))
    if len(table["x"]) == 0:
        raise DataError("--cells: no cells found in any slide")
    return table


# --------------------------------------------------------------------------------------------------
# Train / val split
# --------------------------------------------------------------------------------------------------
def assign_split(table: dict, fraction: float, split_by: str, seed: int):
    """table['split'] = 'train' / 'val': stratified by class (cells), or whole slides (split_by 'slide')."""
    if fraction <= 0:
        return None
    rng = np.random.default_rng(seed)
    count = len(table["x"])
    val = np.zeros(count, bool)
    if split_by == "slide":
        names = sorted(set(table["slide"]))
        if len(names) < 2:
            raise ConfigError(f"--split_by slide needs at least two slides, got {len(names)}")
        sizes = Counter(table["slide"])
        chosen, taken = [], 0
        for name in rng.permutation(names):
            if taken >= fraction * count or len(chosen) == len(names) - 1:
                break
            chosen.append(name)
            taken += sizes[name]
        val = np.isin(table["slide"], chosen)
    else:
        for label in sorted(set(table["label"])):
            members = rng.permutation(np.nonzero(table["label"] == label)[0])
            take = int(round(fraction * len(members)))
            if len(members) >= 2:
                take = min(max(take, 1), len(members) - 1)
            val[members[:take]] = True
    table["split"] = np.where(val, "val", "train").astype(object)
    return {"val_fraction": fraction, "split_by": split_by, "seed": seed}


# --------------------------------------------------------------------------------------------------
# Windows and crops
# --------------------------------------------------------------------------------------------------
def block_size(num_channels: int, itemsize: int, crop: int, chunk) -> int:
    """Side of the blocks of crop centres handled at once: the window (block + crop) of raw and normalised
    channels plus one float channel fits in WINDOW_BYTES; rounded to the file's chunks."""
    per_pixel = num_channels * (itemsize + 2) + 4
    side = max(int((WINDOW_BYTES / per_pixel) ** 0.5) - crop, 64)
    step = max(min(chunk), 1)
    return max(side // step, 1) * step


def iter_windows(slide, channels, crop_x, crop_y, crop: int):
    """For each block of crop centres: (positions into crop_x/crop_y, window [c, h, w] raw and zero-padded,
    (top, left) of the window in slide pixels, valid (y0, y1, x0, x1) part of the window inside the slide)."""
    block = block_size(len(channels), slide.dtype.itemsize, crop, slide.chunk)
    half = crop // 2
    key = (crop_y // block) * (slide.width // block + 1) + crop_x // block
    order = np.argsort(key, kind="stable")
    starts = np.r_[0, np.nonzero(np.diff(key[order]))[0] + 1, len(order)]
    for begin, end in zip(starts[:-1], starts[1:]):
        members = order[begin:end]
        by, bx = crop_y[members[0]] // block, crop_x[members[0]] // block
        top, left = by * block - half, bx * block - half
        bottom = min((by + 1) * block, slide.height) - 1 - half + crop
        right = min((bx + 1) * block, slide.width) - 1 - half + crop
        y0, y1 = max(top, 0), min(bottom, slide.height)
        x0, x1 = max(left, 0), min(right, slide.width)
        window = np.zeros((len(channels), bottom - top, right - left), slide.dtype)
        window[:, y0 - top:y1 - top, x0 - left:x1 - left] = slide.read(channels, y0, y1, x0, x1)
        yield members, window, (top, left), (y0 - top, y1 - top, x0 - left, x1 - left)


def crop_bounds(cy, cx, origin, crop):
    """(row, col) of a crop's top-left corner inside its window."""
    return cy - crop // 2 - origin[0], cx - crop // 2 - origin[1]


def sample_for_percentiles(slides, channels, table, args) -> tuple:
    """[C, n] raw pixels from the crops of --norm_sample_cells random cells (seeded, over all slides), pixels past
    the slide border excluded; and the number of cells sampled."""
    rng = np.random.default_rng(args.seed)
    count = len(table["x"])
    chosen = np.sort(rng.choice(count, min(args.norm_sample_cells, count), replace=False))
    parts = []
    for i, slide in enumerate(slides):
        rows = chosen[table["slide_index"][chosen] == i]
        if rows.size == 0:
            continue
        cx, cy = table["crop_x"][rows], table["crop_y"][rows]
        for members, window, origin, (vy0, vy1, vx0, vx1) in iter_windows(slide, channels[i], cx, cy, args.crop_size):
            for m in members:
                top, left = crop_bounds(cy[m], cx[m], origin, args.crop_size)
                t, b = max(top, vy0), min(top + args.crop_size, vy1)
                l, r = max(left, vx0), min(left + args.crop_size, vx1)
                pixels = window[:, t:b, l:r].reshape(window.shape[0], -1)
                parts.append(sample_pixels(pixels, PIXELS_PER_SAMPLED_CELL, rng))
    return np.concatenate(parts, axis=1), len(chosen)


def build_recipe(args, slides, channels, names, table) -> dict:
    sources = [f for slide in slides for f in slide.source_files]
    if args.normalize == "none":
        return none_recipe(names, sources)
    sample, cells = sample_for_percentiles(slides, channels, table, args)
    return percentile_recipe(sample, args.clip_percentiles, names, sources, {"cells": cells, "seed": args.seed})


def write_crops(slides, channels, table, recipe, writer, crop: int):
    """Every cell's crop, normalised window by window, written at its index; returns the files written (tiff)."""
    files = np.full(len(table["x"]), "", dtype=object)
    started, done = time.time(), 0
    for i, slide in enumerate(slides):
        rows = np.nonzero(table["slide_index"] == i)[0]
        if rows.size == 0:
            print(f"{slide.name}: no cells")
            continue
        cx, cy = table["crop_x"][rows], table["crop_y"][rows]
        for members, window, origin, (vy0, vy1, vx0, vx1) in iter_windows(slide, channels[i], cx, cy, crop):
            normalized = np.zeros(window.shape, np.uint16)  # zero padding stays zero whatever the recipe
            normalized[:, vy0:vy1, vx0:vx1] = apply_recipe(window[:, vy0:vy1, vx0:vx1], recipe,
                                                           where=f"--image {slide.path}")
            for m in members:
                top, left = crop_bounds(cy[m], cx[m], origin, crop)
                index = int(rows[m])
                result = writer.write(index, normalized[:, top:top + crop, left:left + crop], table_row(table, index))
                if result:
                    files[index] = result
            done += len(members)
        print(f"{slide.name}: {len(rows)} crops ({done}/{len(table['x'])} in {time.time() - started:.1f} s)")
    return files


def table_row(table, index) -> dict:
    return {"slide": table["slide"][index], "cell_id": table["cell_id"][index], "label": table["label"][index] or None,
            "split": table["split"][index] or None}


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def dataset_info(args, slides, names, table, recipe, split) -> dict:
    labels = [label for label in table["label"] if label]
    count = len(table["x"])
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "layout": args.format,
        "created_by": "prepare_cells.py", "channel_names": names, "crop_size": args.crop_size, "dtype": "uint16",
        "shape": [count, len(names), args.crop_size, args.crop_size], "num_cells": count,
        "classes": sorted(set(labels)),
        "counts": {"cells": count, "per_slide": dict(Counter(table["slide"].tolist())),
                   "per_class": dict(sorted(Counter(labels).items())),
                   "per_split": dict(Counter(s for s in table["split"].tolist() if s))},
        "normalization": recipe, "split": split,
        "slides": [{"name": s.name, "image": str(s.path), "cells": str(c), "height": s.height, "width": s.width,
                    "dtype": str(s.dtype), "channels": names} for s, c in zip(slides, cells_per_slide(args, slides))],
        "files": {"crops": CELLS_NPY if args.format == "packed" else None, "table": CELLS_CSV},
    }


def cells_per_slide(args, slides):
    return args.cells if len(args.cells) == len(slides) else args.cells * len(slides)


def main(args) -> Path:
    started = time.time()
    check_args(args)
    output_dir = check_output_dir(args.output_dir, args.overwrite)  # before any reading: fail fast
    slides = open_slides(args)
    try:
        names, channels = output_channels(slides, args.channels)
        table = join_cells(collect_cells(args, slides), slides)
        split = assign_split(table, args.val_fraction, args.split_by, args.seed)
        recipe = build_recipe(args, slides, channels, names, table)
        with StagedOutput(output_dir, args.overwrite) as folder:
            count = len(table["x"])
            if args.format == "packed":
                writer = PackedWriter(folder, count, len(names), args.crop_size)
            else:
                writer = TiffWriter(folder, labelled=any(table["label"]))
            try:
                files = write_crops(slides, channels, table, recipe, writer, args.crop_size)
            finally:
                writer.close()
            columns = {key: table[key] for key in TABLE_COLUMNS}
            if args.format == "tiff":
                columns["file"] = files
            write_cell_table(folder / CELLS_CSV, columns)
            info = dataset_info(args, slides, names, table, recipe, split)
            write_dataset_info(folder / DATASET_JSON, info)  # last: its presence marks a complete dataset
    finally:
        close_all(slides)
    print(f"Wrote {output_dir}: {info['num_cells']} cells x {len(names)} channels ({', '.join(names)}) x "
          f"{args.crop_size}x{args.crop_size} px, {len(info['classes'])} classes, normalisation "
          f"{recipe['method']}; {time.time() - started:.1f} s")
    return output_dir


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    sys.exit(run_tool(main, args))
