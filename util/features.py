"""Frozen-encoder features of a dataset: one pooled vector per image, for kNN, linear-probe style checks and
feature export.

An "encoder function" maps a batch of images [N, C, H, W] to features [N, D]; `student_encoder` builds one
from a pretraining student (DAMA's or MAE's `MAEStudent`) that sees every patch, unmasked.
"""
import torch
import torch.distributed as dist

import util.misc as misc

POOLINGS = ("mean", "cls")


def all_patch_ids(batch_size: int, num_patches: int, device) -> torch.Tensor:
    """[N, L] patch indices in raster order: every patch visible."""
    return torch.arange(num_patches, device=device).expand(batch_size, -1)


def student_encoder(student, pool: str = "mean"):
    """imgs [N, C, H, W] -> [N, D]: the student's final-normed tokens with every patch visible, pooled as
    the mean of the patch tokens ('mean', cls excluded) or the cls token ('cls')."""
    if pool not in POOLINGS:
        raise ValueError(f"feature pooling must be one of {POOLINGS}, got {pool!r}")

    def encode(imgs: torch.Tensor) -> torch.Tensor:
        ids = all_patch_ids(imgs.shape[0], student.num_patches, imgs.device)
        latent, _ = student.forward_encoder(imgs, ids)  # [N, 1+L, D]
        return latent[:, 1:].mean(dim=1) if pool == "mean" else latent[:, 0]

    return encode


@torch.no_grad()
def extract_features(encoder_fn, loader, device, amp_dtype: str = "none"):
    """(features [N, D] float32, labels [N] int64), both on `device`, in the loader's order.

    The caller puts the encoder in eval mode; autocast (amp_dtype 'bf16'/'fp16') only speeds up the
    forward, the features are returned in float32.
    """
    device = torch.device(device)
    features, labels = [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        with misc.autocast_context(device, amp_dtype):
            features.append(encoder_fn(images).float())
        labels.append(torch.as_tensor(targets, device=device).long())
    if not features:
        raise ValueError("extract_features: the data loader yielded no images")
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
