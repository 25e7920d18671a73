"""Data for DAMA: image reading, the reference augmentation, folder datasets and synthetic cells.

Everything returns float32 tensors laid out [C, H, W]. Bad input raises `DataError`, whose message
names the file, folder or flag at fault and what was expected, so that the training scripts can print
one clean line (`error_line`) instead of a traceback.
"""
import math
import os
import re
import sys
import zlib
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from util.misc import NonFiniteLossError, cleanup_distributed

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
TIFF_EXTENSIONS = (".tif", ".tiff")
DEFAULT_VAL_CROP = 48  # the reference's fine-tune validation centre crop (in pixels)
DEFAULT_SYNTHETIC_SIZE = 1000


class DataError(ValueError):
    """Bad data or data flags; the message names the file/folder/flag and what was expected."""


# --------------------------------------------------------------------------------------------------
# Reading one image file
# --------------------------------------------------------------------------------------------------

def read_image(path) -> torch.Tensor:
    """Read a TIFF, PNG or JPEG file into a float32 tensor [C, H, W].

    uint8 is scaled by 1/255, uint16 by 1/65535, floats are kept as they are. TIFF channel axes come from
    the file's own axes (`series[0].axes`), never from the shape; PNG/JPEG give 1 (grey) or 3 (RGB)
    channels. Any unreadable file raises DataError naming it.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TIFF_EXTENSIONS:
        array = _read_tiff_chw(path)
    elif suffix in IMAGE_EXTENSIONS:
        array = _read_pil_chw(path)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(IMAGE_EXTENSIONS)}")
    return _to_unit_float(array, path)


def _read_tiff_chw(path: Path) -> np.ndarray:
    """TIFF -> numpy [C, H, W] in the file's dtype, using the axes tifffile reports for series 0."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, array = series.axes, series.asarray()
    except Exception as exc:  # tifffile raises many types (TiffFileError, ValueError, struct.error, ...)
        raise DataError(f"{path}: cannot read TIFF file ({type(exc).__name__}: {exc})") from exc
    return _tiff_to_chw(array, axes, path)


