"""Throughput of one DAMA pretraining step: forward, both losses, backward and the AdamW step.

The model, optimizer, loss scaler and autocast come from the project's own code, set up as in
main_pretrain.py / engine_pretrain.py, and every step runs on a synthetic batch that already lives on the
device, so the numbers measure the training step alone (see bench_data.py for the input pipeline).

    python benchmarks/bench_pretrain.py                                   # the reference's rows and the targets (GPU)
    python benchmarks/bench_pretrain.py --configs vit_base:224:256:bf16 --compile both
    python benchmarks/bench_pretrain.py --check_numerics --configs vit_tiny:128:64:bf16 --compile
    python benchmarks/bench_pretrain.py --device cpu --configs vit_tiny:32:2:none --patch_size 8 --steps 2 --warmup 1

A config is ARCH:IMG_SIZE:BATCH:DTYPE (ARCH main_vit_base or vit_base; DTYPE bf16, fp16 or none); the
--arch/--img_size/--batch_size/--amp_dtype lists give their product instead. Prints one JSON line per
config (as soon as it is measured), then a Markdown table; --out FILE also appends the JSON lines to FILE.
"""
import argparse
import gc
import itertools
import math
import platform
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.flop_counter as flop_counter
from timm.models.vision_transformer import Attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules live in the repo root

import models_dama  # noqa: E402
import util.misc as misc  # noqa: E402
from benchmarks.common import emit, fmt  # noqa: E402
from util.lr_decay import param_groups_weight_decay  # noqa: E402

LOSS_TERMS = models_dama.DAMA.loss_terms  # the benchmarks time DAMA: both students and the info loss

# The reference code's img/s on one H100 80GB HBM3 (torch 2.11; the H200 has the same arithmetic rate), and this
# project's targets for one H200.
REFERENCE_IMG_PER_S = {
    ("main_vit_base", 224, 64, "fp16"): 683,
    ("main_vit_base", 224, 256, "bf16"): 919,
    ("main_vit_base", 128, 256, "bf16"): 1871,
    ("main_vit_tiny", 224, 256, "bf16"): 1121,
    ("main_vit_tiny", 128, 128, "fp16"): 1415,
    ("main_vit_tiny", 128, 256, "bf16"): 1671,
}
TARGET_IMG_PER_S = {("main_vit_base", 224, 256, "bf16"): 4000, ("main_vit_base", 128, 256, "bf16"): 8000,
                    ("main_vit_tiny", 128, 256, "bf16"): 12000}
TARGET_PEAK_MEM_GIB = {("main_vit_base", 224, 256, "bf16"): 44.0}  # the reference's peak at that batch
DEFAULT_CONFIGS = ("vit_base:224:64:fp16", "vit_base:224:256:bf16", "vit_base:128:256:bf16", "vit_tiny:224:256:bf16",
                   "vit_tiny:128:128:fp16", "vit_tiny:128:256:bf16")


@dataclass(frozen=True)
class Config:
    arch: str
    img_size: int
    batch_size: int
    amp_dtype: str

    @property
    def key(self):
        return self.arch, self.img_size, self.batch_size, self.amp_dtype


def arch_name(name: str) -> str:
    """'vit_base' -> 'main_vit_base'; full model names (main_*, mae_*) pass through."""
    full = f"main_{name}" if name.startswith("vit_") else name
    known = sorted(models_dama.ARCH_CONFIGS)
    if full not in known:
        raise ValueError(f"unknown arch {name!r}; expected one of {known} (or without the 'main_' prefix)")
    return full


def parse_config(spec: str) -> Config:
    """'vit_base:224:256:bf16' -> Config; the error names the bad spec and the expected form."""
    parts = spec.split(":")
    if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit() or parts[3] not in misc.AMP_DTYPES:
        raise ValueError(f"--configs {spec!r}: expected ARCH:IMG_SIZE:BATCH:DTYPE with DTYPE one of "
                         f"{sorted(misc.AMP_DTYPES)}, e.g. vit_base:224:256:bf16")
    return Config(arch_name(parts[0]), int(parts[1]), int(parts[2]), parts[3])


