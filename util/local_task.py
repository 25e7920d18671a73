"""One task of a `--cluster local` job, run through this wrapper so that the launcher learns how each task ended.

submitit's local controller starts every task and only looks at the exit codes to decide on a requeue; it records
neither the code nor the signal that ended a task. This wrapper runs the task's command as its child, forwards the
signals a cluster would send, and writes <submitit folder>/<job id>_<task>_exit.json: the exit code, the signal
that killed the task (the kernel's out-of-memory killer sends SIGKILL) and the task's peak resident memory, which
the kernel reports even for a killed process. util.launch reads it to report the job in the foreground.

    python -m util.local_task <python> -u -m submitit.core._submit <folder>
"""
import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT)
PR_SET_PDEATHSIG = 1


def exit_file(folder, job_id, task) -> Path:
    return Path(folder) / f"{job_id}_{task}_exit.json"


def die_with_parent() -> None:
    """In the child: SIGKILL when this wrapper dies, so that a killed wrapper never leaves a training run behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the controller's own clean-up still applies
        pass


def main(command) -> int:
    child = subprocess.Popen(command, preexec_fn=die_with_parent)
    for signum in FORWARDED:
        signal.signal(signum, lambda received, frame: child.send_signal(received))
    _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)  # -N: killed by signal N
    record = {"exit_code": code, "signal": signal.Signals(-code).name if code < 0 else None,
              "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3)}  # ru_maxrss is in KiB on Linux
    folder, job_id, task = command[-1], os.environ.get("SUBMITIT_LOCAL_JOB_ID"), os.environ.get("SUBMITIT_LOCAL_GLOBALID")
    if job_id is not None and task is not None:
        path = exit_file(folder, job_id, task)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
