"""prepare_cells.py: slides in every supported layout, masks and tables, real microscopy shipped in registry
packages (stardist, ndev-sampledata: test-only, installed by .ci/run with --no-deps), the packed and TIFF outputs,
bounded memory on a tiled slide, and every bad input as one error line with no partial dataset."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import prepare_cells
from util.cli import run_tool
from util.normalize import apply_recipe
from util.packed import CELLS_NPY, PackedCells, read_cell_table, read_dataset_info

REPO = Path(__file__).resolve().parents[1]
INSTALL_HINT = "pip install --no-deps stardist==0.9.2 ndev-sampledata==0.0.3 (see .ci/run)"


def package_file(package: str, *parts) -> Path:
    """A data file shipped inside an installed package, found without importing it (its dependencies are absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        if os.environ.get("CI"):
            pytest.fail(f"test data package {package} is not installed: {INSTALL_HINT}")
        pytest.skip(f"test data package {package} is not installed: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def prepare(*argv) -> Path:
    """prepare_cells.main on parsed flags (in process); returns --output_dir."""
    return prepare_cells.main(prepare_cells.get_args_parser().parse_args([str(a) for a in argv]))


def crops_of(folder) -> np.ndarray:
    return np.load(Path(folder) / CELLS_NPY)


def expected_crop(image_chw: np.ndarray, cy: int, cx: int, size: int) -> np.ndarray:
    """The crop centred on (cy, cx), zero past the border, computed independently with np.pad."""
    half = size // 2
    padded = np.pad(image_chw, ((0, 0), (size, size), (size, size)))
    return padded[:, cy - half + size:cy - half + 2 * size, cx - half + size:cx - half + 2 * size]


def write_table(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------------
# Real microscopy shipped in registry packages
# --------------------------------------------------------------------------------------------------
def test_stardist_nuclei_crops_centred_on_their_labels_and_recipe_round_trips(tmp_path):
    image_path = package_file("stardist", "data", "images", "img2d.tif")
    mask_path = package_file("stardist", "data", "images", "mask2d.tif")
    out = prepare("--image", image_path, "--cells", mask_path, "--crop_size", 32, "--output_dir", tmp_path / "cells")
    image, mask = tifffile.imread(image_path), tifffile.imread(mask_path)
    labels, areas = np.unique(mask[mask > 0], return_counts=True)
    info, table, crops = read_dataset_info(out), read_cell_table(out), crops_of(out)
    assert info["num_cells"] == len(labels) == 125 and crops.shape == (125, 1, 32, 32) and crops.dtype == np.uint16
    ids = table["cell_id"].astype(int)
    assert sorted(ids) == labels.tolist() and table["area"].tolist() == areas[np.searchsorted(labels, ids)].tolist()
    # every crop's centre pixel lies inside its own nucleus (also the one whose centroid falls outside it)
    assert (mask[table["crop_y"], table["crop_x"]] == ids).all()
    rows, cols = np.indices(mask.shape)
    for i in range(0, 125, 7):  # centroids against an independent computation
        inside = mask == ids[i]
        assert table["y"][i] == pytest.approx(rows[inside].mean(), abs=1e-3)
        assert table["x"][i] == pytest.approx(cols[inside].mean(), abs=1e-3)
    # the recipe round-trips: the saved low/high applied to the raw slide give exactly the stored crops
    recipe = info["normalization"]
    assert recipe["method"] == "percentile" and recipe["percentiles"] == [1.0, 99.8]
    assert recipe["source_files"] == [str(image_path)] and recipe["channel_names"] == info["channel_names"]
    assert 0 < recipe["sample"]["pixels_per_channel"] <= 125 * prepare_cells.PIXELS_PER_SAMPLED_CELL
    low, high = recipe["low"][0], recipe["high"][0]
    assert np.percentile(image, 0.1) <= low < high <= image.max()
    for i in range(125):
        raw = expected_crop(image[None], table["crop_y"][i], table["crop_x"][i], 32)
        inside = expected_crop(np.ones_like(image)[None], table["crop_y"][i], table["crop_x"][i], 32) > 0
        expected = np.where(inside, apply_recipe(raw, recipe), 0)
        np.testing.assert_array_equal(crops[i], expected)
    manual = np.clip((image.astype(np.float64) - low) / (high - low), 0, 1) * 65535
    cy, cx = table["crop_y"][0], table["crop_x"][0]
    assert crops[0, 0, 16, 16] == np.floor(manual[cy, cx] + 0.5)
    # the training-side reader gives the same numbers, / 65535
    dataset = PackedCells(out)
    assert dataset.recipe == recipe and dataset.channel_names == info["channel_names"]
    np.testing.assert_array_equal(dataset.load(3).numpy() * 65535, crops[3].astype(np.float32))


def test_ome_channel_names_chosen_by_name_from_ndev_neurons(tmp_path):
    image_path = package_file("ndev_sampledata", "samples", "neuron-4Ch.tiff")
    image = tifffile.imread(image_path)  # [4, 623, 502]: AF647, AF568, AF488, DAPI
    cells = write_table(tmp_path / "cells.csv", ["x", "y", "class"],
                        [(250, 300, "soma"), (10.4, 5.6, "edge"), (501, 622, "corner"), (100, 200, "soma")])
    out = prepare("--image", image_path, "--cells", cells, "--channels", "dapi,AF488", "--normalize", "none",
                  "--crop_size", 16, "--output_dir", tmp_path / "cells")
    info, table, crops = read_dataset_info(out), read_cell_table(out), crops_of(out)
    assert info["channel_names"] == ["DAPI", "AF488"]  # the file's spelling, in the order asked for
    assert info["classes"] == ["corner", "edge", "soma"] and table["label"].tolist() == ["soma", "edge", "corner",
                                                                                         "soma"]
    assert info["normalization"]["method"] == "none"
    for i in range(4):
        np.testing.assert_array_equal(crops[i], expected_crop(image[[3, 2]], table["crop_y"][i], table["crop_x"][i],
                                                              16))
    assert table["crop_x"].tolist() == [250, 10, 501, 100] and table["crop_y"].tolist() == [300, 6, 622, 200]


def test_scratch_assay_nucleus_labels_from_a_channel_of_the_same_file(tmp_path):
    path = package_file("ndev_sampledata", "samples", "scratch-assay-labeled-10T-2Ch.tiff")
    data = tifffile.imread(path)  # CTYX: H3342, oblique, nuclei (labels), cyto (labels); 10 time points
    out = prepare("--image", path, "--select", "T=0", "--channels", "H3342,oblique", "--cells", path,
                  "--mask_channel", "nuclei", "--crop_size", 24, "--output_dir", tmp_path / "cells")
    nuclei = data[2, 0]
    table, info = read_cell_table(out), read_dataset_info(out)
    assert info["channel_names"] == ["H3342", "oblique"]
    assert sorted(table["cell_id"].astype(int)) == np.unique(nuclei[nuclei > 0]).tolist()
    assert (nuclei[table["crop_y"], table["crop_x"]] == table["cell_id"].astype(int)).all()


# --------------------------------------------------------------------------------------------------
# Memory: a tiled slide larger than the working set
# --------------------------------------------------------------------------------------------------
# Runs a script and prints the process's peak resident memory. VmHWM, not ru_maxrss: a child forked from this big
# pytest process keeps the parent's ru_maxrss across exec, while VmHWM starts afresh with the new program.
PEAK_RSS_WRAPPER = """
import re, runpy, sys
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    code = stop.code
with open("/proc/self/status") as status:
    print("peak_rss_kib", re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1), flush=True)
sys.exit(code)
"""


def tile_value(channel: int, tile_row: int, tile_col: int) -> int:
    return 1000 * channel + 10 * tile_row + tile_col


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc (Linux)")
def test_tiled_slide_prepared_with_memory_well_below_its_size(tmp_path):
    channels, side, tile = 7, 6144, 512
    grid = side // tile

    def tiles():  # written tile by tile: the test never holds the slide either
        for c in range(channels):
            for row in range(grid):
                for col in range(grid):
                    yield np.full((tile, tile), tile_value(c, row, col), np.uint16)

    slide = tmp_path / "big.ome.tif"
    tifffile.imwrite(slide, tiles(), shape=(channels, side, side), dtype=np.uint16, tile=(tile, tile),
                     photometric="minisblack", metadata={"axes": "CYX", "Channel": {"Name": [f"M{c}" for c in
                                                                                            range(channels)]}})
    slide_bytes = channels * side * side * 2
    rng = np.random.default_rng(0)
    centres = rng.integers(0, side, (300, 2))
    cells = write_table(tmp_path / "cells.csv", ["x", "y"], centres.tolist())
    out = tmp_path / "cells"
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_WRAPPER, "prepare_cells.py", "--image", str(slide), "--cells", str(cells),
         "--normalize", "none", "--crop_size", "32", "--output_dir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.split("peak_rss_kib")[-1].split()[0]) * 1024
    print(f"slide {slide_bytes / 2**20:.0f} MiB, peak resident memory of prepare_cells.py {peak / 2**20:.0f} MiB "
          f"({peak / slide_bytes:.2f} of the slide)")
    assert peak < 0.3 * slide_bytes
    crops, table = crops_of(out), read_cell_table(out)
    assert crops.shape == (300, 7, 32, 32)
    for i in range(0, 300, 23):  # the right tiles, channels and zero padding
        y, x = table["crop_y"][i], table["crop_x"][i]
        assert (x, y) == tuple(centres[i])
        rows, cols = np.arange(y - 16, y + 16), np.arange(x - 16, x + 16)
        for c in (0, 6):
            expected = np.array([[tile_value(c, r // tile, q // tile) if 0 <= r < side and 0 <= q < side else 0
                                  for q in cols] for r in rows])
            np.testing.assert_array_equal(crops[i, c], expected)


# --------------------------------------------------------------------------------------------------
# Slide layouts, several slides, splits, the TIFF output
# --------------------------------------------------------------------------------------------------
def write_layouts(folder: Path, image: np.ndarray, names) -> dict:
    """The same [C, H, W] image as a planar OME-TIFF, an interleaved TIFF without names, a per-marker folder, an
    OME-Zarr image and a pyramidal OME-TIFF whose lower level differs."""
    import zarr
    paths = {"ome": folder / "ome.ome.tif", "interleaved": folder / "interleaved.tif", "markers": folder / "markers",
             "zarr": folder / "img.ome.zarr", "pyramid": folder / "pyramid.ome.tif"}
    meta = {"axes": "CYX", "Channel": {"Name": list(names)}}
    tifffile.imwrite(paths["ome"], image, tile=(64, 64), photometric="minisblack", metadata=meta)
    tifffile.imwrite(paths["interleaved"], np.moveaxis(image, 0, -1), photometric="minisblack", planarconfig="contig")
    paths["markers"].mkdir()
    for name, plane in zip(names, image):
        tifffile.imwrite(paths["markers"] / f"{name}.tif", plane)
    group = zarr.open_group(str(paths["zarr"]), mode="w", zarr_format=2)
    group.create_array("0", shape=image.shape, chunks=(1, 64, 64), dtype=image.dtype)[:] = image
    group.create_array("1", shape=(image.shape[0], image.shape[1] // 2, image.shape[2] // 2), dtype=image.dtype)
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}, {"path": "1"}],
                                   "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"},
                                            {"name": "x", "type": "space"}]}]
    group.attrs["omero"] = {"channels": [{"label": name} for name in names]}
    with tifffile.TiffWriter(paths["pyramid"]) as tif:
        tif.write(image, subifds=1, tile=(64, 64), photometric="minisblack", metadata=meta)
        tif.write(np.zeros_like(image[:, ::2, ::2]), subfiletype=1, tile=(64, 64), photometric="minisblack")
    return paths


