"""The reference augmentation on C-channel [C, H, W] tensors, and its flags.

Pretraining and fine-tune training (`TrainAugment`): a square crop at a random position (by default the
reference's fixed S/2 window, S = --img_size), antialiased bicubic resize to S, then rotation (bilinear),
integer shift and horizontal / vertical flips, all zero-filled. Fine-tune validation (`CentreCropResize`): a
centre crop resized to S. No mean/std normalisation.

The transforms take uint8, uint16 or float32 tensors and return float32; integers are scaled by their dtype's
maximum (1/255, 1/65535) at the end, as util.io.read_image scales them. The result equals the torchvision v2
sequence RandomCrop -> Resize(bicubic, antialias) -> RandomRotation(bilinear, fill 0) -> RandomAffine(translate,
fill 0) -> flips on the float image (tests/test_transforms.py compares them), but costs a fraction of it:
- the crop is a view of the integer image and only the crop is converted to float;
- on the CPU, up to 160 px, the resize is two products with the native kernel's own weight matrices;
- rotation, shift and flips are one bilinear `grid_sample` (`augment_batch`): the shift and flips only move
  the sampling grid, and the zero fill of each step becomes one per-pixel factor (`warp_factor`) that also
  holds the dtype scale;
- the same function runs per batch on the GPU for --gpu_augment (util/gpu_augment.py), with the same
  parameter distributions (`sample_warp`).
"""
import functools
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from util.errors import ConfigError

DEFAULT_VAL_CROP = 48  # the reference's fine-tune validation centre crop (in pixels)
DEFAULT_ROTATION = 90.0  # the reference: rotation uniform in [-90, 90] degrees
DEFAULT_MAX_SHIFT = 0.3  # the reference: shift up to 30% of the side per axis, whole pixels
DTYPE_MAX = {torch.uint8: 255.0, torch.uint16: 65535.0}  # integer pixels are scaled by 1 / max, floats kept


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------
def add_augmentation_flags(parser):
    """--crop_scale, --rotation and --max_shift (the training augmentation); --val_crop is each script's own."""
    parser.add_argument("--crop_scale", default=None, type=float, nargs=2, metavar=("MIN", "MAX"),
                        help="side of the square training crop as a fraction of the image's shorter side, uniform "
                             "in [MIN, MAX] (e.g. 0.8 1.0 on cell-centred crops); default: the reference's fixed "
                             "window of half --img_size pixels")
    parser.add_argument("--rotation", default=DEFAULT_ROTATION, type=float, metavar="DEG",
                        help="rotation uniform in [-DEG, DEG] degrees, zero fill (0: none)")
    parser.add_argument("--max_shift", default=DEFAULT_MAX_SHIFT, type=float, metavar="FRACTION",
                        help="shift of up to FRACTION of --img_size per axis, whole pixels, zero fill (0: none)")
    return parser


def augmentation_options(args) -> dict:
    """{crop_scale, rotation, max_shift} from args, checked; the reference's values where args lack them (e.g.
    the saved args of an older checkpoint)."""
    crop_scale = getattr(args, "crop_scale", None)
    options = dict(crop_scale=None if crop_scale is None else tuple(float(v) for v in crop_scale),
                   rotation=float(getattr(args, "rotation", DEFAULT_ROTATION)),
                   max_shift=float(getattr(args, "max_shift", DEFAULT_MAX_SHIFT)))
    check_augmentation(**options)
    return options


def check_augmentation(crop_scale=None, rotation=DEFAULT_ROTATION, max_shift=DEFAULT_MAX_SHIFT) -> None:
    """ConfigError naming the flag for a value the augmentation cannot use."""
    if crop_scale is not None:
        low, high = crop_scale
        if not (0 < low <= 1 and 0 < high <= 1) or low > high:
            raise ConfigError(f"--crop_scale {low:g} {high:g}: expected MIN and MAX in (0, 1] with MIN <= MAX "
                              "(fractions of the image's shorter side)")
    if not 0 <= rotation <= 180:
        raise ConfigError(f"--rotation {rotation:g}: expected degrees between 0 and 180")
    if not 0 <= max_shift < 1:
        raise ConfigError(f"--max_shift {max_shift:g}: expected a fraction of the side in [0, 1)")


