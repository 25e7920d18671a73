"""Whole-slide multiplexed images, cell masks and cell tables, read window by window (prepare_cells.py).

Slides:
- a multi-channel TIFF / OME-TIFF, in whatever axis order the file declares (CYX planar or one page per channel,
  YXS interleaved, TCZYX with a plane chosen by --select); pyramidal files are read at level 0. Channel names come
  from the OME metadata (Channel Name), ImageJ labels, or default to channel_0, channel_1, ...
- a folder of single-channel TIFFs, one per marker: the marker name is the file stem (DAPI.tif -> DAPI);
- an OME-Zarr image (multiscales level 0; channel names from omero.channels[].label).
Every one is opened through tifffile's zarr interface or zarr itself and read by windows
(`SlideImage.read`): the slide is never loaded whole, so a slide larger than memory works. A window costs as
much as the file's chunks it touches (tiles; a file stored as one strip per page reads whole pages).

Cells: an instance label mask (`measure_mask`: centroid, area and bounding box of each label, measured block by
block; `anchor_centres`: the pixel a crop is centred on, inside its own label) or a CSV/TSV table
(`read_table_cells`: centroid columns detected or named, optional class, cell id and slide columns).

numpy, tifffile and zarr only: no torch, so that preparing a slide stays light.
"""
import csv
import math
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import tifffile

from util.errors import DataError

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
ZARR_MARKERS = (".zgroup", ".zattrs", "zarr.json")
CHANNEL_AXES = ("C", "S")  # the OME channel axis, then interleaved samples; a lone Q/I axis is channels too
GENERIC_CHANNEL_AXES = ("Q", "I")
MASK_BLOCK = 2048  # side of the mask blocks measured at a time (int64 coordinates of one block: ~64 MB at most)


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------
def file_stem(path) -> str:
    """'slide1.ome.tif' -> 'slide1', 'DAPI.tif' -> 'DAPI', 'brain.ome.zarr' -> 'brain'."""
    name = Path(path).name.rstrip("/")
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".zarr", *TIFF_SUFFIXES):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def default_channel_names(count: int) -> list:
    return [f"channel_{i}" for i in range(count)]


def parse_select(text) -> dict:
    """'T=0,Z=3' -> {'T': 0, 'Z': 3} (axis letters as tifffile / OME-Zarr name them, any case)."""
    if not text:
        return {}
    selected = {}
    for part in str(text).split(","):
        match = re.fullmatch(r"\s*([A-Za-z])\s*=\s*(\d+)\s*", part)
        if not match:
            raise DataError(f"--select {text!r}: expected AXIS=INDEX pairs such as T=0 or T=0,Z=2")
        selected[match.group(1).upper()] = int(match.group(2))
    return selected


