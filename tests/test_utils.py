"""Tests for util/misc.py, util/lr_sched.py, util/lr_decay.py and util/checkpoint.py (CPU, real files)."""
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from util import checkpoint as ckpt_util
from util import misc
from util.checkpoint import CheckpointError
from util.lr_decay import param_groups_lrd, param_groups_weight_decay
from util.lr_sched import adjust_learning_rate, resolve_lr

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def restore_print():
    """init_distributed_mode replaces builtins.print; undo it after each test."""
    yield
    misc.cleanup_distributed()


def tiny_vit(depth=2):
    return VisionTransformer(img_size=16, patch_size=8, in_chans=3, num_classes=3, embed_dim=16, depth=depth,
                             num_heads=2, global_pool="avg")


def small_training_setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def train_one_step(model, optimizer):
    loss = model(torch.randn(5, 4)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


# ----------------------------------------------------------------------------------------------------------------
# lr schedule
# ----------------------------------------------------------------------------------------------------------------
def schedule_args(**overrides):
    args = dict(lr=1e-3, min_lr=1e-5, warmup_epochs=2, epochs=10)
    args.update(overrides)
    return Namespace(**args)


def test_resolve_lr_scales_blr_with_effective_batch():
    args = Namespace(lr=None, blr=1.5e-4, batch_size=64, accum_iter=2)
    assert resolve_lr(args, world_size=4) == pytest.approx(1.5e-4 * 64 * 2 * 4 / 256)
    assert args.lr == pytest.approx(1.5e-4 * 2)
    given = Namespace(lr=0.01, blr=1.5e-4, batch_size=64, accum_iter=2)
    assert resolve_lr(given, world_size=4) == 0.01


def test_warmup_then_cosine_and_lr_scale():
    args = schedule_args()
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.5},
                                 {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=123.0)
    assert adjust_learning_rate(optimizer, 0.0, args) == 0.0
    assert adjust_learning_rate(optimizer, 1.0, args) == pytest.approx(5e-4)  # halfway through warm-up
    assert adjust_learning_rate(optimizer, 2.0, args) == pytest.approx(1e-3)  # peak at the end of warm-up
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)  # lr_scale applied
    assert optimizer.param_groups[1]["lr"] == pytest.approx(1e-3)
    midpoint = adjust_learning_rate(optimizer, 6.0, args)
    assert midpoint == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert adjust_learning_rate(optimizer, 10.0, args) == pytest.approx(1e-5)


def test_schedule_without_warmup_starts_at_peak():
    args = schedule_args(warmup_epochs=0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert adjust_learning_rate(optimizer, 0.0, args) == pytest.approx(1e-3)
    assert adjust_learning_rate(optimizer, 5.0, args) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)


# ----------------------------------------------------------------------------------------------------------------
# parameter groups
# ----------------------------------------------------------------------------------------------------------------
def group_of_each_param(groups):
    return {id(p): group for group in groups for p in group["params"]}


def test_layer_decay_scales_on_tiny_vit():
    model, decay = tiny_vit(depth=2), 0.5
    groups = param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(),
                              layer_decay=decay)
    by_param = group_of_each_param(groups)
    named = dict(model.named_parameters())
    expected_scale = {"cls_token": decay ** 3, "pos_embed": decay ** 3, "patch_embed.proj.weight": decay ** 3,
                      "blocks.0.attn.qkv.weight": decay ** 2, "blocks.1.mlp.fc2.weight": decay ** 1,
                      "fc_norm.weight": 1.0, "head.weight": 1.0, "head.bias": 1.0}
    for name, scale in expected_scale.items():
        assert by_param[id(named[name])]["lr_scale"] == pytest.approx(scale), name
    for name in ["cls_token", "pos_embed", "patch_embed.proj.bias", "blocks.0.norm1.weight", "blocks.1.attn.qkv.bias",
                 "fc_norm.bias", "head.bias"]:
        assert by_param[id(named[name])]["weight_decay"] == 0.0, name
    for name in ["patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"]:
        assert by_param[id(named[name])]["weight_decay"] == 0.05, name
    assert len(by_param) == len(named)  # every trainable parameter is in exactly one group
    torch.optim.AdamW(groups, lr=1e-3)  # the groups are valid optimizer input


