"""The augmentation (util.transforms): equal to the torchvision v2 float pipeline it replaces, for uint8, uint16 and
float32 inputs; the reference's parameter distributions; --crop_scale, --rotation, --max_shift and their errors; and
the folder datasets handing the transform the stored integer image."""
from argparse import Namespace

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from conftest import torchvision_steps_after_crop
from util.datasets import build_finetune_dataset, build_pretrain_dataset
from util.errors import ConfigError
from util.io import read_image, read_tensor_chw
from util.transforms import (TrainAugment, augmentation_options, build_finetune_transform,
                             build_pretrain_transform, sample_warp)

MAX = {torch.uint8: 255, torch.uint16: 65535}


def torchvision_float_pipeline(image, top, left, side, img_size, angle, shift, flip):
    """The float pipeline this project used before (v2 RandomCrop, then the rest), fixed parameters, float32 image."""
    return torchvision_steps_after_crop(image[:, top:top + side, left:left + side], img_size, angle, shift, flip)


def random_image(dtype, channels=7, height=45, width=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        return torch.rand(channels, height, width, generator=gen)
    return torch.randint(0, MAX[dtype] + 1, (channels, height, width), generator=gen, dtype=torch.int32).to(dtype)


def as_float(image):
    """What util.io.read_image gives for the same pixels."""
    return image.float() / MAX[image.dtype] if image.dtype in MAX else image


def replay(transform: TrainAugment, image, seed):
    """The parameters `transform` draws for `image` under torch.manual_seed(seed), drawn again the same way."""
    torch.manual_seed(seed)
    top, left, side = transform.window.sample(*image.shape[-2:])
    angle, shift, flip = sample_warp(1, transform.img_size, transform.rotation, transform.max_shift)
    return top, left, side, float(angle[0]), shift[0].tolist(), flip[0].tolist()


# ---------------------------------------------------------------- equal to the float pipeline

@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.float32])
@pytest.mark.parametrize("options", [{}, dict(crop_scale=(0.5, 1.0), rotation=30.0, max_shift=0.1)],
                         ids=["reference", "flags"])
def test_train_augment_equals_the_torchvision_float_pipeline(dtype, options):
    image = random_image(dtype)
    transform = build_pretrain_transform(32, **options)
    for seed in range(6):
        torch.manual_seed(seed)
        got = transform(image)
        top, left, side, angle, shift, flip = replay(transform, image, seed)
        expected = torchvision_float_pipeline(as_float(image), top, left, side, 32, angle, shift, flip)
        assert got.dtype == torch.float32 and got.shape == (7, 32, 32)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [128, 192], ids=["matmul-resize", "native-resize"])  # MATMUL_RESIZE_MAX_SIDE 160
@pytest.mark.parametrize("angle,shift,flip", [(90.0, (9, -9), (True, True)), (-90.0, (0, 0), (False, False)),
                                              (45.0, (-3, 7), (False, True))])
def test_extreme_parameters_equal_the_float_pipeline_at_real_sizes(size, angle, shift, flip):
    from util.transforms import augment_batch, crop_float
    image = random_image(torch.uint16, height=size + 2, width=size)
    got = augment_batch(crop_float(image, 1, 2, size // 2)[None], size, torch.tensor([angle]),
                        torch.tensor([shift], dtype=torch.float32), torch.tensor([flip]), scale=1 / 65535)[0]
    expected = torchvision_float_pipeline(as_float(image), 1, 2, size // 2, size, angle, shift, flip)
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-5)  # float32 grid coordinates at this size


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.float32])
def test_val_transform_is_a_deterministic_centre_crop_and_resize(dtype):
    image = random_image(dtype, height=60, width=61)
    transform = build_finetune_transform(False, 32, val_crop=48)
    out = transform(image)
    assert out.shape == (7, 32, 32) and out.dtype == torch.float32 and torch.equal(out, transform(image))
    expected = TF.resize(TF.center_crop(as_float(image), [48, 48]), [32, 32],
                         interpolation=InterpolationMode.BICUBIC, antialias=True)
    torch.testing.assert_close(out, expected)
    assert torch.equal(build_finetune_transform(False, 48, val_crop=48)(image), as_float(image)[:, 6:54, 6:54])  # no resize at 48


