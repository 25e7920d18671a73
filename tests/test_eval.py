"""Representation evaluation: kNN, the MAE baseline, the --knn_freq hook, the linear probe and the
cross-validation table."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import main_linprobe
import models_dama
import models_vit
from util.convert import load_pretrained_encoder
from util.features import extract_features, student_encoder
from util.knn import knn_accuracy, knn_class_scores

REPO = Path(__file__).resolve().parents[1]
TINY = ["--img_size", "32", "--patch_size", "8", "--num_workers", "0"]
# tiny models run faster on one thread, and stay fast while other processes share the cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_script(*args, timeout=240):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_log(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------
# kNN
# ------------------------------------------------------------------------------------------------
def clustered_features(num_classes=5, per_class=200, dim=16, seed=0):
    """Tight clusters around random orthogonal-ish directions: trivially separable by cosine."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen) * 5
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    feats = centres[labels] + 0.1 * torch.randn(len(labels), dim, generator=gen)
    return feats, labels


def test_knn_is_perfect_on_separable_clusters_and_chance_on_shuffled_labels():
    train_x, train_y = clustered_features(seed=0)
    val_x, val_y = clustered_features(seed=0)  # same centres (seed), fresh noise below
    val_x = val_x + 0.1 * torch.randn(val_x.shape, generator=torch.Generator().manual_seed(1))
    assert knn_accuracy(train_x, train_y, val_x, val_y, 5, k=20) == 100.0

    # labels unrelated to the features: a neighbour's label says nothing about the query's
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(2))]
    val_random = torch.randint(0, 5, val_y.shape, generator=torch.Generator().manual_seed(3))
    acc = knn_accuracy(train_x, shuffled, val_x, val_random, 5, k=20)
    assert 12.0 < acc < 28.0  # chance is 20%; 1000 queries put 3 standard deviations at about +-4%


def test_knn_votes_are_temperature_weighted_cosine_similarities():
    train = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # cosine ignores the length
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[3.0, 0.0]])
    scores = knn_class_scores(train, labels, query, num_classes=2, k=2, temperature=0.5)
    sims = F.normalize(train, dim=1) @ F.normalize(query, dim=1).T  # [3, 1]: 1, 0, 0.707
    expected = torch.tensor([[(sims[0] / 0.5).exp().item(), (sims[2] / 0.5).exp().item()]])  # k=2: rows 0, 2
    assert torch.allclose(scores, expected)
    # k larger than the bank is capped; chunking the queries changes nothing
    many = torch.randn(7, 2)
    assert torch.allclose(knn_class_scores(train, labels, many, 2, k=50, chunk_size=3),
                          knn_class_scores(train, labels, many, 2, k=3))


