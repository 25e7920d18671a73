"""crossval.py on prepared cell datasets (prepare_cells.py): folds grouped by slide on a packed dataset, trained
from per-fold packed datasets; the --format tiff folder's groups found through its file column; and the
random-init row, which no checkpoint lying in the current folder may describe."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import crossval
import prepare_cells

SLIDES = ("s0", "s1", "s2", "s3")
CLASSES = ("astro", "neuron")
TINY = ["--arch", "main_vit_tiny", "--img_size", "32", "--patch_size", "8", "--val_crop", "32", "--batch_size", "4",
        "--num_workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Four 2-channel slides written by hand, 5 cells each (4 labelled, both classes on every slide, and one
    unlabelled), prepared twice by prepare_cells.py with a slide-grouped val split: packed and --format tiff."""
    root = tmp_path_factory.mktemp("slides")
    rng = np.random.default_rng(0)
    images, rows = [], []
    for s, slide in enumerate(SLIDES):
        path = root / f"{slide}.tif"
        tifffile.imwrite(path, rng.integers(0, 4096, (2, 64, 112)).astype(np.uint16), photometric="minisblack",
                         metadata={"axes": "CYX"})
        images += ["--image", str(path)]
        for n in range(5):  # classes alternate within a slide and between slides: the tiff listing reorders them
            label = "" if n == 4 else CLASSES[(n + s) % 2]
            rows.append(f"{slide},{n + 1},{16 + 20 * n},{20 + 6 * s},{label}")
    table = root / "cells.csv"
    table.write_text("slide,cell_id,x,y,label\n" + "\n".join(rows) + "\n")
    common = [*images, "--cells", str(table), "--crop_size", "32", "--val_fraction", "0.25", "--split_by", "slide"]
    parser = prepare_cells.get_args_parser()
    packed = prepare_cells.main(parser.parse_args([*common, "--output_dir", str(root / "packed")]))
    tiff = prepare_cells.main(parser.parse_args([*common, "--format", "tiff", "--output_dir", str(root / "tiff")]))
    return packed, tiff


