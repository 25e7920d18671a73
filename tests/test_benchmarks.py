"""CPU smoke tests of benchmarks/bench_pretrain.py and benchmarks/bench_data.py (tiny configs)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
# The reference decoder (512 x 8) would make the tiny CPU runs slow; the encoder stays main_vit_tiny.
TINY = ["--device", "cpu", "--patch_size", "8", "--decoder_embed_dim", "64", "--decoder_depth", "1",
        "--decoder_num_heads", "2"]
STEP_FIELDS = {"arch", "img_size", "in_chans", "batch_size", "dtype", "compile", "step_ms", "img_per_s", "fused_attn",
               "flop_per_step", "tflops", "peak_mem_gib", "device"}


def load_bench_pretrain():
    spec = importlib.util.spec_from_file_location("bench_pretrain", REPO / "benchmarks" / "bench_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name, *args):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def json_lines(stdout: str) -> list:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def analytic_forward_flops(batch, img_size=32, patch=8, chans=7, dim=192, depth=12, dec_dim=64, dec_depth=1):
    """Matmul FLOPs of one DAMA forward, by hand: per block 24*T*D^2 (qkv, proj, 2-layer MLP of 4D) plus
    4*T^2*D (scores and weighted sum); both students, the projection head, decoder embed/pred, patch embed."""
    num_patches = (img_size // patch) ** 2
    visible = int(num_patches * (1 - 0.8))
    tokens = 1 + visible

    def blocks(t, d, n):
        return n * (24 * t * d * d + 4 * t * t * d)

    student = (2 * visible * patch * patch * chans * dim + blocks(tokens, dim, depth) + 2 * tokens * dim * dec_dim
               + blocks(num_patches + 1, dec_dim, dec_depth) + 2 * num_patches * dec_dim * patch * patch * chans)
    head = 8 * tokens * dim * dim  # Linear(D, 2D) and Linear(2D, D)
    return batch * (2 * student + head)


def test_bench_pretrain_tiny_cpu_row_table_and_error_row(tmp_path):
    out = tmp_path / "rows.jsonl"
    result = run_script("bench_pretrain.py", *TINY, "--configs", "vit_tiny:32:2:none", "vit_tiny:32:2:fp16",
                        "--steps", "2", "--warmup", "1", "--out", str(out))
    rows = json_lines(result.stdout)
    assert len(rows) == 2, result.stdout + result.stderr
    row, bad = rows
    assert STEP_FIELDS <= set(row) and "error" not in row
    assert (row["arch"], row["img_size"], row["in_chans"], row["batch_size"], row["dtype"], row["compile"]) == \
        ("main_vit_tiny", 32, 7, 2, "none", False)
    assert row["peak_mem_gib"] is None and row["device"].startswith("cpu")
    assert row["fused_attn"] is True and row["fused_adamw"] is False  # fused AdamW is for cuda only
    assert row["step_ms"] > 0 and row["img_per_s"] == pytest.approx(2e3 / row["step_ms"], rel=0.01, abs=0.1)
    # forward + backward ~ 3x the forward's matmuls (the patch embedding needs no input gradient)
    ratio = row["flop_per_step"] / analytic_forward_flops(batch=2)
    assert 2.9 < ratio < 3.05, ratio
    assert row["tflops"] == pytest.approx(row["flop_per_step"] / (row["step_ms"] * 1e-3) / 1e12, abs=1e-3)
    # fp16 needs cuda: reported as a row (with the flag named), the run still ends with a table and rc 1
    assert "fp16 needs a cuda device" in bad["error"] and bad["oom"] is False
    assert result.returncode == 1
    assert "| main_vit_tiny | 32 | 2 | none | off |" in result.stdout
    assert json_lines(out.read_text()) == rows


def test_check_numerics_bf16_against_fp32_on_cpu(capsys):
    bench = load_bench_pretrain()
    assert bench.main([*TINY, "--configs", "vit_tiny:32:2:bf16", "--check_numerics"]) == 0
    (row,) = json_lines(capsys.readouterr().out)
    assert row["check"] == "numerics" and row["ok"] is True and row["mask1_equal"] is True
    assert set(row["losses"]) == {"loss", "loss_recon1", "loss_recon2", "loss_info"}
    # bf16 really ran (the losses moved) and stayed within the bf16 tolerance
    assert 0 < row["max_rel_err"] <= row["rtol"] and row["grad_cosine"] >= row["min_cosine"]
    # the verdict follows the measured errors: no tolerance at all, or different masks, fail
    assert not bench.within_tolerance(row["rel_err"], row["grad_cosine"], True, 0.0, row["min_cosine"])
    assert not bench.within_tolerance(row["rel_err"], row["grad_cosine"], False, row["rtol"], row["min_cosine"])


def test_flop_count_includes_cpu_fused_attention():
    bench = load_bench_pretrain()
    q = torch.rand(2, 3, 10, 16, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=bench._cpu_sdpa_flop_mapping()) as counter:
        out = F.scaled_dot_product_attention(q, q, q)
    forward = counter.get_total_flops()
    assert forward == 4 * 2 * 3 * 10 * 10 * 16  # QK^T and the weighted sum of V
    with FlopCounterMode(display=False, custom_mapping=bench._cpu_sdpa_flop_mapping()) as counter:
        out.sum().backward()
    assert counter.get_total_flops() >= 2 * forward


def test_configs_from_flags_and_clear_errors():
    bench = load_bench_pretrain()
    parse = bench.get_args_parser().parse_args
    defaults = bench.configs_from_args(parse([]))
    assert [c.key for c in defaults] == list(bench.REFERENCE_IMG_PER_S)  # every row the reference has numbers for
    assert set(bench.TARGET_IMG_PER_S) <= {c.key for c in defaults}
    product = bench.configs_from_args(parse(["--arch", "vit_tiny", "main_vit_base", "--img_size", "128"]))
    assert [c.key for c in product] == [("main_vit_tiny", 128, 256, "bf16"), ("main_vit_base", 128, 256, "bf16")]
    with pytest.raises(ValueError, match="expected ARCH:IMG_SIZE:BATCH:DTYPE"):
        bench.parse_config("vit_base:224:bf16")
    with pytest.raises(ValueError, match="unknown arch 'vit_huge'"):
        bench.parse_config("vit_huge:224:8:bf16")


def test_bench_data_tiny_rows_for_both_pipelines_and_layouts(tmp_path):
    out = tmp_path / "data.jsonl"
    result = run_script("bench_data.py", "--img_size", "32", "--num_files", "4", "--num_workers", "1",
                        "--batch_size", "2", "--passes", "2", "--min_seconds", "0", "--device", "cpu",
                        "--augment_batch_size", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = json_lines(result.stdout)
    files = [r for r in rows if r["pipeline"] in ("cpu", "gpu")]
    assert {(r["pipeline"], r["layout"], r["workers"]) for r in files} == {
        (p, layout, w) for p in ("cpu", "gpu") for layout in ("channel_last", "planar") for w in (0, 1)}
    for r in files:
        assert r["img_size"] == 32 and r["file_size"] == 32 and r["img_per_s_per_worker"] > 0
        assert r["ms_per_img_per_worker"] == pytest.approx(1e3 / r["img_per_s_per_worker"], rel=0.01)
    (device_row,) = [r for r in rows if r["pipeline"] == "gpu_augment_device"]
    assert device_row["img_per_s"] > 0 and device_row["workers"] is None
    (synthetic_row,) = [r for r in rows if r["pipeline"] == "synthetic"]  # drawing cells, no files
    assert synthetic_row["layout"] == "-" and synthetic_row["img_per_s"] > 0
    assert "230 img/s per core at 224 px" in result.stdout and "| gpu | planar | 32 | 32 | 1 |" in result.stdout
    assert json_lines(out.read_text()) == rows


def test_bench_data_packed_rows_against_tiff_files(capsys):
    spec = importlib.util.spec_from_file_location("bench_data", REPO / "benchmarks" / "bench_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--pipelines", "packed", "--packed_sizes", "16", "32", "--num_files", "4", "--min_seconds", "0",
                       "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    rows = json_lines(stdout)
    assert {(r["pipeline"], r["layout"], r["img_size"]) for r in rows} == {
        (p, layout, s) for p in ("read", "read_cpu_augment", "read_gpu_crop") for layout in ("packed", "tiff")
        for s in (16, 32)}
    assert all(r["workers"] == 0 and r["img_per_s_per_worker"] > 0 for r in rows)
    assert "| read | packed | 16 |" in stdout


def test_bench_data_stage_rows_for_the_cpu_path_before_and_after_and_the_gpu_path(tmp_path):
    """--stages: ms per image of every stage (read, crop, to-float, resize, the warp; the v2 float pipeline's read,
    crop, resize, rotate, shift, flips; the --gpu_augment worker and device steps)."""
    spec = importlib.util.spec_from_file_location("bench_data", REPO / "benchmarks" / "bench_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    paths = bench.write_tiffs(tmp_path, 2, 32, 7, "planar", None)
    rows = bench.bench_stages(paths, 32, torch.device("cpu"), min_seconds=0.0, batch_size=2)
    stages = {(r["pipeline"], r["stage"]) for r in rows}
    assert {("cpu", s) for s in ("read", "crop", "to-float", "resize", "rotate+shift+flips")} <= stages
    assert {("cpu_v2_float (before)", s) for s in ("read + to-float", "crop", "resize", "rotate", "shift", "flips")} \
        <= stages
    assert {("gpu", s) for s in ("read (worker)", "crop + to-float (worker)", "resize (device)",
                                 "rotate+shift+flips (device)")} <= stages
    assert all(r["ms_per_img"] > 0 for r in rows)
    for pipeline in ("cpu", "cpu_v2_float (before)"):  # the sum row adds up its stages
        parts = [r["ms_per_img"] for r in rows if r["pipeline"] == pipeline and "sum" not in r["stage"]
                 and "whole" not in r["stage"]]
        (total,) = [r["ms_per_img"] for r in rows if r["pipeline"] == pipeline and r["stage"] == "sum of stages"]
        assert total == pytest.approx(sum(parts), abs=1e-3)
    assert "| cpu | 32 | resize |" in bench.stages_table(rows)
