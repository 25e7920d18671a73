"""Weighted k-nearest-neighbour classification of frozen features (DINO's evaluation), and the kNN monitor
that main_pretrain.py runs every --knn_freq epochs.

Each query votes with its k most cosine-similar training features, neighbour j weighing exp(sim_j / T);
the class with the largest summed weight wins. Works on any device; queries go in chunks so the
similarity matrix never exceeds [chunk, N_train].
"""
import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import util.misc as misc
from util.datasets import build_finetune_dataset
from util.errors import ConfigError, DataError
from util.features import DEFAULT_POOL, POOLINGS, extract_features, gather_from_ranks, student_encoder
from util.transforms import DEFAULT_VAL_CROP, build_finetune_transform


# --------------------------------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------------------------------
def knn_class_scores(train_features, train_labels, query_features, num_classes: int, k: int = 20,
                     temperature: float = 0.07, chunk_size: int = 1024) -> torch.Tensor:
    """Summed neighbour weights per class [Nq, num_classes].

    train_features [Nt, D], train_labels [Nt] (int), query_features [Nq, D]. k is capped at Nt.
    """
    if k < 1 or temperature <= 0:
        raise ConfigError(f"kNN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for query in torch.split(query_features.float(), chunk_size):
        sim = F.normalize(query, dim=1) @ train.T  # [chunk, Nt] cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # [chunk, k]
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, device=query.device)
        scores.append(votes.scatter_add_(1, train_labels[top_idx], weights))
    return torch.cat(scores)


def knn_accuracy(train_features, train_labels, query_features, query_labels, num_classes: int = None,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy (%) of the weighted kNN classifier on the query set."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), query_labels.max())) + 1
    scores = knn_class_scores(train_features, train_labels, query_features, num_classes, k, temperature)
    correct = (scores.argmax(dim=1) == query_labels).sum().item()  # an exact count, not a float32 mean
    return 100.0 * correct / query_labels.numel()


# --------------------------------------------------------------------------------------------------
# Monitoring during pretraining
# --------------------------------------------------------------------------------------------------
def add_knn_args(parser):
    """main_pretrain.py's kNN-monitor flags."""
    parser.add_argument("--knn_freq", default=0, type=int,
                        help="every N epochs (and after the last), kNN top-1 of student 1's frozen features on a "
                             "labelled split, logged as knn_acc1 in log.txt and TensorBoard (0: off)")
    parser.add_argument("--knn_data_path", default=None,
                        help="labelled ImageFolder with train/ (the neighbours) and val/ (the queries) for "
                             "--knn_freq (default: --data_path; --dataset synthetic uses its own labels)")
    parser.add_argument("--knn_k", default=20, type=int, help="neighbours per query")
    parser.add_argument("--knn_temperature", default=0.07, type=float, help="vote weight exp(cosine / T)")
    parser.add_argument("--knn_pool", default=DEFAULT_POOL, choices=POOLINGS,
                        help="features: mean of the final-normed patch tokens, or the cls token (default: %(default)s)")
    parser.add_argument("--knn_val_crop", default=DEFAULT_VAL_CROP, type=int,
                        help="centre crop (pixels) before the resize to --img_size, as fine-tuning's --val_crop")
    return parser


def knn_dataset_args(args) -> argparse.Namespace:
    """The fine-tuning dataset flags that describe the kNN data of a pretraining run."""
    if args.dataset == "synthetic":
        return argparse.Namespace(dataset="synthetic", data_path=None, img_size=args.img_size,
                                  in_chans=args.in_chans, synthetic_size=args.synthetic_size, seed=args.seed,
                                  val_crop=args.knn_val_crop)
    path = args.knn_data_path or args.data_path
    # the pretraining data's recipe is applied to raw folder data, and its channel names describe it
    return argparse.Namespace(dataset="folder", data_path=path, img_size=args.img_size, in_chans=args.in_chans,
                              val_crop=args.knn_val_crop, normalization=getattr(args, "normalization", None),
                              channel_names=getattr(args, "channel_names", None))


def build_knn_datasets(args):
    """(train, val) labelled datasets, both with the deterministic validation transform."""
    data_args = knn_dataset_args(args)
    try:
        train, val = build_finetune_dataset(True, data_args), build_finetune_dataset(False, data_args)
    except DataError as exc:
        raise DataError(f"--knn_freq: cannot build the labelled kNN sets (--knn_data_path, train/ and val/ "
                        f"in ImageFolder layout): {exc}") from exc
    crop = data_args.val_crop if data_args.dataset == "folder" else min(data_args.val_crop, args.img_size)
    train.transform = build_finetune_transform(False, args.img_size, crop)  # no augmentation for neighbours
    return train, val


class KnnMonitor:
    """Embeds the kNN train/val sets with student 1 and reports top-1, each rank embedding 1/world of them."""

    def __init__(self, args):
        if args.knn_k < 1 or args.knn_temperature <= 0:
            raise ConfigError(f"--knn_k must be >= 1 and --knn_temperature > 0, got {args.knn_k}, "
                             f"{args.knn_temperature}")
        self.freq, self.epochs = args.knn_freq, args.epochs
        self.k, self.temperature, self.pool = args.knn_k, args.knn_temperature, args.knn_pool
        self.amp_dtype = args.amp_dtype
        train, val = build_knn_datasets(args)
        self.num_classes = len(train.classes)
        for name, dataset in (("training", train), ("validation", val)):  # every rank embeds a non-empty shard
            if len(dataset) < misc.get_world_size():
                raise DataError(f"--knn_freq: {len(dataset)} kNN {name} images are fewer than the "
                                f"{misc.get_world_size()} processes")
        self.loaders = [self._shard_loader(dataset, args) for dataset in (train, val)]
        print(f"kNN monitor: {len(train)} neighbours, {len(val)} queries, {self.num_classes} classes, "
              f"every {self.freq} epochs")

    @staticmethod
    def _shard_loader(dataset, args) -> DataLoader:
        rank, world_size = misc.get_rank(), misc.get_world_size()
        shard = Subset(dataset, range(rank, len(dataset), world_size))
        return DataLoader(shard, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                          pin_memory=args.pin_mem and str(args.device).startswith("cuda"))

    def due(self, epoch: int) -> bool:
        return self.freq > 0 and ((epoch + 1) % self.freq == 0 or epoch + 1 == self.epochs)

    @torch.no_grad()
    def evaluate(self, student, device) -> float:
        """kNN top-1 (%) of `student`'s features; its train/eval mode is restored afterwards."""
        was_training = student.training
        student.eval()
        encode = student_encoder(student, self.pool)
        try:
            (train_x, train_y), (val_x, val_y) = [
                extract_features(encode, loader, device, self.amp_dtype) for loader in self.loaders]
        finally:
            student.train(was_training)
        train_x, train_y = gather_from_ranks(train_x), gather_from_ranks(train_y)
        val_x, val_y = gather_from_ranks(val_x), gather_from_ranks(val_y)
        return knn_accuracy(train_x, train_y, val_x, val_y, self.num_classes, self.k, self.temperature)

    def log(self, epoch: int, student, device, log_writer=None) -> dict:
        """{'knn_acc1': top-1} when this epoch is due (and TensorBoard's knn/acc1), else {}."""
        if not self.due(epoch):
            return {}
        acc = self.evaluate(student, device)
        print(f"kNN (k={self.k}, T={self.temperature}) top-1 of student 1 after epoch {epoch}: {acc:.2f}%")
        if log_writer is not None:
            log_writer.add_scalar("knn/acc1", acc, epoch)
        return {"knn_acc1": acc}
