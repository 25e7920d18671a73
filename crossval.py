"""k-fold cross-validation of pretrained checkpoints: the paper's classification table.

    python crossval.py --data_path DATA --folds 10 --output_dir cv --mode finetune \
        --checkpoints random DAMA=pre/dama/checkpoint-499.pth MAE=pre/mae/checkpoint-499.pth \
        -- --arch main_vit_base --img_size 128 --epochs 150 --blr 5e-4 ...

The labelled images (ImageFolder: all of <data_path>/train and, when present, <data_path>/val, pooled; or
<data_path>/<class>/ directly) are split into --folds stratified folds with --seed and the split is saved as
file lists in <output_dir>/folds.json (reused by later calls, so every row sees the same folds). For each
checkpoint and fold i, main_finetune.py (or main_linprobe.py) trains on the other folds and tests on fold i;
fold i's data is a tree of symlinks <output_dir>/fold_data/fold_<i>/{train,val}/<class>/, so the training
scripts read it as any ImageFolder. Everything after `--` goes to the training script unchanged.
--dataset synthetic first writes --synthetic_size synthetic cells as float32 TIFFs to <output_dir>/synthetic/.

Each number of the table is read from its run's log.txt (max_accuracy, or the last epoch's test_acc1 with
--metric last): one row per checkpoint, one column per fold, the mean with its difference to the random-init
row, and Err = 100 - mean; written as <output_dir>/table.md and table.json. Runs that already finished with
the same arguments are reused, interrupted ones resume from their checkpoint.pth. Runs go one after another as
subprocesses, or as submitit jobs (--submitit, util/launch.py: SLURM or local, launcher flags after `--`).
"""
import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent
FOLDS_FILE = "folds.json"
MODES = {"finetune": "main_finetune", "linprobe": "main_linprobe"}
RANDOM = "random"
RANDOM_ROW_NAME = "Random init."
# flags that crossval sets for every run; the same flags after `--` would silently change the experiment
OWN_FLAGS = ("--data_path", "--dataset", "--output_dir", "--log_dir", "--finetune", "--job_dir", "--resume")
# settings that do not change a run's result: a finished run is reused whatever they were
RUNTIME_ONLY = ("num_workers", "pin_mem", "device", "world_size", "local_rank", "dist_on_itp", "dist_url",
                "dist_eval")


class CrossvalError(ValueError):
    """A bad flag, file or run; the message names it."""


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------
def get_args_parser():
    parser = argparse.ArgumentParser(
        "DAMA cross-validation", usage="crossval.py [options] -- [flags of main_finetune.py / main_linprobe.py]")
    parser.add_argument("--data_path", default=None, help="labelled ImageFolder: <data_path>/{train,val}/<class>/ "
                                                          "or <data_path>/<class>/")
    parser.add_argument("--dataset", default="folder", choices=("folder", "synthetic"))
    parser.add_argument("--synthetic_size", default=500, type=int, help="images of --dataset synthetic")
    parser.add_argument("--synthetic_img_size", default=64, type=int, help="side of the synthetic images")
    parser.add_argument("--in_chans", default=7, type=int, help="channels of the synthetic images")
    parser.add_argument("--folds", default=10, type=int, help="number of folds k")
    parser.add_argument("--seed", default=0, type=int, help="seed of the fold split (and the synthetic set)")
    parser.add_argument("--checkpoints", nargs="+", required=True,
                        help="table rows: NAME=PATH (pretraining or encoder-only checkpoint), NAME=random or "
                             "just 'random' for the random-init row the other rows are compared with")
    parser.add_argument("--mode", default="finetune", choices=sorted(MODES), help="fine-tune or linear-probe")
    parser.add_argument("--metric", default="max", choices=("max", "last"),
                        help="per run: max_accuracy over epochs (as the reference) or the last epoch's test_acc1")
    parser.add_argument("--output_dir", required=True, help="folds.json, fold data, runs/, table.md, table.json")
    parser.add_argument("--submitit", action="store_true",
                        help="submit every run as a submitit job (util/launch.py; pass --ngpus, --partition, "
                             "--cluster ... after --) and wait for all of them")
    parser.add_argument("--launcher", default="",
                        help="command that starts each run instead of this Python, e.g. "
                             "'torchrun --nproc_per_node 4' (sequential mode)")
    parser.add_argument("--rerun", action="store_true", help="delete earlier runs' folders and run again")
    return parser


