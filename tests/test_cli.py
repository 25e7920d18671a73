"""One convention for every script: --help shows every flag with its help and default, a mistake is one
`error: ...` line with exit code 2 (flags, folders, files, checkpoints), and checkpoints describe themselves."""
import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SCRIPTS = ("main_pretrain", "main_finetune", "main_linprobe", "submitit_pretrain", "submitit_finetune")
TINY = ["--dataset", "synthetic", "--synthetic_size", "8", "--arch", "main_vit_tiny", "--img_size", "32",
        "--patch_size", "8", "--batch_size", "4", "--epochs", "1", "--num_workers", "0", "--device", "cpu"]
TINY_DECODER = ["--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2", "--vis_freq", "0"]


def full_parser(script: str) -> argparse.ArgumentParser:
    module = importlib.import_module(script)
    if script.startswith("submitit_"):
        from util import launch
        from util.cli import make_parser
        parser = make_parser("launcher", parents=[importlib.import_module(script.replace("submitit_", "main_"))
                                                  .get_args_parser()])
        return launch.add_launcher_args(parser)
    from util.cli import make_parser
    return make_parser(script, parents=[module.get_args_parser()])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_and_help_shows_the_defaults(script):
    parser = full_parser(script)
    undocumented = [action.option_strings[0] for action in parser._actions if action.option_strings
                    and not action.help]
    assert not undocumented, f"{script}: flags without help: {undocumented}"
    text = parser.format_help()
    assert "--weight_decay WEIGHT_DECAY" in text and f"(default: {parser.get_default('weight_decay')})" in text
    assert "--ngpus NGPUS" not in text or "(default: 8)" in text


def run_in_process(script, flags, capsys):
    from util.cli import run_tool
    module = importlib.import_module(script)
    parser = argparse.ArgumentParser(parents=[module.get_args_parser()])
    capsys.readouterr()
    code = run_tool(module.main, parser.parse_args([str(f) for f in flags]))
    return code, capsys.readouterr()


def test_unknown_arch_is_one_line_in_every_training_script(capsys):
    """Pretraining's is tested end to end in test_pretrain.py; fine-tuning's used to be a 28-line usage dump."""
    result = subprocess.run([sys.executable, "main_finetune.py", "--arch", "vit_gigantic", "--dataset", "synthetic",
                             "--device", "cpu", "--output_dir", "/nonexistent-never-created"], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "vit_gigantic" in lines[0] and "main_vit_tiny" in lines[0], lines[0]
    # an argparse mistake (a wrong type) is one line too, not a usage dump
    with pytest.raises(SystemExit) as exit_info:
        full_parser("main_finetune").parse_args(["--epochs", "many"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: argument --epochs: invalid int value: 'many' (see ") and line.endswith(" --help)")


def test_output_folders_that_cannot_be_written_are_one_line(tmp_path, capsys):
    regular_file = tmp_path / "a_file"
    regular_file.write_text("not a folder")
    for flag, path in (("--output_dir", regular_file / "out"), ("--output_dir", "/proc/dama_out"),
                       ("--log_dir", regular_file / "tb")):
        extra = ["--output_dir", tmp_path / "ok"] if flag == "--log_dir" else []
        for script, flags in (("main_pretrain", TINY + TINY_DECODER), ("main_finetune", TINY)):
            code, captured = run_in_process(script, [*flags, *extra, flag, path], capsys)
            lines = captured.err.strip().splitlines()
            assert code == 2 and len(lines) == 1, captured.err[-2000:]
            assert lines[0].startswith(f"error: {flag} {path}: cannot create or write this folder ("), lines[0]
            assert not (tmp_path / "ok" / "checkpoint.pth").exists()


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody can write, even root: a read-only tmpfs (skipped where this machine cannot mount one)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("no read-only mount here and the tests run as root: an unwritable folder cannot be made")
        folder.chmod(0o500)  # a non-root user cannot write it
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=False)


def test_an_unwritable_output_folder_is_one_line_before_anything_starts(read_only_folder):
    out = read_only_folder / "run"
    result = subprocess.run([sys.executable, "main_pretrain.py", *TINY, *TINY_DECODER, "--output_dir", str(out)],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [f"error: --output_dir {out}: cannot create or write this folder "
                                          f"(Read-only file system); choose a writable --output_dir"]
    assert "Traceback" not in result.stderr and "Start training" not in result.stdout


def test_eval_of_a_patch8_checkpoint_needs_no_model_flags(tmp_path, capsys):
    """README: `main_finetune.py --eval --resume CKPT --data_path ...`: arch, patch size, image size, channels and
    pooling come from the checkpoint; a flag that disagrees with it is one line naming both values."""
    out = tmp_path / "ft"
    flags = [*TINY, "--img_size", "48", "--patch_size", "8", "--no_global_pool", "--val_crop", "48"]
    code, _ = run_in_process("main_finetune", [*flags, "--output_dir", out], capsys)
    assert code == 0
    trained = torch.load(out / "checkpoint.pth", weights_only=True)
    assert trained["args"]["class_names"] == ["neuron", "astrocyte", "oligodendrocyte", "microglia", "endothelial"]
    code, captured = run_in_process("main_finetune", ["--eval", "--resume", out / "checkpoint.pth", "--dataset",
                                                      "synthetic", "--synthetic_size", "8", "--device", "cpu",
                                                      "--num_workers", "0", "--val_crop", "48"], capsys)
    assert code == 0, captured.err
    assert "Accuracy of the network on the" in captured.out
    code, captured = run_in_process("main_finetune", ["--eval", "--resume", out / "checkpoint.pth", "--dataset",
                                                      "synthetic", "--device", "cpu", "--patch_size", "16"], capsys)
    assert code == 2 and captured.err.strip() == (
        f"error: --patch_size 16 disagrees with checkpoint {out / 'checkpoint.pth'}, which was trained with "
        f"--patch_size 8; leave --patch_size out to use the checkpoint's")