def _tiff_to_chw(array: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Move the one channel-like axis (any axis but Y and X: S, C, Q, I, Z, ...) to the front.

    'YXS' (interleaved, channel-last) and 'CYX'/'QYX'/'SYX' (planar or multi-page) both become [C, H, W];
    'YX' becomes [1, H, W]. Size-1 extra axes are dropped; two or more real extra axes are ambiguous.
    """
    if "Y" not in axes or "X" not in axes or len(axes) != array.ndim:
        raise DataError(f"{path}: TIFF axes {axes!r} with shape {array.shape}; expected an image with Y and X axes")
    extra = [i for i, axis in enumerate(axes) if axis not in "YX" and array.shape[i] > 1]
    if len(extra) > 1:
        raise DataError(f"{path}: TIFF axes {axes!r} with shape {array.shape} have more than one channel-like axis; "
                        "expected one channel axis besides Y and X (e.g. 'YXS' or 'CYX')")
    order = extra + [axes.index("Y"), axes.index("X")]
    dropped = [i for i in range(array.ndim) if i not in order]  # all of size 1
    chw = np.transpose(array, dropped + order).reshape([array.shape[i] for i in order])
    return chw if extra else chw[None]  # [C, H, W]


def _read_pil_chw(path: Path) -> np.ndarray:
    """PNG/JPEG -> numpy [C, H, W]: grey modes give 1 channel (16-bit PNG stays uint16), others RGB."""
    try:
        with Image.open(path) as image:
            image.load()  # PIL opens lazily: force the decode here so truncated files fail with the path
            array = _pil_array(image)
    except Exception as exc:
        raise DataError(f"{path}: cannot read image file ({type(exc).__name__}: {exc})") from exc
    return array[None] if array.ndim == 2 else np.transpose(array, (2, 0, 1))


def _pil_array(image: Image.Image) -> np.ndarray:
    """[H, W] or [H, W, 3] array of a PIL image; alpha and palettes are dropped (cells have no alpha)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I"):
        # 16-bit grey PNGs open as 'I;16' or 'I' (int32) depending on Pillow: both hold 0..65535
        return np.asarray(image).astype(np.uint16)
    if image.mode in ("1", "L", "LA"):
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def _to_unit_float(array: np.ndarray, path: Path) -> torch.Tensor:
    """Scale by dtype (uint8 /255, uint16 /65535, float as is) -> contiguous float32 tensor."""
    kind, itemsize = array.dtype.kind, array.dtype.itemsize  # kind/itemsize also cover big-endian files
    if kind == "u" and itemsize in (1, 2):
        scaled = array.astype(np.float32) / np.float32(255 if itemsize == 1 else 65535)
    elif kind == "f":
        scaled = array.astype(np.float32)
        if not np.isfinite(scaled).all():  # NaN/inf pixels would only surface later as a non-finite loss
            raise DataError(f"{path}: image holds NaN or infinite values; expected finite pixel values")
    else:
        raise DataError(f"{path}: unsupported pixel type {array.dtype}; expected uint8, uint16 or float")
    return torch.from_numpy(np.ascontiguousarray(scaled))


def check_image(image: torch.Tensor, path, in_chans: int, min_side: int) -> None:
    """Raise DataError naming `path` if `image` [C, H, W] has the wrong channel count or is too small."""
    channels, height, width = image.shape
    if channels != in_chans:
        raise DataError(f"{path}: image has {channels} channel(s) but --in_chans is {in_chans}{_tiff_layout(path)}")
    if min(height, width) < min_side:
        raise DataError(f"{path}: image is {height}x{width} pixels, smaller than the {min_side}x{min_side} crop "
                        "it needs (training crops half of --img_size, validation a centre crop of 48 by default)")


def _tiff_layout(path) -> str:
    """' (TIFF axes ..., shape ...)' for a channel-count error: it shows how the channels were found.

    A height x width x channel array saved as pages (no planarconfig='contig') reads as H channels of
    W x C pixels; the shape in the message makes that visible. '' for other files.
    """
    if Path(path).suffix.lower() not in TIFF_EXTENSIONS:
        return ""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return f" (TIFF axes {series.axes!r}, shape {tuple(series.shape)}; channels are the axis besides Y and X)"
    except Exception:  # the message is only a hint: never hide the channel error behind a read error
        return ""


# --------------------------------------------------------------------------------------------------
# Augmentation (torchvision.transforms.v2 on [C, H, W] float tensors)
# --------------------------------------------------------------------------------------------------

class TensorTransform:
    """A v2 pipeline for [C, H, W] tensors plus `min_side`, the smallest input side it accepts.

    The datasets check `min_side` before calling the pipeline: v2.CenterCrop would silently zero-pad a
    small image and v2.RandomCrop would fail without naming the file.
    """

    def __init__(self, pipeline: v2.Compose, min_side: int):
        self.pipeline = pipeline
        self.min_side = min_side

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.pipeline(image)  # [C, H, W] -> [C, S, S]

    def __repr__(self) -> str:
        return f"TensorTransform(min_side={self.min_side}, pipeline={self.pipeline})"


def build_pretrain_transform(img_size: int) -> TensorTransform:
    """The reference augmentation for pretraining and fine-tune training, S = img_size.

    Fixed-size S/2 crop at a uniform random position, bicubic resize to S x S, rotation uniform in
    [-90, 90] degrees and an integer shift of up to 30% of the side (both zero-filled), then horizontal
    and vertical flips with p = 0.5. No mean/std normalisation (the reference has none).
    """
    crop = img_size // 2
    pipeline = v2.Compose([
        v2.RandomCrop(crop),
        # bicubic is what the reference's authors meant (their cv2 call gave INTER_AREA by mistake);
        # no clamp: the small bicubic overshoot at edges is harmless and keeps float inputs unbounded
        v2.Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomRotation(90, interpolation=InterpolationMode.BILINEAR, fill=0),
        v2.RandomAffine(degrees=0, translate=(0.3, 0.3), fill=0),  # integer shift, so nearest is exact
        v2.RandomHorizontalFlip(0.5),
        v2.RandomVerticalFlip(0.5),
    ])
    return TensorTransform(pipeline, min_side=crop)


def build_finetune_transform(is_train: bool, img_size: int, val_crop: int = DEFAULT_VAL_CROP) -> TensorTransform:
    """Fine-tuning: the pretraining augmentation for training; centre crop `val_crop` + resize for validation."""
    if is_train:
        return build_pretrain_transform(img_size)
    pipeline = v2.Compose([
        v2.CenterCrop(val_crop),
        # antialias matters only when val_crop > img_size (downscaling); it keeps that case alias-free
        v2.Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC, antialias=True),
    ])
    return TensorTransform(pipeline, min_side=val_crop)


