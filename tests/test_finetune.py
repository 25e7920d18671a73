"""Fine-tuning: loading pretrained students, export to timm, pos-embed resampling, layer decay, the CLI."""
import json
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import main_finetune
import models_dama
import models_vit
from engine_finetune import evaluate, train_one_epoch
from util.convert import export_encoder, extract_encoder, load_pretrained_encoder
from util.errors import DataError, NonFiniteLossError
from util.synthetic import SyntheticCells

REPO = Path(__file__).resolve().parents[1]
TIMM_KEYS_NOT_IN_ENCODER = {"head.weight", "head.bias"}


def save_pretraining_checkpoint(path: Path, img_size: int, mask_ratio: float) -> dict:
    """What main_pretrain.py writes, without running it: {'model', 'epoch', 'args'}."""
    torch.manual_seed(img_size)
    # a slim decoder keeps the file small and fast to write; fine-tuning drops the decoder anyway
    model = models_dama.build_model("main_vit_tiny", img_size=img_size, in_chans=7, mask_ratio=mask_ratio,
                                      decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)
    state_dict = model.state_dict()
    with torch.no_grad():  # as after training: zero-initialised biases differ between the students too
        for name, value in state_dict.items():
            if not name.endswith("pos_embed"):  # the sin-cos tables stay fixed
                value.add_(torch.randn_like(value), alpha=0.01)
    torch.save({"model": state_dict, "epoch": 0,
                "args": {"arch": "main_vit_tiny", "img_size": img_size, "patch_size": 16, "in_chans": 7}}, path)
    return state_dict


@pytest.fixture(scope="module")
def pretrained_32(tmp_path_factory):
    """(path, state dict) of a 32 px pretraining checkpoint (2x2 patch grid)."""
    path = tmp_path_factory.mktemp("pretrain32") / "checkpoint.pth"
    return path, save_pretraining_checkpoint(path, img_size=32, mask_ratio=0.5)  # 4 patches: 0.8 leaves none


@pytest.fixture(scope="module")
def pretrained_64(tmp_path_factory):
    """(path, state dict) of a 64 px pretraining checkpoint (4x4 patch grid)."""
    path = tmp_path_factory.mktemp("pretrain64") / "checkpoint.pth"
    return path, save_pretraining_checkpoint(path, img_size=64, mask_ratio=0.75)


def run_script(*args, cwd=REPO, timeout=120):
    # one thread: these models are tiny, and several threads on a busy 2-core machine mostly spin
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


# ------------------------------------------------------------------------------------------------
# Loading pretrained weights
# ------------------------------------------------------------------------------------------------
def test_extract_encoder_keeps_only_one_students_encoder(pretrained_32):
    _, state_dict = pretrained_32
    encoder = extract_encoder(state_dict, student=2)
    timm_encoder_keys = set(models_vit.build_vit("main_vit_tiny", img_size=32).state_dict()) - TIMM_KEYS_NOT_IN_ENCODER
    timm_encoder_keys -= {"fc_norm.weight", "fc_norm.bias"}  # global pool: fc_norm is new, norm is Identity
    assert set(encoder) == timm_encoder_keys | {"norm.weight", "norm.bias"}
    assert torch.equal(encoder["blocks.3.mlp.fc1.weight"], state_dict["student2.blocks.3.mlp.fc1.weight"])
    # an encoder-only dict passes through unchanged
    assert extract_encoder(encoder).keys() == encoder.keys()


@pytest.mark.parametrize("student", [1, 2])
def test_finetune_loads_the_requested_student(pretrained_32, student):
    path, state_dict = pretrained_32
    model = models_vit.build_vit("main_vit_tiny", img_size=32, num_classes=5)
    load_pretrained_encoder(model, str(path), student=student)
    other = 3 - student
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.bias", "cls_token"):
        loaded = model.state_dict()[name]
        assert torch.equal(loaded, state_dict[f"student{student}.{name}"]), name
        assert not torch.equal(loaded, state_dict[f"student{other}.{name}"]), name
    assert model.head.weight.abs().max() < 1e-4  # MAE's trunc-normal(2e-5) head init after loading


