"""Multi-process training on the CPU (gloo): torchrun runs, DDP gradient equivalence, submitit jobs and requeue.

Every test starts real processes. This file is also the DDP worker of test_ddp_step_matches_single_process_step:
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_distributed.py --grad-worker OUT
"""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as the worker script, tests/ would be first on the path

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import models_dama  # noqa: E402

TIMEOUT_S = 300  # per process; generous: the machine is shared, the work is tiny
# ViT-T encoder with a small decoder: the reference decoder (512 x 8) would make each CPU step ~10x slower.
TINY_PRETRAIN = ["--dataset", "synthetic", "--device", "cpu", "--arch", "main_vit_tiny", "--img_size", "32",
                 "--patch_size", "8", "--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2",
                 "--batch_size", "4", "--num_workers", "0"]
TINY_FINETUNE = ["--dataset", "synthetic", "--device", "cpu", "--arch", "main_vit_tiny", "--img_size", "32",
                 "--patch_size", "8", "--batch_size", "4", "--synthetic_size", "32", "--num_workers", "0",
                 "--epochs", "1", "--warmup_epochs", "0"]


def torchrun(*args) -> list:
    # --standalone: a private rendezvous on a free port, so concurrent test runs do not collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def log_lines(output_dir) -> list:
    return [json.loads(line) for line in (Path(output_dir) / "log.txt").read_text().splitlines()]


def load_checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------
# torchrun
# ------------------------------------------------------------------------------------------------
def assert_two_ranks_one_writer(result, output_dir):
    """Both ranks joined the gloo group; only rank 0 wrote TensorBoard events."""
    for rank in (0, 1):
        assert f"distributed init (rank {rank}/2): gloo" in result.stdout + result.stderr
    assert len(list(Path(output_dir).glob("events.out.tfevents.*"))) == 1


def test_torchrun_pretrain_two_ranks_writes_one_log_and_checkpoint(tmp_path):
    out = tmp_path / "pretrain"
    result = run(torchrun("main_pretrain.py", *TINY_PRETRAIN, "--synthetic_size", "32", "--epochs", "1",
                          "--output_dir", out))
    assert_two_ranks_one_writer(result, out)
    (line,) = log_lines(out)  # rank 1 appended nothing
    assert line["epoch"] == 0 and line["train_loss"] > 0
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["epoch"] == 0 and checkpoint["args"]["world_size"] == 2
    # lr = blr * batch_size * world_size / 256: the effective batch counts both ranks
    assert checkpoint["args"]["lr"] == pytest.approx(1.5e-4 * 4 * 2 / 256)


def test_torchrun_finetune_two_ranks_dist_eval(tmp_path):
    out = tmp_path / "finetune"
    result = run(torchrun("main_finetune.py", *TINY_FINETUNE, "--dist_eval", "--output_dir", out))
    assert_two_ranks_one_writer(result, out)
    # 8 synthetic val images, sharded over 2 ranks and summed back: each image counted once
    assert "(n=8)" in result.stdout
    epoch_line, final_line = log_lines(out)
    assert epoch_line["epoch"] == 0 and 0 <= epoch_line["test_acc1"] <= 100
    assert final_line == {"max_accuracy": epoch_line["test_acc1"], "selected_on": "val"}
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 0


# ------------------------------------------------------------------------------------------------
# One DDP step against one single-process step on the concatenated batch
# ------------------------------------------------------------------------------------------------
PER_RANK, WORLD = 3, 2  # images per rank, ranks


