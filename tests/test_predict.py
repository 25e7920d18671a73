"""Putting a model to work on a slide: predict_cells.py on stardist's real nuclei image (prepared with
prepare_cells.py, a tiny model fine-tuned for one epoch), the timm export that loads with timm alone, checkpoints that
describe themselves (extract_features.py, visualize.py, convert_checkpoint.py) and one pooling default everywhere.

The stardist package ships the image and its mask (a test-only package, installed by .ci/run with --no-deps)."""
import argparse
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import convert_checkpoint
import extract_features
import main_finetune
import main_linprobe
import main_pretrain
import predict_cells
import prepare_cells
import visualize
from util.checkpoint import args_to_dict
from util.cli import run_tool
from util.errors import ConfigError
from util.features import DEFAULT_POOL
from util.inference import build_model, describe_checkpoint, resolve_class_names, resolve_model_flags
from util.knn import add_knn_args
from util.nuclei_demo import CLASSES, write_nuclei_demo
from util.packed import PackedCells
from util.transforms import build_finetune_transform

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--arch", "main_vit_tiny", "--img_size", "32", "--patch_size", "8", "--batch_size", "4", "--num_workers", "0",
        "--device", "cpu"]


def stardist_installed():
    if importlib.util.find_spec("stardist") is None:
        if os.environ.get("CI"):
            pytest.fail("test data package stardist is not installed (see .ci/run)")
        pytest.skip("test data package stardist is not installed: pip install --no-deps stardist==0.9.2")


def prepare(*argv) -> Path:
    return prepare_cells.main(prepare_cells.get_args_parser().parse_args([str(a) for a in argv]))


def pretraining_checkpoint(path: Path, patch_size: int, data_path: Path) -> Path:
    """What main_pretrain.py writes for a 1-channel 32 px DAMA (weights perturbed as after training, full args)."""
    torch.manual_seed(patch_size)
    args = main_pretrain.get_args_parser().parse_args(
        ["--arch", "main_vit_tiny", "--img_size", "32", "--patch_size", str(patch_size), "--in_chans", "1",
         "--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2", "--mask_ratio", "0.5",
         "--data_path", str(data_path)])
    args.channel_names = ["DAPI"]
    model = main_pretrain.build_model(args)
    state = model.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            if not name.endswith("pos_embed"):  # the sin-cos tables stay fixed
                value.add_(torch.randn_like(value), alpha=0.02)
    torch.save({"model": state, "epoch": 3, "args": args_to_dict(args)}, path)
    return path


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory):
    """stardist's nuclei (125, classes dim/medium/bright by intensity) prepared four ways, a patch-8 pretraining
    checkpoint, a classifier fine-tuned from it for one epoch (which records its class names), and a copy of that
    classifier without them."""
    stardist_installed()
    root = tmp_path_factory.mktemp("nuclei")
    demo = write_nuclei_demo(root / "demo")
    common = ["--image", demo["image"], "--crop_size", 32]
    labelled = prepare(*common, "--cells", demo["table"], "--channel_names", "DAPI", "--val_fraction", 0.2,
                       "--output_dir", root / "labelled")
    tiff = prepare(*common, "--cells", demo["table"], "--channel_names", "DAPI", "--val_fraction", 0.2,
                   "--format", "tiff", "--output_dir", root / "tiff")
    masked = prepare(*common, "--cells", demo["mask"], "--channel_names", "DAPI", "--output_dir", root / "masked")
    wide = prepare("--image", demo["image"], "--cells", demo["mask"], "--crop_size", 48, "--output_dir",
                   root / "wide")  # another crop size, and the default channel name channel_0
    pre = pretraining_checkpoint(root / "pre.pth", 8, masked)
    flags = [*TINY, "--in_chans", "1", "--epochs", "1", "--warmup_epochs", "0", "--val_crop", "32", "--blr", "5e-3",
             "--data_path", str(labelled), "--finetune", str(pre), "--output_dir", str(root / "ft")]
    assert run_tool(main_finetune.main, main_finetune.get_args_parser().parse_args(flags)) == 0
    checkpoint = torch.load(root / "ft" / "checkpoint.pth", weights_only=True)
    assert checkpoint["args"]["class_names"] == list(PackedCells(labelled).classes)  # fine-tuning records them
    del checkpoint["args"]["class_names"]  # a classifier from elsewhere (or an older run) that does not
    torch.save(checkpoint, root / "unnamed.pth")
    return dict(root=root, labelled=labelled, tiff=tiff, masked=masked, wide=wide, pre=pre,
                unnamed=root / "unnamed.pth", classifier=root / "ft" / "checkpoint.pth",
                ft_log=root / "ft" / "log.txt")


