"""Tests of the data modules: reading (util.io), synthetic cells (util.synthetic), builders (util.datasets) and the
error line (util.cli). The augmentation (util.transforms) is tested in test_transforms.py."""
from argparse import Namespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from util import datasets, synthetic
from util.cli import error_line
from util.datasets import build_finetune_dataset, build_pretrain_dataset
from util.errors import DataError
from util.io import check_image, read_image
from util.synthetic import SyntheticCells


def make_args(**overrides) -> Namespace:
    args = dict(dataset="folder", data_path=None, img_size=32, in_chans=7, synthetic_size=20, seed=0)
    args.update(overrides)
    return Namespace(**args)


# ---------------------------------------------------------------- reading files

@pytest.mark.parametrize("layout", ["channel_first", "planar"])
def test_channel_first_and_channel_last_tiffs_read_the_same(tmp_path, write_image, layout):
    array = np.random.default_rng(0).integers(0, 65536, (7, 12, 20)).astype(np.uint16)  # H != W catches swaps
    last = read_image(write_image(tmp_path / "last.tif", array, "channel_last"))
    first = read_image(write_image(tmp_path / "first.tiff", array, layout))
    assert last.shape == (7, 12, 20) and last.dtype == torch.float32
    torch.testing.assert_close(first, last, rtol=0, atol=0)
    torch.testing.assert_close(last, torch.from_numpy(array.astype(np.float32) / 65535))


def test_two_dimensional_tiff_has_one_channel(tmp_path, write_image):
    array = np.arange(6 * 5, dtype=np.uint8).reshape(1, 6, 5)
    image = read_image(write_image(tmp_path / "grey.TIF", array))
    assert image.shape == (1, 6, 5)
    torch.testing.assert_close(image, torch.from_numpy(array / 255.0).float())


@pytest.mark.parametrize("dtype, scale", [("uint8", 255.0), ("uint16", 65535.0), ("float32", 1.0)])
def test_pixel_types_are_scaled_by_their_range(tmp_path, write_image, dtype, scale):
    array = np.zeros((3, 4, 4), dtype)
    array[0, 0, 0], array[1, 1, 1] = (0.5, 2.5) if dtype == "float32" else (1, np.iinfo(dtype).max)
    image = read_image(write_image(tmp_path / "x.tif", array))
    torch.testing.assert_close(image, torch.from_numpy(array.astype(np.float64) / scale).float())
    if dtype != "float32":
        assert image.max() == 1.0  # full scale maps to exactly 1


def test_float_tiff_values_are_not_rescaled(tmp_path, write_image):
    array = np.full((2, 3, 3), -4.25, np.float32)
    assert read_image(write_image(tmp_path / "f.tif", array)).min() == -4.25


@pytest.mark.parametrize("channels", [1, 3])
def test_png_grey_and_rgb(tmp_path, write_image, channels):
    array = np.random.default_rng(1).integers(0, 256, (channels, 5, 7)).astype(np.uint8)
    image = read_image(write_image(tmp_path / "x.PNG", array, "png"))
    torch.testing.assert_close(image, torch.from_numpy(array / 255.0).float())


def test_sixteen_bit_png_keeps_its_range(tmp_path, write_image):
    array = np.array([[[0, 1000, 65535]]], np.uint16)
    image = read_image(write_image(tmp_path / "x.png", array, "png"))
    torch.testing.assert_close(image, torch.from_numpy(array / 65535.0).float())


def test_jpeg_rgb_reads_as_three_channels(tmp_path, write_image):
    array = np.full((3, 8, 8), 200, np.uint8)
    image = read_image(write_image(tmp_path / "x.jpeg", array, "jpeg"))
    assert image.shape == (3, 8, 8) and abs(image.mean().item() - 200 / 255) < 0.02  # lossy, nearly exact


# ---------------------------------------------------------------- synthetic cells

def test_synthetic_cells_are_deterministic_per_index_and_seed():
    a, b = SyntheticCells(10, 32, seed=1), SyntheticCells(10, 32, seed=1)
    assert np.array_equal(a.render(4), b.render(4))
    assert not np.array_equal(a.render(4), a.render(9))
    assert not np.array_equal(a.render(4), SyntheticCells(10, 32, seed=2).render(4))
    assert not np.array_equal(a.render(4), SyntheticCells(10, 32, seed=1, split="val").render(4))