def test_extract_features_sees_every_patch_in_order():
    student = models_dama.build_model("mae_vit_tiny", img_size=32, patch_size=8, decoder_embed_dim=32, decoder_depth=1,
                                       decoder_num_heads=2).student1.eval()
    images = torch.rand(6, 7, 32, 32)
    loader = torch.utils.data.DataLoader(list(zip(images, range(6))), batch_size=4)
    feats, labels = extract_features(student_encoder(student, "mean"), loader, "cpu")
    assert feats.shape == (6, 192) and labels.tolist() == list(range(6))
    with torch.no_grad():  # the same as the encoder's tokens over the full grid, pooled
        latent, _ = student.forward_encoder(images, torch.arange(16).expand(6, -1))
    assert torch.allclose(feats, latent[:, 1:].mean(dim=1), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# MAE baseline
# ------------------------------------------------------------------------------------------------
def test_mae_has_one_student_and_returns_what_it_computes():
    model = models_dama.build_model("mae_vit_tiny", img_size=32, patch_size=8, mask_ratio=0.75, decoder_depth=1,
                                    mask_sampling="adaptive", last_k_blocks=6)  # DAMA-only options are ignored
    assert not hasattr(model, "student2") and {n.split(".")[0] for n, _ in model.named_parameters()} == {"student1"}
    imgs = torch.rand(2, 7, 32, 32)
    out = model(imgs)
    assert set(out) == {"loss", "mask1", "pred1", "loss1_per_patch", "ids_shuffle1"} and model.loss_terms == ("loss",)
    assert out["mask1"].sum(dim=1).tolist() == [12.0, 12.0]  # 75% of 16 patches hidden
    assert out["pred1"].shape == (2, 16, 8 * 8 * 7)
    # the loss is the norm-pix reconstruction loss over the hidden patches, computed here independently
    target = imgs.reshape(2, 7, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, -1)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((out["pred1"] - target) ** 2).mean(-1)
    torch.testing.assert_close(out["loss"], per_patch[out["mask1"].bool()].mean())
    out["loss"].backward()
    assert model.student1.blocks[0].attn.qkv.weight.grad is not None
    with pytest.raises(ValueError, match="--mask_ratio"):
        models_dama.build_model("mae_vit_tiny", img_size=32, patch_size=8, mask_ratio=1.0)
    # any ratio works, also those DAMA's adaptive masking rejects (< 0.5)
    assert models_dama.build_model("mae_vit_tiny", img_size=32, patch_size=8, mask_ratio=0.3, decoder_depth=1).num_visible == 11


def test_mae_pretraining_with_knn_monitor_then_finetune_load_and_linear_probe(tmp_path):
    out = tmp_path / "mae"
    run_script("main_pretrain.py", "--dataset", "synthetic", "--arch", "mae_vit_tiny", *TINY, "--mask_ratio", "0.75",
               "--synthetic_size", "16", "--batch_size", "8", "--epochs", "1", "--decoder_embed_dim", "32",
               "--decoder_depth", "1", "--decoder_num_heads", "2", "--knn_freq", "1", "--output_dir", out)
    (line,) = read_log(out / "log.txt")
    assert line["epoch"] == 0 and 0.0 <= line["knn_acc1"] <= 100.0 and "train_loss_info" not in line
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out)).Reload()
    assert [e.value for e in events.Scalars("knn/acc1")] == pytest.approx([line["knn_acc1"]])

    # the MAE checkpoint loads for fine-tuning under its own arch name, student 1 as for DAMA
    pretrained = torch.load(out / "checkpoint.pth", weights_only=True)["model"]
    vit = models_vit.build_vit("mae_vit_tiny", img_size=32, patch_size=8, num_classes=5)
    load_pretrained_encoder(vit, str(out / "checkpoint.pth"))
    assert torch.equal(vit.blocks[3].mlp.fc1.weight, pretrained["student1.blocks.3.mlp.fc1.weight"])

    # linear probe: one epoch, only the head learns
    probe = tmp_path / "probe"
    code = main_linprobe.run_cli(["--dataset", "synthetic", "--arch", "mae_vit_tiny", *TINY, "--val_crop", "32",
                                  "--synthetic_size", "16", "--batch_size", "8", "--epochs", "1", "--device", "cpu",
                                  "--finetune", str(out / "checkpoint.pth"), "--output_dir", str(probe)])
    assert code == 0
    log = read_log(probe / "log.txt")
    assert "test_acc1" in log[0] and log[-1] == {"max_accuracy": log[0]["test_acc1"], "selected_on": "val"}
    probed = torch.load(probe / "checkpoint.pth", weights_only=True)["model"]
    encoder_keys = [k for k in probed if not k.startswith(("head.", "fc_norm."))]
    assert len(encoder_keys) > 100
    for key in encoder_keys:
        assert torch.equal(probed[key], pretrained[f"student1.{key}"]), key
    assert set(k for k in probed if k.startswith("head.")) >= {"head.0.running_mean", "head.1.weight"}
    assert not torch.equal(probed["head.0.running_mean"], torch.zeros_like(probed["head.0.running_mean"]))


# ------------------------------------------------------------------------------------------------
# Cross-validation table
# ------------------------------------------------------------------------------------------------
def short_dama_run(out: Path) -> Path:
    """The checkpoint of a real (tiny) DAMA pretraining run: one epoch, two steps, on the synthetic set; --save_init
    also keeps its starting point, checkpoint-init.pth."""
    run_script("main_pretrain.py", "--dataset", "synthetic", "--arch", "main_vit_tiny", *TINY, "--synthetic_size", "16",
               "--batch_size", "8", "--epochs", "1", "--decoder_embed_dim", "32", "--decoder_depth", "1",
               "--decoder_num_heads", "2", "--save_init", "--output_dir", out)
    assert [line["epoch"] for line in read_log(out / "log.txt")] == [0]
    return out / "checkpoint.pth"


