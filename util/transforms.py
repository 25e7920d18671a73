"""The reference augmentation on C-channel [C, H, W] tensors, with torchvision.transforms.v2.

Pretraining and fine-tune training: a fixed-size S/2 crop at a random position, bicubic resize to S, rotation,
integer shift, flips. Fine-tune validation: a centre crop resized to S. No mean/std normalisation.
"""
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

DEFAULT_VAL_CROP = 48  # the reference's fine-tune validation centre crop (in pixels)


class TensorTransform:
    """A v2 pipeline for [C, H, W] tensors plus `min_side`, the smallest input side it accepts.

    The datasets check `min_side` before calling the pipeline: v2.CenterCrop would silently zero-pad a
    small image and v2.RandomCrop would fail without naming the file.
    """

    def __init__(self, pipeline: v2.Compose, min_side: int):
        self.pipeline = pipeline
        self.min_side = min_side

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.pipeline(image)  # [C, H, W] -> [C, S, S]

    def __repr__(self) -> str:
        return f"TensorTransform(min_side={self.min_side}, pipeline={self.pipeline})"


def build_pretrain_transform(img_size: int) -> TensorTransform:
    """The reference augmentation for pretraining and fine-tune training, S = img_size.

    Fixed-size S/2 crop at a uniform random position, bicubic resize to S x S, rotation uniform in
    [-90, 90] degrees and an integer shift of up to 30% of the side (both zero-filled), then horizontal
    and vertical flips with p = 0.5. No mean/std normalisation (the reference has none).
    """
    crop = img_size // 2
    pipeline = v2.Compose([
        v2.RandomCrop(crop),
        # bicubic is what the reference's authors meant (their cv2 call gave INTER_AREA by mistake);
        # no clamp: the small bicubic overshoot at edges is harmless and keeps float inputs unbounded
        v2.Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomRotation(90, interpolation=InterpolationMode.BILINEAR, fill=0),
        v2.RandomAffine(degrees=0, translate=(0.3, 0.3), fill=0),  # integer shift, so nearest is exact
        v2.RandomHorizontalFlip(0.5),
        v2.RandomVerticalFlip(0.5),
    ])
    return TensorTransform(pipeline, min_side=crop)


def build_finetune_transform(is_train: bool, img_size: int, val_crop: int = DEFAULT_VAL_CROP) -> TensorTransform:
    """Fine-tuning: the pretraining augmentation for training; centre crop `val_crop` + resize for validation."""
    if is_train:
        return build_pretrain_transform(img_size)
    pipeline = v2.Compose([
        v2.CenterCrop(val_crop),
        # antialias matters only when val_crop > img_size (downscaling); it keeps that case alias-free
        v2.Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC, antialias=True),
    ])
    return TensorTransform(pipeline, min_side=val_crop)
