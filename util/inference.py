"""Any checkpoint as a ready timm model that describes itself: what predict_cells.py, extract_features.py and
convert_checkpoint.py build from a checkpoint, the flags that must agree with it, and the view the model is shown.

Kinds of checkpoint:
  classifier  main_finetune.py's (a timm VisionTransformer with its head) or main_linprobe.py's (its head
              BatchNorm1d(affine=False) -> Linear is folded here into one Linear: exact in eval mode)
  encoder     a pretraining checkpoint (one student, --student), an encoder exported by convert_checkpoint.py, a
              reference-code checkpoint: no classifier head

`describe_checkpoint` reads the description from the weights (arch, patch size, image size, channels, number of
classes, pooling) and the run's saved args (arch name, class names, channel names, normalisation recipe, mean/std,
the validation crop). `resolve_model_flags` fills the flags a command leaves out from it and refuses a flag that
disagrees (one line naming both values). Every model is a timm VisionTransformer (models_vit.build_vit) whose
embedding of an image is `model.forward_head(model.forward_features(x), pre_logits=True)`:

  pool 'mean' (the default everywhere)  the mean of the patch tokens: through fc_norm for a classifier fine-tuned
                                        with global pooling (its pre-logits), after the final norm for an encoder
  pool 'cls'                            the class token after the final norm

A classifier's pooling is fixed by its weights (fc_norm or not); an encoder's is chosen with --pool.
"""
import argparse
from pathlib import Path

import numpy as np
import torch

import models_vit
from models_dama import ARCH_CONFIGS
from util.checkpoint import fill_from_checkpoint, load_model_strict
from util.convert import (checkpoint_args, check_shapes, encoder_metadata, fit_pos_embed, read_encoder,
                          strip_prefix, DDP_PREFIX)
from util.datasets import ImageFileDataset, class_folders, image_folder_samples, list_images
from util.errors import CheckpointError, ConfigError, DataError
from util.filelist import FileList, check_files
from util.packed import (describe_folder_dataset, prepared_layout, read_cell_table, read_dataset_info,
                         split_positions, take_rows)
from util.features import DEFAULT_POOL
from util.transforms import DEFAULT_VAL_CROP, CentreCropResize, TensorTransform, dtype_scale
from util.transforms import resize as resize_to

MODEL_FLAGS = ("arch", "patch_size", "img_size", "in_chans")
LINPROBE_BN_EPS = 1e-6  # main_linprobe.build_probe_model's BatchNorm1d(affine=False, eps=1e-6)


# --------------------------------------------------------------------------------------------------
# Reading a checkpoint
# --------------------------------------------------------------------------------------------------
def classifier_head(state_dict: dict):
    """{'weight' [K, D], 'bias' [K]} of a classifier's head, or None when the weights have none.

    main_linprobe.py's head BatchNorm1d(affine=False) -> Linear is folded into one Linear: in eval mode the
    BatchNorm is (x - mean) / sqrt(var + eps), so W' = W / sqrt(var + eps) and b' = b - W' mean (in float64)."""
    if any(key.startswith(DDP_PREFIX) for key in state_dict):
        state_dict = strip_prefix(state_dict, DDP_PREFIX)
    weight = state_dict.get("head.weight")
    if torch.is_tensor(weight) and weight.ndim == 2:
        return {"weight": weight.float(), "bias": state_dict["head.bias"].float()}
    if "head.1.weight" in state_dict and "head.0.running_mean" in state_dict:
        scale = (state_dict["head.0.running_var"].double() + LINPROBE_BN_EPS).rsqrt()  # [D]
        folded = state_dict["head.1.weight"].double() * scale  # [K, D]
        bias = state_dict["head.1.bias"].double() - folded @ state_dict["head.0.running_mean"].double()
        return {"weight": folded.float(), "bias": bias.float()}
    return None


