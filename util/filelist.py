"""Image folders as numpy file lists, cached beside the run's output, and a header check of every file.

A `FileList` holds the relative paths of a folder's images as one uint8 byte buffer with int64 offsets, the
labels as int32 and the class names: a DataLoader worker that reads it touches no Python object per file, so
its copy-on-write pages stay shared (a Python list of (path, label) tuples is copied into every worker as it
is read: about 400 MB per worker for 2 M files).

    files = list_folder(folder, classes=None, cache_dir=None)   # FileList; classes=None: a flat folder
    files, headers, bad = check_files(files, in_chans, min_side, rgb=False, skip_bad=False)
    files[i] -> (Path, label); len(files); files.path(i); files.select(indices); FileList.from_samples(...)
    scan_headers(files) -> Headers (channels, height, width, dtype, layout, problem of every file)

The cache (`cache_dir/<folder name>-<hash>.npz`, written atomically; the scripts use <output_dir>/data_index)
holds the listing, the modification time of every directory listed, and, once `check_files` has run, every
file's header. It is reused while those directories keep their modification times (adding, removing or
renaming a file changes its directory's); otherwise it is rebuilt. A file rewritten in place under the same
name changes no directory: its header is not re-read, and if it has gone bad it names itself when training
reads it, as any file that fails then does.

The header scan reads no pixels: TIFF series metadata (tifffile) and PIL.Image.open without load, plus the
end of each file (a JPEG's end-of-image marker, a PNG's IEND chunk, a TIFF's last strip); only a file that
does not end as it should is decoded, to tell a truncated file from one with trailing bytes. It runs in a
process pool in chunks, so 1.28 M ImageNet headers take minutes once, and nothing on a restart.
"""
import hashlib
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from util.errors import DataError
from util.io import (IMAGE_EXTENSIONS, TIFF_EXTENSIONS, check_pixel_type, check_shape, pil_channels_and_dtype,
                     read_pil_chw, tiff_axis_order)
from util.output import atomic_file

INDEX_FORMAT = 1  # bump when the npz layout changes: older index files are then rebuilt
FLAT = "<flat>"  # the class list of a flat folder in the index (its single label is 0)
BAD_FILES_SHOWN = 10  # bad files listed in the error and in the --skip_bad_files warning
SCAN_CHUNK = 256  # files per task of the header scan's process pool
JPEG_END, PNG_END = b"\xff\xd9", b"IEND\xaeB`\x82"
LISTING_KEYS = {"format", "root", "classes", "path_bytes", "offsets", "labels", "dirs", "dir_mtime_ns"}
RGB_TIFF_DTYPE = "uint8"  # what PIL's convert('RGB') reads correctly from a TIFF (--recipe imagenet)


# --------------------------------------------------------------------------------------------------
# The file list
# --------------------------------------------------------------------------------------------------
def as_indices(indices) -> np.ndarray:
    """int64 indices from an int sequence or a bool mask."""
    indices = np.asarray(indices)
    return np.flatnonzero(indices) if indices.dtype == bool else indices.astype(np.int64).reshape(-1)


