"""One epoch of DAMA pretraining."""
import math

import torch

import util.misc as misc
from util.errors import NonFiniteLossError
from util.lr_sched import adjust_learning_rate

def info_weight_for_epoch(epoch: int, args) -> float:
    """The regression term is left out (weight 0) during the first --stable_epoch epochs."""
    return 0.0 if epoch < args.stable_epoch else 1.0


def check_finite(values: dict, epoch: int, step: int) -> None:
    if not all(math.isfinite(v) for v in values.values()):
        terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch}, step {step} ({terms}); stopping without saving. "
            f"The last good checkpoint is kept; lower --blr or try --amp_dtype fp16/none.")


def train_one_epoch(model, data_loader, optimizer, device, epoch, loss_scaler, log_writer=None, args=None,
                    batch_transform=None):
    """Train for one epoch and return the epoch's mean of each loss term (averaged over ranks) and lr.

    Loss values stay on the device and are read back only every --print_freq steps: the window's sums are
    all-reduced there (one collective for all terms) and read once (one host sync per window instead of one
    per step). The non-finite check runs on those rank-averaged values, so every rank stops at the same step.
    batch_transform, when given, maps each batch once it is on the device (the --gpu_augment path).
    """
    model.train()
    metric_logger = misc.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", misc.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    accum_iter, print_freq = args.accum_iter, args.print_freq
    num_steps = len(data_loader)
    info_weight = info_weight_for_epoch(epoch, args)
    loss_terms = misc.unwrap_model(model).loss_terms  # DAMA: loss, recon1, recon2, info; MAE: loss

    window_sums = torch.zeros(len(loss_terms), device=device)  # loss terms summed since the last read
    epoch_sums = [0.0] * len(loss_terms)  # rank-averaged window sums, added up on the host
    window_count, lr = 0, optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    for step, (samples, _) in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        if step % accum_iter == 0:  # per-iteration schedule on the fractional epoch
            lr = adjust_learning_rate(optimizer, epoch + step / num_steps, args)
        samples = samples.to(device, non_blocking=True)
        if batch_transform is not None:  # e.g. util.gpu_augment.GPUAugment: augmentation on the device
            samples = batch_transform(samples)
        update_grad = (step + 1) % accum_iter == 0
        with misc.grad_sync_context(model, update_grad):  # no DDP all-reduce on accumulation-only steps
            with misc.autocast_context(device, args.amp_dtype):
                out = model(samples, info_weight=info_weight)
            loss_scaler(out["loss"] / accum_iter, optimizer, parameters=model.parameters(), update_grad=update_grad)
        if update_grad:
            optimizer.zero_grad(set_to_none=True)
        window_sums += torch.stack([out[k].detach().float() for k in loss_terms])
        window_count += 1

        if step % print_freq == 0 or step == num_steps - 1:
            sums = misc.all_reduce_mean_list(window_sums)  # the one collective and the one host sync
            means = {k: v / window_count for k, v in zip(loss_terms, sums)}
            check_finite(means, epoch, step)  # identical values on every rank: all stop together
            epoch_sums = [total + v for total, v in zip(epoch_sums, sums)]
            for k, v in means.items():
                metric_logger.meters[k].update(v, n=window_count)
            metric_logger.update(lr=lr)
            write_tensorboard(log_writer, means, lr, epoch + step / num_steps)
            window_sums.zero_()
            window_count = 0

    # Every step ends up in one window (the last step closes one), and the windows are already averaged over
    # ranks: the epoch means need no further collective.
    stats = {k: total / max(num_steps, 1) for k, total in zip(loss_terms, epoch_sums)}
    stats["lr"] = lr
    print("Averaged stats:", "  ".join(f"{k}: {v:.4g}" for k, v in stats.items()))
    return stats


def write_tensorboard(log_writer, means: dict, lr: float, epoch_float: float) -> None:
    """Losses (averaged over the window and over ranks) and lr, at x = 1000 * fractional epoch as in MAE."""
    if log_writer is None:
        return
    x = int(epoch_float * 1000)
    for k, v in means.items():
        log_writer.add_scalar(f"train/{k}", v, x)
    log_writer.add_scalar("train/lr", lr, x)