def stored_class_names(checkpoint: dict, num_classes: int):
    """The class names fine-tuning stored in its args (args.class_names) when there are num_classes of them."""
    names = checkpoint_args(checkpoint).get("class_names")
    if isinstance(names, (list, tuple)) and num_classes and len(names) == num_classes:
        return [str(name) for name in names]
    return None


def describe_checkpoint(path: str, student: int = 1) -> tuple:
    """(description, weights) of any checkpoint; errors name the file.

    description: kind ('classifier' / 'encoder'), arch, img_size, patch_size, in_chans, embed_dim, depth, num_heads,
    num_classes (0 for an encoder), class_names (stored ones, or None), pool (fixed by the weights: 'mean' with an
    fc_norm, 'cls' for a classifier without one; None: the caller chooses), channel_names, normalization, mean, std
    (None for raw intensities), val_crop (fine-tuning's, or None), epoch, student, from_students, path.
    weights: {'encoder': timm-named encoder state dict, 'head': classifier_head(...) or None}.
    """
    return describe_encoder(*read_encoder(path, student), student, path)


def describe_encoder(encoder: dict, checkpoint: dict, from_students: bool, student: int, path: str) -> tuple:
    """describe_checkpoint from read_encoder's (encoder, checkpoint, from_students), for a caller that keeps them."""
    head = None if from_students else classifier_head(checkpoint.get("model", checkpoint))
    description = encoder_metadata(encoder, checkpoint, student, path)
    if not description["arch"]:
        raise CheckpointError(f"checkpoint {path}: width {description['embed_dim']} and depth {description['depth']} "
                              f"match none of {sorted(ARCH_CONFIGS)}")
    num_classes = int(head["weight"].shape[0]) if head is not None else 0
    has_fc_norm = "fc_norm.weight" in encoder
    val_crop = checkpoint_args(checkpoint).get("val_crop")
    description.update(
        kind="classifier" if head is not None else "encoder", num_classes=num_classes,
        class_names=stored_class_names(checkpoint, num_classes),
        pool="mean" if has_fc_norm else ("cls" if head is not None else None),
        val_crop=int(val_crop) if isinstance(val_crop, int) else None, from_students=from_students, path=str(path))
    return description, {"encoder": encoder, "head": head}


# --------------------------------------------------------------------------------------------------
# Flags that describe the model
# --------------------------------------------------------------------------------------------------
def parse_class_names(text: str) -> list:
    """'astrocyte, neuron' -> ['astrocyte', 'neuron'] (argparse type of --class_names)."""
    names = [name.strip() for name in str(text).split(",")]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct comma-separated class names, e.g. "
                                         f"neuron,astrocyte")
    return names


def add_model_flags(parser, img_size_help: str = None):
    """--arch, --patch_size, --img_size, --in_chans and --pool, all taken from the checkpoint when left out."""
    parser.add_argument("--arch", default=None, choices=sorted(ARCH_CONFIGS),
                        help="encoder size (default: the checkpoint's; another value is an error)")
    parser.add_argument("--patch_size", default=None, type=int,
                        help="patch size (default: the checkpoint's; another value is an error)")
    parser.add_argument("--img_size", default=None, type=int,
                        help=img_size_help or "model input size (default: the checkpoint's; another value is an error)")
    parser.add_argument("--in_chans", default=None, type=int,
                        help="image channels (default: the checkpoint's; another value is an error)")
    parser.add_argument("--pool", default=None, choices=("mean", "cls"),
                        help=f"image embedding: mean of the patch tokens or the cls token (default: a classifier's own "
                             f"pooling, which cannot be changed, else {DEFAULT_POOL})")
    return parser