# --------------------------------------------------------------------------------------------------
# Folder datasets
# --------------------------------------------------------------------------------------------------

class ImageFileDataset(Dataset):
    """Images on disk as a list of (path, label); every file is read and checked when loaded.

    __getitem__ -> (transform(image) [C, S, S] float32, label int). `.classes` lists the class names.
    """

    def __init__(self, samples, classes, in_chans: int, transform: TensorTransform):
        self.samples = list(samples)
        self.classes = list(classes)
        self.in_chans = in_chans
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor:
        """The checked, untransformed image [C, H, W] of sample `index`."""
        path, _ = self.samples[index]
        image = read_image(path)
        check_image(image, path, self.in_chans, self.transform.min_side)
        return image

    def __getitem__(self, index: int):
        return self.transform(self.load(index)), self.samples[index][1]


def is_image_file(path: Path) -> bool:
    """An accepted extension (any case), and not a hidden file such as macOS '._x.tif' metadata."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path, recursive: bool) -> list:
    """Sorted image files in `folder` (and its sub-folders when `recursive`, links followed)."""
    if not recursive:
        return sorted(p for p in folder.iterdir() if is_image_file(p))
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(parent) / name for name in files)
    return sorted(p for p in found if is_image_file(p))


def class_folders(folder: Path) -> list:
    """Sorted names of the non-hidden sub-folders of `folder` (the ImageFolder classes)."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_folder_samples(folder: Path, classes: list) -> list:
    """[(path, class index)] for the layout <folder>/<class>/**/<image>; every class folder present must hold images."""
    samples = []
    for name in class_folders(folder):
        if name not in classes:
            raise DataError(f"{folder / name}: class folder {name!r} is not one of the training classes {classes}")
        files = list_images(folder / name, recursive=True)
        if not files:
            raise DataError(f"{folder / name}: class folder holds no images; expected files ending in "
                            f"{', '.join(IMAGE_EXTENSIONS)}")
        samples.extend((path, classes.index(name)) for path in files)
    return samples


def no_images_error(folder: Path) -> DataError:
    return DataError(f"{folder}: no images found; expected files ending in {', '.join(IMAGE_EXTENSIONS)} "
                     f"(any case) in class folders <folder>/<class>/ or, for pretraining, directly in the folder")


def require_folder(folder: Path, what: str) -> None:
    """DataError mentioning --data_path unless `folder` is an existing directory."""
    if not folder.is_dir():
        raise DataError(f"--data_path: {what} {folder} does not exist or is not a folder")


def data_root(args) -> Path:
    """args.data_path as a Path; DataError when it is unset or missing."""
    if not getattr(args, "data_path", None):
        raise DataError("--data_path is not set; expected a dataset folder (or use --dataset synthetic)")
    root = Path(args.data_path).expanduser()
    require_folder(root, "dataset folder")
    return root


def pretrain_samples(root: Path):
    """(samples, classes) for pretraining: <root>/train if present, as class folders or as a flat folder."""
    folder = root / "train" if (root / "train").is_dir() else root
    classes = class_folders(folder)
    flat_files = list_images(folder, recursive=False)
    if flat_files or not classes:  # a flat folder of images (labels are unused in pretraining)
        if not flat_files:
            raise no_images_error(folder)
        return [(path, 0) for path in flat_files], ["unlabelled"]
    samples = image_folder_samples(folder, classes)
    return samples, classes