def grouped_folder(root: Path, write_image, groups=("a1", "a2", "a3", "a4"), classes=("astro", "neuron"),
                   per_group=2) -> Path:
    """<root>/<class>/<animal>/<n>.tif: every animal has crops of every class (uint16, 40 px)."""
    rng = np.random.default_rng(0)
    for cls in classes:
        for group in groups:
            for n in range(per_group):
                write_image(root / cls / group / f"{n}.tif", rng.integers(0, 65536, (7, 40, 40)).astype(np.uint16))
    return root


def check_grouped_split(folds: dict, num_images: int):
    """From folds.json: the test folds partition the images; per fold test / train / val are disjoint, cover every
    image, and no group is on two of them."""
    tests = [{e["path"] for e in fold["test"]} for fold in folds["folds"]]
    assert sum(map(len, tests)) == num_images and len(set.union(*tests)) == num_images
    for fold in folds["folds"]:
        paths = {split: {e["path"] for e in fold[split]} for split in ("test", "train", "val")}
        groups = {split: {e["group"] for e in fold[split]} for split in ("test", "train", "val")}
        assert len(set.union(*paths.values())) == sum(map(len, paths.values())) == num_images
        assert all(paths.values())  # no empty split
        assert not groups["test"] & (groups["train"] | groups["val"]) and not groups["train"] & groups["val"]
        assert {e["label"] for e in fold["train"]} == {0, 1}  # every class trains