@dataclass(eq=False)
class FileList:
    """Image files as numpy arrays: file i is root / path_bytes[offsets[i]:offsets[i + 1]] with labels[i].

    root: the folder the paths are relative to ('' when they are complete paths, see from_samples);
    path_bytes: uint8 [total bytes] (os.fsencode of each relative path); offsets: int64 [N + 1];
    labels: int32 [N]; classes: the class names (labels index them); index_path: the cache file this
    listing was read from or written to (None when uncached or after select).
    """
    root: str
    path_bytes: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    classes: list
    index_path: Path = None

    def __len__(self) -> int:
        return len(self.labels)

    def relpath(self, index: int) -> str:
        return os.fsdecode(self.path_bytes[self.offsets[index]:self.offsets[index + 1]].tobytes())

    def path(self, index: int) -> Path:
        return Path(self.root, self.relpath(index)) if self.root else Path(self.relpath(index))

    def __getitem__(self, index: int):
        """(path, label) of file `index`, as the (path, label) samples of a torchvision ImageFolder."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"file index {index} out of range for {len(self)} files")
        index %= len(self)
        return self.path(index), int(self.labels[index])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def select(self, indices) -> "FileList":
        """The files at `indices` (an increasing int array, or a bool mask), in their order here; uncached."""
        indices = as_indices(indices)
        starts, ends = self.offsets[indices], self.offsets[indices + 1]
        # copy runs of consecutive files at once: leaving a few bad files out of millions is a few slices
        breaks = np.flatnonzero(np.diff(indices) != 1) + 1
        runs = zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(indices)]])) if len(indices) else []
        chunks = [self.path_bytes[starts[a]:ends[b - 1]] for a, b in runs]
        path_bytes = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
        offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        return FileList(self.root, path_bytes, offsets, self.labels[indices].copy(), list(self.classes))

    @classmethod
    def from_samples(cls, samples, classes=()) -> "FileList":
        """A FileList of complete paths from [(path, label)] (a torchvision-style samples list)."""
        samples = list(samples)
        return cls.from_paths("", [str(path) for path, _ in samples], [label for _, label in samples], classes)

    @classmethod
    def from_paths(cls, root, relpaths, labels, classes) -> "FileList":
        encoded = [os.fsencode(p) for p in relpaths]
        offsets = np.concatenate([[0], np.cumsum(np.array([len(p) for p in encoded], np.int64))]).astype(np.int64)
        path_bytes = np.frombuffer(b"".join(encoded), np.uint8).copy()
        return cls(str(root), path_bytes, offsets, np.asarray(labels, np.int32).reshape(-1), list(classes))


# --------------------------------------------------------------------------------------------------
# Listing a folder
# --------------------------------------------------------------------------------------------------
def is_image_name(name: str) -> bool:
    """An accepted extension (any case), and not a hidden file such as macOS '._x.tif' metadata."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class _Walk:
    """Depth-first listing in path order (entries sorted by name, as sorted(Path) orders them), links
    followed (a link back to a folder above is not followed again), hidden entries skipped; records every
    directory read with its modification time."""

    def __init__(self, root: Path):
        self.root = root
        self.relpaths, self.dirs, self.mtimes = [], [], []

    def stamp(self, rel: str):
        """Record directory `rel`'s modification time, taken before it is read (a later change shows)."""
        stat = os.stat(self.root / rel if rel else self.root)
        self.dirs.append(rel)
        self.mtimes.append(stat.st_mtime_ns)
        return stat.st_dev, stat.st_ino

    def directory(self, rel: str, recursive: bool, ancestors=frozenset()):
        """Append the image files of directory `rel` (and of its sub-directories when `recursive`)."""
        identity = self.stamp(rel)
        if identity in ancestors:  # a link loop
            return
        with os.scandir(self.root / rel if rel else self.root) as entries:
            entries = sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_file() and is_image_name(entry.name):  # is_file/is_dir follow links
                self.relpaths.append(child)
            elif recursive and entry.is_dir():
                self.directory(child, True, ancestors | {identity})


def class_folder_names(folder: Path) -> list:
    """Sorted names of the non-hidden sub-folders of `folder` (the ImageFolder classes)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def image_relpaths(folder: Path, recursive: bool) -> list:
    """The image files of `folder` (and of its sub-folders when `recursive`) as paths relative to it, in the
    walk's order (that of sorted(Path))."""
    walk = _Walk(Path(folder))
    walk.directory("", recursive)
    return walk.relpaths


def _walk_folder(folder: Path, classes):
    """(relpaths, labels, walk) of a flat folder (classes None) or of <folder>/<class>/** (class folders
    must be among `classes` and hold images)."""
    walk = _Walk(folder)
    if classes is None:
        walk.directory("", recursive=False)
        return walk.relpaths, [0] * len(walk.relpaths), walk
    walk.stamp("")  # the top folder's mtime: a class folder added or removed
    labels = []
    for name in class_folder_names(folder):
        if name not in classes:
            raise DataError(f"{folder / name}: class folder {name!r} is not one of the training classes {classes}")
        before = len(walk.relpaths)
        walk.directory(name, recursive=True)
        if len(walk.relpaths) == before:
            raise DataError(f"{folder / name}: class folder holds no images; expected files ending in "
                            f"{', '.join(IMAGE_EXTENSIONS)}")
        labels += [classes.index(name)] * (len(walk.relpaths) - before)
    return walk.relpaths, labels, walk


