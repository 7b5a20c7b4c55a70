"""Build and install deep_ep.

With a CUDA-enabled torch and nvcc this builds the extension ``deep_ep_cpp`` from ``csrc/``;
otherwise it installs the pure-Python package (the torch backend) and says so in one line.
Sources and flags come from ``build_config.py``. Install with
``pip install --no-build-isolation --no-deps -e .`` (or ``bash install.sh``).
"""

import os
import shutil
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_config  # noqa: E402  (lives beside this file)

VERSION = "0.1.0"


def _ensure_ninja_on_path() -> None:
    """torch's device-link step needs ninja; the pip package puts it beside the interpreter."""
    if shutil.which("ninja") is not None:
        return
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja

        candidates.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for directory in candidates:
        if os.path.isfile(os.path.join(directory, "ninja")):
            os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
            return


def _extension_kwargs() -> dict:
    config = build_config.resolve()
    if config.skip_reason is not None:
        print(f"deep_ep: installing the pure-Python package without the {build_config.EXTENSION_NAME} "
              f"extension ({config.skip_reason})", file=sys.stderr)
        return {}

    # Before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import.
    os.environ.setdefault("CUDA_HOME", config.cuda_home)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if config.nvshmem_dir is None:
        print(f"deep_ep: building {build_config.EXTENSION_NAME} without NVSHMEM "
              f"({config.nvshmem_disabled_reason}): no internode or low-latency kernels", file=sys.stderr)
    else:
        print(f"deep_ep: building {build_config.EXTENSION_NAME} with NVSHMEM from {config.nvshmem_dir}",
              file=sys.stderr)
    _ensure_ninja_on_path()

    extra_compile_args = {"cxx": config.cxx_flags, "nvcc": config.nvcc_flags}
    if config.nvcc_dlink_flags:
        # Our own device-link flags (with the arch list) rather than CUDAExtension(dlink=True),
        # which also adds -dlto and no arch flags.
        extra_compile_args["nvcc_dlink"] = config.nvcc_dlink_flags
    extension = CUDAExtension(
        name=build_config.EXTENSION_NAME,
        sources=config.sources,
        include_dirs=config.include_dirs,
        library_dirs=config.library_dirs,
        extra_compile_args=extra_compile_args,
        extra_link_args=config.extra_link_args,
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="deep_ep",
    version=VERSION,
    description="Expert-parallel dispatch/combine communication for Mixture-of-Experts (DeepEP V1 API)",
    license="MIT",
    packages=find_packages(include=["deep_ep", "deep_ep.*"]),
    python_requires=">=3.9",
    zip_safe=False,
    **_extension_kwargs(),
)