def test_layer_decay_skips_frozen_params():
    model = tiny_vit(depth=1)
    model.pos_embed.requires_grad_(False)
    by_param = group_of_each_param(param_groups_lrd(model, layer_decay=0.75))
    assert id(model.pos_embed) not in by_param
    assert id(model.cls_token) in by_param


def test_weight_decay_groups_for_pretraining():
    model = tiny_vit(depth=1)
    model.pos_embed.requires_grad_(False)  # the fixed sin-cos table of the pretraining model
    groups = param_groups_weight_decay(model, 0.05)
    by_param = group_of_each_param(groups)
    assert id(model.pos_embed) not in by_param
    assert by_param[id(model.blocks[0].norm1.weight)]["weight_decay"] == 0.0
    assert by_param[id(model.head.bias)]["weight_decay"] == 0.0
    assert by_param[id(model.head.weight)]["weight_decay"] == 0.05
    assert by_param[id(model.cls_token)]["weight_decay"] == 0.05  # 3-D: decayed, as in the reference
    assert len(by_param) == sum(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------
def run_args(tmp_path, **overrides):
    args = dict(output_dir=tmp_path, resume="", eval=False, start_epoch=0, input_size=(16, 16), lr=None,
                device=torch.device("cpu"))
    args.update(overrides)
    return Namespace(**args)


def test_save_model_roundtrip_with_weights_only(tmp_path):
    model, optimizer = small_training_setup()
    train_one_step(model, optimizer)
    args = run_args(tmp_path)
    path = ckpt_util.save_model(args, 3, model, optimizer, misc.LossScaler("none", "cpu"),
                                extra={"max_accuracy": 71.5})
    assert path == tmp_path / "checkpoint.pth"
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["epoch"] == 3 and loaded["max_accuracy"] == 71.5
    assert loaded["args"]["output_dir"] == str(tmp_path)
    assert loaded["args"]["input_size"] == [16, 16] and loaded["args"]["device"] == "cpu"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded["model"][name], tensor)
    assert ckpt_util.save_model(args, 50, model, optimizer, None, name=50).name == "checkpoint-50.pth"
    assert ckpt_util.save_model(args, 7, model, optimizer, None, name="best_checkpoint").name == \
        "best_checkpoint.pth"


def test_failed_save_keeps_previous_checkpoint_and_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    ckpt_util.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})

    def save_half_then_fail(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        ckpt_util.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "epoch": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    survivor = ckpt_util.load_checkpoint(path)
    assert survivor["epoch"] == 1 and torch.equal(survivor["model"]["w"], torch.ones(3))


def test_resume_restores_model_optimizer_and_start_epoch(tmp_path):
    model, optimizer = small_training_setup(seed=0)
    for _ in range(2):
        train_one_step(model, optimizer)
    ckpt_util.save_model(run_args(tmp_path), 4, model, optimizer, misc.LossScaler("none", "cpu"),
                         extra={"max_accuracy": 12.0})

    fresh_model, fresh_optimizer = small_training_setup(seed=1)
    args = run_args(tmp_path, resume=str(tmp_path / "checkpoint.pth"))
    checkpoint = ckpt_util.resume(args, fresh_model, fresh_optimizer, misc.LossScaler("none", "cpu"))
    assert args.start_epoch == 5 and checkpoint["max_accuracy"] == 12.0
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[name], tensor)
    saved_state, restored_state = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert restored_state[0]["step"] == saved_state[0]["step"] == 2
    assert torch.equal(restored_state[0]["exp_avg"], saved_state[0]["exp_avg"])


