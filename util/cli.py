"""What every script shares on the command line: its error line and exit code, and argparse helpers.

Exit codes of all scripts:
    0  success
    1  a crash (a bug or an environment failure): the full traceback is printed
    2  bad input (a flag, file, checkpoint or launch the project's own checks refused): one `error: ...` line
    3  training diverged (a NaN or infinite loss): one `error: ...` line; the last good checkpoint is kept
    128 + N  stopped by signal N (SIGTERM, SIGUSR1, ... from SLURM or torchrun) after writing checkpoint.pth at
       the current step: one `stopped: ...` line; the same command continues the run
"""
import argparse
import re
import sys

from util.errors import JobFailed, NonFiniteLossError, UserError
from util.run_control import TrainingStopped

EXIT_OK, EXIT_CRASH, EXIT_USER_ERROR, EXIT_DIVERGED = 0, 1, 2, 3

_WORKER_MARKER = "in DataLoader worker process"
_EXCEPTION_LINE = re.compile(r"([A-Za-z_][\w.]*)(?:: (.*))?$")


def error_line(exc: BaseException) -> str:
    """One clean line for a UserError or NonFiniteLossError: its message, without the type name (the message says
    what is wrong); 'Type: message' for anything else. A UserError written as several lines (a list of bad files)
    keeps them, each continuation indented by two spaces.

    A DataLoader worker re-raises the original exception type with a message holding the whole worker
    traceback ("Caught X in DataLoader worker process N. Original Traceback ..."): the original message is
    taken from it.
    """
    name, message = type(exc).__name__, str(exc)
    from_worker = _WORKER_MARKER in message
    if from_worker:
        name, message = _original_exception(message)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if isinstance(exc, UserError) and not from_worker and len(lines) > 1:
        # a message written as several lines (util.filelist's list of bad files, one per line) keeps them
        return "\n  ".join(lines)
    message = " ".join(lines)
    if isinstance(exc, (UserError, NonFiniteLossError)):
        return message or name
    return f"{name}: {message}" if message else name


def _original_exception(worker_message: str):
    """(type name, message) of the last exception in a worker's traceback text."""
    last = worker_message.rsplit("Traceback (most recent call last):", 1)[-1]
    lines = [line for line in last.splitlines() if line.strip()]
    tail = [line for line in lines if not line[0].isspace()]  # frame lines are indented; the exception is not
    if not tail:
        return "Error", worker_message
    match = _EXCEPTION_LINE.match(tail[0])
    if not match:
        return "Error", "\n".join(tail)
    message = "\n".join([match.group(2) or ""] + tail[1:])
    return match.group(1).rsplit(".", 1)[-1], message


def run_tool(main, args) -> int:
    """main(args) for a command-line script; returns its exit code (see the module docstring) and leaves the
    process group either way.

    Only the project's own errors (util.errors) become one line; anything else propagates with its traceback
    (Python then exits with 1).
    """
    try:
        main(args)
    except UserError as exc:
        sys.stderr.write(f"error: {error_line(exc)}\n")  # plain write: print() may be rank-filtered
        return EXIT_USER_ERROR
    except NonFiniteLossError as exc:
        sys.stderr.write(f"error: {error_line(exc)}\n")
        return EXIT_DIVERGED
    except TrainingStopped as stop:
        sys.stderr.write(f"stopped: {stop}\n")
        return 128 + stop.signum
    except JobFailed as failed:  # a launched job's own exit status (util.launch)
        sys.stderr.write(f"error: {failed}\n")
        return failed.exit_code
    finally:
        # only a script that loaded util.misc can have joined a process group; importing it here would load torch
        # into tools that never need it (prepare_cells.py)
        misc = sys.modules.get("util.misc")
        if misc is not None:
            misc.cleanup_distributed()
    return EXIT_OK


def add_bool_flag(parser, name, default, help=None):
    """`--name` / `--no_name` (MAE's spelling; `--no-name` is accepted too) for a switch that defaults to `default`."""
    parser.add_argument(f"--{name}", dest=name, action="store_true", help=help)
    parser.add_argument(f"--no_{name}", f"--no-{name}", dest=name, action="store_false",
                        help=f"turn --{name} off (default: {'on' if default else 'off'})")
    parser.set_defaults(**{name: default})
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default, unless its help already says what the default is or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class DescribedHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """HelpFormatter that keeps a script's description (its docstring with example commands) as written."""


class CommandLineParser(argparse.ArgumentParser):
    """argparse for the scripts: defaults in --help, and a mistake in the flags is one `error: ...` line and exit
    code 2, like every other user error (instead of argparse's usage dump)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def make_parser(description: str, parents=(), **kwargs) -> CommandLineParser:
    """The top-level parser of a script, on top of its get_args_parser() (which submitit launchers reuse)."""
    return CommandLineParser(description=description, parents=list(parents), **kwargs)
