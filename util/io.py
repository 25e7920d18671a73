"""Reading one image file: TIFF (any axis order the file declares), PNG and JPEG, as [C, H, W].

`read_raw_chw` gives the stored dtype (uint16 stays uint16), `read_image` a float32 tensor scaled by dtype
(uint8 / 255, uint16 / 65535, floats as they are), `read_tensor_chw` what the augmentation takes: uint8 and
uint16 tensors as stored (util.transforms scales them at the end), anything else as read_image gives it. Any
unreadable file raises DataError naming it. The folder datasets (util.datasets), and through them the
--gpu_augment workers (util.gpu_augment), read through these functions.
"""
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from util.errors import DataError

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
TIFF_EXTENSIONS = (".tif", ".tiff")


def read_raw_chw(path) -> np.ndarray:
    """An image file as numpy [C, H, W] in its stored dtype; DataError for an unsupported or unreadable file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TIFF_EXTENSIONS:
        return read_tiff_chw(path)
    if suffix in IMAGE_EXTENSIONS:
        return read_pil_chw(path)
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(IMAGE_EXTENSIONS)}")


def read_image(path) -> torch.Tensor:
    """Read a TIFF, PNG or JPEG file into a float32 tensor [C, H, W].

    uint8 is scaled by 1/255, uint16 by 1/65535, floats are kept as they are. TIFF channel axes come from
    the file's own axes (`series[0].axes`), never from the shape; PNG/JPEG give 1 (grey) or 3 (RGB)
    channels. Any unreadable file raises DataError naming it.
    """
    return to_unit_float(read_raw_chw(path), path)


def read_tensor_chw(path) -> torch.Tensor:
    """An image file as a [C, H, W] tensor for util.transforms: uint8 / uint16 kept (scaled by the transform),
    floats as float32 (checked finite, as read_image); other pixel types raise read_image's DataError."""
    array = read_raw_chw(path)
    if array.dtype.kind == "u" and array.dtype.itemsize in (1, 2):
        # torch takes only native byte order and warns on read-only arrays (PIL's): copy only in those cases
        return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=not array.flags.writeable))
    return to_unit_float(array, path)


def read_tiff_chw(path: Path) -> np.ndarray:
    """TIFF -> numpy [C, H, W] in the file's dtype, using the axes tifffile reports for series 0."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, array = series.axes, series.asarray()
    except Exception as exc:  # tifffile raises many types (TiffFileError, ValueError, struct.error, ...)
        raise DataError(f"{path}: cannot read TIFF file ({type(exc).__name__}: {exc})") from exc
    return tiff_to_chw(array, axes, path)


def tiff_to_chw(array: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Move the one channel-like axis (any axis but Y and X: S, C, Q, I, Z, ...) to the front.

    'YXS' (interleaved, channel-last) and 'CYX'/'QYX'/'SYX' (planar or multi-page) both become [C, H, W];
    'YX' becomes [1, H, W]. Size-1 extra axes are dropped; two or more real extra axes are ambiguous.
    """
    order = tiff_axis_order(array.shape, axes, path)
    dropped = [i for i in range(array.ndim) if i not in order]  # all of size 1
    chw = np.transpose(array, dropped + order).reshape([array.shape[i] for i in order])
    return chw if len(order) == 3 else chw[None]  # [C, H, W]


def tiff_axis_order(shape, axes: str, path) -> list:
    """Indices of the (channel,) Y and X axes of a TIFF series with `shape` and `axes`; DataError naming `path`
    when there is no Y/X pair or more than one real channel-like axis. Needs only the header (util.filelist)."""
    shape = tuple(shape)
    if "Y" not in axes or "X" not in axes or len(axes) != len(shape):
        raise DataError(f"{path}: TIFF axes {axes!r} with shape {shape}; expected an image with Y and X axes")
    extra = [i for i, axis in enumerate(axes) if axis not in "YX" and shape[i] > 1]
    if len(extra) > 1:
        raise DataError(f"{path}: TIFF axes {axes!r} with shape {shape} have more than one channel-like axis; "
                        "expected one channel axis besides Y and X (e.g. 'YXS' or 'CYX')")
    return extra + [axes.index("Y"), axes.index("X")]


def read_pil_chw(path: Path) -> np.ndarray:
    """PNG/JPEG -> numpy [C, H, W]: grey modes give 1 channel (16-bit PNG stays uint16), others RGB."""
    try:
        with Image.open(path) as image:
            image.load()  # PIL opens lazily: force the decode here so truncated files fail with the path
            array = _pil_array(image)
    except Exception as exc:
        raise DataError(f"{path}: cannot read image file ({type(exc).__name__}: {exc})") from exc
    return array[None] if array.ndim == 2 else np.transpose(array, (2, 0, 1))


PIL_GREY16_MODES = ("I;16", "I;16L", "I;16B", "I")  # 16-bit grey PNGs open as 'I;16' or 'I' (int32): 0..65535
PIL_GREY_MODES = ("1", "L", "LA")


def _pil_array(image: Image.Image) -> np.ndarray:
    """[H, W] or [H, W, 3] array of a PIL image; alpha and palettes are dropped (cells have no alpha)."""
    if image.mode in PIL_GREY16_MODES:
        return np.asarray(image).astype(np.uint16)
    if image.mode in PIL_GREY_MODES:
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def pil_channels_and_dtype(mode: str) -> tuple:
    """(channels, dtype name) that read_pil_chw gives for a PIL image `mode`, known from the header alone."""
    if mode in PIL_GREY16_MODES:
        return 1, "uint16"
    return (1, "uint8") if mode in PIL_GREY_MODES else (3, "uint8")


def to_unit_float(array: np.ndarray, path: Path) -> torch.Tensor:
    """Scale by dtype (uint8 /255, uint16 /65535, float as is) -> contiguous float32 tensor."""
    check_pixel_type(array.dtype, path)
    if array.dtype.kind == "u":
        scaled = array.astype(np.float32) / np.float32(255 if array.dtype.itemsize == 1 else 65535)
    else:
        scaled = array.astype(np.float32)
        if not np.isfinite(scaled).all():  # NaN/inf pixels would only surface later as a non-finite loss
            raise DataError(f"{path}: image holds NaN or infinite values; expected finite pixel values")
    return torch.from_numpy(np.ascontiguousarray(scaled))


def check_pixel_type(dtype, path) -> None:
    """DataError naming `path` unless `dtype` is uint8, uint16 or a float (what to_unit_float scales)."""
    dtype = np.dtype(dtype)
    kind, itemsize = dtype.kind, dtype.itemsize  # kind/itemsize also cover big-endian files
    if not ((kind == "u" and itemsize in (1, 2)) or kind == "f"):
        raise DataError(f"{path}: unsupported pixel type {dtype}; expected uint8, uint16 or float")


def check_image(image: torch.Tensor, path, in_chans: int, min_side: int) -> None:
    """Raise DataError naming `path` if `image` [C, H, W] has the wrong channel count or is too small."""
    check_shape(tuple(image.shape), path, in_chans, min_side)


def check_shape(shape, path, in_chans: int, min_side: int) -> None:
    """check_image on a (C, H, W) shape alone (as a file's header gives it)."""
    channels, height, width = shape
    if channels != in_chans:
        raise DataError(f"{path}: image has {channels} channel(s) but --in_chans is {in_chans}{tiff_layout(path)}")
    if min(height, width) < min_side:
        raise DataError(f"{path}: image is {height}x{width} pixels, smaller than the {min_side}x{min_side} crop "
                        "it needs (training crops half of --img_size, validation a centre crop of 48 by default)")


def tiff_layout(path) -> str:
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