def predict(*argv):
    """predict_cells.main through run_tool (in process): the exit code."""
    args = predict_cells.get_args_parser().parse_args([str(a) for a in argv] + ["--num_workers", "0", "--device",
                                                                                  "cpu", "--batch_size", "16"])
    return run_tool(predict_cells.main, args)


def read_rows(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def predicted(nuclei):
    out = nuclei["root"] / "pred"
    assert predict("--checkpoint", nuclei["classifier"], "--data_path", nuclei["labelled"], "--output_dir", out) == 0
    return out


def finetuned_model(path: Path):
    """The fine-tuning model main_finetune.py builds, with the checkpoint's weights (independent of util.inference)."""
    checkpoint = torch.load(path, weights_only=True)
    args = argparse.Namespace(**{**checkpoint["args"], "drop_path": 0.0})
    model = main_finetune.build_model(args, num_classes=checkpoint["model"]["head.weight"].shape[0])
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def validation_view(root: Path) -> torch.Tensor:
    """Every cell as fine-tuning validated it (centre crop 32 of a 32 px crop, resize to 32): [N, 1, 32, 32]."""
    dataset = PackedCells(root, transform=build_finetune_transform(False, 32, 32))
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def student_mean_tokens(checkpoint: Path, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """The mean of student 1's final-normed patch tokens with every patch visible (the project's DAMA model), or
    with pool 'cls' its final-normed class token."""
    saved = torch.load(checkpoint, weights_only=True)
    args = main_pretrain.get_args_parser().parse_args([])
    vars(args).update(saved["args"])
    model = main_pretrain.build_model(args)
    model.load_state_dict(saved["model"])
    student = model.eval().student1
    ids = torch.arange(student.num_patches).expand(images.shape[0], -1)
    with torch.no_grad():
        latent, _ = student.forward_encoder(images, ids)  # [N, 1+L, D]
    return latent[:, 0] if pool == "cls" else latent[:, 1:].mean(dim=1)


# ------------------------------------------------------------------------------------------------
# predict_cells.py
# ------------------------------------------------------------------------------------------------
def test_every_cell_gets_a_row_with_the_classifiers_probabilities(nuclei, predicted):
    rows = read_rows(predicted / "predictions.csv")
    names = sorted(CLASSES)
    assert list(rows[0]) == ["index", "slide", "cell_id", "x", "y", "crop_x", "crop_y", "area", "label", "split",
                             "predicted", "probability"] + [f"prob_{name}" for name in names]
    assert [int(row["index"]) for row in rows] == list(range(125))  # every cell once, in cells.npy order
    table = list(csv.DictReader(open(nuclei["labelled"] / "cells.csv")))
    assert [(r["cell_id"], r["label"], r["split"]) for r in rows] == [(r["cell_id"], r["label"], r["split"])
                                                                        for r in table]
    probabilities = np.array([[float(row[f"prob_{name}"]) for name in names] for row in rows])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert [row["predicted"] for row in rows] == [names[i] for i in probabilities.argmax(axis=1)]
    # the checkpoint's own model on fine-tuning's validation view gives the same probabilities
    with torch.no_grad():
        expected = finetuned_model(nuclei["classifier"])(validation_view(nuclei["labelled"])).softmax(dim=1)
    np.testing.assert_allclose(probabilities, expected.numpy(), atol=2e-6)
    # and the accuracy on the val split is the one fine-tuning logged for this checkpoint
    val = [row for row in rows if row["split"] == "val"]
    accuracy = 100.0 * sum(row["predicted"] == row["label"] for row in val) / len(val)
    logged = json.loads(nuclei["ft_log"].read_text().splitlines()[0])["test_acc1"]
    assert accuracy == pytest.approx(logged, abs=1e-6)
    summary = json.loads((predicted / "predict.json").read_text())
    assert summary["cells"] == 125 and summary["accuracy"]["splits"]["val"]["accuracy"] == pytest.approx(logged)


def test_h5ad_holds_the_table_embeddings_positions_and_the_model_description(nuclei, predicted):
    import anndata
    from PIL import Image
    adata = anndata.read_h5ad(predicted / "cells.h5ad")
    rows = read_rows(predicted / "predictions.csv")
    assert adata.n_obs == 125 and list(adata.obs_names) == [row["index"] for row in rows]
    assert {"slide", "cell_id", "x", "y", "area", "label", "split", "predicted", "probability"} <= set(adata.obs)
    assert list(adata.obs["predicted"]) == [row["predicted"] for row in rows]
    np.testing.assert_array_equal(adata.obsm["spatial"], adata.obs[["x", "y"]].to_numpy())
    model = finetuned_model(nuclei["classifier"])
    with torch.no_grad():  # X_dama: the pre-logits, the mean of the patch tokens through fc_norm, as fine-tuning pools
        images = validation_view(nuclei["labelled"])
        expected = model.forward_head(model.forward_features(images), pre_logits=True)
    assert adata.obsm["X_dama"].shape == (125, 192) and adata.obsm["X_dama"].dtype == np.float32
    np.testing.assert_allclose(adata.obsm["X_dama"], expected.numpy(), rtol=1e-5, atol=1e-5)
    uns = adata.uns
    assert list(uns["channel_names"]) == ["DAPI"] and list(uns["class_names"]) == sorted(CLASSES)
    assert uns["arch"] == "main_vit_tiny" and uns["checkpoint"] == str(nuclei["classifier"].resolve())
    assert uns["normalization"]["method"] == "percentile" and uns["pool"] == "mean"
    figure = Image.open(predicted / "map_nuclei.png")
    assert figure.width > 720 and figure.height > 720  # the map, the legend and the confusion matrix beside it


# predict_cells.py with the results gathered 16 rows at a time (63 and 62 per process: several chunks, a short last one)
SMALL_CHUNKS = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
import predict_cells
from util.cli import run_tool
predict_cells.GATHER_CHUNK_ROWS = 16
sys.exit(run_tool(predict_cells.main, predict_cells.get_args_parser().parse_args()))
"""


def test_two_processes_under_torchrun_give_the_same_rows_each_cell_once(nuclei, predicted, tmp_path):
    out = tmp_path / "pred"
    (tmp_path / "predict_small_chunks.py").write_text(SMALL_CHUNKS)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         tmp_path / "predict_small_chunks.py", "--checkpoint", nuclei["classifier"], "--data_path", nuclei["labelled"],
         "--output_dir", out,
         "--device", "cpu", "--num_workers", "0", "--batch_size", "8", "--print_freq", "2"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "cells/s" in result.stdout and "on 2 process(es)" in result.stdout
    single, double = read_rows(predicted / "predictions.csv"), read_rows(out / "predictions.csv")
    assert [row["index"] for row in double] == [str(i) for i in range(125)]
    for one, two in zip(single, double):
        assert {k: v for k, v in one.items() if not k.startswith("prob")} == \
               {k: v for k, v in two.items() if not k.startswith("prob")}
        np.testing.assert_allclose([float(v) for k, v in one.items() if k.startswith("prob")],
                                   [float(v) for k, v in two.items() if k.startswith("prob")], atol=1e-6)
    assert json.loads((out / "predict.json").read_text())["processes"] == 2


def test_a_prepared_tiff_folder_gives_the_same_predictions(nuclei, predicted, tmp_path):
    out = tmp_path / "pred"
    assert predict("--checkpoint", nuclei["classifier"], "--data_path", nuclei["tiff"], "--output_dir", out,
                   "--split", "val") == 0
    rows = read_rows(out / "predictions.csv")
    packed = {row["cell_id"]: row for row in read_rows(predicted / "predictions.csv") if row["split"] == "val"}
    assert len(rows) == len(packed) and rows[0]["file"].startswith("val/")
    for row in rows:
        assert row["predicted"] == packed[row["cell_id"]]["predicted"]
        assert float(row["probability"]) == pytest.approx(float(packed[row["cell_id"]]["probability"]), abs=1e-6)
    # a plain folder of images (here the val/<class>/ files, without the dataset's description): rows are files,
    # labels their class folders, and there are no positions (no spatial coordinates, no map)
    import anndata
    plain = tmp_path / "plain"
    assert predict("--checkpoint", nuclei["classifier"], "--data_path", nuclei["tiff"] / "val", "--output_dir",
                   plain) == 0
    rows = read_rows(plain / "predictions.csv")
    assert len(rows) == len(packed) and {row["label"] for row in rows} == set(CLASSES)
    assert all(row["file"] == row["cell_id"] and row["file"].split("/")[0] == row["label"] and row["x"] == ""
               for row in rows)
    assert "spatial" not in anndata.read_h5ad(plain / "cells.h5ad").obsm and not list(plain.glob("map_*.png"))


def test_embed_only_with_a_pretraining_checkpoint_on_mask_cells(nuclei, tmp_path, capsys):
    import anndata
    out = tmp_path / "emb"
    assert predict("--checkpoint", nuclei["pre"], "--embed_only", "--data_path", nuclei["masked"], "--output_dir",
                   out) == 0
    rows = read_rows(out / "predictions.csv")
    assert len(rows) == 125 and "predicted" not in rows[0] and all(int(row["area"]) > 0 for row in rows)
    adata = anndata.read_h5ad(out / "cells.h5ad")
    expected = student_mean_tokens(nuclei["pre"], validation_view(nuclei["masked"]))
    np.testing.assert_allclose(adata.obsm["X_dama"], expected.numpy(), rtol=1e-5, atol=1e-5)
    assert "class_names" not in adata.uns and not list(out.glob("map_*.png"))
    assert "Embedding 125 cells" in capsys.readouterr().out
    # bf16 autocast (the GPU default; here on the CPU): float32 embeddings close to the float32 run's
    assert predict("--checkpoint", nuclei["pre"], "--embed_only", "--data_path", nuclei["masked"], "--output_dir",
                   tmp_path / "bf16", "--amp_dtype", "bf16") == 0
    low = anndata.read_h5ad(tmp_path / "bf16" / "cells.h5ad").obsm["X_dama"]
    assert low.dtype == np.float32 and not np.array_equal(low, adata.obsm["X_dama"])
    assert np.corrcoef(low.ravel(), adata.obsm["X_dama"].ravel())[0, 1] > 0.999


def test_bad_input_is_one_line_and_nothing_is_written(nuclei, predicted, tmp_path, capsys):
    before = {path.name: path.read_bytes() for path in predicted.iterdir()}
    other = tmp_path / "other"
    (other / "keep.txt").parent.mkdir()
    (other / "keep.txt").write_text("not a prediction")
    fresh = tmp_path / "fresh"
    cases = [
        (["--checkpoint", nuclei["pre"], "--data_path", nuclei["masked"], "--output_dir", fresh],
         r"has no classifier head \(a pretraining checkpoint\); pass --embed_only"),
        (["--checkpoint", nuclei["classifier"], "--data_path", nuclei["wide"], "--output_dir", fresh],
         r"channel names differ: .* trained on \['DAPI'\] but --data_path .* has \['channel_0'\]"),
        (["--checkpoint", nuclei["classifier"], "--data_path", nuclei["wide"], "--output_dir", fresh,
          "--ignore_channel_names", "--val_crop", "64"],
         r"crops are 48 px but this transform needs at least 64 px .* --crop_size 64 or more"),
        (["--checkpoint", nuclei["pre"], "--embed_only", "--data_path", nuclei["labelled"], "--output_dir", predicted],
         r"--output_dir .*pred holds the results of checkpoint .*ft/checkpoint\.pth, not of .*pre\.pth; pass --overwrite"),
        (["--checkpoint", nuclei["classifier"], "--data_path", nuclei["labelled"], "--output_dir", other],
         r"is not empty and holds no predict_cells.py results"),
        (["--checkpoint", nuclei["classifier"], "--data_path", nuclei["labelled"], "--output_dir", fresh, "--pool",
          "cls"], r"--pool cls disagrees with checkpoint .*, which was trained with --pool mean"),
        (["--checkpoint", nuclei["classifier"], "--data_path", nuclei["labelled"], "--output_dir", fresh,
          "--patch_size", "16"], r"--patch_size 16 disagrees with checkpoint .* --patch_size 8"),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        assert predict(*argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert re.search(expected, lines[0]), lines[0]
        assert not fresh.exists()
    assert {path.name: path.read_bytes() for path in predicted.iterdir()} == before
    assert [path.name for path in other.iterdir()] == ["keep.txt"]
    # --resize takes the 48 px crops, resized to the model's 32 px
    assert predict("--checkpoint", nuclei["classifier"], "--data_path", nuclei["wide"], "--output_dir", fresh,
                   "--ignore_channel_names", "--resize") == 0
    assert len(read_rows(fresh / "predictions.csv")) == 125


def test_class_names_come_from_the_checkpoint_else_a_flag_else_numbers(nuclei, capsys):
    description, _ = describe_checkpoint(str(nuclei["unnamed"]))
    assert description["class_names"] is None and description["num_classes"] == 3
    args = argparse.Namespace(class_names=None)
    assert resolve_class_names(args, description) == ["class_0", "class_1", "class_2"]
    assert "stores no class names" in capsys.readouterr().out
    assert resolve_class_names(argparse.Namespace(class_names=["a", "b", "c"]), description) == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="gives 2 names but the classifier .* has 3 outputs"):
        resolve_class_names(argparse.Namespace(class_names=["a", "b"]), description)
    named, _ = describe_checkpoint(str(nuclei["classifier"]))
    with pytest.raises(ConfigError, match=r"--class_names \['a', 'b', 'c'\] disagrees"):
        resolve_model_flags(argparse.Namespace(class_names=["a", "b", "c"]), named)


# ------------------------------------------------------------------------------------------------
# Export: timm alone, at patch 8 and 16
# ------------------------------------------------------------------------------------------------
TIMM_ONLY = r"""
import json, sys
import numpy as np, timm, torch
inputs = torch.from_numpy(np.load("inputs.npz")["x"])
outputs = {}
for name in ("classifier", "encoder8", "encoder16", "encoder8cls"):
    model = timm.create_model(f"local-dir:{name}", pretrained=True).eval()
    with torch.no_grad():
        outputs[name] = model(inputs).numpy()
    outputs[name + "_labels"] = np.array(model.pretrained_cfg.get("label_names") or [])
for name in ("encoder8.pth", "encoder16.pth"):  # the README's snippet: the file describes itself
    cfg = torch.load(name, weights_only=True)["timm_config"]
    model = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                              pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=name)).eval()
    with torch.no_grad():
        outputs[name] = model(inputs).numpy()
