"""Intensity normalisation recipes: one format for prepared slides (prepare_cells.py) and folder data (--normalize).

A recipe is a JSON-able dict that says how raw pixel values become the uint16 numbers the models are trained on:

    {"method": "percentile",            # or "none": dtype scaling (uint16 kept, uint8 x 257, floats in [0, 1] x 65535)
     "percentiles": [1.0, 99.8],        # per-channel percentiles of the raw values ...
     "low": [...], "high": [...],       # ... and the raw values they gave, one per channel
     "channel_names": [...] or None,    # the channels the values belong to, in order
     "source_files": [...],             # what the sample came from
     "sample": {"pixels_per_channel": N, "files" or "cells": K, "seed": S},
     "output": "uint16"}

Applying it: raw -> clip((raw - low) / (high - low), 0, 1), delivered as uint16 (x 65535, rounded half up). A
packed dataset stores exactly these numbers; a folder dataset with a recipe computes them when it reads a file;
both divide by 65535 before the augmentation, so prepared and normalised folder data are the same floats.
The estimate always comes from a bounded, seeded sample (a fixed number of files or cells and pixels), never
from all pixels at once.

This module imports numpy only (prepare_cells.py must not pay for torch); `read_normalized` and
`estimate_folder_recipe` import the file reader when called.
"""
import math

import numpy as np

from util.errors import ConfigError, DataError

RECIPE_METHODS = ("none", "percentile")
DEFAULT_PERCENTILES = (1.0, 99.8)
UINT16_MAX = 65535
# The bounded sample behind a folder recipe: this many files (seeded choice), this many pixels per channel in all
FOLDER_SAMPLE_FILES = 64
SAMPLE_PIXELS_PER_CHANNEL = 1_000_000


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------
def add_normalize_args(parser, what: str = "the training files"):
    """--normalize {none,percentile} and --clip_percentiles LOW HIGH (used by main_pretrain/main_finetune)."""
    parser.add_argument("--normalize", default="none", choices=RECIPE_METHODS,
                        help="intensity scaling of folder data: none = by dtype (uint16 / 65535, as the reference); "
                             f"percentile = per-channel --clip_percentiles estimated from a bounded sample of {what}, "
                             "stored in the checkpoint and applied unchanged by fine-tuning, evaluation and export "
                             "(packed datasets carry their own recipe)")
    parser.add_argument("--clip_percentiles", default=list(DEFAULT_PERCENTILES), type=float, nargs=2,
                        metavar=("LOW", "HIGH"), help="percentiles mapped to 0 and 1 by --normalize percentile")
    return parser


def check_percentiles(percentiles) -> list:
    """[low, high] as floats with 0 <= low < high <= 100; ConfigError naming --clip_percentiles otherwise."""
    low, high = (float(p) for p in percentiles)
    if not (0.0 <= low < high <= 100.0):
        raise ConfigError(f"--clip_percentiles {low:g} {high:g}: expected 0 <= LOW < HIGH <= 100")
    return [low, high]


# --------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------
def none_recipe(channel_names=None, source_files=()) -> dict:
    """The dtype-scaling recipe (what the reference does): uint16 kept, uint8 x 257, floats in [0, 1] x 65535."""
    return {"method": "none", "channel_names": _names(channel_names), "source_files": [str(f) for f in source_files],
            "output": "uint16"}


def percentile_recipe(sample: np.ndarray, percentiles, channel_names=None, source_files=(), sample_info=None) -> dict:
    """Per-channel percentile recipe from `sample` [C, N] raw values (any real dtype)."""
    low_p, high_p = check_percentiles(percentiles)
    if sample.ndim != 2 or sample.shape[1] == 0:
        raise DataError(f"cannot estimate percentiles from an empty sample (shape {tuple(sample.shape)})")
    low, high = [], []
    for channel in sample:  # one channel at a time: the float64 copy np.percentile makes stays one channel big
        lo, hi = np.percentile(channel, [low_p, high_p])
        low.append(float(lo))
        high.append(float(hi))
    return {"method": "percentile", "percentiles": [low_p, high_p], "low": low, "high": high,
            "channel_names": _names(channel_names), "source_files": [str(f) for f in source_files],
            "sample": dict(sample_info or {}, pixels_per_channel=int(sample.shape[1])), "output": "uint16"}


def _names(channel_names):
    return None if channel_names is None else [str(n) for n in channel_names]


def check_recipe(recipe, where: str, error=DataError) -> dict:
    """`recipe` if it is a recipe this code can apply; `error` naming `where` (a file or checkpoint) otherwise."""
    if not isinstance(recipe, dict) or recipe.get("method") not in RECIPE_METHODS:
        method = recipe.get("method") if isinstance(recipe, dict) else type(recipe).__name__
        raise error(f"{where}: normalisation recipe method {method!r} is not known; expected one of {RECIPE_METHODS}")
    if recipe["method"] == "percentile":
        low, high = recipe.get("low"), recipe.get("high")
        if not (isinstance(low, list) and isinstance(high, list) and len(low) == len(high) > 0
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in low + high)):
            raise error(f"{where}: percentile recipe needs equally long, finite 'low' and 'high' lists; "
                        f"got low={low!r}, high={high!r}")
    return recipe


def is_percentile(recipe) -> bool:
    return isinstance(recipe, dict) and recipe.get("method") == "percentile"