def test_every_slide_layout_gives_the_same_crops(tmp_path):
    rng = np.random.default_rng(1)
    names = ("DAPI", "NeuN", "S100")
    image = rng.integers(0, 4096, (3, 150, 170), dtype=np.uint16)
    paths = write_layouts(tmp_path, image, names)
    cells = write_table(tmp_path / "cells.csv", ["cell_id", "x", "y"],
                        [(7, 0, 0), (8, 169, 149), (9, 85.5, 70.2), (10, 3, 140)])
    results = {}
    for kind, path in paths.items():
        extra = ["--channel_names", "DAPI,NeuN,S100"] if kind == "interleaved" else []
        out = prepare("--image", path, "--cells", cells, "--channels", "s100,dapi", "--normalize", "none",
                      "--crop_size", 20, "--output_dir", tmp_path / f"out_{kind}", *extra)
        assert read_dataset_info(out)["channel_names"] == ["S100", "DAPI"], kind
        results[kind] = crops_of(out)
    table = read_cell_table(tmp_path / "out_ome")
    assert table["cell_id"].tolist() == ["7", "8", "9", "10"]
    for i in range(4):
        np.testing.assert_array_equal(results["ome"][i], expected_crop(image[[2, 0]], table["crop_y"][i],
                                                                       table["crop_x"][i], 20))
    for kind in paths:
        np.testing.assert_array_equal(results[kind], results["ome"], err_msg=kind)