def finetune_samples(root: Path, is_train: bool):
    """(samples, classes) of <root>/train or <root>/val in ImageFolder layout.

    Validation labels follow the class list of <root>/train when it exists, so that a class missing from
    val/ does not shift the indices of the others.
    """
    split = "train" if is_train else "val"
    folder = root / split
    require_folder(folder, f"the {split} folder (expected ImageFolder layout <data_path>/{split}/<class>/<image>)")
    train_folder = root / "train"
    classes = class_folders(train_folder) if train_folder.is_dir() else class_folders(folder)
    samples = image_folder_samples(folder, classes)
    if not samples:
        raise no_images_error(folder)
    return samples, classes


# --------------------------------------------------------------------------------------------------
# Synthetic multiplexed-immunofluorescence cells
# --------------------------------------------------------------------------------------------------

CELL_TYPES = ("neuron", "astrocyte", "oligodendrocyte", "microglia", "endothelial")
# The 7 channels of the brain-cell panel the method was built for (Maric et al. 2021)
MARKERS = ("DAPI", "histones", "NeuN", "S100", "Olig2", "Iba1", "RECA1")
DAPI, HISTONES, NEUN, S100, OLIG2, IBA1, RECA1 = range(len(MARKERS))


class Canvas:
    """Pixel grid and 7-marker accumulator [7, S, S] for drawing soft cell parts (float32 numpy)."""

    def __init__(self, size: int):
        self.size = size
        coords = np.arange(size, dtype=np.float32)
        self.y = coords[:, None]  # [S, 1]
        self.x = coords[None, :]  # [1, S]
        self.markers = np.zeros((len(MARKERS), size, size), np.float32)

    def ellipse(self, centre, semi_axes, angle: float, edge: float = 1.0) -> np.ndarray:
        """Soft-edged filled ellipse [S, S] in [0, 1]; `edge` is the edge width in pixels."""
        cos, sin = math.cos(angle), math.sin(angle)
        dy, dx = self.y - centre[0], self.x - centre[1]
        along, across = dx * cos + dy * sin, -dx * sin + dy * cos  # coordinates in the ellipse's frame
        a, b = max(semi_axes[0], 0.5), max(semi_axes[1], 0.5)
        radius = np.sqrt((along / a) ** 2 + (across / b) ** 2)  # 1 on the outline
        return _sigmoid((1.0 - radius) * min(a, b) / edge)

    def segments(self, start, end, width_start, width_end) -> np.ndarray:
        """Soft tapered line segments (K of them, arrays [K, 2] and [K]) -> [S, S] max over segments."""
        start, end = np.asarray(start, np.float32), np.asarray(end, np.float32)
        py, px = start[:, 0, None, None], start[:, 1, None, None]  # [K, 1, 1]
        vy, vx = (end - start)[:, 0, None, None], (end - start)[:, 1, None, None]
        length2 = np.maximum(vy * vy + vx * vx, 1e-6)
        t = np.clip(((self.y - py) * vy + (self.x - px) * vx) / length2, 0.0, 1.0)  # [K, S, S] position along
        dist2 = (self.y - py - t * vy) ** 2 + (self.x - px - t * vx) ** 2
        width = np.asarray(width_start, np.float32)[:, None, None] * (1 - t) \
            + np.asarray(width_end, np.float32)[:, None, None] * t
        return np.exp(-dist2 / np.maximum(width, 0.3) ** 2).max(axis=0)

    def paint(self, mask: np.ndarray, levels: dict) -> None:
        """Add `mask` [S, S] to each marker channel at its level ({marker index: intensity})."""
        for marker, level in levels.items():
            self.markers[marker] += np.float32(level) * mask


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def _unit(angles) -> np.ndarray:
    """Unit vectors [K, 2] as (dy, dx) for angles [K] in radians."""
    angles = np.asarray(angles)
    return np.stack([np.sin(angles), np.cos(angles)], axis=-1)


def _rays(rng, centre, count: int, inner: float, lengths, spread: float = 0.0):
    """Start/end points [count, 2] of rays from `inner` to `inner + lengths` around `centre`, evenly spread
    with jitter; `spread` bends each ray away from the radial direction (processes are not straight)."""
    angles = rng.uniform(0, 2 * np.pi) + np.arange(count) * 2 * np.pi / count + rng.normal(0, 0.3, count)
    start = np.asarray(centre) + inner * _unit(angles)
    end = start + np.asarray(lengths)[:, None] * _unit(angles + rng.normal(0, spread, count))
    return start, end