@pytest.mark.parametrize("resumed_world_size, start_step", [(2, 3), (4, 0)])
def test_resume_mid_epoch_continues_only_with_the_same_world_size(tmp_path, capsys, resumed_world_size, start_step):
    """An epoch's batches are dealt to the processes, so the rest of an epoch checkpointed by 2 processes is other
    images for 4: the epoch starts over (and its partial statistics are dropped) instead of skipping 3 steps."""
    model, optimizer = small_training_setup(seed=0)
    train_one_step(model, optimizer)
    ckpt_util.save_model(run_args(tmp_path, world_size=2), 4, model, optimizer, None,
                         extra={"step": 3, "epoch_state": {"loss": 1.5}})

    args = run_args(tmp_path, resume=str(tmp_path / "checkpoint.pth"), world_size=resumed_world_size)
    checkpoint = ckpt_util.resume(args, *small_training_setup(seed=1), None)
    assert (args.start_epoch, args.start_step) == (4, start_step)
    assert ("epoch_state" in checkpoint) == (start_step == 3)
    assert ("epoch 4 starts over" in capsys.readouterr().out) == (start_step == 0)


def test_resume_with_nothing_to_resume_returns_empty(tmp_path):
    model, optimizer = small_training_setup()
    args = run_args(tmp_path)
    assert ckpt_util.resume(args, model, optimizer, None) == {}
    assert args.start_epoch == 0


def test_resume_mismatched_model_names_file_and_keys(tmp_path):
    model, optimizer = small_training_setup()
    path = ckpt_util.save_model(run_args(tmp_path), 0, model, optimizer, None)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2), torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match=r"does not match the model: 2 missing keys \(3.bias, 3.weight\)") as err:
        ckpt_util.resume(run_args(tmp_path, resume=str(path)), other, None, None)
    assert str(path) in str(err.value)


def test_load_checkpoint_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint not found: {missing}")):
        ckpt_util.load_checkpoint(missing)
    not_torch = "not a PyTorch checkpoint (or a truncated one): torch.load cannot read it"
    for name, content in (("corrupt.pth", b"this is not a torch file" * 4), ("notes.txt", b"hello\n"),
                          ("random.bin", bytes(range(256)) * 2)):  # the unpickler raises KeyError, ...: one message
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as error:
            ckpt_util.load_checkpoint(path)
        assert str(error.value) == f"could not read checkpoint {path}: {not_torch}"
    truncated = tmp_path / "truncated.pth"
    torch.save({"model": {"w": torch.ones(100)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])  # e.g. a copy cut short
    with pytest.raises(CheckpointError, match=re.escape(f"could not read checkpoint {truncated}: {not_torch}")):
        ckpt_util.load_checkpoint(truncated)
    weights_only = tmp_path / "weights.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}}, weights_only)
    with pytest.raises(CheckpointError, match='is not a training checkpoint \\(expected a dict with a "model"'):
        ckpt_util.load_checkpoint(weights_only)


def test_load_checkpoint_accepts_reference_namespace_args(tmp_path):
    path = tmp_path / "reference.pth"
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 9, "args": Namespace(blr=1e-3)}, path)
    assert ckpt_util.load_checkpoint(path)["args"] == {"blr": 1e-3}


def test_auto_resume_picks_up_rolling_checkpoint(tmp_path, capsys):
    args = run_args(tmp_path)
    assert ckpt_util.find_resume_checkpoint(args) is None and not args.resume
    model, optimizer = small_training_setup()
    ckpt_util.save_model(args, 2, model, optimizer, None)
    assert ckpt_util.find_resume_checkpoint(args) == str(tmp_path / "checkpoint.pth")
    assert f"Auto-resuming from {tmp_path / 'checkpoint.pth'}" in capsys.readouterr().out
    explicit = run_args(tmp_path, resume="/somewhere/else.pth")
    assert ckpt_util.find_resume_checkpoint(explicit) == "/somewhere/else.pth"


# ----------------------------------------------------------------------------------------------------------------
# misc: loss scaler, autocast, metrics, logs
# ----------------------------------------------------------------------------------------------------------------
def test_loss_scaler_steps_and_clips_on_cpu():
    model, optimizer = small_training_setup()
    scaler = misc.LossScaler("none", device_type="cpu")
    assert not scaler.enabled
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(5, 4)).square().sum() * 100
    grad_norm = scaler(loss, optimizer, clip_grad=1e-3, parameters=model.parameters())
    clipped_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert grad_norm > 1e-3 and clipped_norm == pytest.approx(1e-3, rel=1e-3)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert scaler.state_dict() == {}


