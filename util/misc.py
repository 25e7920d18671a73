"""Distributed setup, metric logging, mixed precision and small run helpers (MAE conventions, torch 2.x APIs)."""
import builtins
import datetime
import json
import math
import os
import re
import time
from collections import defaultdict, deque
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist

from util.errors import ConfigError, LaunchError, NonFiniteLossError
from util.sampling import seed_all

# The interpreter's own print, kept so that the override below can be installed (and undone) any number of times.
_BUILTIN_PRINT = builtins.print
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup
# ----------------------------------------------------------------------------------------------------------------
def add_device_and_seed_args(parser):
    """--device and --seed, as both training scripts take them."""
    parser.add_argument("--device", default=_default_device(),
                        help="where to train: cuda (default when a GPU is present) or cpu; under torchrun/SLURM "
                             "each process takes cuda:<local rank>")
    parser.add_argument("--seed", default=0, type=int,
                        help="seed of the init, the data order, the augmentations and the masks (each process "
                             "adds its rank)")
    return parser


def add_distributed_args(parser):
    """Add MAE's distributed flags to an argparse parser and return it."""
    parser.add_argument("--world_size", default=1, type=int, help="number of processes (set by the launcher)")
    # torch.distributed.launch passes --local-rank; torchrun and submitit use the LOCAL_RANK variable instead
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", default=-1, type=int,
                        help="set by torch.distributed.launch (torchrun and SLURM use environment variables instead)")
    parser.add_argument("--dist_on_itp", action="store_true", help="take ranks from OpenMPI (OMPI_COMM_WORLD_*)")
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    return parser


def _launcher_env(args):
    """(rank, world_size, local_rank, dist_url) given by the launcher, or None for a single-process run."""
    env = os.environ
    if getattr(args, "dist_on_itp", False):
        needed = ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                  "MASTER_ADDR", "MASTER_PORT"]
        missing = [name for name in needed if name not in env]
        if missing:
            raise LaunchError(f"--dist_on_itp needs the environment variables {', '.join(missing)}")
        rank, world_size = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local_rank = int(env["OMPI_COMM_WORLD_LOCAL_RANK"])
        # later code (and child processes) read the torchrun names
        env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        return rank, world_size, local_rank, f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    # torchrun, and submitit through TorchDistributedEnvironment().export(), set these
    if "RANK" in env and "WORLD_SIZE" in env:
        dist_url = getattr(args, "dist_url", None) or "env://"
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), dist_url
    return _slurm_step_env(env)


def _slurm_step_env(env):
    """A plain `srun python main_pretrain.py ...` (one task per GPU, no torchrun): the step's tasks form one job.

    Only srun sets SLURM_STEP_NUM_TASKS; the batch script of a several-task job also sees SLURM_PROCID=0 and
    SLURM_NTASKS, but runs alone (it is told so). The rendezvous is the step's first node, on a port derived
    from the job id (MASTER_ADDR / MASTER_PORT win when set).
    """
    if "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
            print(f"warning: this SLURM job has {env['SLURM_NTASKS']} tasks but this process was not started by "
                  f"srun: it runs alone; start it as `srun python ...` to train on all of them", flush=True)
        return None
    world_size = int(env["SLURM_STEP_NUM_TASKS"])
    if world_size < 2:
        return None
    rank, local_rank = int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0))
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    master_addr = env.get("MASTER_ADDR") or first_slurm_host(nodes or "localhost")
    master_port = env.get("MASTER_PORT") or str(
        15000 + (int(env.get("SLURM_JOB_ID", 0)) + int(env.get("SLURM_STEP_ID", 0) or 0)) % 30000)
    # later code (DataLoader workers, child processes) reads the torchrun names
    env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank), MASTER_ADDR=master_addr,
               MASTER_PORT=master_port)
    return rank, world_size, local_rank, "env://"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,07],cpu1' -> 'gpu03', 'node7,node8' -> 'node7'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise LaunchError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR")
    prefix, ranges = match.group(1), match.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed_mode(args):
    """Join the process group described by the launcher's environment, or set up a single-process run.

    Sets args.distributed, args.rank, args.world_size, args.local_rank, args.dist_backend (and args.device on
    cuda). Afterwards print() is silent on every rank but 0 unless called with force=True.
    """
    device = str(getattr(args, "device", None) or _default_device())
    launch = _launcher_env(args)
    if launch is None:
        args.distributed, args.rank, args.world_size, args.local_rank, args.dist_backend = False, 0, 1, 0, None
        args.device = device
        setup_for_distributed(is_master=True)
        print("Not using distributed mode")
        return
    rank, world_size, local_rank, dist_url = launch
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise LaunchError(f"--device {device} was asked for but CUDA is not available; use --device cpu")
        # modulo: a launcher that gives each task its own GPU (srun --gpus-per-task=1) shows it one device
        device_index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(device_index)
        device = f"cuda:{device_index}"
    args.distributed, args.rank, args.world_size, args.local_rank = True, rank, world_size, local_rank
    args.dist_backend, args.dist_url, args.device = backend, dist_url, device
    print(f"| distributed init (rank {rank}/{world_size}): {backend}", flush=True)
    dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size, rank=rank)
    # nccl would otherwise guess which GPU to use for the barrier (and warn about it)
    dist.barrier(device_ids=[torch.cuda.current_device()] if backend == "nccl" else None)
    setup_for_distributed(is_master=rank == 0)


