"""What a --data_path or --dataset means: folder listing, image-file datasets and the builders the scripts use.

Everything returns float32 tensors laid out [C, H, W]. Bad input raises `DataError`, whose message names the file,
folder or flag at fault and what was expected. Reading one file is util.io, the augmentation util.transforms, the
built-in synthetic cells util.synthetic, listing folders and checking every file's header util.filelist (cached in
<output_dir>/data_index), MAE's ImageNet recipe (--recipe imagenet) util.imagenet.
"""
from pathlib import Path

import torch
from torch.utils.data import Dataset

from util import filelist
from util.errors import DataError
from util.filelist import FileList
from util.io import IMAGE_EXTENSIONS, check_image, read_tensor_chw
from util.normalize import read_normalized
from util.packed import describe_folder_dataset, open_packed_dataset, prepared_layout, read_cell_table
from util.synthetic import CELL_TYPES, SyntheticCells
from util.transforms import (DEFAULT_VAL_CROP, TensorTransform, augmentation_options, build_finetune_transform,
                             build_pretrain_transform)

DEFAULT_SYNTHETIC_SIZE = 1000


# --------------------------------------------------------------------------------------------------
# Folder datasets
# --------------------------------------------------------------------------------------------------

class ImageFileDataset(Dataset):
    """Images on disk as a util.filelist.FileList (or a list of (path, label), converted to one); every file is
    read and checked when loaded.

    __getitem__ -> (transform(image) [C, S, S] float32, label int). `.classes` lists the class names;
    `.samples[i]` is (path, label). `normalization`: a percentile recipe (util/normalize.py) applied to the raw
    values when a file is read, or None for dtype scaling; the builders set it and `channel_names`
    (util.packed.describe_folder_dataset).
    """
    normalization = None
    channel_names = None

    def __init__(self, samples, classes, in_chans: int, transform: TensorTransform):
        self.samples = samples if isinstance(samples, FileList) else FileList.from_samples(samples, classes)
        self.classes = list(classes)
        self.in_chans = in_chans
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor:
        """The checked, untransformed image [C, H, W] of sample `index` (uint8 / uint16 as stored, else float32:
        the transform converts and scales; util.io.read_tensor_chw)."""
        path, _ = self.samples[index]
        # integers as stored (the transform scales them) or the recipe's normalised floats
        image = read_tensor_chw(path) if self.normalization is None else read_normalized(path, self.normalization)
        check_image(image, path, self.in_chans, self.transform.min_side)
        return image

    def __getitem__(self, index: int):
        return self.transform(self.load(index)), self.samples[index][1]


def list_images(folder: Path, recursive: bool) -> list:
    """Sorted image files in `folder` (and its sub-folders when `recursive`, links followed), hidden ones skipped:
    util.filelist's walk."""
    return [folder / rel for rel in filelist.image_relpaths(folder, recursive)]


def class_folders(folder: Path) -> list:
    """Sorted names of the non-hidden sub-folders of `folder` (the ImageFolder classes)."""
    return filelist.class_folder_names(folder)


def image_folder_samples(folder: Path, classes: list) -> list:
    """[(path, class index)] for the layout <folder>/<class>/**/<image>; every class folder present must hold images."""
    return list(filelist.list_folder(folder, classes))


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


def pretrain_samples(root: Path, cache_dir=None):
    """(samples FileList, classes) for pretraining: <root>/train if present, as class folders or as a flat
    folder; listed through the index in `cache_dir` when given (util.filelist).

    A folder holding both class folders and loose images uses the class folders, as torchvision's ImageFolder
    (and the reference code) does, and says how many loose images it leaves out.
    """
    folder = root / "train" if (root / "train").is_dir() else root
    classes = class_folders(folder)
    if not classes:  # a flat folder of images (labels are unused in pretraining)
        files = filelist.list_folder(folder, None, cache_dir)
        if not len(files):
            raise no_images_error(folder)
        return files, ["unlabelled"]
    files = filelist.list_folder(folder, classes, cache_dir)
    note_ignored_loose_images(folder, len(files), len(classes))
    return files, classes


def note_ignored_loose_images(folder: Path, used: int, num_classes: int) -> None:
    """Say that images lying directly in a folder of class folders are not used (they have no class)."""
    loose = list_images(folder, recursive=False)
    if not loose:
        return
    print(f"note: {folder} holds {num_classes} class folder(s) and {len(loose)} image(s) directly in it "
          f"(e.g. {loose[0].name}); using the {used} images in the class folders and ignoring the "
          f"{len(loose)} loose ones")


