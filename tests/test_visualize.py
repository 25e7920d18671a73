"""Reconstruction figures, feature extraction and the timm export, on tiny CPU models and one tiny real run."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import extract_features
import main_pretrain
import models_dama
import models_vit
from util.convert import export_encoder
from util.datasets import SyntheticCells, build_finetune_transform
from util.visualize import (HIDDEN_GREY, VISIBLE_BLUE, display_range, figure_size, panel_origin, parse_channels,
                            reconstruction, reconstruction_figure, to_display, to_uint8)

REPO = Path(__file__).resolve().parents[1]
IMG, PATCH, SEED = 64, 16, 0
TINY_DECODER = ["--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2"]


def run_script(*args, timeout=180):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """Output folder of a one-epoch synthetic pretraining with a figure after every epoch (--vis_freq 1) that shows
    channels 0, 3, 5 as R, G, B."""
    out = tmp_path_factory.mktemp("pretrain")
    result = run_script("main_pretrain.py", "--dataset", "synthetic", "--arch", "main_vit_tiny",
                        "--img_size", IMG, "--patch_size", PATCH, *TINY_DECODER, "--synthetic_size", 16,
                        "--batch_size", 8, "--epochs", 1, "--num_workers", 0, "--seed", SEED,
                        "--vis_freq", 1, "--vis_num_images", 2, "--vis_channels", "0,3,5", "--output_dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def tiny_dama(**kwargs) -> models_dama.DAMA:
    """A 32 px, 4x4-patch DAMA small enough to run in milliseconds."""
    torch.manual_seed(0)
    return models_dama.DAMA(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                            decoder_depth=1, decoder_num_heads=2, mask_ratio=0.75, last_k_blocks=1, **kwargs)


def tiny_dama_channels(in_chans: int) -> models_dama.DAMA:
    torch.manual_seed(0)
    return models_dama.DAMA(img_size=32, patch_size=8, in_chans=in_chans, embed_dim=32, depth=2, num_heads=2,
                            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mask_ratio=0.75, last_k_blocks=1)


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))  # [H, W, 3] uint8


def patch_pixels(figure: np.ndarray, row: int, column: int, img_size: int, patch_size: int) -> np.ndarray:
    """[L, p*p, 3] pixels of each patch (raster order) of panel (row, column)."""
    y, x = panel_origin(row, column, img_size)
    panel = figure[y:y + img_size, x:x + img_size]  # [S, S, 3]
    grid = img_size // patch_size
    patches = panel.reshape(grid, patch_size, grid, patch_size, 3).transpose(0, 2, 1, 3, 4)
    return patches.reshape(grid * grid, patch_size * patch_size, 3)


def checkpoint_model(run_dir: Path):
    """(DAMA with the run's final weights, checkpoint dict)."""
    checkpoint = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    args = main_pretrain.get_args_parser().parse_args([])
    vars(args).update(checkpoint["args"])
    model = main_pretrain.build_model(args)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def encoder_features(student: models_dama.MAEStudent, imgs: torch.Tensor):
    """(cls [N, D], mean of patch tokens [N, D]) of the project's encoder with every patch visible."""
    ids_all = torch.arange(student.num_patches).expand(imgs.shape[0], -1)  # [N, L] raster order
    with torch.no_grad():
        latent, _ = student.forward_encoder(imgs, ids_all)  # [N, 1+L, D], after the final norm
    return latent[:, 0], latent[:, 1:].mean(dim=1)


def validation_images(count: int) -> torch.Tensor:
    """The synthetic images extract_features.py embeds by default (val split, 48 px centre crop, resize)."""
    dataset = SyntheticCells(count, IMG, 7, seed=0, split="val", transform=build_finetune_transform(False, IMG, 48))
    return torch.stack([dataset[i][0] for i in range(count)])


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
def test_training_writes_the_figure_and_a_tensorboard_image(pretrain_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    figure = read_png(pretrain_run / "vis" / "recon_epoch0.png")  # epoch numbered like checkpoint-0.pth
    assert figure.shape[:2] == figure_size(num_rows=2, num_columns=6, img_size=IMG)
    events = EventAccumulator(str(pretrain_run), size_guidance={"images": 0})
    events.Reload()
    logged = events.Images("vis/reconstruction")
    assert [(e.step, e.height, e.width) for e in logged] == [(0, *figure.shape[:2])]


def test_visualize_script_reproduces_the_training_figure(pretrain_run, tmp_path):
    out = tmp_path / "recon.png"
    result = run_script("visualize.py", "--checkpoint", pretrain_run / "checkpoint.pth", "--num_images", 2,
                        "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    # same checkpoint weights, same fixed images and the same mask seed as the --vis_freq hook
    expected = read_png(pretrain_run / "vis" / "recon_epoch0.png").astype(int)
    assert np.abs(read_png(out).astype(int) - expected).max() <= 1


def test_mask_panels_show_the_model_masks():
    model, seed = tiny_dama(), 5
    imgs = torch.rand(3, 7, 32, 32)
    figure = to_uint8(reconstruction_figure(model, imgs, seed=seed))
    out = model(imgs, generator=torch.Generator().manual_seed(seed))  # the masks the model draws for that seed
    assert not torch.equal(out["mask1"], out["mask2"])
    grey = round(HIDDEN_GREY * 255)
    for i in range(imgs.shape[0]):
        input_patches = patch_pixels(figure, i, 0, 32, 8)
        for column, mask in ((1, out["mask1"][i]), (3, out["mask2"][i])):
            patches = patch_pixels(figure, i, column, 32, 8)  # [L, p*p, 3]
            drawn_hidden = torch.from_numpy((patches == grey).all(axis=(1, 2))).float()
            assert torch.equal(drawn_hidden, mask), (i, column)
            visible = ~mask.bool().numpy()
            assert np.array_equal(patches[visible], input_patches[visible])  # the input, untouched


def test_loss_panel_ranks_student1_hidden_patches_and_explains_mask2():
    model = tiny_dama()
    imgs = torch.rand(2, 7, 32, 32)
    figure = to_uint8(reconstruction_figure(model, imgs, seed=1))
    out = model(imgs, generator=torch.Generator().manual_seed(1))
    for i in range(2):
        colours = patch_pixels(figure, i, 5, 32, 8)[:, 0].astype(int)  # [L, 3] colour of each (flat) patch
        hidden1, hidden2 = out["mask1"][i].bool().numpy(), out["mask2"][i].bool().numpy()
        assert (colours[~hidden1] == np.round(np.array(VISIBLE_BLUE) * 255)).all()
        brightness = colours.sum(axis=1)
        by_loss = brightness[hidden1][np.argsort(out["loss1_per_patch"][i][hidden1].numpy())]
        assert by_loss[0] == 0 and by_loss[-1] == 3 * 255 and (np.diff(by_loss) > 0).all()  # black ... white
        # student 2 must reconstruct student 1's hardest patches: the brightest ones in the map
        assert brightness[hidden1 & hidden2].min() > brightness[hidden1 & ~hidden2].max()


def test_reconstruction_undoes_norm_pix_and_keeps_visible_patches():
    imgs = torch.rand(2, 3, 16, 16) * 5 + 2
    all_hidden = torch.ones(2, 4)
    perfect = models_dama.recon_target(imgs, 8, norm_pix_loss=True)  # what a perfect student predicts
    torch.testing.assert_close(reconstruction(perfect, imgs, all_hidden, 8, True), imgs, atol=1e-4, rtol=1e-4)
    raw = models_dama.patchify(imgs, 8)
    torch.testing.assert_close(reconstruction(raw, imgs, all_hidden, 8, False), imgs)
    garbage = torch.randn_like(raw)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0]])
    merged = models_dama.patchify(reconstruction(garbage, imgs, mask, 8, False), 8)
    assert torch.equal(merged[mask == 0], raw[mask == 0]) and torch.equal(merged[mask == 1], garbage[mask == 1])