@pytest.mark.parametrize("in_chans, num_classes", [(7, 5), (3, 3), (1, 2)])
def test_synthetic_cells_shape_range_and_balanced_labels(in_chans, num_classes):
    data = SyntheticCells(30, 24, in_chans=in_chans, num_classes=num_classes)
    images, labels = zip(*(data[i] for i in range(len(data))))
    stacked = torch.stack(images)
    assert stacked.shape == (30, in_chans, 24, 24) and stacked.dtype == torch.float32
    assert stacked.min() >= 0 and stacked.max() <= 1 and stacked.std() > 0.01
    assert np.bincount(labels).tolist() == [30 // num_classes] * num_classes
    assert data.classes == list(synthetic.CELL_TYPES[:num_classes])


def synthetic_features(data: SyntheticCells) -> tuple:
    """Per-channel means of the whole image and of its central quarter, with the labels."""
    images = np.stack([data.render(i) for i in range(len(data))])  # [N, 7, S, S]
    side = data.img_size // 4
    centre = images[:, :, side:-side, side:-side]
    features = np.concatenate([images.mean(axis=(2, 3)), centre.mean(axis=(2, 3))], axis=1)
    return features, np.array([data.label(i) for i in range(len(data))])


def test_synthetic_cell_types_are_learnable_but_not_trivial():
    train_x, train_y = synthetic_features(SyntheticCells(250, 48, split="train"))
    val_x, val_y = synthetic_features(SyntheticCells(100, 48, split="val"))
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    centroids = np.stack([train_x[train_y == k].mean(0) for k in range(5)])
    predicted = np.argmin(((val_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (predicted == val_y).mean()
    assert 0.6 < accuracy < 1.0  # chance is 0.2; dim markers and neighbours keep it below 1


def test_synthetic_marker_channels_light_up_by_cell_type():
    features, labels = synthetic_features(SyntheticCells(100, 32))
    centre_means = features[:, 7:]
    marker_of_type = {0: synthetic.NEUN, 1: synthetic.S100, 2: synthetic.OLIG2, 3: synthetic.IBA1, 4: synthetic.RECA1}
    for cell_type, marker in marker_of_type.items():
        own = centre_means[labels == cell_type, marker].mean()
        others = centre_means[labels != cell_type, marker].mean()
        assert own > 2 * others, synthetic.CELL_TYPES[cell_type]


# ---------------------------------------------------------------- builders

def test_pretrain_folder_dataset_from_class_folders(make_image_folder):
    root = make_image_folder(classes=("x", "y"), n_per_class=3, size=20, layout="channel_first")
    data = build_pretrain_dataset(make_args(data_path=str(root), img_size=32))
    image, _ = data[5]
    assert len(data) == 6 and image.shape == (7, 32, 32) and data.classes == ["x", "y"]


@pytest.mark.parametrize("split", ["train", ""])
def test_pretrain_accepts_a_flat_folder(make_image_folder, split):
    root = make_image_folder(n_per_class=4, size=16, channels=3, dtype="uint8", layout="png",
                             splits=(split,), flat=True)
    data = build_pretrain_dataset(make_args(data_path=str(root), img_size=16, in_chans=3))
    assert len(data) == 4 and data[3][0].shape == (3, 16, 16)


def test_class_folders_win_over_loose_images_and_the_loose_ones_are_named(make_image_folder, write_image, capsys):
    root = make_image_folder(classes=("a", "b"), n_per_class=2, size=40, splits=("train",))
    write_image(root / "train" / "stray.tif", np.zeros((7, 40, 40), np.uint16))
    data = build_pretrain_dataset(make_args(data_path=str(root)))
    assert len(data) == 4 and data.classes == ["a", "b"]  # as torchvision's ImageFolder: the class folders
    out = capsys.readouterr().out
    assert "2 class folder(s) and 1 image(s) directly in it (e.g. stray.tif)" in out
    assert "using the 4 images in the class folders and ignoring the 1 loose ones" in out


def test_finetune_folder_datasets_share_train_class_indices(make_image_folder):
    root = make_image_folder(classes=("a", "b", "c"), n_per_class=2, size=50)
    args = make_args(data_path=str(root), img_size=32)
    train = build_finetune_dataset(True, args)
    for missing in (root / "val" / "a").iterdir():  # a val set without class 'a' must keep b=1, c=2
        missing.unlink()
    (root / "val" / "a").rmdir()
    val = build_finetune_dataset(False, args)
    assert train.classes == val.classes == ["a", "b", "c"]
    assert [label for _, label in train.samples] == [0, 0, 1, 1, 2, 2]
    assert [label for _, label in val.samples] == [1, 1, 2, 2]
    image, label = val[0]
    assert image.shape == (7, 32, 32) and label == 1


def test_synthetic_builders_make_disjoint_train_and_val():
    args = make_args(dataset="synthetic", img_size=32, synthetic_size=20)
    pretrain, train, val = build_pretrain_dataset(args), build_finetune_dataset(True, args), \
        build_finetune_dataset(False, args)
    assert len(pretrain) == len(train) == 20 and len(val) == 5 and train.classes == val.classes
    assert train[0][0].shape == val[0][0].shape == (7, 32, 32)
    train_images = [train.render(i) for i in range(20)]
    assert not any(np.array_equal(val.render(i), image) for i in range(5) for image in train_images)
    assert val.transform.min_side == 32  # val crop min(48, img_size): the whole synthetic image


def test_dataset_defaults_to_folder_when_a_data_path_is_given(make_image_folder):
    root = make_image_folder(size=16)
    data = build_pretrain_dataset(make_args(dataset=None, data_path=str(root), img_size=16))
    assert isinstance(data, datasets.ImageFileDataset)


# ---------------------------------------------------------------- bad input

def test_missing_data_path_names_the_flag(tmp_path):
    with pytest.raises(DataError, match=r"--data_path.*nowhere"):
        build_pretrain_dataset(make_args(data_path=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match="--data_path"):
        build_finetune_dataset(True, make_args(data_path=None))


def test_missing_val_folder_names_it(make_image_folder):
    root = make_image_folder(splits=("train",))
    with pytest.raises(DataError, match=r"--data_path.*val"):
        build_finetune_dataset(False, make_args(data_path=str(root)))


def test_empty_folder_names_it_and_the_extensions(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"train.*no images.*\.tif, \.tiff, \.png"):
        build_pretrain_dataset(make_args(data_path=str(tmp_path)))


def test_empty_class_folder_names_it(make_image_folder):
    root = make_image_folder()
    (root / "train" / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class.*no images"):
        build_finetune_dataset(True, make_args(data_path=str(root)))


def test_corrupt_tiff_names_the_file(tmp_path):
    bad = tmp_path / "train" / "cls" / "x.tif"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"this is not a TIFF file" * 10)
    with pytest.raises(DataError, match=r"x\.tif: cannot read TIFF"):
        read_image(bad)
    with pytest.raises(DataError, match=r"x\.tif"):
        build_pretrain_dataset(make_args(data_path=str(tmp_path)))


def test_corrupt_png_names_the_file(tmp_path):
    (tmp_path / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    with pytest.raises(DataError, match=r"y\.png: cannot read image"):
        read_image(tmp_path / "y.png")


def test_wrong_channel_count_names_file_channels_and_flag(make_image_folder):
    root = make_image_folder(channels=5, size=16)
    with pytest.raises(DataError, match=r"a_0\.tif: image has 5 channel\(s\) but --in_chans is 7"):
        build_pretrain_dataset(make_args(data_path=str(root), img_size=16))


def test_channel_error_shows_the_tiff_axes(tmp_path, write_image):
    # a height x width x channel array written as pages: 16 "channels" of 16 x 7 pixels
    path = write_image(tmp_path / "pages.tif", np.zeros((16, 16, 7), np.uint16), "channel_first")
    with pytest.raises(DataError, match=r"pages\.tif: image has 16 channel.*axes '\w*YX', shape \(16, 16, 7\)"):
        check_image(read_image(path), path, in_chans=7, min_side=4)


def test_image_smaller_than_the_crop_names_file_and_sizes(make_image_folder):
    root = make_image_folder(size=(40, 20))
    with pytest.raises(DataError, match=r"a_0\.tif: image is 40x20 pixels, smaller than the 24x24 crop"):
        build_pretrain_dataset(make_args(data_path=str(root), img_size=48))
    with pytest.raises(DataError, match=r"a_0\.tif: image is 40x20 pixels, smaller than the 48x48 crop"):
        build_finetune_dataset(False, make_args(data_path=str(root), img_size=48))


def test_unsupported_pixel_type_names_the_file(tmp_path, write_image):
    path = write_image(tmp_path / "int.tif", np.zeros((2, 4, 4), np.int32))
    with pytest.raises(DataError, match=r"int\.tif: unsupported pixel type int32"):
        read_image(path)


def test_each_file_is_checked_again_when_loaded(make_image_folder, write_image):
    root = make_image_folder(size=16)
    data = build_pretrain_dataset(make_args(data_path=str(root), img_size=16))  # every header is fine now
    write_image(root / "train" / "b" / "b_1.tif", np.zeros((4, 16, 16), np.uint16))  # goes bad after the check
    with pytest.raises(DataError, match=r"b_1\.tif: image has 4 channel"):
        data[3]


# ---------------------------------------------------------------- error_line

def test_error_line_gives_the_original_message_from_a_dataloader_worker(make_image_folder, tmp_path):
    root = make_image_folder(classes=("a",), n_per_class=2, size=16, splits=("train",))
    data = build_pretrain_dataset(make_args(data_path=str(root), img_size=16))
    bad = root / "train" / "a" / "a_1.tif"
    bad.write_bytes(b"garbage" * 20)  # after the header check: it fails only when read
    with pytest.raises(DataError) as direct:
        data[1]
    with pytest.raises(DataError) as from_worker:
        list(DataLoader(data, batch_size=1, num_workers=1))
    assert "DataLoader worker process" in str(from_worker.value)  # torch wrapped it with the worker traceback
    assert error_line(from_worker.value) == error_line(direct.value) == str(direct.value)
    assert "a_1.tif: cannot read TIFF" in error_line(from_worker.value)


def test_error_line_of_other_exceptions_keeps_the_type_on_one_line():
    assert error_line(RuntimeError("two\n  lines")) == "RuntimeError: two lines"
    assert error_line(KeyError()) == "KeyError"
    assert error_line(DataError("bad file")) == "bad file"
