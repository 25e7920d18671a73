"""MAE's ImageNet recipe (--recipe imagenet): RGB image folders, its transforms, and the --decode gpu path.

    pretraining   RandomResizedCrop(S, scale 0.2-1, bicubic), horizontal flip, ImageNet mean/std
    fine-tuning   timm's training transform: RandomResizedCrop (scale 0.08-1, bicubic), flip, RandAugment
                  (--aa, default rand-m9-mstd0.5-inc1), random erasing (--reprob 0.25, --remode pixel),
                  ImageNet mean/std; mixup/cutmix/smoothing are the batch-level flags of main_finetune.py
    linear probe  the same without RandAugment and erasing (main_linprobe.py's defaults: --aa none --reprob 0)
    evaluation    resize the shorter side to S / 0.875 (256 for 224, bicubic), centre crop S, mean/std

Files are read with PIL and converted to RGB, as torchvision's ImageFolder does: grey, CMYK and palette images
become 3-channel images. The mean/std go into args (args.mean, args.std), so that checkpoints and exports
carry them. The folders are listed and checked by util.filelist like the cell recipe's.

--decode gpu (pretraining): the DataLoader workers only read each file's bytes and draw its crop box and flip
from the image size in the header index; `DeviceDecode` decodes the batch with torchvision.io.decode_jpeg on
the training device (nvJPEG on CUDA), crops, resizes, flips and normalises there. Files the device decoder
does not take (CMYK JPEGs, PNGs) are decoded and cropped in the worker instead.
"""
import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data import auto_augment
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F2

from util.datasets import check_folder_files, data_root, finetune_samples, index_dir, pretrain_samples
from util.errors import ConfigError, DataError

RECIPES = ("cells", "imagenet")
PRETRAIN_SCALE = (0.2, 1.0)  # MAE's pretraining crop scale
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's and timm's default aspect-ratio range
EVAL_CROP_PCT = 0.875  # 224 / 256: evaluation resizes to S / 0.875 and centre-crops S
DEFAULT_AA = "rand-m9-mstd0.5-inc1"
DEVICE_DECODED_LAYOUTS = ("JPEG RGB", "JPEG L")  # what --decode gpu hands to decode_jpeg (header layouts)


CELL_IN_CHANS = 7  # the --in_chans default of the cell recipe (the brain-cell panel); imagenet: 3


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------
def add_recipe_arg(parser):
    parser.add_argument("--recipe", default=None, choices=RECIPES,
                        help="cells: the reference's cell augmentation, no normalisation; imagenet: MAE's ImageNet "
                             "recipe on RGB image folders, see util/imagenet.py (default: the checkpoint's, else "
                             "cells)")
    return parser


def add_finetune_augment_args(parser):
    """MAE's RandAugment and random-erasing flags (used by --recipe imagenet)."""
    parser.add_argument("--aa", default=DEFAULT_AA,
                        help="timm auto-augment policy of --recipe imagenet, 'none': off (default: %(default)s)")
    parser.add_argument("--reprob", default=0.25, type=float,
                        help="random erasing probability of --recipe imagenet (default: %(default)s)")
    parser.add_argument("--remode", default="pixel",
                        help="random erasing fill mode of --recipe imagenet (default: %(default)s)")
    parser.add_argument("--recount", default=1, type=int,
                        help="random erasing count of --recipe imagenet (default: %(default)s)")
    return parser


def recipe_in_chans(recipe) -> int:
    """The --in_chans a recipe implies when the flag is left out: 3 for imagenet, 7 for the cell data."""
    return 3 if recipe == "imagenet" else CELL_IN_CHANS