np.savez("outputs.npz", **outputs)
ours = [m for m in sys.modules if m.split(".")[0] in ("util", "models_vit", "models_dama", "convert_checkpoint")]
print("repository modules:", ours)
"""


def test_timm_exports_load_with_timm_alone_at_patch_8_and_16(nuclei, tmp_path):
    pre16 = pretraining_checkpoint(tmp_path / "pre16.pth", 16, nuclei["masked"])
    exports = [(nuclei["classifier"], "timm_dir", "classifier"), (nuclei["pre"], "timm_dir", "encoder8"),
               (pre16, "timm_dir", "encoder16"), (nuclei["pre"], "pth", "encoder8.pth"),
               (pre16, "pth", "encoder16.pth"), (nuclei["pre"], "timm_dir", "encoder8cls")]
    for source, kind, name in exports:
        args = convert_checkpoint.get_args_parser().parse_args(
            ["--input", str(source), "--format", kind, "--output", str(tmp_path / name)] +
            (["--pool", "cls"] if name.endswith("cls") else []))
        assert run_tool(convert_checkpoint.main, args) == 0
    images = validation_view(nuclei["labelled"])[:6]
    np.savez(tmp_path / "inputs.npz", x=images.numpy())
    result = subprocess.run([sys.executable, "-I", "-c", TIMM_ONLY], cwd=tmp_path, env=ENV, capture_output=True,
                            text=True, timeout=180)  # -I, another folder: this repository cannot be imported
    assert result.returncode == 0, result.stderr[-3000:]
    assert "repository modules: []" in result.stdout
    outputs = np.load(tmp_path / "outputs.npz")
    with torch.no_grad():
        logits = finetuned_model(nuclei["classifier"])(images)
    np.testing.assert_allclose(outputs["classifier"], logits.numpy(), rtol=1e-4, atol=1e-5)
    assert outputs["classifier_labels"].tolist() == sorted(CLASSES)
    for name, source in (("encoder8", nuclei["pre"]), ("encoder16", pre16)):
        expected = student_mean_tokens(source, images).numpy()  # the default pooling: mean of the patch tokens
        np.testing.assert_allclose(outputs[name], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(outputs[name + ".pth"], expected, rtol=1e-4, atol=1e-5)
    expected = student_mean_tokens(nuclei["pre"], images, pool="cls").numpy()  # --pool cls: the class token
    np.testing.assert_allclose(outputs["encoder8cls"], expected, rtol=1e-4, atol=1e-5)
    config = json.loads((tmp_path / "classifier" / "config.json").read_text())
    assert config["model_args"]["patch_size"] == 8 and config["pretrained_cfg"]["input_size"] == [1, 32, 32]
    assert config["label_names"] == sorted(CLASSES) and config["channel_names"] == ["DAPI"]
    assert config["normalization"]["method"] == "percentile" and config["pretrained_cfg"]["mean"] == [0.0]
    assert json.loads((tmp_path / "encoder16" / "config.json").read_text())["model_args"]["patch_size"] == 16
    # an existing export is kept unless --overwrite
    args = convert_checkpoint.get_args_parser().parse_args(["--input", str(pre16), "--output",
                                                            str(tmp_path / "encoder16.pth")])
    with pytest.raises(ConfigError, match="exists; choose another path or pass --overwrite"):
        convert_checkpoint.main(args)


def test_a_linear_probe_head_is_folded_exactly(nuclei, tmp_path):
    args = argparse.Namespace(arch="main_vit_tiny", img_size=32, patch_size=8, in_chans=1, drop_path=0.0,
                              global_pool=True, finetune="", resume="", optimizer="sgd", student=1)
    model = main_linprobe.build_probe_model(args, num_classes=3)
    with torch.no_grad():  # a trained probe: running statistics and a head that are not the initial ones
        model.head[0].running_mean.uniform_(-1, 1)
        model.head[0].running_var.uniform_(0.5, 2)
        model.head[1].weight.normal_()
    path = tmp_path / "probe.pth"
    torch.save({"model": model.state_dict(), "args": {"arch": "main_vit_tiny"}}, path)
    description, weights = describe_checkpoint(str(path))
    assert description["kind"] == "classifier" and description["num_classes"] == 3
    images = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(build_model(description, weights)(images), model.eval()(images), rtol=1e-5,
                                   atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Checkpoints describe themselves; one pooling default
# ------------------------------------------------------------------------------------------------
def test_extract_features_describes_itself_writes_beside_the_checkpoint_and_keeps_files(nuclei, predicted, capsys):
    import anndata
    argv = ["--checkpoint", str(nuclei["classifier"]), "--data_path", str(nuclei["labelled"]), "--num_workers", "0",
            "--device", "cpu"]
    out = extract_features.main(extract_features.get_args_parser().parse_args(argv))
    assert out == nuclei["classifier"].parent / "checkpoint-features-labelled.npz"  # <ckpt stem>-features-<data>
    # the same pooling and view as predict_cells.py: the same embeddings
    embeddings = anndata.read_h5ad(predicted / "cells.h5ad").obsm["X_dama"]
    np.testing.assert_allclose(np.load(out)["features"], embeddings, rtol=1e-5, atol=1e-5)
    assert str(np.load(out)["pool"]) == "mean"
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        extract_features.main(extract_features.get_args_parser().parse_args(argv))
    extract_features.main(extract_features.get_args_parser().parse_args(argv + ["--overwrite"]))
    for flags, expected in ((["--pool", "cls"], "--pool cls disagrees"),
                            (["--arch", "main_vit_small"], "--arch main_vit_small disagrees .* --arch main_vit_tiny"),
                            (["--in_chans", "7"], "--in_chans 7 disagrees")):
        with pytest.raises(ConfigError, match=expected):
            extract_features.main(extract_features.get_args_parser().parse_args(argv + flags))


def test_visualize_takes_the_model_flags_from_the_checkpoint(nuclei, tmp_path):
    argv = ["--checkpoint", str(nuclei["pre"]), "--num_images", "2", "--device", "cpu", "--out",
            str(tmp_path / "recon.png")]
    with pytest.raises(ConfigError, match="--arch main_vit_small disagrees with checkpoint .*--arch main_vit_tiny"):
        visualize.main(visualize.get_args_parser().parse_args(argv + ["--arch", "main_vit_small"]))
    with pytest.raises(ConfigError, match="--patch_size 16 disagrees .* --patch_size 8"):
        visualize.main(visualize.get_args_parser().parse_args(argv + ["--patch_size", "16"]))
    assert visualize.main(visualize.get_args_parser().parse_args(argv + ["--patch_size", "8"])).is_file()


def test_one_pooling_default_everywhere(nuclei):
    assert DEFAULT_POOL == "mean"
    for module in (main_finetune, main_linprobe):  # global_pool: the mean of the patch tokens -> fc_norm
        parser = module.get_args_parser()
        for flags, global_pool in (([], True), (["--pool", "cls"], False)):
            args = parser.parse_args(flags)
            main_finetune.describe_model(args)  # left out and no checkpoint: the default
            assert args.global_pool is global_pool
    assert add_knn_args(argparse.ArgumentParser()).parse_args([]).knn_pool == "mean"
    description, _ = describe_checkpoint(str(nuclei["pre"]))  # an encoder: the pooling is chosen
    for parser in (extract_features.get_args_parser(), predict_cells.get_args_parser(),
                   convert_checkpoint.get_args_parser()):
        args = parser.parse_args(required_flags(parser))
        resolve_model_flags(args, description)
        assert args.pool == "mean"


def required_flags(parser) -> list:
    flags = []
    for action in parser._actions:
        if action.required:
            flags += [action.option_strings[0], "x"]
    return flags


def test_extract_features_labels_a_prepared_tiff_folder_by_its_cell_table(nuclei, tmp_path):
    """prepare_cells.py --format tiff puts the cells under train/ and val/: their classes come from cells.csv."""
    out = tmp_path / "tiff.npz"
    argv = ["--checkpoint", str(nuclei["classifier"]), "--data_path", str(nuclei["tiff"]), "--num_workers", "0",
            "--device", "cpu", "--out", str(out)]
    features = np.load(extract_features.main(extract_features.get_args_parser().parse_args(argv)))
    assert list(features["classes"]) == sorted(CLASSES) and len(features["labels"]) == 125
    rows = read_rows(nuclei["tiff"] / "cells.csv")
    expected = {str(nuclei["tiff"] / row["file"]): sorted(CLASSES).index(row["label"]) for row in rows}
    assert {str(p): int(label) for p, label in zip(features["paths"], features["labels"])} == expected
