"""Reconstruction figures: what each DAMA student sees, what it rebuilds, and where student 1 struggled.

One figure row per image, columns (DAMA; the MAE baseline, one student, gets no mask2/rec2 columns):

    input | mask1 | rec1 | mask2 | rec2 | loss1

- input: false-colour composite of three chosen channels (R, G, B; --vis_channels), each channel min-max normalised
  per image; 2-channel data shows channel 0 in red and channel 1 in green, 1-channel data in grey;
- mask1 / mask2: the composite with the patches hidden from student 1 / 2 filled with flat grey (HIDDEN_GREY);
- rec1 / rec2: the student's reconstruction: its visible patches copied from the input, its hidden patches
  predicted and, with norm-pix loss, mapped back to pixels with each target patch's own mean and variance;
- loss1: student 1's per-patch reconstruction loss over its hidden patches, coloured by rank within the image
  (black -> red -> yellow -> white = easiest -> hardest); its visible patches are dark blue. Student 2's mask is
  built from this ordering: it must reconstruct the brightest patches and sees the darkest ones.

With per_channel=True every image row is followed by one grey-scale row per channel with the same columns
(the loss column then shows the channel's name). Reconstructions use the input's display range, so colours
are comparable across a row. Plain torchvision + PIL; no plotting library.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from models_dama import patchify, unpatchify
from util.errors import ConfigError

HIDDEN_GREY = 0.5  # fill of hidden patches in the mask panels (uint8 128)
VISIBLE_BLUE = (0.10, 0.10, 0.35)  # loss panel: patches student 1 saw (no loss drives the masking there)
PAD = 2  # white gap between panels (make_grid padding)
HEADER_HEIGHT = 14  # title strip above the grid, in pixels
DEFAULT_RGB_CHANNELS = (2, 3, 4)  # NeuN, S100, Olig2 of the 7-channel brain-cell panel: neurons, astrocytes, oligos
STUDENT1_COLUMNS = ("input", "mask1", "rec1")
STUDENT2_COLUMNS = ("mask2", "rec2")
LOSS_COLUMN = "loss1"


# --------------------------------------------------------------------------------------------------
# Channels and display ranges
# --------------------------------------------------------------------------------------------------
def default_channels(in_chans: int) -> tuple:
    """(2, 3, 4) for the 7-channel panel (and 5 or more channels); the first three for 3-4 channels; with 2 channels
    channel 0 in red and 1 in green (None: a black blue); the one channel as grey."""
    if in_chans >= 5:
        return DEFAULT_RGB_CHANNELS
    if in_chans >= 3:
        return (0, 1, 2)
    if in_chans == 2:
        return (0, 1, None)
    return (0, 0, 0)


def select_rgb(images: torch.Tensor, channels) -> torch.Tensor:
    """[N, C, H, W] -> [N, 3, H, W]: the chosen channel in each of R, G, B (None: zero)."""
    zero = torch.zeros_like(images[:, :1])
    return torch.cat([images[:, c:c + 1] if c is not None else zero for c in channels], dim=1)


def parse_channels(text: str, in_chans: int, flag: str = "--vis_channels") -> tuple:
    """'2,3,4' -> (2, 3, 4); ValueError naming the flag unless three indices in [0, in_chans)."""
    try:
        channels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected three comma-separated channel indices, e.g. 2,3,4") from None
    if len(channels) != 3 or not all(0 <= c < in_chans for c in channels):
        raise ConfigError(f"{flag} {text!r}: expected three channel indices (R,G,B) between 0 and {in_chans - 1}")
    return channels


def channel_name(channel: int, in_chans: int) -> str:
    """'c2 NeuN' for the 7-channel brain-cell panel, 'c2' otherwise."""
    from util.synthetic import MARKERS  # local: the figure code needs the synthetic module only for names
    return f"c{channel} {MARKERS[channel]}" if in_chans == len(MARKERS) else f"c{channel}"


def display_range(imgs: torch.Tensor):
    """Per-image, per-channel (low, high) of the input, each [N, C, 1, 1]; high > low always."""
    low = imgs.amin(dim=(2, 3), keepdim=True)
    high = imgs.amax(dim=(2, 3), keepdim=True)
    return low, torch.maximum(high, low + 1e-6)  # a flat channel shows as black instead of dividing by 0


def to_display(imgs: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, H, W] in [0, 1] with the input's range (reconstructions may overshoot: clipped)."""
    return ((imgs - low) / (high - low)).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Reconstructions and masks as images
