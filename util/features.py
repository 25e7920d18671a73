"""Frozen-encoder features of a dataset: one pooled vector per image, for kNN, linear-probe style checks and
feature export.

An "encoder function" maps a batch of images [N, C, H, W] to features [N, D]; `student_encoder` builds one
from a pretraining student (DAMA's or MAE's `MAEStudent`) that sees every patch, unmasked.
"""
import time

import torch
import torch.distributed as dist

import util.misc as misc
from util.errors import ConfigError, DataError

POOLINGS = ("mean", "cls")


def all_patch_ids(batch_size: int, num_patches: int, device) -> torch.Tensor:
    """[N, L] patch indices in raster order: every patch visible."""
    return torch.arange(num_patches, device=device).expand(batch_size, -1)


def check_pool(pool: str) -> None:
    if pool not in POOLINGS:
        raise ConfigError(f"feature pooling must be one of {POOLINGS}, got {pool!r}")


def pool_tokens(tokens: torch.Tensor, pool: str, num_prefix_tokens: int = 1, norm=None) -> torch.Tensor:
    """Encoder tokens [N, P+L, D] (P prefix tokens, cls first) -> image features [N, D]: the cls token
    ('cls') or the mean of the patch tokens ('mean'), passed through `norm` when given (a fine-tuned
    global-pool model's fc_norm)."""
    if pool == "cls":
        return tokens[:, 0]
    pooled = tokens[:, num_prefix_tokens:].mean(dim=1)
    return pooled if norm is None else norm(pooled)


def student_encoder(student, pool: str = "mean"):
    """imgs [N, C, H, W] -> [N, D]: the student's final-normed tokens with every patch visible, pooled as
    the mean of the patch tokens ('mean', cls excluded) or the cls token ('cls')."""
    check_pool(pool)

    def encode(imgs: torch.Tensor) -> torch.Tensor:
        ids = all_patch_ids(imgs.shape[0], student.num_patches, imgs.device)
        latent, _ = student.forward_encoder(imgs, ids)  # [N, 1+L, D]
        return pool_tokens(latent, pool)

    return encode


@torch.no_grad()
def extract_features(encoder_fn, loader, device, amp_dtype: str = "none", print_freq: int = 0):
    """(features [N, D] float32, labels [N] int64), both on `device`, in the loader's order.

    The caller puts the encoder in eval mode; autocast (amp_dtype 'bf16'/'fp16') only speeds up the
    forward, the features are returned in float32. print_freq > 0: a progress line (images done, img/s)
    every print_freq batches and after the last one.
    """
    device = torch.device(device)
    features, labels = [], []
    start, done, total = time.time(), 0, len(loader.dataset) if print_freq > 0 else None
    for step, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        with misc.autocast_context(device, amp_dtype):
            features.append(encoder_fn(images).float())
        labels.append(torch.as_tensor(targets, device=device).long())
        done += images.shape[0]
        if print_freq > 0 and (step % print_freq == 0 or done == total):
            print(f"[{done}/{total}] images  {done / max(time.time() - start, 1e-9):.1f} img/s", flush=True)
    if not features:
        raise DataError("extract_features: the data loader yielded no images")
    return torch.cat(features), torch.cat(labels)


def gather_from_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's [n_r, ...] tensor along dim 0 (ranks may hold different n_r); a no-op when
    not distributed. Rows keep rank order, which is enough for kNN (the order of a set does not matter)."""
    if not misc.is_dist_avail_and_initialized():
        return tensor
    world_size = dist.get_world_size()
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    # all_gather needs equal shapes: pad every shard to the largest, then drop the padding
    padded = tensor.new_zeros((max(counts),) + tuple(tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    shards = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(shards, padded)
    return torch.cat([shard[:n] for shard, n in zip(shards, counts)])
