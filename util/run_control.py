"""When a training run writes a mid-epoch checkpoint, and how it stops when the cluster asks it to.

Clusters stop jobs with signals: SLURM sends SIGTERM at preemption and the `--signal` of the job (SIGUSR1 here,
SIGUSR2 for submitit) before the time limit; torchrun forwards SIGTERM to its workers. Instead of dying where it
stands, the process records the signal, and at the next step boundary every rank agrees (the request travels with
the all-reduce of the loss window, so no extra collective is needed), rank 0 writes checkpoint.pth at that step,
and the run stops with `TrainingStopped`. A second signal of the same kind stops at once.

The same boundaries serve --save_every_steps N and --save_every_minutes M.
"""
import signal
import sys
import time

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")
                     if hasattr(signal, name))


class TrainingStopped(Exception):
    """The run stopped on a signal after writing its checkpoint; the same command resumes it.

    The scripts exit with 128 + the signal number (the shell's convention for 'ended by this signal'), so that a
    batch script can requeue on it.
    """

    def __init__(self, signum: int, checkpoint: str, epoch: int, step: int):
        self.signum, self.checkpoint, self.epoch, self.step = signum, checkpoint, epoch, step
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step} of epoch {epoch}; checkpoint written to {checkpoint}; "
                         f"run the same command again to continue from there")


class StopSignals:
    """Records stop signals instead of dying; install() / uninstall() around training (main thread only)."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = signals
        self.received = None  # the first signal number received, or None
        self._previous = {}

    def install(self):
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def uninstall(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum, frame):
        if self.received == signum:  # asked twice: stop now, as without this handler
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.received = self.received or signum
        # stderr.write, not print: print may be rank-filtered, and this runs between two bytecodes of anything
        sys.stderr.write(f"Received {signal.Signals(signum).name}: writing a checkpoint at the next step boundary, "
                         f"then stopping\n")


class SaveSchedule:
    """Mid-epoch checkpoints every `every_steps` training steps and/or every `every_minutes` minutes, and stops
    requested by signals. Steps are decided locally (identical on every rank); time and signals are local
    requests (`local_requests`) that the engine all-reduces at its next synchronisation point."""

    def __init__(self, every_steps: int = 0, every_minutes: float = 0.0, stop_signals: StopSignals = None):
        self.every_steps, self.every_minutes = every_steps or 0, every_minutes or 0.0
        self.stop_signals = stop_signals
        self.last_save = time.monotonic()

    def step_due(self, steps_done: int) -> bool:
        """A step-based save is due after `steps_done` steps of this epoch (the same answer on every rank)."""
        return self.every_steps > 0 and steps_done % self.every_steps == 0

    def local_requests(self) -> list:
        """[time-based save wanted, stop requested]: this process's requests (0 or 1), to be all-reduced.

        After the all-reduce a value above 0 means some rank asked: all ranks then save (and stop) together.
        """
        time_due = self.every_minutes > 0 and time.monotonic() - self.last_save >= 60.0 * self.every_minutes
        return [float(time_due), float(self.stop_signal() != 0)]

    def stop_signal(self) -> int:
        """The signal this process received (0 if none)."""
        received = self.stop_signals.received if self.stop_signals is not None else None
        return int(received or 0)

    def saved(self) -> None:
        self.last_save = time.monotonic()


class MidEpochCheckpoints:
    """What the engines do at a synchronisation point: write checkpoint.pth when a save is due or a stop was
    requested (by any rank), then stop on a request.

    save_fn(epoch, steps_done, epoch_state) writes the checkpoint (rank 0) and returns its path; epoch_state is
    what the engine needs to finish the epoch's statistics after a resume.
    """

    def __init__(self, schedule: SaveSchedule, save_fn):
        self.schedule, self.save_fn = schedule, save_fn

    def local_requests(self) -> list:
        return self.schedule.local_requests()

    def at_sync_point(self, epoch: int, steps_done: int, steps_per_epoch: int, reduced_requests: list,
                      epoch_state: dict) -> None:
        time_due, stop_requested = (value > 0 for value in reduced_requests)
        step_due = self.schedule.step_due(steps_done) and steps_done < steps_per_epoch  # the epoch end saves anyway
        if not (step_due or time_due or stop_requested):
            return
        path = self.save_fn(epoch, steps_done, epoch_state)
        self.schedule.saved()
        print(f"Wrote {path} at epoch {epoch}, after step {steps_done} of {steps_per_epoch}")
        if stop_requested:  # some rank got the signal: all stop here, at the same step
            raise TrainingStopped(self.schedule.stop_signal() or int(signal.SIGTERM), str(path), epoch, steps_done)


def is_sync_point(step: int, steps_per_epoch: int, accum_iter: int, print_freq: int,
                  schedule: SaveSchedule = None) -> bool:
    """Steps after which the engines read their loss window back (one all-reduce, one host sync) and may write a
    mid-epoch checkpoint: every --print_freq optimizer steps from the first one, the epoch's last step, and the
    steps after which --save_every_steps is due. Always at an optimizer-step boundary, so that a checkpoint never
    holds half an accumulation."""
    steps_done = step + 1
    if steps_done % accum_iter and steps_done != steps_per_epoch:
        return False
    optimizer_step = step // accum_iter
    return (optimizer_step % print_freq == 0 or steps_done == steps_per_epoch
            or (schedule is not None and schedule.step_due(steps_done)))
