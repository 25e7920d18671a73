"""Launch DAMA fine-tuning with submitit: SLURM (one process per GPU, --nodes x --ngpus), or locally.

    python submitit_finetune.py --arch main_vit_tiny --batch_size 128 --epochs 150 \
        --data_path path_to_dataset_folder --finetune path_to_pretrained_file \
        --job_dir path_to_output_finetune_folder --dist_eval --nodes 1 --ngpus 4

Takes every flag of main_finetune.py plus the launcher's (--ngpus --nodes --timeout --partition --job_dir
--cluster ...; see --help). A preempted or timed-out job requeues itself and resumes from
<job_dir>/checkpoint.pth.
"""
import sys

import main_finetune
from util import launch
from util.cli import run_tool

DESCRIPTION = "submitit launcher for DAMA fine-tuning"


def parse_args(argv=None):
    """main_finetune.py's flags plus the launcher's (util/launch.py)."""
    return launch.parse_args(main_finetune.get_args_parser(), DESCRIPTION, argv)


def submit(args):
    """Check, submit and (--cluster local) follow the job; util.launch.submit."""
    return launch.submit(args, "main_finetune")


def main(argv=None):
    return submit(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_tool(submit, parse_args()))  # exit codes: util/cli.py; a followed job's own status when it fails
