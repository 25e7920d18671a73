"""The pretraining augmentation split between the data-loader workers and the GPU (--gpu_augment).

The CPU pipeline of util.transforms.build_pretrain_transform (S/2 crop, bicubic resize to S, rotation,
integer shift, flips) costs 10-20 ms per 7-channel 224 px image on one core: far too slow to feed
thousands of images per second from 16 cores. Here the workers only decode each file and cut the random
S/2 crop, converting just the crop to float32; `GPUAugment` then does the rest for the whole batch on the
device in three kernels (one bicubic resize and one grid_sample that applies rotation, shift and flips at
once). The result follows the CPU pipeline exactly for given parameters (tests/test_gpu_augment.py
compares them), with the same parameter distributions.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2

from util.datasets import ImageFileDataset, checked, data_root, dataset_kind, pretrain_samples, synthetic_size
from util.io import check_image, read_raw_chw, to_unit_float
from util.synthetic import SyntheticCells
from util.transforms import TensorTransform

MAX_ROTATION_DEG = 90.0  # the reference's rotation range: uniform in [-90, 90]
MAX_SHIFT_FRACTION = 0.3  # the reference's shift: up to 30% of the side, rounded to whole pixels


# --------------------------------------------------------------------------------------------------
# Worker side: decode and crop, float32 only for the crop
# --------------------------------------------------------------------------------------------------
def crop_size(img_size: int) -> int:
    return img_size // 2  # the reference crops half the training side and resizes it up


def random_crop_unit_float(array: np.ndarray, crop: int, path) -> torch.Tensor:
    """Uniformly placed crop x crop window of [C, H, W] `array`, scaled to float32 like read_image.

    The position comes from torch's RNG, which DataLoader seeds per worker (as for v2.RandomCrop).
    """
    _, height, width = array.shape
    top = int(torch.randint(0, height - crop + 1, ()))
    left = int(torch.randint(0, width - crop + 1, ()))
    return to_unit_float(array[:, top:top + crop, left:left + crop], path)  # [C, crop, crop]


class CroppedImageFiles(ImageFileDataset):
    """Image files -> (random S/2 crop [C, S/2, S/2] float32, label); GPUAugment finishes the augmentation."""

    def __init__(self, samples, classes, in_chans: int, img_size: int):
        crop = crop_size(img_size)
        super().__init__(samples, classes, in_chans, TensorTransform(v2.RandomCrop(crop), min_side=crop))
        self.crop = crop

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        array = read_raw_chw(path)
        check_image(array, path, self.in_chans, self.crop)  # reads only .shape: a numpy array will do
        return random_crop_unit_float(array, self.crop, path), label


def build_gpu_pretrain_dataset(args) -> Dataset:
    """Like util.datasets.build_pretrain_dataset, but items are (S/2 crop, label) for GPUAugment(args.img_size)."""
    crop = crop_size(args.img_size)
    if dataset_kind(args) == "synthetic":
        return SyntheticCells(synthetic_size(args), args.img_size, args.in_chans, seed=args.seed, split="train",
                              transform=v2.RandomCrop(crop))
    samples, classes = pretrain_samples(data_root(args))
    return checked(CroppedImageFiles(samples, classes, args.in_chans, args.img_size))


# --------------------------------------------------------------------------------------------------
# Device side: resize, rotate, shift and flip a batch
# --------------------------------------------------------------------------------------------------
def pixel_centres(size: int, device) -> torch.Tensor:
    """Normalised (align_corners=False) coordinates of the pixel centres along one side: [size]."""
    return (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1


def warp_grid(size: int, angle_deg, shift, flip):
    """Sampling grid [N, S, S, 2] and validity [N, 1, S, S] for rotate -> integer shift -> flips.

    angle_deg [N] (counter-clockwise, as torchvision), shift [N, 2] whole pixels (x right, y down),
    flip [N, 2] bool (horizontal, vertical). Output pixel q reads the rotated image at flip(q) - shift;
    positions the shift brought in from outside the frame are invalid (zero, as the nearest-neighbour
    shift of torchvision fills them).
    """
    centres = pixel_centres(size, angle_deg.device)
    y, x = torch.meshgrid(centres, centres, indexing="ij")  # [S, S] each
    sign = 1.0 - 2.0 * flip.float()  # [N, 2]: -1 where flipped
    x = x * sign[:, 0, None, None] - shift[:, 0, None, None] * (2.0 / size)  # [N, S, S]
    y = y * sign[:, 1, None, None] - shift[:, 1, None, None] * (2.0 / size)
    valid = ((x.abs() < 1) & (y.abs() < 1)).unsqueeze(1)  # [N, 1, S, S]
    theta = torch.deg2rad(angle_deg.float())
    cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
    # inverse rotation about the centre; y points down, so counter-clockwise on screen reads (x, y) from here:
    grid = torch.stack([cos * x - sin * y, sin * x + cos * y], dim=-1)  # [N, S, S, 2]
    return grid, valid


def augment_batch(crops: torch.Tensor, img_size: int, angle_deg, shift, flip) -> torch.Tensor:
    """[N, C, s, s] crops -> [N, C, S, S]: bicubic resize (antialiased, as v2.Resize), then one bilinear
    warp for rotation + shift + flips, zero-filled. Border pixels of the rotation are weighted by the
    warped coverage of the frame, as torchvision's fill does; float32 throughout."""
    x = F.interpolate(crops.float(), size=(img_size, img_size), mode="bicubic", align_corners=False,
                      antialias=True)
    grid, valid = warp_grid(img_size, angle_deg, shift, flip)
    ones = torch.ones_like(x[:, :1])
    warped = F.grid_sample(torch.cat([x, ones], dim=1), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)  # [N, C+1, S, S]
    image, coverage = warped[:, :-1], warped[:, -1:]
    return image * coverage * valid


class GPUAugment(nn.Module):
    """The rest of the reference augmentation for a batch of S/2 crops, with random parameters drawn on
    the batch's device (no host sync; reproducible under torch.manual_seed).

    Per image: rotation uniform in [-90, 90] degrees, shift round(uniform(+-0.3 S)) pixels per axis,
    horizontal and vertical flips with p = 0.5.
    """

    def __init__(self, img_size: int):
        super().__init__()
        self.img_size = img_size

    def sample_params(self, n: int, device):
        angle = torch.empty(n, device=device).uniform_(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
        max_shift = MAX_SHIFT_FRACTION * self.img_size
        shift = torch.empty(n, 2, device=device).uniform_(-max_shift, max_shift).round()
        flip = torch.rand(n, 2, device=device) < 0.5
        return angle, shift, flip

    @torch.no_grad()
    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """crops [N, C, S/2, S/2] (any float or integer-free dtype) -> [N, C, S, S] float32."""
        expected = crop_size(self.img_size)
        if crops.ndim != 4 or crops.shape[-2:] != (expected, expected):
            raise ValueError(f"GPU augmentation for --img_size {self.img_size} expects crops [N, C, {expected}, "
                             f"{expected}], got {tuple(crops.shape)}")
        return augment_batch(crops, self.img_size, *self.sample_params(crops.shape[0], crops.device))

    def extra_repr(self) -> str:
        return (f"img_size={self.img_size}, rotation=+-{MAX_ROTATION_DEG:g} deg, "
                f"shift=+-{MAX_SHIFT_FRACTION:g}*S px, flips p=0.5")

