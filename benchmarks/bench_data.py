"""Images per second per worker of the pretraining input pipeline on 7-channel uint16 TIFFs.

Writes --num_files random uint16 TIFFs per layout (interleaved channel-last 'YXS' and planar 'SYX') into a
temporary folder (or reads --data_path), then measures, for each --img_size:

  cpu  the default pipeline: util.datasets read_image + build_pretrain_transform, all on the worker;
  gpu  the --gpu_augment split (util/gpu_augment.py): the worker decodes and cuts the S/2 crop, and
       GPUAugment resizes, rotates, shifts and flips the batch on --device (timed separately as
       pipeline 'gpu_augment_device', in images per second of the device);
  synthetic  the built-in synthetic cells (--dataset synthetic): drawing S x S cells, without augmentation
       (layout '-', no files), so that the quick start and the tests are not limited by it (about 1 ms each).
  packed  prepared cells (prepare_cells.py) read from the memory-mapped cells.npy against the same crops as one
       uint16 TIFF file each (layout 'packed' / 'tiff'), at each --packed_sizes side S: 'read' (the crop as float32
       [C, S, S]), 'read_cpu_augment' (+ the pretraining augmentation at --img_size S) and 'read_gpu_crop' (+ the
       S/2 crop the --gpu_augment workers cut); single process, one thread (one worker).

each single-process with one thread (what one DataLoader worker does) and through a DataLoader with
--num_workers workers. With `--stages` (or --pipelines stages) it also times each stage of one image on one
thread, for the CPU path (read, crop, to-float, resize, then rotate + shift + flips as the one warp the pipeline
runs, and the same steps of the torchvision v2 float pipeline this code used before, stage by stage) and the
GPU path (worker: read, crop + to-float; device: resize and warp per batch), in ms per image (bench_stages). For scale: the reference's numpy/cv2 pipeline does about 230 img/s per core at
224 px; feeding the training targets from 16 cores needs about 4,000/16 = 250 img/s per worker at 224 px
(ViT-B) and 12,000/16 = 750 at 128 px (ViT-T).

    python benchmarks/bench_data.py                       # 224 and 128 px, both pipelines
    python benchmarks/bench_data.py --img_size 224 --num_workers 16 --pipelines cpu gpu --device cuda

--recipe imagenet measures MAE's ImageNet recipe instead (util/imagenet.py) on --num_files RGB JPEGs of
--jpeg_size (default 500 x 375, ImageNet's most common size; cut from scikit-image's photographs, rounded up to
a multiple of 3) or on the images of --data_path (<data_path>/train or <data_path>, as pretraining reads it):
'imagenet_pretrain' (PIL decode, RandomResizedCrop, flip, mean/std: the CPU path),
'imagenet_finetune' (timm's transform with RandAugment and random erasing), 'imagenet_eval', and
'imagenet_decode_gpu' (the worker side of --decode gpu: read the bytes, draw the box) with
'imagenet_decode_gpu_device' (decode_jpeg + crop + resize + flip + normalise of a batch on --device).
workers_for_target is for the ImageNet training target, 4,000 img/s (ViT-B/16 at 224 px on one GPU).

    python benchmarks/bench_data.py --recipe imagenet --img_size 224 --num_workers 2
"""
import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules live in the repo root

from benchmarks.common import emit, fmt  # noqa: E402
from util.datasets import ImageFileDataset, list_images  # noqa: E402
from util.packed import (CELLS_CSV, DATASET_JSON, FORMAT_NAME, FORMAT_VERSION, PackedCells, PackedWriter,  # noqa: E402
                         write_cell_table, write_dataset_info)
from util.gpu_augment import CroppedImageFiles, GPUAugment, WorkerCrop, crop_size  # noqa: E402
from util.io import read_image, read_tensor_chw  # noqa: E402
from util.synthetic import SyntheticCells  # noqa: E402
from util.transforms import (TensorTransform, augment_batch, build_pretrain_transform, crop_float,  # noqa: E402
                             dtype_scale, resize, sample_warp)

