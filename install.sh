#!/usr/bin/env bash
# Set up deep_ep on this machine: torch (reused if present, else the CPU build), numpy, pytest,
# then the package itself (`pip install --no-build-isolation --no-deps -e .`), which builds the
# CUDA extension deep_ep_cpp where a CUDA-enabled torch and nvcc are present.
#
# Idempotent, and offline wherever everything is already installed: pip is only asked for what
# fails to import. Environment: PYTHON (default: python3, else python), DEEP_EP_VERBOSE=1 for the build log.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$repo_root"
# python3 first: on the GPU images it is the interpreter that holds torch.
PYTHON="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore

TORCH_VERSION="2.13.0"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

say() { echo "install.sh: $*"; }
fail() { echo "install.sh: ERROR: $*" >&2; exit 1; }
importable() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }
pip_install() { "$PYTHON" -m pip install --quiet "$@"; }

command -v "$PYTHON" >/dev/null 2>&1 || fail "$PYTHON not found (set PYTHON=/path/to/python3)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' || fail "Python 3.9 or newer is needed"

# 1. torch: reuse whatever is there (the GPU machines have a CUDA build); else the CPU build.
if importable torch; then
    say "torch $("$PYTHON" -c 'import torch; print(torch.__version__)') already present"
else
    say "installing torch==$TORCH_VERSION"
    if ! pip_install "torch==$TORCH_VERSION"; then
        say "torch==$TORCH_VERSION not available from the configured indexes; trying the PyTorch CPU index"
        pip_install --timeout 30 --retries 1 --index-url "$TORCH_CPU_INDEX" torch \
            || fail "could not install torch"
    fi
    importable torch || fail "torch installed but does not import"
fi

# 2. Test and benchmark dependencies.
missing=()
importable numpy || missing+=(numpy)
importable pytest || missing+=(pytest)
importable pytest_timeout || missing+=(pytest-timeout)
# An editable install without build isolation needs setuptools >= 64 (PEP 660) in this Python.
"$PYTHON" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 64)' \
    >/dev/null 2>&1 || missing+=("setuptools>=64" wheel)
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    pip_install "${missing[@]}" || fail "could not install ${missing[*]}"
else
    say "numpy, pytest, pytest-timeout, setuptools already present"
fi

# 3. The package (and the extension, where it can be built). Needs no network.
say "$("$PYTHON" build_config.py status)"
pip_log="$(mktemp)"
trap 'rm -f "$pip_log"' EXIT
pip_flags=(--no-build-isolation --no-deps -e .)
if [ "${DEEP_EP_VERBOSE:-0}" = "1" ]; then
    "$PYTHON" -m pip install -v "${pip_flags[@]}" || fail "pip install of deep_ep failed"
elif ! "$PYTHON" -m pip install "${pip_flags[@]}" >"$pip_log" 2>&1; then
    cat "$pip_log" >&2
    fail "pip install of deep_ep failed (log above; DEEP_EP_VERBOSE=1 shows the whole build)"
fi

# 4. Check what was installed.
if [ -f deep_ep/__init__.py ]; then
    "$PYTHON" -c "import deep_ep" || fail "deep_ep was installed but does not import"
fi
builds_extension="$("$PYTHON" -c 'import build_config; print(int(build_config.resolve().skip_reason is None))')"
if [ "$builds_extension" = "1" ]; then
    "$PYTHON" -c "import torch, deep_ep_cpp" || fail "the extension deep_ep_cpp was built but does not import"
    say "done: deep_ep with the CUDA extension deep_ep_cpp"
else
    say "done: deep_ep (pure Python, torch backend only; no deep_ep_cpp extension)"
fi