def _nucleus(canvas: Canvas, rng, centre, semi_axes, angle: float, extra: dict = None) -> np.ndarray:
    """Every cell's nucleus: DAPI and histones (all types), plus any nuclear marker in `extra`."""
    mask = canvas.ellipse(centre, semi_axes, angle)
    levels = {DAPI: rng.uniform(0.35, 0.9), HISTONES: rng.uniform(0.1, 0.5)}
    levels.update(extra or {})
    canvas.paint(mask, levels)
    return mask


def draw_neuron(canvas: Canvas, rng, centre, radius: float, angle: float, marker: float) -> None:
    """Large round soma with a big pale nucleus, one thick apical dendrite; NeuN in nucleus and soma."""
    soma = canvas.ellipse(centre, (radius * 0.8, radius * rng.uniform(0.6, 0.8)), angle, edge=1.5)
    tip = np.asarray(centre) + radius * rng.uniform(1.2, 1.6) * _unit(angle)
    dendrite = canvas.segments([centre], [tip], [radius * 0.35], [radius * 0.08])
    canvas.paint(np.maximum(soma, dendrite), {NEUN: 0.5 * marker, S100: rng.uniform(0, 0.1)})
    pale_nucleus = {NEUN: 0.6 * marker, DAPI: rng.uniform(0.2, 0.5)}  # neuronal chromatin is loosely packed
    _nucleus(canvas, rng, centre, (radius * 0.45, radius * 0.4), angle, pale_nucleus)


def draw_astrocyte(canvas: Canvas, rng, centre, radius: float, angle: float, marker: float) -> None:
    """Small soma with 4-6 thick, tapering, straight processes (star shape); S100, some Olig2."""
    count = int(rng.integers(4, 7))
    start, end = _rays(rng, centre, count, radius * 0.2, radius * rng.uniform(0.7, 1.1, count), spread=0.15)
    processes = canvas.segments(start, end, np.full(count, radius * 0.22), np.full(count, radius * 0.06))
    soma = canvas.ellipse(centre, (radius * 0.4, radius * 0.35), angle, edge=1.0)
    canvas.paint(np.maximum(soma, processes), {S100: marker})
    olig2 = rng.uniform(0.0, 0.35) if rng.random() < 0.4 else 0.0  # Olig2 is also found in some astrocytes
    _nucleus(canvas, rng, centre, (radius * 0.3, radius * 0.25), angle, {OLIG2: olig2})


def draw_oligodendrocyte(canvas: Canvas, rng, centre, radius: float, angle: float, marker: float) -> None:
    """Small, round, dense nucleus with Olig2, a thin rim of cytoplasm (faint S100), 0-3 faint processes."""
    rim = canvas.ellipse(centre, (radius * 0.45, radius * 0.4), angle, edge=1.0)
    count = int(rng.integers(0, 4))
    if count:
        start, end = _rays(rng, centre, count, radius * 0.3, radius * rng.uniform(0.5, 0.9, count), spread=0.3)
        rim = np.maximum(rim, 0.5 * canvas.segments(start, end, np.full(count, 1.0), np.full(count, 0.6)))
    canvas.paint(rim, {S100: rng.uniform(0.05, 0.4)})
    _nucleus(canvas, rng, centre, (radius * 0.3, radius * 0.28), angle, {OLIG2: marker, DAPI: rng.uniform(0.6, 1.0)})


