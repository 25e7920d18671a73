"""--recipe imagenet on a small real-photo ImageFolder cut from scikit-image's photographs: the recipe's
transforms, a step of pretraining, fine-tuning and linear probe, the cached file list, --decode gpu against the
CPU path, LARS, the benchmark rows, and every bad input as one line."""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing

import main_finetune
import main_linprobe
import main_pretrain
from benchmarks import bench_data
from util.cli import run_tool
from util.convert import export_encoder
from util.datasets import build_finetune_dataset, build_pretrain_dataset
from util.errors import DataError
from util.filelist import check_files, list_folder
from util.imagenet import (DEFAULT_AA, DeviceDecode, EncodedImageFiles, build_imagenet_eval_transform,
                           build_imagenet_finetune_transform, build_imagenet_pretrain_transform, collate_encoded,
                           crop_resize_pil, read_rgb, write_photo_folder)
from util.lars import LARS

MEAN, STD = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
TINY = ["--arch", "main_vit_tiny", "--img_size", "32", "--patch_size", "8", "--batch_size", "4", "--num_workers",
        "0", "--device", "cpu", "--epochs", "1"]
TINY_DECODER = ["--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2", "--vis_freq", "0"]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """A 3-class ImageFolder of scikit-image's photographs (chelsea, coffee, rocket): 4 training and 2 validation
    JPEGs of 64 x 48 per class (read-only)."""
    return write_photo_folder(tmp_path_factory.mktemp("photos") / "data")