def test_loss_scaler_accumulates_without_step_and_returns_none_unclipped():
    model, optimizer = small_training_setup()
    scaler = misc.LossScaler("bf16", device_type="cpu")
    before = [p.detach().clone() for p in model.parameters()]
    assert scaler(model(torch.randn(5, 4)).sum(), optimizer, update_grad=False) is None
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert scaler(model(torch.randn(5, 4)).sum(), optimizer) is None
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_loss_scaler_and_autocast_reject_unknown_dtype():
    with pytest.raises(ValueError, match="'fp8'"):
        misc.LossScaler("fp8")
    with pytest.raises(ValueError, match="needs a cuda device"):
        misc.autocast_context("cpu", "fp16")


def test_autocast_context_bf16_on_cpu():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with misc.autocast_context("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with misc.autocast_context(torch.device("cpu"), "none"):
        assert (a @ b).dtype == torch.float32


def test_all_reduce_mean_single_process():
    assert misc.all_reduce_mean(2.5) == 2.5
    assert misc.all_reduce_mean(torch.tensor(1.25)) == 1.25
    assert misc.get_rank() == 0 and misc.get_world_size() == 1 and misc.is_main_process()


def test_init_distributed_mode_single_process(monkeypatch, capsys):
    for name in ["RANK", "WORLD_SIZE", "LOCAL_RANK"]:
        monkeypatch.delenv(name, raising=False)
    args = Namespace(device="cpu", dist_url="env://", dist_on_itp=False)
    misc.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size) == (False, 0, 1)
    print("hello", force=True)  # the override accepts force= and time-stamps lines
    assert capsys.readouterr().out.strip().endswith("hello")


def test_metric_logger_prints_eta_and_total(capsys):
    logger = misc.MetricLogger(delimiter="  ")
    seen = []
    for step in logger.log_every(range(5), print_freq=2, header="Epoch: [0]"):
        logger.update(loss=torch.tensor(float(step)), lr=0.1)
        seen.append(step)
    out = capsys.readouterr().out
    assert seen == [0, 1, 2, 3, 4]
    assert "Epoch: [0]  [0/5]  eta: 0:00:00" in out and "[4/5]" in out and "[1/5]" not in out
    assert "loss: " in out and "Total time:" in out
    assert logger.loss.global_avg == pytest.approx(2.0) and logger.meters["lr"].value == 0.1


def test_append_json_log(tmp_path):
    misc.append_json_log(tmp_path, {"epoch": 0, "train_loss": torch.tensor(0.5)})
    misc.append_json_log(tmp_path, {"epoch": 1, "train_loss": 0.25})
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"epoch": 0, "train_loss": 0.5},
                                                    {"epoch": 1, "train_loss": 0.25}]


def test_seed_everything_is_reproducible():
    assert misc.seed_everything(7) == 7
    first = torch.rand(3)
    misc.seed_everything(7)
    assert torch.equal(first, torch.rand(3))