def list_folder(folder, classes=None, cache_dir=None) -> FileList:
    """The image files of `folder`: directly in it (classes None; label 0, classes ['unlabelled']) or in
    ImageFolder layout <folder>/<class>/** (labels index `classes`; a class folder not in `classes`, or one
    without images, is a DataError). Sorted as sorted(Path) sorts them. With `cache_dir`, the listing is read
    from, or written to, its index file there (see the module docstring)."""
    folder = Path(folder).expanduser()  # the paths start with it as given; the index is keyed by where it is
    classes = None if classes is None else list(classes)
    index_path = _index_path(cache_dir, folder.resolve(), classes) if cache_dir else None
    if index_path is not None:
        cached = _load_listing(index_path, folder, classes)
        if cached is not None:
            return cached
    relpaths, labels, walk = _walk_folder(folder, classes)
    files = FileList.from_paths(folder, relpaths, labels, ["unlabelled"] if classes is None else classes)
    if index_path is not None:
        files.index_path = index_path
        _save_index(index_path, _listing_arrays(files, folder.resolve(), classes, walk.dirs, walk.mtimes))
    return files


# --------------------------------------------------------------------------------------------------
# The index file
# --------------------------------------------------------------------------------------------------
def _index_path(cache_dir, folder: Path, classes) -> Path:
    """<cache_dir>/<folder name>-<12 hex digits of the folder and its class list>.npz"""
    key = "\0".join([str(folder)] + ([FLAT] if classes is None else classes))
    digest = hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in folder.name) or "root"
    return Path(cache_dir) / f"{name}-{digest}.npz"


def _listing_arrays(files: FileList, resolved_root: Path, classes, dirs, mtimes) -> dict:
    return dict(format=np.int64(INDEX_FORMAT), root=np.str_(resolved_root),
                classes=np.array([FLAT] if classes is None else classes, dtype=str),
                path_bytes=files.path_bytes, offsets=files.offsets, labels=files.labels,
                dirs=np.array(dirs, dtype=str), dir_mtime_ns=np.asarray(mtimes, np.int64))


