"""util.filelist: folder listings as numpy arrays, the index cache beside the output, the header scan and the
check of every file before training (all bad files at once, or left out with --skip_bad_files)."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main_pretrain
from util import filelist
from util.cli import error_line, run_tool
from util.errors import DataError
from util.filelist import FileList, check_files, list_folder, scan_headers


@pytest.fixture
def one_thread():
    """In-process training on one compute thread (as the subprocess tests' OMP_NUM_THREADS=1): on a busy
    2-core machine two torch threads mostly spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_jpeg(path: Path, size=(40, 30), mode="RGB", colour=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode) if colour is None else Image.new(mode, size, colour)
    image.save(path, format="JPEG", quality=90)
    return path


def truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


# ------------------------------------------------------------------------------------------------
# Listing
# ------------------------------------------------------------------------------------------------
def test_listing_is_sorted_like_paths_and_held_in_numpy_arrays(make_image_folder, write_image, tmp_path):
    root = make_image_folder(classes=("b", "a"), n_per_class=3, size=8, splits=("train",))
    train = root / "train"
    write_image(train / "a" / "sub" / "deep.tif", np.zeros((7, 8, 8), np.uint16))  # nested: found
    write_image(train / "a" / "a_1b.tif", np.zeros((7, 8, 8), np.uint16))
    (train / "a" / ".hidden.tif").write_bytes(b"x")  # hidden, and not an image: both left out
    (train / "a" / "notes.txt").write_text("x")
    (train / "a" / "a.tif.bak").write_text("x")
    files = list_folder(train, ["a", "b"])
    expected = sorted(p for p in train.rglob("*") if p.suffix == ".tif" and not p.name.startswith("."))
    assert [path for path, _ in files] == expected  # the order of sorted(Path), as before the file lists
    assert [label for _, label in files] == [0] * 5 + [1] * 3 and files.classes == ["a", "b"]
    assert files.path_bytes.dtype == np.uint8 and files.offsets.dtype == np.int64 and files.labels.dtype == np.int32
    assert files.offsets[-1] == len(files.path_bytes) == sum(len(str(p.relative_to(train))) for p in expected)

    kept = files.select(np.array([True, False, True, True, False, True, True, False]))
    assert [path for path, _ in kept] == [expected[i] for i in (0, 2, 3, 5, 6)]
    assert kept.labels.tolist() == [0, 0, 0, 1, 1] and len(files.select([])) == 0

    flat = list_folder(train / "b")  # a flat folder: label 0, one 'unlabelled' class
    assert [p.name for p, _ in flat] == ["b_0.tif", "b_1.tif", "b_2.tif"] and flat.classes == ["unlabelled"]
    assert FileList.from_samples([(expected[1], 4)])[0] == (expected[1], 4)
    (train / "c").mkdir()
    with pytest.raises(DataError, match=r"class folder 'c' is not one of the training classes"):
        list_folder(train, ["a", "b"])
    with pytest.raises(DataError, match=r"c: class folder holds no images"):
        list_folder(train, ["a", "b", "c"])


def test_index_is_reused_until_a_file_is_added_or_removed(make_image_folder, tmp_path, monkeypatch, capsys):
    root = make_image_folder(classes=("a", "b"), n_per_class=3, size=8, splits=("train",))
    folder, cache = root / "train", tmp_path / "out" / "data_index"
    first = list_folder(folder, ["a", "b"], cache)
    headers = scan_headers(first)
    (index_file,) = cache.glob("train-*.npz")
    assert first.index_path == index_file

    def no_walk(*_):
        raise AssertionError("the folder was listed again")

    def no_header(*_):
        raise AssertionError("a header was read again")

    with monkeypatch.context() as patch:  # an unchanged folder: neither listed nor scanned again
        patch.setattr(filelist, "_walk_folder", no_walk)
        patch.setattr(filelist, "read_header", no_header)
        again = list_folder(folder, ["a", "b"], cache)
        assert np.array_equal(again.path_bytes, first.path_bytes) and np.array_equal(again.labels, first.labels)
        assert np.array_equal(scan_headers(again).height, headers.height)
    assert "unchanged since it was written" in capsys.readouterr().out

    Image.new("I;16", (8, 8)).save(folder / "b" / "b_9.tif")  # a new file changes its folder's mtime
    added = list_folder(folder, ["a", "b"], cache)
    assert len(added) == 7 and added[6][0].name == "b_9.tif"
    assert "changed since it was written" in capsys.readouterr().out
    (folder / "a" / "a_0.tif").unlink()
    assert [p.name for p, _ in list_folder(folder, ["a", "b"], cache)][0] == "a_1.tif"
    index_file.write_bytes(b"not an index")  # a damaged cache is only a cache miss
    assert len(list_folder(folder, ["a", "b"], cache)) == 6


# ------------------------------------------------------------------------------------------------
# Header scan
# ------------------------------------------------------------------------------------------------
def test_headers_of_every_layout_and_the_same_from_a_process_pool(tmp_path, write_image):
    paths = [
        write_image(tmp_path / "yxs.tif", np.zeros((7, 12, 20), np.uint16), "channel_last"),
        write_image(tmp_path / "planar.tif", np.zeros((5, 10, 11), np.float32), "planar"),
        write_image(tmp_path / "grey16.png", np.zeros((1, 9, 6), np.uint16), "png"),
        write_jpeg(tmp_path / "rgb.jpg", (40, 30)),
        write_jpeg(tmp_path / "grey.jpeg", (16, 17), mode="L"),
        write_jpeg(tmp_path / "cmyk.JPG", (21, 22), mode="CMYK"),
    ]
    files = FileList.from_samples([(p, 0) for p in paths])
    serial = scan_headers(files, workers=1)
    shapes = list(zip(serial.channels.tolist(), serial.height.tolist(), serial.width.tolist()))
    assert shapes == [(7, 12, 20), (5, 10, 11), (1, 9, 6), (3, 30, 40), (1, 17, 16), (3, 22, 21)]
    assert [serial.layout_of(i) for i in range(6)] == ["TIFF YXS", "TIFF SYX", "PNG I;16", "JPEG RGB", "JPEG L",
                                                       "JPEG CMYK"]
    assert [serial.dtype_names[c] for c in serial.dtype] == ["uint16", "float32", "uint16", "uint8", "uint8",
                                                             "uint8"]
    pooled = scan_headers(files, workers=2, chunk_size=2)  # three chunks in two forked processes
    for name in ("channels", "height", "width", "dtype", "layout"):
        assert np.array_equal(getattr(pooled, name), getattr(serial, name)), name
    assert pooled.problems == serial.problems == {}


# ------------------------------------------------------------------------------------------------
# Bad files
# ------------------------------------------------------------------------------------------------
def test_all_bad_files_are_reported_at_once_or_left_out(tmp_path, write_image):
    folder = tmp_path / "photos"
    good = [write_jpeg(folder / f"good_{i:02d}.jpg") for i in range(8)]
    trailing = write_jpeg(folder / "good_trailing.jpg")
    trailing.write_bytes(trailing.read_bytes() + b"camera trailer")  # decodes fine: not bad
    bad = [truncate(write_jpeg(folder / f"bad_{i:02d}_truncated.jpg")) for i in range(4)]
    bad += [write_jpeg(folder / f"bad_{i:02d}_small.jpg", (10, 30)) for i in range(4, 7)]
    bad += [write_image(folder / "bad_07_grey16.png", np.zeros((1, 40, 40), np.uint16), "png")]  # 1 channel
    bad += [write_image(folder / f"bad_{i:02d}_cut.tif", np.ones((3, 40, 40), np.uint8)) for i in (8, 9)]
    truncate(bad[-1], 0.5), truncate(bad[-2], 0.5)
    (folder / "bad_10_garbage.png").write_bytes(b"not a png")
    (folder / "bad_11_garbage.tif").write_bytes(b"not a tiff")
    files = list_folder(folder)
    assert len(files) == 21

    with pytest.raises(DataError) as raised:
        check_files(files, in_chans=3, min_side=16)
    lines = error_line(raised.value).splitlines()
    assert lines[0] == (f"12 of 21 image files under {folder} cannot be used; fix or remove them, or pass "
                        f"--skip_bad_files to leave them out:")
    assert [line.split(":")[0].strip() for line in lines[1:11]] == [str(folder / f"bad_{i:02d}") + rest for i, rest in
                                                                  zip(range(10), ["_truncated.jpg"] * 4 + [
                                                                      "_small.jpg"] * 3 + ["_grey16.png"] + [
                                                                      "_cut.tif"] * 2)]
    assert "image file is truncated" in lines[1] and "30x10 pixels, smaller than the 16x16 crop" in lines[5]
    assert "has 1 channel(s) but --in_chans is 3" in lines[8] and "truncated: its pixel data" in lines[9]
    assert lines[11] == "  ... and 2 more" and len(lines) == 12

    kept, headers, (count, shown) = check_files(files, in_chans=3, min_side=16, skip_bad=True)
    assert [p.name for p, _ in kept] == [p.name for p in good] + ["good_trailing.jpg"]
    assert count == 12 and len(shown) == 10 and len(headers.height) == len(kept) == 9

    with pytest.raises(DataError) as raised:  # the --in_chans of another data set: every file is bad
        check_files(kept, in_chans=7, min_side=16, skip_bad=True)
    assert error_line(raised.value) == (f"{good[0]}: image has 3 channel(s) but --in_chans is 7 (the first of the "
                                        f"9 image files under {folder}, none of which can be used)")


def pretrain_args(*flags):
    parser = argparse.ArgumentParser(parents=[main_pretrain.get_args_parser()])
    return parser.parse_args(["--arch", "main_vit_tiny", "--img_size", "32", "--patch_size", "8",
                              "--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2",
                              "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--epochs", "1",
                              "--vis_freq", "0", *flags])


def test_a_corrupt_file_in_the_middle_stops_before_training_or_is_left_out(make_image_folder, tmp_path, capsys,
                                                                           one_thread):
    """The run fails before its first step, listing every bad file; --skip_bad_files trains without
    them and records how many in log.txt."""
    root = make_image_folder(classes=("a", "b"), n_per_class=8, size=40, splits=("train",))
    corrupt = [root / "train" / "a" / "a_5.tif", root / "train" / "b" / "b_2.tif"]
    for path in corrupt:
        path.write_bytes(b"not a tiff" * 10)
    out = tmp_path / "out"
    assert run_tool(main_pretrain.main, pretrain_args("--data_path", str(root), "--output_dir", str(out))) == 2
    captured = capsys.readouterr()
    assert "Start training" not in captured.out and not (out / "checkpoint.pth").exists()
    lines = captured.err.strip().splitlines()
    assert lines[0] == (f"error: 2 of 16 image files under {root / 'train'} cannot be used; fix or remove them, "
                        f"or pass --skip_bad_files to leave them out:")
    assert [line.split(": ")[0] for line in lines[1:]] == [f"  {path}" for path in corrupt]
    assert all("cannot read TIFF file" in line for line in lines[1:])

    args = pretrain_args("--data_path", str(root), "--output_dir", str(out), "--skip_bad_files")
    assert run_tool(main_pretrain.main, args) == 0
    captured = capsys.readouterr()
    assert "dataset: 14 images (2 bad files left out)" in captured.out
    assert "--skip_bad_files: leaving out 2 of 16 image files" in captured.out
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert log[0]["skipped_bad_files"] == 2 and log[0]["epoch"] == 0
