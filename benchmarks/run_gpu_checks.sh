#!/usr/bin/env bash
# The GPU checks in a single call (about 8 minutes on an H200): training-step throughput eager and
# compiled, host-sync count, bf16/compile numerics, data pipeline, GPU augmentation and the CPU smoke tests.
# Every step writes <name>.log (and .jsonl) under $OUT; status.txt has each step's exit code; summary.md
# collects the tables and is printed at the end. Steps run in priority order and are skipped (marked SKIP)
# once BUDGET_S seconds are spent, so a slow compile cannot lose the results already measured.
#
#   OUT=/some/dir bash benchmarks/run_gpu_checks.sh          # on the GPU machine
#   SMOKE=1 OUT=/tmp/x bash benchmarks/run_gpu_checks.sh     # plumbing check on a CPU: tiny, no compile
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
PY=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-480}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
: > "$OUT/status.txt"
START=$(date +%s)
BENCH="$PY benchmarks/bench_pretrain.py"

if [ "$SMOKE" = 1 ]; then
    TINY="--device cpu --patch_size 8 --decoder_embed_dim 64 --decoder_depth 1 --decoder_num_heads 2"
    EAGER="$TINY --configs vit_tiny:32:2:bf16 vit_tiny:32:2:none --steps 1 --warmup 0"
    NUMERICS="$TINY --configs vit_tiny:32:2:bf16"
    DATA="--img_size 32 --num_files 4 --num_workers 1 --batch_size 2 --min_seconds 0 --passes 2 --device cpu"
    DATA="$DATA --augment_batch_size 4"
else
    EAGER="--steps 20 --warmup 5"  # the default configs: the reference's rows and the targets
    NUMERICS="--configs vit_base:224:32:bf16"
    DATA="--img_size 224 128 --num_files 256 --num_workers 14 --batch_size 64 --min_seconds 1 --passes 3"
    DATA="$DATA --device cuda"
fi

elapsed() { echo $(( $(date +%s) - START )); }

# run_step NAME MAX_SECONDS COMMAND...: COMMAND with a timeout of MAX_SECONDS (or what is left of the budget)
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$(( BUDGET_S - $(elapsed) ))
    if (( left < 30 )); then
        echo "$name SKIP (budget of ${BUDGET_S}s spent)" | tee -a "$OUT/status.txt"
        return
    fi
    (( limit > left )) && limit=$left
    echo "== $name (limit ${limit}s, at $(elapsed)s)"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? at $(elapsed)s" | tee -a "$OUT/status.txt"
}

# compile_step: as run_step, but not in SMOKE mode (compiling on a small CPU takes many minutes)
compile_step() {
    if [ "$SMOKE" = 1 ]; then echo "$1 SKIP (smoke run)" | tee -a "$OUT/status.txt"; return; fi
    run_step "$@"
}

run_step env 60 bash -c "nvidia-smi || true; nproc; $PY -c 'import torch, timm, torchvision; \
print(torch.__version__, timm.__version__, torchvision.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else \"no cuda\"); \
print(\"timm fused attention:\", timm.layers.use_fused_attn())'"

# 1. Eager training steps, counting host syncs in the timed steps.
run_step pretrain_eager 150 $BENCH $EAGER --check_syncs --out "$OUT/pretrain_eager.jsonl"

# 2. The data pipeline: CPU augmentation vs --gpu_augment (workers decode + crop, the device augments).
run_step data 100 $PY benchmarks/bench_data.py $DATA --out "$OUT/data.jsonl"

# 3. The targets with torch.compile (compilation happens in the warm-up steps).
compile_step pretrain_compile 330 $BENCH --configs vit_tiny:128:256:bf16 vit_base:224:256:bf16 --compile \
    --check_syncs --steps 30 --warmup 3 --out "$OUT/pretrain_compile.jsonl"

# 4. Numerics against fp32 eager on the same batch and masks: bf16 eager, then bf16 + compile.
run_step numerics_eager 60 $BENCH --check_numerics $NUMERICS --out "$OUT/numerics.jsonl"
compile_step numerics_compile 150 $BENCH --check_numerics --configs vit_tiny:128:64:bf16 --compile \
    --out "$OUT/numerics.jsonl"

# 5. Extras while time is left: CUDA graphs on the launch-bound config, the GPU-augmentation tests.
compile_step pretrain_compile_cudagraphs 150 $BENCH --configs vit_tiny:128:256:bf16 --compile \
    --compile_mode reduce-overhead --steps 30 --warmup 3 --out "$OUT/pretrain_compile.jsonl"
run_step tests 120 $PY -m pytest tests/test_gpu_augment.py tests/test_benchmarks.py -q -x

{
    echo "# GPU checks ($(elapsed)s)"
    echo; echo '```'; cat "$OUT/status.txt"; echo '```'
    [ -f "$OUT/env.log" ] && tail -2 "$OUT/env.log"
    for name in pretrain_eager pretrain_compile pretrain_compile_cudagraphs data; do
        [ -f "$OUT/$name.log" ] || continue
        echo; echo "## $name"; echo
        grep -h "^|\|^Reference" "$OUT/$name.log"
        grep -h "Error" "$OUT/$name.log" | grep -v '^{' | tail -3
    done
    echo; echo "## numerics against fp32 eager"; echo
    [ -f "$OUT/numerics.jsonl" ] && $PY -c "
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r['arch'], r['img_size'], r['batch_size'], r['dtype'], 'compile' if r['compile'] else 'eager',
          'ok' if r.get('ok') else 'FAILED', 'max_rel_err', r.get('max_rel_err'), 'grad_cosine',
          r.get('grad_cosine'), 'mask2_agreement', r.get('mask2_agreement'), r.get('error', ''))
" "$OUT/numerics.jsonl"
    echo; echo "## host syncs in the timed steps (0 = none; None = not checked, CPU)"; echo
    cat "$OUT"/pretrain_*.jsonl 2>/dev/null | $PY -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(r['arch'], r['img_size'], r['batch_size'], r['dtype'], 'compile' if r['compile'] else 'eager',
          'host_syncs', r.get('host_syncs'), r.get('first_host_sync') or '', r.get('error', ''))
"
    [ -f "$OUT/tests.log" ] && { echo; echo "## tests"; tail -3 "$OUT/tests.log"; }
} > "$OUT/summary.md" 2>&1
cat "$OUT/summary.md"
