"""What a --data_path or --dataset means: folder listing, image-file datasets and the builders the scripts use.

Everything returns float32 tensors laid out [C, H, W]. Bad input raises `DataError`, whose message names the file,
folder or flag at fault and what was expected. Reading one file is util.io, the augmentation util.transforms, the
built-in synthetic cells util.synthetic.
"""
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from util.errors import DataError
from util.io import IMAGE_EXTENSIONS, check_image, read_tensor_chw
from util.synthetic import CELL_TYPES, SyntheticCells
from util.transforms import (DEFAULT_VAL_CROP, TensorTransform, augmentation_options, build_finetune_transform,
                             build_pretrain_transform)

DEFAULT_SYNTHETIC_SIZE = 1000


# --------------------------------------------------------------------------------------------------
# Folder datasets
# --------------------------------------------------------------------------------------------------

class ImageFileDataset(Dataset):
    """Images on disk as a list of (path, label); every file is read and checked when loaded.

    __getitem__ -> (transform(image) [C, S, S] float32, label int). `.classes` lists the class names.
    """

    def __init__(self, samples, classes, in_chans: int, transform: TensorTransform):
        self.samples = list(samples)
        self.classes = list(classes)
        self.in_chans = in_chans
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor:
        """The checked, untransformed image [C, H, W] of sample `index` (uint8 / uint16 as stored, else float32:
        the transform converts and scales; util.io.read_tensor_chw)."""
        path, _ = self.samples[index]
        image = read_tensor_chw(path)
        check_image(image, path, self.in_chans, self.transform.min_side)
        return image

    def __getitem__(self, index: int):
        return self.transform(self.load(index)), self.samples[index][1]


def is_image_file(path: Path) -> bool:
    """An accepted extension (any case), and not a hidden file such as macOS '._x.tif' metadata."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path, recursive: bool) -> list:
    """Sorted image files in `folder` (and its sub-folders when `recursive`, links followed)."""
    if not recursive:
        return sorted(p for p in folder.iterdir() if is_image_file(p))
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(parent) / name for name in files)
    return sorted(p for p in found if is_image_file(p))


def class_folders(folder: Path) -> list:
    """Sorted names of the non-hidden sub-folders of `folder` (the ImageFolder classes)."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_folder_samples(folder: Path, classes: list) -> list:
    """[(path, class index)] for the layout <folder>/<class>/**/<image>; every class folder present must hold images."""
    samples = []
    for name in class_folders(folder):
        if name not in classes:
            raise DataError(f"{folder / name}: class folder {name!r} is not one of the training classes {classes}")
        files = list_images(folder / name, recursive=True)
        if not files:
            raise DataError(f"{folder / name}: class folder holds no images; expected files ending in "
                            f"{', '.join(IMAGE_EXTENSIONS)}")
        samples.extend((path, classes.index(name)) for path in files)
    return samples


def no_images_error(folder: Path) -> DataError:
    return DataError(f"{folder}: no images found; expected files ending in {', '.join(IMAGE_EXTENSIONS)} "
                     f"(any case) in class folders <folder>/<class>/ or, for pretraining, directly in the folder")


def require_folder(folder: Path, what: str) -> None:
    """DataError mentioning --data_path unless `folder` is an existing directory."""
    if not folder.is_dir():
        raise DataError(f"--data_path: {what} {folder} does not exist or is not a folder")


def data_root(args) -> Path:
    """args.data_path as a Path; DataError when it is unset or missing."""
    if not getattr(args, "data_path", None):
        raise DataError("--data_path is not set; expected a dataset folder (or use --dataset synthetic)")
    root = Path(args.data_path).expanduser()
    require_folder(root, "dataset folder")
    return root


def pretrain_samples(root: Path):
    """(samples, classes) for pretraining: <root>/train if present, as class folders or as a flat folder."""
    folder = root / "train" if (root / "train").is_dir() else root
    classes = class_folders(folder)
    flat_files = list_images(folder, recursive=False)
    if flat_files or not classes:  # a flat folder of images (labels are unused in pretraining)
        if not flat_files:
            raise no_images_error(folder)
        return [(path, 0) for path in flat_files], ["unlabelled"]
    samples = image_folder_samples(folder, classes)
    return samples, classes


