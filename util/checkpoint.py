"""Training checkpoints: atomic writes, weights_only-loadable contents, clear errors, and resume."""
import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from util.errors import CheckpointError, ConfigError
from util.misc import is_main_process
from util.output import atomic_file

ROLLING_CHECKPOINT = "checkpoint.pth"
_KEYS_SHOWN = 5  # how many mismatched state-dict keys an error message lists


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------
def to_plain(value):
    """A value torch.load(weights_only=True) accepts: Path -> str, tuple -> list, numpy scalar -> number,
    containers converted recursively, any other object -> its str."""
    if value is None:
        return value
    for plain in (bool, int, float, str):  # also their subclasses (e.g. an int that remembers it was a default)
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    return str(value)  # Path, torch.device, dtypes, ...


def args_to_dict(args) -> dict:
    """argparse Namespace (or dict) -> plain dict; a pickled Namespace would need weights_only=False to load."""
    return to_plain(vars(args) if isinstance(args, argparse.Namespace) else dict(args))


def save_checkpoint(path, state: dict):
    """torch.save `state` to `path` atomically (main process only).

    The data goes to a temporary file in the same directory, is flushed to disk, then renamed over `path`:
    a crash or a full disk leaves either the previous file or the new one, never a truncated one.
    """
    if not is_main_process():
        return
    with atomic_file(path, durable=True) as f:
        torch.save(state, f)


def checkpoint_filename(name=None) -> str:
    """None -> checkpoint.pth; an epoch number -> checkpoint-<n>.pth; another name -> <name>.pth."""
    if name is None:
        return ROLLING_CHECKPOINT
    name = str(name)
    if name.isdigit():
        return f"checkpoint-{name}.pth"
    return name if name.endswith(".pth") else f"{name}.pth"


def save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, name=None, extra=None, run=None):
    """Write model, optimizer, scaler, epoch, args and the run identity (`run`, see run_identity), plus `extra`, to
    <args.output_dir>/<checkpoint_filename(name)>.

    A mid-epoch checkpoint has extra = {"step": steps done in `epoch`, "epoch_state": the engine's partial epoch
    totals}; an end-of-epoch one has no "step". Only the main process writes (no barrier: the other ranks simply
    go on). Returns the file's path.
    """
    state = {
        "model": model_without_ddp.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": loss_scaler.state_dict() if loss_scaler is not None else None,
        "epoch": int(epoch),
        "args": args_to_dict(args),
        "run": to_plain(run) if run is not None else None,
    }
    # numpy scalars (e.g. an accuracy) would make the file need weights_only=False
    state.update({k: v.item() if isinstance(v, np.generic) else v for k, v in (extra or {}).items()})
    path = Path(args.output_dir) / checkpoint_filename(name)
    save_checkpoint(path, state)
    return path


def add_resume_args(parser):
    """Flags shared by the training scripts: mid-epoch checkpoints and what to do with an earlier run."""
    parser.add_argument("--save_every_steps", default=0, type=int,
                        help="also write checkpoint.pth every N training steps within an epoch (0: off; a multiple "
                             "of --accum_iter)")
    parser.add_argument("--save_every_minutes", default=0.0, type=float,
                        help="also write checkpoint.pth when M minutes have passed since the last one (0: off)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run even if --output_dir holds one (the earlier run's files are moved "
                             "into a sub-folder replaced_<time>/)")
    return parser