# --------------------------------------------------------------------------------------------------
# The pieces: crop, resize, one warp
# --------------------------------------------------------------------------------------------------
def dtype_scale(dtype: torch.dtype) -> float:
    """1/255 for uint8, 1/65535 for uint16, 1 for float32: the factor that maps pixels to intensities."""
    if dtype in DTYPE_MAX:
        return 1.0 / DTYPE_MAX[dtype]
    if dtype == torch.float32:
        return 1.0
    raise TypeError(f"augmentation takes uint8, uint16 or float32 images, got {dtype}")


def crop_float(image: torch.Tensor, top: int, left: int, side: int, scaled: bool = False) -> torch.Tensor:
    """The side x side window at (top, left) of [C, H, W] `image`, as a contiguous float32 copy; `scaled`: integer
    pixels divided by their dtype's maximum (exactly as util.io.read_image divides them)."""
    window = image[..., top:top + side, left:left + side]  # a view: the integer image is never copied whole
    crop = window.to(torch.float32, memory_format=torch.contiguous_format)
    if scaled and image.dtype in DTYPE_MAX:
        crop.div_(DTYPE_MAX[image.dtype])
    return crop


# Up to this output side a CPU resize runs as two small matrix products, which on one core beat the native
# antialiased-bicubic kernel (64 -> 128 px: 0.24 against 0.36 ms for 7 channels); above it the native kernel wins
# (112 -> 224 px: 1.06 against 1.19 ms). Measured with benchmarks/bench_data.py --stages on the development machine.
MATMUL_RESIZE_MAX_SIDE = 160


