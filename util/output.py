"""Output folders and files: folders created and test-written before any work starts and held by one run at a
time; files written atomically (atomic_file).

An output folder that cannot be written must fail at start with one line naming the flag (not two hours later,
or as a page of TensorBoard-thread tracebacks), and two processes that each believe they are rank 0 of their own
run (two copies of one command, or `srun -n 4 python main_pretrain.py` before it learnt to form one job) must not
write the same checkpoint.pth and log.txt.
"""
import fcntl
import os
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from util.errors import LaunchError

LOCK_NAME = ".run.lock"


@contextmanager
def atomic_file(path, durable: bool = False):
    """A binary file to write `path` through: a temporary file in the same folder, renamed over `path` when the
    block ends without an exception (removed otherwise), so a crash or a full disk leaves the previous file or the
    new one, never a truncated one. durable: the data and the new name are flushed to disk too (checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes the file private; outputs are ordinarily shared
        os.replace(tmp_name, path)  # atomic on POSIX and Windows within one filesystem
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(folder) -> None:
    """Flush a folder's entries to disk: after a rename, a node crash could otherwise lose the new name (and with
    it the new checkpoint) although the file's data was already written."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a file system that cannot open folders: nothing more can be done
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prepare_output_dir(path, flag: str = "--output_dir") -> Path:
    """Create `path` (and its parents) and check that a file can be written in it; LaunchError naming `flag`."""
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise LaunchError(f"{flag} {path}: cannot create or write this folder ({reason}); "
                          f"choose a writable {flag}") from None
    return folder


@contextmanager
def exclusive_output_dir(path, enabled: bool = True, flag: str = "--output_dir"):
    """Hold an exclusive lock on `path` for the duration of the block (the main process of a run only: the other
    ranks pass enabled=False). A folder held by another live process is a LaunchError naming it; the lock goes
    with the process, so a killed or requeued run never leaves a stale one behind."""
    if not enabled:
        yield
        return
    lock_path = Path(path) / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise LaunchError(f"{flag} {path} is in use by another run ({holder}); wait for it to end, or use "
                              f"another {flag}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