def _read_index(index_path: Path):
    """The index file's arrays (a dict), or None when it is missing or unreadable (then it is rebuilt)."""
    if not index_path.is_file():
        return None
    try:
        with np.load(index_path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as exc:  # a foreign or damaged file is only a cache miss
        print(f"file index {index_path} is unreadable ({type(exc).__name__}: {exc}); rebuilding it")
        return None
    return arrays if LISTING_KEYS <= arrays.keys() else None


def _directories_unchanged(folder: Path, dirs, mtimes) -> bool:
    for rel, mtime in zip(dirs, mtimes):
        try:
            if os.stat(folder / rel if rel else folder).st_mtime_ns != mtime:
                return False
        except OSError:  # removed or unreadable: list again
            return False
    return True


def _load_listing(index_path: Path, folder: Path, classes):
    arrays = _read_index(index_path)
    if arrays is None:
        return None
    same_kind = (int(arrays["format"]) == INDEX_FORMAT and str(arrays["root"]) == str(folder.resolve())
                 and list(arrays["classes"]) == ([FLAT] if classes is None else classes))
    if not same_kind or not _directories_unchanged(folder, list(arrays["dirs"]), arrays["dir_mtime_ns"]):
        print(f"file index {index_path}: the folder {folder} changed since it was written; listing it again")
        return None
    files = FileList(str(folder), arrays["path_bytes"], arrays["offsets"], arrays["labels"],
                     ["unlabelled"] if classes is None else classes, index_path)
    print(f"file index {index_path}: {len(files)} files of {folder}, unchanged since it was written")
    return files


def _save_index(index_path: Path, arrays: dict) -> None:
    """np.savez to a temporary name beside `index_path`, then rename: readers see the old or the new file.
    A cache that cannot be written is a warning, not an error: the run works without it."""
    try:
        with atomic_file(index_path) as f:
            np.savez(f, **arrays)
    except OSError as exc:
        print(f"warning: cannot write the file index {index_path} ({exc}); the folder is listed again next time")


# --------------------------------------------------------------------------------------------------
# Header scan
# --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Headers:
    """What every file's header says, aligned with its FileList.

    channels, height, width: int32 [N] as util.io would read the file ([C, H, W]; -1 when the header is
    unreadable); dtype, layout: int16 [N] codes into dtype_names / layout_names (layout: the format and its
    axes or mode, e.g. 'TIFF YXS', 'JPEG RGB', 'JPEG CMYK', 'PNG I;16'); problems: {index: message naming the
    file} for files that cannot be read (unreadable header, unsupported pixel type, truncated data).
    """
    channels: np.ndarray
    height: np.ndarray
    width: np.ndarray
    dtype: np.ndarray
    layout: np.ndarray
    dtype_names: list
    layout_names: list
    problems: dict

    def select(self, indices) -> "Headers":
        """The headers at `indices` (as FileList.select)."""
        indices = as_indices(indices)
        positions = np.searchsorted(indices, list(self.problems)) if self.problems else []
        problems = {int(at): text for at, (i, text) in zip(positions, self.problems.items())
                    if at < len(indices) and indices[at] == i}
        return Headers(self.channels[indices], self.height[indices], self.width[indices], self.dtype[indices],
                       self.layout[indices], list(self.dtype_names), list(self.layout_names), problems)

    def layout_of(self, index: int) -> str:
        return self.layout_names[self.layout[index]]


def read_header(path) -> tuple:
    """(channels, height, width, dtype name, layout, problem) of one image file, reading no pixels (see the
    module docstring); problem is '' or a message that names the file, as util.io's readers would raise it."""
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_EXTENSIONS:
            return _tiff_header(path) + ("",)
        return _pil_header(path) + ("",)
    except DataError as exc:
        return -1, -1, -1, "", "", str(exc)


def _tiff_header(path: Path) -> tuple:
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes, dtype = tuple(series.shape), series.axes, np.dtype(series.dtype)
            data_end = max((int(o) + int(n) for page in series.pages if page is not None
                            for o, n in zip(page.dataoffsets, page.databytecounts)), default=0)
    except Exception as exc:  # tifffile raises many types (TiffFileError, ValueError, struct.error, ...)
        raise DataError(f"{path}: cannot read TIFF file ({type(exc).__name__}: {exc})") from exc
    order = tiff_axis_order(shape, axes, path)
    check_pixel_type(dtype, path)
    size = os.path.getsize(path)
    if data_end > size:
        raise DataError(f"{path}: cannot read TIFF file (truncated: its pixel data would end at byte {data_end} "
                        f"of a {size}-byte file)")
    channels = shape[order[0]] if len(order) == 3 else 1
    return channels, shape[order[-2]], shape[order[-1]], dtype.name, f"TIFF {axes}"


def _pil_header(path: Path) -> tuple:
    try:
        with Image.open(path) as image:  # reads the header only
            image_format, mode, (width, height) = image.format, image.mode, image.size
    except Exception as exc:
        raise DataError(f"{path}: cannot read image file ({type(exc).__name__}: {exc})") from exc
    if not _ends_cleanly(path, image_format):
        read_pil_chw(path)  # trailing bytes or a truncated file: decoding tells (DataError naming the file)
    channels, dtype = pil_channels_and_dtype(mode)
    return channels, height, width, dtype, f"{image_format} {mode}"


def _ends_cleanly(path: Path, image_format: str) -> bool:
    """Whether a JPEG ends with its end-of-image marker and a PNG with its IEND chunk (other formats: True)."""
    end = {"JPEG": JPEG_END, "PNG": PNG_END}.get(image_format)
    if end is None:
        return True
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(f.tell() - len(end), 0))
        return f.read() == end