def draw_microglia(canvas: Canvas, rng, centre, radius: float, angle: float, marker: float) -> None:
    """Small elongated nucleus, tiny soma, 4-6 thin long bent processes each with a side branch; Iba1."""
    count = int(rng.integers(4, 7))
    start, end = _rays(rng, centre, count, radius * 0.15, radius * rng.uniform(0.8, 1.3, count), spread=0.4)
    fork = start + (end - start) * rng.uniform(0.4, 0.7, (count, 1))  # branch points along each process
    heading = np.arctan2((end - start)[:, 0], (end - start)[:, 1])
    turn = heading + rng.choice([-1, 1], count) * rng.uniform(0.5, 1.0, count)  # branches leave at 30-60 degrees
    branch_end = fork + radius * rng.uniform(0.3, 0.6, (count, 1)) * _unit(turn)
    processes = canvas.segments(np.concatenate([start, fork]), np.concatenate([end, branch_end]),
                                np.full(2 * count, 1.3), np.full(2 * count, 0.6))
    soma = canvas.ellipse(centre, (radius * 0.3, radius * 0.22), angle, edge=1.0)
    canvas.paint(np.maximum(soma, processes), {IBA1: marker})
    _nucleus(canvas, rng, centre, (radius * 0.3, radius * 0.15), angle)


def draw_endothelial(canvas: Canvas, rng, centre, radius: float, angle: float, marker: float) -> None:
    """Thin, very elongated nucleus lying along a vessel wall (RECA1 band crossing the whole image)."""
    direction = _unit(angle)
    offset = np.array([-direction[1], direction[0]]) * radius * rng.uniform(-0.15, 0.15)  # nucleus sits in the wall
    far = canvas.size * direction
    vessel = canvas.segments([np.array(centre) + offset - far], [np.array(centre) + offset + far],
                             [radius * rng.uniform(0.2, 0.35)], [radius * rng.uniform(0.2, 0.35)])
    canvas.paint(vessel, {RECA1: marker, IBA1: rng.uniform(0.0, 0.15)})  # perivascular Iba1 stays faint
    _nucleus(canvas, rng, centre, (radius * 0.6, radius * 0.17), angle)


CELL_DRAWERS = (draw_neuron, draw_astrocyte, draw_oligodendrocyte, draw_microglia, draw_endothelial)


