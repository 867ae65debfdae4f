#!/usr/bin/env bash
# One GPU-machine session: build the optional CUDA extensions in the background, run the GPU
# tests, then the benchmarks; logs go to $OUT (or ./gpu_out). Run from the repository root with
# the .gpu folder of ../shared/gpu/README.md beside it (sdists in .gpu/sdist, wheels in .gpu/whl).
#
#   bash benchmarks/gpu_session.sh [tests|bench|all] [pytest -k expression]
#   bash benchmarks/gpu_session.sh decode   # the CUDA decode kernel alone: its GPU tests, then the A/B
#                                           # beside Triton and SDPA (no extension build)
set -u
MODE=${1:-all}
KEXPR=${2:-}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
GPU=$(cd "$(dirname "$0")/.." && pwd)/.gpu

# 1. mamba-ssm + causal-conv1d, detached (about 5.5 minutes on 16 cores); reuse a warm machine's build.
if [ "$MODE" != decode ] && [ -d "$GPU/sdist" ] && [ ! -f /tmp/build/DONE ] && [ ! -f /tmp/build/times.txt ]; then
  setsid nice -n 10 bash "$GPU/build_ext.sh" "$GPU/sdist" /tmp/build /tmp/cuda_site > /tmp/build.log 2>&1 < /dev/null &
fi
# 2. pure-Python comparison targets (fla, rwkv).
if ls "$GPU"/whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$GPU"/whl/*.whl > /dev/null 2>&1
fi
export PYTHONPATH=$PWD:/tmp/site

wait_build() {
  if [ -d "$GPU/sdist" ]; then
    while [ ! -f /tmp/build/DONE ]; do sleep 5; done
    cat /tmp/build/times.txt
    export PYTHONPATH=/tmp/cuda_site:$PWD:/tmp/site
  fi
}

if [ "$MODE" = tests ] || [ "$MODE" = all ]; then
  # Tests that need no compiled extension first (they overlap the build), then the Mamba ones.
  python3 -m pytest -q -p no:cacheprovider tests/gpu --ignore-glob='*mamba*' ${KEXPR:+-k "$KEXPR"} \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -30
  wait_build
  python3 -m pytest -q -p no:cacheprovider tests/gpu/*mamba* ${KEXPR:+-k "$KEXPR"} \
    2>&1 | tee "$OUT/gpu_tests_mamba.log" | tail -30
fi
if [ "$MODE" = bench ] || [ "$MODE" = all ]; then
  wait_build
  for b in ${BENCHES:-bench_generate}; do
    echo "== $b"
    python3 "benchmarks/$b.py" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/$b.log" | grep -v Warning | tail -40
  done
fi
if [ "$MODE" = decode ]; then
  export CONSTANT_STATE_CACHE=/tmp/cs_cache  # the kernel's nvcc build (about 10 s), kept on a warm machine
  timeout ${TEST_LIMIT:-300} python3 -m pytest -q -p no:cacheprovider -x tests/gpu/test_paged_attention_gpu.py \
    -k "${KEXPR:-cuda or kivi2}" \
    2>&1 | tee "$OUT/decode_tests.log" | tail -30
  timeout ${AB_LIMIT:-200} python3 benchmarks/ab_quant_decode.py sdpa fp8:triton fp8:cuda int8:triton int8:cuda \
    int4:triton int4:cuda int4-g32:triton int4-g32:cuda kivi2:triton kivi2:cuda kivi2:cuda:bs64 \
    2>&1 | tee "$OUT/ab_decode.log" | grep -v Warning | tail -20
  timeout ${AB_LIMIT:-200} python3 benchmarks/stream_probe.py --work 0 300 --stages 4 \
    2>&1 | tee "$OUT/stream_probe.log" | tail -12  # the paged layout's streaming ceiling beside the kernel
  for n in ${STAGES_LIST:-3 4}; do  # the staged variant at each depth (compiled in: one run each)
    CONSTANT_STATE_DECODE_STAGES=$n timeout ${AB_LIMIT:-200} python3 benchmarks/ab_quant_decode.py fp8:cuda:st \
      int8:cuda:st int4:cuda:st int4-g32:cuda:st 2>&1 | tee "$OUT/ab_staged$n.log" | grep -v Warning | tail -6
  done
  if command -v ncu > /dev/null; then  # where the CUDA kernel's warps stall (one launch each)
    for v in fp8:cuda int4:cuda kivi2:cuda; do
      timeout ${NCU_LIMIT:-90} ncu --kernel-name regex:decode[248]_kernel --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section Occupancy --section SchedulerStats \
        python3 benchmarks/profile_decode.py "$v" > "$OUT/ncu_${v%%:*}.log" 2>&1
      grep -E "Duration|Throughput|Warp Cycles|Issued Ipc|Achieved Occupancy|Stall" "$OUT/ncu_${v%%:*}.log" | head -20
    done
  fi
fi