def configs_from_args(args) -> list:
    """--configs, else the product of the list flags (any left out takes its default), else the
    default set; duplicates dropped, order kept."""
    if args.configs:
        configs = [parse_config(spec) for spec in args.configs]
    elif any(v is not None for v in (args.arch, args.img_size, args.batch_size, args.amp_dtype)):
        product = itertools.product(args.arch or ["main_vit_base"], args.img_size or [224],
                                    args.batch_size or [256], args.amp_dtype or ["bf16"])
        configs = [Config(arch_name(a), s, b, d) for a, s, b, d in product]
    else:
        configs = [parse_config(spec) for spec in DEFAULT_CONFIGS]
    return list(dict.fromkeys(configs))


# ----------------------------------------------------------------------------------------------------
# Building what main_pretrain.py builds
# ----------------------------------------------------------------------------------------------------
def build_model(cfg: Config, args, device):
    model = models_dama.build_model(cfg.arch, img_size=cfg.img_size, patch_size=args.patch_size,
                                    in_chans=args.in_chans, mask_ratio=args.mask_ratio,
                                    mask_overlap_ratio=args.mask_overlap_ratio,
                                    decoder_embed_dim=args.decoder_embed_dim, decoder_depth=args.decoder_depth,
                                    decoder_num_heads=args.decoder_num_heads)
    return model.to(device)


def build_optimizer(model, cfg: Config, device):
    """AdamW on main_pretrain's parameter groups (fused on cuda) and the project's loss scaler."""
    groups = param_groups_weight_decay(model, 0.05)
    optimizer = torch.optim.AdamW(groups, lr=1.5e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    return optimizer, misc.LossScaler(cfg.amp_dtype, device.type)


def maybe_compile(model, compiled: bool, mode: str):
    return torch.compile(model, mode=None if mode == "default" else mode) if compiled else model


def random_batch(cfg: Config, args, device, batch_size=None, seed=0):
    """[N, C, S, S] float32 in [0, 1) on the device: what the data loader hands the engine."""
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (batch_size or cfg.batch_size, args.in_chans, cfg.img_size, cfg.img_size)
    return torch.rand(shape, device=device, generator=generator)


def make_train_step(model, optimizer, loss_scaler, device, amp_dtype, imgs):
    """The engine's step without the data loader: no host sync anywhere inside."""
    losses = misc.LossWindow(LOSS_TERMS, device)  # the engine's on-device loss window

    def step():
        with misc.autocast_context(device, amp_dtype):
            out = model(imgs, info_weight=1.0)
        loss_scaler(out["loss"], optimizer, update_grad=True)
        optimizer.zero_grad(set_to_none=True)
        losses.add([out[k] for k in LOSS_TERMS])

    return step, losses


# ----------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------
def _cpu_sdpa_flop_mapping() -> dict:
    """FLOP formulas for the CPU fused-attention kernel, which torch's counter lacks (the CUDA kernels are
    registered): without them a CPU count would leave attention out."""
    forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    mapping = {}
    if forward is not None and hasattr(flop_counter, "sdpa_flop_count"):
        mapping[forward] = lambda q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v)
    if backward is not None and hasattr(flop_counter, "sdpa_backward_flop_count"):
        mapping[backward] = (lambda grad_out, q, k, v, *a, out_shape=None, **kw:
                             flop_counter.sdpa_backward_flop_count(grad_out, q, k, v))
    return mapping


def uses_fused_attention(model) -> bool:
    """True when every timm Attention calls F.scaled_dot_product_attention (timm.layers.use_fused_attn)."""
    return all(m.fused_attn for m in model.modules() if isinstance(m, Attention))