def _scan_chunk(task) -> list:
    root, relpaths = task
    return [read_header(Path(root, rel) if root else Path(rel)) for rel in relpaths]


def _pool_context():
    # fork: the workers need nothing but this module, which the parent has imported (spawn would re-import
    # torch in each); the parent has not started CUDA work when the datasets are built
    return get_context("fork") if "fork" in get_all_start_methods() else get_context()


def default_scan_workers() -> int:
    """Processes for the header scan: the cores this process may use, shared among the ranks of the node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(32, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))


def scan_headers(files: FileList, workers=None, chunk_size: int = SCAN_CHUNK) -> Headers:
    """Every file's header (read_header), in a process pool of `workers` (default: default_scan_workers())
    for more than two chunks of files; read from, and added to, the listing's index file when it has one."""
    cached = _load_headers(files)
    if cached is not None:
        return cached
    relpaths = [files.relpath(i) for i in range(len(files))]
    tasks = [(files.root, relpaths[i:i + chunk_size]) for i in range(0, len(relpaths), chunk_size)]
    workers = default_scan_workers() if workers is None else workers
    begin = time.time()
    if workers > 1 and len(tasks) > 2:
        print(f"reading the headers of {len(files)} files with {workers} processes")
        with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
            rows = [row for chunk in pool.map(_scan_chunk, tasks) for row in chunk]
    else:
        rows = [row for task in tasks for row in _scan_chunk(task)]
    headers = _headers_from_rows(rows)
    if len(files) >= 10000:
        print(f"read {len(files)} headers in {time.time() - begin:.0f} s")
    if files.index_path is not None:
        arrays = _read_index(files.index_path)
        if arrays is not None and _same_listing(arrays, files):
            _save_index(files.index_path, {**arrays, **_header_arrays(headers)})
    return headers


def _headers_from_rows(rows) -> Headers:
    dtype_names, layout_names = [], []

    def code(names, name):
        if name not in names:
            names.append(name)
        return names.index(name)

    channels, height, width, dtype, layout, problems = [], [], [], [], [], {}
    for i, (c, h, w, dt, lay, problem) in enumerate(rows):
        channels.append(c), height.append(h), width.append(w)
        dtype.append(code(dtype_names, dt)), layout.append(code(layout_names, lay))
        if problem:
            problems[i] = problem
    as32 = lambda values: np.asarray(values, np.int32)  # noqa: E731
    return Headers(as32(channels), as32(height), as32(width), np.asarray(dtype, np.int16),
                   np.asarray(layout, np.int16), dtype_names, layout_names, problems)


def _header_arrays(headers: Headers) -> dict:
    index = np.array(sorted(headers.problems), np.int64)
    return dict(h_channels=headers.channels, h_height=headers.height, h_width=headers.width,
                h_dtype=headers.dtype, h_layout=headers.layout,
                h_dtype_names=np.array(headers.dtype_names, dtype=str),
                h_layout_names=np.array(headers.layout_names, dtype=str),
                h_problem_index=index, h_problem_text=np.array([headers.problems[i] for i in index], dtype=str))


def _same_listing(arrays: dict, files: FileList) -> bool:
    """Whether the index file still holds `files`' listing (another process may have rewritten it since)."""
    return (str(arrays["root"]) == str(Path(files.root).resolve())
            and np.array_equal(arrays["offsets"], files.offsets)
            and np.array_equal(arrays["path_bytes"], files.path_bytes))


def _load_headers(files: FileList):
    if files.index_path is None:
        return None
    arrays = _read_index(files.index_path)
    if arrays is None or "h_channels" not in arrays or not _same_listing(arrays, files):
        return None
    problems = {int(i): str(t) for i, t in zip(arrays["h_problem_index"], arrays["h_problem_text"])}
    return Headers(arrays["h_channels"], arrays["h_height"], arrays["h_width"], arrays["h_dtype"],
                   arrays["h_layout"], [str(n) for n in arrays["h_dtype_names"]],
                   [str(n) for n in arrays["h_layout_names"]], problems)


