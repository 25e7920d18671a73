"""The --gpu_augment split: worker-side crops and the batched device augmentation (run here on the CPU)."""
from argparse import Namespace

import numpy as np
import pytest
import torch

import models_dama
from engine_pretrain import train_one_epoch
from util.errors import DataError
from util.io import read_image
from util.gpu_augment import (CroppedImageFiles, GPUAugment, WorkerCrop, augment_batch, build_gpu_augment,
                              build_gpu_pretrain_dataset, crop_size)
from util.transforms import build_pretrain_transform
from util.misc import LossScaler


from conftest import torchvision_steps_after_crop as torchvision_sequence  # noqa: E402  (tests/ is on the path)


@pytest.mark.parametrize("angle,shift,flip", [
    (0.0, (0, 0), (False, False)), (30.0, (0, 0), (False, False)), (-71.3, (0, 0), (False, False)),
    (0.0, (5, -3), (False, False)), (0.0, (0, 0), (True, False)), (0.0, (0, 0), (False, True)),
    (37.5, (-6, 4), (True, True)), (90.0, (9, 9), (False, True)), (-90.0, (-9, 2), (True, False))])
def test_one_warp_equals_resize_rotate_shift_flip_of_torchvision(angle, shift, flip):
    torch.manual_seed(0)
    img_size = 32
    crops = torch.rand(2, 7, img_size // 2, img_size // 2)
    expected = torch.stack([torchvision_sequence(c, img_size, angle, shift, flip) for c in crops])
    got = augment_batch(crops, img_size, torch.full((2,), angle), torch.tensor([shift, shift], dtype=torch.float32),
                        torch.tensor([flip, flip]))
    assert got.shape == (2, 7, img_size, img_size) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5)


def test_parameters_follow_the_reference_distributions_per_image():
    augment = GPUAugment(img_size=100)
    torch.manual_seed(0)
    angle, shift, flip = augment.sample_params(4000, torch.device("cpu"))
    assert angle.min() >= -90 and angle.max() <= 90 and angle.min() < -85 and angle.max() > 85
    assert torch.equal(shift, shift.round()) and shift.abs().max() == 30  # round(uniform(+-0.3 * 100))
    assert 0.45 < flip.float().mean() < 0.55
    assert angle.std() > 45  # independent per image, not one draw for the batch


def test_forward_is_seeded_and_checks_the_crop_size():
    augment = GPUAugment(img_size=32)
    crops = torch.rand(3, 7, 16, 16)
    torch.manual_seed(1)
    first = augment(crops)
    torch.manual_seed(1)
    assert torch.equal(first, augment(crops)) and first.shape == (3, 7, 32, 32)
    with pytest.raises(ValueError, match=r"--img_size 32 expects crops \[N, C, 16, 16\]"):
        augment(torch.rand(3, 7, 32, 32))


@pytest.mark.parametrize("layout", ["channel_last", "planar"])
def test_worker_crop_equals_the_same_window_of_read_image(tmp_path, write_image, layout):
    rng = np.random.default_rng(0)
    path = write_image(tmp_path / "a.tif", rng.integers(0, 65536, (7, 40, 36)).astype(np.uint16), layout)
    dataset = CroppedImageFiles([(path, 3)], ["a"], in_chans=7, img_size=32)
    torch.manual_seed(5)
    crop, label = dataset[0]
    torch.manual_seed(5)
    top, left = int(torch.randint(0, 40 - 16 + 1, ())), int(torch.randint(0, 36 - 16 + 1, ()))
    assert label == 3 and crop.dtype == torch.float32 and crop.shape == (7, 16, 16)
    assert torch.equal(crop, read_image(path)[:, top:top + 16, left:left + 16])


def test_worker_checks_channels_and_size_naming_the_file(tmp_path, write_image):
    path = write_image(tmp_path / "b.tif", np.zeros((3, 40, 40), np.uint16))
    with pytest.raises(DataError, match=r"b\.tif: image has 3 channel\(s\) but --in_chans is 7"):
        CroppedImageFiles([(path, 0)], ["b"], in_chans=7, img_size=32)[0]
    with pytest.raises(DataError, match=r"b\.tif: image is 40x40 pixels, smaller than the 48x48 crop"):
        CroppedImageFiles([(path, 0)], ["b"], in_chans=3, img_size=96)[0]