REFERENCE_IMG_PER_S_PER_CORE = {224: 230}  # the reference's numpy/cv2 pipeline, measured on one core
IMAGENET_TARGET_IMG_PER_S = 4000  # the training target of ViT-B/16 at 224 px on one H200
IMAGENET_PIPELINES = ("imagenet_pretrain", "imagenet_finetune", "imagenet_eval", "imagenet_decode_gpu")
TARGET_IMG_PER_S = {224: 4000, 128: 12000}  # the training targets on one H200 (ViT-B at 224, ViT-T at 128)
LAYOUTS = ("channel_last", "planar")
FILE_PIPELINES = ("cpu", "gpu")
# The reference's uint16 numpy/cv2 pipeline per 7-channel image on one core of the development machine
REFERENCE_CPU_MS_PER_IMG = {128: 1.5, 224: 4.4}


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def write_tiffs(folder: Path, num_files: int, size: int, channels: int, layout: str, compression, seed=0) -> list:
    """num_files random uint16 TIFFs of size x size x channels; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_files):
        pixels = rng.integers(0, 65536, (channels, size, size), dtype=np.uint16)  # [C, H, W]
        path = folder / f"img_{i:05d}.tif"
        if layout == "channel_last":
            tifffile.imwrite(path, np.ascontiguousarray(pixels.transpose(1, 2, 0)), photometric="minisblack",
                             planarconfig="contig", compression=compression)
        else:
            tifffile.imwrite(path, pixels, photometric="minisblack", planarconfig="separate",
                             compression=compression)
        paths.append(path)
    return paths


class Repeated(Dataset):
    """`dataset` seen `times` times over: enough items to keep every worker busy while timing."""

    def __init__(self, dataset, times: int):
        self.dataset, self.times = dataset, times

    def __len__(self):
        return len(self.dataset) * self.times

    def __getitem__(self, index):
        return self.dataset[index % len(self.dataset)]


def pipeline_dataset(pipeline: str, paths: list, channels: int, img_size: int):
    samples = [(path, 0) for path in paths]
    if pipeline == "cpu":
        return ImageFileDataset(samples, ["unlabelled"], channels, build_pretrain_transform(img_size))
    return CroppedImageFiles(samples, ["unlabelled"], channels, img_size)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def time_single_process(dataset, min_seconds: float) -> float:
    """img/s of dataset[i] in this process with one intra-op thread, as a DataLoader worker runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset[0]  # first-call costs (imports, allocator) are not the steady state
        count, begin = 0, time.perf_counter()
        while count < len(dataset) or time.perf_counter() - begin < min_seconds:
            dataset[count % len(dataset)]
            count += 1
        return count / (time.perf_counter() - begin)
    finally:
        torch.set_num_threads(threads)


def time_loader(dataset, num_workers: int, batch_size: int, passes: int, collate_fn=None) -> float:
    """img/s through a DataLoader, counted from the first batch (worker start-up left out) to the last.
    collate_fn: a dataset's own batching (--decode gpu's batches are bytes, not tensors)."""
    loader = DataLoader(Repeated(dataset, passes), batch_size=batch_size, num_workers=num_workers, shuffle=True,
                        drop_last=True, collate_fn=collate_fn)
    count, begin = 0, None
    for _, labels in loader:
        if begin is None:
            begin = time.perf_counter()
            continue
        count += len(labels)
    if begin is None or count == 0:
        raise ValueError(f"--num_files x passes gives fewer than two batches of --batch_size {batch_size}; "
                         "use more files or a smaller batch")
    return count / (time.perf_counter() - begin)


