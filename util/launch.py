"""Shared submitit launcher behind submitit_pretrain.py and submitit_finetune.py (MAE's submitit scripts).

One process per GPU (tasks_per_node = --ngpus) on --nodes nodes of a SLURM cluster, or the same job as local
subprocesses (--cluster local) or inside this process (--cluster debug). Each task exports the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) so that util.misc.init_distributed_mode
sets up DDP exactly as under torchrun. On preemption or timeout, submitit calls Trainer.checkpoint(), which
resubmits the job so that it resumes from <job_dir>/checkpoint.pth.
"""
import copy
import importlib
import json
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import submitit
import torch

import util.misc as misc
from util import local_task
from util.checkpoint import rolling_checkpoint
from util.cli import add_bool_flag, error_line, make_parser
from util.errors import JobFailed, LaunchError, UserError
from util.output import prepare_output_dir
from util.run_control import TrainingStopped

CLUSTERS = ("slurm", "local", "debug")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JOB_DIR = "job_dir/%j"  # under the current directory; %j becomes the job id
SIGNAL_DELAY_S = 120  # SLURM warns the job this long before its time limit: time to stop and requeue
# Variables that select the env:// branch of init_distributed_mode; a one-task job must not inherit them.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def resolve_cluster(args) -> None:
    """--cluster left out: SLURM when this machine can submit to it, else a clear stop (a job that silently ran on
    the login node's CPU instead would be no answer); --cluster slurm needs sbatch and srun."""
    missing = [tool for tool in ("sbatch", "srun") if not shutil.which(tool)]
    if args.cluster is None:
        if missing:
            raise LaunchError("there is no SLURM on this machine (no sbatch on PATH); run the job here with "
                              "--cluster local (one process per --ngpus, in the foreground) or --cluster debug (in "
                              "this process), or launch from a SLURM login node")
        args.cluster = "slurm"
    elif args.cluster == "slurm" and missing:
        raise LaunchError(f"--cluster slurm needs SLURM's {' and '.join(missing)} on PATH, and this machine has "
                          f"none; use --cluster local or --cluster debug here")


def add_launcher_args(parser):
    """The SLURM/submitit flags, added to a parser that already has the training script's flags."""
    group = parser.add_argument_group("submitit launcher")
    group.add_argument("--ngpus", default=8, type=int,
                       help="processes per node: one per GPU (with --device cpu, CPU processes)")
    group.add_argument("--nodes", default=1, type=int, help="number of nodes")
    group.add_argument("--timeout", default=4320, type=int, help="time limit of one job, in minutes")
    group.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    group.add_argument("--job_dir", default="", help="checkpoints, log.txt and submitit logs; '%%j' is replaced "
                                                     "by the job id (default: ./job_dir/%%j)")
    group.add_argument("--comment", default="", help="SLURM job comment")
    group.add_argument("--mem_per_gpu", default=10, type=int, help="host memory per process, in GB")
    group.add_argument("--cpus_per_task", default=None, type=int,
                       help="CPUs per process (default: --num_workers + 1, the loader workers and the trainer)")
    group.add_argument("--constraint", default=None, help="SLURM --constraint (node features)")
    group.add_argument("--use_volta32", action="store_true", help="compat: adds the constraint volta32gb")
    group.add_argument("--account", default=None, help="SLURM --account")
    group.add_argument("--qos", default=None, help="SLURM --qos")
    group.add_argument("--exclude", default=None, help="SLURM --exclude (nodes to avoid)")
    group.add_argument("--cluster", default=None, choices=CLUSTERS,
                       help="slurm: sbatch; local: one subprocess per --ngpus on this machine, followed in the "
                            "foreground; debug: in this process (default: slurm, which needs sbatch and srun)")
    group.add_argument("--detach", action="store_true",
                       help="--cluster local: return right after submitting instead of following the job")
    add_bool_flag(group, "preflight", True,
                  help="run the job's start-up checks (flags, data, checkpoints, output folder) here before "
                       "submitting (default on; --no_preflight when this machine cannot see the job's files)")
    group.add_argument("--slurm_max_num_timeout", default=30, type=int,
                       help="how many times a timed-out job may requeue itself")
    group.add_argument("--job_name", default="dama", help="SLURM job name")
    group.add_argument("--dry_run", action="store_true", help="print the job's parameters and exit (no checks)")
    # The training scripts pick cuda only when this machine has a GPU; a SLURM login node often has none.
    parser.set_defaults(device=None)
    return parser


def parse_args(training_parser, description, argv=None):
    """Parse the training script's flags plus the launcher's (a mistake in them is one `error:` line, exit 2)."""
    parser = make_parser(description, parents=[training_parser])
    add_launcher_args(parser)
    return parser.parse_args(argv)