def test_is_momentum_is_an_alias_for_student_2():
    parser = main_finetune.get_args_parser()
    assert parser.parse_args([]).student == 1
    assert parser.parse_args(["--is_momentum"]).student == 2
    assert parser.parse_args(["--student", "2"]).student == 2


@pytest.mark.parametrize("flags,global_pool", [([], True), (["--global_pool"], True), (["--no_global_pool"], False),
                                               (["--cls_token"], False)])
def test_global_pool_is_a_switch(flags, global_pool):
    args = main_finetune.get_args_parser().parse_args(flags + ["--img_size", "32", "--patch_size", "8",
                                                               "--device", "cpu"])
    main_finetune.describe_model(args)  # no checkpoint: the defaults
    main_finetune.resolve_defaults(args)
    assert args.global_pool is global_pool
    model = main_finetune.build_model(args, num_classes=3)
    assert models_vit.uses_fc_norm(model) is global_pool  # pooled patch tokens -> fc_norm, or the normed cls token


def test_pos_embed_is_bicubically_resampled_for_a_larger_image(pretrained_32):
    path, state_dict = pretrained_32
    model = models_vit.build_vit("main_vit_tiny", img_size=64, num_classes=5)  # 4x4 grid from the 2x2 pretraining grid
    load_pretrained_encoder(model, str(path))
    old = state_dict["student1.pos_embed"]  # [1, 1 + 2*2, 192]
    grid = old[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)  # [1, D, 2, 2]
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 16, -1)
    new = model.pos_embed.detach()  # [1, 1 + 4*4, 192]
    assert new.shape == (1, 17, 192)
    assert torch.equal(new[:, :1], old[:, :1])  # cls row kept
    torch.testing.assert_close(new[:, 1:], expected)
    nearest = grid.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3).permute(0, 2, 3, 1).reshape(1, 16, -1)
    assert not torch.allclose(new[:, 1:], nearest, atol=1e-3)  # a real resample, not pixel replication


def test_cls_token_model_keeps_the_final_norm(pretrained_32):
    path, state_dict = pretrained_32
    model = models_vit.build_vit("main_vit_tiny", img_size=32, num_classes=5, global_pool=False)
    load_pretrained_encoder(model, str(path))
    assert torch.equal(model.norm.weight, state_dict["student1.norm.weight"])
    assert isinstance(model.fc_norm, nn.Identity)


def test_converted_checkpoint_loads_into_plain_timm(pretrained_64, tmp_path):
    path, state_dict = pretrained_64
    out = tmp_path / "encoder.pth"  # through the CLI, as a user would
    result = run_script("convert_checkpoint.py", "--input", path, "--output", out, "--student", "2")
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    converted = torch.load(out, weights_only=True)
    assert converted["pretrained_cfg"] == dict(arch="main_vit_tiny", img_size=64, patch_size=16, in_chans=7,
                                               embed_dim=192, depth=12, num_heads=3, student=2, epoch=0,
                                               channel_names=None, normalization=None,
                                               mean=None, std=None)  # the cell recipe: no normalisation

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, in_chans=7, num_classes=5)
    missing, unexpected = model.load_state_dict(converted["model"], strict=False)
    assert set(missing) == TIMM_KEYS_NOT_IN_ENCODER and unexpected == []
    assert torch.equal(model.blocks[5].attn.proj.weight, state_dict["student2.blocks.5.attn.proj.weight"])

    # the same file is a valid --finetune source (already encoder-only: no student to pick)
    finetune_model = models_vit.build_vit("main_vit_tiny", img_size=64, num_classes=5)
    load_pretrained_encoder(finetune_model, str(out))
    assert torch.equal(finetune_model.pos_embed, state_dict["student2.pos_embed"])


def test_export_to_a_bare_file_name(pretrained_32, tmp_path, monkeypatch):
    path, state_dict = pretrained_32
    monkeypatch.chdir(tmp_path)  # no directory part in the output path (the reference's makedirs('') crash)
    metadata = export_encoder(str(path), "encoder.pth", student=1)
    assert metadata["img_size"] == 32 and metadata["arch"] == "main_vit_tiny"
    exported = torch.load(tmp_path / "encoder.pth", weights_only=True)["model"]
    assert not any(key.startswith(("decoder_", "mask_token", "head.")) for key in exported)
    assert torch.equal(exported["norm.weight"], state_dict["student1.norm.weight"])


