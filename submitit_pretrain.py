"""Launch DAMA pretraining with submitit: SLURM (one process per GPU, --nodes x --ngpus), or locally.

    python submitit_pretrain.py --arch main_vit_tiny --batch_size 64 --epochs 500 --warmup_epochs 40 \
        --mask_ratio 0.8 --mask_overlap_ratio 0.5 --last_k_blocks 6 --norm_pix_loss \
        --data_path path_to_dataset_folder --job_dir path_to_output_folder --nodes 1 --ngpus 4

Takes every flag of main_pretrain.py plus the launcher's (--ngpus --nodes --timeout --partition --job_dir
--cluster ...; see --help). A preempted or timed-out job requeues itself and resumes from
<job_dir>/checkpoint.pth.
"""
import sys

import main_pretrain
from util import launch
from util.cli import run_tool

DESCRIPTION = "submitit launcher for DAMA pretraining"


def parse_args(argv=None):
    """main_pretrain.py's flags plus the launcher's (util/launch.py)."""
    return launch.parse_args(main_pretrain.get_args_parser(), DESCRIPTION, argv)


def submit(args):
    """Check, submit and (--cluster local) follow the job; util.launch.submit."""
    return launch.submit(args, "main_pretrain")


def main(argv=None):
    return submit(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_tool(submit, parse_args()))  # exit codes: util/cli.py; a followed job's own status when it fails