def split_argv(argv):
    """(crossval's own args, the training script's args after the first `--`)."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def check_passthrough(train_args):
    for arg in train_args:
        flag = arg.split("=", 1)[0]
        if flag in OWN_FLAGS:
            raise CrossvalError(f"{flag} after `--`: crossval.py sets {flag} for every run itself; remove it")


def parse_checkpoints(items):
    """[(row name, checkpoint path or None for random init)] in the given order."""
    rows = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            if item != RANDOM:
                raise CrossvalError(f"--checkpoints {item!r}: expected NAME=PATH, NAME=random or random")
            name, path = RANDOM_ROW_NAME, RANDOM
        if not name or not path:
            raise CrossvalError(f"--checkpoints {item!r}: empty name or path")
        if path != RANDOM and not Path(path).is_file():
            raise CrossvalError(f"--checkpoints {item!r}: checkpoint file {path} does not exist")
        rows.append((name, None if path == RANDOM else str(Path(path).resolve())))
    names = [name for name, _ in rows]
    if len({slug(name) for name in names}) != len(names):  # each row needs its own runs/<slug>/ folder
        raise CrossvalError(f"--checkpoints: row names must differ in their letters, digits, '.', '-' or '_', "
                            f"got {names}")
    return rows


# --------------------------------------------------------------------------------------------------
# Labelled samples and folds
# --------------------------------------------------------------------------------------------------
def folder_samples(data_path):
    """(samples [(absolute path, label)], classes, source) of a labelled folder, train/ and val/ pooled."""
    from util.datasets import class_folders, image_folder_samples  # torch-heavy: imported when needed

    root = Path(data_path).expanduser().resolve()
    if not root.is_dir():
        raise CrossvalError(f"--data_path {data_path} does not exist or is not a folder")
    splits = [root / s for s in ("train", "val") if (root / s).is_dir()] or [root]
    classes = class_folders(splits[0])
    if not classes:
        raise CrossvalError(f"--data_path {data_path}: no class folders in {splits[0]}; expected "
                            f"<data_path>/train/<class>/<image> or <data_path>/<class>/<image>")
    samples = [(str(path), label) for split in splits for path, label in image_folder_samples(split, classes)]
    return samples, classes, str(root)


def synthetic_samples(args):
    """Write the synthetic set once as float32 TIFFs (channel-first pages) and return it like a folder."""
    import tifffile
    from util.synthetic import SyntheticCells

    dataset = SyntheticCells(args.synthetic_size, args.synthetic_img_size, args.in_chans, seed=args.seed)
    root = Path(args.output_dir).resolve() / "synthetic"
    samples = []
    for index in range(len(dataset)):
        label = dataset.label(index)
        path = root / dataset.classes[label] / f"{index:05d}.tif"
        if not path.is_file():  # deterministic per index: an existing file is already right
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, dataset.render(index), photometric="minisblack")
        samples.append((str(path), label))
    source = (f"synthetic(size={args.synthetic_size}, img_size={args.synthetic_img_size}, "
              f"in_chans={args.in_chans}, seed={args.seed})")
    return samples, list(dataset.classes), source


def stratified_folds(labels, num_folds: int, seed: int):
    """k lists of sample indices: each class shuffled (seeded) and dealt round-robin, continuing where the
    previous class stopped so that fold sizes differ by at most one."""
    rng = np.random.default_rng(seed)
    folds = [[] for _ in range(num_folds)]
    labels = np.asarray(labels)
    next_fold = 0
    for label in np.unique(labels):
        for index in rng.permutation(np.flatnonzero(labels == label)):
            folds[next_fold].append(int(index))
            next_fold = (next_fold + 1) % num_folds
    return [sorted(fold) for fold in folds]


def check_class_sizes(samples, classes, num_folds):
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    if len(samples) < num_folds:
        raise CrossvalError(f"--folds {num_folds}: only {len(samples)} labelled images")
    for name, count in zip(classes, counts):
        if count < 2:  # the fold that tests its only image would train without the class
            raise CrossvalError(f"class {name!r} has {count} image(s); cross-validation needs at least 2 per class")
        if count < num_folds:
            print(f"warning: class {name!r} has {count} images, fewer than --folds {num_folds}: "
                  f"some test folds lack it", file=sys.stderr)


def make_folds(args) -> dict:
    """The split as stored in folds.json: source, classes and, per fold, its test samples."""
    if args.dataset == "synthetic":
        samples, classes, source = synthetic_samples(args)
    elif not args.data_path:
        raise CrossvalError("--data_path is not set; expected a labelled folder (or use --dataset synthetic)")
    else:
        samples, classes, source = folder_samples(args.data_path)
    check_class_sizes(samples, classes, args.folds)
    folds = stratified_folds([label for _, label in samples], args.folds, args.seed)
    return {"source": source, "num_folds": args.folds, "seed": args.seed, "classes": classes,
            "folds": [[{"path": samples[i][0], "label": samples[i][1]} for i in fold] for fold in folds]}


def load_or_make_folds(args) -> dict:
    """Reuse <output_dir>/folds.json (it must describe the same data and k), else split and save it."""
    path = Path(args.output_dir) / FOLDS_FILE
    if not path.is_file():
        folds = make_folds(args)
        path.write_text(json.dumps(folds, indent=1))
        print(f"Saved a {args.folds}-fold split of {sum(map(len, folds['folds']))} images to {path}")
        return folds
    try:
        folds = json.loads(path.read_text())
        stored = (folds["num_folds"], folds["seed"])
    except (ValueError, KeyError) as exc:
        raise CrossvalError(f"{path}: not a folds file written by crossval.py ({exc}); delete it") from exc
    if stored != (args.folds, args.seed):
        raise CrossvalError(f"{path} holds a {stored[0]}-fold split with seed {stored[1]}, but --folds {args.folds} "
                            f"--seed {args.seed} were given; use another --output_dir or delete {path}")
    print(f"Reusing the {args.folds}-fold split in {path} (source: {folds['source']})")
    return folds


def link_or_copy(source: Path, target: Path):
    try:
        target.symlink_to(source)
    except OSError:  # file systems without symlinks
        shutil.copy2(source, target)


def write_fold_tree(folds: dict, fold: int, root: Path) -> Path:
    """<root>/fold_<i>/{train,val}/<class>/<n>_<file>: links to the images, val = fold i, train = the rest.

    The running number keeps equal file names from different folders apart.
    """
    fold_dir = root / f"fold_{fold}"
    shutil.rmtree(fold_dir, ignore_errors=True)  # rebuilt from folds.json every time: never stale
    for other, entries in enumerate(folds["folds"]):
        split = "val" if other == fold else "train"
        for n, entry in enumerate(entries):
            source = Path(entry["path"])
            if not source.is_file():
                raise CrossvalError(f"{FOLDS_FILE}: image {source} (fold {other}) no longer exists")
            target = fold_dir / split / folds["classes"][entry["label"]] / f"f{other}_{n:06d}_{source.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(source, target)
    return fold_dir


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------
def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "row"


def run_flags(fold_dir: Path, run_dir: Path, checkpoint, train_args) -> list:
    """The training script's flags: the user's, then crossval's own (last, so they win)."""
    own = ["--dataset", "folder", "--data_path", str(fold_dir), "--output_dir", str(run_dir),
           "--log_dir", str(run_dir)]
    return list(train_args) + own + (["--finetune", checkpoint] if checkpoint else [])