def read_table(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_slides_apart(parts: dict, slide_of, cells):
    """No slide on two of the parts {test, train, val}, told by cells.csv (slide_of), not by folds.json's groups."""
    slides = {name: {slide_of[cell] for cell in part} for name, part in parts.items()}
    assert all(slides.values())
    assert not slides["test"] & (slides["train"] | slides["val"]) and not slides["train"] & slides["val"]
    assert sorted(cell for part in parts.values() for cell in part) == sorted(cells)  # each labelled cell once


def test_packed_crossval_groups_by_slide_and_scores_each_fold_dataset_test_split_once(prepared, tmp_path, capsys):
    from util.datasets import build_finetune_test_dataset
    import main_finetune

    packed, _ = prepared
    out = tmp_path / "cv"
    argv = ["--data_path", packed, "--group_by", "slide", "--folds", "2", "--val_fraction", "0.5", "--output_dir",
            out, "--checkpoints", "random", "--submitit", "--", *TINY, "--in_chans", "2", "--epochs", "1",
            "--cluster", "debug", "--ngpus", "1"]  # the debug cluster runs each job in this process
    assert crossval.main([str(a) for a in argv]) == 0

    source = read_table(packed / "cells.csv")
    slide_of = {int(row["index"]): row["slide"] for row in source}
    labelled = [int(row["index"]) for row in source if row["label"]]
    folds = json.loads((out / "folds.json").read_text())
    assert folds["data_layout"] == "packed" and folds["source"] == str(packed.resolve())
    assert folds["classes"] == list(CLASSES)
    tests = [e["index"] for fold in folds["folds"] for e in fold["test"]]
    assert sorted(tests) == sorted(labelled)  # the test folds partition the labelled cells, both splits pooled
    table = json.loads((out / "table.json").read_text())
    assert len(table["rows"]) == 1 and table["selection"].startswith("epoch chosen on an inner validation split "
                                                                     "(0.5 of each training part, grouped by slide)")
    for i, fold in enumerate(folds["folds"]):
        parts = {name: [e["index"] for e in fold[name]] for name in ("test", "train", "val")}
        check_slides_apart(parts, slide_of, labelled)
        assert all(e["group"] == slide_of[e["index"]] for name in parts for e in fold[name])

        # the fold's dataset: the same crops, the source's table with the fold's split, read by the scripts as is
        fold_dir = out / "fold_data" / f"fold_{i}"
        assert (fold_dir / "cells.npy").resolve() == (packed / "cells.npy").resolve()
        rows = read_table(fold_dir / "cells.csv")
        split_of = {cell: name for name, cells in parts.items() for cell in cells}
        assert [{**row, "split": ""} for row in rows] == [{**row, "split": ""} for row in source]
        assert [row["split"] for row in rows] == [split_of.get(int(row["index"]), "") for row in rows]
        args = main_finetune.get_args_parser().parse_args([*TINY, "--in_chans", "2", "--data_path", str(fold_dir)])
        test_set = build_finetune_test_dataset(args, list(CLASSES))
        assert sorted(test_set.indices.tolist()) == sorted(parts["test"])  # labels as the source's
        assert [CLASSES[label] for label in test_set.labels] == [slide_row["label"] for slide_row in
                                                                 (source[j] for j in test_set.indices)]

        log = [json.loads(line) for line in Path(table["rows"][0]["logs"][i]).read_text().splitlines()]
        assert log[-1]["selected_on"] == "val" and log[-1]["test_acc1"] == table["rows"][0]["folds"][i]
    assert "test images (scored once)" in capsys.readouterr().out

    # the prepared dataset itself has no test split: fine-tuning on it keeps choosing and measuring on val
    args = main_finetune.get_args_parser().parse_args([*TINY, "--in_chans", "2", "--data_path", str(packed)])
    assert build_finetune_test_dataset(args, list(CLASSES)) is None


def test_tiff_folder_groups_come_from_the_file_column(prepared, tmp_path):
    _, tiff = prepared
    args = crossval.get_args_parser().parse_args(["--data_path", str(tiff), "--group_by", "slide", "--folds", "2",
                                                  "--val_fraction", "0.5", "--output_dir", str(tmp_path / "cv"),
                                                  "--checkpoints", "random"])
    rows = read_table(tiff / "cells.csv")
    assert crossval.data_layout(args) == "tiff"
    samples, classes, _ = crossval.labelled_samples(args, "tiff")
    listed = [Path(path).relative_to(tiff.resolve()).as_posix() for path, _ in samples]
    in_table_order = [row["file"] for row in rows if row["label"]]
    assert sorted(listed) == sorted(in_table_order) and listed != in_table_order  # the listing reorders the rows
    assert classes == list(CLASSES)  # unlabelled/ is not a class

    folds = crossval.make_folds(args)
    by_file = {(tiff.resolve() / row["file"]).as_posix(): row for row in rows}
    for fold in folds["folds"]:
        for name in ("test", "train", "val"):
            for entry in fold[name]:
                row = by_file[entry["path"]]
                assert entry["group"] == row["slide"] and classes[entry["label"]] == row["label"]
                assert f"_{row['slide']}_" in Path(entry["path"]).name  # prepare_cells.py names files by slide
        check_slides_apart({name: [e["path"] for e in fold[name]] for name in ("test", "train", "val")},
                           {path: row["slide"] for path, row in by_file.items()},
                           [path for path, row in by_file.items() if row["label"]])

    fold_dir = crossval.write_fold_data(folds, 0, tmp_path / "fold_data")  # a prepared folder: names travel
    assert json.loads((fold_dir / "dataset.json").read_text()) == json.loads((tiff / "dataset.json").read_text())
    assert sorted(p.resolve().as_posix() for p in (fold_dir / "test").rglob("*.tif")) == \
        sorted(e["path"] for e in folds["folds"][0]["test"])


def test_random_init_row_ignores_a_checkpoint_in_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    decoy = tmp_path / "output_dir" / "checkpoint.pth"  # where main_finetune's default --output_dir points
    decoy.parent.mkdir()
    torch.save({"args": {"arch": "main_vit_small", "patch_size": 16, "in_chans": 3, "img_size": 64}, "model": {}},
               decoy)
    path = crossval.random_init_checkpoint(tmp_path / "cv", "main_finetune",
                                           ["--img_size", "32", "--patch_size", "8", "--epochs", "1"])
    saved = torch.load(path, weights_only=True)["args"]
    # the flags given, main_finetune's defaults for the rest (main_vit_tiny, 7 channels)
    assert {k: saved[k] for k in ("arch", "img_size", "patch_size", "in_chans", "seed")} == \
        {"arch": "main_vit_tiny", "img_size": 32, "patch_size": 8, "in_chans": 7, "seed": 0}


def test_packed_dataset_errors_are_one_line(prepared, tmp_path, capsys):
    packed, _ = prepared
    common = ["--folds", "2", "--output_dir", tmp_path / "cv", "--checkpoints", "random"]
    assert crossval.main([str(a) for a in ["--data_path", packed, "--group_by", "parent", *common]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--group_by parent:" in err and "e.g. --group_by slide" in err
    # a split saved for one dataset is not reused for another
    (tmp_path / "cv").mkdir(exist_ok=True)  # the failed call above made it
    crossval.load_or_make_folds(crossval.get_args_parser().parse_args(
        [str(a) for a in ["--data_path", packed, "--group_by", "slide", "--val_fraction", "0.5", *common]]))
    capsys.readouterr()
    assert crossval.main([str(a) for a in ["--data_path", prepared[1], "--group_by", "slide", "--val_fraction",
                                           "0.5", *common]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"holds a split of {packed.resolve()}" in err
