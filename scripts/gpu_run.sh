#!/usr/bin/env bash
# One device call: build the extension, check the intranode and low-latency kernels on 4 and 2
# GPUs, benchmark them, and run the foundation benchmark on both backends. Logs go to $OUT/logs.tar
# (one log per step).
#
#   GPU_STEPS=build,ll4,llnoshrink,llbench,inter22,interbench,test4,bench,inter41,test2,ll2,ll2noshrink,foundation \
#       bash scripts/gpu_run.sh   (the default list; about 6 minutes on 4 x H200)
#   Steps run in the order given: the default list measures the issues' targets first (low-latency,
#   internode 2 x 2, intranode), so a call cut short by DEADLINE_S keeps what matters most.
#   (inter22 / inter41: the internode kernels on 4 GPUs as 2 nodes x 2 and
#   4 nodes x 1; interbench: their benchmark as 2 x 2; intersweep, not in the default list: that
#   benchmark over the internode chunk sizes)
#   (foundation = foundation_torch + foundation_cuda; each can be named alone)
#   Not in the default list:
#   bench2: the intranode benchmark on 2 GPUs (llnoshrink / ll2noshrink, in the default list: the
#   low-latency checks on a buffer without shrink mode, i.e. the direct receive path);
#   llbench2: the low-latency benchmark on 2 GPUs;
#   ll2put / llbench2put: the low-latency checks / benchmark on 2 GPUs with
#   allow_nvlink_for_low_latency_mode=False (every peer through NVSHMEM puts; ll2putnoshrink: the
#   checks on a buffer without shrink mode, the scan-free receive over puts);
#   inter21 / interbench21: the internode checks / benchmark on 2 GPUs as 2 nodes x 1;
#   ll2full / test2full: every low-latency / intranode check on 2 GPUs (ll2 / test2: --quick);
#   probe: the NVLink ceiling (scripts/nvlink_probe.cu: SM push / pull, copy engines, all pairs at once,
#   the rail pairs alone, low-latency-sized bursts);
#   trace: the warp traces of the intranode and rail kernels (a KERNEL_TRACE=1 rebuild; put it last);
#   llbenchsm / llnoshrinksm: the low-latency benchmark / checks without shrink mode with the
#   dispatch's SM stores instead of its copy-engine send (DEEP_EP_LL_BULK_SEND=0);
#   llbenchnosplit / llnoshrinknosplit: the low-latency benchmark / checks with the header copied
#   with the data (DEEP_EP_LL_SPLIT_HEADER=0);
#   aggr: a rebuild with DISABLE_AGGRESSIVE_PTX_INSTRS=0 (non-coherent input loads, L2 256-byte
#   prefetch), then the intranode checks (quick) and benchmark on the GPUs there (put it last);
#   benchsendown: the intranode benchmark with the sender block copying a rank's rows to itself
#   (the variant before the receiver block did).
#
# Each step runs in its own process group with a wall-clock limit; on timeout the whole group
# is ended, so no rank of a hung test outlives its step.
set -uo pipefail
set -m
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/deep_ep_gpu_out}"
# The device tool returns only a few files from $OUT: every log and JSON goes to $LOGS, and
# $OUT/logs.tar is rewritten after each step (so a call cut short still returns what ran).
LOGS="${LOGS:-/tmp/deep_ep_gpu_logs}"
mkdir -p "$OUT" "$LOGS"
PYTHON="${PYTHON:-python3}"
# Without GPU_STEPS the list fits the GPUs there: the 4-GPU targets first, or on 2 GPUs every
# check and benchmark that 2 GPUs can run.
if [ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" -ge 4 ]; then
    DEFAULT_STEPS=build,ll4,llnoshrink,llbench,inter22,interbench,test4,bench,inter41,test2,ll2,ll2noshrink,foundation
else
    DEFAULT_STEPS=build,ll2full,ll2noshrink,ll2put,ll2putnoshrink,llbench2,test2full,inter21,bench2,interbench21,llbench2put,foundation
fi
STEPS="${GPU_STEPS:-$DEFAULT_STEPS}"
summary=()

# run_step NAME LIMIT_S COMMAND...: runs COMMAND (a shell string) with output in $LOGS/NAME.log.
run_step() {
    local name="$1" limit="$2" cmd="$3" start=$SECONDS rc
    # DEADLINE_S: the whole call's budget; a step gets at most what is left of it.
    local left=$(( ${DEADLINE_S:-100000} - SECONDS ))
    if (( left < 20 )); then
        echo "=== $name: skipped, ${left}s left of DEADLINE_S"
        summary+=("$name skipped (deadline)")
        return 1
    fi
    (( limit > left )) && limit=$left
    echo "=== $name (limit ${limit}s): $cmd"
    bash -c "$cmd" >"$LOGS/$name.log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if (( SECONDS - start >= limit )); then
            echo "=== $name: TIMEOUT after ${limit}s, ending process group $pid"
            kill -TERM -- "-$pid" 2>/dev/null
            sleep 3
            kill -KILL -- "-$pid" 2>/dev/null
            break
        fi
        sleep 1
    done
    wait "$pid"
    rc=$?
    echo "=== $name: rc=$rc ($((SECONDS - start)) s)"
    tail -n "${TAIL_LINES:-30}" "$LOGS/$name.log"
    tar -cf "$OUT/logs.tar" -C "$LOGS" .
    summary+=("$name rc=$rc $((SECONDS - start))s")
    return $rc
}

nvidia-smi --query-gpu=index,name,memory.total,clocks.sm --format=csv >"$LOGS/gpus.txt" 2>&1
nvidia-smi topo -m >>"$LOGS/gpus.txt" 2>&1

# The test scripts' command lines: NPROCS [NVL_DOMAIN_SIZE] then the script's own arguments.
intranode() { echo "$PYTHON tests/test_intranode.py --num-processes $1 ${*:2}"; }
low_latency() { echo "$PYTHON tests/test_low_latency.py --num-processes $1 ${*:2} ${LL_ARGS:-}"; }
# The internode kernels are a first version: a short kernel timeout turns a hang into an error.
internode() {
    echo "DEEP_EP_TIMEOUT_S=${INTER_TIMEOUT_S:-30} $PYTHON tests/test_internode.py --num-processes $1 --nvl-domain-size $2 ${*:3}"
}

BUILD_CMD="MAX_JOBS=32 $PYTHON -m pip install --no-build-isolation --no-deps -e . && $PYTHON -c 'import torch, deep_ep_cpp, deep_ep; print(\"deep_ep_cpp\", deep_ep_cpp.version(), [n for n in dir(deep_ep_cpp) if not n.startswith(\"_\")])'"

# run_named NAME: one step of the list (in the order GPU_STEPS gives).
run_named() {
    case "$1" in
    build)
        run_step build "${BUILD_LIMIT:-300}" "$BUILD_CMD" || { printf '%s\n' "${summary[@]}"; exit 1; } ;;
    # The warp traces (csrc/kernels/warp_trace.cuh): a rebuild with KERNEL_TRACE=1, then the
    # intranode and internode benchmarks print where their kernels' time goes. Steps after it in
    # the same call use the traced build (slightly slower): put it last.
    trace)
        run_step trace_build "${BUILD_LIMIT:-300}" "rm -rf build && KERNEL_TRACE=1 $BUILD_CMD" || return 1
        run_step trace_intranode "${BENCH_LIMIT:-300}" "DEEP_EP_INTRANODE_TRACE=1 $(intranode 4 --bench)"
        run_step trace_internode "${INTERBENCH_LIMIT:-240}" "DEEP_EP_RAIL_TRACE=1 $(internode 4 2 --bench)" ;;
    # The non-coherent input loads with an L2 256-byte prefetch hint (a rebuild with
    # DISABLE_AGGRESSIVE_PTX_INSTRS=0), then the intranode checks (quick) and benchmark on the GPUs
    # there, for A/B against `bench` / `bench2` of the default build. Later steps use this build: put it last.
    aggr)
        local n; n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); (( n > 4 )) && n=4
        run_step aggr_build "${BUILD_LIMIT:-300}" "rm -rf build && DISABLE_AGGRESSIVE_PTX_INSTRS=0 $BUILD_CMD" || return 1
        run_step aggr_test "${TEST4_LIMIT:-420}" "$(intranode "$n" --quick)"
        run_step aggr_bench "${BENCH_LIMIT:-300}" "$(intranode "$n" --bench --json "$LOGS/aggr_bench.json")" ;;
    probe) run_step probe "${PROBE_LIMIT:-90}" \
        "nvcc -O3 -arch=sm_90 -o /tmp/nvlink_probe scripts/nvlink_probe.cu && /tmp/nvlink_probe ${PROBE_MIB:-64}" ;;
    test4) run_step test4 "${TEST4_LIMIT:-420}" "$(intranode 4 "${TEST_ARGS:-}")" ;;
    test2) run_step test2 "${TEST2_LIMIT:-240}" "$(intranode 2 --quick "${TEST_ARGS:-}")" ;;
    test2full) run_step test2full "${TEST2_LIMIT:-240}" "$(intranode 2 "${TEST_ARGS:-}")" ;;
    bench) run_step bench "${BENCH_LIMIT:-300}" "$(intranode 4 --bench --json "$LOGS/bench.json" "${BENCH_ARGS:-}")" ;;
    bench2) run_step bench2 "${BENCH_LIMIT:-300}" "$(intranode 2 --bench --json "$LOGS/bench2.json" "${BENCH_ARGS:-}")" ;;
    # The intranode dispatch with the sender block copying a rank's rows to itself
    # (DEEP_EP_OWN_ROWS_BY_RECEIVER=0), for A/B against the default (compare with `bench` in the same call).
    benchsendown) run_step benchsendown "${BENCH_LIMIT:-300}" \
        "DEEP_EP_OWN_ROWS_BY_RECEIVER=0 $(intranode 4 --bench --json "$LOGS/benchsendown.json")" ;;
    ll4) run_step ll4 "${LL4_LIMIT:-240}" "$(low_latency 4)" ;;
    llnoshrink) run_step llnoshrink "${LL4_LIMIT:-240}" "$(low_latency 4 --no-shrink)" ;;
    llbench) run_step llbench "${LLBENCH_LIMIT:-180}" "$(low_latency 4 --bench-only)" ;;
    # The low-latency dispatch with the SM's own stores instead of the copy-engine send
    # (DEEP_EP_LL_BULK_SEND=0), for A/B against llbench / llnoshrink in the same call.
    llbenchsm) run_step llbenchsm "${LLBENCH_LIMIT:-180}" "DEEP_EP_LL_BULK_SEND=0 $(low_latency 4 --bench-only)" ;;
    llnoshrinksm) run_step llnoshrinksm "${LL4_LIMIT:-240}" "DEEP_EP_LL_BULK_SEND=0 $(low_latency 4 --no-shrink)" ;;
    # A/B against the default: the header copied with the data (DEEP_EP_LL_SPLIT_HEADER=0).
    llbenchnosplit) run_step llbenchnosplit "${LLBENCH_LIMIT:-180}" "DEEP_EP_LL_SPLIT_HEADER=0 $(low_latency 4 --bench-only)" ;;
    llnoshrinknosplit) run_step llnoshrinknosplit "${LL4_LIMIT:-240}" "DEEP_EP_LL_SPLIT_HEADER=0 $(low_latency 4 --no-shrink)" ;;
    ll2) run_step ll2 "${LL2_LIMIT:-150}" "$(low_latency 2 --quick)" ;;
    ll2full) run_step ll2full "${LL2_LIMIT:-150}" "$(low_latency 2)" ;;
    ll2noshrink) run_step ll2noshrink "${LL2_LIMIT:-150}" "$(low_latency 2 --quick --no-shrink)" ;;
    ll2put) run_step ll2put "${LL2_LIMIT:-150}" "$(low_latency 2 --quick --no-nvlink)" ;;
    ll2putnoshrink) run_step ll2putnoshrink "${LL2_LIMIT:-150}" "$(low_latency 2 --quick --no-nvlink --no-shrink)" ;;
    llbench2) run_step llbench2 "${LLBENCH_LIMIT:-180}" "$(low_latency 2 --bench-only)" ;;
    llbench2put) run_step llbench2put "${LLBENCH_LIMIT:-180}" "$(low_latency 2 --bench-only --no-nvlink)" ;;
    inter22) run_step inter22 "${INTER_LIMIT:-300}" "$(internode 4 2 "${INTER_ARGS:-}")" ;;
    inter41) run_step inter41 "${INTER_LIMIT:-300}" "$(internode 4 1 "${INTER_ARGS:-}")" ;;
    inter21) run_step inter21 "${INTER_LIMIT:-300}" "$(internode 2 1 "${INTER_ARGS:-}")" ;;
    interbench) run_step interbench "${INTERBENCH_LIMIT:-240}" "$(internode 4 2 --bench)" ;;
    intersweep) run_step intersweep "${INTERBENCH_LIMIT:-240}" "$(internode 4 2 --bench --sweep)" ;;
    interbench21) run_step interbench21 "${INTERBENCH_LIMIT:-240}" "$(internode 2 1 --bench)" ;;
    foundation)
        run_named foundation_torch
        run_named foundation_cuda ;;
    foundation_torch) run_step foundation_torch "${FOUNDATION_LIMIT:-120}" "DEEP_EP_BACKEND=torch $PYTHON -m deep_ep.bench" ;;
    foundation_cuda) run_step foundation_cuda "${FOUNDATION_LIMIT:-120}" "$PYTHON -m deep_ep.bench" ;;
    "") ;;
    *) echo "=== unknown step '$1'"; summary+=("$1 unknown") ;;
    esac
}

IFS=',' read -r -a step_list <<<"$STEPS"
for step in "${step_list[@]}"; do
    run_named "$step"
done
echo "=== summary"
printf '%s\n' "${summary[@]}"
for log in "$LOGS"/bench*.log "$LOGS"/aggr_bench.log; do
    [ -f "$log" ] && sed -n '/^summary/,$p' "$log"
done
exit 0
