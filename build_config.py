"""The one description of how ``deep_ep_cpp`` is built.

``setup.py`` imports this module to build the extension, and ``scripts/compile_check.sh`` runs it
(``python build_config.py compile-commands``) to compile every source without linking, so the
source list and the flags live here and nowhere else.

Environment switches:

- ``NVSHMEM_DIR``: NVSHMEM install root (``include/``, ``lib/``); default: the pip wheel
  ``nvidia-nvshmem-cu13`` or ``-cu12``, found through importlib.
- ``DISABLE_NVSHMEM=1``: build without NVSHMEM (no internode / low-latency kernels, no ``-rdc``).
  Also taken when NVSHMEM is not found.
- ``DISABLE_AGGRESSIVE_PTX_INSTRS`` (default ``1``): ``0`` allows the non-coherent load tricks
  that are only defined on Hopper.
- ``TORCH_CUDA_ARCH_LIST``: e.g. ``9.0``, ``9.0a``, ``9.0;10.0+PTX``; default ``sm_90``.
- ``CUDA_HOME`` / ``CUDA_PATH``: CUDA toolkit root; default: found from ``nvcc``.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import os
import shlex
import shutil
import sys
import sysconfig
from typing import List, Optional

ROOT = os.path.dirname(os.path.abspath(__file__))
EXTENSION_NAME = "deep_ep_cpp"

# Sources that call NVSHMEM; they are left out of a build without NVSHMEM.
NVSHMEM_SOURCES = ("csrc/kernels/internode_ll.cu", "csrc/kernels/internode.cu", "csrc/low_latency.cpp",
                   "csrc/internode.cpp")

DEFAULT_ARCH_FLAGS = ["-arch=sm_90"]

# torch's BuildExtension puts -D__CUDA_NO_HALF_OPERATORS__ and friends before our nvcc flags; the
# NVSHMEM device headers need the half/bf16 operators, so undefine them again.
UNDO_TORCH_HALF_MACROS = [
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
]


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def find_cuda_home() -> Optional[str]:
    """Return the CUDA toolkit root that holds ``bin/nvcc``, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for candidate in candidates:
        # Both checks: /usr/local/bin/nvcc may be a wrapper script outside the toolkit.
        if (candidate and os.path.isfile(os.path.join(candidate, "bin", "nvcc"))
                and os.path.isfile(os.path.join(candidate, "include", "cuda_runtime.h"))):
            return candidate
    return None


def find_nvshmem_dir() -> Optional[str]:
    """Return the NVSHMEM root (with ``include/nvshmem.h`` and ``lib/``), or None.

    ``NVSHMEM_DIR`` wins; otherwise the ``nvidia.nvshmem`` namespace package of the pip wheel
    (``nvidia-nvshmem-cu13`` or ``nvidia-nvshmem-cu12``; both install to the same place).
    """
    explicit = os.environ.get("NVSHMEM_DIR")
    if explicit:
        if not os.path.isfile(os.path.join(explicit, "include", "nvshmem.h")):
            raise RuntimeError(f"NVSHMEM_DIR={explicit} has no include/nvshmem.h")
        return explicit
    try:
        spec = importlib.util.find_spec("nvidia.nvshmem")
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or []:
        if os.path.isfile(os.path.join(location, "include", "nvshmem.h")):
            return location
    return None


def find_nvshmem_host_library(lib_dir: str) -> str:
    """File name of the NVSHMEM host library; the pip wheel ships only ``libnvshmem_host.so.3``."""
    unversioned = os.path.join(lib_dir, "libnvshmem_host.so")
    if os.path.exists(unversioned):
        return "libnvshmem_host.so"
    versioned = sorted(glob.glob(os.path.join(lib_dir, "libnvshmem_host.so.*")))
    if not versioned:
        raise RuntimeError(f"no libnvshmem_host.so* in {lib_dir}")
    return os.path.basename(versioned[0])