def finetune_samples(root: Path, is_train: bool, cache_dir=None):
    """(samples FileList, classes) of <root>/train or <root>/val in ImageFolder layout.

    Validation labels follow the class list of <root>/train when it exists, so that a class missing from
    val/ does not shift the indices of the others.
    """
    split = "train" if is_train else "val"
    folder = root / split
    require_folder(folder, f"the {split} folder (expected ImageFolder layout <data_path>/{split}/<class>/<image>)")
    train_folder = root / "train"
    classes = class_folders(train_folder) if train_folder.is_dir() else class_folders(folder)
    samples = filelist.list_folder(folder, classes, cache_dir)
    if not len(samples):
        raise no_images_error(folder)
    note_ignored_loose_images(folder, len(samples), len(classes))
    return samples, classes


def index_dir(args):
    """<output_dir>/data_index, where the folder listings and headers are cached; None without --output_dir."""
    output_dir = getattr(args, "output_dir", None)
    return Path(output_dir) / "data_index" if output_dir else None


def check_folder_files(files: FileList, args, min_side: int, rgb: bool = False):
    """(files, headers, skipped count): util.filelist.check_files with the run's --in_chans and
    --skip_bad_files: every bad file is reported before training, or left out."""
    files, headers, (skipped, _) = filelist.check_files(files, args.in_chans, min_side, rgb=rgb,
                                                        skip_bad=bool(getattr(args, "skip_bad_files", False)))
    return files, headers, skipped


def checked_folder_dataset(files: FileList, classes, args, transform: TensorTransform, root: Path,
                           estimate: bool = False) -> ImageFileDataset:
    """ImageFileDataset over the files that pass the header check (`.skipped_bad_files`: how many did not), with
    its channel names and normalisation (util.packed.describe_folder_dataset for the data under `root`;
    `estimate`: the recipe may be estimated from these files)."""
    files, _, skipped = check_folder_files(files, args, transform.min_side)
    dataset = ImageFileDataset(files, classes, args.in_chans, transform)
    dataset = checked(describe_folder_dataset(dataset, root, args, estimate=estimate))
    dataset.skipped_bad_files = skipped
    return dataset


def add_loader_args(parser, what: str = "the data loader") -> None:
    """The data flags both training scripts share: how bad files are handled, and the loader's workers."""
    from util.cli import add_bool_flag  # here: util.cli stays importable without torch

    add_bool_flag(parser, "skip_bad_files", False,
                  help="leave out the files the header check before training finds bad (unreadable, wrong "
                       "channel count, too small) and record how many in log.txt, instead of stopping")
    # None: resolved where the job runs (resolve_num_workers), not where a launcher parsed the flags
    parser.add_argument("--num_workers", default=None, type=int,
                        help="DataLoader worker processes per GPU (default: up to 10, at most the CPUs the process "
                             "may use)")
    add_bool_flag(parser, "pin_mem", True, help=f"pin CPU memory in {what} (default on)")


def resolve_num_workers(args) -> None:
    """--num_workers left out: up to 10, at most the CPUs this process may use (the job's, not a login node's)."""
    if getattr(args, "num_workers", None) is None:
        from util.misc import default_num_workers
        args.num_workers = default_num_workers()