# --------------------------------------------------------------------------------------------------
def unnormalise_patches(pred: torch.Tensor, imgs: torch.Tensor, patch_size: int, norm_pix_loss: bool):
    """Predicted patches [N, L, p*p*C] -> pixel values, undoing norm-pix with each target patch's statistics.

    The model predicts (x - mean) / sqrt(var + 1e-6) per patch (unbiased var, as recon_target), so the inverse
    needs the mean and variance of the true patch, read from the input as MAE's visualisation does.
    """
    if not norm_pix_loss:
        return pred
    target = patchify(imgs, patch_size)  # [N, L, p*p*C]
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred * (var + 1.0e-6) ** 0.5 + mean


def reconstruction(pred, imgs, mask, patch_size: int, norm_pix_loss: bool) -> torch.Tensor:
    """[N, C, H, W] image: visible patches (mask 0) from the input, hidden ones (mask 1) from the prediction."""
    patches = patchify(imgs, patch_size)  # [N, L, p*p*C]
    predicted = unnormalise_patches(pred.float(), imgs, patch_size, norm_pix_loss)
    merged = torch.where(mask.unsqueeze(-1) > 0.5, predicted, patches)
    return unpatchify(merged, patch_size, imgs.shape[1])


def patch_map(values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per-patch values [N, L] (raster order) -> [N, 1, H, W], each patch a flat square."""
    n, num_patches = values.shape
    grid = int(round(num_patches ** 0.5))
    squares = values.float().reshape(n, 1, grid, grid)
    return squares.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def hide_patches(panel: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Fill the hidden patches (mask [N, L] == 1) of panel [N, K, H, W] with flat grey."""
    hidden = patch_map(mask, patch_size) > 0.5  # [N, 1, H, W]
    return torch.where(hidden, torch.full_like(panel, HIDDEN_GREY), panel)


def heat_colours(values: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] in [0, 1] -> [N, 3, H, W] 'hot' colours: black, red, yellow, white in thirds."""
    scaled = values * 3.0
    return torch.cat([scaled.clamp(0, 1), (scaled - 1).clamp(0, 1), (scaled - 2).clamp(0, 1)], dim=1)


def loss_panel(loss_per_patch: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Student 1's per-patch loss [N, L] as colours [N, 3, H, W]: each hidden patch coloured by the rank of its
    loss among the image's hidden patches (0 = easiest -> black, last = hardest -> white).

    Ranks, not values: student 2's mask depends only on the ordering, and a few near-zero patches (flat
    background, where norm-pix targets are all zero) would otherwise squash every other patch into one colour.
    """
    hidden = mask > 0.5
    score = torch.where(hidden, loss_per_patch.float(), torch.full_like(loss_per_patch, float("-inf")))
    rank = score.argsort(dim=1).argsort(dim=1).float()  # visible patches rank first (-inf)
    num_hidden = hidden.sum(dim=1, keepdim=True).float()
    scaled = ((rank - (mask.shape[1] - num_hidden)) / (num_hidden - 1).clamp_min(1)).clamp(0, 1)
    colours = heat_colours(patch_map(scaled, patch_size))
    blue = torch.tensor(VISIBLE_BLUE, dtype=colours.dtype, device=colours.device).view(1, 3, 1, 1)
    return torch.where(patch_map(mask, patch_size) > 0.5, colours, blue.expand_as(colours))


# --------------------------------------------------------------------------------------------------
# The model pass
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def run_model(model, imgs: torch.Tensor, seed: int = 0) -> dict:
    """One forward pass in eval mode with masks drawn from a generator seeded with `seed` (on imgs' device).

    The same seed gives the same masks as model(imgs, generator=torch.Generator(device).manual_seed(seed)).
    The model's train/eval mode is restored afterwards.
    """
    generator = torch.Generator(device=imgs.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model(imgs, generator=generator)
    finally:
        model.train(was_training)
    return {key: value.float() if torch.is_tensor(value) and value.is_floating_point() else value
            for key, value in out.items()}


def student_columns(model) -> tuple:
    """Column titles: the MAE baseline (num_students = 1) repeats student 1 as 'student 2', so it gets no
    student-2 columns."""
    has_student2 = getattr(model, "num_students", 2) > 1
    return STUDENT1_COLUMNS + (STUDENT2_COLUMNS if has_student2 else ()) + (LOSS_COLUMN,)


def raw_panels(model, imgs: torch.Tensor, out: dict) -> dict:
    """Column title -> image [N, C, H, W] in input units (loss1: [N, 3, H, W] colours) before display mapping."""
    p, norm_pix = model.patch_size, getattr(model, "norm_pix_loss", True)
    panels = {"input": imgs}
    for student in range(1, getattr(model, "num_students", 2) + 1):
        mask = out[f"mask{student}"]
        panels[f"mask{student}"] = imgs  # greyed after the display mapping, so the grey stays exact
        panels[f"rec{student}"] = reconstruction(out[f"pred{student}"], imgs, mask, p, norm_pix)
    panels[LOSS_COLUMN] = loss_panel(out["loss1_per_patch"], out["mask1"], p)
    return panels


def displayed(panels: dict, out: dict, patch_size: int, low, high, select) -> dict:
    """Map each image panel to [0, 1] display colours with `select` ([N, C, H, W] -> [N, 3, H, W]) and grey the
    hidden patches of the mask panels; the loss panel is already in colours."""
    shown = {}
    for title, panel in panels.items():
        if title == LOSS_COLUMN:
            shown[title] = panel
            continue
        rgb = select(to_display(panel, low, high))
        if title.startswith("mask"):
            rgb = hide_patches(rgb, out[title], patch_size)
        shown[title] = rgb
    return shown


# --------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------
def figure_size(num_rows: int, num_columns: int, img_size: int) -> tuple:
    """(height, width) in pixels of a figure with that many panel rows and columns."""
    return (HEADER_HEIGHT + num_rows * (img_size + PAD) + PAD, num_columns * (img_size + PAD) + PAD)


def panel_origin(row: int, column: int, img_size: int) -> tuple:
    """(y, x) of the top-left pixel of panel (row, column) in the figure."""
    return HEADER_HEIGHT + PAD + row * (img_size + PAD), PAD + column * (img_size + PAD)


def text_strip(text: str, width: int, height: int, background=255, colour=0) -> torch.Tensor:
    """[3, height, width] float image of `text` in PIL's default font, clipped to the strip."""
    strip = Image.new("RGB", (width, height), (background,) * 3)
    ImageDraw.Draw(strip).text((1, 1), text, fill=(colour,) * 3, font=ImageFont.load_default())
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1).float() / 255.0


def add_header(grid: torch.Tensor, titles, img_size: int) -> torch.Tensor:
    """Grid [3, H, W] -> [3, HEADER_HEIGHT + H, W] with each column's title above it."""
    header = torch.ones(3, HEADER_HEIGHT, grid.shape[-1])
    for column, title in enumerate(titles):
        x = PAD + column * (img_size + PAD)
        header[:, :, x:x + img_size] = text_strip(title, img_size, HEADER_HEIGHT)
    return torch.cat([header, grid.cpu()], dim=1)


def label_panel(text: str, img_size: int) -> torch.Tensor:
    """[3, S, S] white square with `text` at the top (the per-channel rows' name in the loss column)."""
    panel = torch.ones(3, img_size, img_size)
    height = min(HEADER_HEIGHT, img_size)
    panel[:, :height] = text_strip(text, img_size, height)
    return panel


def figure_rows(shown: dict, titles, per_channel_rows) -> list:
    """Panels [3, S, S] in row-major order: the composite row of each image, then its per-channel rows."""
    panels = []
    for i in range(next(iter(shown.values())).shape[0]):
        panels.extend(shown[title][i].cpu() for title in titles)
        for channel_shown, name in per_channel_rows:
            for title in titles:
                is_loss = title == LOSS_COLUMN
                panels.append(label_panel(name, channel_shown["input"].shape[-1]) if is_loss
                              else channel_shown[title][i].cpu())
    return panels


def reconstruction_figure(model, imgs: torch.Tensor, channels=None, per_channel: bool = False,
                          seed: int = 0) -> torch.Tensor:
    """The figure for a batch imgs [N, C, S, S] as a float image [3, H, W] in [0, 1] (layout: module docstring).

    channels: three channel indices shown as R, G, B (default: default_channels(C); None in a slot: black).
    seed: mask generator seed.
    """
    imgs = imgs.float()
    in_chans, img_size = imgs.shape[1], imgs.shape[-1]
    channels = tuple(channels) if channels is not None else default_channels(in_chans)
    out = run_model(model, imgs, seed)
    titles = student_columns(model)
    panels = raw_panels(model, imgs, out)
    low, high = display_range(imgs)
    rgb = displayed(panels, out, model.patch_size, low, high, lambda x: select_rgb(x, channels))
    per_channel_rows = []
    if per_channel:
        for c in range(in_chans):
            grey = displayed(panels, out, model.patch_size, low, high, lambda x, c=c: x[:, [c, c, c]])
            per_channel_rows.append((grey, channel_name(c, in_chans)))
    grid = make_grid(figure_rows(rgb, titles, per_channel_rows), nrow=len(titles), padding=PAD, pad_value=1.0)
    return add_header(grid, titles, img_size)


# --------------------------------------------------------------------------------------------------
# Files, data and the training hook
# --------------------------------------------------------------------------------------------------
def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] float in [0, 1] -> [H, W, 3] uint8 (round to nearest: 0.5 -> 128)."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def save_figure(image: torch.Tensor, path) -> Path:
    """Write a [3, H, W] figure as an RGB PNG (folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path, optimize=True)
    return path


def fixed_batch(dataset, num_images: int, seed: int = 0) -> torch.Tensor:
    """[N, C, S, S] of `num_images` images spread evenly over the dataset, the same on every call.

    Augmentations draw from torch's global RNG; forking it with a fixed seed makes the batch reproducible
    (every --vis_freq epoch and a later visualize.py run show the same views) without disturbing training.
    """
    if num_images < 1:
        raise ConfigError(f"--num_images / --vis_num_images must be at least 1, got {num_images}")
    count = min(num_images, len(dataset))
    indices = torch.linspace(0, len(dataset) - 1, count).round().long().unique().tolist()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([dataset[i][0] for i in indices])


def write_training_figure(model, dataset, epoch: int, log_writer, args) -> Path:
    """--vis_freq hook (main process): <output_dir>/vis/recon_epoch<epoch>.png and TensorBoard 'vis/reconstruction'.

    epoch is 0-based like checkpoint-<epoch>.pth, so the figure and the checkpoint of an epoch share a number.
    """
    device = next(model.parameters()).device
    imgs = fixed_batch(dataset, args.vis_num_images, args.seed).to(device)
    vis_channels = getattr(args, "vis_channels", None)
    channels = parse_channels(vis_channels, imgs.shape[1], "--vis_channels") if vis_channels else None
    image = reconstruction_figure(model, imgs, channels=channels, seed=args.seed)
    path = None
    if args.output_dir:
        path = save_figure(image, Path(args.output_dir) / "vis" / f"recon_epoch{epoch}.png")
        print(f"Wrote reconstruction figure {path}")
    if log_writer is not None:
        log_writer.add_image("vis/reconstruction", image, epoch)  # [3, H, W] in [0, 1]
    return path
