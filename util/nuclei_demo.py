"""A small labelled slide from real microscopy: stardist's 2-D nuclei image and its instance mask (shipped inside the
stardist package, found without importing it: `pip install --no-deps stardist==0.9.2`), with a toy class per
nucleus, so that fine-tuning and predict_cells.py can run end to end on real pixels:

    python -m util.nuclei_demo --output_dir output_dir/nuclei
    python prepare_cells.py --image output_dir/nuclei/nuclei.tif --cells output_dir/nuclei/nuclei.csv \
        --channel_names DAPI --crop_size 32 --val_fraction 0.2 --output_dir output_dir/nuclei_cells

Writes <output_dir>/nuclei.tif (the 512 x 512 uint16 image), nuclei_mask.tif (its 125 labelled nuclei) and
nuclei.csv (cell_id = mask label, x, y = centroid, cell_type = dim / medium / bright: the tercile of the nucleus's
mean intensity). The classes stand in for cell types (the image has none) as a marker's level would, and a model
can learn them from the crop.
"""
import argparse
import csv
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import tifffile

from util.cli import run_tool
from util.errors import DataError

STARDIST_IMAGES = ("data", "images")
CLASSES = ("dim", "medium", "bright")
INSTALL_HINT = "pip install --no-deps stardist==0.9.2"


def stardist_files() -> tuple:
    """(image, mask) paths of stardist's 2-D nuclei example; DataError when the package is not installed."""
    spec = importlib.util.find_spec("stardist")  # finds the package without running it (its dependencies are absent)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the stardist package (which ships the nuclei image) is not installed: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0]).joinpath(*STARDIST_IMAGES)
    image, mask = folder / "img2d.tif", folder / "mask2d.tif"
    if not image.is_file() or not mask.is_file():
        raise DataError(f"{folder}: img2d.tif / mask2d.tif not found; reinstall with {INSTALL_HINT}")
    return image, mask


def nuclei_table(image: np.ndarray, mask: np.ndarray) -> list:
    """[(cell_id, x, y, cell_type)] for every label of an instance mask [H, W]: the centroid (x = column) and the
    tercile of the label's mean intensity in `image` [H, W]."""
    labels = mask.ravel()
    rows, cols = np.indices(mask.shape)
    area = np.bincount(labels)
    ids = np.flatnonzero(area)
    ids = ids[ids > 0]
    y = np.bincount(labels, weights=rows.ravel())[ids] / area[ids]
    x = np.bincount(labels, weights=cols.ravel())[ids] / area[ids]
    brightness = np.bincount(labels, weights=image.ravel().astype(np.float64))[ids] / area[ids]
    edges = np.quantile(brightness, [1 / 3, 2 / 3])
    classes = np.searchsorted(edges, brightness, side="right")  # 0, 1, 2
    return [(int(i), round(float(cx), 3), round(float(cy), 3), CLASSES[c]) for i, cx, cy, c in zip(ids, x, y, classes)]


def write_nuclei_demo(output_dir) -> dict:
    """Copy the image and mask into `output_dir` and write nuclei.csv; returns their paths."""
    image, mask = stardist_files()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = dict(image=output_dir / "nuclei.tif", mask=output_dir / "nuclei_mask.tif", table=output_dir / "nuclei.csv")
    shutil.copyfile(image, paths["image"])
    shutil.copyfile(mask, paths["mask"])
    with open(paths["table"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cell_id", "x", "y", "cell_type"])
        writer.writerows(nuclei_table(tifffile.imread(image), tifffile.imread(mask)))
    return paths


def main(args):
    paths = write_nuclei_demo(args.output_dir)
    print(f"Wrote {paths['image']}, {paths['mask']} and {paths['table']} (125 nuclei, classes "
          f"{', '.join(CLASSES)} by mean intensity)")
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser("stardist nuclei demo slide", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder for nuclei.tif, nuclei_mask.tif, nuclei.csv")
    sys.exit(run_tool(main, parser.parse_args()))