def check_one_batch_per_process(num_images: int, batch_size: int, world_size: int, what: str = "training images",
                                padded: bool = True, drop_last: bool = True) -> None:
    """DataError unless every process gets at least one batch: the same words in the job and in the launcher's
    pre-flight check. The DistributedSampler deals num_images / world_size to each process (rounded up and padded,
    or rounded down: `padded`); the training loaders drop an incomplete last batch unless not `drop_last`."""
    per_process = -(-num_images // world_size) if padded else num_images // world_size
    if per_process < (batch_size if drop_last else 1):
        raise DataError(f"the data has {num_images} {what}, fewer than one batch per process (--batch_size "
                        f"{batch_size} x {world_size} processes = {batch_size * world_size}); lower --batch_size or "
                        f"use fewer processes")


def recipe(args) -> str:
    return getattr(args, "recipe", None) or "cells"


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


def build_pretrain_dataset(args, transform: TensorTransform = None) -> Dataset:
    """Pretraining dataset: items (augmented image [in_chans, S, S], label), S = args.img_size; `transform`
    replaces the training augmentation of the cell data (util.gpu_augment's worker crop).

    folder: <data_path>/train (class folders or a flat folder of images) or, without train/, <data_path>
    itself; the first file is read and checked now, so that a wrong --in_chans or a too-small image
    fails before training starts. synthetic: `args.synthetic_size` SyntheticCells with `args.seed`.
    A folder holding dataset.json (prepare_cells.py) is read as packed cells (util.packed: the train split).
    --recipe imagenet: util.imagenet's RGB dataset.
    """
    if recipe(args) == "imagenet":
        from util.imagenet import build_imagenet_pretrain_dataset  # util.imagenet builds on this module
        return build_imagenet_pretrain_dataset(args)
    if transform is None:
        transform = build_pretrain_transform(args.img_size, **augmentation_options(args))
    if dataset_kind(args) == "synthetic":
        return SyntheticCells(synthetic_size(args), args.img_size, args.in_chans, seed=args.seed,
                              split="train", transform=transform)
    root = data_root(args)
    if prepared_layout(root) == "packed":  # prepare_cells.py's output: memory-mapped crops
        return open_packed_dataset(root, args, transform, split="train")
    samples, classes = pretrain_samples(root, index_dir(args))
    return checked_folder_dataset(samples, classes, args, transform, root, estimate=True)


def build_finetune_dataset(is_train: bool, args) -> Dataset:
    """Fine-tuning dataset (train or val): items (image [in_chans, S, S], label), `.classes` names.

    folder: <data_path>/train or <data_path>/val in ImageFolder layout (val labels use train's class list);
    the validation centre crop is `args.val_crop` (default 48). synthetic: 5 cell types, train has
    `args.synthetic_size` images and val a quarter of that (at least one per class) from a different
    seed stream, so the two never share an image. Its val crop is min(val_crop, img_size), because a
    synthetic image is only img_size wide: at img_size < 48 validation sees the whole image.
    Packed cells (a dataset.json folder): the train / val split and the labels of its cells.csv.
    --recipe imagenet: util.imagenet's RGB dataset.
    """
    if recipe(args) == "imagenet":
        from util.imagenet import build_imagenet_finetune_dataset  # util.imagenet builds on this module
        return build_imagenet_finetune_dataset(is_train, args)
    val_crop = int(getattr(args, "val_crop", None) or DEFAULT_VAL_CROP)
    if dataset_kind(args) == "synthetic":
        transform = build_finetune_transform(is_train, args.img_size, min(val_crop, args.img_size),
                                             **augmentation_options(args))
        size = synthetic_size(args) if is_train else max(synthetic_size(args) // 4, len(CELL_TYPES))
        return SyntheticCells(size, args.img_size, args.in_chans, seed=args.seed,
                              split="train" if is_train else "val", transform=transform)
    transform = build_finetune_transform(is_train, args.img_size, val_crop, **augmentation_options(args))
    root = data_root(args)
    if prepared_layout(root) == "packed":  # prepare_cells.py's output: split and labels from cells.csv
        return open_packed_dataset(root, args, transform, split="train" if is_train else "val", require_split=True,
                                   require_labels=True)
    samples, classes = finetune_samples(root, is_train, index_dir(args))
    return checked_folder_dataset(samples, classes, args, transform, root, estimate=is_train)


def checked(dataset: ImageFileDataset) -> ImageFileDataset:
    """Read and check the first file now (channels vs --in_chans, size vs the crop); returns `dataset`."""
    dataset.load(0)
    return dataset


def build_finetune_test_dataset(args, classes) -> Dataset:
    """The held-out test split with the validation transform, or None when the data has none (the synthetic set
    never has): <data_path>/test/<class>/ of a folder (labels by `classes`, the training class list), or the cells
    whose split is 'test' in a packed dataset's cells.csv (crossval.py's fold datasets write them; labels by its
    dataset.json classes, as train and val)."""
    if dataset_kind(args) != "folder":
        return None
    root = data_root(args)
    val_crop = int(getattr(args, "val_crop", None) or DEFAULT_VAL_CROP)
    transform = build_finetune_transform(False, args.img_size, val_crop)
    if recipe(args) != "imagenet" and prepared_layout(root) == "packed":
        table = read_cell_table(root)  # read once: whether there is a test split, then its cells
        if not (table["split"] == "test").any():
            return None
        return open_packed_dataset(root, args, transform, split="test", require_split=True, require_labels=True,
                                   table=table)
    folder = root / "test"
    if not folder.is_dir():
        return None
    samples = filelist.list_folder(folder, list(classes), index_dir(args))
    if not len(samples):
        raise no_images_error(folder)
    if recipe(args) == "imagenet":  # RGB photos with the recipe's evaluation transform, as its val split
        from util.imagenet import imagenet_classification_dataset
        return imagenet_classification_dataset(samples, False, args)
    return checked_folder_dataset(samples, classes, args, transform, root, estimate=False)