def test_crossval_selects_on_an_inner_grouped_split_and_scores_the_test_fold_once(tmp_path, write_image, capsys):
    import main_finetune
    import main_pretrain
    from util.io import read_tensor_chw
    from util.transforms import build_finetune_transform

    checkpoint = short_dama_run(tmp_path / "dama")
    data = grouped_folder(tmp_path / "cells", write_image)
    out = tmp_path / "cv"
    common = ["crossval.py", "--data_path", data, "--group_by", "parent", "--folds", "2", "--val_fraction", "0.5",
              "--output_dir", out]
    train_args = ["--", "--arch", "main_vit_tiny", *TINY, "--val_crop", "32", "--epochs", "2", "--batch_size", "4"]
    debug = ["--cluster", "debug", "--ngpus", "1", "--device", "cpu"]  # in-process submitit: cheaper than subprocesses
    run_script(*common, "--submitit", "--checkpoints", "random", f"DAMA={checkpoint}", *train_args, *debug)

    folds = json.loads((out / "folds.json").read_text())
    check_grouped_split(folds, 16)
    fold_tree = out / "fold_data" / "fold_0"
    for split in ("train", "val", "test"):  # the training script sees exactly the saved lists
        linked = sorted(str(p.resolve()) for p in (fold_tree / split).rglob("*.tif"))
        assert linked == sorted(e["path"] for e in folds["folds"][0][split])

    table = json.loads((out / "table.json").read_text())
    markdown = (out / "table.md").read_text().splitlines()
    rule = ("selection: epoch chosen on an inner validation split (0.5 of each training part, grouped by parent); "
            "test fold scored once")
    assert markdown[0] == f"| {rule} | 0 | 1 | Avg. ± std ↑ | Err. ↓ |" and table["selection"] == rule[11:]
    reference = table["rows"][0]["mean"]
    for row, line in zip(table["rows"], markdown[2:]):
        for fold, log_path in enumerate(row["logs"]):
            log = read_log(Path(log_path))
            epochs, final = log[:-1], log[-1]
            assert [line["epoch"] for line in epochs] == [0, 1] and all("test_acc1" not in e for e in epochs)
            best = max(range(2), key=lambda e: (epochs[e]["val_acc1"], e))  # best val top-1, ties to the later
            assert final["selected_on"] == "val" and final["max_accuracy"] == epochs[best]["val_acc1"]
            assert final["test_scored_at_epoch"] == best and row["folds"][fold] == final["test_acc1"]
        mean, std = np.mean(row["folds"]), np.std(row["folds"], ddof=1)
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells == [row["name"], *(f"{a:.2f}" for a in row["folds"]),
                         f"{mean:.2f} ± {std:.2f} ({mean - reference:+.2f})", f"{100 - mean:.2f}"]

    # the test fold's number is checkpoint-best.pth evaluated on the test images, recomputed here
    run = Path(table["rows"][1]["logs"][0]).parent
    args = main_finetune.get_args_parser().parse_args(["--arch", "main_vit_tiny", *TINY, "--num_classes", "2"])
    main_finetune.describe_model(args)  # the model flags left out: the defaults
    model = main_finetune.build_model(args, 2).eval()
    model.load_state_dict(torch.load(run / "checkpoint-best.pth", weights_only=True)["model"])
    transform = build_finetune_transform(False, 32, 32)
    entries = folds["folds"][0]["test"]
    with torch.no_grad():
        logits = model(torch.stack([transform(read_tensor_chw(e["path"])) for e in entries]))
    accuracy = 100.0 * (logits.argmax(1) == torch.tensor([e["label"] for e in entries])).float().mean().item()
    assert table["rows"][1]["folds"][0] == pytest.approx(accuracy)

    # the random-init row starts from the pretraining model before training: crossval's main_pretrain.py --epochs 0
    # and the pretraining run's --save_init both hold exactly a freshly built model with the same seed
    (init,) = (out / "random_init").rglob("checkpoint-init.pth")
    assert json.loads((Path(table["rows"][0]["logs"][0]).parent / "crossval_args.json").read_text())["finetune"] == \
        str(init)
    for path, save_init in ((init, False), (tmp_path / "dama" / "checkpoint-init.pth", True)):
        saved = torch.load(path, weights_only=True)
        assert saved["epoch"] == -1 and saved["args"]["save_init"] is save_init
        pretrain_args = main_pretrain.get_args_parser().parse_args([])
        vars(pretrain_args).update(saved["args"])
        torch.manual_seed(0)
        fresh = main_pretrain.build_model(pretrain_args).state_dict()
        assert fresh.keys() == saved["model"].keys() and all(torch.equal(fresh[k], saved["model"][k]) for k in fresh)
        assert torch.equal(saved["model"]["student1.pos_embed"], fresh["student1.pos_embed"])  # fixed sin-cos

    # --metric max_test: the reference's number (the best epoch on the test fold), trained on the whole training
    # part; then --metric last reuses those runs
    pretrain_init = tmp_path / "dama" / "checkpoint-init.pth"  # --random_init: that run's own starting point
    import crossval  # in this process: the debug cluster runs the jobs here anyway
    assert crossval.main([str(a) for a in (*common[1:], "--submitit", "--metric", "max_test", "--random_init",
                                           pretrain_init, "--checkpoints", "random", *train_args, *debug)]) == 0
    table = json.loads((out / "table.json").read_text())
    assert json.loads((Path(table["rows"][0]["logs"][0]).parent / "crossval_args.json").read_text())["finetune"] == \
        str(pretrain_init)
    assert (out / "table.md").read_text().startswith(
        "| selection: best epoch selected on the test fold (the reference's number, biased upward, grouped by parent)")
    logs = [read_log(Path(path)) for path in table["rows"][0]["logs"]]
    assert table["rows"][0]["folds"] == [max(e["test_acc1"] for e in log[:-1]) for log in logs]
    train_files = {str(p.resolve()) for p in (out / "fold_data_no_inner_val" / "fold_0" / "train").rglob("*.tif")}
    assert train_files == {e["path"] for e in folds["folds"][0]["train"] + folds["folds"][0]["val"]}
    capsys.readouterr()
    assert crossval.main([str(a) for a in (*common[1:], "--metric", "last", "--random_init", pretrain_init,
                                           "--checkpoints", "random", *train_args)]) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 2
    table = json.loads((out / "table.json").read_text())
    assert table["selection"] == "last epoch on the test fold (no selection, grouped by parent)"
    assert table["rows"][0]["folds"] == [log[-2]["test_acc1"] for log in logs]