def test_unexpected_keys_are_listed(pretrained_32, tmp_path):
    _, state_dict = pretrained_32
    encoder = extract_encoder(state_dict)
    encoder["blocks.12.norm1.weight"] = torch.ones(192)  # a 13th block: deeper than main_vit_tiny
    path = tmp_path / "deeper.pth"
    torch.save({"model": encoder}, path)
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks\.12\.norm1\.weight'\].*--arch"):
        load_pretrained_encoder(models_vit.build_vit("main_vit_tiny", img_size=32), str(path))


# ------------------------------------------------------------------------------------------------
# Optimizer, loss, engine
# ------------------------------------------------------------------------------------------------
def test_layer_decay_groups_scale_by_depth():
    model = models_vit.build_vit("main_vit_tiny", img_size=32, num_classes=5)
    args = Namespace(weight_decay=0.05, layer_decay=0.75, lr=1e-3, device="cpu")
    optimizer = main_finetune.build_optimizer(args, model)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    num_layers = 13  # 12 blocks + 1

    def group(name):
        return group_of[id(params[name])]

    assert group("patch_embed.proj.weight")["lr_scale"] == pytest.approx(0.75 ** num_layers)
    assert group("cls_token")["lr_scale"] == pytest.approx(0.75 ** num_layers)
    for block in range(12):
        assert group(f"blocks.{block}.attn.qkv.weight")["lr_scale"] == pytest.approx(0.75 ** (12 - block))
    assert group("head.weight")["lr_scale"] == 1.0 and group("fc_norm.weight")["lr_scale"] == 1.0
    assert group("blocks.4.attn.qkv.weight")["weight_decay"] == 0.05
    for no_decay in ("pos_embed", "cls_token", "blocks.4.attn.qkv.bias", "blocks.4.norm1.weight", "head.bias"):
        assert group(no_decay)["weight_decay"] == 0.0, no_decay
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(params)


def test_criterion_follows_mixup_and_smoothing_flags():
    parser = main_finetune.get_args_parser()
    criterion, mixup_fn = main_finetune.build_criterion(parser.parse_args(["--mixup", "0.8"]), 5)
    assert type(criterion).__name__ == "SoftTargetCrossEntropy" and mixup_fn is not None
    criterion, mixup_fn = main_finetune.build_criterion(parser.parse_args([]), 5)
    assert type(criterion).__name__ == "LabelSmoothingCrossEntropy" and mixup_fn is None
    criterion, _ = main_finetune.build_criterion(parser.parse_args(["--smoothing", "0"]), 5)
    assert isinstance(criterion, nn.CrossEntropyLoss)
    with pytest.raises(ValueError, match="even --batch_size"):
        main_finetune.build_criterion(parser.parse_args(["--cutmix", "1", "--batch_size", "33"]), 5)


def test_num_classes_must_match_the_data():
    train, val = SyntheticCells(10, 16, seed=0), SyntheticCells(5, 16, seed=0, split="val")
    args = main_finetune.get_args_parser().parse_args(["--dataset", "synthetic"])
    assert main_finetune.check_num_classes(args, train, val) == 5
    args.num_classes = 7
    with pytest.raises(DataError, match="--num_classes 7 disagrees with the 5 classes"):
        main_finetune.check_num_classes(args, train, val)