def check_save_schedule(args) -> None:
    if args.save_every_steps < 0 or args.save_every_minutes < 0:
        raise ConfigError(f"--save_every_steps and --save_every_minutes must be 0 (off) or positive, got "
                          f"{args.save_every_steps} and {args.save_every_minutes}")
    if args.save_every_steps % args.accum_iter:
        raise ConfigError(f"--save_every_steps {args.save_every_steps} must be a multiple of --accum_iter "
                          f"{args.accum_iter}: a checkpoint cannot hold half an accumulated gradient")


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------
def _short_reason(exc: Exception) -> str:
    """One line from torch.load's error. A file written by torch.save that holds other objects than tensors and
    plain values is told apart; anything else the unpickler raised (KeyError: 101 for a text file, 'Unsupported
    operand' for random bytes, EOF for a truncated file, ...) means the file is not a (complete) PyTorch
    checkpoint."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
        reason = " ".join(text.split(" Please use ", 1)[0].split())
        if "Unsupported global" in reason:
            return f"it holds objects other than tensors and plain python values ({reason})"
    return "not a PyTorch checkpoint (or a truncated one): torch.load cannot read it"


def torch_load(path, map_location="cpu", mmap=False):
    """torch.load(weights_only=True), with the argparse Namespace the reference code stored allowed (nothing else);
    CheckpointError naming the file when it cannot be read (torch raises several types for truncated/foreign files).
    mmap=True maps the tensors instead of reading them: cheap when only the metadata is wanted."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:
        raise CheckpointError(f"could not read checkpoint {path}: {_short_reason(exc)}") from exc


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load(weights_only=True) a training checkpoint; CheckpointError if missing, unreadable or not one.

    An argparse Namespace (as stored by the reference code) is allowed and turned into a dict.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    checkpoint = torch_load(path, map_location)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        found = f"keys {sorted(checkpoint)[:_KEYS_SHOWN]}" if isinstance(checkpoint, dict) else \
            f"a {type(checkpoint).__name__}"
        raise CheckpointError(f'{path} is not a training checkpoint (expected a dict with a "model" entry); '
                              f"found {found}")
    if isinstance(checkpoint.get("args"), argparse.Namespace):
        checkpoint["args"] = vars(checkpoint["args"])
    return checkpoint


# Settings that do not change what a run computes: a run may be continued with other values of these (more
# --epochs, another machine, more GPUs with the lr following the effective batch, other logging, augmentation on
# the GPU instead of the workers (the same distributions), ...).
RUNTIME_SETTINGS = frozenset({
    "epochs", "start_epoch", "resume", "overwrite", "output_dir", "log_dir", "device", "num_workers", "pin_mem",
    "world_size", "rank", "local_rank", "distributed", "dist_backend", "dist_url", "dist_on_itp", "gpu",
    "amp_dtype", "compile", "gpu_augment", "decode", "print_freq", "save_freq", "save_every_steps", "save_every_minutes", "vis_freq",
    "vis_num_images", "knn_freq", "knn_data_path", "knn_k", "knn_temperature", "knn_pool", "knn_val_crop", "eval",
    "dist_eval", "start_step", "skip_bad_files", "vis_channels", "save_init", "preflight",
    # submitit launcher flags (util/launch.py)
    "ngpus", "nodes", "timeout", "partition", "job_dir", "comment", "mem_per_gpu", "cpus_per_task", "constraint",
    "use_volta32", "account", "qos", "exclude", "cluster", "slurm_max_num_timeout", "job_name", "dry_run", "detach",
})
PATH_SETTINGS = ("data_path", "finetune")  # compared as absolute paths
# What a checkpoint written before run identities were stored is compared on.
LEGACY_IDENTITY = ("arch", "img_size", "patch_size", "in_chans", "dataset", "data_path", "finetune")


def run_identity(args) -> dict:
    """The settings that define a run (model, data, recipe, seed), from the command's flags as given: every flag
    but RUNTIME_SETTINGS, with paths made absolute. Computed before any default is filled in (--lr stays None when
    it follows --blr), stored in every checkpoint as "run"."""
    identity = {}
    for key, value in sorted(vars(args).items()):
        if key in RUNTIME_SETTINGS:
            continue
        if key in PATH_SETTINGS and value:
            value = str(Path(value).expanduser().resolve())
        identity[key] = to_plain(value)
    return identity


def saved_identity(checkpoint: dict) -> dict:
    """The run identity stored in a checkpoint; for older checkpoints, the LEGACY_IDENTITY part of its args."""
    if checkpoint.get("run"):
        return checkpoint["run"]
    saved_args = checkpoint.get("args") or {}
    legacy = argparse.Namespace(**{k: saved_args[k] for k in LEGACY_IDENTITY if k in saved_args})
    return run_identity(legacy)


def identity_differences(saved: dict, current: dict) -> list:
    """'--flag new (checkpoint: old)' for every setting both know and that differs."""
    def shown(value):
        return " ".join(map(str, value)) if isinstance(value, list) else str(value)
    return [f"--{key} {shown(current[key])} (checkpoint: {shown(saved[key])})"
            for key in sorted(saved.keys() & current.keys()) if saved[key] != current[key]]


