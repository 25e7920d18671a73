"""Representation evaluation: kNN, the MAE baseline, the --knn_freq hook, the linear probe and the
cross-validation table."""
import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert "test_acc1" in log[0] and log[-1] == {"max_accuracy": log[0]["test_acc1"]}
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
    """The checkpoint of a real (tiny) DAMA pretraining run: one epoch, two steps, on the synthetic set."""
    run_script("main_pretrain.py", "--dataset", "synthetic", "--arch", "main_vit_tiny", *TINY, "--synthetic_size", "16",
               "--batch_size", "8", "--epochs", "1", "--decoder_embed_dim", "32", "--decoder_depth", "1",
               "--decoder_num_heads", "2", "--output_dir", out)
    assert [line["epoch"] for line in read_log(out / "log.txt")] == [0]
    return out / "checkpoint.pth"


def fold_result(log_path: Path) -> float:
    """What the table must show for one run: the best test accuracy of its log, which it also records."""
    log = read_log(Path(log_path))
    best = max(line["test_acc1"] for line in log if "test_acc1" in line)
    assert log[-1] == {"max_accuracy": best}
    return best


def check_table(out: Path, names: list, num_folds: int):
    table = json.loads((out / "table.json").read_text())
    markdown = (out / "table.md").read_text().splitlines()
    assert markdown[0] == "|  | " + " | ".join(map(str, range(num_folds))) + " | Avg. ↑ | Err. ↓ |"
    assert [row["name"] for row in table["rows"]] == names and len(markdown) == 2 + len(names)
    reference = table["rows"][0]["mean"]
    for row, line in zip(table["rows"], markdown[2:]):
        assert row["folds"] == [fold_result(log) for log in row["logs"]]  # every number from a real run
        assert [Path(log).parent.name for log in row["logs"]] == [f"fold_{i}" for i in range(num_folds)]
        mean = sum(row["folds"]) / num_folds
        assert row["mean"] == pytest.approx(mean) and row["err"] == pytest.approx(100 - mean)
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells == [row["name"], *(f"{a:.2f}" for a in row["folds"]),
                         f"{mean:.2f}({mean - reference:+.2f})", f"{100 - mean:.2f}"]
    return table


def test_crossval_table_comes_from_real_runs(tmp_path):
    checkpoint = short_dama_run(tmp_path / "dama")
    out = tmp_path / "cv"
    common = ["crossval.py", "--dataset", "synthetic", "--synthetic_size", "20", "--synthetic_img_size", "32",
              "--folds", "2", "--output_dir", out]
    train_args = ["--", "--arch", "main_vit_tiny", *TINY, "--val_crop", "32", "--epochs", "1", "--batch_size", "4"]
    # first call: the runs go through submitit's in-process (debug) cluster, which is cheaper than 4 subprocesses
    run_script(*common, "--submitit", "--checkpoints", "random", f"DAMA={checkpoint}", *train_args,
               "--cluster", "debug", "--ngpus", "1", "--device", "cpu")
    folds = json.loads((out / "folds.json").read_text())
    tests = [sorted(e["path"] for e in fold) for fold in folds["folds"]]
    assert len(tests[0]) == len(tests[1]) == 10 and not set(tests[0]) & set(tests[1])
    for fold in folds["folds"]:  # stratified: 2 images of each of the 5 classes per fold
        assert sorted(e["label"] for e in fold) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    train_files = list((out / "fold_data" / "fold_0" / "train").rglob("*.tif"))
    assert sorted(str(p.resolve()) for p in train_files) == tests[1]  # fold 0 trains on fold 1's images
    check_table(out, ["Random init.", "DAMA"], 2)

    # a later call reuses the split and the finished runs, and adds a row (default: one subprocess per run)
    result = run_script(*common, "--checkpoints", "random", f"DAMA={checkpoint}", f"again={checkpoint}",
                        *train_args)
    assert (out / "runs" / "again" / "fold_1" / "output.txt").is_file()  # the subprocess's output
    assert result.stdout.count("reusing the finished run") == 4 and "Reusing the 2-fold split" in result.stdout
    table = check_table(out, ["Random init.", "DAMA", "again"], 2)
    assert table["rows"][2]["folds"] == table["rows"][1]["folds"]  # same checkpoint, same seeds: same numbers


def test_crossval_errors_name_the_flag(tmp_path):
    result = subprocess.run([sys.executable, "crossval.py", "--dataset", "synthetic", "--folds", "2",
                             "--output_dir", str(tmp_path), "--checkpoints", "DAMA=missing.pth"],
                            cwd=REPO, capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 2 and "--checkpoints 'DAMA=missing.pth'" in result.stderr
    result = subprocess.run([sys.executable, "crossval.py", "--dataset", "synthetic", "--folds", "2",
                             "--output_dir", str(tmp_path), "--checkpoints", "random", "--", "--data_path", "x"],
                            cwd=REPO, capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 2 and "--data_path after `--`" in result.stderr


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