def resolve_recipe(args) -> None:
    """--in_chans defaults to 7 (cells) or 3 (imagenet); args.mean / args.std are the recipe's normalisation
    (None for cells: raw intensities). ConfigError for flags the recipe cannot take."""
    recipe = args.recipe = getattr(args, "recipe", None) or "cells"
    in_chans = getattr(args, "in_chans", None)
    if in_chans is None:  # left out (and not taken from a checkpoint): the recipe's
        in_chans = recipe_in_chans(recipe)
    args.in_chans = int(in_chans)
    args.mean = args.std = None
    if recipe != "imagenet":
        if getattr(args, "decode", "cpu") == "gpu":
            raise ConfigError("--decode gpu decodes JPEG files for --recipe imagenet; the cell recipe's device "
                              "augmentation is --gpu_augment")
        return
    if args.in_chans != 3:
        raise ConfigError(f"--recipe imagenet reads RGB images: --in_chans must be 3 (or left out), got "
                          f"{args.in_chans}")
    if getattr(args, "dataset", "folder") == "synthetic":
        raise ConfigError("--recipe imagenet reads an image folder (--data_path); --dataset synthetic is the cell "
                          "recipe's")
    if getattr(args, "gpu_augment", False):
        raise ConfigError("--gpu_augment is the cell recipe's device augmentation; with --recipe imagenet use "
                          "--decode gpu")
    if getattr(args, "knn_freq", 0):
        raise ConfigError("--knn_freq is not available with --recipe imagenet (its kNN sets use the cell "
                          "transforms); run main_linprobe.py on a checkpoint instead")
    args.mean, args.std = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)


# --------------------------------------------------------------------------------------------------
# Transforms (PIL image -> float32 [3, S, S], normalised)
# --------------------------------------------------------------------------------------------------
def to_normalised_tensor(mean, std) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]