def resolve_launch_args(args):
    """Fill the launcher defaults that depend on other flags, and reject what cannot run (LaunchError)."""
    resolve_cluster(args)
    if args.device is None:
        args.device = "cuda" if args.cluster == "slurm" or torch.cuda.is_available() else "cpu"
    args.job_dir = str(Path(args.job_dir or DEFAULT_JOB_DIR).expanduser().absolute())
    if args.cpus_per_task is None:  # the loader workers and the trainer; 10 workers when the job picks them
        args.cpus_per_task = (args.num_workers if args.num_workers is not None else 10) + 1
    for flag in ("ngpus", "nodes", "timeout", "mem_per_gpu", "cpus_per_task"):
        if getattr(args, flag) < 1:
            raise LaunchError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.cluster != "slurm" and args.nodes != 1:
        raise LaunchError(f"--nodes {args.nodes}: --cluster {args.cluster} runs on this one machine; "
                          f"use --nodes 1 or --cluster slurm")
    if args.cluster == "debug" and args.ngpus != 1:
        raise LaunchError(f"--ngpus {args.ngpus}: --cluster debug runs one process (this one); use --ngpus 1")
    if args.cluster != "slurm" and uses_gpus(args) and args.ngpus > torch.cuda.device_count():
        raise LaunchError(f"--ngpus {args.ngpus} with --device {args.device}, but this machine has "
                          f"{torch.cuda.device_count()} GPUs; lower --ngpus or use --device cpu")
    return args


def uses_gpus(args) -> bool:
    return str(args.device).startswith("cuda")


def slurm_constraint(args):
    """--constraint and the --use_volta32 shortcut, joined with SLURM's AND."""
    parts = [c for c in (args.constraint, "volta32gb" if args.use_volta32 else None) if c]
    return "&".join(parts) or None


