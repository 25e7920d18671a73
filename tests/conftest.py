"""Shared pytest fixtures: write tiny image files and ImageFolder trees into tmp_path."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

# the tests import the project's modules (util.*, models_*) from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# One compute thread here and in the scripts the tests start: the models are tiny, and on a busy 2-core machine
# torch's OpenMP threads spin against other processes (an in-process test measured 84 s instead of 10 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

LAYOUTS = ("channel_last", "channel_first", "planar", "png", "jpeg")
MAX_VALUE = {"uint8": 255, "uint16": 65535}


def random_image(rng, channels: int, size, dtype: str) -> np.ndarray:
    """Random [C, H, W] array: full-range integers for uint8/uint16, values in [0, 1) for floats."""
    height, width = (size, size) if isinstance(size, int) else size
    if dtype in MAX_VALUE:
        return rng.integers(0, MAX_VALUE[dtype] + 1, (channels, height, width)).astype(dtype)
    return rng.random((channels, height, width)).astype(dtype)


def write_image_file(path, array_chw: np.ndarray, layout: str = "channel_last") -> Path:
    """Write `array_chw` [C, H, W] to `path` in `layout` and return the path.

    layout: 'channel_last' = interleaved TIFF (axes 'YXS'); 'channel_first' = one page per channel
    ('QYX'); 'planar' = one page, separate planes ('SYX'); 'png' / 'jpeg' = PIL file of 1 or 3 channels
    (uint8, or uint16 for 1-channel PNG). A 1-channel TIFF is written as a plain 2-D page ('YX').
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = array_chw.shape[0]
    if layout in ("png", "jpeg"):
        pixels = array_chw[0] if channels == 1 else np.transpose(array_chw, (1, 2, 0))
        Image.fromarray(pixels).save(path, format=layout.upper())
    elif channels == 1:
        tifffile.imwrite(path, array_chw[0], photometric="minisblack")
    elif layout == "channel_last":
        tifffile.imwrite(path, np.transpose(array_chw, (1, 2, 0)), photometric="minisblack", planarconfig="contig")
    elif layout == "channel_first":
        tifffile.imwrite(path, array_chw, photometric="minisblack")
    elif layout == "planar":
        tifffile.imwrite(path, array_chw, photometric="minisblack", planarconfig="separate")
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return path


def torchvision_steps_after_crop(crop, img_size, angle, shift, flip):
    """The float pipeline this project used before util.transforms (torchvision v2: Resize -> RandomRotation ->
    RandomAffine -> flips) with fixed parameters, on a float32 crop [C, s, s]: what the CPU and the --gpu_augment
    paths are compared with."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF
    x = TF.resize(crop, [img_size, img_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    x = TF.rotate(x, angle, interpolation=InterpolationMode.BILINEAR, fill=0)
    x = TF.affine(x, angle=0.0, translate=[int(v) for v in shift], scale=1.0, shear=[0.0, 0.0],
                  interpolation=InterpolationMode.NEAREST, fill=0)
    if flip[0]:
        x = TF.horizontal_flip(x)
    if flip[1]:
        x = TF.vertical_flip(x)
    return x


@pytest.fixture
def write_image():
    """The function write_image_file(path, array_chw, layout='channel_last') -> Path."""
    return write_image_file


@pytest.fixture
def make_image_folder(tmp_path):
    """Factory writing an ImageFolder tree of random images; returns the dataset root (a Path).

    make_image_folder(classes=('a', 'b'), n_per_class=2, size=32, channels=7, dtype='uint16',
                      layout='channel_last', splits=('train', 'val'), flat=False, name='data', seed=0)

    Writes <root>/<split>/<class>/<class>_<i>.<ext> for each split (or, with flat=True,
    <root>/<split>/img_<i>.<ext> without class folders, n_per_class images in all). `size` is an int or
    (height, width); `dtype` is 'uint8', 'uint16' or 'float32'; `layout` is one of write_image_file's
    ('channel_last', 'channel_first', 'planar' TIFF, or 'png' / 'jpeg', which need uint8 and 1 or 3
    channels). Use splits=('',) to write the classes (or flat images) directly into <root>.
    Each call with a new `name` makes a new tree under tmp_path.
    """
    def make(classes=("a", "b"), n_per_class=2, size=32, channels=7, dtype="uint16", layout="channel_last",
             splits=("train", "val"), flat=False, name="data", seed=0):
        rng = np.random.default_rng(seed)
        root = tmp_path / name
        extension = {"png": ".png", "jpeg": ".jpg"}.get(layout, ".tif")
        for split in splits:
            folder = root / split if split else root
            if flat:
                files = [folder / f"img_{i}{extension}" for i in range(n_per_class)]
            else:
                files = [folder / cls / f"{cls}_{i}{extension}" for cls in classes for i in range(n_per_class)]
            for path in files:
                write_image_file(path, random_image(rng, channels, size, dtype), layout)
        return root
    return make