def read_result(run_dir: Path, metric: str):
    """The run's accuracy from its log.txt (None while it has not finished)."""
    log = run_dir / "log.txt"
    if not log.is_file():
        return None
    key = "max_accuracy" if metric == "max" else "test_acc1"
    value = None
    finished = False
    for line in log.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        finished = finished or "max_accuracy" in record
        value = record.get(key, value)  # the last occurrence: a resumed run appends
    return value if finished else None


def training_config(script: str, flags: list) -> dict:
    """The run's settings as the training script parses them (so '--epochs=1' equals '--epochs 1'), without
    launcher flags (--ngpus, --cluster: unknown to it) and flags that do not change the result."""
    import importlib

    known, _ = importlib.import_module(script).get_args_parser().parse_known_args(flags)
    return {key: value for key, value in sorted(vars(known).items()) if key not in RUNTIME_ONLY}


def prepare_run(run_dir: Path, config: dict, rerun: bool):
    """'done' when an earlier run with the same settings finished, else 'run'; refuses to mix settings."""
    record = run_dir / "crossval_args.json"
    if rerun:
        shutil.rmtree(run_dir, ignore_errors=True)
    config = json.loads(json.dumps(config, default=str))  # as it reads back from the file
    if record.is_file():
        if json.loads(record.read_text()) != config:
            raise CrossvalError(f"{run_dir} holds a run with other settings (see {record}); pass --rerun, "
                                f"delete it, or use another --output_dir")
        if read_result(run_dir, "max") is not None:
            return "done"
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(config, indent=1))
    return "run"  # an interrupted run resumes from its own checkpoint.pth (the scripts auto-resume)


def run_subprocess(script: str, flags: list, run_dir: Path, launcher: str, label: str):
    command = (shlex.split(launcher) if launcher else [sys.executable]) + [str(REPO / f"{script}.py")] + flags
    output = run_dir / "output.txt"
    with open(output, "w") as out:
        code = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        lines = [line for line in output.read_text().splitlines() if line.strip()]
        last = lines[-1] if lines else "(no output)"
        raise CrossvalError(f"{label} failed with exit code {code}: {last} (full output: {output})")