def count_step_flops(model, cfg: Config, args, device) -> int:
    """FLOPs of one full step (forward + backward) at cfg.batch_size, counted by FlopCounterMode on the eager
    model over a small probe batch and scaled: every op of the step is per sample, so FLOPs are linear in
    the batch, and the probe avoids a full-batch eager step that could run out of memory where the
    compiled one would not. The optimizer step does no matmuls and adds nothing."""
    probe = min(cfg.batch_size, args.flop_probe_batch)
    imgs = random_batch(cfg, args, device, batch_size=probe, seed=1)
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_flop_mapping()) as counter:
        with misc.autocast_context(device, cfg.amp_dtype):
            out = model(imgs, info_weight=1.0)
        out["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() * cfg.batch_size // probe


@contextmanager
def recording_host_syncs(enabled: bool, found: list):
    """With `enabled` (cuda only), every host synchronisation inside the block (.item(), a device-to-host
    copy, nonzero, ...) is appended to `found`: an empty list proves the step never waits for the GPU."""
    if not enabled:
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message))


def time_steps(step, steps: int, device, host_syncs=None) -> float:
    """Mean milliseconds per step: CUDA events on a GPU (they time the device queue, so host launch
    overhead counts whenever it starves the GPU), perf_counter after the last op elsewhere.
    host_syncs: a list to record the host synchronisations of the timed steps into (cuda only)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        with recording_host_syncs(host_syncs is not None, host_syncs if host_syncs is not None else []):
            for _ in range(steps):
                step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps
    begin = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - begin) * 1e3 / steps


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def base_row(cfg: Config, args, compiled: bool, device) -> dict:
    return dict(arch=cfg.arch, img_size=cfg.img_size, patch_size=args.patch_size, in_chans=args.in_chans,
                batch_size=cfg.batch_size, dtype=cfg.amp_dtype, compile=compiled,
                compile_mode=args.compile_mode if compiled else None, device=device_name(device),
                torch=torch.__version__)


def bench_config(cfg: Config, args, compiled: bool, device) -> dict:
    """Build, count FLOPs, warm up (compilation happens here), time; the row of one config."""
    torch.manual_seed(args.seed)
    model = build_model(cfg, args, device)
    model.train()
    optimizer, loss_scaler = build_optimizer(model, cfg, device)
    flops = count_step_flops(model, cfg, args, device)
    imgs = random_batch(cfg, args, device)
    step, loss_window = make_train_step(maybe_compile(model, compiled, args.compile_mode), optimizer, loss_scaler,
                                        device, cfg.amp_dtype, imgs)
    for _ in range(args.warmup):
        step()
    host_syncs = [] if args.check_syncs and device.type == "cuda" else None
    step_ms = time_steps(step, args.steps, device, host_syncs)
    losses, _ = loss_window.sync()  # the one host read, after timing: {term: mean over every step}
    row = base_row(cfg, args, compiled, device)
    row.update(step_ms=round(step_ms, 3), img_per_s=round(cfg.batch_size * 1e3 / step_ms, 1),
               flop_per_step=flops, flop_per_img=flops // cfg.batch_size,
               tflops=round(flops / (step_ms * 1e-3) / 1e12, 3), peak_mem_gib=peak_mem_gib(device),
               fused_attn=uses_fused_attention(model), fused_adamw=bool(optimizer.defaults.get("fused")),
               mean_loss=round(losses["loss"], 5), steps=args.steps, warmup=args.warmup,
               host_syncs=None if host_syncs is None else len(host_syncs),
               first_host_sync=host_syncs[0] if host_syncs else None,
               reference_img_per_s=REFERENCE_IMG_PER_S.get(cfg.key), target_img_per_s=TARGET_IMG_PER_S.get(cfg.key),
               target_peak_mem_gib=TARGET_PEAK_MEM_GIB.get(cfg.key))
    if not all(math.isfinite(v) for v in losses.values()):
        row["error"] = f"non-finite loss during the benchmark: {losses}"
    return row


def peak_mem_gib(device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, also when torch.compile wraps it in its own exception type."""
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(exc, oom_type) or "out of memory" in str(exc).lower()


