"""One fine-tuning epoch and one evaluation pass (MAE's engine_finetune, with fewer host syncs)."""

import torch
import torch.nn.functional as F
from timm.utils import accuracy

import util.lr_sched as lr_sched
import util.misc as misc
from util.errors import DataError
from util.run_control import is_sync_point
from util.sampling import seed_step

PRINT_FREQ = 20


def current_lr(optimizer) -> float:
    # the head group has lr_scale 1, so the max over groups is the schedule's lr
    return max(group["lr"] for group in optimizer.param_groups)


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch: int, loss_scaler, args,
                    mixup_fn=None, log_writer=None, print_freq: int = PRINT_FREQ, checkpoints=None,
                    epoch_state=None) -> dict:
    """Train one epoch (or its rest after a mid-epoch resume); returns {'loss': mean training loss over all ranks,
    'lr': last lr}.

    The same step structure as pretraining (engine_pretrain): per-step seeds from (seed, epoch, step, rank) for
    mixup, cutmix and drop path; one accumulation rule (util.misc.accumulation_step); the loss read back only at
    synchronisation points, where mid-epoch checkpoints are written and stop signals obeyed.
    """
    model.train(True)
    metric_logger = misc.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", misc.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    accum_iter = args.accum_iter
    steps_per_epoch, start_step = misc.loader_position(data_loader)
    losses = misc.LossWindow(("loss",), device, epoch_state)
    schedule = checkpoints.schedule if checkpoints is not None else None
    optimizer.zero_grad(set_to_none=True)

    batches = metric_logger.log_every(data_loader, print_freq, header, first=start_step, total=steps_per_epoch)
    for step, (samples, targets) in enumerate(batches, start=start_step):
        divisor, update_grad = misc.accumulation_step(step, steps_per_epoch, accum_iter)
        if step % accum_iter == 0:  # per-iteration schedule on the fractional epoch
            lr_sched.adjust_learning_rate(optimizer, epoch + step / steps_per_epoch, args)
        seed_step(args.seed, epoch, step, misc.get_rank())
        samples = samples.to(device, non_blocking=True)  # [N, C, S, S]
        targets = targets.to(device, non_blocking=True)  # [N]
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)  # targets -> soft [N, num_classes]

        with misc.grad_sync_context(model, update_grad):
            with misc.autocast_context(device, args.amp_dtype):
                logits = model(samples)  # [N, num_classes]
                loss = criterion(logits.float(), targets)
            loss_scaler(loss / divisor, optimizer, clip_grad=args.clip_grad,
                        parameters=model.parameters(), update_grad=update_grad)
        if update_grad:
            optimizer.zero_grad(set_to_none=True)
        losses.add([loss])

        if is_sync_point(step, steps_per_epoch, accum_iter, print_freq, schedule):
            requests = checkpoints.local_requests() if checkpoints is not None else []
            window_steps = losses.count
            means, requests = losses.sync(requests)
            misc.check_finite(means, epoch, step, "Try a lower --blr/--lr, --clip_grad, or --amp_dtype none.")
            metric_logger.meters["loss"].update(means["loss"], n=window_steps)
            metric_logger.update(lr=current_lr(optimizer))
            if log_writer is not None:
                epoch_1000x = int((epoch + step / steps_per_epoch) * 1000)  # x axis comparable across batch sizes
                log_writer.add_scalar("loss", means["loss"], epoch_1000x)
                log_writer.add_scalar("lr", current_lr(optimizer), epoch_1000x)
            if checkpoints is not None:
                checkpoints.at_sync_point(epoch, step + 1, steps_per_epoch, requests, losses.state())

    train_loss = losses.epoch_means()["loss"]
    print(f"Averaged stats: loss {train_loss:.4f}  lr {current_lr(optimizer):.6f}")
    return {"loss": train_loss, "lr": current_lr(optimizer)}


@torch.no_grad()
def evaluate(data_loader, model, device, amp_dtype: str, num_classes: int, sharded: bool = True,
             print_freq: int = PRINT_FREQ) -> dict:
    """Cross-entropy, top-1 (and top-5 when num_classes >= 5) over the whole val set, exact across ranks.

    sharded (--dist_eval): each rank saw part of the set; sums of loss and correct predictions and the
    sample count are all-reduced, so ranks with different shard sizes are weighted by their number of
    samples (not an average of per-rank averages). sharded=False: every rank saw the whole set, nothing is
    reduced. Pass sharded=args.dist_eval, matching main_finetune.build_loaders' validation sampler; a whole
    set all-reduced would keep the loss and accuracies but count every image world_size times (the n printed).
    """
    model.eval()
    topk = (1, 5) if num_classes >= 5 else (1,)
    # [loss sum, correct top-1, correct top-5 (unused below 5 classes), count]; float64 keeps counts exact
    totals = torch.zeros(4, device=device, dtype=torch.float64)
    metric_logger = misc.MetricLogger(delimiter="  ")
    for images, targets in metric_logger.log_every(data_loader, print_freq, "Test:"):
        images = images.to(device, non_blocking=True)  # [N, C, S, S]
        targets = targets.to(device, non_blocking=True)  # [N]
        with misc.autocast_context(device, amp_dtype):
            logits = model(images)  # [N, num_classes]
        batch_size = targets.shape[0]
        totals[0] += F.cross_entropy(logits.float(), targets, reduction="sum")
        totals[3] += batch_size
        for slot, acc in zip((1, 2), accuracy(logits.float(), targets, topk=topk)):
            totals[slot] += acc.double() * batch_size / 100.0  # percent of the batch -> correct count
    if sharded:
        totals = misc.all_reduce_sum(totals)
    loss_sum, correct1, correct5, count = totals.tolist()
    if count == 0:
        raise DataError("the validation set is empty: nothing to evaluate")
    stats = {"loss": loss_sum / count, "acc1": 100.0 * correct1 / count}
    if num_classes >= 5:
        stats["acc5"] = 100.0 * correct5 / count
    summary = "  ".join(f"{name} {value:.3f}" for name, value in stats.items())
    print(f"* {summary}  (n={int(round(count))})")
    return stats
