#!/usr/bin/env bash
# The GPU checks of issues 24 (part 4) and 25, prepared for a session that is lent a GPU, from
# the repository root. Each call fits the device tool's 10-minute limit:
#
#     bash benchmarks/gpu_check.sh                      # stages 1 and 3 (at most 390 s)
#     STAGES=2 bash benchmarks/gpu_check.sh             # stage 2 alone (at most 450 s)
#     STAGES=2 bash benchmarks/gpu_check.sh reduce-overhead   # ... with CUDA graphs
#
# 1. The CUDA SSF row on ViT-S/16 that failed last time (eager, bf16 autocast, batch 64, next to
#    full fine-tuning, the frozen-backbone limit and HF peft LoRA):
#    benchmarks/results/efficiency_cuda_ssf.{md,json,svg}.
# 2. `--modes compiled` for every method of the report on ViT-S/16 at the same batch:
#    benchmarks/results/efficiency_cuda_compiled.{md,json,svg}. It cannot hang: each entry's
#    first calls (where torch.compile compiles) get at most --compile-timeout seconds, and those
#    of all entries but the references (which run first) together --compile-budget; an entry over
#    either is left out and named in the report.
# 3. Issue 25's serving engine bound on the GPU (no Ray, no HTTP: the replica's own work for full
#    mixed batches vs batches split by adapter id, 1/8/64 SSF adapters, uniform and Zipf):
#    benchmarks/results/serving_engine_bound_cuda.{md,json}. It says whether the 2x target over
#    Ray's multiplexing is in reach before the full HTTP run (serving_http --device cuda).
# Every stage runs under coreutils `timeout` (150, 450 and 240 s at most).
#
# Where the device tool sets $OUT, the reports are copied there too. PYTHON picks the
# interpreter (default python3, the one holding PyTorch on the lent machines).
set -uo pipefail
PY=${PYTHON:-python3}
COMPILE_MODE=${1:-default}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
COMMON=(--device cuda --amp bf16 --batch-size 64 --archs vit_small_patch16_224)
STAGES=${STAGES:-1 3}
status=0

"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, \
torch.cuda.get_device_name(0))" || exit 1

if [[ " $STAGES " == *" 1 "* ]]; then
    echo "== 1. SSF on ViT-S, CUDA eager (the row that failed last time)"
    timeout 150 "$PY" -m benchmarks.efficiency "${COMMON[@]}" --methods ssf --warmup 3 --reps 5 \
        --name efficiency_cuda_ssf || status=1
fi

if [[ " $STAGES " == *" 2 "* ]]; then
    echo "== 2. every method compiled (mode $COMPILE_MODE) on ViT-S"
    timeout 450 "$PY" -m benchmarks.efficiency "${COMMON[@]}" \
        --methods bias,ssf,vpt,e2vpt,e2vpt_prune,lion,full --modes compiled \
        --compile-mode "$COMPILE_MODE" --compile-timeout 45 --compile-budget 240 --warmup 2 \
        --reps 5 --name efficiency_cuda_compiled || status=1
fi

if [[ " $STAGES " == *" 3 "* ]]; then
    echo "== 3. the serving engine bound on the GPU (issue 25)"
    timeout 240 "$PY" -m benchmarks.serving_http --bound-only --device cuda \
        --out serving_engine_bound_cuda || status=1
fi

if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/efficiency_cuda_ssf.* benchmarks/results/efficiency_cuda_compiled.* \
        benchmarks/results/serving_engine_bound_cuda.* "$OUT"/ 2>/dev/null
fi
exit $status