class SyntheticCells(Dataset):
    """Multiplexed-immunofluorescence-like brain cells, generated on the fly and deterministic per index.

    Seven channels (MARKERS: DAPI, histones, NeuN, S100, Olig2, Iba1, RECA1) and five cell types
    (CELL_TYPES) told apart by which markers light up *and* by shape: round neurons with a dendrite,
    star-shaped astrocytes, small round oligodendrocytes, thin branched microglia, elongated endothelial
    cells on a vessel. All share the nuclear DAPI/histone channels; markers overlap between some types
    (Olig2 in astrocytes, S100 in oligodendrocytes, Iba1 near vessels); intensity, size, orientation and
    position vary; 0-2 partial neighbours of random types, background and shot/read noise are added.
    A tenth of the cells have a dim marker, so channel means alone cannot label every cell.

    The image is S0 x S0 with S0 = img_size and the cell near the centre with radius S0/5..S0/3, so the
    reference's random S/2 crop usually shows part of it. With in_chans != 7 marker m goes to channel
    m % in_chans (only 7 is meaningful). Labels are balanced: label = index % num_classes.
    `split` ('train', 'val', ...) enters the seed, so splits with the same seed never share images.

    __getitem__ -> (image [in_chans, S0, S0] float32 in [0, 1], or transform(image); label int).
    """

    def __init__(self, num_samples: int, img_size: int, in_chans: int = 7, num_classes: int = 5, seed: int = 0,
                 split: str = "train", transform=None):
        if not 1 <= num_classes <= len(CELL_TYPES):
            raise DataError(f"synthetic dataset: {num_classes} classes requested; expected 1 to {len(CELL_TYPES)}")
        if in_chans < 1 or img_size < 8 or num_samples < 1:
            raise DataError(f"synthetic dataset: needs --in_chans >= 1, --img_size >= 8 and at least one sample; "
                            f"got in_chans={in_chans}, img_size={img_size}, num_samples={num_samples}")
        self.num_samples, self.img_size, self.in_chans = num_samples, img_size, in_chans
        self.num_classes, self.seed, self.transform = num_classes, seed, transform
        self.split_key = zlib.crc32(split.encode())  # stable across runs, unlike hash(str)
        self.classes = list(CELL_TYPES[:num_classes])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        image = torch.from_numpy(self.render(index))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.label(index)

    def label(self, index: int) -> int:
        return index % self.num_classes

    def render(self, index: int) -> np.ndarray:
        """The image of sample `index`: float32 [in_chans, S0, S0] in [0, 1]."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"synthetic dataset index {index} out of range 0..{self.num_samples - 1}")
        rng = np.random.default_rng([self.seed, self.split_key, index])  # independent stream per sample
        size = self.img_size
        canvas = Canvas(size)
        self._draw_neighbours(canvas, rng)
        centre = (size - 1) / 2 + rng.normal(0, 0.05 * size, 2)
        self._draw_cell(canvas, rng, self.label(index), centre, rng.uniform(size / 5, size / 3))
        return self._finish(canvas.markers, rng)

    def _draw_cell(self, canvas: Canvas, rng, cell_type: int, centre, radius: float) -> None:
        marker = rng.uniform(0.3, 1.0) if rng.random() > 0.1 else rng.uniform(0.02, 0.15)  # some cells stain dimly
        CELL_DRAWERS[cell_type](canvas, rng, centre, radius, rng.uniform(0, 2 * np.pi), marker)

    def _draw_neighbours(self, canvas: Canvas, rng) -> None:
        """0-2 cells of any type centred near the border, so only part of each is in view."""
        size = self.img_size
        for _ in range(int(rng.integers(0, 3))):
            direction = rng.uniform(0, 2 * np.pi)
            distance = rng.uniform(0.45, 0.7) * size
            centre = (size - 1) / 2 + distance * _unit(direction)
            self._draw_cell(canvas, rng, int(rng.integers(len(CELL_TYPES))), centre, rng.uniform(size / 6, size / 4))

    def _finish(self, markers: np.ndarray, rng) -> np.ndarray:
        """Markers [7, S, S] -> image [in_chans, S, S]: channel mapping, background, noise, clip to [0, 1]."""
        channels = np.zeros((self.in_chans,) + markers.shape[1:], np.float32)
        for marker in range(len(MARKERS)):
            channels[marker % self.in_chans] += markers[marker]
        channels *= np.float32(rng.uniform(0.6, 1.0))  # exposure varies between images
        background = rng.uniform(0.01, 0.08, (self.in_chans, 1, 1)).astype(np.float32)
        signal = np.clip(channels + background, 0.0, 1.0)
        photons = np.float32(rng.uniform(100, 400))  # shot noise: variance proportional to the signal
        read_noise = np.float32(rng.uniform(0.005, 0.03))
        noise = rng.standard_normal(signal.shape, np.float32) * (np.sqrt(signal / photons) + read_noise)
        return np.clip(signal + noise, 0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Builders used by the training scripts
# --------------------------------------------------------------------------------------------------

def dataset_kind(args) -> str:
    """'synthetic' or 'folder' from args.dataset; when unset, 'folder' if --data_path is given."""
    kind = getattr(args, "dataset", None) or ("folder" if getattr(args, "data_path", None) else "synthetic")
    if kind not in ("synthetic", "folder"):
        raise DataError(f"--dataset {kind!r} is not known; expected 'synthetic' or 'folder'")
    return kind


def synthetic_size(args) -> int:
    return int(getattr(args, "synthetic_size", None) or DEFAULT_SYNTHETIC_SIZE)


def build_pretrain_dataset(args) -> Dataset:
    """Pretraining dataset: items (augmented image [in_chans, S, S], label), S = args.img_size.

    folder: <data_path>/train (class folders or a flat folder of images) or, without train/, <data_path>
    itself; the first file is read and checked now, so that a wrong --in_chans or a too-small image
    fails before training starts. synthetic: `args.synthetic_size` SyntheticCells with `args.seed`.
    """
    transform = build_pretrain_transform(args.img_size)
    if dataset_kind(args) == "synthetic":
        return SyntheticCells(synthetic_size(args), args.img_size, args.in_chans, seed=args.seed,
                              split="train", transform=transform)
    samples, classes = pretrain_samples(data_root(args))
    return checked(ImageFileDataset(samples, classes, args.in_chans, transform))


def build_finetune_dataset(is_train: bool, args) -> Dataset:
    """Fine-tuning dataset (train or val): items (image [in_chans, S, S], label), `.classes` names.

    folder: <data_path>/train or <data_path>/val in ImageFolder layout (val labels use train's class list);
    the validation centre crop is `args.val_crop` (default 48). synthetic: 5 cell types, train has
    `args.synthetic_size` images and val a quarter of that (at least one per class) from a different
    seed stream, so the two never share an image. Its val crop is min(val_crop, img_size), because a
    synthetic image is only img_size wide: at img_size < 48 validation sees the whole image.
    """
    val_crop = int(getattr(args, "val_crop", None) or DEFAULT_VAL_CROP)
    if dataset_kind(args) == "synthetic":
        transform = build_finetune_transform(is_train, args.img_size, min(val_crop, args.img_size))
        size = synthetic_size(args) if is_train else max(synthetic_size(args) // 4, len(CELL_TYPES))
        return SyntheticCells(size, args.img_size, args.in_chans, seed=args.seed,
                              split="train" if is_train else "val", transform=transform)
    transform = build_finetune_transform(is_train, args.img_size, val_crop)
    samples, classes = finetune_samples(data_root(args), is_train)
    return checked(ImageFileDataset(samples, classes, args.in_chans, transform))


def checked(dataset: ImageFileDataset) -> ImageFileDataset:
    """Read and check the first file now (channels vs --in_chans, size vs the crop); returns `dataset`."""
    dataset.load(0)
    return dataset


# --------------------------------------------------------------------------------------------------
# Error reporting
# --------------------------------------------------------------------------------------------------

_WORKER_MARKER = "in DataLoader worker process"
_EXCEPTION_LINE = re.compile(r"([A-Za-z_][\w.]*)(?:: (.*))?$")


# The project's own errors (flags, files, checkpoints, a diverged run): their messages say what is wrong,
# so the type name adds nothing. Matched by name: a DataLoader worker's re-raise carries only the name.
_OWN_ERRORS = ("DataError", "CheckpointError", "ValueError", "NonFiniteLossError")


def error_line(exc: BaseException) -> str:
    """One clean line for `exc`: the message of our own errors (DataError, CheckpointError, ValueError,
    NonFiniteLossError), 'Type: message' for anything else. Every script prints it as `error: <line>`.

    A DataLoader worker re-raises with a message holding the whole worker traceback ("Caught X in
    DataLoader worker process N. Original Traceback ..."): the original exception's line is taken from it.
    """
    name, message = type(exc).__name__, str(exc)
    if _WORKER_MARKER in message:
        name, message = _original_exception(message)
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    if name in _OWN_ERRORS:
        return message or name
    return f"{name}: {message}" if message else name


def run_tool(main, args, user_error_code: int = 2, user_errors=(ValueError, OSError)) -> int:
    """main(args) for a command-line script; returns its exit code, and leaves the process group either way.

    A user error (a bad flag or file: ValueError, which DataError and CheckpointError are, and by default
    OSError) gives one `error: ...` line on stderr and `user_error_code`; a diverged run (NonFiniteLossError)
    the same kind of line and 1; success 0. Anything else is a bug and keeps its traceback.
    """
    try:
        main(args)
    except (*user_errors, NonFiniteLossError) as exc:
        sys.stderr.write(f"error: {error_line(exc)}\n")  # plain write: print() may be rank-filtered
        return 1 if isinstance(exc, NonFiniteLossError) else user_error_code
    finally:
        cleanup_distributed()
    return 0


def _original_exception(worker_message: str):
    """(type name, message) of the last exception in a worker's traceback text."""
    last = worker_message.rsplit("Traceback (most recent call last):", 1)[-1]
    lines = [line for line in last.splitlines() if line.strip()]
    tail = [line for line in lines if not line[0].isspace()]  # frame lines are indented; the exception is not
    if not tail:
        return "Error", worker_message
    match = _EXCEPTION_LINE.match(tail[0])
    if not match:
        return "Error", "\n".join(tail)
    message = "\n".join([match.group(2) or ""] + tail[1:])
    return match.group(1).rsplit(".", 1)[-1], message