def test_several_slides_one_table_split_by_slide_and_tiff_output(tmp_path):
    rng = np.random.default_rng(2)
    names = ("DAPI", "NeuN")
    slides = []
    for k in range(3):
        path = tmp_path / f"slide{k}.ome.tif"
        tifffile.imwrite(path, rng.integers(0, 4096, (2, 80, 90), dtype=np.uint16), photometric="minisblack",
                         metadata={"axes": "CYX", "Channel": {"Name": list(names[::-1] if k == 2 else names)}})
        slides.append(path)
    rows = [(f"slide{k}", i, 10 + 7 * i, 5 + 6 * i, "ab"[i % 2]) for k in range(3) for i in range(10)]
    cells = write_table(tmp_path / "cells.tsv", ["slide", "cell_id", "x", "y", "type"], rows)
    cells.write_text(cells.read_text().replace(",", "\t"))
    common = ["--image", slides[0], "--image", slides[1], "--image", slides[2], "--cells", cells, "--crop_size", 16,
              "--val_fraction", "0.3", "--split_by", "slide", "--seed", "3"]
    packed = prepare(*common, "--output_dir", tmp_path / "packed")
    info, table = read_dataset_info(packed), read_cell_table(packed)
    assert info["counts"]["per_slide"] == {"slide0": 10, "slide1": 10, "slide2": 10}
    assert info["classes"] == ["a", "b"] and info["split"]["split_by"] == "slide"
    for name in ("slide0", "slide1", "slide2"):  # a slide is wholly on one side
        assert len(set(table["split"][table["slide"] == name])) == 1
    assert set(table["split"]) == {"train", "val"}
    # slide2 stores its channels the other way round: matched by name, so the crops are in DAPI, NeuN order
    crops = crops_of(packed)
    raw2 = tifffile.imread(slides[2])
    recipe = info["normalization"]
    i = int(np.nonzero(table["slide"] == "slide2")[0][4])
    raw = expected_crop(raw2[[1, 0]], table["crop_y"][i], table["crop_x"][i], 16)
    valid = expected_crop(np.ones_like(raw2[:2]), table["crop_y"][i], table["crop_x"][i], 16) > 0
    np.testing.assert_array_equal(crops[i], np.where(valid, apply_recipe(raw, recipe), 0))

    # --format tiff: the train/<class>/ folders the scripts read, same numbers and the same dataset.json fields
    tiff = prepare(*common, "--format", "tiff", "--output_dir", tmp_path / "tiff")
    tiff_table = read_cell_table(tiff)
    files = [row.split(",")[-1] for row in (tiff / "cells.csv").read_text().splitlines()[1:]]
    assert read_dataset_info(tiff)["layout"] == "tiff" and tiff_table["split"].tolist() == table["split"].tolist()
    for i in (0, 13, 29):
        assert files[i].startswith(f"{table['split'][i]}/{table['label'][i]}/")
        np.testing.assert_array_equal(tifffile.imread(tiff / files[i]), crops[i])