@pytest.fixture
def one_thread():
    """In-process training on one compute thread, as the subprocess tests' OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def parse(module, argv):
    return argparse.ArgumentParser(parents=[module.get_args_parser()]).parse_args(argv)


def read_log(output_dir: Path) -> list:
    return [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]


def error_lines(capsys) -> list:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------------
def test_transforms_give_the_recipes_shapes_ranges_and_normalisation(photo_folder):
    torch.manual_seed(0)
    flat = Image.new("RGB", (60, 40), (200, 100, 50))  # a constant image stays constant through any crop
    expected = (torch.tensor([200, 100, 50]).view(3, 1, 1) / 255 - MEAN) / STD
    for transform in (build_imagenet_pretrain_transform(32), build_imagenet_eval_transform(32),
                      build_imagenet_finetune_transform(True, 32, aa="none", reprob=0)):
        out = transform(flat)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and type(out) is torch.Tensor
        torch.testing.assert_close(out, expected.expand(3, 32, 32), atol=1.5 / 255 / 0.224, rtol=0)

    photo = read_rgb(photo_folder / "train" / "chelsea" / "chelsea_0.JPEG")  # 64 x 48
    low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
    for _ in range(5):
        out = build_imagenet_pretrain_transform(32)(photo)
        assert (out >= low - 1e-5).all() and (out <= high + 1e-5).all() and out.std() > 0.1

    # evaluation: shorter side to int(32 / 0.875) = 36 (bicubic), then the centre 32 x 32, then mean/std
    resized = np.asarray(photo.resize((48, 36), Image.BICUBIC), np.float32)[2:34, 8:40] / 255
    manual = (torch.from_numpy(resized).permute(2, 0, 1) - MEAN) / STD
    torch.testing.assert_close(build_imagenet_eval_transform(32)(photo), manual, atol=1e-5, rtol=0)

    train = build_imagenet_finetune_transform(True, 32)  # MAE's fine-tuning defaults
    (rand_augment,) = [t for t in train.transforms if isinstance(t, RandAugment)]
    (erasing,) = [t for t in train.transforms if isinstance(t, RandomErasing)]
    assert len(rand_augment.ops) == 15 and rand_augment.num_layers == 2 and DEFAULT_AA == "rand-m9-mstd0.5-inc1"
    assert {op.magnitude for op in rand_augment.ops} == {9} and rand_augment.ops[0].magnitude_std == 0.5
    assert erasing.probability == 0.25 and erasing.mode == "pixel"
    assert train(photo).shape == (3, 32, 32)
    (posterize,) = [op for op in rand_augment.ops if op.name == "PosterizeIncreasing"]
    posterize.magnitude, posterize.magnitude_std, posterize.prob = 10, 0, 1.0  # keeps 0 bits: Pillow 13 refuses
    assert np.asarray(posterize(photo)).max() == 0
    probe = build_imagenet_finetune_transform(True, 32, aa="none", reprob=0)  # main_linprobe's defaults
    assert not [t for t in probe.transforms if isinstance(t, (RandAugment, RandomErasing))]


# ------------------------------------------------------------------------------------------------
# One step of each script, the cached file list
# ------------------------------------------------------------------------------------------------
def test_pretrain_finetune_and_linear_probe_run_on_photos_with_a_cached_file_list(photo_folder, tmp_path, capsys,
                                                                                   one_thread):
    data = tmp_path / "data"
    shutil.copytree(photo_folder, data)
    pre, common = tmp_path / "pre", ["--recipe", "imagenet", "--data_path", str(data), *TINY]
    assert run_tool(main_pretrain.main, parse(main_pretrain, [*common, *TINY_DECODER, "--output_dir", str(pre)])) == 0
    assert read_log(pre)[0]["epoch"] == 0 and "listing it again" not in capsys.readouterr().out
    args = torch.load(pre / "checkpoint.pth", weights_only=True)["args"]
    assert args["in_chans"] == 3 and args["recipe"] == "imagenet"
    assert args["mean"] == list(IMAGENET_DEFAULT_MEAN) and args["std"] == list(IMAGENET_DEFAULT_STD)
    metadata = export_encoder(str(pre / "checkpoint.pth"), str(tmp_path / "encoder.pth"))
    assert metadata["mean"] == list(IMAGENET_DEFAULT_MEAN) and metadata["std"] == list(IMAGENET_DEFAULT_STD)
    timm_cfg = torch.load(tmp_path / "encoder.pth", weights_only=True)["timm_pretrained_cfg"]
    assert timm_cfg["mean"] == IMAGENET_DEFAULT_MEAN and timm_cfg["std"] == IMAGENET_DEFAULT_STD
    assert timm_cfg["input_size"] == (3, 32, 32)

    # the second run (one more epoch, with --decode gpu on this CPU) reuses the file list written by the first
    flags = [*common, *TINY_DECODER, "--output_dir", str(pre), "--epochs", "2", "--decode", "gpu"]
    assert run_tool(main_pretrain.main, parse(main_pretrain, flags)) == 0
    out = capsys.readouterr().out
    assert "12 files of" in out and "unchanged since it was written" in out and "Resumed from" in out
    assert [line["epoch"] for line in read_log(pre)] == [0, 1]
    shutil.copy(data / "train" / "chelsea" / "chelsea_0.JPEG", data / "train" / "chelsea" / "chelsea_new.JPEG")
    dataset = build_pretrain_dataset(parse(main_pretrain, [*flags, "--in_chans", "3"]))
    assert len(dataset) == 13 and "changed since it was written; listing it again" in capsys.readouterr().out

    ft = tmp_path / "ft"  # RandAugment and random erasing are the defaults of --recipe imagenet; mixup + cutmix
    flags = [*common, "--finetune", str(pre / "checkpoint.pth"), "--output_dir", str(ft), "--mixup", "0.8",
             "--cutmix", "1.0"]
    assert main_finetune.run_cli(flags) == 0
    line = read_log(ft)[0]
    assert line["epoch"] == 0 and np.isfinite(line["train_loss"]) and 0 <= line["test_acc1"] <= 100
    args = torch.load(ft / "checkpoint.pth", weights_only=True)["args"]
    assert (args["aa"], args["reprob"], args["remode"], args["mixup"]) == (DEFAULT_AA, 0.25, "pixel", 0.8)
    assert args["mean"] == list(IMAGENET_DEFAULT_MEAN)

    lp = tmp_path / "lp"  # MAE's probe: LARS, BatchNorm without affine before the head, a batch built by accum_iter
    assert main_linprobe.run_cli([*common, "--finetune", str(pre / "checkpoint.pth"), "--output_dir", str(lp),
                                  "--optimizer", "lars", "--accum_iter", "2"]) == 0
    assert "lars optimiser" in capsys.readouterr().out and np.isfinite(read_log(lp)[0]["train_loss"])
    args = torch.load(lp / "checkpoint.pth", weights_only=True)["args"]
    assert (args["aa"], args["reprob"], args["accum_iter"]) == ("none", 0.0, 2)


def test_test_split_of_an_imagenet_folder_gets_the_recipes_evaluation_transform(photo_folder, tmp_path):
    """A test/ split is read like val/: RGB photos, resized and centre-cropped by the recipe's evaluation transform
    and normalised with its mean/std, labelled by the training class list (not the cells' TIFF reader)."""
    from util.datasets import build_finetune_test_dataset
    data = tmp_path / "data"
    shutil.copytree(photo_folder, data)
    shutil.copytree(data / "val", data / "test")
    args = parse(main_finetune, ["--recipe", "imagenet", "--data_path", str(data), *TINY])
    main_finetune.resolve_defaults(args)
    val, test = build_finetune_dataset(False, args), build_finetune_test_dataset(args, ["chelsea", "coffee", "rocket"])
    assert len(test) == len(val) == 6 and test.classes == val.classes
    for i in range(len(test)):
        (image, label), (val_image, val_label) = test[i], val[i]
        assert image.shape == (3, 32, 32) and label == val_label and torch.equal(image, val_image)
    path, label = test.samples[0]
    assert torch.equal(test[0][0], build_imagenet_eval_transform(32)(read_rgb(path)))


def test_lars_scales_each_weight_matrix_update_by_its_trust_ratio():
    weight, bias = torch.randn(4, 3), torch.randn(4)
    weight.grad, bias.grad = torch.randn(4, 3), torch.randn(4)
    before_w, before_b = weight.clone(), bias.clone()
    lars = LARS([weight, bias], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    lars.step()
    update = weight.grad + 0.1 * before_w  # weight decay on matrices only; the first momentum buffer is the update
    expected_w = before_w - 0.5 * update * (0.001 * before_w.norm() / update.norm())
    torch.testing.assert_close(weight.detach(), expected_w)
    torch.testing.assert_close(bias.detach(), before_b - 0.5 * bias.grad)  # 1-D: plain momentum SGD
    lars.step()  # momentum: mu = 0.9 mu + update
    torch.testing.assert_close(bias.detach(), before_b - 0.5 * bias.grad - 0.5 * 1.9 * bias.grad)


# ------------------------------------------------------------------------------------------------
# --decode gpu
# ------------------------------------------------------------------------------------------------
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device (nvJPEG)"))]


@pytest.mark.parametrize("device", DEVICES)
def test_decode_gpu_gives_the_cpu_pixels_for_the_same_boxes(photo_folder, tmp_path, device):
    folder = tmp_path / "mixed"
    shutil.copytree(photo_folder / "train" / "chelsea", folder)
    read_rgb(folder / "chelsea_0.JPEG").convert("L").save(folder / "grey.JPEG", quality=90)
    read_rgb(folder / "chelsea_1.JPEG").convert("CMYK").save(folder / "cmyk.JPEG", quality=90)
    read_rgb(folder / "chelsea_2.JPEG").save(folder / "png_named.JPEG", format="PNG")  # as one ImageNet file is
    files, headers, _ = check_files(list_folder(folder), 3, 1, rgb=True)
    dataset = EncodedImageFiles(files, headers, 32)
    torch.manual_seed(0)
    items = [dataset[i] for i in range(len(dataset))]
    batch, labels = collate_encoded(items)
    assert [(path.name, flag) for (path, _), flag in zip(files, batch.on_device.tolist())] == [
        ("chelsea_0.JPEG", True), ("chelsea_1.JPEG", True), ("chelsea_2.JPEG", True), ("chelsea_3.JPEG", True),
        ("cmyk.JPEG", False), ("grey.JPEG", True), ("png_named.JPEG", False)]  # decoded on the device or not
    assert batch.flips.any() and not batch.flips.all() and labels.tolist() == [0] * 7

    out = DeviceDecode(32).to(device)(batch.to(device))
    assert out.shape == (7, 3, 32, 32) and out.device.type == device
    for i, (path, _) in enumerate(files):  # the CPU path (PIL decode, crop + bicubic resize) for the same box
        cpu = crop_resize_pil(read_rgb(path), batch.boxes[i].tolist(), 32).float() / 255
        cpu = cpu.flip(-1) if batch.flips[i] else cpu
        pixels = out[i].cpu() * STD + MEAN
        difference = (pixels - cpu).abs() * 255  # in 8-bit levels
        # the same libjpeg-turbo decode on the CPU, bicubic in torch vs PIL: within a level (measured: <= 1);
        # nvJPEG's IDCT and chroma upsampling differ from libjpeg's by a few levels, more at sharp colour edges
        mean_tol, max_tol = (0.5, 3) if device == "cpu" else (2, 40)
        assert difference.mean() < mean_tol and difference.max() < max_tol, (path.name, difference.max())
    with pytest.raises(DataError, match="not_a_jpeg.JPEG: cannot decode JPEG"):
        DeviceDecode(32).decode([torch.tensor([1, 2, 3], dtype=torch.uint8)], ["not_a_jpeg.JPEG"])


def test_bench_data_reports_img_per_s_per_worker_for_the_imagenet_recipe(capsys):
    assert bench_data.main(["--recipe", "imagenet", "--img_size", "32", "--num_files", "3", "--num_workers", "0",
                            "--min_seconds", "0", "--device", "cpu", "--augment_batch_size", "4",
                            "--jpeg_size", "64", "48"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [row["pipeline"] for row in rows] == ["imagenet_pretrain", "imagenet_finetune", "imagenet_eval",
                                                 "imagenet_decode_gpu", "imagenet_decode_gpu_device"]
    for row in rows[:4]:
        assert row["img_per_s_per_worker"] > 0 and row["files"] == "3 JPEGs of 64x48"
        assert row["workers_for_target"] == int(np.ceil(4000 / row["img_per_s_per_worker"]))
    assert "| imagenet_pretrain | 32 | 3 JPEGs of 64x48 | 1 (in process) |" in out


# ------------------------------------------------------------------------------------------------
# Bad input, one line each
# ------------------------------------------------------------------------------------------------
def test_bad_inputs_of_the_imagenet_recipe_are_one_line_each(photo_folder, tmp_path, capsys, write_image):
    out = str(tmp_path / "out")
    flags = ["--recipe", "imagenet", *TINY, "--output_dir", out]
    args = parse(main_pretrain, [*flags, "--data_path", str(photo_folder), "--in_chans", "7"])
    assert run_tool(main_pretrain.main, args) == 2
    assert error_lines(capsys) == ["error: --recipe imagenet reads RGB images: --in_chans must be 3 (or left out), "
                                   "got 7"]

    data = tmp_path / "data"
    shutil.copytree(photo_folder, data)
    (data / "val" / "dog").mkdir()
    shutil.copy(data / "val" / "chelsea" / "chelsea_4.JPEG", data / "val" / "dog" / "dog_0.JPEG")
    assert main_finetune.run_cli([*flags, "--data_path", str(data)]) == 2
    assert error_lines(capsys) == [f"error: {data / 'val' / 'dog'}: class folder 'dog' is not one of the training "
                                   f"classes ['chelsea', 'coffee', 'rocket']"]
    shutil.rmtree(data / "val" / "dog")

    # grey and CMYK JPEGs (ImageNet has both) are converted to RGB
    cats = data / "train" / "chelsea"
    read_rgb(cats / "chelsea_0.JPEG").convert("L").save(cats / "grey.JPEG")
    read_rgb(cats / "chelsea_1.JPEG").convert("CMYK").save(cats / "cmyk.JPEG")
    args = parse(main_finetune, [*flags, "--data_path", str(data)])
    main_finetune.resolve_defaults(args)
    dataset = build_finetune_dataset(True, args)
    names = [path.name for path, _ in dataset.samples]
    for name in ("grey.JPEG", "cmyk.JPEG"):
        image, label = dataset[names.index(name)]
        assert image.shape == (3, 32, 32) and label == 0

    # a truncated JPEG: named before training, or left out with --skip_bad_files
    truncated = cats / "cut.JPEG"  # a new file (one rewritten in place would keep its cached header)
    truncated.write_bytes((cats / "chelsea_2.JPEG").read_bytes()[:-200])  # the header is whole, pixels are cut
    assert main_finetune.run_cli([*flags, "--data_path", str(data)]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"error: {truncated}: cannot read image file (OSError: image file is truncated")
    assert line.endswith(f"(1 of 15 image files under {data / 'train'}; fix or remove it, or pass --skip_bad_files "
                         f"to leave it out)")
    args = parse(main_finetune, [*flags, "--data_path", str(data), "--skip_bad_files"])
    main_finetune.resolve_defaults(args)
    dataset = build_finetune_dataset(True, args)
    assert len(dataset) == 14 and dataset.skipped_bad_files == 1 and truncated not in [p for p, _ in dataset.samples]