def describe(recipe) -> str:
    """One line for logs: the method and, for percentiles, the per-channel values."""
    if not isinstance(recipe, dict):
        return "dtype scaling (no recipe)"
    if recipe["method"] != "percentile":
        return "dtype scaling (uint16 kept, uint8 x 257, floats in [0, 1] x 65535)"
    names = recipe.get("channel_names") or [f"channel {i}" for i in range(len(recipe["low"]))]
    values = ", ".join(f"{n} {lo:g}..{hi:g}" for n, lo, hi in zip(names, recipe["low"], recipe["high"]))
    low_p, high_p = recipe["percentiles"]
    return f"percentiles {low_p:g}/{high_p:g} per channel: {values}"


# --------------------------------------------------------------------------------------------------
# Application
# --------------------------------------------------------------------------------------------------
def apply_recipe(raw: np.ndarray, recipe, where="image") -> np.ndarray:
    """Raw values [C, ...] -> uint16 of the same shape, as the recipe says.

    percentile: clip((raw - low) / (high - low), 0, 1) * 65535, rounded half up; a channel whose sample was
    constant (high == low) becomes 0 below or at that value and 65535 above it. none / no recipe: by dtype.
    """
    if not is_percentile(recipe):
        return scale_by_dtype(raw, where)
    low, high = np.asarray(recipe["low"], np.float64), np.asarray(recipe["high"], np.float64)
    channels = raw.shape[0]
    if channels != len(low):
        raise DataError(f"{where}: has {channels} channel(s) but the normalisation recipe has {len(low)} "
                        f"({recipe.get('channel_names') or 'unnamed'})")
    out = np.empty(raw.shape, np.uint16)
    span = np.where(high > low, high - low, 0.0)
    for c in range(channels):  # float32 working copy of one channel at a time
        values = raw[c].astype(np.float32) - np.float32(low[c])
        if span[c] > 0:
            values *= np.float32(UINT16_MAX / span[c])
        else:
            values = np.where(values > 0, np.float32(UINT16_MAX), np.float32(0))
        np.clip(values, 0, UINT16_MAX, out=values)
        out[c] = np.floor(values + np.float32(0.5))
    return out


def scale_by_dtype(raw: np.ndarray, where="image") -> np.ndarray:
    """The 'none' recipe: uint16 as is, uint8 x 257 (= /255 after /65535), floats in [0, 1] x 65535 rounded."""
    kind, size = raw.dtype.kind, raw.dtype.itemsize
    if kind == "u" and size == 2:
        return raw.astype(np.uint16, copy=False)
    if kind == "u" and size == 1:
        return raw.astype(np.uint16) * np.uint16(257)
    if kind == "f":
        values = raw.astype(np.float32)
        if not np.isfinite(values).all() or values.min(initial=0) < 0 or values.max(initial=0) > 1:
            raise DataError(f"{where}: float values outside [0, 1] (or not finite) cannot be kept as they are; "
                            "use --normalize percentile")
        return np.floor(values * np.float32(UINT16_MAX) + np.float32(0.5)).astype(np.uint16)
    raise DataError(f"{where}: pixel type {raw.dtype} cannot be scaled by its dtype; expected uint8, uint16 or float "
                    "in [0, 1] (or use --normalize percentile)")


def read_normalized(path, recipe):
    """One image file as float32 torch [C, H, W] in [0, 1]: raw values -> recipe -> uint16 -> / 65535, the same
    numbers a packed dataset prepared with this recipe holds."""
    import torch  # here, not at the top: prepare_cells.py imports this module without torch

    from util.io import read_raw_chw
    normalized = apply_recipe(read_raw_chw(path), recipe, where=str(path))
    return torch.from_numpy(normalized.astype(np.float32) / np.float32(UINT16_MAX))


# --------------------------------------------------------------------------------------------------
# Estimation from a bounded sample
# --------------------------------------------------------------------------------------------------
def sample_pixels(values: np.ndarray, count: int, rng) -> np.ndarray:
    """At most `count` pixels of `values` [C, N]: a seeded random subset of the columns (all when N <= count)."""
    if values.shape[1] <= count:
        return values
    return values[:, np.sort(rng.choice(values.shape[1], count, replace=False))]


def estimate_folder_recipe(files, percentiles, channel_names=None, seed: int = 0) -> dict:
    """Percentile recipe from a bounded sample of the image files `files` (a util.filelist.FileList: only the
    chosen paths are built): FOLDER_SAMPLE_FILES of them chosen with `seed`, and SAMPLE_PIXELS_PER_CHANNEL / files
    random pixels of each (read in the stored dtype)."""
    from util.io import read_raw_chw  # here, not at the top: util.io imports torch
    if not len(files):
        raise DataError("--normalize percentile: no files to estimate the percentiles from")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(files), min(FOLDER_SAMPLE_FILES, len(files)), replace=False))
    paths = {i: files.path(i) for i in chosen}
    per_file = max(1, SAMPLE_PIXELS_PER_CHANNEL // len(chosen))
    parts, channels = [], None
    for i in chosen:
        raw = read_raw_chw(paths[i])
        if channels is not None and raw.shape[0] != channels:
            raise DataError(f"{paths[i]}: has {raw.shape[0]} channel(s) but {paths[chosen[0]]} has {channels}")
        channels = raw.shape[0]
        parts.append(sample_pixels(raw.reshape(channels, -1), per_file, rng))
    sample = np.concatenate(parts, axis=1)
    return percentile_recipe(sample, percentiles, channel_names, [str(paths[i]) for i in chosen],
                             {"files": len(chosen), "seed": seed})