def tiny_dama(info_reduction: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights in every process
    return models_dama.DAMA(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, last_k_blocks=2,
                            info_reduction=info_reduction)


def full_batch():
    """Images [6, 3, 16, 16] and three noise draws [6, 16] for the masking, identical in every process."""
    generator = torch.Generator().manual_seed(1)
    imgs = torch.rand(PER_RANK * WORLD, 3, 16, 16, generator=generator)
    noise = [torch.rand(PER_RANK * WORLD, 16, generator=generator) for _ in range(3)]
    return imgs, noise


@contextlib.contextmanager
def fixed_mask_noise(noise, rows):
    """torch.rand inside the model returns `rows` of the pre-drawn noise, in call order: a rank's images get
    exactly the masks that the single process draws for the same images."""
    draws, real_rand = iter(noise), torch.rand

    def rand(*size, **kwargs):
        return next(draws)[rows].clone()

    torch.rand = rand
    try:
        yield
    finally:
        torch.rand = real_rand


def one_step(model, imgs, noise, rows, loss_fn):
    """Forward on imgs[rows], backward of loss_fn(out), one SGD step: (grads, params after the step).

    SGD, not AdamW: Adam's first step is lr * g / (|g| + eps), which turns rounding noise on gradients that are
    zero in exact arithmetic (e.g. the attention key bias) into full +-lr steps.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with fixed_mask_noise(noise, rows):
        out = model(imgs[rows])
    loss_fn(out).backward()
    named = dict(getattr(model, "module", model).named_parameters())
    grads = {n: p.grad.clone() for n, p in named.items() if p.grad is not None}
    optimizer.step()
    return grads, {n: p.detach().clone() for n, p in named.items()}


def grad_worker(out_dir):
    """Rank r takes images [3r, 3r+3): one DDP step per info reduction; rank 0 saves grads and new weights."""
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    imgs, noise = full_batch()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for reduction in ("sum", "mean"):
        model = torch.nn.parallel.DistributedDataParallel(tiny_dama(reduction), find_unused_parameters=False)
        grads, params = one_step(model, imgs, noise, rows, lambda out: out["loss"])
        if rank == 0:
            torch.save({"grads": grads, "params": params}, Path(out_dir) / f"ddp_{reduction}.pt")
    torch.distributed.destroy_process_group()


def single_process_reference(reduction, info_scale):
    """The whole batch in one process: loss = recon1 + recon2 + info_scale * info."""
    imgs, noise = full_batch()
    return one_step(tiny_dama(reduction), imgs, noise, slice(None),
                    lambda out: out["loss_recon1"] + out["loss_recon2"] + info_scale * out["loss_info"])


def test_ddp_step_matches_single_process_step(tmp_path):
    """DDP averages gradients over ranks. The reconstruction losses are means over equally many hidden patches
    per image, so their DDP gradient is the concatenated batch's. The summed info loss of each rank covers
    only its own images: DDP's gradient of it is 1/world_size x the concatenated batch's; with
    --info_reduction mean (equal per-rank batches) it is the concatenated batch's."""
    run(torchrun(Path(__file__).resolve(), "--grad-worker", tmp_path))
    for reduction, info_scale in (("sum", 1 / WORLD), ("mean", 1.0)):
        ddp = torch.load(tmp_path / f"ddp_{reduction}.pt", weights_only=True)
        grads, params = single_process_reference(reduction, info_scale)
        assert ddp["grads"].keys() == grads.keys() and len(grads) > 50
        for name in grads:
            torch.testing.assert_close(ddp["grads"][name], grads[name], rtol=1e-4, atol=1e-7, msg=name)
            torch.testing.assert_close(ddp["params"][name], params[name], rtol=1e-5, atol=1e-6, msg=name)
    # The 1/world_size factor is real: the head learns only from the info loss, and with the sum its DDP
    # gradient is half the single-process gradient of the same loss on the same images.
    ddp = torch.load(tmp_path / "ddp_sum.pt", weights_only=True)
    unscaled, _ = single_process_reference("sum", 1.0)
    head = [name for name in unscaled if name.startswith("head.")]
    assert head and all(unscaled[name].abs().sum() > 0 for name in head)
    for name in head:
        torch.testing.assert_close(ddp["grads"][name] * WORLD, unscaled[name], rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# submitit
# ------------------------------------------------------------------------------------------------
FAKE_SLURM = {
    # sbatch keeps the submission script it was given and answers like SLURM; srun only has to exist
    "sbatch": '#!/bin/sh\ncp "$1" "$(dirname "$0")/submitted.sh"\necho "Submitted batch job 4242"\n',
    "srun": "#!/bin/sh\nexit 0\n",
}
PAPER_PRETRAIN = ("--arch main_vit_tiny --batch_size 64 --epochs 500 --warmup_epochs 40 --mask_ratio 0.8 "
                  "--mask_overlap_ratio 0.5 --last_k_blocks 6 --norm_pix_loss --data_path path_to_dataset_folder "
                  "--job_dir {job_dir} --nodes 1 --ngpus 4")
PAPER_FINETUNE = ("--arch main_vit_tiny --batch_size 128 --epochs 150 --data_path path_to_dataset_folder "
                  "--finetune path_to_pretrained_file --job_dir {job_dir} --dist_eval --nodes 1 --ngpus 4")


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # the launcher prepends the repo
    return bin_dir


def write_paper_inputs(folder: Path) -> None:
    """What the paper's commands name, in `folder`: path_to_dataset_folder (train/ with enough 7-channel crops for
    4 processes of batch 128, and val/) and path_to_pretrained_file (a ViT-T DAMA pretraining checkpoint), so that
    the launchers' pre-flight checks pass as they would on the cluster."""
    import tifffile
    rng = np.random.default_rng(0)
    for split, count in (("train", 128 * 4), ("val", 4)):
        for i in range(count):
            path = folder / "path_to_dataset_folder" / split / ("a", "b")[i % 2] / f"{i}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, rng.integers(0, 65535, (7, 112, 112), dtype=np.uint16), photometric="minisblack")
    model = models_dama.build_model("main_vit_tiny", img_size=224, decoder_depth=1)
    torch.save({"model": model.state_dict(), "epoch": 499,
                "args": {"arch": "main_vit_tiny", "img_size": 224, "patch_size": 16, "in_chans": 7}},
               folder / "path_to_pretrained_file")


@pytest.mark.parametrize("script,command", [("submitit_pretrain", PAPER_PRETRAIN),
                                            ("submitit_finetune", PAPER_FINETUNE)], ids=["pretrain", "finetune"])
def test_paper_commands_submit_one_task_per_gpu_to_slurm(fake_slurm, tmp_path, monkeypatch, script, command, capsys):
    """The README commands, as written, on a machine with sbatch: pre-flight checks pass here, then 1 node, 4 tasks,
    4 GPUs, the requeue signal."""
    monkeypatch.chdir(tmp_path)
    write_paper_inputs(tmp_path)
    module = __import__(script)
    job_dir = tmp_path / "out"
    job = module.main(command.format(job_dir=job_dir).split())
    out = capsys.readouterr().out
    assert "pre-flight checks passed: main_vit_tiny" in out and "for 4 processes of batch" in out
    assert job.job_id == "4242" and "Submitted job_id: 4242" in out
    sbatch = (fake_slurm / "submitted.sh").read_text()
    for line in ("--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=4320", "--signal=USR2@120",
                 "--mem=40GB", f"--output={job_dir}/submitit/%j_0_log.out", "--job-name=dama"):
        assert f"#SBATCH {line}\n" in sbatch, line
    assert f"srun --unbuffered --output {job_dir}/submitit/%j_%t_log.out" in sbatch  # one log per task
    assert f"export PYTHONPATH={REPO}" in sbatch
    trainer = job.submission().function
    assert trainer.main_module == script.replace("submitit_", "main_")
    assert trainer.args.device == "cuda" and trainer.args.ngpus == 4 and trainer.args.job_dir == str(job_dir)


def test_launcher_flags(capsys, fake_slurm):
    import submitit_pretrain
    from util import launch
    args = submitit_pretrain.parse_args(["--cluster", "local", "--device", "cpu", "--ngpus", "3", "--num_workers",
                                         "2", "--constraint", "a100", "--use_volta32", "--account", "lab",
                                         "--qos", "high", "--exclude", "node7", "--partition", "gpu", "--dry_run"])
    assert launch.submit(args, "main_pretrain") is None  # prints the parameters, checks and submits nothing
    assert "tasks_per_node: 3\n" in capsys.readouterr().out
    params = launch.executor_parameters(args)
    assert params["gpus_per_node"] == 0 and params["tasks_per_node"] == 3  # CPU processes, no GPU request
    assert params["cpus_per_task"] == 3 and params["mem_gb"] == 30
    assert params["slurm_constraint"] == "a100&volta32gb" and params["slurm_partition"] == "gpu"
    assert (params["slurm_account"], params["slurm_qos"], params["slurm_exclude"]) == ("lab", "high", "node7")
    assert args.job_dir == str(Path.cwd() / "job_dir" / "%j")
    for argv, message in ((["--cluster", "local", "--nodes", "2"], "--nodes 2: --cluster local runs on this one "
                                                                   "machine; use --nodes 1 or --cluster slurm"),
                          (["--cluster", "debug", "--ngpus", "2"], "--ngpus 2: --cluster debug runs one process"),
                          (["--timeout", "0"], "--timeout must be at least 1, got 0")):
        with pytest.raises(launch.LaunchError, match=re.escape(message)):
            launch.resolve_launch_args(submitit_pretrain.parse_args(argv))


def launcher(script, *flags, path=None, cwd=REPO):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, str(REPO / f"{script}.py"), *map(str, flags)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.parametrize("script", ["submitit_pretrain", "submitit_finetune"])
def test_launchers_without_slurm_stop_before_submitting_with_one_line(tmp_path, script):
    python_only = str(Path(sys.executable).parent)  # no sbatch, no srun
    result = launcher(script, "--dataset", "synthetic", "--job_dir", tmp_path / "j", path=python_only)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "error: there is no SLURM on this machine (no sbatch on PATH); run the job here with --cluster local (one "
        "process per --ngpus, in the foreground) or --cluster debug (in this process), or launch from a SLURM login "
        "node"]
    (tmp_path / "bin").mkdir()  # sbatch but no srun: --cluster slurm cannot submit either
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    result = launcher(script, "--cluster", "slurm", "--dataset", "synthetic", path=f"{tmp_path / 'bin'}:{python_only}")
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: --cluster slurm needs SLURM's srun on PATH, and this machine has none; use --cluster local or "
        "--cluster debug here"]
    assert "Submitted" not in result.stdout and not list(tmp_path.rglob("*.pkl"))