def submit_job(script: str, flags: list, run_dir: Path):
    """One submitit job through util/launch.py; its output_dir is the run folder."""
    import importlib

    from util import launch

    module = importlib.import_module(script)
    args = launch.parse_args(module.get_args_parser(), f"crossval {script}", flags + ["--job_dir", str(run_dir)])
    return launch.submit(args, script)


def run_all(args, rows, folds, train_args) -> dict:
    """Train every (row, fold) not done yet; returns {(row name, fold): run folder}."""
    script = MODES[args.mode]
    fold_root = Path(args.output_dir).resolve() / "fold_data"
    fold_dirs = [write_fold_tree(folds, i, fold_root) for i in range(args.folds)]
    run_dirs, jobs = {}, []
    total = len(rows) * args.folds
    for r, (name, checkpoint) in enumerate(rows):
        for fold in range(args.folds):
            run_dir = Path(args.output_dir).resolve() / "runs" / slug(name) / f"fold_{fold}"
            run_dirs[name, fold] = run_dir
            flags = run_flags(fold_dirs[fold], run_dir, checkpoint, train_args)
            label = f"[{r * args.folds + fold + 1}/{total}] {args.mode} {name!r} fold {fold}"
            if prepare_run(run_dir, training_config(script, flags), args.rerun) == "done":
                print(f"{label}: reusing the finished run in {run_dir}")
                continue
            print(f"{label}: running in {run_dir}", flush=True)
            if args.submitit:
                try:  # --cluster debug runs the job inside submit()
                    jobs.append((label, submit_job(script, flags, run_dir)))
                except ValueError as exc:
                    raise CrossvalError(f"{label} failed: {' '.join(str(exc).split())}") from exc
            else:
                run_subprocess(script, flags, run_dir, args.launcher, label)
    for label, job in jobs:
        if job is None:  # --dry_run
            continue
        try:
            job.result()
        except Exception as exc:
            raise CrossvalError(f"{label} failed in submitit job {job.job_id}: {str(exc).splitlines()[-1]} "
                                f"(logs: {job.paths.stderr})") from exc
    return run_dirs


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------
def collect_table(args, rows, run_dirs) -> dict:
    """Per row: fold accuracies (from log.txt), mean, difference to the random-init row, error."""
    table_rows = []
    for name, checkpoint in rows:
        accs, logs = [], []
        for fold in range(args.folds):
            run_dir = run_dirs[name, fold]
            acc = read_result(run_dir, args.metric)
            if acc is None:
                raise CrossvalError(f"{run_dir / 'log.txt'}: no result ({args.metric}); the run did not finish")
            accs.append(float(acc))
            logs.append(str(run_dir / "log.txt"))
        table_rows.append({"name": name, "checkpoint": checkpoint or RANDOM, "folds": accs,
                           "mean": float(np.mean(accs)), "err": 100.0 - float(np.mean(accs)), "logs": logs})
    reference = next((row for row in table_rows if row["checkpoint"] == RANDOM), None)
    for row in table_rows:
        row["diff"] = row["mean"] - reference["mean"] if reference else None
    return {"mode": args.mode, "metric": args.metric, "num_folds": args.folds,
            "reference": reference["name"] if reference else None, "rows": table_rows}


def format_mean(row) -> str:
    return f"{row['mean']:.2f}" if row["diff"] is None else f"{row['mean']:.2f}({row['diff']:+.2f})"


def markdown_table(table) -> str:
    """The seed README's layout: | name | fold 0 .. k-1 | Avg. ↑ (diff to random init) | Err. ↓ |."""
    folds = [str(i) for i in range(table["num_folds"])]
    header = ["", *folds, "Avg. ↑", "Err. ↓"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] + [":---:"] * (len(header) - 1)) + "|"]
    for row in table["rows"]:
        cells = [row["name"], *(f"{acc:.2f}" for acc in row["folds"]), format_mean(row), f"{row['err']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_table(table, output_dir: Path):
    (output_dir / "table.json").write_text(json.dumps(table, indent=1))
    (output_dir / "table.md").write_text(markdown_table(table))


def main(argv=None) -> int:
    own_argv, train_args = split_argv(sys.argv[1:] if argv is None else list(argv))
    args = get_args_parser().parse_args(own_argv)
    try:
        if args.folds < 2:
            raise CrossvalError(f"--folds must be at least 2, got {args.folds}")
        check_passthrough(train_args)
        rows = parse_checkpoints(args.checkpoints)
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        folds = load_or_make_folds(args)
        run_dirs = run_all(args, rows, folds, train_args)
        table = collect_table(args, rows, run_dirs)
    except ValueError as exc:  # CrossvalError, and DataError from reading the labelled folder
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
        return 2
    save_table(table, output_dir)
    print(markdown_table(table))
    print(f"Saved {output_dir / 'table.md'} and {output_dir / 'table.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