def test_stratified_cell_split_is_seeded(tmp_path):
    image = tmp_path / "img.tif"
    tifffile.imwrite(image, np.arange(60 * 60, dtype=np.uint16).reshape(60, 60))
    cells = write_table(tmp_path / "cells.csv", ["x", "y", "label"],
                        [(i % 60, i // 2, "abc"[i % 3]) for i in range(60)])
    splits = []
    for run in range(2):
        out = prepare("--image", image, "--cells", cells, "--crop_size", 8, "--val_fraction", "0.2",
                      "--output_dir", tmp_path / f"out{run}")
        table = read_cell_table(out)
        splits.append(table["split"].tolist())
        for label in "abc":
            assert (table["split"][table["label"] == label] == "val").sum() == 4  # 20% of each class's 20 cells
    assert splits[0] == splits[1]


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing left behind
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def small_inputs(tmp_path):
    image = np.random.default_rng(0).integers(0, 4096, (2, 40, 50), dtype=np.uint16)
    paths = {"image": tmp_path / "img.ome.tif", "mask": tmp_path / "mask.tif", "table": tmp_path / "cells.csv"}
    tifffile.imwrite(paths["image"], image, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "NeuN"]}})
    mask = np.zeros((40, 50), np.uint16)
    mask[5:10, 5:10], mask[20:30, 30:40] = 1, 2
    tifffile.imwrite(paths["mask"], mask)
    write_table(paths["table"], ["x", "y"], [(3, 4), (20, 30)])
    return paths