def time_gpu_augment(img_size: int, channels: int, batch_size: int, device, steps: int = 20) -> float:
    """img/s of GPUAugment on a batch of crops already on `device` (CUDA events on a GPU)."""
    augment = GPUAugment(img_size)
    crops = torch.rand(batch_size, channels, crop_size(img_size), crop_size(img_size), device=device)
    augment(crops)  # warm-up
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(steps):
            augment(crops)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        begin = time.perf_counter()
        for _ in range(steps):
            augment(crops)
        seconds = time.perf_counter() - begin
    return batch_size * steps / seconds


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------
def make_row(pipeline, layout, img_size, file_size, workers, img_per_s, per_worker=True) -> dict:
    per = img_per_s / max(workers or 0, 1) if per_worker else None  # workers 0: the in-process row
    target = TARGET_IMG_PER_S.get(img_size)
    return dict(pipeline=pipeline, layout=layout, img_size=img_size, file_size=file_size, workers=workers,
                img_per_s=round(img_per_s, 1), img_per_s_per_worker=None if per is None else round(per, 1),
                ms_per_img_per_worker=None if per is None else round(1e3 / per, 3),
                reference_img_per_s_per_core=REFERENCE_IMG_PER_S_PER_CORE.get(img_size),
                target_img_per_s=target,
                workers_for_target=math.ceil(target / per) if (target and per) else None)


def bench_files(paths, layout, img_size, args) -> list:
    rows = []
    for pipeline in (p for p in args.pipelines if p in FILE_PIPELINES):
        dataset = pipeline_dataset(pipeline, paths, args.in_chans, img_size)
        rate = time_single_process(dataset, args.min_seconds)
        rows.append(make_row(pipeline, layout, img_size, args.file_size or img_size, 0, rate))
        if args.num_workers > 0:
            rate = time_loader(dataset, args.num_workers, args.batch_size, args.passes)
            rows.append(make_row(pipeline, layout, img_size, args.file_size or img_size, args.num_workers, rate))
    return rows