def cuda_arch_flags() -> List[str]:
    """nvcc target flags: ``-arch=sm_90`` unless ``TORCH_CUDA_ARCH_LIST`` names others.

    Passing our own arch flags also stops torch from adding its default list.
    """
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not arch_list:
        return list(DEFAULT_ARCH_FLAGS)
    flags = []
    for entry in arch_list.replace(" ", ";").split(";"):
        if not entry:
            continue
        with_ptx = entry.endswith("+PTX")
        version = entry[: -len("+PTX")] if with_ptx else entry
        major, _, minor = version.partition(".")
        if not (major.isdigit() and minor[:1].isdigit()):
            raise RuntimeError(f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not like 9.0, 9.0a or 9.0+PTX")
        number = major + minor
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if with_ptx:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def _is_nvshmem_source(relative_path: str) -> bool:
    return relative_path in NVSHMEM_SOURCES or "nvshmem" in os.path.basename(relative_path)


@dataclasses.dataclass
class BuildConfig:
    """Everything needed to compile and link ``deep_ep_cpp``.

    Paths in ``cpp_sources``/``cu_sources`` are relative to the repository root (setuptools wants
    them so). ``skip_reason`` is set when the extension is not to be built at all.
    """

    cuda_home: Optional[str]
    nvshmem_dir: Optional[str]
    nvshmem_disabled_reason: Optional[str]
    cpp_sources: List[str]
    cu_sources: List[str]
    include_dirs: List[str]
    library_dirs: List[str]
    cxx_flags: List[str]
    nvcc_flags: List[str]
    nvcc_dlink_flags: List[str]
    extra_link_args: List[str]
    skip_reason: Optional[str] = None

    @property
    def with_nvshmem(self) -> bool:
        return self.nvshmem_dir is not None

    @property
    def sources(self) -> List[str]:
        return self.cpp_sources + self.cu_sources


def _glob_sources(pattern: str) -> List[str]:
    return sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, pattern)))


def resolve(require_extension_toolchain: bool = True) -> BuildConfig:
    """Work out sources and flags from the environment.

    Args:
        require_extension_toolchain: when True, the reasons not to build the extension (no
            CUDA-enabled torch, no nvcc, no sources) are recorded in ``skip_reason``; the compile
            check passes False since it only needs nvcc and headers.
    """
    cuda_home = find_cuda_home()
    skip_reason = None
    if require_extension_toolchain:
        skip_reason = _extension_skip_reason(cuda_home)

    nvshmem_dir = None
    nvshmem_disabled_reason = None
    if _env_flag("DISABLE_NVSHMEM", False):
        nvshmem_disabled_reason = "DISABLE_NVSHMEM is set"
    else:
        nvshmem_dir = find_nvshmem_dir()
        if nvshmem_dir is None:
            nvshmem_disabled_reason = "NVSHMEM not found (set NVSHMEM_DIR or pip install nvidia-nvshmem-cu13)"

    cpp_sources = _glob_sources("csrc/*.cpp")
    cu_sources = _glob_sources("csrc/kernels/*.cu")
    if nvshmem_dir is None:
        cpp_sources = [s for s in cpp_sources if not _is_nvshmem_source(s)]
        cu_sources = [s for s in cu_sources if not _is_nvshmem_source(s)]
    if require_extension_toolchain and skip_reason is None and not (cpp_sources or cu_sources):
        skip_reason = "no C++/CUDA sources under csrc/"

    defines = []
    if nvshmem_dir is None:
        defines.append("-DDISABLE_NVSHMEM")
    if _env_flag("DISABLE_AGGRESSIVE_PTX_INSTRS", True):
        defines.append("-DDISABLE_AGGRESSIVE_PTX_INSTRS")
    if _env_flag("KERNEL_TRACE", False):  # development: the kernels' warp trace (kernels/warp_trace.cuh)
        defines.append("-DDEEP_EP_KERNEL_TRACE")

    include_dirs = [os.path.join(ROOT, "csrc")]
    library_dirs: List[str] = []
    cxx_flags = ["-O3", "-std=c++17"] + defines
    arch_flags = cuda_arch_flags()
    nvcc_flags = ["-O3", "-std=c++17", "-Xcompiler", "-O3"] + UNDO_TORCH_HALF_MACROS + arch_flags + defines
    nvcc_dlink_flags: List[str] = []
    extra_link_args: List[str] = []

    if cuda_home is not None:
        cccl = os.path.join(cuda_home, "include", "cccl")
        if os.path.isdir(cccl):  # CUDA 13 moved CCCL (cub, thrust, libcu++) here
            include_dirs.append(cccl)

    if nvshmem_dir is not None:
        nvshmem_lib = os.path.join(nvshmem_dir, "lib")
        include_dirs.append(os.path.join(nvshmem_dir, "include"))
        library_dirs.append(nvshmem_lib)
        # NVSHMEM device calls live in libnvshmem_device.a: relocatable device code plus a device link.
        nvcc_flags.append("-rdc=true")
        nvcc_dlink_flags = ["-dlink"] + arch_flags + [f"-L{nvshmem_lib}", "-lnvshmem_device"]
        extra_link_args = [
            f"-L{nvshmem_lib}",
            f"-l:{find_nvshmem_host_library(nvshmem_lib)}",
            "-l:libnvshmem_device.a",  # host-side init helpers of the device library
            f"-Wl,-rpath,{nvshmem_lib}",
        ]

    return BuildConfig(
        cuda_home=cuda_home,
        nvshmem_dir=nvshmem_dir,
        nvshmem_disabled_reason=nvshmem_disabled_reason,
        cpp_sources=cpp_sources,
        cu_sources=cu_sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        cxx_flags=cxx_flags,
        nvcc_flags=nvcc_flags,
        nvcc_dlink_flags=nvcc_dlink_flags,
        extra_link_args=extra_link_args,
        skip_reason=skip_reason,
    )