def executor_parameters(args) -> dict:
    """Keyword arguments of AutoExecutor.update_parameters for this job (generic names plus slurm_* ones)."""
    params = dict(
        name=args.job_name,
        timeout_min=args.timeout,
        nodes=args.nodes,
        tasks_per_node=args.ngpus,  # one process per GPU
        gpus_per_node=args.ngpus if uses_gpus(args) else 0,  # a CPU job must not ask SLURM for GPUs
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_per_gpu * args.ngpus,
        slurm_signal_delay_s=SIGNAL_DELAY_S,
        # the job imports util.launch and the training module from this repository, wherever it starts
        slurm_setup=[f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"],
    )
    optional = dict(slurm_partition=args.partition, slurm_comment=args.comment or None,
                    slurm_constraint=slurm_constraint(args), slurm_account=args.account, slurm_qos=args.qos,
                    slurm_exclude=args.exclude)
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def submitit_folder(args) -> str:
    """Where submitit keeps its pickles and the per-task stdout/stderr logs."""
    return str(Path(args.job_dir) / "submitit")


def build_executor(args):
    # Local jobs inherit this environment (and SLURM exports it by default): the job can import our modules.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    # local tasks run through util.local_task, which records how each one ended (exit code, signal, peak memory)
    python = shlex.quote(sys.executable)
    executor = submitit.AutoExecutor(folder=submitit_folder(args), cluster=args.cluster,
                                     slurm_max_num_timeout=args.slurm_max_num_timeout,
                                     local_max_num_timeout=args.slurm_max_num_timeout,
                                     local_python=f"{python} -m util.local_task {python}")
    executor.update_parameters(**executor_parameters(args))
    return executor


def make_job_dir(args):
    """Create --job_dir now and check it can be written; with %j, the folder that will hold it (the job creates its
    own once its id is known)."""
    if "%j" in args.job_dir:
        folder = Path(args.job_dir.split("%j", 1)[0] + "x").parent  # job_dir/%j -> job_dir, runs/a-%j -> runs
    else:
        folder = Path(args.job_dir)
    prepare_output_dir(folder, "--job_dir")


def limit_cpu_threads(tasks_per_node: int):
    """Share this node's CPUs among its tasks, as torchrun does (unless OMP_NUM_THREADS says otherwise).

    Without it every task starts one compute thread per CPU: in a local two-task CPU job on a busy 2-core
    machine the oversubscribed threads spun against each other and a step took 14 s instead of 0.45 s.
    """
    if tasks_per_node <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    if "SLURM_CPUS_PER_TASK" in os.environ:  # SLURM already gave each task its own --cpus_per_task CPUs
        threads = int(os.environ["SLURM_CPUS_PER_TASK"])
    else:
        threads = len(os.sched_getaffinity(0)) // tasks_per_node
    torch.set_num_threads(max(1, threads))


def add_new_flag_defaults(args, training_parser):
    """Give flags that the training script gained after submission their defaults.

    A job (and every requeue of it) runs the code as it is when it starts, with the flags parsed at submission:
    a flag added in between would otherwise be missing from args.
    """
    for name, value in vars(training_parser.parse_known_args([])[0]).items():
        if not hasattr(args, name):
            setattr(args, name, value)


class Trainer:
    """The submitted callable: runs `<main_module>.main(args)` in every task; requeues itself when stopped.

    Picklable (plain args namespace and a module name); the training module is imported inside the job.
    """

    def __init__(self, args, main_module: str):
        self.args = args
        self.main_module = main_module

    def __call__(self):
        job_env = submitit.JobEnvironment()
        self._setup_job(job_env)
        # main() fills in args (rank, device, lr, start_epoch, ...): give it a copy so that a requeue starts
        # from the user's flags, not from this run's derived values.
        args = copy.deepcopy(self.args)
        module = importlib.import_module(self.main_module)
        add_new_flag_defaults(args, module.get_args_parser())
        try:
            return module.main(args)
        except UserError as exc:
            # the one line the scripts print, first in the task's log (the launcher reports it); the traceback
            # follows in submitit's result
            sys.stderr.write(f"error: {error_line(exc)}\n")
            sys.stderr.flush()
            raise
        except TrainingStopped as stop:
            # The run has written checkpoint.pth at the step where the preemption (or time-limit) signal reached
            # it; now submitit's own handler requeues the job from rank 0 (calling self.checkpoint()) and exits.
            sys.stdout.write(f"{stop}\n")
            sys.stdout.flush()
            requeue_after_stop()
            return None
        finally:
            misc.cleanup_distributed()

    def _setup_job(self, job_env):
        """Output folders with the job id, and the torchrun environment for init_distributed_mode."""
        job_id = str(job_env.job_id)
        self.args.output_dir = self.args.job_dir.replace("%j", job_id)
        self.args.log_dir = (self.args.log_dir or self.args.output_dir).replace("%j", job_id)
        Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
        if job_env.num_tasks > 1:
            # CUDA_VISIBLE_DEVICES stays as SLURM/submitit set it (all GPUs of the node): init_distributed_mode
            # picks cuda:<local_rank> among them. overwrite: the job's own ranks win over inherited variables.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        else:
            for name in TORCHRUN_VARS:  # e.g. submitted from inside a torchrun process: stay single-process
                os.environ.pop(name, None)
        limit_cpu_threads(job_env.num_tasks // job_env.num_nodes)
        print(f"submitit job {job_id}, task {job_env.global_rank}/{job_env.num_tasks} on {job_env.hostname} "
              f"(pid {os.getpid()}); output_dir {self.args.output_dir}", flush=True)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption/timeout (rank 0): resubmit, resuming from the rolling checkpoint.

        Training writes <output_dir>/checkpoint.pth at the step the signal reached it (and after every epoch), so
        the requeued job continues with the next step.
        """
        checkpoint = rolling_checkpoint(self.args)
        if checkpoint is not None:
            self.args.resume = str(checkpoint)
        print(f"Requeuing job; it will resume from {self.args.resume or 'the start (no checkpoint yet)'}",
              flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(self.args, self.main_module))


def requeue_after_stop() -> None:
    """Call the handler submitit installed for its preemption signal, as if the signal had just arrived: on rank 0
    it checkpoints this Trainer (resuming from checkpoint.pth), requeues the job and exits; other ranks return."""
    signum = submitit.JobEnvironment._usr_sig()
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, None)


def describe(args, executor_params: dict) -> str:
    lines = [f"cluster: {args.cluster}", f"job_dir: {args.job_dir}", f"device: {args.device}"]
    lines += [f"{k}: {v}" for k, v in sorted(executor_params.items())]
    return "\n".join(lines)


def run_preflight(args, main_module: str) -> None:
    """The training script's start-up checks (`<main_module>.preflight`), in this process, before submitting: a
    mistake that would stop the job after it waited in the queue stops the launcher now, with the job's own
    error line. The checks see the job's folder when it is known now (--job_dir without %j)."""
    checks = copy.deepcopy(args)
    checks.output_dir = None if "%j" in args.job_dir else args.job_dir
    checks.log_dir = None
    world_size = args.nodes * args.ngpus
    print(f"Pre-flight checks in this process for a job of {world_size} processes (--no_preflight skips them)",
          flush=True)
    importlib.import_module(main_module).preflight(checks, world_size)


def submit(args, main_module: str):
    """Check, submit and, with --cluster local (unless --detach), follow the training job; returns the submitit Job
    (None for --dry_run).

    --cluster debug runs the job here and now (job.result()); SLURM jobs (and local ones with --detach) run on in
    the background. Raises LaunchError / DataError / CheckpointError for what cannot work, before submitting, and
    JobFailed when a followed job failed.
    """
    resolve_launch_args(args)
    params = executor_parameters(args)
    if args.dry_run:
        print(describe(args, params))
        return None
    make_job_dir(args)
    if args.preflight:
        run_preflight(args, main_module)
    executor = build_executor(args)
    job = executor.submit(Trainer(args, main_module))
    print(f"Submitted job_id: {job.job_id} ({args.cluster}: {args.nodes} node(s) x {args.ngpus} processes, "
          f"device {args.device})", flush=True)
    print(f"Output (checkpoints, log.txt): {args.job_dir.replace('%j', str(job.job_id))}", flush=True)
    print(f"Job logs: {job.paths.stdout} and {job.paths.stderr}", flush=True)
    if args.cluster == "debug":
        job.result()  # the debug executor only runs the job when its result is asked for
    elif args.cluster == "local" and not args.detach:
        follow_local_job(job, args.ngpus)
    return job


def follow_local_job(job, num_tasks: int, poll_s: float = 0.5) -> None:
    """Stream rank 0's output until the job ends, then say how it ended; JobFailed naming every rank that failed.

    Ctrl-C cancels the job (SIGINT to every task); running the same command again resumes from the last
    checkpoint.pth it wrote (an epoch end or a --save_every_* save).
    """
    print("Following the job here (Ctrl-C cancels it; --detach returns at once). Rank 0:",
          flush=True)
    stdout, position = job.task(0).paths.stdout, 0
    try:
        while not job.done():
            position = copy_new_output(stdout, position)
            time.sleep(poll_s)
    except KeyboardInterrupt:
        job.cancel()  # SIGINT to the controller, which forwards it to every task
        while not job.done():
            time.sleep(poll_s)
    copy_new_output(stdout, position)
    failures = [(rank, outcome) for rank, outcome in enumerate(task_outcomes(job, num_tasks)) if outcome]
    if not failures:
        print(f"Job {job.job_id} finished: all {num_tasks} processes ended with exit status 0", flush=True)
        return
    for rank, (message, _) in failures:
        sys.stderr.write(f"rank {rank}: {message}\n")
    rank, (message, exit_code) = root_failure(failures)
    raise JobFailed(f"job {job.job_id} failed: rank {rank} {message} (logs: {job.task(rank).paths.stderr})",
                    exit_code)


def copy_new_output(path: Path, position: int) -> int:
    """Print what a log file gained since `position`; returns the new position."""
    if not path.is_file():
        return position
    with open(path, "rb") as log:
        log.seek(position)
        data = log.read()
    if data:
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()
    return position + len(data)


def task_outcomes(job, num_tasks: int) -> list:
    """Per rank: None when it ended with exit status 0, else (what happened, its exit status), from the record
    util.local_task wrote and the task's own error line."""
    outcomes = []
    for rank in range(num_tasks):
        paths = job.task(rank).paths
        record_path = local_task.exit_file(paths.folder, job.job_id, rank)
        if not record_path.is_file():
            outcomes.append(("ended without an exit record (its wrapper was killed?)", 1))
            continue
        record = json.loads(record_path.read_text())
        code = record["exit_code"]
        if code == 0:
            outcomes.append(None)
        elif record["signal"]:
            hint = " (the signal the kernel's out-of-memory killer sends)" if record["signal"] == "SIGKILL" else ""
            outcomes.append((f"was killed by {record['signal']}{hint}; its peak memory was "
                             f"{record['peak_rss_gib']:.2f} GiB", 128 - code))
        else:
            outcomes.append((f"exited with status {code}: {first_error_line(paths.stderr)}", code))
    return outcomes


def first_error_line(stderr_path: Path) -> str:
    """A failed task's `error: ...` line (the project's own errors), else the last line of its traceback."""
    lines = stderr_path.read_text(errors="replace").splitlines() if stderr_path.is_file() else []
    own = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    if own:
        return own[0]
    tail = [line.strip() for line in lines if line.strip() and not line.startswith((" ", "submitit "))]
    return tail[-1] if tail else "(no error message in its log)"


# Words of the errors a rank reports when another rank of the job died first: not the cause
_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL", "gloo")


def root_failure(failures: list):
    """The failure that explains the others: a rank killed by a signal or with the project's own error line,
    before ranks that only lost their peers."""
    def rank_of(item):
        message = item[1][0]
        return (0 if "killed by" in message else 1 if not any(w in message for w in _PEER_FAILURE) else 2, item[0])
    return min(failures, key=rank_of)