def finetune_samples(root: Path, is_train: bool):
    """(samples, classes) of <root>/train or <root>/val in ImageFolder layout.

    Validation labels follow the class list of <root>/train when it exists, so that a class missing from
    val/ does not shift the indices of the others.
    """
    split = "train" if is_train else "val"
    folder = root / split
    require_folder(folder, f"the {split} folder (expected ImageFolder layout <data_path>/{split}/<class>/<image>)")
    train_folder = root / "train"
    classes = class_folders(train_folder) if train_folder.is_dir() else class_folders(folder)
    samples = image_folder_samples(folder, classes)
    if not samples:
        raise no_images_error(folder)
    return samples, classes


# --------------------------------------------------------------------------------------------------
# Builders used by the training scripts
# --------------------------------------------------------------------------------------------------

def dataset_kind(args) -> str:
    """'synthetic' or 'folder' from args.dataset; when unset, 'folder' if --data_path is given."""
    kind = getattr(args, "dataset", None) or ("folder" if getattr(args, "data_path", None) else "synthetic")
    if kind not in ("synthetic", "folder"):
        raise DataError(f"--dataset {kind!r} is not known; expected 'synthetic' or 'folder'")
    return kind


def synthetic_size(args) -> int:
    return int(getattr(args, "synthetic_size", None) or DEFAULT_SYNTHETIC_SIZE)


def build_pretrain_dataset(args) -> Dataset:
    """Pretraining dataset: items (augmented image [in_chans, S, S], label), S = args.img_size.

    folder: <data_path>/train (class folders or a flat folder of images) or, without train/, <data_path>
    itself; the first file is read and checked now, so that a wrong --in_chans or a too-small image
    fails before training starts. synthetic: `args.synthetic_size` SyntheticCells with `args.seed`.
    """
    transform = build_pretrain_transform(args.img_size, **augmentation_options(args))
    if dataset_kind(args) == "synthetic":
        return SyntheticCells(synthetic_size(args), args.img_size, args.in_chans, seed=args.seed,
                              split="train", transform=transform)
    samples, classes = pretrain_samples(data_root(args))
    return checked(ImageFileDataset(samples, classes, args.in_chans, transform))


def build_finetune_dataset(is_train: bool, args) -> Dataset:
    """Fine-tuning dataset (train or val): items (image [in_chans, S, S], label), `.classes` names.

    folder: <data_path>/train or <data_path>/val in ImageFolder layout (val labels use train's class list);
    the validation centre crop is `args.val_crop` (default 48). synthetic: 5 cell types, train has
    `args.synthetic_size` images and val a quarter of that (at least one per class) from a different
    seed stream, so the two never share an image. Its val crop is min(val_crop, img_size), because a
    synthetic image is only img_size wide: at img_size < 48 validation sees the whole image.
    """
    val_crop = int(getattr(args, "val_crop", None) or DEFAULT_VAL_CROP)
    if dataset_kind(args) == "synthetic":
        transform = build_finetune_transform(is_train, args.img_size, min(val_crop, args.img_size),
                                             **augmentation_options(args))
        size = synthetic_size(args) if is_train else max(synthetic_size(args) // 4, len(CELL_TYPES))
        return SyntheticCells(size, args.img_size, args.in_chans, seed=args.seed,
                              split="train" if is_train else "val", transform=transform)
    transform = build_finetune_transform(is_train, args.img_size, val_crop, **augmentation_options(args))
    samples, classes = finetune_samples(data_root(args), is_train)
    return checked(ImageFileDataset(samples, classes, args.in_chans, transform))


def checked(dataset: ImageFileDataset) -> ImageFileDataset:
    """Read and check the first file now (channels vs --in_chans, size vs the crop); returns `dataset`."""
    dataset.load(0)
    return dataset


def build_finetune_test_dataset(args, classes) -> Dataset:
    """The held-out <data_path>/test/<class>/ split with the validation transform (labels by `classes`, the
    training class list), or None when the data has no test split (the synthetic set has none)."""
    if dataset_kind(args) != "folder" or not (data_root(args) / "test").is_dir():
        return None
    folder = data_root(args) / "test"
    samples = image_folder_samples(folder, list(classes))
    if not samples:
        raise no_images_error(folder)
    val_crop = int(getattr(args, "val_crop", None) or DEFAULT_VAL_CROP)
    return checked(ImageFileDataset(samples, classes, args.in_chans, build_finetune_transform(False, args.img_size,
                                                                                             val_crop)))