def build_imagenet_pretrain_transform(img_size: int, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """MAE's pretraining augmentation: RandomResizedCrop(S, scale 0.2-1, bicubic), flip, mean/std."""
    return v2.Compose([v2.RandomResizedCrop(img_size, scale=PRETRAIN_SCALE, ratio=CROP_RATIO,
                                            interpolation=InterpolationMode.BICUBIC),
                       v2.RandomHorizontalFlip(), *to_normalised_tensor(mean, std)])


def build_imagenet_eval_transform(img_size: int, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """Shorter side to int(S / 0.875) (bicubic), centre crop S, mean/std (MAE's evaluation)."""
    return v2.Compose([v2.Resize(int(img_size / EVAL_CROP_PCT), interpolation=InterpolationMode.BICUBIC),
                       v2.CenterCrop(img_size), *to_normalised_tensor(mean, std)])


def build_imagenet_finetune_transform(is_train: bool, img_size: int, mean=IMAGENET_DEFAULT_MEAN,
                                      std=IMAGENET_DEFAULT_STD, aa=DEFAULT_AA, reprob=0.25, remode="pixel",
                                      recount=1):
    """Training: timm.data.create_transform as MAE calls it (RandomResizedCrop, flip, RandAugment `aa`,
    random erasing); aa None/'none' and reprob 0 give MAE's linear-probe transform. Else the evaluation one."""
    if not is_train:
        return build_imagenet_eval_transform(img_size, mean, std)
    aa = None if aa in (None, "", "none") else aa
    transform = create_transform(input_size=img_size, is_training=True, color_jitter=None, auto_augment=aa,
                                 interpolation="bicubic", re_prob=reprob, re_mode=remode, re_count=recount,
                                 mean=tuple(mean), std=tuple(std))
    for step in transform.transforms:
        for op in getattr(step, "ops", ()):  # timm's RandAugment
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize
    return transform


def posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's RandAugment posterize, where keeping 0 bits gives a black image as older Pillow did: Pillow 13
    (installed here) refuses bits=0, which 'PosterizeIncreasing' asks for at magnitude 10 (m9 with mstd 0.5:
    about 2% of its draws), and the DataLoader would stop with 'bits must be between or equal to 1 and 8'."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------
def read_rgb(path) -> Image.Image:
    """An image file as an RGB PIL image (grey, CMYK, palette and alpha images converted); DataError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() decodes: a truncated file fails here, with its path
    except Exception as exc:
        raise DataError(f"{path}: cannot read image file ({type(exc).__name__}: {exc})") from exc


class RGBImageFiles(Dataset):
    """A util.filelist.FileList of image files -> (transform(RGB PIL image), label); `.classes` names them."""

    def __init__(self, files, transform):
        self.samples, self.classes, self.transform = files, list(files.classes), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(read_rgb(path)), label


def normalisation(args) -> tuple:
    """(mean, std) of a run: args.mean / args.std (resolve_recipe), ImageNet's when a caller's args lack them."""
    mean, std = getattr(args, "mean", None), getattr(args, "std", None)
    return (mean, std) if mean and std else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def _checked_rgb_files(files, args):
    """The folder's files after the header check (PIL images count as RGB; no minimum size: every transform of
    the recipe resizes); the dataset built from them records how many --skip_bad_files left out."""
    return check_folder_files(files, args, min_side=1, rgb=True)


def build_imagenet_pretrain_dataset(args) -> Dataset:
    files, _ = pretrain_samples(data_root(args), index_dir(args))
    files, _, skipped = _checked_rgb_files(files, args)
    dataset = RGBImageFiles(files, build_imagenet_pretrain_transform(args.img_size, *normalisation(args)))
    dataset.skipped_bad_files = skipped
    return dataset


def build_imagenet_finetune_dataset(is_train: bool, args) -> Dataset:
    files, _ = finetune_samples(data_root(args), is_train, index_dir(args))
    return imagenet_classification_dataset(files, is_train, args)


def imagenet_classification_dataset(files, is_train: bool, args) -> Dataset:
    """Listed files of train/, val/ or test/ with the fine-tuning (is_train) or the evaluation transform."""
    files, _, skipped = _checked_rgb_files(files, args)
    transform = build_imagenet_finetune_transform(
        is_train, args.img_size, *normalisation(args), aa=getattr(args, "aa", DEFAULT_AA),
        reprob=getattr(args, "reprob", 0.25), remode=getattr(args, "remode", "pixel"),
        recount=getattr(args, "recount", 1))
    dataset = RGBImageFiles(files, transform)
    dataset.skipped_bad_files = skipped
    return dataset


# --------------------------------------------------------------------------------------------------
# --decode gpu: bytes in the workers, decode + crop + flip + normalise on the device
# --------------------------------------------------------------------------------------------------
def sample_crop_box(height: int, width: int, scale=PRETRAIN_SCALE, ratio=CROP_RATIO) -> tuple:
    """(top, left, height, width) of a RandomResizedCrop box in an image of that size (torch's RNG, which
    DataLoader seeds per worker), with torchvision's algorithm; no pixels needed."""
    return T.RandomResizedCrop.get_params(torch.empty(0, height, width), list(scale), list(ratio))


def crop_resize_pil(image: Image.Image, box, img_size: int) -> torch.Tensor:
    """The CPU path's crop of `box` resized to S x S (PIL bicubic), as uint8 [3, S, S]."""
    top, left, height, width = box
    cropped = F2.resized_crop(image, top, left, height, width, [img_size, img_size],
                              interpolation=InterpolationMode.BICUBIC)
    return F2.pil_to_tensor(cropped)


class EncodedBatch:
    """A --decode gpu batch: per image either its file's bytes (uint8 [bytes], on_device True) or its crop
    already resized in the worker (uint8 [3, S, S]); boxes int64 [N, 4] (top, left, height, width), flips
    bool [N], the paths (for error messages). .to() and .pin_memory() keep it on the host: decode_jpeg reads
    host memory."""

    def __init__(self, data, on_device, boxes, flips, paths):
        self.data, self.on_device, self.boxes, self.flips, self.paths = data, on_device, boxes, flips, paths

    def __len__(self) -> int:
        return len(self.data)

    def to(self, device=None, non_blocking=False):
        return self

    def pin_memory(self, device=None):
        return self


def collate_encoded(items):
    """DataLoader collate_fn of EncodedImageFiles: (EncodedBatch, labels int64 [N])."""
    data, on_device, boxes, flips, paths, labels = zip(*items)
    batch = EncodedBatch(list(data), torch.tensor(on_device), torch.tensor(boxes, dtype=torch.int64),
                         torch.tensor(flips), list(paths))
    return batch, torch.tensor(labels, dtype=torch.int64)


class EncodedImageFiles(Dataset):
    """--decode gpu, worker side: per file its bytes, a RandomResizedCrop box drawn from the image size in its
    header, and a flip (so that DeviceDecode needs no host sync). Files whose header layout is not one of
    DEVICE_DECODED_LAYOUTS are decoded with PIL and cropped here."""

    collate_fn = staticmethod(collate_encoded)

    def __init__(self, files, headers, img_size: int, scale=PRETRAIN_SCALE, ratio=CROP_RATIO):
        self.samples, self.classes = files, list(files.classes)
        self.height, self.width = headers.height, headers.width  # int32 [N]
        device_codes = [i for i, name in enumerate(headers.layout_names) if name in DEVICE_DECODED_LAYOUTS]
        self.device_decoded = np.isin(headers.layout, device_codes)  # bool [N]
        self.img_size, self.scale, self.ratio = img_size, scale, ratio

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        box = sample_crop_box(int(self.height[index]), int(self.width[index]), self.scale, self.ratio)
        flip = bool(torch.rand(()) < 0.5)
        if self.device_decoded[index]:
            try:
                data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
            except OSError as exc:
                raise DataError(f"{path}: cannot read image file ({type(exc).__name__}: {exc})") from exc
            return data, True, box, flip, str(path), label
        return crop_resize_pil(read_rgb(path), box, self.img_size), False, box, flip, str(path), label


class DeviceDecode(nn.Module):
    """The batch transform of --decode gpu: EncodedBatch -> float32 [N, 3, S, S] on the module's device,
    cropped, resized (bicubic, antialiased), flipped and normalised like the CPU pipeline for the same boxes."""

    def __init__(self, img_size: int, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        super().__init__()
        self.img_size = img_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, batch: EncodedBatch) -> torch.Tensor:
        device, size = self.mean.device, self.img_size
        images = torch.empty(len(batch), 3, size, size, dtype=torch.uint8, device=device)
        on_device = [i for i, flag in enumerate(batch.on_device.tolist()) if flag]
        decoded = self.decode([batch.data[i] for i in on_device], [batch.paths[i] for i in on_device])
        boxes = batch.boxes.tolist()  # host tensor: no device sync
        for i, image in zip(on_device, decoded):
            top, left, height, width = boxes[i]
            images[i] = F2.resized_crop(image, top, left, height, width, [size, size],
                                        interpolation=InterpolationMode.BICUBIC, antialias=True)
        for i in sorted(set(range(len(batch))) - set(on_device)):
            images[i] = batch.data[i].to(device, non_blocking=True)
        flips = batch.flips.to(device, non_blocking=True).view(-1, 1, 1, 1)
        images = torch.where(flips, images.flip(-1), images).float().div_(255)  # [N, 3, S, S] in [0, 1]
        return (images - self.mean) / self.std

    def decode(self, data: list, paths: list) -> list:
        """decode_jpeg of the whole list at once (batched nvJPEG on CUDA); if that fails, one by one, each on
        the CPU when the device decoder refuses it, and a DataError naming a file no decoder reads."""
        if not data:
            return []
        device = self.mean.device
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            return [self.decode_one(d, path, device) for d, path in zip(data, paths)]

    @staticmethod
    def decode_one(data: torch.Tensor, path: str, device) -> torch.Tensor:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB).to(device)
        except RuntimeError as exc:
            raise DataError(f"{path}: cannot decode JPEG file ({exc})") from exc

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}"


