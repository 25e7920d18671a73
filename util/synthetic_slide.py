"""A small synthetic whole slide: the built-in synthetic cells (util/synthetic.py) laid out on one tiled, 12-bit,
7-channel OME-TIFF with named channels, plus the table of their centroids and cell types. It lets the slide
preparation (prepare_cells.py) run end to end on any machine:

    python -m util.synthetic_slide --output_dir demo_slide --grid 16
    python prepare_cells.py --image demo_slide/slide.ome.tif --cells demo_slide/cells.csv --output_dir demo_cells

Writes <output_dir>/slide.ome.tif (uint16 CYX, values 0..4095 as a 12-bit camera gives, 256-px tiles, OME channel
names DAPI, histones, NeuN, S100, Olig2, Iba1, RECA1) and <output_dir>/cells.csv (cell_id, x, y, cell_type).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import tifffile

from util.cli import run_tool
from util.errors import ConfigError
from util.synthetic import MARKERS, SyntheticCells

CELL_SIDE = 64  # side of each synthetic cell image placed on the slide
SPACING = 48  # distance between neighbouring cells (so that cells and their surroundings overlap a little)
MAX_VALUE = 4095  # a 12-bit camera: dtype scaling alone would make this data nearly black


def render_slide(grid: int, seed: int = 0):
    """(image [7, H, W] uint16, cells [(cell_id, x, y, cell_type)]) with grid x grid cells on jittered positions."""
    rng = np.random.default_rng(seed)
    cells = SyntheticCells(grid * grid, CELL_SIDE, len(MARKERS), seed=seed, split="slide")
    side = grid * SPACING + CELL_SIDE
    canvas = np.zeros((len(MARKERS), side, side), np.float32)
    table = []
    for index in range(len(cells)):
        top = (index // grid) * SPACING + int(rng.integers(0, SPACING // 4))
        left = (index % grid) * SPACING + int(rng.integers(0, SPACING // 4))
        region = canvas[:, top:top + CELL_SIDE, left:left + CELL_SIDE]
        np.maximum(region, cells.render(index), out=region)  # overlapping borders: the brighter pixel wins
        centre = (CELL_SIDE - 1) / 2
        table.append((index + 1, left + centre, top + centre, cells.classes[cells.label(index)]))
    return np.round(canvas * MAX_VALUE).astype(np.uint16), table


def write_synthetic_slide(output_dir, grid: int = 16, seed: int = 0) -> tuple:
    """Writes slide.ome.tif and cells.csv into `output_dir`; returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    image, table = render_slide(grid, seed)
    slide_path, table_path = output_dir / "slide.ome.tif", output_dir / "cells.csv"
    tifffile.imwrite(slide_path, image, tile=(256, 256), photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": list(MARKERS)}})
    with open(table_path, "w") as f:
        f.write("cell_id,x,y,cell_type\n")
        f.writelines(f"{cell_id},{x:.1f},{y:.1f},{cell_type}\n" for cell_id, x, y, cell_type in table)
    return slide_path, table_path


def get_args_parser():
    parser = argparse.ArgumentParser("DAMA synthetic slide", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder for slide.ome.tif and cells.csv")
    parser.add_argument("--grid", default=16, type=int, help="cells per side (grid x grid cells in all)")
    parser.add_argument("--seed", default=0, type=int, help="seed of the cells and their positions")
    return parser


def main(args):
    if args.grid < 1:
        raise ConfigError(f"--grid must be at least 1, got {args.grid}")
    slide, table = write_synthetic_slide(args.output_dir, args.grid, args.seed)
    print(f"Wrote {slide} ({args.grid * args.grid} cells, 7 named channels, 12-bit) and {table}")


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
