"""Learning-rate rule of MAE: lr scaled with the batch size, linear warm-up, then half-cycle cosine decay."""
import math


def resolve_lr(args, world_size: int) -> float:
    """Set args.lr from the base lr when --lr is not given: lr = blr * effective batch size / 256."""
    if args.lr is None:
        effective_batch = args.batch_size * getattr(args, "accum_iter", 1) * world_size
        args.lr = args.blr * effective_batch / 256
    return args.lr


def lr_at_epoch(epoch: float, args) -> float:
    """Learning rate at a fractional epoch: 0 -> args.lr linearly over warmup_epochs, then cosine to min_lr."""
    warmup_epochs, min_lr = args.warmup_epochs, getattr(args, "min_lr", 0.0)
    if epoch < warmup_epochs:  # never true when warmup_epochs is 0, so no division by zero
        return args.lr * epoch / warmup_epochs
    decay_epochs = args.epochs - warmup_epochs
    if decay_epochs <= 0:  # the whole run is warm-up
        return args.lr
    progress = min((epoch - warmup_epochs) / decay_epochs, 1.0)  # clamp: past the end stays at min_lr
    return min_lr + (args.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer, epoch: float, args) -> float:
    """Set every param group's lr for this (fractional) epoch, times the group's lr_scale; return the base lr."""
    lr = lr_at_epoch(epoch, args)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