@functools.lru_cache(maxsize=32)
def resize_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """[out, in] weights of F.interpolate's antialiased bicubic resize along one axis, read off by resizing the
    identity, so that `matrix @ x` equals the native kernel along that axis (to float rounding). Cached: read-only."""
    identity = torch.eye(in_size).reshape(in_size, 1, 1, in_size)
    rows = F.interpolate(identity, size=(1, out_size), mode="bicubic", align_corners=False, antialias=True)
    return rows.reshape(in_size, out_size).T.contiguous()


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, h, w] float -> [N, C, size, size]: bicubic with antialias, as v2.Resize (a no-op at equal size).

    bicubic is what the reference's authors meant (their cv2 call gave INTER_AREA by mistake); no clamp: the
    small overshoot at edges is harmless and keeps float inputs unbounded.
    """
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    if images.device.type == "cpu" and size <= MATMUL_RESIZE_MAX_SIDE:  # the same weights, faster on one core
        return torch.matmul(torch.matmul(resize_matrix(height, size), images), resize_matrix(width, size).T)
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


_PIXEL_CENTRES = {}  # (size, device) -> [size]: built once, read every image (a handful of tiny ops saved each time)


def pixel_centres(size: int, device) -> torch.Tensor:
    """Normalised (align_corners=False) coordinates of the pixel centres along one side: [size] (do not modify)."""
    key = (size, str(device))
    if key not in _PIXEL_CENTRES:
        _PIXEL_CENTRES[key] = (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1
    return _PIXEL_CENTRES[key]


def warp_grid(size: int, angle_deg, shift, flip):
    """Sampling grid [N, S, S, 2] and validity [N, 1, S, S] for rotate -> integer shift -> flips.

    angle_deg [N] (counter-clockwise, as torchvision), shift [N, 2] whole pixels (x right, y down),
    flip [N, 2] bool (horizontal, vertical). Output pixel q reads the rotated image at flip(q) - shift;
    positions the shift brought in from outside the frame are invalid (zero, as the nearest-neighbour
    shift of torchvision fills them). The grid is affine in the pixel position, so it is built from one
    [N, S] vector per axis; few, small ops, because on the CPU this runs per image.
    """
    n, device = angle_deg.shape[0], angle_deg.device
    sign = 1.0 - 2.0 * flip.float()  # [N, 2]: -1 where flipped
    # [N, 2, S]: flip(q) - shift along the columns (x) and the rows (y), in normalised units
    xy = pixel_centres(size, device) * sign[:, :, None] - shift.float()[:, :, None] * (2.0 / size)
    theta = torch.deg2rad(angle_deg.float())
    products = torch.stack([theta.cos(), theta.sin()], 1)[:, :, None, None] * xy[:, None]  # [N, cos|sin, x|y, S]
    (cos_x, cos_y), (sin_x, sin_y) = products[:, 0].unbind(1), products[:, 1].unbind(1)  # [N, S] each
    # inverse rotation about the centre; y points down, so counter-clockwise on screen reads (x, y) from here:
    grid = torch.empty(n, size, size, 2, device=device)
    torch.sub(cos_x[:, None, :], sin_y[:, :, None], out=grid[..., 0])  # cos x - sin y
    torch.add(sin_x[:, None, :], cos_y[:, :, None], out=grid[..., 1])  # sin x + cos y
    inside = xy.abs() < 1  # [N, 2, S]
    valid = (inside[:, 1, :, None] & inside[:, 0, None, :]).unsqueeze(1)  # [N, 1, S, S]
    return grid, valid


def frame_coverage(grid: torch.Tensor, size: int) -> torch.Tensor:
    """[N, S, S, 2] grid -> [N, 1, S, S]: the weight bilinear sampling gives to pixels inside the frame.

    torchvision's zero fill multiplies the rotated image by the rotated all-ones image; for bilinear sampling
    that image is separable, the product of one tent-shaped coverage per axis, so it needs no second sampling
    pass. In pixel units i = ((g + 1) * S - 1) / 2 the coverage along an axis is clamp(min(i + 1, S - i), 0, 1)
    = clamp(1/2 + (1 - |g|) * S / 2, 0, 1).
    """
    per_axis = grid.abs().mul_(-size / 2).add_(size / 2 + 0.5).clamp_(0, 1)  # [N, S, S, 2]
    return (per_axis[..., 0] * per_axis[..., 1]).unsqueeze(1)


def augment_batch(crops: torch.Tensor, img_size: int, angle_deg, shift, flip, scale: float = 1.0) -> torch.Tensor:
    """[N, C, s, s] float crops -> [N, C, S, S] float32: bicubic resize (antialiased, as v2.Resize) then one bilinear
    warp for rotation + shift + flips, zero-filled, times `scale` (the dtype's 1/max for integer pixels)."""
    x = resize(crops.float(), img_size)
    grid, valid = warp_grid(img_size, angle_deg, shift, flip)
    factor = frame_coverage(grid, img_size).mul_(valid)  # [N, 1, S, S]: torchvision's fill, and the shift's
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.mul_(factor if scale == 1.0 else factor.mul_(scale))


def sample_warp(n: int, img_size: int, rotation: float, max_shift: float, device=None):
    """Random (angle [N] degrees, shift [N, 2] whole pixels, flip [N, 2] bool), independently per image, from
    torch's RNG on `device`: angle uniform in [-rotation, rotation], shift round(uniform(+-max_shift * S)) per
    axis (torchvision's RandomAffine rule), each flip with p = 0.5."""
    angle = torch.empty(n, device=device).uniform_(-rotation, rotation)
    max_pixels = max_shift * img_size
    shift = torch.empty(n, 2, device=device).uniform_(-max_pixels, max_pixels).round_()
    flip = torch.rand(n, 2, device=device) < 0.5
    return angle, shift, flip


# --------------------------------------------------------------------------------------------------
# The transforms the datasets call
# --------------------------------------------------------------------------------------------------
class TensorTransform(ABC):
    """A transform of one [C, H, W] uint8 / uint16 / float32 tensor to float32 [C, S, S], with `min_side`,
    the smallest input side it accepts.

    The datasets check `min_side` before calling it, so that a too-small image fails naming its file.
    """

    min_side = 1

    @abstractmethod
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """[C, H, W] image -> float32 [C, S, S]."""


class RandomCropWindow:
    """Where the training crop lies: the reference's fixed S/2 window, or (crop_scale) a square whose side is a
    uniform fraction of the image's shorter side; at a uniformly random position."""

    def __init__(self, img_size: int, crop_scale=None):
        check_augmentation(crop_scale=crop_scale)
        self.img_size, self.crop_scale = img_size, None if crop_scale is None else tuple(crop_scale)
        self.min_side = 1 if crop_scale is not None else img_size // 2

    def sample(self, height: int, width: int):
        """(top, left, side) from torch's RNG."""
        if self.crop_scale is None:
            side = self.img_size // 2
        else:
            fraction = torch.empty(()).uniform_(*self.crop_scale).item()
            side = max(1, min(round(fraction * min(height, width)), height, width))
        top = int(torch.randint(0, height - side + 1, ()))
        left = int(torch.randint(0, width - side + 1, ()))
        return top, left, side


class TrainAugment(TensorTransform):
    """Pretraining and fine-tune training: random crop -> resize to S -> rotation, shift, flips (module docstring)."""

    def __init__(self, img_size: int, crop_scale=None, rotation: float = DEFAULT_ROTATION,
                 max_shift: float = DEFAULT_MAX_SHIFT):
        check_augmentation(crop_scale, rotation, max_shift)
        self.img_size, self.rotation, self.max_shift = img_size, float(rotation), float(max_shift)
        self.window = RandomCropWindow(img_size, crop_scale)
        self.min_side = self.window.min_side

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, side = self.window.sample(*image.shape[-2:])
        crop = crop_float(image, top, left, side)[None]  # [1, C, s, s]
        warp = sample_warp(1, self.img_size, self.rotation, self.max_shift)
        return augment_batch(crop, self.img_size, *warp, scale=dtype_scale(image.dtype))[0]

    def __repr__(self) -> str:
        crop = "S/2 px" if self.window.crop_scale is None else f"{self.window.crop_scale} of the side"
        return (f"TrainAugment(S={self.img_size}, crop={crop}, rotation=+-{self.rotation:g} deg, "
                f"shift=+-{self.max_shift:g}*S px, flips p=0.5)")


class CentreCropResize(TensorTransform):
    """Validation: the centre crop x crop window (offset round((H - crop) / 2), as v2.CenterCrop) resized to S."""

    def __init__(self, img_size: int, crop: int):
        self.img_size, self.crop, self.min_side = img_size, crop, crop

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        top, left = int(round((height - self.crop) / 2.0)), int(round((width - self.crop) / 2.0))
        crop = crop_float(image, top, left, self.crop, scaled=True)  # scaled before the resize: fewer pixels
        return resize(crop[None], self.img_size)[0]

    def __repr__(self) -> str:
        return f"CentreCropResize(crop={self.crop}, S={self.img_size})"


def build_pretrain_transform(img_size: int, crop_scale=None, rotation: float = DEFAULT_ROTATION,
                             max_shift: float = DEFAULT_MAX_SHIFT) -> TensorTransform:
    """The training augmentation for S = img_size; the defaults are the reference's (module docstring)."""
    return TrainAugment(img_size, crop_scale, rotation, max_shift)


def build_finetune_transform(is_train: bool, img_size: int, val_crop: int = DEFAULT_VAL_CROP,
                             **augmentation) -> TensorTransform:
    """Fine-tuning: the pretraining augmentation (`augmentation`: crop_scale, rotation, max_shift) for training;
    centre crop `val_crop` + resize for validation."""
    if is_train:
        return build_pretrain_transform(img_size, **augmentation)
    return CentreCropResize(img_size, val_crop)