def free_device_memory(device):
    torch._dynamo.reset()  # drops compiled graphs; keeps later configs clear of the recompile limit
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_safely(fn, cfg: Config, args, compiled: bool, device) -> dict:
    """fn's row, or an error row: an OOM (or any failure) of one config must not lose the others' results."""
    free_device_memory(device)
    try:
        return fn(cfg, args, compiled, device)
    except Exception as exc:  # noqa: BLE001 - reported in the row and in the exit code
        row = base_row(cfg, args, compiled, device)
        row["error"] = "out of memory" if is_out_of_memory(exc) else f"{type(exc).__name__}: {exc}"
        row["oom"] = is_out_of_memory(exc)
        return row
    finally:
        free_device_memory(device)


# ----------------------------------------------------------------------------------------------------
# Numerics: low precision (and compile) against fp32 eager on the same batch and masks
# ----------------------------------------------------------------------------------------------------
def losses_and_grads(model, imgs, device, amp_dtype: str, seed: int):
    """Loss terms, masks and the flat gradient of one forward/backward; seeding right before the forward
    makes every run draw the same random masks."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with misc.autocast_context(device, amp_dtype):
        out = model(imgs, info_weight=1.0)
    out["loss"].backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grad = torch.cat([p.grad.detach().double().flatten() for p in params])  # float64: a stable cosine
    losses = {k: out[k].item() for k in LOSS_TERMS}
    return losses, out["mask1"].detach().clone(), out["mask2"].detach().clone(), grad


def within_tolerance(rel_err: dict, grad_cosine: float, mask1_equal: bool, rtol: float, min_cosine: float) -> bool:
    """Same masks for student 1, every loss term within rtol, gradient direction kept."""
    return mask1_equal and max(rel_err.values()) <= rtol and grad_cosine >= min_cosine


def check_numerics(cfg: Config, args, compiled: bool, device) -> dict:
    """Compare cfg.amp_dtype (+ torch.compile) with fp32 eager: relative error of each loss term and
    cosine similarity of the full gradient, within a bf16-sized tolerance.

    Student 2's mask ranks student 1's per-patch losses, so rounding can swap a few near-tied patches:
    mask2_agreement reports the fraction of equal entries (1.0 when nothing moved)."""
    torch.manual_seed(args.seed)
    model = build_model(cfg, args, device)
    imgs = random_batch(cfg, args, device)
    ref_losses, ref_mask1, ref_mask2, ref_grad = losses_and_grads(model, imgs, device, "none", args.seed)
    if compiled:
        torch._inductor.config.fallback_random = True  # compiled rand draws the same numbers as eager
    test_model = maybe_compile(model, compiled, args.compile_mode)
    losses, mask1, mask2, grad = losses_and_grads(test_model, imgs, device, cfg.amp_dtype, args.seed)
    rel_err = {k: abs(losses[k] - ref_losses[k]) / max(abs(ref_losses[k]), 1e-8) for k in LOSS_TERMS}
    grad_cosine = torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0).item()
    mask1_equal = torch.equal(mask1, ref_mask1)
    ok = within_tolerance(rel_err, grad_cosine, mask1_equal, args.numerics_rtol, args.numerics_min_cosine)
    row = base_row(cfg, args, compiled, device)
    row.update(check="numerics", reference="fp32 eager", ref_losses=ref_losses, losses=losses,
               rel_err={k: float(f"{v:.3g}") for k, v in rel_err.items()},
               max_rel_err=float(f"{max(rel_err.values()):.3g}"), grad_cosine=round(grad_cosine, 6),
               mask1_equal=mask1_equal, mask2_agreement=round((mask2 == ref_mask2).float().mean().item(), 4),
               rtol=args.numerics_rtol, min_cosine=args.numerics_min_cosine, ok=ok)
    return row


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------
def markdown_table(rows: list) -> str:
    header = ("| arch | img | batch | dtype | compile | step ms | img/s | ref img/s | x ref | target img/s "
              "| TFLOP/s | GFLOP/img | peak GiB | note |")
    lines = [header, "|" + "---|" * 14]
    for r in rows:
        measured = r.get("reference_img_per_s") and "img_per_s" in r
        speedup = r["img_per_s"] / r["reference_img_per_s"] if measured else None
        flop_img = r["flop_per_img"] / 1e9 if "flop_per_img" in r else None
        compiled = (r["compile_mode"] or "on") if r["compile"] else "off"
        lines.append(f"| {r['arch']} | {r['img_size']} | {r['batch_size']} | {r['dtype']} | {compiled} "
                     f"| {fmt(r.get('step_ms'), '.1f')} | {fmt(r.get('img_per_s'), ',.0f')} "
                     f"| {fmt(r.get('reference_img_per_s'), ',')} | {fmt(speedup, '.2f')} "
                     f"| {fmt(r.get('target_img_per_s'), ',')} | {fmt(r.get('tflops'), '.1f')} "
                     f"| {fmt(flop_img, '.1f')} | {fmt(r.get('peak_mem_gib'), '.1f')} | {r.get('error', '')} |")
    return "\n".join(lines)


def get_args_parser():
    parser = argparse.ArgumentParser("DAMA training-step benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=None,
                        help=f"ARCH:IMG_SIZE:BATCH:DTYPE specs (default: {' '.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--arch", nargs="+", default=None, help="with the lists below, instead of --configs")
    parser.add_argument("--img_size", nargs="+", type=int, default=None)
    parser.add_argument("--batch_size", nargs="+", type=int, default=None)
    parser.add_argument("--amp_dtype", nargs="+", choices=sorted(misc.AMP_DTYPES), default=None)
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--in_chans", type=int, default=7)
    parser.add_argument("--mask_ratio", type=float, default=0.8)
    # the reference decoder (512 wide, 8 blocks) by default; smaller ones keep CPU smoke tests fast
    parser.add_argument("--decoder_embed_dim", type=int, default=512)
    parser.add_argument("--decoder_depth", type=int, default=8)
    parser.add_argument("--decoder_num_heads", type=int, default=16)
    parser.add_argument("--mask_overlap_ratio", type=float, default=0.5)
    parser.add_argument("--compile", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                        help="torch.compile the model ('--compile' alone = on; 'both' runs eager and compiled)")
    parser.add_argument("--compile_mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--flop_probe_batch", type=int, default=2, help="batch of the FLOP-counting step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument("--check_syncs", action="store_true",
                        help="on cuda: count host synchronisations during the timed steps "
                             "(torch.cuda.set_sync_debug_mode('warn')); reported as host_syncs")
    parser.add_argument("--check_numerics", action="store_true",
                        help="instead of timing: compare each config's dtype (+ compile) with fp32 eager")
    parser.add_argument("--numerics_rtol", type=float, default=0.03,
                        help="max relative error of each loss term (bf16 keeps 8 significant bits)")
    parser.add_argument("--numerics_min_cosine", type=float, default=0.99,
                        help="min cosine similarity between the low-precision and the fp32 gradient")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    for flag in ("steps", "warmup", "flop_probe_batch"):
        if getattr(args, flag) < (0 if flag == "warmup" else 1):
            raise SystemExit(f"error: --{flag} must be positive, got {getattr(args, flag)}")
    try:
        configs = configs_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    device = torch.device(args.device)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    fn = check_numerics if args.check_numerics else bench_config
    rows = []
    for cfg, compiled in itertools.product(configs, modes):
        rows.append(run_safely(fn, cfg, args, compiled, device))
        emit(rows[-1], args.out)
    if not args.check_numerics:
        print()
        print(markdown_table(rows))
    failed = [r for r in rows if ("error" in r and not r.get("oom")) or r.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