def _extension_skip_reason(cuda_home: Optional[str]) -> Optional[str]:
    try:
        import torch
    except ImportError:
        return "torch is not importable"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA support"
    if cuda_home is None:
        return "nvcc not found (set CUDA_HOME)"
    return None


# ---------------------------------------------------------------------------------------------
# Compile-only commands for scripts/compile_check.sh
# ---------------------------------------------------------------------------------------------


def _torch_include_dirs() -> List[str]:
    import torch

    base = os.path.join(os.path.dirname(torch.__file__), "include")
    return [base, os.path.join(base, "torch", "csrc", "api", "include")]


# Headers that torch's CUDA headers include but that a CPU-only machine lacks: one that a CUDA
# build of torch generates, and the cuBLAS/cuSPARSE/cuSOLVER headers (the CUDA toolkit here has
# only the compiler and runtime). For a compile-only check, declarations of the handle and status
# types that torch's headers name are enough; the real build uses the real headers.
_COMPILE_CHECK_STUB_HEADERS = {
    "c10/cuda/impl/cuda_cmake_macros.h": "#define C10_CUDA_BUILD_SHARED_LIBS\n",
    "ATen/cuda/CUDAConfig.h": (
        "#define AT_CUDNN_ENABLED() 0\n#define AT_CUSPARSELT_ENABLED() 0\n"
        "#define AT_HIPSPARSELT_ENABLED() 0\n#define AT_ROCM_ENABLED() 0\n"
        "#define AT_MAGMA_ENABLED() 0\n#define NVCC_FLAGS_EXTRA \"\"\n"
    ),
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\n"
    "typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;\n"
    "const char* cusparseGetErrorString(cusparseStatus_t status);\n",
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\n"
    "typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusolver_common.h": "typedef enum { CUSOLVER_STATUS_SUCCESS = 0, CUSOLVER_STATUS_INVALID_VALUE = 3 } cusolverStatus_t;\n",
    "cusolverDn.h": "#include <cusolver_common.h>\ntypedef struct cusolverDnContext* cusolverDnHandle_t;\n",
}