# ----------------------------------------------------------------------------------------------------------------
# real 2-process gloo group
# ----------------------------------------------------------------------------------------------------------------
WORKER = textwrap.dedent("""
    import json, os, sys
    from argparse import Namespace
    import torch
    from util import misc

    args = Namespace(device="cpu", dist_url="env://", dist_on_itp=False)
    misc.init_distributed_mode(args)
    rank = misc.get_rank()
    meter = misc.SmoothedValue()
    meter.update(float(rank + 1), n=rank + 1)  # rank 0: 1 x 1.0, rank 1: 2 x 2.0 -> global avg 5/3
    meter.synchronize_between_processes()
    seed = misc.seed_everything(5)  # seed + rank: the ranks draw different masks and augmentations
    result = dict(seed=seed, mask_noise=torch.rand(4).tolist(),
                  rank=rank, world=misc.get_world_size(), args_rank=args.rank, distributed=args.distributed,
                  backend=args.dist_backend, mean_float=misc.all_reduce_mean(float(rank)),
                  mean_tensor=misc.all_reduce_mean(torch.tensor(10.0 * (rank + 1))), global_avg=meter.global_avg)
    print("silenced on rank 1")
    print("RESULT " + json.dumps(result), force=True)
    misc.cleanup_distributed()
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gloo_group():
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], cwd=REPO_ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            outputs.append(out)
    finally:
        for proc in procs:
            proc.kill()
    results = [json.loads(line.split("RESULT ", 1)[1]) for out in outputs for line in out.splitlines()
               if "RESULT " in line]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert sorted(r["seed"] for r in results) == [5, 6] and results[0]["mask_noise"] != results[1]["mask_noise"]
    for r in results:
        assert r["world"] == 2 and r["args_rank"] == r["rank"] and r["distributed"] and r["backend"] == "gloo"
        assert r["mean_float"] == pytest.approx(0.5) and r["mean_tensor"] == pytest.approx(15.0)
        assert r["global_avg"] == pytest.approx(5 / 3)
    assert "| distributed init (rank 0/2): gloo" in outputs[0]
    assert "silenced on rank 1" in outputs[0] and "silenced on rank 1" not in outputs[1]


# ------------------------------------------------------------------------------------------------
# One accumulation rule for both engines; durable checkpoint names
# ------------------------------------------------------------------------------------------------
def test_accumulation_steps_on_every_group_and_weights_a_short_tail_by_its_size():
    from util.misc import accumulation_step
    # 7 steps with accum_iter 3: groups [0, 1, 2], [3, 4, 5] and the tail [6]
    plan = [accumulation_step(step, 7, 3) for step in range(7)]
    assert plan == [(3, False), (3, False), (3, True), (3, False), (3, False), (3, True), (1, True)]
    assert [accumulation_step(step, 4, 1) for step in range(4)] == [(1, True)] * 4


@pytest.mark.parametrize("engine", ["pretrain", "finetune"])
def test_both_engines_step_on_the_tail_with_its_own_weight(engine):
    """5 batches with --accum_iter 2: three optimizer steps, the last one from one batch at full weight."""
    import engine_finetune
    import engine_pretrain
    from util.misc import LossScaler

    steps, losses = [], []

    class Recorder(torch.optim.SGD):
        def step(self, closure=None):
            steps.append(self.param_groups[0]["params"][0].grad.clone())
            return super().step(closure)

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.ones(()))
    batches = [(torch.full((2, 1), float(i + 1)), torch.zeros(2, dtype=torch.long)) for i in range(5)]
    args = Namespace(seed=0, accum_iter=2, print_freq=1, amp_dtype="none", clip_grad=None, lr=0.1, min_lr=0.0,
                     warmup_epochs=0, epochs=1, stable_epoch=0)
    optimizer = Recorder([weight], lr=0.1)
    if engine == "pretrain":
        class Model(torch.nn.Module):
            loss_terms = ("loss",)

            def __init__(self):
                super().__init__()
                self.weight = weight

            def forward(self, imgs, info_weight=1.0):
                losses.append(imgs.mean().item())
                return {"loss": self.weight * imgs.mean()}
        engine_pretrain.train_one_epoch(Model(), batches, optimizer, torch.device("cpu"), 0, LossScaler(), None, args)
    else:
        class Classifier(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = weight

            def forward(self, imgs):
                return self.weight * imgs.repeat(1, 2)  # [N, 2] logits

        criterion = lambda logits, targets: logits.mean()  # noqa: E731  the gradient is the mean input value
        engine_finetune.train_one_epoch(Classifier(), criterion, batches, optimizer, "cpu", 0, LossScaler(), args)
    # d loss / d weight of batch i is its value i + 1: groups (1, 2), (3, 4), (5) averaged within each group
    assert [g.item() for g in steps] == pytest.approx([1.5, 3.5, 5.0])


def test_save_checkpoint_flushes_the_folder_after_the_rename(tmp_path, monkeypatch):
    import os
    import stat

    from util.checkpoint import save_checkpoint
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    save_checkpoint(tmp_path / "c.pth", {"x": torch.ones(2)})
    assert synced == [False, True]  # the file's data, then the folder entry that names it