# --------------------------------------------------------------------------------------------------
# One N-d array with named axes, read as [channels, y, x] windows
# --------------------------------------------------------------------------------------------------
class AxisArray:
    """A zarr array with axis letters (tifffile's or OME-Zarr's), reduced to channels x Y x X.

    Axes other than Y, X and the channel axis must have size 1 or be fixed by `select` ({'T': 0}).
    """

    def __init__(self, array, axes: str, select: dict, where: str):
        axes = axes.upper()
        shape = tuple(array.shape)
        if "Y" not in axes or "X" not in axes or len(axes) != len(shape):
            raise DataError(f"{where}: axes {axes!r} with shape {shape}; expected an image with Y and X axes")
        self.array, self.axes, self.where = array, axes, where
        self.channel_axis = self._find_channel_axis(axes, shape, select)
        self.fixed = {}
        for i, axis in enumerate(axes):
            if axis in "YX" or i == self.channel_axis:
                continue
            if axis in select:
                if not 0 <= select[axis] < shape[i]:
                    raise DataError(f"{where}: --select {axis}={select[axis]} is outside axis {axis} of size "
                                    f"{shape[i]}")
                self.fixed[i] = select[axis]
            elif shape[i] == 1:
                self.fixed[i] = 0
            else:
                raise DataError(f"{where}: axes {axes!r} with shape {shape} have axis {axis} of size {shape[i]} "
                                f"besides the channels; choose one plane with --select {axis}=0")
        unused = sorted(set(select) - set(axes))
        if unused:
            raise DataError(f"{where}: --select names axis {','.join(unused)}, which this image (axes {axes!r}) "
                            f"does not have")
        self.num_channels = 1 if self.channel_axis is None else shape[self.channel_axis]
        self.height, self.width = shape[axes.index("Y")], shape[axes.index("X")]
        chunks = getattr(array, "chunks", None) or shape
        self.chunk = (int(chunks[axes.index("Y")]), int(chunks[axes.index("X")]))
        self.dtype = np.dtype(array.dtype)

    @staticmethod
    def _find_channel_axis(axes: str, shape: tuple, select: dict):
        for axis in CHANNEL_AXES:
            if axis in axes and axis not in select:
                return axes.index(axis)
        generic = [i for i, axis in enumerate(axes) if axis in GENERIC_CHANNEL_AXES and axis not in select]
        return generic[0] if len(generic) == 1 else None

    def read(self, channels, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """[len(channels), y1 - y0, x1 - x0] in the stored dtype (the window must lie inside the image)."""
        index, kept = [], []
        for i, axis in enumerate(self.axes):
            if i == self.channel_axis:
                index.append(np.asarray(channels, dtype=np.intp))
                kept.append("C")
            elif axis == "Y":
                index.append(slice(y0, y1))
                kept.append("Y")
            elif axis == "X":
                index.append(slice(x0, x1))
                kept.append("X")
            else:
                index.append(self.fixed[i])
        try:
            window = self.array.oindex[tuple(index)]
        except Exception as exc:  # codec errors, truncated files, I/O errors
            raise DataError(f"{self.where}: cannot read pixels ({type(exc).__name__}: {exc})") from exc
        window = np.asarray(window)
        if self.channel_axis is None:
            return window.reshape(1, y1 - y0, x1 - x0)[np.zeros(len(channels), np.intp)]
        return np.transpose(window, [kept.index(a) for a in "CYX"])


# --------------------------------------------------------------------------------------------------
# Slides
# --------------------------------------------------------------------------------------------------
class SlideImage:
    """A slide opened for windowed reading: `channel_names`, `height`, `width`, `dtype`, `chunk` (the file's
    tile or strip size), `read(channels, y0, y1, x0, x1) -> [c, h, w]`. Use as a context manager or close()."""

    def __init__(self, name: str, path: Path, parts: list, channel_names: list, closers=()):
        self.name, self.path = name, Path(path)
        self.parts = parts  # [(AxisArray, its channel indices)]: one array, or one per marker file
        first = parts[0][0]
        self.height, self.width, self.dtype = first.height, first.width, first.dtype
        self.chunk = first.chunk
        self.channel_names = list(channel_names)
        self.source_files = [str(self.path)]
        self._closers = list(closers)
        self._channel_map = [(part, i) for part, count in parts for i in range(count)]

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def read(self, channels, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Channels (indices into channel_names) of the window rows y0:y1, columns x0:x1 -> [c, h, w]."""
        if len(self.parts) == 1:
            return self.parts[0][0].read(channels, y0, y1, x0, x1)
        out = np.empty((len(channels), y1 - y0, x1 - x0), self.dtype)
        for k, channel in enumerate(channels):
            part, index = self._channel_map[channel]
            out[k] = part.read([index], y0, y1, x0, x1)[0]
        return out

    def close(self):
        for close in self._closers:
            close()
        self._closers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_zarr_array(store, where: str):
    import zarr  # imported on use: only slide preparation needs it
    try:
        return zarr.open_array(store, mode="r")
    except Exception as exc:
        raise DataError(f"{where}: cannot open the image data ({type(exc).__name__}: {exc})") from exc


def open_slide(path, select=None, channel_names=None) -> SlideImage:
    """A multi-channel TIFF / OME-TIFF, a folder of per-marker TIFFs, or an OME-Zarr image, for windowed reading.

    select: {'T': 0, ...} for axes besides channels, Y and X. channel_names: names for the channels in file
    order (replacing what the file says; their count must match). DataError for anything unreadable.
    """
    path = Path(path).expanduser()
    select = dict(select or {})
    if not path.exists():
        raise DataError(f"--image {path}: no such file or folder")
    if path.is_dir():
        if any((path / marker).exists() for marker in ZARR_MARKERS):
            slide = open_ome_zarr(path, select)
        else:
            slide = open_marker_folder(path, select)
    else:
        slide = open_tiff(path, select)
    if channel_names is not None:
        if len(channel_names) != slide.num_channels:
            slide.close()
            raise DataError(f"--channel_names gives {len(channel_names)} name(s) but {path} has "
                            f"{slide.num_channels} channel(s) ({slide.channel_names})")
        slide.channel_names = list(channel_names)
    check_unique_names(slide.channel_names, path)
    return slide


def check_unique_names(names, where):
    folded = [str(n).casefold() for n in names]
    duplicates = sorted({n for n in names if folded.count(str(n).casefold()) > 1})
    if duplicates:
        raise DataError(f"{where}: channel name(s) {duplicates} occur more than once (names are matched ignoring "
                        f"case); rename them with --channel_names")


def open_tiff(path: Path, select: dict) -> SlideImage:
    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise DataError(f"--image {path}: cannot read TIFF file ({type(exc).__name__}: {exc})") from exc
    try:
        series = tif.series[0]
        array = open_zarr_array(series.aszarr(level=0), f"--image {path}")  # level 0 of a pyramid: full resolution
        axis_array = AxisArray(array, series.axes, select, f"--image {path}")
        names = tiff_channel_names(tif, axis_array.num_channels) or default_channel_names(axis_array.num_channels)
    except DataError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise DataError(f"--image {path}: cannot read TIFF file ({type(exc).__name__}: {exc})") from exc
    return SlideImage(file_stem(path), path, [(axis_array, axis_array.num_channels)], names, closers=[tif.close])


def tiff_channel_names(tif, count: int):
    """Channel names of series 0 from OME-XML (Channel Name) or ImageJ (Labels); None when the file has none."""
    if tif.is_ome and tif.ome_metadata:
        names = ome_xml_channel_names(tif.ome_metadata)
        if names and len(names) == count:
            return names
    if tif.is_imagej and tif.imagej_metadata:
        labels = tif.imagej_metadata.get("Labels")
        if isinstance(labels, (list, tuple)) and len(labels) == count and all(labels):
            return [str(label) for label in labels]
    return None


def ome_xml_channel_names(xml: str):
    """Names of the first Image's channels in OME-XML (any schema version), or None if any is missing."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    for image in root.iter():
        if image.tag.rsplit("}", 1)[-1] != "Image":
            continue
        channels = [el for el in image.iter() if el.tag.rsplit("}", 1)[-1] == "Channel"]
        names = [el.get("Name") for el in channels]
        return names if names and all(names) else None
    return None


def open_marker_folder(folder: Path, select: dict) -> SlideImage:
    """One single-channel TIFF per marker; the marker name is the file stem; all must share height and width."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name.lower().endswith(TIFF_SUFFIXES))
    if not files:
        raise DataError(f"--image {folder}: folder holds no TIFF files (expected one single-channel TIFF per marker, "
                        f"or an OME-Zarr image)")
    parts, closers = [], []
    try:
        for path in files:
            slide = open_tiff(path, select)
            closers.extend(slide._closers)
            part = slide.parts[0][0]
            if part.num_channels != 1:
                raise DataError(f"--image {folder}: {path.name} has {part.num_channels} channels; a marker folder "
                                f"holds one single-channel TIFF per marker")
            if parts and (part.height, part.width) != (parts[0][0].height, parts[0][0].width):
                raise DataError(f"--image {folder}: {path.name} is {part.height}x{part.width} pixels but "
                                f"{files[0].name} is {parts[0][0].height}x{parts[0][0].width}")
            parts.append((part, 1))
    except DataError:
        for close in closers:
            close()
        raise
    slide = SlideImage(file_stem(folder), folder, parts, [file_stem(p) for p in files], closers=closers)
    slide.source_files = [str(p) for p in files]
    return slide


def open_ome_zarr(path: Path, select: dict) -> SlideImage:
    """Level 0 of an OME-Zarr image (v0.4 attributes, or v0.5 under 'ome'); channel names from omero."""
    import zarr
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        attrs = attrs.get("ome", attrs)
        multiscale = attrs["multiscales"][0]
        array = group[multiscale["datasets"][0]["path"]]
    except Exception as exc:
        raise DataError(f"--image {path}: not a readable OME-Zarr image (expected multiscales metadata; "
                        f"{type(exc).__name__}: {exc})") from exc
    axes_meta = multiscale.get("axes") or list("tczyx"[-len(array.shape):])
    axes = "".join((a["name"] if isinstance(a, dict) else str(a))[0] for a in axes_meta)
    axis_array = AxisArray(array, axes, select, f"--image {path}")
    channels = (attrs.get("omero") or {}).get("channels") or []
    names = [c.get("label") for c in channels if isinstance(c, dict)]
    if len(names) != axis_array.num_channels or not all(names):
        names = default_channel_names(axis_array.num_channels)
    return SlideImage(file_stem(path), path, [(axis_array, axis_array.num_channels)], [str(n) for n in names])


def resolve_channels(slide: SlideImage, wanted) -> list:
    """Indices of the `wanted` channel names in `slide` (case-insensitive), in the order given; all when None."""
    if not wanted:
        return list(range(slide.num_channels))
    folded = [str(n).casefold() for n in slide.channel_names]
    indices = []
    for name in wanted:
        if name.casefold() not in folded:
            raise DataError(f"--channels: {name!r} is not a channel of {slide.path}; available: "
                            f"{', '.join(slide.channel_names)}")
        indices.append(folded.index(name.casefold()))
    return indices


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------
def open_mask(path, select=None, mask_channel=None) -> tuple:
    """(SlideImage, channel index) of an instance label mask; a multi-channel file needs --mask_channel NAME."""
    mask = open_slide(path, select)
    if mask_channel is None:
        if mask.num_channels != 1:
            mask.close()
            raise DataError(f"--cells {path}: the mask has {mask.num_channels} channels ({mask.channel_names}); "
                            f"choose the label channel with --mask_channel")
        return mask, 0
    try:
        (channel,) = resolve_channels(mask, [mask_channel])
    except DataError as exc:
        mask.close()
        raise DataError(str(exc).replace("--channels", "--mask_channel")) from exc
    return mask, channel


def check_label_dtype(mask: SlideImage):
    if mask.dtype.kind not in "iu":
        raise DataError(f"--cells {mask.path}: mask pixels are {mask.dtype}; expected an instance label mask of "
                        f"integers (0 = background, one positive id per cell)")


def blocks(height: int, width: int, block: int, chunk=(1, 1)):
    """(y0, y1, x0, x1) tiles covering the image, `block` rounded up to whole chunks of the file."""
    step_y = max(block // chunk[0], 1) * chunk[0]
    step_x = max(block // chunk[1], 1) * chunk[1]
    for y0 in range(0, height, step_y):
        for x0 in range(0, width, step_x):
            yield y0, min(y0 + step_y, height), x0, min(x0 + step_x, width)


def measure_mask(mask: SlideImage, channel: int, block: int = MASK_BLOCK) -> dict:
    """Per label of an instance mask, measured block by block: {'label', 'area', 'y', 'x' (centroid, pixel
    centres), 'y_min', 'y_max', 'x_min', 'x_max'}, arrays sorted by label. DataError for a non-integer, negative
    or empty mask."""
    check_label_dtype(mask)
    parts = []
    for y0, y1, x0, x1 in blocks(mask.height, mask.width, block, mask.chunk):
        labels = mask.read([channel], y0, y1, x0, x1)[0]
        rows, cols = np.nonzero(labels)
        if rows.size == 0:
            continue
        values = labels[rows, cols].astype(np.int64)
        if values.min() < 0:
            raise DataError(f"--cells {mask.path}: mask holds negative values ({values.min()}); expected instance "
                            f"labels (0 = background, positive ids)")
        parts.append(label_stats(values, rows + y0, cols + x0))
    if not parts:
        raise DataError(f"--cells {mask.path}: the mask is empty (no pixel above 0); expected one positive id per cell")
    return merge_label_stats(parts)


def label_stats(values, rows, cols) -> dict:
    """Per-label sums, counts and bounds of one block's labelled pixels."""
    keys, inverse = np.unique(values, return_inverse=True)
    n = len(keys)
    y_min = np.full(n, np.iinfo(np.int64).max)
    x_min = y_min.copy()
    y_max = np.full(n, -1, np.int64)
    x_max = y_max.copy()
    np.minimum.at(y_min, inverse, rows)
    np.minimum.at(x_min, inverse, cols)
    np.maximum.at(y_max, inverse, rows)
    np.maximum.at(x_max, inverse, cols)
    return {"label": keys, "area": np.bincount(inverse, minlength=n).astype(np.int64),
            "sum_y": np.bincount(inverse, weights=rows, minlength=n), "sum_x": np.bincount(inverse, weights=cols,
                                                                                          minlength=n),
            "y_min": y_min, "y_max": y_max, "x_min": x_min, "x_max": x_max}


def merge_label_stats(parts) -> dict:
    """Combine per-block stats of the same labels; centroids = sums / areas."""
    joined = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    keys, inverse = np.unique(joined["label"], return_inverse=True)
    n = len(keys)
    area = np.bincount(inverse, weights=joined["area"], minlength=n)
    out = {"label": keys, "area": area.astype(np.int64),
           "y": np.bincount(inverse, weights=joined["sum_y"], minlength=n) / area,
           "x": np.bincount(inverse, weights=joined["sum_x"], minlength=n) / area}
    for key, reduce, start in (("y_min", np.minimum, np.iinfo(np.int64).max), ("x_min", np.minimum,
                                                                              np.iinfo(np.int64).max),
                               ("y_max", np.maximum, -1), ("x_max", np.maximum, -1)):
        values = np.full(n, start, np.int64)
        reduce.at(values, inverse, joined[key])
        out[key] = values
    return out


def round_half_up(values) -> np.ndarray:
    return np.floor(np.asarray(values, np.float64) + 0.5).astype(np.int64)


def anchor_centres(mask: SlideImage, channel: int, stats: dict, block: int = MASK_BLOCK) -> tuple:
    """(row, col) crop centres: the rounded centroid when that pixel belongs to the cell, otherwise (concave or
    split cells) the cell's pixel nearest to its centroid. Reads the mask block by block again."""
    cy, cx = round_half_up(stats["y"]), round_half_up(stats["x"])
    outside = []
    for y0, y1, x0, x1 in blocks(mask.height, mask.width, block, mask.chunk):
        inside = np.nonzero((cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1))[0]
        if inside.size == 0:
            continue
        labels = mask.read([channel], y0, y1, x0, x1)[0]
        hit = labels[cy[inside] - y0, cx[inside] - x0] == stats["label"][inside]
        outside.extend(inside[~hit].tolist())
    for i in outside:  # few cells: read each one's bounding box
        y0, y1 = int(stats["y_min"][i]), int(stats["y_max"][i]) + 1
        x0, x1 = int(stats["x_min"][i]), int(stats["x_max"][i]) + 1
        rows, cols = np.nonzero(mask.read([channel], y0, y1, x0, x1)[0] == stats["label"][i])
        nearest = np.argmin((rows + y0 - stats["y"][i]) ** 2 + (cols + x0 - stats["x"][i]) ** 2)
        cy[i], cx[i] = rows[nearest] + y0, cols[nearest] + x0
    return cy, cx


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------
X_COLUMNS = ("x", "centroid_x", "x_centroid", "cx", "center_x", "centre_x", "pos_x", "position_x", "centroid-1")
Y_COLUMNS = ("y", "centroid_y", "y_centroid", "cy", "center_y", "centre_y", "pos_y", "position_y", "centroid-0")
LABEL_COLUMNS = ("label", "class", "class_name", "classification", "cell_type", "celltype", "type")
ID_COLUMNS = ("cell_id", "cellid", "id", "object_id", "objectid", "cell")
SLIDE_COLUMNS = ("slide", "slide_id", "slide_name", "image", "image_name", "sample", "file", "filename")
MISSING_VALUES = ("", "na", "nan", "none", "null")


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


def find_column(header, given, candidates, path, flag, required):
    """The header entry named by `flag` (given), or the first candidate present (case-insensitive)."""
    keys = [_key(h) for h in header]
    if given is not None:
        if str(given).lower() == "none":
            return None
        if _key(given) not in keys:
            raise DataError(f"{flag} {given!r}: no such column in {path}; columns: {', '.join(header)}")
        return header[keys.index(_key(given))]
    for candidate in candidates:
        if candidate in keys:
            return header[keys.index(candidate)]
    if required:
        raise DataError(f"--cells {path}: no {flag[2]} coordinate column; columns: {', '.join(header)}; expected one "
                        f"of {', '.join(candidates)} (or name it with {flag})")
    return None


def table_delimiter(path: Path, first_line: str) -> str:
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    counts = {d: first_line.count(d) for d in (",", "\t", ";")}
    return max(counts, key=counts.get) if max(counts.values()) else ","


def read_table_cells(path, x_col=None, y_col=None, label_col=None, id_col=None, slide_col=None) -> tuple:
    """(cells, columns) of a CSV/TSV cell table. cells: column lists 'line' (the file's line number), 'x', 'y'
    (floats: pixel positions in the full-resolution image, x = column, y = row), 'label', 'cell_id', 'slide'
    (str or None). columns: the header names used for 'x', 'y', 'label', 'id', 'slide' (None when absent)."""
    path = Path(path).expanduser()
    cells = {"line": [], "x": [], "y": [], "label": [], "cell_id": [], "slide": []}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = f.readline()
            f.seek(0)
            reader = csv.reader(f, delimiter=table_delimiter(path, first))
            header = [h.strip() for h in next(reader, None) or []]
            if not header:
                raise DataError(f"--cells {path}: the table is empty; expected a header line and one line per cell")
            columns = {"x": find_column(header, x_col, X_COLUMNS, path, "--x_col", True),
                       "y": find_column(header, y_col, Y_COLUMNS, path, "--y_col", True),
                       "label": find_column(header, label_col, LABEL_COLUMNS, path, "--label_col", False),
                       "id": find_column(header, id_col, ID_COLUMNS, path, "--id_col", False),
                       "slide": find_column(header, slide_col, SLIDE_COLUMNS, path, "--slide_col", False)}
            position = {key: header.index(name) for key, name in columns.items() if name is not None}
            for line, row in enumerate(reader, start=2):
                if not any(value.strip() for value in row):
                    continue  # blank line
                row = row + [""] * (len(header) - len(row))
                cells["line"].append(line)
                cells["x"].append(_number(row[position["x"]], path, line, columns["x"]))
                cells["y"].append(_number(row[position["y"]], path, line, columns["y"]))
                for key, column in (("label", "label"), ("cell_id", "id"), ("slide", "slide")):
                    cells[key].append(_optional(row[position[column]]) if column in position else None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"--cells {path}: cannot read the cell table ({type(exc).__name__}: {exc})") from exc
    if not cells["line"]:
        raise DataError(f"--cells {path}: the table has a header but no cells")
    return cells, columns


def _optional(value: str):
    value = value.strip()
    return None if value.lower() in MISSING_VALUES else value


def _number(value: str, path, line: int, column: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise DataError(f"--cells {path}: line {line}, column {column!r}: {value!r} is not a finite number")
    return number
