"""The project's own error types.

Each one means "the user's input cannot work" and carries a message that names the flag, file or value at fault
and what was expected. The scripts print such an error as one `error: ...` line and exit with code 2
(util.cli.run_tool); every other exception is a bug or an environment failure and keeps its traceback.
They also derive from ValueError, so code that validates input with `except ValueError` keeps working.
"""


class UserError(Exception):
    """Base of the errors that are reported as one line: bad flags, data, checkpoints or launches."""


class ConfigError(UserError, ValueError):
    """A flag or a combination of flags that cannot work (e.g. an unknown --arch, --mask_ratio 0.1)."""


class DataError(UserError, ValueError):
    """Bad data or data flags: a missing folder, an unreadable file, a wrong channel count, too few images."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable, of another run, or does not fit the model."""


class LaunchError(UserError, ValueError):
    """A launch that cannot work: launcher flags, the distributed environment, an unwritable output folder."""


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or infinite: the run stops and writes no checkpoint after it (the last good one
    is kept). Reported as one line with its own exit code (3): it is neither bad input nor a crash."""


class JobFailed(Exception):
    """A launched job ended badly (util.launch, --cluster local in the foreground): the message says which rank and
    how; the launcher exits with `exit_code`, the job's own."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