def test_stratified_group_folds_balance_classes_and_keep_groups_whole():
    import crossval
    labels = [i % 5 for i in range(20)]
    folds = crossval.stratified_group_folds(labels, [str(i) for i in range(20)], 2, seed=0)  # no groups
    assert sorted(map(len, folds)) == [10, 10] and not set(folds[0]) & set(folds[1])
    assert all(sorted(labels[i] for i in fold) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] for fold in folds)
    assert crossval.stratified_group_folds(labels, [str(i) for i in range(20)], 2, seed=1) != folds  # seeded
    groups = [f"g{i // 3}" for i in range(20)]  # 7 groups of up to 3
    folds = crossval.stratified_group_folds(labels, groups, 3, seed=0)
    owner = {groups[i]: f for f, fold in enumerate(folds) for i in fold}
    assert all(owner[groups[i]] == f for f, fold in enumerate(folds) for i in fold)  # every group whole
    assert sorted(i for fold in folds for i in fold) == list(range(20)) and min(map(len, folds)) >= 5


def crossval_error(capsys, *argv) -> str:
    """The one stderr line of a crossval call that must fail with exit code 2."""
    import crossval
    assert crossval.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_crossval_bad_input_is_one_line_naming_the_flag(tmp_path, write_image, capsys):
    out = ["--output_dir", tmp_path / "cv"]
    assert "--checkpoints 'DAMA=missing.pth'" in crossval_error(
        capsys, "--dataset", "synthetic", "--folds", "2", *out, "--checkpoints", "DAMA=missing.pth")
    assert "--data_path after `--`" in crossval_error(
        capsys, "--dataset", "synthetic", "--folds", "2", *out, "--checkpoints", "random", "--", "--data_path", "x")
    data = grouped_folder(tmp_path / "cells", write_image, groups=("a1", "a2"), per_group=1)
    assert "--group_by parent: 2 group(s), fewer than --folds 3" in crossval_error(
        capsys, "--data_path", data, "--group_by", "parent", "--folds", "3", *out, "--checkpoints", "random")
    flat = tmp_path / "flat"
    for cls in ("x", "y"):
        for n in range(2):
            write_image(flat / cls / f"{n}.tif", np.zeros((7, 40, 40), np.uint16))
    assert "image(s) lie directly in their class folder" in crossval_error(
        capsys, "--data_path", flat, "--group_by", "parent", "--folds", "2", *out, "--checkpoints", "random")
    assert "--group_by slide: expected 'parent' for a folder of images, or a column of cells.csv" in crossval_error(
        capsys, "--data_path", flat, "--group_by", "slide", "--folds", "2", *out, "--checkpoints", "random")
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "dataset.json").write_text("{}")
    (packed / "cells.csv").write_text("index,slide,cell_id,x,y,area,label,split\n0,s1,1,2,2,9,0,train\n")
    err = crossval_error(capsys, "--data_path", packed, "--group_by", "donor", "--folds", "2", *out,
                         "--checkpoints", "random")
    assert "--group_by donor:" in err and "has no column 'donor'; its columns are index, slide, cell_id" in err
    assert "--val_fraction must be in (0, 0.5], got 0.7" in crossval_error(
        capsys, "--data_path", flat, "--val_fraction", "0.7", *out, "--checkpoints", "random")


