"""Channel names that travel with the model, and the one check that compares them with the data.

Pretraining stores the data's channel names and normalisation recipe in the checkpoint (`args.channel_names`,
`args.normalization`; checkpoints keep `vars(args)`); an exported encoder keeps them in its `pretrained_cfg`.
Fine-tuning, linear probe, extract_features.py and convert_checkpoint.py compare them with the data they are
given (`check_channel_names`): names are matched case-insensitively, position by position, and any difference
in names or order stops the run with both lists, unless --ignore_channel_names. Data without names (a TIFF
folder) can be named with --channel_names A,B,...; otherwise the check is skipped, and says so once.
"""
import argparse
import os

from util.errors import CheckpointError, ConfigError

_skip_noted = False  # the "check skipped" note is printed once per process


def parse_channel_names(text: str) -> list:
    """'DAPI, NeuN,S100' -> ['DAPI', 'NeuN', 'S100'] (argparse type of --channel_names)."""
    names = [name.strip() for name in str(text).split(",")]
    if not names or any(not name for name in names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated channel names, e.g. DAPI,NeuN,S100")
    folded = [name.casefold() for name in names]
    duplicates = sorted({name for name in names if folded.count(name.casefold()) > 1})
    if duplicates:
        raise argparse.ArgumentTypeError(f"{text!r}: channel name(s) {duplicates} given more than once")
    return names


def add_channel_name_args(parser, check: bool = True):
    """--channel_names and (with `check`) --ignore_channel_names."""
    parser.add_argument("--channel_names", default=None, type=parse_channel_names,
                        help="comma-separated names of the data's channels in order, for data that has none (TIFF "
                             "folders); prepared datasets carry their own (default: none; the checkpoint stores the "
                             "data's names, and the channel-name check is skipped for unnamed data)")
    if check:
        parser.add_argument("--ignore_channel_names", action="store_true",
                            help="go on when the checkpoint's channel names differ from the data's (default: stop)")
    return parser


def same_names(first, second) -> bool:
    return [str(n).casefold() for n in first] == [str(n).casefold() for n in second]


def checkpoint_description(checkpoint: dict) -> tuple:
    """(channel names or None, normalisation recipe or None) of a training checkpoint or an exported encoder."""
    args = checkpoint.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    for source in (args, checkpoint.get("pretrained_cfg")):
        if isinstance(source, dict) and ("channel_names" in source or "normalization" in source):
            return source.get("channel_names") or None, source.get("normalization") or None
    return None, None


def data_channel_names(dataset, args=None):
    """The channel names of a built dataset: its own (packed or prepared data), the built-in synthetic markers,
    or --channel_names."""
    names = getattr(dataset, "channel_names", None)
    if names:
        return list(names)
    from util.synthetic import MARKERS, SyntheticCells  # torch-heavy; the scripts that call this have it loaded
    if isinstance(dataset, SyntheticCells) and dataset.in_chans == len(MARKERS):
        return list(MARKERS)
    return getattr(args, "channel_names", None) if args is not None else None


def check_flag_names(flag_names, data_names, where: str, error=ConfigError):
    """--channel_names against names the data already has: they must agree."""
    if flag_names and data_names and not same_names(flag_names, data_names):
        raise error(f"--channel_names {','.join(flag_names)} disagrees with the channel names of {where}: "
                    f"{list(data_names)}; leave --channel_names out for prepared data")


def check_channel_names(model_names, data_names, model_source: str, data_source: str, ignore: bool = False) -> bool:
    """Stop with a CheckpointError naming both lists when the names or their order differ (unless `ignore`).

    Returns True when the lists were compared and agree (or were ignored), False when the check was skipped
    because one side has no names (said once per process).
    """
    global _skip_noted
    if not model_names or not data_names:
        if not _skip_noted:
            missing = "the checkpoint" if not model_names else "the data"
            print(f"note: channel-name check skipped: {missing} has no channel names "
                  f"(name a TIFF folder's channels with --channel_names A,B,...)")
            _skip_noted = True
        return False
    if same_names(model_names, data_names):
        return True
    message = (f"channel names differ: {model_source} was trained on {list(model_names)} but {data_source} has "
               f"{list(data_names)} (names or order); prepare the data with --channels "
               f"{','.join(map(str, model_names))}, or pass --ignore_channel_names")
    if ignore:
        print(f"warning: {message} (ignored)")
        return True
    raise CheckpointError(message)


def read_checkpoint_description(path) -> tuple:
    """(channel names or None, normalisation recipe or None) stored in the checkpoint file at `path`."""
    from util.checkpoint import torch_load  # torch-heavy: only the training-side scripts call this
    from util.normalize import check_recipe

    if not os.path.isfile(path):
        return None, None  # the loader that needs the file reports it missing, naming its flag
    checkpoint = torch_load(path, mmap=True)  # only its args are read: the tensors stay on disk
    if not isinstance(checkpoint, dict):
        return None, None
    names, recipe = checkpoint_description(checkpoint)
    if recipe is not None:
        check_recipe(recipe, f"checkpoint {path}", error=CheckpointError)
    return names, recipe


def check_data_channels(model_names, dataset, args, model_source: str) -> list:
    """check_channel_names for a built dataset (its names, --channel_names, or the synthetic markers); returns the
    names to record for the run (the data's, else the checkpoint's)."""
    data_names = data_channel_names(dataset, args)
    data_source = f"--data_path {args.data_path}" if getattr(args, "data_path", None) else "the data"
    check_channel_names(model_names, data_names, model_source, data_source,
                        ignore=getattr(args, "ignore_channel_names", False))
    return data_names or (list(model_names) if model_names else None)