def test_synthetic_dataset_gives_crops_and_training_runs_with_the_device_augmentation():
    args = Namespace(dataset="synthetic", data_path=None, img_size=32, in_chans=7, synthetic_size=4, seed=0,
                     accum_iter=1, print_freq=1, stable_epoch=0, distributed=False, amp_dtype="none",
                     lr=1e-4, min_lr=0.0, warmup_epochs=1, epochs=1)
    dataset = build_gpu_pretrain_dataset(args)
    image, _ = dataset[0]
    assert image.shape == (7, crop_size(32), crop_size(32))
    model = models_dama.build_model("main_vit_tiny", img_size=32, patch_size=8, decoder_embed_dim=32, decoder_depth=1,
                                      decoder_num_heads=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    # the model only accepts 32 px images: this runs only if the engine applies the 16 -> 32 px augmentation
    stats = train_one_epoch(model, loader, optimizer, torch.device("cpu"), 0, LossScaler("none", "cpu"), None, args,
                            batch_transform=GPUAugment(32))
    assert np.isfinite(stats["loss"])


AUGMENT_FLAGS = [dict(), dict(crop_scale=(0.6, 0.9), rotation=20.0, max_shift=0.1), dict(rotation=0.0, max_shift=0.0)]


@pytest.mark.parametrize("options", AUGMENT_FLAGS, ids=["reference", "crop_scale-rotation-shift", "no-warp"])
def test_gpu_path_applies_the_augmentation_flags_as_the_cpu_path(options):
    """Worker crop + GPUAugment, drawing from the same seed, give the CPU pipeline's image for every flag."""
    image = torch.randint(0, 65536, (7, 50, 44), dtype=torch.int32).to(torch.uint16)
    cpu_transform = build_pretrain_transform(32, **options)
    worker = WorkerCrop(32, options.get("crop_scale"))
    device_side = build_gpu_augment(Namespace(img_size=32, **options))
    assert worker.out_side == crop_size(32, options.get("crop_scale")) == device_side.input_side
    for seed in range(4):
        torch.manual_seed(seed)
        expected = cpu_transform(image)
        torch.manual_seed(seed)  # the worker draws the window, the device the warp: the CPU pipeline's order
        got = device_side(worker(image)[None])[0]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gpu_augment_parameters_follow_the_flags():
    augment = GPUAugment(img_size=100, rotation=15.0, max_shift=0.05)
    torch.manual_seed(0)
    angle, shift, _ = augment.sample_params(2000, torch.device("cpu"))
    assert angle.abs().max() <= 15 and angle.abs().max() > 14 and shift.abs().max() == 5
    assert "rotation=+-15 deg" in repr(augment)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("options", AUGMENT_FLAGS, ids=["reference", "crop_scale-rotation-shift", "no-warp"])
def test_gpu_augment_on_cuda_equals_the_cpu_pipeline(options):
    """On the GPU: the device warp of the worker crops equals the CPU pipeline for the same parameters, and a
    batch drawn on the device follows the flags."""
    image = torch.randint(0, 65536, (7, 50, 44), dtype=torch.int32).to(torch.uint16)
    cpu_transform = build_pretrain_transform(64, **options)
    worker = WorkerCrop(64, options.get("crop_scale"))
    torch.manual_seed(0)
    expected = cpu_transform(image)
    torch.manual_seed(0)
    crop = worker(image)[None]
    from util.transforms import sample_warp
    params = sample_warp(1, 64, cpu_transform.rotation, cpu_transform.max_shift)
    got = augment_batch(crop.cuda(), 64, *(p.cuda() for p in params))
    torch.testing.assert_close(got[0].cpu(), expected, atol=1e-4, rtol=1e-4)
    device_side = build_gpu_augment(Namespace(img_size=64, **options)).cuda()
    batch = device_side(crop.cuda().expand(8, -1, -1, -1))
    assert batch.shape == (8, 7, 64, 64) and batch.is_cuda and torch.isfinite(batch).all()
    angle, shift, _ = device_side.sample_params(4000, torch.device("cuda"))
    assert angle.abs().max() <= device_side.rotation and shift.abs().max() <= round(device_side.max_shift * 64)
