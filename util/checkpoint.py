"""Training checkpoints: atomic writes, weights_only-loadable contents, clear errors, and resume."""
import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from util.errors import CheckpointError
from util.misc import is_main_process

ROLLING_CHECKPOINT = "checkpoint.pth"
_KEYS_SHOWN = 5  # how many mismatched state-dict keys an error message lists


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------
def to_plain(value):
    """A value torch.load(weights_only=True) accepts: Path -> str, tuple -> list, numpy scalar -> number,
    containers converted recursively, any other object -> its str."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes the file private; a checkpoint is ordinarily shared
        os.replace(tmp_name, path)  # atomic on POSIX and Windows within one filesystem
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def checkpoint_filename(name=None) -> str:
    """None -> checkpoint.pth; an epoch number -> checkpoint-<n>.pth; another name -> <name>.pth."""
    if name is None:
        return ROLLING_CHECKPOINT
    name = str(name)
    if name.isdigit():
        return f"checkpoint-{name}.pth"
    return name if name.endswith(".pth") else f"{name}.pth"


def save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, name=None, extra=None):
    """Write model, optimizer, scaler, epoch and args (plus `extra`) to <args.output_dir>/<checkpoint_filename(name)>.

    Only the main process writes (no barrier: the other ranks simply go on). Returns the file's path.
    """
    state = {
        "model": model_without_ddp.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": loss_scaler.state_dict() if loss_scaler is not None else None,
        "epoch": int(epoch),
        "args": args_to_dict(args),
    }
    # numpy scalars (e.g. an accuracy) would make the file need weights_only=False
    state.update({k: v.item() if isinstance(v, np.generic) else v for k, v in (extra or {}).items()})
    path = Path(args.output_dir) / checkpoint_filename(name)
    save_checkpoint(path, state)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------
def _short_reason(exc: Exception) -> str:
    """One line from torch.load's error: its weights_only messages are paragraphs with the cause near the end."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
        reason = " ".join(text.split(" Please use ", 1)[0].split())
        if "Unsupported global" in reason:
            return f"it holds objects other than tensors and plain python values ({reason})"
        return f"not a valid torch file, or corrupt ({reason})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def torch_load(path, map_location="cpu"):
    """torch.load(weights_only=True), with the argparse Namespace the reference code stored allowed (nothing else);
    CheckpointError naming the file when it cannot be read (torch raises several types for truncated/foreign files)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
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


def find_resume_checkpoint(args):
    """Without --resume, pick up <output_dir>/checkpoint.pth if it exists (a restarted or requeued job).

    Sets args.resume and returns it (None when there is nothing to resume).
    """
    if getattr(args, "resume", None):
        return args.resume
    output_dir = getattr(args, "output_dir", None)
    candidate = Path(output_dir) / ROLLING_CHECKPOINT if output_dir else None
    if candidate is not None and candidate.is_file():
        args.resume = str(candidate)
        print(f"Auto-resuming from {candidate}")
    return getattr(args, "resume", None) or None


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

    Sets args.start_epoch = saved epoch + 1. Returns the checkpoint dict (callers read extras such as
    max_accuracy from it), or {} when args.resume is empty.
    """
    path = getattr(args, "resume", None)
    if not path:
        return {}
    checkpoint = load_checkpoint(path)
    load_model_strict(model_without_ddp, checkpoint["model"], path)
    if not getattr(args, "eval", False):
        _load_training_state(checkpoint, optimizer, loss_scaler, path)
    if "epoch" in checkpoint:
        args.start_epoch = checkpoint["epoch"] + 1
    print(f"Resumed from {path} (epoch {checkpoint.get('epoch', '?')})")
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
