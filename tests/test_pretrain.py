"""main_pretrain.py end to end, as real subprocesses: synthetic and TIFF data, checkpoints, resume, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# ViT-tiny at 32 px with 8 px patches: 16 patches, 3 visible per student, 1 shared; 4 steps per epoch. A small
# decoder: the reference's (512 x 8) makes every step several times slower and is exercised in test_models_dama.
TINY = ["--arch", "main_vit_tiny", "--img_size", "32", "--patch_size", "8", "--batch_size", "8",
        "--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2",
        "--num_workers", "0", "--device", "cpu", "--print_freq", "2"]
SYNTHETIC = ["--dataset", "synthetic", "--synthetic_size", "32"]


def pretrain_command(*flags):
    return [sys.executable, str(REPO / "main_pretrain.py"), *TINY, *flags]


# One compute thread: the model is tiny, and on a busy 2-core machine two torch threads spin against other
# processes (a step measured 10 s instead of 0.5 s while another test run was going on).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_pretrain(*flags, timeout=300):
    return subprocess.run(pretrain_command(*flags), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def read_log(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "log.txt").read_text().splitlines()]


def test_synthetic_pretraining_writes_checkpoints_and_log_and_the_loss_goes_down(tmp_path):
    out = tmp_path / "out"
    result = run_pretrain(*SYNTHETIC, "--epochs", "3", "--warmup_epochs", "1", "--lr", "1e-3",
                          "--save_freq", "2", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(out)
    assert [line["epoch"] for line in log] == [0, 1, 2]
    for key in ("train_loss", "train_loss_recon1", "train_loss_recon2", "train_loss_info", "train_lr"):
        assert all(key in line for line in log)
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert sorted(p.name for p in out.glob("checkpoint*.pth")) == ["checkpoint-1.pth", "checkpoint-2.pth",
                                                                    "checkpoint.pth"]
    assert list(out.glob("events.out.tfevents.*")), "TensorBoard scalars are written to --log_dir"
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["arch"] == "main_vit_tiny"
    assert {"model", "optimizer", "scaler"} <= set(ckpt)
    assert any(k.startswith("student2.") for k in ckpt["model"]) and any(k.startswith("head.") for k in ckpt["model"])

    # Asking for one more epoch resumes at epoch 3 instead of starting over.
    result = run_pretrain(*SYNTHETIC, "--epochs", "4", "--warmup_epochs", "1", "--lr", "1e-3",
                          "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Auto-resuming from" in result.stdout and "from epoch 3" in result.stdout
    assert [line["epoch"] for line in read_log(out)] == [0, 1, 2, 3]


@pytest.mark.parametrize("layout", ["channel_last", "channel_first"])
def test_pretraining_on_real_tiff_files(tmp_path, make_image_folder, layout):
    root = make_image_folder(classes=("astro", "neuron"), n_per_class=8, size=40, channels=7,
                             dtype="uint16", layout=layout, splits=("train",))
    out = tmp_path / "out"
    result = run_pretrain("--data_path", str(root), "--epochs", "1", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dataset: 16 images" in result.stdout
    assert len(read_log(out)) == 1 and (out / "checkpoint.pth").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "out"
    assert run_pretrain(*SYNTHETIC, "--epochs", "1", "--output_dir", str(out)).returncode == 0
    good = (out / "checkpoint.pth").read_bytes()
    # another --loss_alpha is another run: continuing this one with it needs an explicit --resume
    result = run_pretrain(*SYNTHETIC, "--epochs", "2", "--loss_alpha", "nan", "--output_dir", str(out),
                          "--resume", str(out / "checkpoint.pth"))
    assert result.returncode != 0
    assert result.returncode == 3  # diverged: neither a crash (1) nor bad input (2)
    assert "non-finite loss at epoch 1" in result.stderr and "loss_info=nan" in result.stderr
    assert (out / "checkpoint.pth").read_bytes() == good
    assert len(read_log(out)) == 1


def _error_line(result):
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode != 0
    assert lines and lines[-1].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[-1]


def test_missing_data_path_is_a_clear_error(tmp_path):
    line = _error_line(run_pretrain("--output_dir", str(tmp_path / "o")))
    assert "--data_path" in line
    line = _error_line(run_pretrain("--data_path", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o")))
    assert "nowhere" in line


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    line = _error_line(run_pretrain("--data_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "o")))
    assert "train" in line and "no image" in line.lower()


def test_corrupt_tiff_is_a_clear_error(tmp_path, make_image_folder):
    root = make_image_folder(classes=("a",), n_per_class=16, size=40, splits=("train",))
    bad = root / "train" / "a" / "a_9.tif"
    bad.write_bytes(b"this is not a tiff file")
    line = _error_line(run_pretrain("--data_path", str(root), "--epochs", "1", "--output_dir", str(tmp_path / "o")))
    assert "a_9.tif" in line


def test_wrong_channel_count_is_a_clear_error(tmp_path, make_image_folder):
    root = make_image_folder(classes=("a",), n_per_class=8, size=40, channels=3, splits=("train",))
    line = _error_line(run_pretrain("--data_path", str(root), "--output_dir", str(tmp_path / "o")))
    assert ".tif" in line and "3" in line and "--in_chans" in line and "7" in line


def test_image_smaller_than_the_crop_is_a_clear_error(tmp_path, make_image_folder):
    root = make_image_folder(classes=("a",), n_per_class=8, size=12, splits=("train",))
    line = _error_line(run_pretrain("--data_path", str(root), "--output_dir", str(tmp_path / "o")))
    assert ".tif" in line and "12" in line and "16" in line


def test_unknown_arch_and_bad_mask_ratio_are_clear_errors(tmp_path):
    line = _error_line(run_pretrain(*SYNTHETIC, "--arch", "vit_gigantic", "--output_dir", str(tmp_path / "o")))
    assert "--arch" in line and "vit_gigantic" in line and "main_vit_tiny" in line
    line = _error_line(run_pretrain(*SYNTHETIC, "--mask_ratio", "0.1", "--output_dir", str(tmp_path / "o")))
    assert "--mask_ratio" in line
    assert not (tmp_path / "o" / "checkpoint.pth").exists()


@pytest.mark.parametrize("spelling", ["--no_norm_pix_loss", "--no-norm_pix_loss"])
def test_switches_turn_off_in_the_readme_spelling(spelling):
    """README and MAE write `--no_norm_pix_loss`; the dashed form argparse users may type works too."""
    import main_pretrain  # the repository root is on sys.path (conftest.py)

    parser = main_pretrain.get_args_parser()
    defaults = parser.parse_args([])
    assert defaults.norm_pix_loss and defaults.pin_mem and not defaults.gpu_augment
    args = parser.parse_args([spelling, "--no_pin_mem", "--gpu_augment", "--arch", "main_vit_tiny",
                              "--img_size", "32", "--patch_size", "8", "--decoder_depth", "1"])
    assert not args.norm_pix_loss and not args.pin_mem and args.gpu_augment
    main_pretrain.describe_model(args)  # no checkpoint: the defaults for the flags left out
    main_pretrain.resolve_defaults(args)
    model = main_pretrain.build_model(args)
    assert not model.norm_pix_loss
    imgs = torch.rand(2, 7, 32, 32)
    out = model(imgs)
    # with norm-pix off the reconstruction target is the raw pixels of each patch: [N, L, p*p*C]
    raw = imgs.reshape(2, 7, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 8 * 8 * 7)
    hidden = out["mask1"].bool()
    expected = ((out["pred1"] - raw) ** 2).mean(-1)[hidden].mean()
    torch.testing.assert_close(out["loss_recon1"], expected)
