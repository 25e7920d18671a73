"""Export a checkpoint's model: one student's encoder as a .pth, or the whole model as a timm model folder.

    python convert_checkpoint.py --input output_dir/checkpoint.pth --output encoder.pth [--student 2]
    python convert_checkpoint.py --input ft/checkpoint-best.pth --format timm_dir --output cell_classifier

--format pth (default): {'model': the encoder's state dict in timm names, 'pretrained_cfg': what it is (arch, sizes,
channel names, normalisation recipe, ...), 'timm_config': timm's model config (with the patch size and pooling),
'timm_pretrained_cfg': its PretrainedCfg fields}. It loads with `main_finetune.py --finetune OUT`, into timm (see the
README) and as a ViTDet backbone (MMDetection `init_cfg=dict(type='Pretrained', checkpoint=OUT)`). A classifier's
head is not part of it.

--format timm_dir: a folder with model.safetensors and config.json (timm's format: architecture, num_classes,
model_args with the patch size, image size, channels and pooling, pretrained_cfg with input_size / mean / std,
label_names for a classifier; plus channel_names, the normalisation recipe and where the weights come from) that
timm alone loads, offline: `timm.create_model("local-dir:OUT", pretrained=True)` is the checkpoint's classifier
(logits) or, for a pretraining checkpoint, its encoder (model(x) = the pooled embedding, --pool).

Model flags (--arch, --patch_size, --img_size, --in_chans, --pool, --class_names) default to the checkpoint's; a
value that disagrees with it is an error.
"""
import argparse
import json
import sys
from pathlib import Path

from util.channels import add_channel_name_args
from util.cli import CommandLineParser, DescribedHelpFormatter, run_tool
from util.convert import export_channel_names, read_encoder, save_encoder, timm_config
from util.errors import ConfigError
from util.inference import (add_model_flags, build_model, describe_encoder, describe_in_words, parse_class_names,
                            resolve_class_names, resolve_model_flags)
from util.packed import StagedOutput

FORMATS = ("pth", "timm_dir")
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def get_args_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(Path(__file__).name, description=__doc__, formatter_class=DescribedHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="pretraining, fine-tuning, linear-probe or exported checkpoint")
    parser.add_argument("--output", required=True,
                        help="the .pth file (--format pth) or the folder (timm_dir) to write")
    parser.add_argument("--format", default="pth", choices=FORMATS,
                        help="pth: the encoder as a torch file; timm_dir: model.safetensors + config.json, loaded by "
                             "timm.create_model('local-dir:OUT', pretrained=True) (default: %(default)s)")
    parser.add_argument("--student", type=int, choices=(1, 2), default=1,
                        help="which student of a pretraining checkpoint (2 = the reference's --is_momentum; "
                             "default: %(default)s)")
    add_model_flags(parser)
    parser.add_argument("--class_names", default=None, type=parse_class_names,
                        help="comma-separated names of a classifier's classes, in output order (default: the "
                             "checkpoint's, else class_0, class_1, ...)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output (default: refuse)")
    add_channel_name_args(parser)  # checked against the checkpoint's names, or stored when it has none
    return parser


def check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        raise ConfigError(f"--output {path} exists; choose another path or pass --overwrite to replace it")


def export_timm_dir(description: dict, weights: dict, args) -> dict:
    """Write model.safetensors (the timm model's own state dict: a linear probe's head folded into one Linear) and
    config.json into args.output, atomically; returns the config."""
    from safetensors.torch import save_file  # only this export needs it

    description["channel_names"] = export_channel_names(description, args.channel_names, args.input,
                                                        args.ignore_channel_names)
    model = build_model(description, weights, pool=args.pool)
    class_names = resolve_class_names(args, description)
    config = timm_config(description, args.pool, fc_norm="fc_norm.weight" in weights["encoder"],
                         num_classes=model.num_classes, class_names=class_names,
                         extra=dict(kind=description["kind"], student=description["student"] if
                                    description["from_students"] else None, epoch=description["epoch"],
                                    val_crop=description["val_crop"], checkpoint=str(args.input)))
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    with StagedOutput(args.output, overwrite=args.overwrite) as folder:
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return config


def main(args: argparse.Namespace):
    encoder, checkpoint, from_students = read_encoder(args.input, args.student)  # read once, for either format
    description, weights = describe_encoder(encoder, checkpoint, from_students, args.student, args.input)
    resolve_model_flags(args, description)
    output = Path(args.output)
    check_output(output, args.overwrite)
    if args.format == "timm_dir":
        export_timm_dir(description, weights, args)
        print(f"Wrote {output}/{WEIGHTS_FILE} and {CONFIG_FILE}: {describe_in_words(description, args.pool)}; "
              f"timm.create_model('local-dir:{output}', pretrained=True) loads it")
        return output
    if description["kind"] == "classifier":
        print("note: the .pth export holds the encoder only; --format timm_dir keeps the classifier's head")
    metadata = save_encoder(args.output, encoder, checkpoint, args.input, student=args.student,
                            channel_names=args.channel_names, ignore_channel_names=args.ignore_channel_names,
                            pool=args.pool)
    shown = {key: value for key, value in metadata.items() if key != "normalization"}
    shown["normalization"] = (metadata.get("normalization") or {}).get("method")
    print(f"Wrote student {args.student} encoder of {args.input} to {args.output}: " +
          ", ".join(f"{key}={value}" for key, value in shown.items()))
    return output


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
