"""The README's runnable commands run as written, in the order given, from a fresh folder.

Every bash block of README.md preceded by the line `<!-- tested: tests/test_readme.py -->` is read here, its
commands (continuation lines joined) run one after another in one temporary folder, so that each command finds
what the earlier ones wrote. Only sizes are turned down (flags appended, the last one wins in argparse: fewer
epochs and images, a smaller decoder) to keep the test short; `pip install` and `python -m pytest` are left to CI,
which runs exactly those. The scripts run in this process (runpy), as `python script.py ...` would.
"""
import os
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- tested: tests/test_readme.py -->"
# Appended to every command of a script: the same model and data as written, fewer and smaller steps.
SMALLER = {
    "main_pretrain.py": ["--epochs", "1", "--synthetic_size", "16", "--batch_size", "8", "--num_workers", "0",
                         "--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2",
                         "--vis_freq", "1", "--vis_num_images", "2", "--device", "cpu"],
    "main_finetune.py": ["--epochs", "1", "--synthetic_size", "16", "--batch_size", "8", "--num_workers", "0",
                         "--device", "cpu"],
    "util.synthetic_slide": ["--grid", "6"],
}
SKIPPED = ("pip install", "python -m pytest")


def readme_commands(readme: str) -> list:
    """The bash blocks right after a MARKER line, as lists of commands (continuations joined, comments dropped)."""
    blocks = re.findall(re.escape(MARKER) + r"\s*\n```bash\n(.*?)```", readme, re.S)
    commands = []
    for block in blocks:
        text = re.sub(r"\s*\\\n\s*", " ", block)  # backslash continuations
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if line and not line.startswith(SKIPPED):
                commands.append(line)
    return commands


def run_command(command: str, capsys) -> str:
    """`python script.py ...` or `python -m module ...` in this process; returns what it printed."""
    words = shlex.split(command)
    assert words[0] == "python", command
    if words[1] == "-m":
        target, argv = words[2], words[3:]
    else:
        target, argv = words[1], words[2:]
    argv = argv + SMALLER.get(target, [])
    saved = sys.argv
    sys.argv = [target, *argv]
    try:
        if target.endswith(".py"):
            runpy.run_path(str(REPO / target), run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:
        code = exit.code or 0
    finally:
        sys.argv = saved
    captured = capsys.readouterr()
    assert code == 0, f"`{command}` exited with {code}:\n{captured.out[-2000:]}\n{captured.err[-2000:]}"
    return captured.out


def test_the_readme_quick_start_and_small_examples_run_as_written(tmp_path, monkeypatch, capsys):
    commands = readme_commands((REPO / "README.md").read_text())
    assert len(commands) >= 5, commands  # the quick start: pretraining, fine-tuning, and a slide to pretraining
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for command in commands:
        run_command(command, capsys)
    # what the quick start promises: checkpoints, logs and one reconstruction figure
    assert (tmp_path / "output_dir" / "quickstart" / "checkpoint.pth").is_file()
    assert list((tmp_path / "output_dir" / "quickstart" / "vis").glob("recon_epoch*.png"))
    assert (tmp_path / "output_dir" / "quickstart_ft" / "log.txt").is_file()
    assert (tmp_path / "output_dir" / "demo_cells" / "dataset.json").is_file()


@pytest.mark.parametrize("command,expected", [
    ("python main_pretrain.py --a 1 \\\n    --b 2   # note\npip install -r requirements.txt\n",
     ["python main_pretrain.py --a 1 --b 2"]),
])
def test_blocks_are_read_with_their_continuations(command, expected):
    assert readme_commands(f"{MARKER}\n```bash\n{command}```\n") == expected
