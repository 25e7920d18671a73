"""Prepared data in the training scripts: the packed reader (splits, labels, DataLoader workers, the cell table),
channel names and the normalisation recipe that travel with the model, and --normalize percentile for folder
data, applied unchanged downstream."""
import argparse
import pickle

import numpy as np
import pytest
import tifffile
import torch

import extract_features
import main_finetune
import main_pretrain
import prepare_cells
from util.channels import check_channel_names
from util.checkpoint import load_checkpoint, run_identity
from util.convert import export_encoder
from util.datasets import build_finetune_dataset, build_pretrain_dataset
from util.errors import CheckpointError, DataError
from util.misc import init_distributed_mode
from util.normalize import UINT16_MAX, apply_recipe
from util.packed import PackedCells, read_dataset_info
from util.synthetic import MARKERS
from util.synthetic_slide import write_synthetic_slide

TINY = ["--arch", "main_vit_tiny", "--img_size", "32", "--patch_size", "8", "--batch_size", "4", "--num_workers", "0",
        "--device", "cpu", "--epochs", "1", "--warmup_epochs", "0"]
TINY_DECODER = ["--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A synthetic slide (6 x 6 cells, 7 named 12-bit channels), prepared twice: in the slide's channel order, and
    with DAPI and histones swapped."""
    root = tmp_path_factory.mktemp("demo")
    slide, table = write_synthetic_slide(root / "slide", grid=6)
    common = ["--image", str(slide), "--cells", str(table), "--crop_size", "32", "--val_fraction", "0.3"]
    parse = prepare_cells.get_args_parser().parse_args
    packed = prepare_cells.main(parse(common + ["--output_dir", str(root / "packed")]))
    swapped = prepare_cells.main(parse(common + ["--output_dir", str(root / "swapped"), "--channels",
                                                 "histones,DAPI,NeuN,S100,Olig2,Iba1,RECA1"]))
    return dict(root=root, slide=slide, packed=packed, swapped=swapped)


def data_args(path, **changes):
    return argparse.Namespace(**{**dict(dataset="folder", data_path=str(path), img_size=32, in_chans=7, val_crop=32,
                                        seed=0), **changes})


def test_packed_reader_splits_labels_workers_and_cell_table(demo):
    packed = demo["packed"]
    info = read_dataset_info(packed)
    cells = np.load(packed / "cells.npy")
    train = build_finetune_dataset(True, data_args(packed))
    val = build_finetune_dataset(False, data_args(packed))
    pretrain = build_pretrain_dataset(data_args(packed))
    assert isinstance(val, PackedCells) and len(train) + len(val) == info["num_cells"] == 36
    assert len(pretrain) == len(train)  # pretraining reads the train split, as it reads train/ of a folder
    assert train.classes == info["classes"] == sorted(set(info["counts"]["per_class"]))
    assert train.channel_names == list(MARKERS)
    rows = val.cell_table()
    assert [row["split"] for row in rows] == ["val"] * len(val)
    for i, row in enumerate(rows):  # labels from cells.csv; raw pixels / 65535 before the transform
        image, label = val[i]
        assert val.classes[label] == row["label"] and image.shape == (7, 32, 32) and image.dtype == torch.float32
        np.testing.assert_array_equal(val.load(i).numpy() * UINT16_MAX, cells[row["index"]].astype(np.float32))
        np.testing.assert_allclose(image.numpy(), cells[row["index"]] / UINT16_MAX, atol=1e-6)  # centre crop 32
    # the memory map is opened per process, never pickled; two workers give what the main process reads
    assert pickle.loads(pickle.dumps(val))._cells is None
    loader = torch.utils.data.DataLoader(val, batch_size=4, num_workers=2)
    images = torch.cat([batch for batch, _ in loader])
    assert torch.equal(images, torch.stack([val[i][0] for i in range(len(val))]))
    # too small crops for the transform, or another channel count, are one-line errors
    with pytest.raises(DataError, match="crops are 32 px but this transform needs at least 64 px"):
        build_pretrain_dataset(data_args(packed, img_size=128))
    with pytest.raises(DataError, match="have 7 channels .* but --in_chans is 3"):
        build_pretrain_dataset(data_args(packed, in_chans=3))


def test_channel_names_and_recipe_travel_from_pretraining_to_every_consumer(demo, tmp_path, capsys):
    out = tmp_path / "pre"
    args = main_pretrain.get_args_parser().parse_args(
        [*TINY, *TINY_DECODER, "--data_path", str(demo["packed"]), "--output_dir", str(out), "--vis_freq", "0"])
    main_pretrain.main(args)
    saved = load_checkpoint(out / "checkpoint.pth")["args"]
    info = read_dataset_info(demo["packed"])
    assert saved["channel_names"] == list(MARKERS) and saved["normalization"] == info["normalization"]

    def finetune(data, *extra):
        flags = [*TINY, "--val_crop", "32", "--data_path", str(data), "--finetune", str(out / "checkpoint.pth"),
                 "--output_dir", str(tmp_path / "ft"), *extra]
        args = main_finetune.get_args_parser().parse_args(flags)
        identity = run_identity(args)  # what main_finetune.main does before setup
        main_finetune.resolve_defaults(args)
        init_distributed_mode(args)
        return main_finetune.setup(args, identity)

    run = finetune(demo["packed"])
    assert run["num_classes"] == len(info["classes"])
    swapped = ['histones', 'DAPI', 'NeuN', 'S100', 'Olig2', 'Iba1', 'RECA1']
    with pytest.raises(CheckpointError) as error:
        finetune(demo["swapped"])
    assert f"was trained on {list(MARKERS)}" in str(error.value) and f"has {swapped}" in str(error.value)
    assert "--ignore_channel_names" in str(error.value)
    finetune(demo["swapped"], "--ignore_channel_names")  # the override
    assert "(ignored)" in capsys.readouterr().out
    extract = extract_features.get_args_parser().parse_args(
        ["--checkpoint", str(out / "checkpoint.pth"), "--data_path", str(demo["swapped"]), "--out",
         str(tmp_path / "f.npz"), "--device", "cpu", "--num_workers", "0", "--val_crop", "32"])
    with pytest.raises(CheckpointError, match="channel names differ"):
        extract_features.main(extract)
    extract.data_path = str(demo["packed"])
    features = np.load(extract_features.main(extract))
    assert features["features"].shape == (36, 192) and str(features["paths"][0]) == "slide:1"
    metadata = export_encoder(str(out / "checkpoint.pth"), str(tmp_path / "encoder.pth"))
    assert metadata["channel_names"] == list(MARKERS) and metadata["normalization"] == info["normalization"]
    with pytest.raises(CheckpointError, match="but --channel_names has"):
        export_encoder(str(out / "checkpoint.pth"), str(tmp_path / "e2.pth"), channel_names=swapped)


def test_unnamed_data_skips_the_check_and_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr("util.channels._skip_noted", False)
    assert check_channel_names(["A", "B"], ["a", "b"], "ckpt", "data") is True  # case does not matter
    assert check_channel_names(None, ["A"], "ckpt", "data") is False
    assert check_channel_names(["A"], None, "ckpt", "data") is False
    assert capsys.readouterr().out.count("channel-name check skipped") == 1
    with pytest.raises(CheckpointError, match=r"trained on \['A', 'B'\] but data has \['B', 'A'\]"):
        check_channel_names(["A", "B"], ["B", "A"], "ckpt", "data")


def write_12bit_folder(root, scale, seed):
    """train/val class folders of 7-channel uint16 TIFFs whose values stay below 4096 * scale."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            for i in range(4):
                image = (rng.gamma(2.0, 300.0, (7, 40, 40)) * scale).clip(0, 4095).astype(np.uint16)
                path = root / split / cls / f"{i}.tif"
                path.parent.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(path, image, photometric="minisblack")
    return root


def test_folder_percentile_normalisation_is_stored_and_applied_unchanged(tmp_path):
    data = write_12bit_folder(tmp_path / "data", scale=1.0, seed=0)
    other = write_12bit_folder(tmp_path / "other", scale=0.5, seed=1)  # dimmer: a re-estimate would differ
    out = tmp_path / "pre"
    names = "DAPI,histones,NeuN,S100,Olig2,Iba1,RECA1"
    args = main_pretrain.get_args_parser().parse_args(
        [*TINY, *TINY_DECODER, "--data_path", str(data), "--output_dir", str(out), "--vis_freq", "0",
         "--normalize", "percentile", "--clip_percentiles", "2", "99", "--channel_names", names])
    main_pretrain.main(args)
    recipe = load_checkpoint(out / "checkpoint.pth")["args"]["normalization"]
    assert load_checkpoint(out / "checkpoint.pth")["args"]["channel_names"] == names.split(",")
    # a bounded sample that here holds every training pixel: the values are the exact percentiles
    pixels = np.concatenate([tifffile.imread(p).reshape(7, -1) for p in sorted((data / "train").rglob("*.tif"))], 1)
    np.testing.assert_allclose(recipe["low"], np.percentile(pixels, 2, axis=1))
    np.testing.assert_allclose(recipe["high"], np.percentile(pixels, 99, axis=1))
    assert recipe["percentiles"] == [2.0, 99.0] and recipe["sample"]["files"] == 8

    # fine-tuning on other data applies the checkpoint's recipe as it is (never re-estimated), to train and val
    flags = [*TINY, "--val_crop", "32", "--data_path", str(other), "--finetune", str(out / "checkpoint.pth"),
             "--output_dir", str(tmp_path / "ft"), "--channel_names", names]
    ft_args = main_finetune.get_args_parser().parse_args(flags)
    main_finetune.describe_model(ft_args)  # what main_finetune.main does first: arch, channels, ... from --finetune
    main_finetune.resolve_defaults(ft_args)
    train, val = main_finetune.build_datasets(ft_args)
    assert ft_args.normalization == recipe and train.normalization == recipe and val.normalization == recipe
    path = val.samples[0][0]
    expected = apply_recipe(tifffile.imread(path), recipe).astype(np.float32) / UINT16_MAX
    np.testing.assert_array_equal(val.load(0).numpy(), expected)
    assert val.load(0).max() > 0.5  # 12-bit data no longer nearly black (dtype scaling: < 4096 / 65535)
    # extraction applies it too
    extract = extract_features.get_args_parser().parse_args(
        ["--checkpoint", str(out / "checkpoint.pth"), "--data_path", str(other / "val"), "--device", "cpu",
         "--out", str(tmp_path / "f.npz"), "--val_crop", "32"])
    geometry = extract_features.load_encoder(str(out / "checkpoint.pth"))[1]
    dataset, _, _ = extract_features.feature_dataset(extract, geometry)
    np.testing.assert_array_equal(dataset.load(0).numpy(),
                                  apply_recipe(tifffile.imread(dataset.samples[0][0]), recipe) / np.float32(UINT16_MAX))