def test_figure_sizes_per_channel_rows_and_the_mae_baseline():
    imgs = torch.rand(2, 7, 32, 32)
    figure = reconstruction_figure(tiny_dama(), imgs, per_channel=True)
    assert figure.shape == (3, *figure_size(num_rows=2 * (1 + 7), num_columns=6, img_size=32))
    mae = models_dama.MAE(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                          decoder_depth=1, decoder_num_heads=2)
    figure = reconstruction_figure(mae, imgs, channels=(0, 5, 6))  # one student: no mask2 / rec2 columns
    assert figure.shape == (3, *figure_size(num_rows=2, num_columns=4, img_size=32))


def test_channels_flag_is_checked():
    assert parse_channels("6,0,2", 7) == (6, 0, 2)
    for bad in ("1,2", "1,2,7", "a,b,c"):
        with pytest.raises(ValueError, match="--vis_channels"):
            parse_channels(bad, 7)


def test_vis_channels_give_the_training_figure_its_size_and_colours(pretrain_run):
    """The --vis_freq figure of the run (--vis_channels 0,3,5): its input panels are channels 0, 3, 5 of the fixed
    batch as R, G, B, each min-max scaled per image."""
    from util.datasets import build_pretrain_dataset
    from util.visualize import display_range, fixed_batch, to_display
    figure = read_png(pretrain_run / "vis" / "recon_epoch0.png").astype(int)
    assert figure.shape == (*figure_size(num_rows=2, num_columns=6, img_size=IMG), 3)
    _, checkpoint = checkpoint_model(pretrain_run)
    args = main_pretrain.get_args_parser().parse_args([])
    vars(args).update(checkpoint["args"])
    assert args.vis_channels == "0,3,5"
    imgs = fixed_batch(build_pretrain_dataset(args), 2, SEED)
    shown = to_display(imgs, *display_range(imgs))[:, [0, 3, 5]]  # [2, 3, S, S]
    for i in range(2):
        y, x = panel_origin(i, 0, IMG)
        expected = to_uint8(shown[i]).astype(int)
        assert np.abs(figure[y:y + IMG, x:x + IMG] - expected).max() <= 1