def find_resume_checkpoint(args, identity: dict = None):
    """Which checkpoint to resume from; sets and returns args.resume (None: start a new run).

    --resume PATH: that file (settings that differ from its run are listed). Otherwise <output_dir>/checkpoint.pth
    when it exists (a restarted or requeued job), but only when its run identity matches `identity`: another run
    in the folder is a CheckpointError naming the differing settings and the ways out. --overwrite sets the folder's
    earlier run aside (moved into a sub-folder, nothing deleted) and starts a new one.
    """
    if getattr(args, "resume", None):
        if identity is not None:
            differences = identity_differences(saved_identity(peek_checkpoint(args.resume)), identity)
            if differences:
                print(f"note: --resume {args.resume}: continuing with settings that differ from that run's: "
                      f"{'; '.join(differences)}")
        return args.resume
    candidate = rolling_checkpoint(args)
    if candidate is None:
        return None
    if getattr(args, "overwrite", False):
        set_aside_previous_run(candidate.parent)
        return None
    if identity is not None:
        differences = identity_differences(saved_identity(peek_checkpoint(candidate)), identity)
        if differences:
            raise CheckpointError(
                f"--output_dir {args.output_dir} holds another run ({candidate}): {'; '.join(differences)}. "
                f"To continue that run with these settings pass --resume {candidate}; to start a new run use "
                f"another --output_dir, or --overwrite (the earlier run is moved into a sub-folder)")
    args.resume = str(candidate)
    print(f"Auto-resuming from {candidate}")
    return args.resume


def peek_checkpoint(path) -> dict:
    """A checkpoint's metadata (run, args) without reading its tensors (memory-mapped)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    checkpoint = torch_load(path, mmap=True)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a training checkpoint (expected a dict, found a "
                              f"{type(checkpoint).__name__})")
    args = checkpoint.get("args")
    return {"run": checkpoint.get("run"), "args": vars(args) if isinstance(args, argparse.Namespace) else args}


def saved_args(path, tolerant: bool = False) -> dict:
    """The flags a checkpoint was trained with ({} for a file without them, e.g. an exported encoder). tolerant:
    also {} for a missing or unreadable file (the caller's own loading reports it with its own words)."""
    try:
        return peek_checkpoint(path)["args"] or {}
    except CheckpointError:
        if tolerant:
            return {}
        raise


def fill_from_checkpoint(args, defaults: dict, checkpoint_args: dict, source: str = "", strict: bool = False):
    """Checkpoints describe themselves: each flag of `defaults` left out of the command (None) takes the
    checkpoint's value, else its default. strict (evaluating or resuming that very checkpoint): a flag given with
    another value than the checkpoint's is a ConfigError naming both, instead of a state-dict size mismatch."""
    for key, default in defaults.items():
        given, stored = getattr(args, key, None), checkpoint_args.get(key)
        if given is None:
            setattr(args, key, stored if stored is not None else default)
        elif strict and stored is not None and given != stored:
            raise ConfigError(f"--{key} {given} disagrees with {source}, which was trained with --{key} {stored}; "
                              f"leave --{key} out to use the checkpoint's")


def describing_checkpoint(args):
    """(path, strict): the checkpoint whose flags fill the model flags a training command leaves out: --resume
    (strict), else <output_dir>/checkpoint.pth, which the command will continue if its run matches (not strict:
    the run-identity check reports differences), else None."""
    if getattr(args, "resume", None):
        return args.resume, True
    candidate = rolling_checkpoint(args)
    if candidate is not None and not getattr(args, "overwrite", False):
        return str(candidate), False
    return None, False


def rolling_checkpoint(args):
    """<output_dir>/checkpoint.pth when it exists (the run a restarted or requeued job continues), else None."""
    output_dir = getattr(args, "output_dir", None)
    candidate = Path(output_dir) / ROLLING_CHECKPOINT if output_dir else None
    return candidate if candidate is not None and candidate.is_file() else None


SET_ASIDE_PREFIX = "replaced_"


def set_aside_previous_run(output_dir: Path) -> Path:
    """--overwrite: move everything of the earlier run in `output_dir` into output_dir/replaced_<time>/ (rank 0)."""
    target = output_dir / f"{SET_ASIDE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    if not is_main_process():
        return target
    target.mkdir()
    for entry in sorted(output_dir.iterdir()):
        if entry != target and not entry.name.startswith((SET_ASIDE_PREFIX, ".")):
            entry.rename(target / entry.name)
    print(f"--overwrite: the earlier run in {output_dir} was moved to {target}")
    return target


def run_is_finished(args) -> bool:
    """True (and says so) when a resumed run has already trained its --epochs: nothing is trained again."""
    if args.start_epoch < args.epochs or getattr(args, "start_step", 0):
        return False
    print(f"{args.resume} holds a run that already finished its {args.start_epoch} epochs (--epochs {args.epochs}): "
          f"nothing to train. Pass a larger --epochs to continue it, --overwrite to start over in "
          f"{args.output_dir}, or another --output_dir.")
    return True


def _first_keys(keys) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - _KEYS_SHOWN} more)" if len(keys) > _KEYS_SHOWN else ""
    return ", ".join(keys[:_KEYS_SHOWN]) + more