def test_a_local_job_on_too_little_data_fails_in_the_launcher_never_submitted(tmp_path):
    result = launcher("submitit_pretrain", "--cluster", "local", "--ngpus", "2", *TINY_PRETRAIN,
                      "--synthetic_size", "6", "--job_dir", tmp_path / "job")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr
    assert result.stderr.splitlines() == [
        "error: the data has 6 images, fewer than one batch per process (--batch_size 4 x 2 processes = 8); lower "
        "--batch_size or use fewer processes"]
    assert "Pre-flight checks in this process for a job of 2 processes" in result.stdout
    assert "Submitted" not in result.stdout and not (tmp_path / "job" / "submitit").exists()


def test_a_local_job_whose_rank_is_killed_ends_the_launcher_naming_rank_and_signal(tmp_path):
    job_dir = tmp_path / "job"
    proc = subprocess.Popen([sys.executable, "submitit_pretrain.py", "--cluster", "local", "--ngpus", "2",
                             *TINY_PRETRAIN, "--synthetic_size", "64", "--epochs", "50", "--job_dir", job_dir],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # rank 0's output, streamed by the launcher
            if "Epoch: [0]" in line:
                break
        (log,) = (job_dir / "submitit").glob("*_1_log.out")
        rank1 = int(re.search(r"task 1/2 on \S+ \(pid (\d+)\)", log.read_text()).group(1))
        os.kill(rank1, signal.SIGKILL)  # as the kernel's out-of-memory killer would
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGKILL, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: job ") and "failed: rank 1 was killed by SIGKILL (the signal the kernel's " \
                                                  "out-of-memory killer sends); its peak memory was" in last, last


def test_checkpoint_resubmits_with_the_jobs_own_checkpoint(tmp_path):
    """Trainer.checkpoint (what submitit calls on preemption/timeout) resumes from <output_dir>/checkpoint.pth."""
    import submitit_pretrain
    from util import launch
    args = submitit_pretrain.parse_args(["--cluster", "local", "--device", "cpu", "--job_dir", str(tmp_path)])
    trainer = launch.Trainer(args, "main_pretrain")
    trainer.args.output_dir = str(tmp_path)
    assert trainer.checkpoint().function.args.resume == ""  # nothing saved yet: start over
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    delayed = trainer.checkpoint()
    assert isinstance(delayed.function, launch.Trainer) and delayed.function is not trainer
    assert delayed.function.args.resume == str(tmp_path / "checkpoint.pth")


def wait_for(condition, what, timeout_s=TIMEOUT_S):
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_submitit_local_cli_runs_a_job_to_completion_in_the_foreground(tmp_path):
    job_dir = tmp_path / "job"
    result = launcher("submitit_pretrain", "--cluster", "local", "--ngpus", "1", *TINY_PRETRAIN,
                      "--synthetic_size", "16", "--epochs", "1", "--job_dir", job_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = re.search(r"Submitted job_id: (\d+)", result.stdout).group(1)
    assert f"submitit job {job_id}, task 0/1" in result.stdout  # rank 0's log, streamed while the job ran
    assert f"Job {job_id} finished: all 1 processes ended with exit status 0" in result.stdout
    assert [line["epoch"] for line in log_lines(job_dir) if "epoch" in line] == [0]
    assert load_checkpoint(job_dir / "checkpoint.pth")["epoch"] == 0


def log_complete(path) -> bool:
    return path.exists() and path.read_text().endswith("\n")


def child_pids(pid: int) -> list:
    """Processes whose parent is `pid` (from /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def preempt_local_job(job):
    """Signal the job's tasks as SLURM does at preemption/timeout (USR2 to every task).

    job._interrupt() cannot be used with the local executor: it signals the controller process, which has
    no handler for USR2 and dies, leaving its tasks orphaned.
    """
    tasks = child_pids(job._process.pid)
    assert len(tasks) == 2, tasks
    for pid in tasks:
        os.kill(pid, signal.SIGUSR2)  # submitit's default preemption signal (SUBMITIT_PREEMPT_SIGNAL)


def test_preempted_local_job_requeues_and_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    import submitit_pretrain
    from util import launch
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    job_dir = tmp_path / "job"
    args = submitit_pretrain.parse_args(["--cluster", "local", "--detach", "--ngpus", "2", *TINY_PRETRAIN,
                                         "--synthetic_size", "32", "--epochs", "3", "--print_freq", "1",
                                         "--job_dir", str(job_dir)])
    job = launch.submit(args, "main_pretrain")
    try:
        # epoch 0's checkpoint.pth is written before its log line
        wait_for(lambda: log_complete(job_dir / "log.txt"), "epoch 0")
        preempt_local_job(job)
        job.results()
    finally:
        if not job.done():
            job.cancel()
    stdout = job.task(0).stdout()
    assert "Requeuing job; it will resume from " + str(job_dir / "checkpoint.pth") in stdout
    # both tasks stopped at the next step boundary, rank 0 wrote checkpoint.pth there, and the requeued job went on
    # from that very step
    ((stop_epoch, stop_step),) = re.findall(r"Wrote \S+ at epoch (\d+), after step (\d+) of \d+", stdout)
    assert f"stopped by SIGUSR2 after step {stop_step} of epoch {stop_epoch}" in stdout
    starts = re.findall(r"Start training for 3 epochs from epoch (\d+)(?:, step (\d+))?", stdout)
    assert starts == [("0", ""), (stop_epoch, stop_step)] and int(stop_epoch) >= 1, starts
    assert "distributed init (rank 0/2): gloo" in stdout  # the submitit tasks formed one DDP group
    assert [line["epoch"] for line in log_lines(job_dir)] == [0, 1, 2]  # each epoch once
    assert load_checkpoint(job_dir / "checkpoint.pth")["epoch"] == 2


if __name__ == "__main__" and sys.argv[1:2] == ["--grad-worker"]:
    grad_worker(sys.argv[2])