def bad_case(name, paths, tmp_path):
    """(flags, expected text in the error line) of one kind of bad input."""
    image, table = str(paths["image"]), str(paths["table"])
    if name == "unknown_channel":
        return ["--image", image, "--cells", table, "--channels", "DAPI,GFAP"], "'GFAP' is not a channel of"
    if name == "mask_size":
        tifffile.imwrite(tmp_path / "m.tif", np.ones((40, 49), np.uint16))
        return ["--image", image, "--cells", str(tmp_path / "m.tif")], "is 40x49 pixels but --image"
    if name == "float_mask":
        tifffile.imwrite(tmp_path / "m.tif", np.ones((40, 50), np.float32))
        return ["--image", image, "--cells", str(tmp_path / "m.tif")], "mask pixels are float32"
    if name == "empty_mask":
        tifffile.imwrite(tmp_path / "m.tif", np.zeros((40, 50), np.uint16))
        return ["--image", image, "--cells", str(tmp_path / "m.tif")], "the mask is empty"
    if name == "no_coordinates":
        write_table(tmp_path / "t.csv", ["row", "col"], [(1, 2)])
        return ["--image", image, "--cells", str(tmp_path / "t.csv")], "no x coordinate column"
    if name == "outside":
        write_table(tmp_path / "t.csv", ["x", "y"], [(3, 4), (50, 10), (3, 40)])
        return ["--image", image, "--cells", str(tmp_path / "t.csv")], "2 centroid(s) lie outside the 50x40"
    if name == "duplicate_ids":
        write_table(tmp_path / "t.csv", ["cell_id", "x", "y"], [(1, 3, 4), (2, 5, 5), (1, 6, 6)])
        return ["--image", image, "--cells", str(tmp_path / "t.csv")], "cell id '1' occurs 2 times"
    if name == "unreadable":
        (tmp_path / "bad.tif").write_bytes(b"II*\x00 this is not a TIFF")
        return ["--image", str(tmp_path / "bad.tif"), "--cells", table], "bad.tif: cannot read TIFF file"
    if name == "float_slide_none":  # fails while crops are written: the staged folder must vanish
        tifffile.imwrite(tmp_path / "f.tif", np.full((40, 50), 3.0, np.float32))
        return ["--image", str(tmp_path / "f.tif"), "--cells", table, "--normalize", "none"], "outside [0, 1]"
    raise ValueError(name)


BAD_CASES = ("unknown_channel", "mask_size", "float_mask", "empty_mask", "no_coordinates", "outside",
             "duplicate_ids", "unreadable", "float_slide_none")


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_input_is_one_line_and_leaves_no_dataset(name, small_inputs, tmp_path, capsys):
    flags, expected = bad_case(name, small_inputs, tmp_path)
    out = tmp_path / "out"
    args = prepare_cells.get_args_parser().parse_args(flags + ["--output_dir", str(out), "--crop_size", "8"])
    assert run_tool(prepare_cells.main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_existing_output_dir_is_kept_and_cli_exits_2(small_inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    command = [sys.executable, "prepare_cells.py", "--image", str(small_inputs["image"]), "--cells",
               str(small_inputs["mask"]), "--crop_size", "8", "--output_dir", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "exists and is not empty; choose a new folder or pass --overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    result = subprocess.run(command + ["--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and read_dataset_info(out)["num_cells"] == 2
    assert (crops_of(out)[:, :, 4, 4] > 0).any()


def test_unknown_format_version_is_refused(small_inputs, tmp_path):
    out = prepare("--image", small_inputs["image"], "--cells", small_inputs["table"], "--crop_size", 8,
                  "--output_dir", tmp_path / "out")
    info = json.loads((out / "dataset.json").read_text())
    info["format_version"] = 99
    (out / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="format version 99 is not known to this code, which reads version 1"):
        PackedCells(out)
