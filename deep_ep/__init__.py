"""deep_ep: expert-parallel communication (MoE dispatch and combine) with DeepEP V1's Python API.

Every call runs on CUDA kernels where they can (Hopper + NVLink/NVSHMEM) and on a portable
``torch.distributed`` backend everywhere else (CPU via gloo, any GPU via NCCL).
"""

from .buffer import Buffer
from .config import Config
from .utils import (DeepEPTimeoutError, EventHandle, EventOverlap, group_limited_topk, per_token_cast_back,
                    per_token_cast_to_fp8)

try:  # the compiled extension is optional: without it, the torch backend serves every call
    import deep_ep_cpp  # noqa: F401
except ImportError:
    deep_ep_cpp = None

__version__ = "0.1.0"

__all__ = ["Buffer", "Config", "EventOverlap", "EventHandle", "DeepEPTimeoutError", "per_token_cast_to_fp8",
           "per_token_cast_back", "group_limited_topk", "__version__"]