def test_knn_monitor_on_a_labelled_folder_matches_a_direct_knn(make_image_folder, tmp_path):
    """--knn_data_path (an ImageFolder with train/ and val/) is what the monitor embeds: its knn_acc1 equals
    a kNN computed here on the same files with the validation transform."""
    import main_pretrain
    from util.errors import DataError
    from util.io import read_image
    from util.transforms import build_finetune_transform
    from util.knn import KnnMonitor
    classes = ("astro", "micro", "neuron")
    root = make_image_folder(classes=classes, n_per_class=3, size=40, name="labelled")
    unlabelled = make_image_folder(n_per_class=4, size=40, flat=True, splits=("",), name="unlabelled")
    flags = ["--data_path", str(unlabelled), "--knn_freq", "2", "--epochs", "3", "--img_size", "32",
             "--patch_size", "8", "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--knn_k", "3",
             "--knn_val_crop", "32"]
    args = main_pretrain.get_args_parser().parse_args([*flags, "--knn_data_path", str(root)])
    main_pretrain.resolve_defaults(args)
    monitor = KnnMonitor(args)
    assert monitor.num_classes == 3 and [len(loader.dataset) for loader in monitor.loaders] == [9, 9]
    assert [monitor.due(epoch) for epoch in range(3)] == [False, True, True]  # every 2 epochs and the last

    torch.manual_seed(0)
    student = models_dama.build_model("main_vit_tiny", img_size=32, patch_size=8, decoder_embed_dim=32, decoder_depth=1,
                                        decoder_num_heads=2).student1
    assert monitor.log(0, student, "cpu") == {}
    (acc,) = monitor.log(1, student, "cpu").values()
    assert student.training  # the monitor restores the mode it found

    transform = build_finetune_transform(False, 32, 32)
    encode = student_encoder(student.eval(), "mean")

    def embed(split):
        files = [(path, label) for label, name in enumerate(classes)
                 for path in sorted((root / split / name).glob("*.tif"))]
        with torch.no_grad():
            feats = encode(torch.stack([transform(read_image(path)) for path, _ in files]))
        return feats, torch.tensor([label for _, label in files])

    expected = knn_accuracy(*embed("train"), *embed("val"), 3, k=3, temperature=0.07)
    assert acc == pytest.approx(expected)

    # a kNN folder without val/ fails up front, naming the flag
    no_val = make_image_folder(classes=classes, n_per_class=1, size=40, splits=("train",), name="no_val")
    args = main_pretrain.get_args_parser().parse_args([*flags, "--knn_data_path", str(no_val)])
    main_pretrain.resolve_defaults(args)
    with pytest.raises(DataError, match="--knn_freq.*val"):
        KnnMonitor(args)


def test_linear_probe_on_a_small_data_set_trains_every_image_and_prints_the_steps(make_image_folder, tmp_path, capsys):
    """11 training crops at --batch_size 4: 3 steps (4 + 4 + 3), not 2 with the last batch dropped; at the default
    batch of 256, one step with all 11 instead of an error."""
    root = make_image_folder(classes=("a", "b"), n_per_class=6, size=36, name="small")
    next((root / "train" / "a").iterdir()).unlink()  # 11 training images
    flags = ["--data_path", str(root), "--arch", "main_vit_tiny", *TINY, "--val_crop", "32", "--epochs", "1",
             "--device", "cpu"]
    assert main_linprobe.run_cli([*flags, "--batch_size", "4", "--output_dir", str(tmp_path / "lp4")]) == 0
    out = capsys.readouterr().out
    assert "3 steps per epoch: 11 training images per process in batches of 4\n" in out
    assert "no test split: the best accuracy is chosen and measured on val" in out
    assert main_linprobe.run_cli([*flags, "--output_dir", str(tmp_path / "lp256")]) == 0
    assert "1 steps per epoch: 11 training images per process in batches of 256\n" in capsys.readouterr().out
    # the submitit launcher's pre-flight of the probe: same batch rule, and the probe's checkpoint.pth (BatchNorm +
    # Linear head) is auto-resumed into the probe model, not into the fine-tuning one
    preflight_args = main_linprobe.get_args_parser().parse_args([*flags, "--epochs", "2",
                                                                "--output_dir", str(tmp_path / "lp256")])
    main_linprobe.preflight(preflight_args, world_size=2)
    out = capsys.readouterr().out
    assert preflight_args.resume == str(tmp_path / "lp256" / "checkpoint.pth")
    assert "pre-flight checks passed: main_vit_tiny, 11 training images of 2 classes for 2 processes of batch 256" in out
    # fine-tuning keeps MAE's drop_last (mixup needs even batches) and says what it drops
    import main_finetune
    assert main_finetune.run_cli([*flags, "--batch_size", "4", "--output_dir", str(tmp_path / "ft")]) == 0
    assert "2 steps per epoch: 11 training images per process in batches of 4, the last 3 dropped" in \
        capsys.readouterr().out
