"""One epoch of DAMA pretraining."""

import util.misc as misc
from util.lr_sched import adjust_learning_rate
from util.run_control import is_sync_point
from util.sampling import seed_step


def info_weight_for_epoch(epoch: int, args) -> float:
    """The regression term is left out (weight 0) during the first --stable_epoch epochs."""
    return 0.0 if epoch < args.stable_epoch else 1.0


def train_one_epoch(model, data_loader, optimizer, device, epoch, loss_scaler, log_writer=None, args=None,
                    batch_transform=None, checkpoints=None, epoch_state=None):
    """Train one epoch (or its rest, when the loader's sampler starts mid-epoch) and return the epoch's mean of
    each loss term (averaged over ranks) and the lr.

    Loss values stay on the device and are read back only at synchronisation points (every --print_freq optimizer
    steps, util.run_control.is_sync_point): one all-reduce for all terms plus the mid-epoch checkpoint requests,
    one host sync. The non-finite check runs on those rank-averaged values, so every rank stops at the same step.
    Every step is seeded from (seed, epoch, step, rank): masks and --gpu_augment draws do not depend on where the
    run was resumed. batch_transform, when given, maps each batch once it is on the device (--gpu_augment).
    checkpoints (util.run_control.MidEpochCheckpoints) writes mid-epoch checkpoints and stops on signals;
    epoch_state is the partial epoch's totals from such a checkpoint.
    """
    model.train()
    metric_logger = misc.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", misc.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    accum_iter, print_freq = args.accum_iter, args.print_freq
    steps_per_epoch, start_step = misc.loader_position(data_loader)
    info_weight = info_weight_for_epoch(epoch, args)
    losses = misc.LossWindow(misc.unwrap_model(model).loss_terms, device, epoch_state)  # DAMA: 4 terms, MAE: 1
    schedule = checkpoints.schedule if checkpoints is not None else None
    lr = optimizer.param_groups[0]["lr"]

    optimizer.zero_grad(set_to_none=True)
    batches = metric_logger.log_every(data_loader, print_freq, header, first=start_step, total=steps_per_epoch)
    for step, (samples, _) in enumerate(batches, start=start_step):
        divisor, update_grad = misc.accumulation_step(step, steps_per_epoch, accum_iter)
        if step % accum_iter == 0:  # per-iteration schedule on the fractional epoch
            lr = adjust_learning_rate(optimizer, epoch + step / steps_per_epoch, args)
        seed_step(args.seed, epoch, step, misc.get_rank())
        samples = samples.to(device, non_blocking=True)
        if batch_transform is not None:  # e.g. util.gpu_augment.GPUAugment: augmentation on the device
            samples = batch_transform(samples)
        with misc.grad_sync_context(model, update_grad):  # no DDP all-reduce on accumulation-only steps
            with misc.autocast_context(device, args.amp_dtype):
                out = model(samples, info_weight=info_weight)
            loss_scaler(out["loss"] / divisor, optimizer, parameters=model.parameters(), update_grad=update_grad)
        if update_grad:
            optimizer.zero_grad(set_to_none=True)
        losses.add([out[k] for k in losses.terms])

        if is_sync_point(step, steps_per_epoch, accum_iter, print_freq, schedule):
            requests = checkpoints.local_requests() if checkpoints is not None else []
            window_steps = losses.count
            means, requests = losses.sync(requests)  # the one collective and the one host sync
            misc.check_finite(means, epoch, step, "Lower --blr, or try --amp_dtype fp16/none.")  # identical values on every rank: all stop together
            for k, v in means.items():
                metric_logger.meters[k].update(v, n=window_steps)
            metric_logger.update(lr=lr)
            write_tensorboard(log_writer, means, lr, epoch + step / steps_per_epoch)
            if checkpoints is not None:
                checkpoints.at_sync_point(epoch, step + 1, steps_per_epoch, requests, losses.state())

    # Every step ends in a window (the epoch's last step is a sync point), and the windows are already averaged
    # over ranks: the epoch means need no further collective.
    stats = losses.epoch_means()
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