def resolve_model_flags(args, description: dict, loose=()) -> None:
    """Checkpoints describe themselves: each of arch, patch_size, img_size, in_chans, pool and class_names that the
    command has and leaves out (None) takes the checkpoint's value (pool: DEFAULT_POOL for an encoder); a given
    value that disagrees is a ConfigError naming both, except for the keys in `loose` (e.g. img_size where a script
    resamples the position embedding)."""
    stored = {key: description[key] for key in MODEL_FLAGS}
    for key in ("pool", "class_names"):
        if description.get(key):
            stored[key] = description[key]
    source = f"checkpoint {description['path']}"
    present = [key for key in (*MODEL_FLAGS, "pool", "class_names") if hasattr(args, key)]
    fill_from_checkpoint(args, {key: None for key in present if key not in loose}, stored, source, strict=True)
    fill_from_checkpoint(args, {key: None for key in present if key in loose}, stored, source, strict=False)
    if hasattr(args, "pool") and args.pool is None:
        args.pool = DEFAULT_POOL


def resolve_class_names(args, description: dict) -> list:
    """The classifier's class names: the checkpoint's, else --class_names (one per class), else class_0, class_1, ..."""
    count = description["num_classes"]
    names = getattr(args, "class_names", None) or description.get("class_names")
    if names and len(names) != count:
        raise ConfigError(f"--class_names gives {len(names)} names but the classifier of {description['path']} has "
                          f"{count} outputs")
    if not names and count:
        names = [f"class_{i}" for i in range(count)]
        print(f"note: {description['path']} stores no class names (fine-tuning records them in args.class_names); "
              f"naming its {count} classes {names[0]} ... {names[-1]} (--class_names A,B,... names them)")
    return list(names or [])


def describe_in_words(description: dict, pool: str) -> str:
    kind = (f"{description['num_classes']}-class classifier" if description["kind"] == "classifier" else
            f"encoder (student {description['student']})" if description["from_students"] else "encoder")
    return (f"{description['arch']} {kind}, {description['img_size']} px, patch {description['patch_size']}, "
            f"{description['in_chans']} channels, {pool} pooling")


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
def build_model(description: dict, weights: dict, img_size: int = None, pool: str = None, with_head: bool = True):
    """The timm VisionTransformer of a described checkpoint in eval mode: the classifier with its head (with_head
    and a classifier), else headless (num_classes 0). img_size other than the checkpoint's resamples the position
    embedding; pool chooses an encoder's pooling (a classifier keeps its own)."""
    encoder, head = weights["encoder"], weights["head"] if with_head else None
    has_fc_norm = "fc_norm.weight" in encoder
    pool = description["pool"] or pool or DEFAULT_POOL
    num_classes = int(head["weight"].shape[0]) if head is not None else 0
    model = models_vit.build_vit(description["arch"], img_size=img_size or description["img_size"],
                                 patch_size=description["patch_size"], in_chans=description["in_chans"],
                                 num_classes=num_classes, drop_path_rate=0.0, global_pool=has_fc_norm)
    if not has_fc_norm:  # the final norm stays; the pooling of its tokens is the chosen one (timm's own switch)
        model.reset_classifier(num_classes, "avg" if pool == "mean" else "token")
    state = dict(encoder)
    if head is not None:
        state.update({"head.weight": head["weight"], "head.bias": head["bias"]})
    check_shapes(state, model, description["path"], description["arch"])
    fit_pos_embed(state, model)
    load_model_strict(model, state, description["path"])
    return model.eval()


def embed_and_classify(model, images: torch.Tensor):
    """(embeddings [N, D], logits [N, K] or None for a headless model) of a batch [N, C, S, S]."""
    embeddings = model.forward_head(model.forward_features(images), pre_logits=True)  # pooled (+ fc_norm)
    logits = model.head(embeddings) if model.num_classes else None
    return embeddings, logits


# --------------------------------------------------------------------------------------------------
# The view
# --------------------------------------------------------------------------------------------------
def view_crop(args, description: dict) -> int:
    """The centre crop shown to the model: --val_crop, else fine-tuning's (stored in its checkpoint), else
    DEFAULT_VAL_CROP."""
    given = getattr(args, "val_crop", None)
    return int(given or description.get("val_crop") or DEFAULT_VAL_CROP)


