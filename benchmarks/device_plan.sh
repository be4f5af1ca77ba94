#!/usr/bin/env bash
# The GPU measurements that issues 7 and 10 wait for, as three device calls of under ten minutes each (a session
# has 30 minutes of device time):
#
#   bash benchmarks/device_plan.sh kernels   # kernel checks and timings, SDXL conv stages  (~8 min)
#   bash benchmarks/device_plan.sh dits      # e2e FLUX.1-dev and PixArt-Sigma               (~8 min)
#   bash benchmarks/device_plan.sh sdxl      # e2e SDXL U-Net                                (~8 min)
#
# Each stage writes its results JSON files and a log into $OUT when set (the device tool's output folder), else
# into benchmarks/results. diffusers is not installed on the GPU machine: download its wheel here first (see
# /work/.library/device/README.md) into .whl/ and carry it; this script installs it into /tmp/site.
# Every step has its own time limit and the benchmarks write their results as they go, so a step that runs long
# leaves what it measured and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
kernels | dits | sdxl) ;;
*) echo "usage: bash benchmarks/device_plan.sh kernels|dits|sdxl" >&2; exit 2 ;;
esac
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD"
fi
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())") || exit 1

e2e() {   # e2e NAME TIMEOUT_PER_VARIANT MODEL VARIANT...: one results file, copied to $out
    local name=$1 per=$2 model=$3
    shift 3
    timeout $((per * $# + 30)) python3 benchmarks/e2e.py --models "$model" --batches 1 --variants "$@" \
        --timeout-s "$per" --name "$name" 2>&1 | tee -a "$out/$name.log"
    [ "$out" = benchmarks/results ] || cp "benchmarks/results/$name.json" "$out/" 2>/dev/null
}

case "$1" in
kernels)
    # correctness on the GPU first (implicit conv, planar quantizer, persistent GEMM included), then the tables;
    # rows to read: dmq-w8a8-persistent / dmq-w4a4-2l-r32-persistent against their one-tile-per-program rows
    # (flip dmq.kernels.triton.gemm.PERSISTENT if they win), and the g64 / -inloop rows with the spill-free configs
    timeout 330 python3 benchmarks/kernel_bench.py --check --budget-s 230 --results-dir "$out" 2>&1 \
        | tee "$out/kernels.log"
    # quant-*-planar against -rows-after-copy; dmq-conv-gemm-implicit against the im2col path (flip
    # dmq.kernels.linear.IMPLICIT_CONV if it wins); tap-scales-runs against per-row-scales
    timeout 200 python3 benchmarks/conv_gemm.py --results-dir "$out" 2>&1 | tee "$out/conv.log"
    ;;
dits)
    # FLUX: the persistent GEMM end to end; PixArt-Sigma: the spill-free configs (last measured at 0.95x)
    e2e "e2e-flux-plan-$gpu" 110 flux-dev bf16+rcompile+cudagraph dmq-svdquant-w4a4-2l-fused+rcompile+cudagraph \
        dmq-svdquant-w4a4-2l-fused-persistent+rcompile+cudagraph
    e2e "e2e-pixart-plan-$gpu" 80 pixart-sigma bf16+rcompile+cudagraph dmq-svdquant-w4a4-2l-fused+rcompile+cudagraph
    ;;
sdxl)
    # the planar quantizer (now the default for NCHW inputs) and the implicit-GEMM convolutions end to end
    e2e "e2e-sdxl-plan-$gpu" 170 sdxl bf16+rcompile+cudagraph dmq-svdquant-w4a4-2l-fused+rcompile+cudagraph \
        dmq-svdquant-w4a4-2l-fused-implicitconv+rcompile+cudagraph
    ;;
esac
