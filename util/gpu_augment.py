"""The pretraining augmentation split between the data-loader workers and the GPU (--gpu_augment).

The CPU pipeline of util.transforms.build_pretrain_transform (crop, bicubic resize to S, rotation, integer
shift, flips) costs about 1 ms per 7-channel 128 px image and 2 ms at 224 px on one core: too slow to feed
thousands of images per second from 16 cores. Here the workers only decode each file and cut the random
crop, converting just the crop to float32; `GPUAugment` then does the rest for the whole batch on the device
with util.transforms.augment_batch, the CPU pipeline's own function (one bicubic resize and one grid_sample
that applies rotation, shift and flips at once). With --crop_scale the crops differ in size, so the workers
also resize them to S and the device only warps. --rotation, --max_shift and --crop_scale apply as on the
CPU, with the same parameter distributions (tests/test_gpu_augment.py).
"""

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from util.datasets import ImageFileDataset, build_pretrain_dataset
from util.transforms import (DEFAULT_MAX_SHIFT, DEFAULT_ROTATION, RandomCropWindow, TensorTransform,
                             augment_batch, augmentation_options, crop_float, resize, sample_warp)

__all__ = ["CroppedImageFiles", "GPUAugment", "WorkerCrop", "augment_batch", "build_gpu_augment",
           "build_gpu_pretrain_dataset", "crop_size"]


# --------------------------------------------------------------------------------------------------
# Worker side: decode and crop, float32 only for the crop
# --------------------------------------------------------------------------------------------------
def crop_size(img_size: int, crop_scale=None) -> int:
    """Side of the crops the workers hand over: the reference's S/2 window as it is; with --crop_scale the
    crops differ in size, so the workers resize them to S (the batch must stack) and the device only warps."""
    return img_size // 2 if crop_scale is None else img_size


class WorkerCrop(TensorTransform):
    """[C, H, W] uint8 / uint16 / float32 -> the training crop [C, s, s] float32 scaled by dtype (s = crop_size).

    The window comes from util.transforms.RandomCropWindow (torch's RNG, which DataLoader seeds per worker),
    so it is drawn exactly as the CPU pipeline draws it.
    """

    def __init__(self, img_size: int, crop_scale=None):
        self.window = RandomCropWindow(img_size, crop_scale)
        self.img_size, self.out_side, self.min_side = img_size, crop_size(img_size, crop_scale), self.window.min_side

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, side = self.window.sample(*image.shape[-2:])
        crop = crop_float(image, top, left, side, scaled=True)
        return resize(crop[None], self.out_side)[0]  # a no-op for the reference's fixed window


class CroppedImageFiles(ImageFileDataset):
    """Image files -> (training crop [C, s, s] float32, label); GPUAugment finishes the augmentation."""

    def __init__(self, samples, classes, in_chans: int, img_size: int, crop_scale=None):
        super().__init__(samples, classes, in_chans, WorkerCrop(img_size, crop_scale))


def build_gpu_pretrain_dataset(args) -> Dataset:
    """util.datasets.build_pretrain_dataset (synthetic cells, packed cells, or a checked image folder with its
    channel names and normalisation) with the worker crop as its transform: items are (crop, label) for
    build_gpu_augment(args)."""
    return build_pretrain_dataset(args, WorkerCrop(args.img_size, augmentation_options(args)["crop_scale"]))


# --------------------------------------------------------------------------------------------------
# Device side: resize, rotate, shift and flip a batch
# --------------------------------------------------------------------------------------------------
class GPUAugment(nn.Module):
    """The rest of the training augmentation for a batch of worker crops, with random parameters drawn on the
    batch's device (no host sync; reproducible under torch.manual_seed).

    Per image (util.transforms.sample_warp): rotation uniform in [-rotation, rotation] degrees, shift
    round(uniform(+-max_shift * S)) pixels per axis, horizontal and vertical flips with p = 0.5; then
    util.transforms.augment_batch, the CPU pipeline's own resize and warp.
    """

    def __init__(self, img_size: int, rotation: float = DEFAULT_ROTATION, max_shift: float = DEFAULT_MAX_SHIFT,
                 crop_scale=None):
        super().__init__()
        self.img_size, self.rotation, self.max_shift = img_size, float(rotation), float(max_shift)
        self.input_side = crop_size(img_size, crop_scale)

    def sample_params(self, n: int, device):
        return sample_warp(n, self.img_size, self.rotation, self.max_shift, device)

    @torch.no_grad()
    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """crops [N, C, s, s] float -> [N, C, S, S] float32."""
        expected = self.input_side
        if crops.ndim != 4 or crops.shape[-2:] != (expected, expected):
            raise ValueError(f"GPU augmentation for --img_size {self.img_size} expects crops [N, C, {expected}, "
                             f"{expected}], got {tuple(crops.shape)}")
        return augment_batch(crops, self.img_size, *self.sample_params(crops.shape[0], crops.device))

    def extra_repr(self) -> str:
        return (f"img_size={self.img_size}, rotation=+-{self.rotation:g} deg, "
                f"shift=+-{self.max_shift:g}*S px, flips p=0.5")


def build_gpu_augment(args) -> GPUAugment:
    """GPUAugment with the run's --rotation, --max_shift and --crop_scale."""
    return GPUAugment(args.img_size, **augmentation_options(args))
