"""Export one student's encoder from a DAMA pretraining checkpoint as an encoder-only checkpoint.

The output ({'model': timm ViT state dict, 'pretrained_cfg': {...}}, which keeps the channel names and the
normalisation recipe of the pretraining data) loads with
`main_finetune.py --finetune OUT`, into `timm.create_model('vit_tiny_patch16_224', in_chans=7, ...)`
and as a ViTDet backbone (MMDetection `init_cfg=dict(type='Pretrained', checkpoint=OUT)`).

    python convert_checkpoint.py --input output_dir/checkpoint.pth --output encoder.pth [--student 2]
"""
import argparse
import sys

from util.channels import add_channel_name_args
from util.cli import run_tool
from util.convert import export_encoder


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DAMA encoder export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="pretraining checkpoint (checkpoint.pth)")
    parser.add_argument("--output", required=True, help="where to write the encoder-only checkpoint")
    parser.add_argument("--student", type=int, choices=(1, 2), default=1,
                        help="which student's encoder to export (2 = the reference's --is_momentum)")
    add_channel_name_args(parser)  # checked against the checkpoint's names, or stored when it has none
    return parser


def main(args: argparse.Namespace) -> None:
    metadata = export_encoder(args.input, args.output, student=args.student, channel_names=args.channel_names,
                              ignore_channel_names=args.ignore_channel_names)
    shown = {key: value for key, value in metadata.items() if key != "normalization"}
    shown["normalization"] = (metadata.get("normalization") or {}).get("method")
    print(f"Wrote student {args.student} encoder of {args.input} to {args.output}: " +
          ", ".join(f"{key}={value}" for key, value in shown.items()))


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
