#!/usr/bin/env bash
# Compile every csrc source without linking, with the flags of the real build (build_config.py):
# each .cu with nvcc (sm_90, -rdc=true), each .cpp with g++ against the torch, pybind11, Python,
# CUDA and NVSHMEM headers. Needs no GPU. Fails on any compile error; prints warnings.
#
# Environment: COMPILE_CHECK_JOBS (default 2) files at a time; PYTHON (default: python, else python3);
# the build switches of build_config.py (NVSHMEM_DIR, DISABLE_NVSHMEM, TORCH_CUDA_ARCH_LIST, ...).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
PYTHON="${PYTHON:-$(command -v python || command -v python3 || echo python3)}"
jobs="${COMPILE_CHECK_JOBS:-2}"

shopt -s nullglob
sources=(csrc/*.cpp csrc/kernels/*.cu)
shopt -u nullglob
if [ "${#sources[@]}" -eq 0 ]; then
    echo "compile_check: no sources under csrc/ yet; nothing to compile"
    exit 0
fi

if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ] && [ ! -x /usr/local/cuda/bin/nvcc ]; then
    echo "compile_check: nvcc not found (put it on PATH or set CUDA_HOME)" >&2
    exit 1
fi

# NVSHMEM headers: NVSHMEM_DIR, else the pip wheel, installed here when absent.
if [ -z "${NVSHMEM_DIR:-}" ] && [ "${DISABLE_NVSHMEM:-0}" = "0" ] \
    && ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('nvidia.nvshmem') is None)" 2>/dev/null; then
    echo "compile_check: installing the NVSHMEM headers (nvidia-nvshmem-cu13==3.4.5)"
    "$PYTHON" -m pip install --quiet --no-input --no-deps "nvidia-nvshmem-cu13==3.4.5"
fi

work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT
"$PYTHON" build_config.py compile-commands --object-dir "$work_dir/obj" >"$work_dir/commands"
mkdir -p "$work_dir/obj" "$work_dir/logs"

# Runs one compile command (one line of $work_dir/commands); prints its output as one block.
compile_one() {
    local command_line="$1" work_dir="$2"
    local source
    source="$(eval "set -- $command_line"; echo "$3")"
    local log="$work_dir/logs/$(basename "$source").log"
    local start=$SECONDS status=0 report
    eval "$command_line" >"$log" 2>&1 || status=$?
    if [ "$status" -eq 0 ]; then
        report="[ok]   ${source#"$PWD"/} ($((SECONDS - start)) s)"
    else
        report="[FAIL] ${source#"$PWD"/} ($((SECONDS - start)) s, exit $status)"
    fi
    if [ -s "$log" ]; then
        report+=$'\n'"$(sed 's/^/       /' "$log")"
    fi
    if [ "$status" -ne 0 ]; then
        report+=$'\n'"       command: $command_line"
    fi
    # One write per file, so parallel jobs do not interleave their reports.
    printf '%s\n' "$report"
    return "$status"
}
export -f compile_one

count=$(wc -l <"$work_dir/commands")
echo "compile_check: compiling $count sources, $jobs at a time"
start=$SECONDS
if tr '\n' '\0' <"$work_dir/commands" \
    | xargs -0 -P "$jobs" -I{} bash -c 'compile_one "$1" "$2"' _ {} "$work_dir"; then
    echo "compile_check: all $count sources compile ($((SECONDS - start)) s)"
else
    echo "compile_check: FAILED (see [FAIL] above)" >&2
    exit 1
fi