def test_folder_datasets_read_integers_and_give_the_float_pipeline_result(make_image_folder):
    root = make_image_folder(classes=("a", "b"), n_per_class=2, size=40, dtype="uint16")
    args = Namespace(dataset="folder", data_path=str(root), img_size=32, in_chans=7, seed=0, val_crop=24,
                     crop_scale=None, rotation=90.0, max_shift=0.3)
    data = build_pretrain_dataset(args)
    path, label = data.samples[3]
    assert read_tensor_chw(path).dtype == torch.uint16
    torch.manual_seed(7)
    image, got_label = data[3]
    assert got_label == label and image.dtype == torch.float32 and image.shape == (7, 32, 32)
    top, left, side, angle, shift, flip = replay(data.transform, read_tensor_chw(path), 7)
    expected = torchvision_float_pipeline(read_image(path), top, left, side, 32, angle, shift, flip)
    torch.testing.assert_close(image, expected, atol=1e-5, rtol=1e-5)
    val = build_finetune_dataset(False, args)
    val_path, _ = val.samples[0]
    torch.testing.assert_close(val[0][0], TF.resize(read_image(val_path)[:, 8:32, 8:32], [32, 32],
                                                    interpolation=InterpolationMode.BICUBIC, antialias=True))


# ---------------------------------------------------------------- parameter distributions

def test_reference_crop_is_a_half_size_window_at_random_positions():
    transform = build_pretrain_transform(32)
    torch.manual_seed(0)
    windows = [transform.window.sample(40, 36) for _ in range(200)]
    assert {side for _, _, side in windows} == {16} and transform.min_side == 16
    assert min(t for t, _, _ in windows) == 0 and max(t for t, _, _ in windows) == 40 - 16
    assert max(left for _, left, _ in windows) == 36 - 16 and len(set(windows)) > 100


def test_crop_scale_draws_sides_as_fractions_of_the_shorter_side():
    transform = build_pretrain_transform(32, crop_scale=(0.5, 0.8))
    torch.manual_seed(0)
    windows = [transform.window.sample(100, 60) for _ in range(500)]
    sides = [side for _, _, side in windows]
    assert min(sides) == 30 and max(sides) == 48 and len(set(sides)) == 19  # round(uniform(0.5, 0.8) * 60)
    assert all(top + side <= 100 and left + side <= 60 for top, left, side in windows)
    assert transform.min_side == 1  # any image gives a crop
    whole = build_pretrain_transform(32, crop_scale=(1.0, 1.0), rotation=0, max_shift=0)
    image = torch.rand(3, 32, 32)
    torch.manual_seed(1)
    out = whole(image)  # the whole image, not rotated or shifted: only the flips remain
    assert any(torch.allclose(out, flipped, atol=1e-6) for flipped in
               (image, image.flip(-1), image.flip(-2), image.flip(-1).flip(-2)))


def test_rotation_and_shift_follow_their_flags():
    torch.manual_seed(0)
    angle, shift, flip = sample_warp(4000, 100, 90.0, 0.3)
    assert angle.min() >= -90 and angle.max() <= 90 and angle.min() < -85 and angle.max() > 85
    assert torch.equal(shift, shift.round()) and shift.abs().max() == 30  # round(uniform(+-0.3 * 100))
    assert 0.45 < flip.float().mean() < 0.55 and angle.std() > 45
    angle, shift, _ = sample_warp(4000, 100, 10.0, 0.05)
    assert angle.abs().max() <= 10 and angle.abs().max() > 9.5 and shift.abs().max() == 5
    angle, shift, _ = sample_warp(100, 100, 0.0, 0.0)
    assert not angle.any() and not shift.any()


def test_rotation_fills_corners_with_zeros_and_varies():
    transform = build_pretrain_transform(32, max_shift=0.0)
    torch.manual_seed(0)
    outputs = [transform(torch.ones(7, 32, 32)) for _ in range(10)]
    for out in outputs:
        assert torch.allclose(out[:, 15:17, 15:17], torch.ones(1)) and out.min() >= 0  # the centre stays inside
    assert sum(bool(out[:, 0, 0].lt(1e-6).all()) for out in outputs) >= 6  # corners of a rotated image are fill
    assert len({round(out.sum().item(), 3) for out in outputs}) == 10  # every draw rotates by a different angle


