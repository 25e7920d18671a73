"""Frozen-encoder features of a dataset: one pooled vector per image, for kNN, linear-probe style checks and
feature export.

An "encoder function" maps a batch of images [N, C, H, W] to features [N, D]; `student_encoder` builds one
from a pretraining student (DAMA's or MAE's `MAEStudent`) that sees every patch, unmasked.
"""
import argparse
import time

import torch
import torch.distributed as dist

import util.misc as misc
from util.errors import ConfigError, DataError

POOLINGS = ("mean", "cls")
# One default everywhere (fine-tuning, the linear probe, the kNN monitor, extract_features.py, predict_cells.py and
# the export): the mean of the patch tokens; the cls token is the option (--pool cls).
DEFAULT_POOL = "mean"


class _PoolAsGlobalPool(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        namespace.global_pool = values == "mean"


def add_classifier_pool_flag(parser):
    """--pool mean|cls for the classifier scripts (fine-tuning, linear probe): the same switch as --global_pool /
    --cls_token, spelled as everywhere else."""
    parser.add_argument("--pool", choices=POOLINGS, dest="global_pool", action=_PoolAsGlobalPool,
                        default=argparse.SUPPRESS,
                        help="classify from the mean of the patch tokens (mean, default) or the cls token (cls)")
    return parser


def all_patch_ids(batch_size: int, num_patches: int, device) -> torch.Tensor:
    """[N, L] patch indices in raster order: every patch visible."""
    return torch.arange(num_patches, device=device).expand(batch_size, -1)


def check_pool(pool: str) -> None:
    if pool not in POOLINGS:
        raise ConfigError(f"feature pooling must be one of {POOLINGS}, got {pool!r}")


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """Encoder tokens [N, 1+L, D] (cls first) -> image features [N, D]: the cls token ('cls') or the mean of the
    patch tokens ('mean')."""
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)


def student_encoder(student, pool: str = DEFAULT_POOL):
    """imgs [N, C, H, W] -> [N, D]: the student's final-normed tokens with every patch visible, pooled as
    the mean of the patch tokens ('mean', cls excluded) or the cls token ('cls')."""
    check_pool(pool)

    def encode(imgs: torch.Tensor) -> torch.Tensor:
        ids = all_patch_ids(imgs.shape[0], student.num_patches, imgs.device)
        latent, _ = student.forward_encoder(imgs, ids)  # [N, 1+L, D]
        return pool_tokens(latent, pool)

    return encode


@torch.no_grad()
def run_batches(fn, loader, device, amp_dtype: str = "none", print_freq: int = 0, unit: str = "images") -> list:
    """fn(images [N, C, H, W]) -> a tensor or a tuple of tensors, over every batch of `loader` (images, labels),
    under autocast (amp_dtype 'bf16'/'fp16'; floating outputs come back as float32). Returns [outputs..., labels]
    concatenated over the batches, on `device`, in the loader's order.

    print_freq > 0: a progress line (done / total, `unit`/s, time left) every print_freq batches and after the last.
    """
    device = torch.device(device)
    outputs, labels = [], []
    start, done, total = time.time(), 0, len(loader.dataset)
    for step, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        with misc.autocast_context(device, amp_dtype):
            result = fn(images)
        result = result if isinstance(result, tuple) else (result,)
        outputs.append([r.float() if r is not None and r.is_floating_point() else r for r in result])
        labels.append(torch.as_tensor(targets, device=device).long())
        done += images.shape[0]
        if print_freq > 0 and (step % print_freq == 0 or done == total):
            elapsed = max(time.time() - start, 1e-9)
            left = (total - done) * elapsed / done
            print(f"[{done}/{total}] {unit}  {done / elapsed:.1f} {unit}/s  {left:.0f} s left", flush=True)
    if not outputs:
        raise DataError(f"the data loader yielded no {unit}")
    columns = [None if parts[0] is None else torch.cat(parts) for parts in zip(*outputs)]
    return columns + [torch.cat(labels)]


def extract_features(encoder_fn, loader, device, amp_dtype: str = "none", print_freq: int = 0):
    """(features [N, D] float32, labels [N] int64), both on `device`, in the loader's order.

    The caller puts the encoder in eval mode; autocast (amp_dtype 'bf16'/'fp16') only speeds up the
    forward, the features are returned in float32. print_freq > 0: a progress line (images done, img/s)
    every print_freq batches and after the last one.
    """
    features, labels = run_batches(encoder_fn, loader, device, amp_dtype, print_freq)
    return features, labels


def rank_counts(rows: int) -> list:
    """Every rank's `rows` (one all_gather), in rank order."""
    count = torch.tensor([rows], device=misc.comm_device())
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    return [int(c.item()) for c in counts]


def gather_from_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's [n_r, ...] tensor along dim 0 (ranks may hold different n_r); a no-op when
    not distributed. Rows keep rank order, which is enough for kNN (the order of a set does not matter)."""
    if not misc.is_dist_avail_and_initialized():
        return tensor
    world_size = dist.get_world_size()
    counts = rank_counts(tensor.shape[0])
    # all_gather needs equal shapes: pad every shard to the largest, then drop the padding
    padded = tensor.new_zeros((max(counts),) + tuple(tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    shards = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(shards, padded)
    return torch.cat([shard[:n] for shard, n in zip(shards, counts)])


def gather_to_main(tensor: torch.Tensor, chunk_rows: int = 8192):
    """Each rank's [n_r, ...] tensor, concatenated in rank order on the main process (on the CPU); None on the other
    ranks; the tensor itself when not distributed. Sent in chunks of chunk_rows rows, so the communication buffers
    stay small whatever the number of rows (a whole slide's embeddings)."""
    if not misc.is_dist_avail_and_initialized():
        return tensor
    world_size, is_main, device = dist.get_world_size(), misc.is_main_process(), misc.comm_device()
    counts = rank_counts(tensor.shape[0])
    pieces = [[] for _ in range(world_size)]
    for offset in range(0, max(counts), chunk_rows):
        rows = min(chunk_rows, max(counts) - offset)
        chunk = tensor.new_zeros((rows,) + tuple(tensor.shape[1:]), device=device)  # padded: equal shapes
        mine = tensor[offset:offset + rows]
        chunk[:mine.shape[0]] = mine.to(device)
        received = [torch.zeros_like(chunk) for _ in range(world_size)] if is_main else None
        dist.gather(chunk, received, dst=0)
        if is_main:
            for rank, piece in enumerate(received):
                pieces[rank].append(piece[:max(0, min(rows, counts[rank] - offset))].cpu())
    if not is_main:
        return None
    return torch.cat([torch.cat(rank_pieces) if rank_pieces else tensor.new_zeros((0,) + tuple(tensor.shape[1:]))
                      for rank_pieces in pieces]).cpu()
