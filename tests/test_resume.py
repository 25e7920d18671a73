"""Runs that survive a cluster: mid-epoch checkpoints and exact resume (SIGKILL and SIGTERM, pretraining and
fine-tuning, with DataLoader workers), no silent continuation of another run, the srun launch path, one run per
output folder, and errors that keep their cause. Every test runs the real scripts as subprocesses."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for _name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_name, None)
TIMEOUT_S = 300

# 8 steps per epoch (32 synthetic images, batch 4), a loss read back and logged after every step (--print_freq 1),
# checkpoint.pth also after every fourth step, two DataLoader workers: the case where resuming exactly is hard.
PRETRAIN = ["main_pretrain.py", "--dataset", "synthetic", "--synthetic_size", "32", "--arch", "main_vit_tiny",
            "--img_size", "32", "--patch_size", "8", "--decoder_embed_dim", "32", "--decoder_depth", "1",
            "--decoder_num_heads", "2", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1",
            "--blr", "1e-3", "--device", "cpu", "--num_workers", "2", "--print_freq", "1", "--save_every_steps", "4",
            "--vis_freq", "0", "--seed", "5"]
# fine-tuning with mixup, cutmix, label smoothing and drop path: every kind of per-step randomness
FINETUNE = ["main_finetune.py", "--dataset", "synthetic", "--synthetic_size", "32", "--arch", "main_vit_tiny",
            "--img_size", "32", "--patch_size", "8", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1",
            "--device", "cpu", "--num_workers", "2", "--print_freq", "1", "--save_every_steps", "4",
            "--mixup", "0.8", "--cutmix", "1.0", "--drop_path", "0.1", "--seed", "5"]


def command(script_and_flags, output_dir, *extra):
    return [sys.executable, *script_and_flags, "--output_dir", str(output_dir), *map(str, extra)]


def run(cmd, env=ENV, expect=0):
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert result.returncode == expect, f"exit {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def run_and_interrupt(cmd, trigger: str, signum: int):
    """Start `cmd`, send `signum` when a line containing `trigger` is printed, return (exit code, output)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, sent = [], threading.Event()
    timer = threading.Timer(TIMEOUT_S, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if not sent.is_set() and trigger in line:
                proc.send_signal(signum)
                sent.set()
        proc.wait()
    finally:
        timer.cancel()
    output = "".join(lines)
    assert sent.is_set(), f"the run ended before it printed {trigger!r}:\n{output[-3000:]}"
    return proc.returncode, output


def step_losses(log_dir, tag: str) -> dict:
    """{x: value} of a TensorBoard scalar over every event file in log_dir (a resumed run adds a file); later files
    win, so the result holds what the resumed run logged wherever both logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        events = EventAccumulator(str(path)).Reload()
        values.update({event.step: event.value for event in events.Scalars(tag)})
    return values


def read_log(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_pretraining(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run(command(PRETRAIN, out))
    return out


def stop_step(output: str, epoch: int) -> int:
    """The step after which a run stopped by SIGTERM wrote its checkpoint, from its `stopped:` line."""
    match = re.search(rf"stopped: stopped by SIGTERM after step (\d+) of epoch {epoch}; checkpoint written", output)
    assert match, output[-2000:]
    return int(match.group(1))


def assert_same_steps(resumed_dir, reference_dir, tags, num_steps):
    for tag in tags:
        resumed, reference = step_losses(resumed_dir, tag), step_losses(reference_dir, tag)
        assert sorted(resumed) == sorted(reference) and len(reference) == num_steps, tag  # every step logged
        for x, value in reference.items():
            assert resumed[x] == pytest.approx(value, rel=1e-5, abs=1e-7), (tag, x)
    # the epochs' averages (log.txt) equal the uninterrupted run's too, although an epoch was cut in two
    for resumed_line, reference_line in zip(read_log(resumed_dir), read_log(reference_dir), strict=True):
        assert resumed_line == pytest.approx(reference_line, rel=1e-5)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_pretraining_resumed_mid_epoch_repeats_every_step_of_an_uninterrupted_run(straight_pretraining, tmp_path,
                                                                                  signum):
    out = tmp_path / "interrupted"
    if signum == signal.SIGKILL:
        # killed in epoch 1 right after its mid-epoch checkpoint at step 4: the steps after it are lost and redone
        code, output = run_and_interrupt(command(PRETRAIN, out), "at epoch 1, after step 4 of 8", signum)
        assert code == -signal.SIGKILL
        resumed_from = 4
    else:
        # terminated while epoch 1 runs: the run writes checkpoint.pth at the next step boundary and stops
        code, output = run_and_interrupt(command(PRETRAIN, out), "Epoch: [1]  [2/8]", signum)
        assert code == 128 + signal.SIGTERM, output[-2000:]  # stopped on purpose, checkpoint written
        resumed_from = stop_step(output, epoch=1)
        assert resumed_from >= 3
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, resumed_from)

    result = run(command(PRETRAIN, out))
    assert f"Resumed from {out / 'checkpoint.pth'} (epoch 1, after step {resumed_from})" in result.stdout
    assert f"Start training for 2 epochs from epoch 1, step {resumed_from}" in result.stdout
    assert_same_steps(out, straight_pretraining, ("train/loss", "train/loss_recon1", "train/loss_recon2",
                                                  "train/loss_info", "train/lr"), num_steps=16)


def test_finetuning_stopped_by_sigterm_resumes_to_the_same_steps(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(command(FINETUNE, straight))
    code, output = run_and_interrupt(command(FINETUNE, stopped), "Epoch: [0]  [2/8]", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output[-2000:]
    resumed_from = stop_step(output, epoch=0)
    result = run(command(FINETUNE, stopped))
    assert f"(epoch 0, after step {resumed_from})" in result.stdout
    assert_same_steps(stopped, straight, ("loss", "lr"), num_steps=16)  # and the accuracies in log.txt


# ------------------------------------------------------------------------------------------------
# No silent continuation
# ------------------------------------------------------------------------------------------------
def without(flags, name):
    """flags without `name` and its value."""
    i = flags.index(name)
    return flags[:i] + flags[i + 2:]


ONE_EPOCH = without(PRETRAIN, "--save_every_steps")


def run_in_process(module, flags, capsys):
    """The script's exit code and (stdout, stderr), run here: the same run_tool path as its __main__, without the
    cost of a new interpreter."""
    import argparse
    import importlib

    from util.cli import run_tool

    script = importlib.import_module(module)
    parser = argparse.ArgumentParser(parents=[script.get_args_parser()])
    capsys.readouterr()
    code = run_tool(script.main, parser.parse_args([str(flag) for flag in flags]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_reused_output_folder_continues_only_its_own_run(tmp_path, capsys):
    out = tmp_path / "out"
    small = [*ONE_EPOCH[1:], "--epochs", "1", "--num_workers", "0", "--synthetic_size", "8", "--output_dir", out]
    assert run_in_process("main_pretrain", small, capsys)[0] == 0
    # another arch or other data: refused before anything is built, naming what differs and the ways out
    for extra, differs in ((["--arch", "main_vit_small"], "--arch main_vit_small (checkpoint: main_vit_tiny)"),
                           (["--synthetic_size", "12"], "--synthetic_size 12 (checkpoint: 8)")):
        code, _, err = run_in_process("main_pretrain", small + extra, capsys)
        (line,) = err.strip().splitlines()
        assert code == 2 and line.startswith(f"error: --output_dir {out} holds another run") and differs in line
        assert "--resume" in line and "--overwrite" in line and "another --output_dir" in line
    assert len(read_log(out)) == 1
    # the same run asked to train again: says it is finished, trains nothing, exit 0
    code, stdout, _ = run_in_process("main_pretrain", small, capsys)
    assert code == 0 and "already finished its 1 epochs" in stdout and len(read_log(out)) == 1
    # more epochs: continues; --print_freq and --num_workers do not define the run
    code, stdout, _ = run_in_process("main_pretrain", small + ["--epochs", "2", "--print_freq", "3",
                                                               "--num_workers", "1"], capsys)
    assert code == 0 and "Auto-resuming from" in stdout and [line["epoch"] for line in read_log(out)] == [0, 1]
    # --overwrite starts over and keeps the earlier run in a sub-folder
    code, _, _ = run_in_process("main_pretrain", small + ["--synthetic_size", "12", "--overwrite"], capsys)
    (kept,) = out.glob("replaced_*")
    assert code == 0 and (kept / "checkpoint.pth").is_file() and len(read_log(kept)) == 2
    assert [line["epoch"] for line in read_log(out)] == [0]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["args"]["synthetic_size"] == 12


def test_two_runs_never_share_an_output_folder(tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(command([*ONE_EPOCH, "--epochs", "50"], out), cwd=REPO, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:  # the first run holds the folder once it prints its configuration
            if "Start training" in line:
                break
        second = run(command(ONE_EPOCH, out), expect=2)
        (line,) = second.stderr.strip().splitlines()
        assert line == f"error: --output_dir {out} is in use by another run (pid {first.pid} on " \
                       f"{os.uname().nodename}); wait for it to end, or use another --output_dir"
    finally:
        first.kill()
        first.wait()


# ------------------------------------------------------------------------------------------------
# srun without torchrun
# ------------------------------------------------------------------------------------------------
def test_a_two_task_srun_step_is_one_ddp_job(tmp_path):
    """Two processes with only SLURM's variables, as `srun --ntasks 2 python main_pretrain.py ...` starts them."""
    out = tmp_path / "out"
    job_id = str(10000 + os.getpid() % 20000)  # the rendezvous port follows the job id: differs between test runs
    procs = []
    for rank in range(2):
        env = {**ENV, "SLURM_JOB_ID": job_id, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank),
               "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost"}
        procs.append(subprocess.Popen(command([*ONE_EPOCH, "--epochs", "1", "--num_workers", "0"], out), cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=TIMEOUT_S)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "distributed init (rank 0/2): gloo" in outputs[0] and "distributed init (rank 1/2): gloo" in outputs[1]
    (line,) = read_log(out)  # one job: one log line, one checkpoint, written by rank 0
    assert torch.load(out / "checkpoint.pth", weights_only=True)["args"]["world_size"] == 2
    assert "Not using distributed mode" not in outputs[0] + outputs[1]


def test_the_batch_script_of_a_multi_task_job_runs_alone_and_says_why(monkeypatch, capsys):
    from argparse import Namespace

    from util import misc
    for name in ("RANK", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}.items():
        monkeypatch.setenv(name, value)
    args = Namespace(device="cpu")
    try:
        misc.init_distributed_mode(args)
    finally:
        misc.cleanup_distributed()
    assert not args.distributed and args.world_size == 1
    assert "this SLURM job has 4 tasks but this process was not started by srun" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Errors keep their cause
# ------------------------------------------------------------------------------------------------
BROKEN_STEP = """
import runpy, sys
import models_dama
def forward(self, imgs, info_weight=1.0, generator=None):
    raise ValueError("a shape bug inside the model")  # a ValueError, but not a user error: keep the traceback
models_dama.DAMA.forward = forward
sys.argv = sys.argv[1:]
runpy.run_path("main_pretrain.py", run_name="__main__")
"""


def test_an_unexpected_exception_in_the_training_step_keeps_its_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-c", BROKEN_STEP, *command(ONE_EPOCH, tmp_path / "o")[1:],
                             "--num_workers", "0"], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "engine_pretrain.py" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "ValueError: a shape bug inside the model"
    assert "error: " not in result.stderr