def load_model_strict(model, state_dict: dict, path):
    """load_state_dict(strict=True), but mismatches raise a CheckpointError naming the file and the keys.

    Keys are compared before loading so that a mismatch leaves the model untouched.
    """
    model_keys, file_keys = set(model.state_dict()), set(state_dict)
    missing, unexpected = model_keys - file_keys, file_keys - model_keys
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({_first_keys(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_first_keys(unexpected)})")
        raise CheckpointError(f"checkpoint {path} does not match the model: {'; '.join(problems)}. "
                              "Was it written with another --arch or model options?")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # same keys, different shapes
        raise CheckpointError(f"checkpoint {path} does not match the model: {exc}") from exc


def resume(args, model_without_ddp, optimizer, loss_scaler) -> dict:
    """Restore model, and (unless args.eval) optimizer and loss scaler, from args.resume.

    After an end-of-epoch checkpoint: args.start_epoch = saved epoch + 1, args.start_step = 0. After a mid-epoch
    one: args.start_epoch = its epoch, args.start_step = the steps it had done (the engine continues with the next
    batch; "epoch_state" in the returned dict finishes the epoch's statistics). Returns the checkpoint dict
    (callers read extras such as max_accuracy from it), or {} when args.resume is empty.
    """
    args.start_step = 0
    path = getattr(args, "resume", None)
    if not path:
        return {}
    checkpoint = load_checkpoint(path)
    load_model_strict(model_without_ddp, checkpoint["model"], path)
    if not getattr(args, "eval", False):
        _load_training_state(checkpoint, optimizer, loss_scaler, path)
    if "epoch" in checkpoint:
        epoch, step = checkpoint["epoch"], checkpoint.get("step")
        saved_world = (checkpoint.get("args") or {}).get("world_size", getattr(args, "world_size", 1))
        if step is not None and saved_world != getattr(args, "world_size", 1):
            # an epoch's batches are dealt to the processes: with another count its rest would be other images
            print(f"note: {path} was written after step {step} of epoch {epoch} by {saved_world} processes and this "
                  f"run has {args.world_size}: epoch {epoch} starts over")
            checkpoint.pop("epoch_state", None)
            step = 0
        args.start_epoch = epoch if step is not None else epoch + 1
        args.start_step = int(step or 0)
    where = f"epoch {checkpoint.get('epoch', '?')}" + (f", after step {args.start_step}" if args.start_step else "")
    print(f"Resumed from {path} ({where})")
    return checkpoint


def _load_training_state(checkpoint: dict, optimizer, loss_scaler, path):
    """Optimizer and scaler state, when both the checkpoint and the caller have them."""
    if optimizer is not None and checkpoint.get("optimizer"):
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError) as exc:  # other parameter groups: another model or optimizer setup
            raise CheckpointError(f"optimizer state in {path} does not fit this optimizer: {exc}") from exc
    if loss_scaler is not None and checkpoint.get("scaler") is not None:
        loss_scaler.load_state_dict(checkpoint["scaler"])