def build_view(img_size: int, crop: int, mean=None, std=None, resize: bool = False) -> TensorTransform:
    """Fine-tuning's validation view for a [C, H, W] image (integers as stored, or float): centre crop `crop`,
    resized to img_size (bicubic), then (x - mean) / std when the checkpoint's recipe has them. resize: each image
    is first resized to img_size x img_size (crops prepared at another size)."""
    if resize and crop > img_size:
        raise ConfigError(f"--val_crop {crop} is larger than the model's {img_size} px input, to which --resize "
                          f"scales each crop first")
    return PredictionView(img_size, crop, mean, std, resize)


class PredictionView(TensorTransform):
    """util.transforms.CentreCropResize (fine-tuning's validation view), optionally after a resize of the whole
    crop to the model's input and followed by a mean/std normalisation."""

    def __init__(self, img_size: int, crop: int, mean=None, std=None, resize: bool = False):
        self.centre = CentreCropResize(img_size, crop)
        self.img_size, self.resize = img_size, resize
        self.min_side = 1 if resize else crop
        self.mean = None if mean is None else torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.resize:  # the whole crop to the model's size first, in [0, 1] float
            image = resize_to((image.to(torch.float32) * dtype_scale(image.dtype))[None], self.img_size)[0]
        x = self.centre(image)
        return x if self.mean is None else (x - self.mean) / self.std


# --------------------------------------------------------------------------------------------------
# Image folders (predict_cells.py, extract_features.py)
# --------------------------------------------------------------------------------------------------
def folder_table(root: Path, relpaths, labels, classes) -> dict:
    """A cell table for images without one: no slide, no position; cell_id = the file's path in the folder."""
    count = len(relpaths)
    return dict(index=np.arange(count), slide=np.full(count, "", dtype=object).astype(str),
                cell_id=np.array(relpaths, dtype=str), x=np.full(count, np.nan), y=np.full(count, np.nan),
                crop_x=np.full(count, -1), crop_y=np.full(count, -1), area=np.full(count, -1),
                label=np.array([classes[i] if i >= 0 else "" for i in labels], dtype=str),
                split=np.full(count, "", dtype=object).astype(str), file=np.array(relpaths, dtype=str))


def list_folder_images(root: Path, split=None, require_split: bool = False) -> tuple:
    """(relative paths, labels, classes, table): a prepared TIFF folder's cells (its cells.csv: the class of each
    cell, whatever split folder holds it; `split` picks one), or a folder's images in class sub-folders (labelled)
    and directly in it (label -1)."""
    if prepared_layout(root) == "tiff":
        info, table = read_dataset_info(root), read_cell_table(root, optional_columns=("file",))
        table = take_rows(table, split_positions(table, split, root, require_split))
        classes = list(info["classes"])
        labels = [classes.index(label) if label in classes else -1 for label in table["label"].tolist()]
        return table["file"].tolist(), labels, classes, table
    classes = class_folders(root)
    samples = image_folder_samples(root, classes) + [(path, -1) for path in list_images(root, recursive=False)]
    if not samples:
        raise DataError(f"--data_path {root}: no images found (class sub-folders or images directly in it)")
    relpaths = [str(Path(path).relative_to(root)) for path, _ in samples]
    labels = [label for _, label in samples]
    return relpaths, labels, classes, folder_table(root, relpaths, labels, classes)


def open_image_folder(root: Path, in_chans: int, view, normalization=None, channel_names=None, split=None,
                      require_split: bool = False):
    """(ImageFileDataset, its cell table): every file's header checked first (channels, size: view.min_side), all
    bad files reported at once; the checkpoint's recipe applied to raw images (a prepared folder is already
    normalised)."""
    relpaths, labels, classes, table = list_folder_images(root, split, require_split)
    files = FileList.from_paths(root, relpaths, labels, classes)
    files, _, _ = check_files(files, in_chans, view.min_side)
    dataset = ImageFileDataset(files, classes, in_chans, view)
    folder_args = argparse.Namespace(channel_names=channel_names, normalization=normalization)
    dataset = describe_folder_dataset(dataset, root, folder_args, estimate=False)
    return dataset, table