def write_compile_check_stubs(stub_dir: str, search_dirs: List[str]) -> List[str]:
    """Write the stub headers that none of ``search_dirs`` holds; return their names."""
    written = []
    for name, body in _COMPILE_CHECK_STUB_HEADERS.items():
        if any(os.path.isfile(os.path.join(d, name)) for d in search_dirs):
            continue
        path = os.path.join(stub_dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as stub:
            stub.write("#pragma once\n// Stub for deep_ep's compile-only check (build_config.py).\n" + body)
        written.append(name)
    return written


def compile_commands(config: BuildConfig, object_dir: str) -> List[List[str]]:
    """One compile-only command per source, with the flags the real build uses.

    ``.cpp`` files get what torch's BuildExtension adds (torch, pybind11, Python and CUDA headers,
    ``-fPIC``, ``TORCH_EXTENSION_NAME``) plus torch's C++ ABI flag. ``.cu`` files get torch's
    common nvcc flags but no torch include dirs, which enforces that kernels include no torch
    header. Third-party headers come through ``-isystem`` so that the warnings shown are ours.
    Stub headers (see ``write_compile_check_stubs``) go to ``<object_dir>/stub_include``.
    """
    import torch
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    if config.cuda_home is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    cuda_include = os.path.join(config.cuda_home, "include")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    torch_defines = [
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-DTORCH_EXTENSION_NAME={EXTENSION_NAME}",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
    ]
    python_include = sysconfig.get_paths()["include"]
    nvcc = os.path.join(config.cuda_home, "bin", "nvcc")
    cxx = os.environ.get("CXX", "g++")
    own_includes = [d for d in config.include_dirs if os.path.commonpath([d, ROOT]) == ROOT]
    third_party_includes = [d for d in config.include_dirs if d not in own_includes]

    stub_dir = os.path.join(object_dir, "stub_include")
    stubs = write_compile_check_stubs(stub_dir, _torch_include_dirs() + [cuda_include])
    if stubs:
        print(f"# compile check: stub headers for {', '.join(stubs)} (absent on this machine)", file=sys.stderr)
    cpp_system_includes = third_party_includes + _torch_include_dirs() + [python_include, cuda_include]
    if stubs:
        cpp_system_includes.append(stub_dir)

    commands = []
    for source in config.cpp_sources:
        commands.append(
            [cxx, "-c", os.path.join(ROOT, source), "-o", _object_path(object_dir, source), "-fPIC"]
            + config.cxx_flags
            + torch_defines
            + [f"-I{d}" for d in own_includes]
            + [flag for d in cpp_system_includes for flag in ("-isystem", d)]
        )
    for source in config.cu_sources:
        commands.append(
            [nvcc, "-c", os.path.join(ROOT, source), "-o", _object_path(object_dir, source)]
            + list(COMMON_NVCC_FLAGS)  # first, as BuildExtension does
            + ["-Xcompiler", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
            + config.nvcc_flags
            + [f"-I{d}" for d in own_includes]
            + [flag for d in third_party_includes for flag in ("-isystem", d)]
        )
    return commands


def _object_path(object_dir: str, source: str) -> str:
    return os.path.join(object_dir, source.replace(os.sep, "__") + ".o")


def _main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="print whether setup.py builds the extension, and with what")
    commands = sub.add_parser("compile-commands", help="print one compile-only shell command per line")
    commands.add_argument("--object-dir", required=True)
    args = parser.parse_args(argv)

    if args.command == "status":
        config = resolve()
        if config.skip_reason is not None:
            print(f"pure-Python package, no {EXTENSION_NAME} extension: {config.skip_reason}")
        else:
            nvshmem = config.nvshmem_dir or f"off ({config.nvshmem_disabled_reason})"
            print(f"extension {EXTENSION_NAME}: {len(config.sources)} sources, CUDA {config.cuda_home}, NVSHMEM {nvshmem}")
        return 0

    config = resolve(require_extension_toolchain=False)
    if config.nvshmem_dir is None:
        print(f"# NVSHMEM off: {config.nvshmem_disabled_reason}", file=sys.stderr)
    for command in compile_commands(config, os.path.abspath(args.object_dir)):
        print(shlex.join(command))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