# --------------------------------------------------------------------------------------------------
# Packed cells (prepare_cells.py's format) against one TIFF per crop
# --------------------------------------------------------------------------------------------------
def write_packed_and_tiffs(folder: Path, num_cells: int, size: int, channels: int, seed=0) -> list:
    """The same random uint16 crops as a packed dataset in `folder` and as TIFF files in folder/tiff; returns the
    TIFF paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    writer = PackedWriter(folder, num_cells, channels, size)
    paths = []
    for i in range(num_cells):
        crop = rng.integers(0, 65536, (channels, size, size), dtype=np.uint16)
        writer.write(i, crop)
        paths.append(write_tiffs_one(folder / "tiff" / f"cell_{i:05d}.tif", crop))
    writer.close()
    cells = np.arange(num_cells)
    write_cell_table(folder / CELLS_CSV, {"index": cells, "slide": np.full(num_cells, "bench"), "cell_id": cells,
                                          **{c: np.zeros(num_cells, int) for c in ("x", "y", "crop_x", "crop_y")},
                                          **{c: np.full(num_cells, None) for c in ("area", "label", "split")}})
    write_dataset_info(folder / DATASET_JSON, {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "layout": "packed", "num_cells": num_cells,
        "channel_names": [f"c{c}" for c in range(channels)], "crop_size": size, "classes": []})
    return paths


def write_tiffs_one(path: Path, crop: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, crop, photometric="minisblack")  # planar C x S x S, as prepare_cells.py --format tiff
    return path


class ReadOnly(TensorTransform):
    """No augmentation: the 'read' rows time reading alone."""

    def __call__(self, image):
        return image


def bench_packed(args, tmp: Path) -> list:
    """img/s per worker reading crops from cells.npy vs from TIFF files, alone and with each augmentation's
    worker side (rows: pipeline read / read_cpu_augment / read_gpu_crop, layout packed / tiff)."""
    rows = []
    for size in args.packed_sizes:
        tiff_paths = write_packed_and_tiffs(tmp / f"packed_{size}", args.num_files, size, args.in_chans)
        samples = [(path, 0) for path in tiff_paths]
        views = {"read": ReadOnly(), "read_cpu_augment": build_pretrain_transform(size),
                 "read_gpu_crop": WorkerCrop(size)}  # the --gpu_augment workers' side: only the crop becomes float
        for pipeline, transform in views.items():
            tiff = ImageFileDataset(samples, ["unlabelled"], args.in_chans, transform)
            datasets = {"packed": PackedCells(tmp / f"packed_{size}", transform=transform), "tiff": tiff}
            for layout, dataset in datasets.items():
                rate = time_single_process(dataset, args.min_seconds)
                rows.append(make_row(pipeline, layout, size, size, 0, rate))
    return rows




# --------------------------------------------------------------------------------------------------
# Stages: ms per image of each step, CPU and GPU paths
# --------------------------------------------------------------------------------------------------
def ms_per_call(fn, min_seconds: float, min_calls: int = 20, repeats: int = 5) -> float:
    """ms of fn() on one thread: the best of `repeats` means over at least min_calls calls and min_seconds /
    repeats seconds each, after one warm-up call (best-of, as timeit: other load on the machine only adds time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn()
        best = float("inf")
        for _ in range(repeats):
            count, begin = 0, time.perf_counter()
            while count < min_calls or time.perf_counter() - begin < min_seconds / repeats:
                fn()
                count += 1
            best = min(best, (time.perf_counter() - begin) * 1e3 / count)
        return best
    finally:
        torch.set_num_threads(threads)


def v2_float_stages(img_size: int):
    """The torchvision v2 float pipeline this project ran before (read_image, then these steps), step by step."""
    from torchvision.transforms import InterpolationMode, v2
    return [("crop", v2.RandomCrop(img_size // 2)),
            ("resize", v2.Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC, antialias=True)),
            ("rotate", v2.RandomRotation(90, interpolation=InterpolationMode.BILINEAR, fill=0)),
            ("shift", v2.RandomAffine(degrees=0, translate=(0.3, 0.3), fill=0)),
            ("flips", v2.Compose([v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5)]))]


def reference_cv2_stages(img_size: int):
    """The reference code's uint16 pipeline (numpy + OpenCV on an H x W x C array), step by
    step, for a side-by-side measurement: [(stage, fn(image) -> image)], or [] when OpenCV is not installed (it is
    no dependency of this project: `pip install opencv-python-headless` to add these rows)."""
    try:
        import cv2
    except ImportError:
        return []
    import random
    cv2.setNumThreads(1)
    crop = img_size // 2

    def crop_resize(image):  # fixed S/2 window at a random top-left, then cv2.resize with PIL's BICUBIC = INTER_AREA
        top, left = random.randint(0, image.shape[0] - crop), random.randint(0, image.shape[1] - crop)
        return cv2.resize(image[top:top + crop, left:left + crop], (img_size, img_size), interpolation=3)

    def rotate(image):
        h, w = image.shape[:2]
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), random.uniform(-90, 90), 1)
        return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=0)

    def shift(image):
        h, w = image.shape[:2]
        limit = int(0.3 * h)
        matrix = np.float32([[1, 0, random.randint(-limit, limit)], [0, 1, random.randint(-limit, limit)]])
        return cv2.warpAffine(image, matrix, (w, h), borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    def flips(image):
        image = cv2.flip(image, 1) if random.random() < 0.5 else image
        return cv2.flip(image, 0) if random.random() < 0.5 else image

    def to_float(image):  # ToTensor: uint16 / 65535, H x W x C -> C x H x W
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div(65535)

    return [("crop + resize", crop_resize), ("rotate", rotate), ("shift", shift), ("flips", flips),
            ("to-float", to_float)]


def stage_row(pipeline, img_size, stage, ms, note="") -> dict:
    return dict(pipeline=pipeline, img_size=img_size, stage=stage, ms_per_img=round(ms, 4), note=note,
                reference_cpu_ms_per_img=REFERENCE_CPU_MS_PER_IMG.get(img_size))


def bench_stages(paths, img_size: int, device, min_seconds: float, batch_size: int) -> list:
    """ms per image of each stage of one 7-channel image: the CPU path as it runs now (stage by stage and whole),
    the v2 float pipeline it replaced (stage by stage and whole), and the --gpu_augment split (worker stages per
    image; device stages per batch / batch size)."""
    rows, file_index = [], iter(range(10 ** 9))

    def next_path():
        return paths[next(file_index) % len(paths)]

    # CPU path now: integer image -> crop (a view) -> to-float (the crop) -> resize -> one warp (rotate, shift,
    # flips, zero fill and the dtype scale together)
    transform = build_pretrain_transform(img_size)
    image = read_tensor_chw(paths[0])
    top, left, side = transform.window.sample(*image.shape[-2:])
    crop = crop_float(image, top, left, side)[None]
    resized = resize(crop, img_size)
    warp = sample_warp(1, img_size, 90.0, 0.3)
    now = [("read", lambda: read_tensor_chw(next_path()), "uint16 as stored"),
           ("crop", lambda: image[:, top:top + side, left:left + side], "integer view"),
           ("to-float", lambda: crop_float(image, top, left, side), "the crop only"),
           ("resize", lambda: resize(crop, img_size), "bicubic, antialias; matrix products up to 160 px"),
           ("rotate+shift+flips", lambda: augment_batch(resized, img_size, *warp, scale=dtype_scale(image.dtype)),
            "one grid_sample; scale folded in")]
    total = 0.0
    for stage, fn, note in now:
        ms = ms_per_call(fn, min_seconds)
        total += ms
        rows.append(stage_row("cpu", img_size, stage, ms, note))
    rows.append(stage_row("cpu", img_size, "sum of stages", total))
    rows.append(stage_row("cpu", img_size, "augmentation, read excluded (measured whole)", ms_per_call(lambda: transform(image),
                                                                                        min_seconds)))
    # before: read_image (float32) and the v2 steps
    float_image = read_image(paths[0])
    total = ms_per_call(lambda: read_image(next_path()), min_seconds)
    rows.append(stage_row("cpu_v2_float (before)", img_size, "read + to-float", total, "whole image"))
    x = float_image
    for stage, step in v2_float_stages(img_size):
        ms = ms_per_call(lambda step=step, x=x: step(x), min_seconds)
        total += ms
        rows.append(stage_row("cpu_v2_float (before)", img_size, stage, ms))
        x = step(x)
    rows.append(stage_row("cpu_v2_float (before)", img_size, "sum of stages", total))
    from torchvision.transforms import v2
    before = v2.Compose([step for _, step in v2_float_stages(img_size)])
    rows.append(stage_row("cpu_v2_float (before)", img_size, "augmentation, read excluded (measured whole)",
                          ms_per_call(lambda: before(float_image), min_seconds)))
    # the reference's uint16 numpy/cv2 pipeline, measured here too when OpenCV is installed
    reference = reference_cv2_stages(img_size)
    if reference:
        x = np.ascontiguousarray(read_tensor_chw(paths[0]).numpy().transpose(1, 2, 0))  # H x W x C uint16
        total = 0.0
        for stage, step in reference:
            ms = ms_per_call(lambda step=step, x=x: step(x), min_seconds)
            total += ms
            rows.append(stage_row("reference_cv2", img_size, stage, ms, "uint16 until to-float"))
            x = step(x)
        rows.append(stage_row("reference_cv2", img_size, "sum of stages", total, "read excluded"))
    # --gpu_augment: the worker reads and crops; the device resizes and warps a batch
    worker = WorkerCrop(img_size)
    rows.append(stage_row("gpu", img_size, "read (worker)", ms_per_call(lambda: read_tensor_chw(next_path()),
                                                                          min_seconds)))
    rows.append(stage_row("gpu", img_size, "crop + to-float (worker)", ms_per_call(lambda: worker(image),
                                                                                     min_seconds)))
    crops = torch.rand(batch_size, image.shape[0], crop_size(img_size), crop_size(img_size), device=device)
    params = sample_warp(batch_size, img_size, 90.0, 0.3, device)
    batch_resized = resize(crops, img_size)
    for stage, fn in (("resize (device)", lambda: resize(crops, img_size)),
                      ("rotate+shift+flips (device)", lambda: augment_batch(batch_resized, img_size, *params))):
        rows.append(stage_row("gpu", img_size, stage, device_ms(fn, device, min_seconds) / batch_size,
                              f"batch {batch_size} on {device}"))
    return rows


def device_ms(fn, device, min_seconds: float) -> float:
    """ms per call of fn on `device` (CUDA events on a GPU, one thread on the CPU)."""
    if device.type != "cuda":
        return ms_per_call(fn, min_seconds, min_calls=3, repeats=1)
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(20):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 20


def stages_table(rows) -> str:
    lines = ["| path | img | stage | ms/img | note |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pipeline']} | {r['img_size']} | {r['stage']} | {r['ms_per_img']:.3f} | {r['note']} |")
    sizes = sorted({r["img_size"] for r in rows})
    reference = ", ".join(f"{REFERENCE_CPU_MS_PER_IMG[s]} ms at {s} px" for s in sizes if s in REFERENCE_CPU_MS_PER_IMG)
    if reference:
        lines.append(f"\nReference uint16 numpy/cv2 pipeline (augmentation, one core): {reference}.")
    return "\n".join(lines)


def markdown_table(rows) -> str:
    lines = ["| pipeline | layout | img | file | workers | img/s | img/s/worker | ms/img | workers for target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        workers = {0: "1 (in process)", None: "- (device)"}.get(r["workers"], r["workers"])
        lines.append(f"| {r['pipeline']} | {r['layout']} | {r['img_size']} | {fmt(r['file_size'], ',')} | {workers} "
                     f"| {r['img_per_s']:,.0f} | {fmt(r['img_per_s_per_worker'], ',')} "
                     f"| {fmt(r['ms_per_img_per_worker'], ',')} "
                     f"| {fmt(r['workers_for_target'], ',')} (of {fmt(r['target_img_per_s'], ',')}/s) |")
    lines.append("\nReference numpy/cv2 pipeline: about 230 img/s per core at 224 px.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# --recipe imagenet
# --------------------------------------------------------------------------------------------------
def imagenet_datasets(folder: Path, img_size: int, pipelines) -> dict:
    """{pipeline: dataset} over the folder's images, with the recipe's transforms."""
    from util.datasets import pretrain_samples
    from util.filelist import check_files
    from util.imagenet import (EncodedImageFiles, RGBImageFiles, build_imagenet_finetune_transform,
                               build_imagenet_pretrain_transform)

    files, _ = pretrain_samples(folder)  # <folder>/train or <folder>, class folders or flat, as pretraining
    files, headers, _ = check_files(files, 3, 1, rgb=True, skip_bad=True)
    makers = {
        "imagenet_pretrain": lambda: RGBImageFiles(files, build_imagenet_pretrain_transform(img_size)),
        "imagenet_finetune": lambda: RGBImageFiles(files, build_imagenet_finetune_transform(True, img_size)),
        "imagenet_eval": lambda: RGBImageFiles(files, build_imagenet_finetune_transform(False, img_size)),
        "imagenet_decode_gpu": lambda: EncodedImageFiles(files, headers, img_size),
    }
    return {name: makers[name]() for name in pipelines}


def time_decode_device(dataset, img_size: int, batch_size: int, device, steps: int = 5) -> float:
    """img/s of util.imagenet.DeviceDecode on batches of `dataset` (EncodedImageFiles) already collated."""
    from util.imagenet import DeviceDecode, collate_encoded

    decode = DeviceDecode(img_size).to(device)
    batch, _ = collate_encoded([dataset[i % len(dataset)] for i in range(batch_size)])
    decode(batch)  # warm-up (nvJPEG handles, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    for _ in range(steps):
        decode(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch_size * steps / (time.perf_counter() - begin)


def imagenet_row(pipeline, layout, img_size, files, workers, img_per_s, per_worker=True) -> dict:
    """make_row with the ImageNet target; `files` says what was read ('500x375 JPEG' or 'data_path')."""
    row = make_row(pipeline, layout, img_size, None, workers, img_per_s, per_worker)
    per = row["img_per_s_per_worker"]
    row.update(files=files, reference_img_per_s_per_core=None, target_img_per_s=IMAGENET_TARGET_IMG_PER_S,
               workers_for_target=math.ceil(IMAGENET_TARGET_IMG_PER_S / per) if per else None)
    return row


def bench_imagenet(args, tmp: Path) -> list:
    """Rows of the ImageNet recipe (see the module docstring) for every --img_size."""
    if args.data_path:
        folder, file_size = Path(args.data_path), "data_path"
    else:
        from util.imagenet import PHOTOS, write_photo_folder

        per_class = math.ceil(args.num_files / len(PHOTOS))
        folder = write_photo_folder(tmp / "imagenet", n_train=per_class, n_val=0, size=args.jpeg_size)
        file_size = f"{per_class * len(PHOTOS)} JPEGs of {args.jpeg_size[0]}x{args.jpeg_size[1]}"
    pipelines = [p for p in args.pipelines if p in IMAGENET_PIPELINES] or list(IMAGENET_PIPELINES)
    rows = []
    for img_size in args.img_size:
        for pipeline, dataset in imagenet_datasets(folder, img_size, pipelines).items():
            rate = time_single_process(dataset, args.min_seconds)
            rows.append(imagenet_row(pipeline, "jpeg", img_size, file_size, 0, rate))
            if args.num_workers > 0:
                collate = getattr(dataset, "collate_fn", None)
                rate = time_loader(dataset, args.num_workers, args.batch_size, args.passes, collate)
                rows.append(imagenet_row(pipeline, "jpeg", img_size, file_size, args.num_workers, rate))
            if pipeline == "imagenet_decode_gpu":
                device = torch.device(args.device)
                rate = time_decode_device(dataset, img_size, args.augment_batch_size, device)
                row = imagenet_row("imagenet_decode_gpu_device", str(device), img_size, file_size, None, rate,
                                   per_worker=False)
                row["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
                rows.append(row)
    return rows


def imagenet_table(rows) -> str:
    lines = ["| pipeline | img | files | workers | img/s | img/s/worker | ms/img | workers for 4,000 img/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        workers = {0: "1 (in process)", None: f"- ({r['layout']})"}.get(r["workers"], r["workers"])
        lines.append(f"| {r['pipeline']} | {r['img_size']} | {r['files']} | {workers} | {r['img_per_s']:,.0f} "
                     f"| {fmt(r['img_per_s_per_worker'], ',')} | {fmt(r['ms_per_img_per_worker'], ',')} "
                     f"| {fmt(r['workers_for_target'], ',')} |")
    lines.append("\nTarget: 4,000 img/s, ViT-B/16 at 224 px on one GPU.")
    return "\n".join(lines)


def get_args_parser():
    parser = argparse.ArgumentParser("DAMA data-pipeline benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="cells", choices=["cells", "imagenet"],
                        help="cells: 7-channel TIFF pipelines; imagenet: MAE's ImageNet recipe on RGB JPEGs")
    parser.add_argument("--jpeg_size", type=int, nargs=2, default=[500, 375], metavar=("WIDTH", "HEIGHT"),
                        help="--recipe imagenet: size of the written JPEGs")
    parser.add_argument("--img_size", nargs="+", type=int, default=[224, 128], help="training side(s) S")
    parser.add_argument("--file_size", type=int, default=None, help="side of the written TIFFs (default: S)")
    parser.add_argument("--in_chans", type=int, default=7)
    parser.add_argument("--num_files", type=int, default=64, help="TIFFs written per layout and size")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--compression", default=None, choices=[None, "zlib", "lzw"], help="TIFF compression")
    parser.add_argument("--data_path", default=None,
                        help="measure these image files instead of writing random ones (one 'layout': data_path)")
    parser.add_argument("--pipelines", nargs="+",
                        choices=[*FILE_PIPELINES, "synthetic", "packed", "stages", *IMAGENET_PIPELINES],
                        default=[*FILE_PIPELINES, "synthetic", "packed"],
                        help="pipelines to time ('stages': ms per image of each augmentation stage, CPU and GPU "
                             "paths, also --stages; --recipe imagenet: the imagenet_* ones, default all of them)")
    parser.add_argument("--packed_sizes", nargs="+", type=int, default=[64, 128],
                        help="crop sides of the 'packed' rows (packed cells.npy vs one TIFF per crop)")
    parser.add_argument("--stages", action="store_true", help="add the per-stage rows ('stages' pipeline)")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers for the loader rows (0: single-process rows only)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--passes", type=int, default=4, help="passes over the files in the loader rows")
    parser.add_argument("--min_seconds", type=float, default=2.0, help="minimum time of a single-process row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where GPUAugment is timed (pipeline 'gpu')")
    parser.add_argument("--augment_batch_size", type=int, default=256)
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    return parser


def file_sets(args, tmp: Path):
    """(layout, img_size, paths) to measure: the --data_path files, or files written for each layout and size."""
    if args.data_path:  # listed once for every --img_size
        paths = list_images(Path(args.data_path), recursive=True)
        if not paths:
            raise SystemExit(f"error: --data_path {args.data_path}: no image files found")
        for img_size in args.img_size:
            yield "data_path", img_size, paths
        return
    for img_size in args.img_size:
        for layout in args.layouts:
            folder = tmp / f"{layout}_{args.file_size or img_size}"
            paths = sorted(folder.glob("*.tif")) or write_tiffs(
                folder, args.num_files, args.file_size or img_size, args.in_chans, layout, args.compression)
            yield layout, img_size, paths


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.stages and "stages" not in args.pipelines:
        args.pipelines.append("stages")
    device = torch.device(args.device)
    if args.recipe == "imagenet":
        with tempfile.TemporaryDirectory(prefix="dama_bench_imagenet_") as tmp:
            rows = bench_imagenet(args, Path(tmp))
        for row in rows:
            emit(row, args.out)
        print()
        print(imagenet_table(rows))
        return 0
    rows, stage_rows, staged_sizes = [], [], set()
    with tempfile.TemporaryDirectory(prefix="dama_bench_data_") as tmp:
        for layout, img_size, paths in file_sets(args, Path(tmp)):
            for row in bench_files(paths, layout, img_size, args):
                rows.append(row)
                emit(row, args.out)
            if "stages" in args.pipelines and img_size not in staged_sizes:  # the first layout of each size
                staged_sizes.add(img_size)
                for row in bench_stages(paths, img_size, device, args.min_seconds, args.augment_batch_size):
                    stage_rows.append({**row, "layout": layout})
                    emit(stage_rows[-1], args.out)
    if "synthetic" in args.pipelines:
        for img_size in args.img_size:
            rate = time_single_process(SyntheticCells(args.num_files, img_size, args.in_chans), args.min_seconds)
            row = make_row("synthetic", "-", img_size, img_size, 0, rate)
            rows.append(row)
            emit(row, args.out)
    if "packed" in args.pipelines:
        with tempfile.TemporaryDirectory(prefix="dama_bench_packed_") as tmp:
            for row in bench_packed(args, Path(tmp)):
                rows.append(row)
                emit(row, args.out)
    if "gpu" in args.pipelines:
        for img_size in args.img_size:
            rate = time_gpu_augment(img_size, args.in_chans, args.augment_batch_size, device)
            row = make_row("gpu_augment_device", str(device), img_size, None, None, rate, per_worker=False)
            row["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            rows.append(row)
            emit(row, args.out)
    print()
    print(markdown_table(rows))
    if stage_rows:
        print()
        print(stages_table(stage_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