def test_shift_moves_the_image_with_zero_fill():
    transform = build_pretrain_transform(40, rotation=0.0, max_shift=0.3)
    torch.manual_seed(0)
    outputs = [transform(torch.ones(2, 40, 40, dtype=torch.float32)) for _ in range(20)]
    zero_rows = [int(out[0].lt(1e-6).all(dim=1).sum()) for out in outputs]
    assert max(zero_rows) <= 12 and len(set(zero_rows)) > 3  # up to 30% of 40 px, random amount
    assert all(set(torch.unique(out.round(decimals=5)).tolist()) <= {0.0, 1.0} for out in outputs)  # whole pixels


def test_flips_happen_about_half_the_time():
    transform = build_pretrain_transform(8, crop_scale=(1.0, 1.0), rotation=0.0, max_shift=0.0)
    image = torch.arange(64, dtype=torch.float32).reshape(1, 8, 8)
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(200)]
    horizontal = sum(torch.allclose(out[:, 0], image[:, 0].flip(-1)) or torch.allclose(out[:, 0], image[:, -1].flip(-1))
                     for out in outputs)
    assert 70 < horizontal < 130


def test_draws_differ_and_follow_the_torch_seed():
    transform, image = build_pretrain_transform(32), random_image(torch.uint16, height=48, width=48)
    torch.manual_seed(3)
    first = [transform(image) for _ in range(5)]
    torch.manual_seed(3)
    again = [transform(image) for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(not torch.equal(first[i], first[j]) for i in range(5) for j in range(i + 1, 5))


# ---------------------------------------------------------------- flags and bad values

def test_augmentation_options_read_args_and_default_to_the_reference():
    assert augmentation_options(Namespace()) == dict(crop_scale=None, rotation=90.0, max_shift=0.3)
    args = Namespace(crop_scale=[0.8, 1.0], rotation=15, max_shift=0.1)
    assert augmentation_options(args) == dict(crop_scale=(0.8, 1.0), rotation=15.0, max_shift=0.1)


@pytest.mark.parametrize("options,message", [
    (dict(crop_scale=(0.0, 1.0)), r"--crop_scale 0 1: expected MIN and MAX in \(0, 1\] with MIN <= MAX"),
    (dict(crop_scale=(0.5, 1.2)), r"--crop_scale 0.5 1.2: expected MIN and MAX in \(0, 1\]"),
    (dict(crop_scale=(0.9, 0.6)), r"--crop_scale 0.9 0.6: expected MIN and MAX in \(0, 1\] with MIN <= MAX"),
    (dict(rotation=-5.0), r"--rotation -5: expected degrees between 0 and 180"),
    (dict(max_shift=1.0), r"--max_shift 1: expected a fraction of the side in \[0, 1\)"),
])
def test_bad_augmentation_values_name_the_flag(options, message):
    with pytest.raises(ConfigError, match=message):
        augmentation_options(Namespace(**options))


def test_augmentation_flags_are_saved_in_the_checkpoint_args_and_bad_ones_stop_in_one_line(tmp_path, capsys):
    import main_pretrain
    from util.cli import run_tool
    flags = ["--arch", "main_vit_tiny", "--img_size", "32", "--patch_size", "8", "--decoder_embed_dim", "32",
             "--decoder_depth", "1", "--decoder_num_heads", "2", "--device", "cpu", "--epochs", "0"]
    args = main_pretrain.get_args_parser().parse_args([*flags, "--crop_scale", "0.8", "1.0", "--rotation", "10",
                                                       "--max_shift", "0.1", "--output_dir", str(tmp_path)])
    assert run_tool(main_pretrain.main, args) == 0
    saved = torch.load(tmp_path / "checkpoint-init.pth", weights_only=True)["args"]
    assert (saved["crop_scale"], saved["rotation"], saved["max_shift"]) == ([0.8, 1.0], 10.0, 0.1)
    assert augmentation_options(Namespace(**saved)) == dict(crop_scale=(0.8, 1.0), rotation=10.0, max_shift=0.1)
    capsys.readouterr()
    bad = main_pretrain.get_args_parser().parse_args([*flags, "--crop_scale", "0.9", "0.5", "--output_dir",
                                                      str(tmp_path / "bad")])
    assert run_tool(main_pretrain.main, bad) == 2
    assert capsys.readouterr().err == ("error: --crop_scale 0.9 0.5: expected MIN and MAX in (0, 1] with MIN <= MAX "
                                       "(fractions of the image's shorter side)\n")
    assert not (tmp_path / "bad").exists()