def test_evaluate_weights_every_sample_once():
    torch.manual_seed(0)
    model = nn.Linear(3, 5)
    images, labels = torch.randn(11, 3), torch.randint(0, 5, (11,))
    batches = [(images[:4], labels[:4]), (images[4:8], labels[4:8]), (images[8:], labels[8:])]  # 4, 4, 3
    stats = evaluate(batches, model, "cpu", "none", num_classes=5)
    logits = model(images)
    assert stats["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert stats["acc1"] == pytest.approx(100.0 * (logits.argmax(1) == labels).float().mean().item())
    assert stats["acc5"] == pytest.approx(100.0)
    assert "acc5" not in evaluate([(images, labels % 3)], nn.Linear(3, 3), "cpu", "none", num_classes=3)


def test_non_finite_loss_stops_training():
    model = nn.Linear(3, 5)
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    args = Namespace(seed=0, accum_iter=1, clip_grad=None, amp_dtype="none", lr=1e-3, min_lr=0.0, warmup_epochs=0,
                     epochs=1)
    loader = [(torch.randn(4, 3), torch.randint(0, 5, (4,)))] * 3
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 0, step 0 \\(loss=nan\\); stopping without writing a checkpoint"):
        train_one_epoch(model, nn.CrossEntropyLoss(), loader, optimizer, "cpu", 0,
                        main_finetune.misc.LossScaler("none", "cpu"), args)


# ------------------------------------------------------------------------------------------------
# The script
# ------------------------------------------------------------------------------------------------
TINY_RUN = ["--dataset", "synthetic", "--arch", "main_vit_tiny", "--img_size", "32", "--batch_size", "16",
            "--synthetic_size", "64", "--num_workers", "0"]


def error_lines(result) -> list:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_missing_finetune_checkpoint_fails_with_one_clear_line(tmp_path):
    missing = tmp_path / "nothing.pth"
    result = run_script("main_finetune.py", *TINY_RUN, "--epochs", "1", "--output_dir", tmp_path / "FT",
                        "--finetune", missing)
    assert result.returncode == 2
    assert error_lines(result) == [f"error: checkpoint {missing} does not exist (check --finetune / --input)"]
    assert not (tmp_path / "FT" / "checkpoint.pth").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--arch", "main_vit_small"],
     r"^error: checkpoint .*checkpoint\.pth: 'patch_embed\.proj\.weight' has shape \[192, 7, 16, 16\] but the "
     r"model expects \[384, 7, 16, 16\]; use --arch main_vit_tiny as in pretraining$"),
    (["--in_chans", "3"],
     r"^error: checkpoint .*'patch_embed\.proj\.weight' has shape \[192, 7, 16, 16\] but the model expects "
     r"\[192, 3, 16, 16\]; set --in_chans 7"),
], ids=["other-arch", "other-channels"])
def test_mismatched_finetune_checkpoint_fails_with_one_clear_line(pretrained_32, tmp_path, capsys, extra, expected):
    # in-process run_cli (what __main__ calls) to spare a subprocess start; the missing-file test covers __main__
    path, _ = pretrained_32
    exit_code = main_finetune.run_cli([*TINY_RUN, "--epochs", "1", "--output_dir", str(tmp_path / "FT"),
                                       "--finetune", str(path), *extra])
    assert exit_code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(expected, lines[0]), lines
    assert not (tmp_path / "FT" / "checkpoint.pth").exists()


def test_finetune_run_then_eval_reports_the_same_accuracy(pretrained_32, tmp_path):
    path, _ = pretrained_32
    out = tmp_path / "FT"
    # mixup + cutmix: 7-channel batches through timm's Mixup and the soft-target loss
    result = run_script("main_finetune.py", *TINY_RUN, "--epochs", "2", "--finetune", path, "--output_dir", out,
                        "--mixup", "0.8", "--cutmix", "1.0")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line.get("epoch") for line in lines[:2]] == [0, 1]
    for line in lines[:2]:
        assert {"train_loss", "train_lr", "test_loss", "test_acc1", "test_acc5", "n_parameters"} <= line.keys()
    assert lines[2] == {"max_accuracy": max(line["test_acc1"] for line in lines[:2]), "selected_on": "val"}
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["max_accuracy"] == lines[2]["max_accuracy"]
    assert (out / "checkpoint-best.pth").is_file()

    result = run_script("main_finetune.py", *TINY_RUN, "--eval", "--resume", out / "checkpoint.pth",
                        "--output_dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"Accuracy of the network on the (\d+) test images: ([\d.]+)%", result.stdout)
    assert match, result.stdout[-2000:]
    assert int(match.group(1)) == 16  # a quarter of --synthetic_size
    assert float(match.group(2)) == pytest.approx(lines[1]["test_acc1"], abs=0.005)
    assert len((out / "log.txt").read_text().splitlines()) == 3  # --eval trains and logs nothing