def setup_for_distributed(is_master: bool):
    """Replace print(): time-stamped lines, silent on non-master ranks unless force=True is passed."""

    def print_with_rank_filter(*args, **kwargs):
        force = kwargs.pop("force", False)
        if not (is_master or force):
            return
        if "file" in kwargs:  # writing to a file: no time stamp in its content
            _BUILTIN_PRINT(*args, **kwargs)
        else:
            _BUILTIN_PRINT(f"[{datetime.datetime.now():%Y-%m-%d %H:%M:%S}]", *args, **kwargs)

    builtins.print = print_with_rank_filter


def cleanup_distributed():
    """Leave the process group (if any) and give print() back its normal behaviour."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()
    builtins.print = _BUILTIN_PRINT


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def default_num_workers() -> int:
    """DataLoader workers per process by default: up to 10 (MAE's), never more than the CPUs this process may use."""
    return min(10, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def seed_everything(seed: int) -> int:
    """Seed torch, numpy and random with seed + rank: the model's initialisation (DDP broadcasts rank 0's) and anything
    not seeded per sample (util.sampling.SeededSamples) or per step (util.sampling.seed_step)."""
    seed = int(seed) + get_rank()
    seed_all(seed)
    return seed


def comm_device() -> torch.device:
    """Where tensors must live for collectives: nccl only reduces GPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place (a no-op when not distributed) and return it."""
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_mean_list(tensor: torch.Tensor) -> list:
    """Element-wise mean over all ranks of a tensor's values, as a list of python floats.

    One collective for the whole tensor, reduced in float64 where it lives (the argument is not changed), and
    one host sync (the final .tolist()): every rank gets the same values.
    """
    total = all_reduce_sum(tensor.detach().to(dtype=torch.float64, copy=True).reshape(-1))
    return (total / get_world_size()).tolist()


def all_reduce_mean(value) -> float:
    """Mean of a scalar (python number or 0-dim/1-element tensor) over all ranks, as a float."""
    if not torch.is_tensor(value):
        if not is_dist_avail_and_initialized():
            return float(value)
        value = torch.tensor(float(value), device=comm_device())
    (mean,) = all_reduce_mean_list(value)
    return mean


@contextmanager
def main_process_first():
    """Rank 0 runs the block first, the other ranks after it (a no-op in a single process): rank 0 lists and
    checks a data folder and writes the index cache, which the others then read instead of scanning every file
    again. When rank 0 fails, the others stop too, pointing at its error, instead of waiting forever."""
    if not is_dist_avail_and_initialized():
        yield
        return
    done = torch.zeros(1, device=comm_device())
    if get_rank() == 0:
        try:
            yield
            done.fill_(1.0)
        finally:
            dist.broadcast(done, src=0)
        return
    dist.broadcast(done, src=0)
    if done.item() != 1.0:
        raise LaunchError("rank 0 could not prepare the data (its error is above, or in its log); stopping too")
    yield


def wrap_ddp(args, model):
    """model in DistributedDataParallel when the run is distributed (one device per process), else model."""
    if not args.distributed:
        return model
    device_ids = [torch.device(args.device)] if str(args.device).startswith("cuda") else None  # cuda:<index>
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def build_log_writer(args):
    """TensorBoard writer into --log_dir on the main process, None elsewhere (or without a --log_dir)."""
    if not is_main_process() or not args.log_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported here: slow, and only rank 0 needs it
    return SummaryWriter(log_dir=args.log_dir)


def unwrap_model(model):
    """The model inside DistributedDataParallel and torch.compile wrappers (in either order)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)


def grad_sync_context(model, update_grad: bool):
    """DDP: skip the gradient all-reduce on accumulation steps; it is needed only before the optimizer step.

    A no-op for a model without no_sync (not wrapped in DDP); a torch.compile'd DDP model forwards it.
    """
    if not update_grad and hasattr(model, "no_sync"):
        return model.no_sync()
    return nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# Metric logging
# ----------------------------------------------------------------------------------------------------------------
class SmoothedValue:
    """A series of values: median/avg over a sliding window, and a global average over everything seen."""

    def __init__(self, window_size: int = 20, fmt: str | None = None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value, n: int = 1):
        if torch.is_tensor(value):
            value = value.item()
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum count and total over ranks so global_avg is the all-rank average (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        count_total = torch.tensor([self.count, self.total], dtype=torch.float64, device=comm_device())
        dist.all_reduce(count_total)
        self.count, self.total = int(count_total[0].item()), count_total[1].item()

    @property
    def median(self) -> float:
        return float(np.median(self.deque)) if self.deque else math.nan

    @property
    def avg(self) -> float:
        return float(np.mean(self.deque)) if self.deque else math.nan

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else math.nan

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else math.nan

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """Named SmoothedValues plus a loop wrapper that prints progress with an ETA."""

    def __init__(self, delimiter: str = "  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        """Add one value per meter; tensors are read with .item() (a host sync: callers choose when)."""
        for name, value in kwargs.items():
            if value is None:
                continue
            if torch.is_tensor(value) or isinstance(value, np.generic):
                value = value.item()
            if not isinstance(value, (int, float)):
                raise TypeError(f"MetricLogger.update: {name} must be a number or a 0-dim tensor, "
                                f"got {type(value).__name__}")
            self.meters[name].update(value)

    def __getattr__(self, name):
        # only called when normal lookup fails: lets callers write logger.loss
        meters = self.__dict__.get("meters", {})
        if name in meters:
            return meters[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name: str, meter: SmoothedValue):
        self.meters[name] = meter

    def log_every(self, iterable, print_freq: int, header: str | None = None, first: int = 0, total: int = None):
        """Yield the items of `iterable`, printing progress every `print_freq` items and a total at the end.

        first / total: a resumed epoch's first step and the full epoch's length, for the printed position.
        """
        header = header or ""
        num_items = len(iterable)
        total = num_items if total is None else total
        width = len(str(total))
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        start = end = time.time()
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if (first + i) % print_freq == 0 or i == num_items - 1:
                eta_seconds = iter_time.global_avg * (num_items - 1 - i)
                parts = [header, f"[{first + i:>{width}}/{total}]",
                         f"eta: {datetime.timedelta(seconds=int(eta_seconds))}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}")
                print(self.delimiter.join(p for p in parts if p))
            end = time.time()
        total = time.time() - start
        print(f"{header} Total time: {datetime.timedelta(seconds=int(total))} "
              f"({total / max(num_items, 1):.4f} s / it)")


class LossWindow:
    """Loss terms summed on the device between two synchronisation points, and their epoch totals on the host.

    add() costs no host sync. sync() makes the one all-reduce (mean over ranks) and the one host read of a window,
    with `extra` values (the run-control requests) appended to the same collective; it returns the window's means
    (identical on every rank) and the reduced extras. The epoch totals are rank-averaged window sums; state() /
    the `state` argument carry them through a mid-epoch checkpoint.
    """

    def __init__(self, terms, device, state: dict = None):
        self.terms = tuple(terms)
        self.device = device
        self.window = torch.zeros(len(self.terms), device=device)  # [T] sums since the last sync
        self.count = 0
        state = state or {}
        self.epoch_sums = list(state.get("sums", [0.0] * len(self.terms)))
        self.epoch_steps = int(state.get("steps", 0))

    def add(self, values) -> None:
        """One step's loss terms (0-dim tensors, in the order of `terms`)."""
        self.window += torch.stack([v.detach().float() for v in values])
        self.count += 1

    def sync(self, extra=()):
        """(means {term: value}, reduced extras [floats]) of the window; starts a new window."""
        extra = torch.tensor([float(v) for v in extra], device=self.device)
        reduced = all_reduce_mean_list(torch.cat([self.window, extra]))
        sums, extra_reduced = reduced[:len(self.terms)], reduced[len(self.terms):]
        means = {term: value / max(self.count, 1) for term, value in zip(self.terms, sums)}
        self.epoch_sums = [total + value for total, value in zip(self.epoch_sums, sums)]
        self.epoch_steps += self.count
        self.window.zero_()
        self.count = 0
        return means, extra_reduced

    def epoch_means(self) -> dict:
        return {term: total / max(self.epoch_steps, 1) for term, total in zip(self.terms, self.epoch_sums)}

    def state(self) -> dict:
        """The epoch totals so far (a synced window only), for a mid-epoch checkpoint."""
        return {"sums": list(self.epoch_sums), "steps": self.epoch_steps}


def loader_position(loader):
    """(steps of a full epoch, first step of this pass) of a training loader: a util.sampling.ResumableSampler
    knows both; any other loader runs whole epochs."""
    sampler = getattr(loader, "sampler", None)  # any iterable of batches works too
    return getattr(sampler, "steps_per_epoch", len(loader)), getattr(sampler, "start_step", 0)


def accumulation_step(step: int, steps_per_epoch: int, accum_iter: int):
    """(divisor, update) for training step `step` with gradient accumulation, one rule for both engines.

    Steps are grouped by `accum_iter` from the epoch's start; the optimizer steps after the last step of each
    group, and each batch's (mean) loss is divided by its group's size, so the batches of a group weigh equally and
    a short last group (an epoch whose length is not a multiple of accum_iter) is averaged over its own batches
    instead of being dropped or scaled down.
    """
    group_start = step - step % accum_iter
    group_size = min(accum_iter, steps_per_epoch - group_start)
    return group_size, step == group_start + group_size - 1


def check_finite(values: dict, epoch: int, step: int, advice: str) -> None:
    """Raises NonFiniteLossError when a window mean is NaN/inf. The values are all-reduced, so every rank stops at the
    same step; nothing is saved, so the last good checkpoint stays."""
    if not all(math.isfinite(v) for v in values.values()):
        terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        raise NonFiniteLossError(f"non-finite loss at epoch {epoch}, step {step} ({terms}); stopping without writing "
                                 f"a checkpoint, the last good one is kept. {advice}")


def append_json_log(output_dir, stats: dict):
    """Append `stats` as one JSON line to <output_dir>/log.txt (main process only)."""
    if not output_dir or not is_main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "log.txt"), "a", encoding="utf-8") as f:
        f.write(json.dumps(stats, default=_json_default) + "\n")
        f.flush()


