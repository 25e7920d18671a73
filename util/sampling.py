"""Reproducible data order and randomness, so that a run resumed in the middle of an epoch continues exactly.

Everything random in training is a function of a few integers instead of a generator state that would have to be
saved and restored in every process:

- the sample order of an epoch: torch's DistributedSampler order for (seed, epoch), dealt to the ranks;
- the augmentation of a sample: seeded by (seed, epoch, sample index), whatever worker, rank or step draws it
  (`SeededSamples`), so the number of DataLoader workers does not matter either;
- the masks, drop path, mixup and the --gpu_augment draws of a step: seeded by (seed, epoch, step, rank)
  (`seed_step`).

A checkpoint written after step s of epoch e therefore only needs (e, s) to continue with the same batches,
the same augmentations and the same masks as a run that was never stopped.
"""
import random
import signal
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from util.run_control import STOP_SIGNALS


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from integers (seed, epoch, index, ...), well mixed (numpy's SeedSequence)."""
    words = np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(2, np.uint32)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & (2**63 - 1)


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy and random with one seed.

    torch.manual_seed seeds the same CPU and CUDA generators, but also every other backend it knows (xpu, mtia,
    ...), each lazily with a formatted Python stack trace: about 0.1 ms per call, and seed_step runs every step.
    """
    seed_cpu_generators(seed)
    torch.cuda.manual_seed_all(seed)  # lazily (at CUDA's initialisation) when CUDA is not in use yet


def seed_step(seed: int, epoch: int, step: int, rank: int) -> None:
    """Seed every generator for one training step (masks, drop path, mixup, GPU augmentation).

    Ranks draw different masks; a resumed run draws the same ones as an uninterrupted run at every step.
    """
    seed_all(derived_seed(seed, 1, epoch, step, rank))


def seed_cpu_generators(seed: int) -> None:
    """Seed torch's CPU generator, numpy and random (what the augmentations draw from; no CUDA generator)."""
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)  # numpy only takes 32-bit seeds
    random.seed(seed)


@contextmanager
def seeded(seed: int):
    """Run a block with torch's CPU generator, numpy and random seeded by `seed`, restoring their states after, so
    that seeding a sample in the main process (num_workers 0) does not disturb anything else."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_cpu_generators(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler order (shuffled by seed + epoch, dealt to the ranks) that can start in the middle
    of an epoch and tags each index with what seeds its augmentation: it yields (index, seed, epoch) for
    `SeededSamples`.

    set_epoch(epoch, start_step) starts the epoch after `start_step` batches of `batch_size` (a resumed epoch);
    `steps_per_epoch` is always the full epoch's number of batches, for the lr schedule: whole batches only, or
    with keep_last_batch also the last partial one (the loader must batch the same way).
    """

    def __init__(self, dataset, batch_size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, keep_last_batch: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.batch_size, self.keep_last_batch = batch_size, keep_last_batch
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        super().set_epoch(epoch)
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start step {start_step} is outside the epoch's {self.steps_per_epoch} steps")
        self.start_step = start_step

    @property
    def steps_per_epoch(self) -> int:
        if self.keep_last_batch:
            return -(-self.num_samples // self.batch_size)
        return self.num_samples // self.batch_size

    def __iter__(self):
        # the seed itself is derived where the item is loaded (in the workers): a million-image epoch would
        # otherwise spend seconds here before its first batch
        indices = list(super().__iter__())[self.start_step * self.batch_size:]
        return iter([(index, self.seed, self.epoch) for index in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start_step * self.batch_size


class SeededSamples(Dataset):
    """dataset[index] with its randomness (augmentation) seeded by (seed, epoch, index).

    Items are requested as (index, seed, epoch) by `ResumableSampler`. Attributes of the wrapped dataset (classes,
    transform, ...) are reachable through `.dataset`.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed, epoch = item
        sample_seed = derived_seed(seed, 0, epoch, index)
        if torch.utils.data.get_worker_info() is not None:
            # a DataLoader worker's generators serve only the samples: seeding them is enough (and cheap)
            seed_cpu_generators(sample_seed)
            return self.dataset[index]
        with seeded(sample_seed):  # the training process itself (num_workers 0): leave its generators as they were
            return self.dataset[index]


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: SIGTERM/SIGUSR1/SIGUSR2/SIGINT go to the whole process group under SLURM and
    torchrun; the training process decides how to stop (util.run_control) and shuts the workers down itself: a worker
    killed by SLURM's SIGTERM would make the next batch fail before the checkpoint is written."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def resumable_loader(dataset, batch_size: int, num_workers: int, seed: int, world_size: int, rank: int,
                     pin_memory: bool, drop_last_sampler: bool = False, collate_fn=None,
                     keep_last_batch: bool = False) -> torch.utils.data.DataLoader:
    """Shuffled training loader whose sampler can start mid-epoch and whose items are seeded per sample.

    `loader.sampler.set_epoch(epoch, start_step)` before each epoch; `loader.sampler.steps_per_epoch` is the length
    of a full epoch. Batches are whole (drop_last) unless keep_last_batch. collate_fn: the dataset's own batching
    (e.g. encoded JPEG bytes), default torch's.
    """
    sampler = ResumableSampler(dataset, batch_size, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                               drop_last=drop_last_sampler, keep_last_batch=keep_last_batch)
    return torch.utils.data.DataLoader(
        SeededSamples(dataset), sampler=sampler, batch_size=batch_size, num_workers=num_workers,
        pin_memory=pin_memory, drop_last=not keep_last_batch, persistent_workers=num_workers > 0,
        collate_fn=collate_fn, worker_init_fn=ignore_stop_signals_in_worker if num_workers > 0 else None)