@pytest.mark.parametrize("in_chans", [1, 2])
def test_one_and_two_channel_data_show_every_channel(in_chans):
    model = tiny_dama_channels(in_chans)
    imgs = torch.rand(2, in_chans, 32, 32)
    figure = to_uint8(reconstruction_figure(model, imgs, seed=0)).astype(int)
    shown = to_uint8(to_display(imgs, *display_range(imgs))[0]).astype(int)  # [S, S, C]
    y, x = panel_origin(0, 0, 32)
    panel = figure[y:y + 32, x:x + 32]  # [S, S, 3]
    if in_chans == 1:  # grey: the one channel in R, G and B
        assert all(np.abs(panel[..., c] - shown[..., 0]).max() <= 1 for c in range(3))
    else:  # channel 0 red, channel 1 green, blue empty
        assert np.abs(panel[..., 0] - shown[..., 0]).max() <= 1 and np.abs(panel[..., 1] - shown[..., 1]).max() <= 1
        assert panel[..., 2].max() == 0


def test_visualize_refuses_vis_channels_out_of_range_in_one_line(pretrain_run, tmp_path, capsys):
    import visualize
    from util.cli import run_tool
    cli = visualize.get_args_parser().parse_args(["--checkpoint", str(pretrain_run / "checkpoint.pth"),
                                                  "--vis_channels", "0,3,7", "--out", str(tmp_path / "x.png")])
    assert run_tool(visualize.main, cli) == 2
    assert capsys.readouterr().err == ("error: --vis_channels '0,3,7': expected three channel indices (R,G,B) between "
                                       "0 and 6\n")
    args = main_pretrain.get_args_parser().parse_args(["--vis_channels", "0,9,1", "--in_chans", "7"])
    with pytest.raises(ValueError, match="--vis_channels '0,9,1'"):
        main_pretrain.resolve_defaults(args)
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------
def test_extracted_features_equal_the_encoder_forward(pretrain_run, tmp_path):
    model, _ = checkpoint_model(pretrain_run)
    imgs = validation_images(6)
    out = tmp_path / "student2_mean.npz"  # through the CLI, as a user would
    result = run_script("extract_features.py", "--checkpoint", pretrain_run / "checkpoint.pth", "--dataset",
                        "synthetic", "--synthetic_size", 6, "--batch_size", 4, "--num_workers", 0,
                        "--student", 2, "--pool", "mean", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = np.load(out)
    _, mean2 = encoder_features(model.student2, imgs)
    np.testing.assert_allclose(saved["features"], mean2.numpy(), rtol=1e-4, atol=1e-5)
    assert saved["labels"].tolist() == [i % 5 for i in range(6)]
    assert saved["paths"].tolist() == [f"synthetic:{i}" for i in range(6)]

    args = extract_features.get_args_parser().parse_args(  # student 1, cls token, in-process
        ["--checkpoint", str(pretrain_run / "checkpoint.pth"), "--synthetic_size", "6", "--num_workers", "0",
         "--pool", "cls", "--out", str(tmp_path / "student1_cls.npz")])
    cls1, _ = encoder_features(model.student1, imgs)
    np.testing.assert_allclose(np.load(extract_features.main(args))["features"], cls1.numpy(), rtol=1e-4, atol=1e-5)


def test_folder_features_keep_paths_and_class_labels(pretrain_run, make_image_folder, tmp_path):
    root = make_image_folder(classes=("astro", "neuron"), n_per_class=2, size=40, splits=("",))
    loose = root / "extra.tif"  # an image directly in the folder: label -1
    loose.write_bytes((root / "astro" / "astro_0.tif").read_bytes())
    args = extract_features.get_args_parser().parse_args(
        ["--checkpoint", str(pretrain_run / "checkpoint.pth"), "--data_path", str(root), "--val_crop", "32",
         "--num_workers", "0", "--batch_size", "2", "--out", str(tmp_path / "feats")])
    saved = np.load(extract_features.main(args))  # '.npz' appended, as np.savez does
    assert saved["paths"].tolist() == [str(root / "astro" / "astro_0.tif"), str(root / "astro" / "astro_1.tif"),
                                       str(root / "neuron" / "neuron_0.tif"), str(root / "neuron" / "neuron_1.tif"),
                                       str(loose)]
    assert saved["labels"].tolist() == [0, 0, 1, 1, -1] and saved["classes"].tolist() == ["astro", "neuron"]
    assert saved["features"].shape == (5, 192) and saved["features"].dtype == np.float32
    np.testing.assert_array_equal(saved["features"][0], saved["features"][4])  # same file, same features


def test_unknown_encoder_size_is_a_clear_error(tmp_path):
    checkpoint = tmp_path / "pretrain.pth"
    torch.save({"model": tiny_dama().state_dict()}, checkpoint)  # width 32, depth 2: no --arch has that
    with pytest.raises(ValueError, match=r"pretrain\.pth: width 32 and depth 2 match none of"):
        extract_features.load_encoder(str(checkpoint))


def test_finetuned_global_pool_features_are_the_pre_logits(tmp_path):
    torch.manual_seed(0)
    model = models_vit.build_vit("main_vit_tiny", img_size=32, num_classes=5, global_pool=True).eval()
    with torch.no_grad():
        model.fc_norm.weight.uniform_(0.5, 1.5)  # a trained fc_norm, not the identity init
    path = tmp_path / "finetuned.pth"
    torch.save({"model": model.state_dict(), "args": {"arch": "main_vit_tiny"}}, path)
    encoder, geometry = extract_features.load_encoder(str(path))
    assert geometry["img_size"] == 32 and geometry["in_chans"] == 7
    imgs = torch.rand(2, 7, 32, 32)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(imgs), pre_logits=True)
        got = extract_features.vit_encoder(encoder)(imgs)  # what extraction computes: the mean through fc_norm
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------
def test_exported_encoder_loads_through_timm_with_the_same_features(pretrain_run, tmp_path):
    model, checkpoint = checkpoint_model(pretrain_run)
    assert any(k.startswith("student2.decoder_pred") for k in checkpoint["model"])  # full file keeps decoders
    path = tmp_path / "encoder.pth"
    export_encoder(str(pretrain_run / "checkpoint.pth"), str(path), student=1)
    imgs = validation_images(3)
    cls1, mean1 = encoder_features(model.student1, imgs)

    vit = timm.create_model("vit_tiny_patch16_224", img_size=IMG, in_chans=7, num_classes=0, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        torch.testing.assert_close(vit(imgs), cls1, rtol=1e-4, atol=1e-5)  # timm's default 'token' pooling
        torch.testing.assert_close(vit.forward_features(imgs)[:, 1:].mean(dim=1), mean1, rtol=1e-4, atol=1e-5)

    # the stored timm config alone rebuilds the 7-channel, 64 px, headless model
    cfg = torch.load(path, weights_only=True)["timm_pretrained_cfg"]
    vit = timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=dict(cfg, file=str(path)))
    with torch.no_grad():
        torch.testing.assert_close(vit.eval()(imgs), cls1, rtol=1e-4, atol=1e-5)