# --------------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------------
def _bad_mask(headers: Headers, in_chans: int, min_side: int, rgb: bool) -> np.ndarray:
    """bool [N]: unreadable, wrong channel count, or smaller than min_side (vectorised: millions of files)."""
    channels = headers.channels
    if rgb:  # PIL converts any mode to RGB; a TIFF must be what convert('RGB') reads correctly
        tiff = np.array([name.startswith("TIFF") for name in headers.layout_names] or [False])[headers.layout]
        rgb_tiff = np.isin(channels, (1, 3)) & np.isin(
            headers.dtype, [i for i, n in enumerate(headers.dtype_names) if n == RGB_TIFF_DTYPE])
        channels = np.where(~tiff | rgb_tiff, 3, -1)
    bad = (channels != in_chans) | (np.minimum(headers.height, headers.width) < min_side)
    bad[list(headers.problems)] = True
    return bad


def _bad_reason(files: FileList, headers: Headers, index: int, in_chans: int, min_side: int, rgb: bool) -> str:
    """The one-line message (naming the file) of bad file `index`: the same words util.io uses."""
    path = files.path(index)
    if index in headers.problems:
        return headers.problems[index]
    shape = (int(headers.channels[index]), int(headers.height[index]), int(headers.width[index]))
    if rgb:
        dtype = headers.dtype_names[headers.dtype[index]]
        if headers.layout_of(index).startswith("TIFF") and (shape[0] not in (1, 3) or dtype != RGB_TIFF_DTYPE):
            return (f"{path}: --recipe imagenet reads 8-bit grey or RGB images, but this TIFF holds {shape[0]} "
                    f"channel(s) of {dtype}")
        shape = (in_chans,) + shape[1:]  # read as RGB
    try:
        check_shape(shape, path, in_chans, min_side)
    except DataError as exc:
        return str(exc)
    return f"{path}: bad file"  # not reached: _bad_mask and check_shape test the same things


def check_files(files: FileList, in_chans: int, min_side: int, rgb: bool = False, skip_bad: bool = False):
    """Scan every header (scan_headers) and find the files training would stop at: unreadable, a channel
    count other than `in_chans` (with rgb: PIL images count as 3 channels, converted), a side below `min_side`.

    Returns (good files, their headers, skipped) where skipped is (count, [first BAD_FILES_SHOWN messages]).
    Bad files raise one DataError that lists them (the count and the first ten, one line each) unless
    `skip_bad`, which leaves them out. A folder whose every file is bad is always an error, on one line (a
    flag such as --in_chans is the likely cause).
    """
    headers = scan_headers(files)
    bad = _bad_mask(headers, in_chans, min_side, rgb)
    bad_indices = np.flatnonzero(bad)
    if len(bad_indices) == 0:
        return files, headers, (0, [])
    shown = [_bad_reason(files, headers, int(i), in_chans, min_side, rgb) for i in bad_indices[:BAD_FILES_SHOWN]]
    where = files.root or "the file list"
    if len(bad_indices) == len(files):
        raise DataError(f"{shown[0]} (the first of the {len(files)} image files under {where}, none of which can "
                        f"be used)" if len(files) > 1 else shown[0])
    if not skip_bad:
        raise bad_files_error(len(bad_indices), len(files), where, shown)
    print(f"--skip_bad_files: leaving out {len(bad_indices)} of {len(files)} image files under {where}:")
    for line in shown + ([f"... and {len(bad_indices) - len(shown)} more"] if len(bad_indices) > len(shown) else []):
        print(f"  {line}")
    keep = ~bad
    return files.select(keep), headers.select(keep), (int(len(bad_indices)), shown)


def bad_files_error(count: int, total: int, where: str, shown: list) -> DataError:
    """One DataError: a summary line, then one line per shown file (and how many more there are)."""
    if count == 1:
        return DataError(f"{shown[0]} (1 of {total} image files under {where}; fix or remove it, or pass "
                         f"--skip_bad_files to leave it out)")
    more = [f"... and {count - len(shown)} more"] if count > len(shown) else []
    return DataError("\n".join([f"{count} of {total} image files under {where} cannot be used; fix or remove "
                                f"them, or pass --skip_bad_files to leave them out:"] + shown + more))