def _json_default(value):
    """Numbers from torch/numpy become python numbers; anything else its string."""
    if torch.is_tensor(value) or isinstance(value, np.generic):
        return value.item()
    return str(value)


# ----------------------------------------------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------------------------------------------
def _check_amp_dtype(amp_dtype: str):
    if amp_dtype not in AMP_DTYPES:
        raise ConfigError(f"--amp_dtype must be one of {sorted(AMP_DTYPES)}, got {amp_dtype!r}")


def _device_type(device) -> str:
    return torch.device(device).type


def autocast_context(device, amp_dtype: str):
    """torch.autocast for 'bf16' (cuda or cpu) and 'fp16' (cuda only); a no-op context for 'none'."""
    _check_amp_dtype(amp_dtype)
    device_type = _device_type(device)
    if amp_dtype == "none":
        return nullcontext()
    if amp_dtype == "fp16" and device_type != "cuda":
        # without a grad scaler (cuda only here) fp16 gradients underflow
        raise ConfigError(f"--amp_dtype fp16 needs a cuda device, got --device {device}; use bf16 or none")
    return torch.autocast(device_type=device_type, dtype=AMP_DTYPES[amp_dtype])


class LossScaler:
    """Backward + optimizer step, with torch.amp.GradScaler loss scaling when training in fp16 on cuda.

    bf16 and fp32 need no scaling: the scaler is then disabled and every call is a plain backward/step.
    """

    state_dict_key = "amp_scaler"

    def __init__(self, amp_dtype: str = "none", device_type="cuda"):
        _check_amp_dtype(amp_dtype)
        device_type = _device_type(device_type)
        enabled = amp_dtype == "fp16" and device_type == "cuda"
        self._scaler = torch.amp.GradScaler(device_type, enabled=enabled)

    @property
    def enabled(self) -> bool:
        return self._scaler.is_enabled()

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, update_grad=True):
        """Scaled backward; when `update_grad`, optionally clip (None or 0: off), then step and update the scale.

        Returns the gradient norm before clipping (a tensor) when clipping, else None: measuring the norm
        without using it would cost a pass over all gradients.
        """
        self._scaler.scale(loss).backward()
        if not update_grad:  # gradient accumulation: keep summing gradients
            return None
        grad_norm = None
        if clip_grad:
            if parameters is None:
                parameters = [p for group in optimizer.param_groups for p in group["params"]]
            self._scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        self._scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
        self._scaler.update()
        return grad_norm

    def state_dict(self) -> dict:
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict: dict):
        # a checkpoint from a bf16/fp32 run holds an empty state: an fp16 run then starts from a fresh scale
        if state_dict:
            self._scaler.load_state_dict(state_dict)
