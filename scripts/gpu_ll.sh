#!/usr/bin/env bash
# One GPU session for the low-latency kernels: build, test on 2 and 4 GPUs, benchmark.
# Logs go under $OUT (the device tool's output folder) or /tmp/gpu_ll.
#
#   bash scripts/gpu_ll.sh            # everything
#   LL_STEPS="build test4" bash scripts/gpu_ll.sh
#
# The full build (pip install -e .) is tried first; if it fails (another part of csrc/ does not
# compile yet), a standalone deep_ep_cpp with only the low-latency sources is built instead.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/gpu_ll}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-16}"
export DEEP_EP_TIMEOUT_S="${DEEP_EP_TIMEOUT_S:-20}"
steps="${LL_STEPS:-build test2 test4 bench}"
PYTHON="${PYTHON:-python3}"

has_step() { [[ " $steps " == *" $1 "* ]]; }

nvidia-smi -L 2>&1 | tee "$OUT/gpus.txt"

build_standalone() {
    echo "== standalone low-latency build"
    mkdir -p build_ll
    "$PYTHON" - <<'EOF' >"$OUT/build_standalone.log" 2>&1
import os, sys
sys.path.insert(0, os.getcwd())
import build_config
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

cfg = build_config.resolve()
with open("build_ll/ll_module.cpp", "w") as f:
    f.write('#include <torch/extension.h>\n#include "low_latency.hpp"\n'
            'PYBIND11_MODULE(deep_ep_cpp, m) { deep_ep::register_low_latency(m); }\n')
sources = ["build_ll/ll_module.cpp", "csrc/low_latency.cpp", "csrc/kernels/internode_ll.cu",
           "csrc/kernels/nvshmem_runtime.cu"]
ext = CUDAExtension("deep_ep_cpp", sources, include_dirs=cfg.include_dirs, library_dirs=cfg.library_dirs,
                    extra_compile_args={"cxx": cfg.cxx_flags, "nvcc": cfg.nvcc_flags,
                                        "nvcc_dlink": cfg.nvcc_dlink_flags},
                    extra_link_args=cfg.extra_link_args)
sys.argv = ["setup.py", "build_ext", "--inplace"]
setup(name="deep_ep_ll_standalone", ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
EOF
    local status=$?
    tail -5 "$OUT/build_standalone.log"
    return $status
}

has_ll_module() {
    "$PYTHON" -c "import torch, deep_ep_cpp, sys; sys.exit(0 if hasattr(deep_ep_cpp, 'LowLatencyRuntime') else 1)" 2>/dev/null
}

if has_step build; then
    start=$SECONDS
    if [ "${LL_BUILD:-full}" = "standalone" ]; then
        build_standalone || { echo "standalone build failed"; grep -E "error" "$OUT/build_standalone.log" | head -30; exit 1; }
        echo "standalone build ok ($((SECONDS - start)) s)"
    else
    echo "== full build (pip install -e .)"
    "$PYTHON" -m pip install -v --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
    grep -E "^deep_ep:" "$OUT/build.log" | head -5
    if ! has_ll_module; then
        echo "pip -e . left no deep_ep_cpp with LowLatencyRuntime; trying python setup.py build_ext --inplace"
        "$PYTHON" setup.py build_ext --inplace >"$OUT/build_ext.log" 2>&1
        grep -E "^deep_ep:|error" "$OUT/build_ext.log" | head -20
    fi
    if has_ll_module; then
        echo "full build ok ($((SECONDS - start)) s)"
    else
        echo "full build failed ($((SECONDS - start)) s)"
        rm -f deep_ep_cpp*.so
        build_standalone || { echo "standalone build failed"; grep -E "error" "$OUT/build_standalone.log" | head -30; exit 1; }
        echo "standalone build ok ($((SECONDS - start)) s)"
    fi
    fi
fi

"$PYTHON" -c "import torch, deep_ep_cpp; print('deep_ep_cpp from', deep_ep_cpp.__file__)"

status=0
if has_step test2; then
    echo "== test, 2 processes"
    timeout 240 "$PYTHON" tests/test_low_latency.py --num-processes 2 --quick 2>&1 | tee "$OUT/test2.log" || status=1
fi
if has_step test4; then
    echo "== test, 4 processes"
    timeout 300 "$PYTHON" tests/test_low_latency.py --num-processes 4 2>&1 | tee "$OUT/test4.log" || status=1
fi
if has_step bench; then
    echo "== benchmark, 4 processes"
    timeout 200 "$PYTHON" tests/test_low_latency.py --num-processes 4 --bench-only --iterations "${LL_ITERATIONS:-200}" 2>&1 | tee "$OUT/bench4.log" || status=1
fi
exit $status