def build_encoded_pretrain_dataset(args) -> Dataset:
    """--decode gpu's worker-side dataset over the same checked file list as build_imagenet_pretrain_dataset."""
    files, _ = pretrain_samples(data_root(args), index_dir(args))
    files, headers, skipped = _checked_rgb_files(files, args)
    dataset = EncodedImageFiles(files, headers, args.img_size)
    dataset.skipped_bad_files = skipped
    return dataset


# --------------------------------------------------------------------------------------------------
# A tiny ImageNet-style folder (tests, benchmarks, the README's CPU run)
# --------------------------------------------------------------------------------------------------
PHOTOS = ("chelsea", "coffee", "rocket")  # scikit-image ships these photographs: nothing is downloaded


def write_photo_folder(root, n_train: int = 4, n_val: int = 2, size=(64, 48), quality: int = 90):
    """Write root/{train,val}/<photo>/<photo>_<i>.JPEG: one class per photograph of scikit-image's (a cat, a cup
    of coffee, a rocket), each image a different crop of it, mirrored every other time, resized to `size`
    (width, height). Returns root as a Path."""
    from pathlib import Path
    from skimage import data as photos

    root = Path(root)
    for name in PHOTOS:
        image = Image.fromarray(getattr(photos, name)())
        width, height = image.size
        for split, first, count in (("train", 0, n_train), ("val", n_train, n_val)):
            for j in range(first, first + count):
                inset = j % 8  # eight different crops, then again mirrored the other way
                box = (inset * width // 20, inset * height // 24, width - inset * width // 28,
                       height - inset * height // 32)
                crop = image.crop(box).resize(tuple(size), Image.BICUBIC)
                if j % 2:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                path = root / split / name / f"{name}_{j}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                crop.save(path, quality=quality)
    return root
