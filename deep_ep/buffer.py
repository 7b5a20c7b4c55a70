"""``deep_ep.Buffer``: the DeepEP V1 API. Validates every argument, then hands the call to a backend."""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .config import (COMBINE_CHUNKS, DISPATCH_CHUNKS, MAX_TOPK, Config, low_latency_rdma_size_hint,
                     tuned_config)
from .torch_backend import TorchBackend
from .utils import DeepEPTimeoutError, EventHandle, EventOverlap, check_topk_range, raise_layout_value_errors

Fp8Pair = Tuple[torch.Tensor, torch.Tensor]
_BACKENDS = ("cuda", "torch")


# ----------------------------------------------------------------------------------------------
# Argument checks (DESIGN.md §5): each names the argument and what was expected.
# ----------------------------------------------------------------------------------------------
def _check_tensor(name: str, t: Any, dtype: Optional[torch.dtype] = None, shape: Optional[Tuple] = None,
                  device: Optional[torch.device] = None, contiguous: bool = True) -> torch.Tensor:
    """``shape`` entries that are None match any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device.type != device.type:
        raise ValueError(f"{name} must be on {device.type}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t


def _check_int(name: str, v: Any, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_topk_range(name: str, topk_idx: torch.Tensor, num_experts: int) -> None:
    """Values in [-1, num_experts). Needs a host sync, so it is skipped inside CUDA-graph capture
    (the kernels then drop out-of-range ids instead of writing out of bounds)."""
    if not _capturing():
        check_topk_range(name, topk_idx, num_experts)


def _check_layout_values(topk_idx: Optional[torch.Tensor], num_experts: int, is_token_in_rank: torch.Tensor,
                         num_tokens_per_rank: torch.Tensor) -> None:
    """The dispatch checks that read values, evaluated on the device and read back with one host sync."""
    mismatch = (is_token_in_rank.sum(0, dtype=torch.int32) != num_tokens_per_rank).any()
    if topk_idx is not None and topk_idx.numel() > 0:
        out_of_range = ((topk_idx < -1) | (topk_idx >= num_experts)).any()
        bad_range, bad_counts = torch.stack([out_of_range, mismatch]).tolist()
    else:
        bad_range, bad_counts = False, bool(mismatch)
    raise_layout_value_errors(bad_range, bad_counts, topk_idx, num_experts)


def _check_event_args(previous_event: Optional[EventOverlap], async_finish: bool,
                      allocate_on_comm_stream: bool) -> None:
    if previous_event is not None and not isinstance(previous_event, EventOverlap):
        raise TypeError(f"previous_event must be an EventOverlap or None, got {type(previous_event).__name__}")
    if allocate_on_comm_stream and (previous_event is None or not async_finish):
        raise ValueError("allocate_on_comm_stream=True needs previous_event and async_finish=True")


def _default_nvl_domain_size(group: dist.ProcessGroup) -> int:
    """Ranks that share this rank's host; they must be contiguous and equally many on every host."""
    hosts: List[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    size = hosts.count(hosts[0])
    uniform = all(hosts[i] == hosts[i - i % size] for i in range(len(hosts))) and len(hosts) % size == 0
    return size if uniform else 1


def _extension_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import deep_ep_cpp  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


class Buffer:
    """The communication buffer of one expert-parallel group: dispatch and combine of MoE tokens.

    Collective over ``group``: every rank constructs it with the same arguments.

    Args:
        group: the process group (gloo on CPU, NCCL on GPU); ``None`` means the default group.
        num_nvl_bytes: bytes of NVLink-shared memory for the high-throughput kernels
            (see :meth:`Config.get_nvl_buffer_size_hint`).
        num_rdma_bytes: bytes of NVSHMEM symmetric memory for the internode and low-latency kernels
            (see :meth:`Config.get_rdma_buffer_size_hint`, :meth:`get_low_latency_rdma_size_hint`).
        low_latency_mode: enables the low-latency calls.
        num_qps_per_rank: RDMA queue pairs per peer (used by the NVSHMEM transports).
        allow_nvlink_for_low_latency_mode: write NVLink-reachable peers with direct stores.
        allow_mnnvl: allow multi-node NVLink domains.
        explicitly_destroy: the caller will call :meth:`destroy`; otherwise resources go with the object.
        enable_shrink: a rank that times out in the low-latency calls is masked instead of hanging the rest.
        comm: accepted for compatibility; unused.
        nvl_domain_size: ranks that share one NVLink domain (default: ranks on the same host). Any
            divisor of the group size; ``num_ranks / nvl_domain_size`` "nodes" talk over the inter-node leg.
        backend: ``"cuda"`` (the kernels) or ``"torch"`` (portable collectives). Default: ``"cuda"``
            where the extension is built and the GPU is Hopper, else ``"torch"``; the environment
            variable ``DEEP_EP_BACKEND`` overrides the default.

    Every argument is checked before anything is launched (wrong dtype, shape, device or layout:
    ``TypeError``/``ValueError`` naming the argument). Checks that read tensor values (the
    ``topk_idx`` range, ``num_tokens_per_rank`` against ``is_token_in_rank``) need a host sync, so
    on the ``cuda`` backend they run only where the call syncs anyway (a dispatch without
    ``num_worst_tokens``) or with ``DEEP_EP_STRICT_CHECKS=1``; elsewhere the kernels ignore expert
    ids outside ``[0, num_experts)`` and never write out of bounds. A kernel wait that exceeds
    ``DEEP_EP_TIMEOUT_S`` (default 100 s) raises :class:`DeepEPTimeoutError`, after which the
    buffer refuses further calls.

    Streams: the calls run on the buffer's comm stream, which first waits for ``previous_event``
    (else the current stream); ``async_finish=True`` returns an :class:`EventOverlap` instead of
    making the current stream wait; tensors used on the comm stream stay alive until it is done.
    """

    num_sms: int = 20

    def __init__(self, group: Optional[dist.ProcessGroup] = None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 explicitly_destroy: bool = False, enable_shrink: bool = False, comm: Any = None, *,
                 nvl_domain_size: Optional[int] = None, backend: Optional[str] = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("Buffer needs torch.distributed to be initialized (dist.init_process_group)")
        group = group if group is not None else dist.group.WORLD
        _check_int("num_nvl_bytes", num_nvl_bytes)
        _check_int("num_rdma_bytes", num_rdma_bytes)
        _check_int("num_qps_per_rank", num_qps_per_rank, 1)
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = bool(low_latency_mode)
        self.explicitly_destroy = bool(explicitly_destroy)
        self.enable_shrink = bool(enable_shrink)

        if nvl_domain_size is None:
            nvl_domain_size = _default_nvl_domain_size(group)
        _check_int("nvl_domain_size", nvl_domain_size, 1)
        if self.group_size % nvl_domain_size != 0:
            raise ValueError(f"nvl_domain_size ({nvl_domain_size}) must divide the group size ({self.group_size})")
        self.nvl_domain_size = nvl_domain_size
        self.num_nodes = self.group_size // nvl_domain_size

        device = torch.device("cuda", torch.cuda.current_device()) \
            if "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available() else torch.device("cpu")
        self.device = device
        requested = backend if backend is not None else os.environ.get("DEEP_EP_BACKEND") or None
        if requested is not None and requested not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {requested!r}")
        if requested is None:
            requested = "cuda" if _extension_usable(device) else "torch"
        if requested == "cuda" and not _extension_usable(device):
            raise RuntimeError("backend='cuda' needs the deep_ep_cpp extension, an NCCL group and a Hopper "
                               "(sm_90) GPU; use backend='torch' elsewhere")
        self.backend = requested
        args = (group, num_nvl_bytes, num_rdma_bytes, self.low_latency_mode, nvl_domain_size, num_qps_per_rank,
                bool(allow_nvlink_for_low_latency_mode), bool(allow_mnnvl), self.explicitly_destroy,
                self.enable_shrink)
        if requested == "cuda":
            from .cuda_backend import CudaBackend
            self._backend: TorchBackend = CudaBackend(*args)
        else:
            self._backend = TorchBackend(*args)
        self._destroyed = False
        self._failed: Optional[str] = None
        # Checks that read tensor values need a host sync. The torch backend syncs anyway; the
        # kernels promise no sync on their fast paths (num_worst_tokens, low-latency, layout) and
        # drop out-of-range expert ids there instead of writing out of bounds.
        self._value_checks = requested == "torch" or os.environ.get("DEEP_EP_STRICT_CHECKS", "0") == "1"
        self._low_latency_sizes_ok: set = set()  # (num_max, hidden, num_experts) that passed the checks

    # ------------------------------------------------------------------ lifecycle and state
    def destroy(self) -> None:
        """Release the buffer's memory and communication resources. Later calls raise."""
        if self._destroyed:
            return
        self._backend.destroy()
        self._destroyed = True

    def __del__(self) -> None:
        if not getattr(self, "explicitly_destroy", True) and not getattr(self, "_destroyed", True):
            try:
                self.destroy()
            except Exception:  # interpreter shutdown: nothing useful to report
                pass

    def _run(self, fn: Callable, *args: Any) -> Any:
        """Call into the backend; after a timeout the buffer is failed and refuses further work."""
        if self._destroyed:
            raise RuntimeError("Buffer: this buffer has been destroyed")
        if self._failed is not None:
            raise RuntimeError(f"Buffer: unusable after an earlier failure: {self._failed}")
        try:
            return fn(*args)
        except DeepEPTimeoutError as error:
            self._failed = str(error)
            raise

    def _check_device(self, name: str, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return _check_tensor(name, t, device=self.device, **kwargs)

    # ------------------------------------------------------------------ static helpers
    @staticmethod
    def is_sm90_compiled() -> bool:
        """Whether the CUDA extension is built (for sm_90)."""
        try:
            import deep_ep_cpp
        except ImportError:
            return False
        return bool(getattr(deep_ep_cpp, "is_sm90_compiled", lambda: True)())

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SM count the high-throughput kernels use by default (an even number)."""
        _check_int("new_num_sms", new_num_sms, 2)
        if new_num_sms % 2 != 0:
            raise ValueError(f"new_num_sms must be even, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current stream, to pass as ``previous_event``."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return EventOverlap(EventHandle())
        return EventOverlap(None)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes of ``num_rdma_bytes`` the low-latency calls need for these sizes."""
        return low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """The tuned high-throughput dispatch config for ``num_ranks`` ranks (SMs: ``Buffer.num_sms``)."""
        return tuned_config(DISPATCH_CHUNKS, num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """The tuned high-throughput combine config for ``num_ranks`` ranks (SMs: ``Buffer.num_sms``)."""
        return tuned_config(COMBINE_CHUNKS, num_ranks, Buffer.num_sms)

    def get_comm_stream(self) -> Optional["torch.cuda.Stream"]:
        """The stream the communication runs on (``None`` on CPU)."""
        return self._backend.get_comm_stream()

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """A tensor view of this rank's own NVLink (or RDMA) buffer.

        Args:
            dtype: element type of the view.
            size: shape of the view (default: all the bytes after ``offset``).
            offset: byte offset into the buffer.
            use_rdma_buffer: view the RDMA buffer instead of the NVLink one.
        """
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        _check_int("offset", offset)
        total = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
        if size is not None:
            size = torch.Size(size)
            need = offset + size.numel() * torch.empty((), dtype=dtype).element_size()
        else:
            need = offset
        if need > total:
            raise ValueError(f"get_local_buffer_tensor: offset + size need {need} bytes, the buffer has {total}")
        return self._run(self._backend.get_local_buffer_tensor, dtype, size, offset, use_rdma_buffer)

    # ------------------------------------------------------------------ high-throughput
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False
                            ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """Count the tokens each rank, node and expert receives.

        Args:
            topk_idx: ``[num_tokens, num_topk]`` int64 expert ids, ``-1`` for none.
            num_experts: total experts; a multiple of the group size.
            previous_event: run after this event instead of the current stream.
            async_finish: return an event instead of making the current stream wait.
            allocate_on_comm_stream: allocate outputs on the comm stream.

        Returns:
            ``(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [nodes] int32 or None on one node,
            num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool, event)``.
        """
        self._check_device("topk_idx", topk_idx, dtype=torch.int64, shape=(None, None))
        self._check_num_experts(num_experts)
        if self._value_checks:
            _check_topk_range("topk_idx", topk_idx, num_experts)
        _check_event_args(previous_event, async_finish, allocate_on_comm_stream)
        return self._run(self._backend.get_dispatch_layout, topk_idx, num_experts, previous_event,
                         async_finish, allocate_on_comm_stream)

    def _check_num_experts(self, num_experts: int) -> None:
        _check_int("num_experts", num_experts, 1)
        if num_experts % self.group_size != 0:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of the number of ranks "
                             f"({self.group_size})")

    def _check_high_throughput_buffer(self, hidden_bytes: int, config: Config) -> None:
        nvl_ranks = self.nvl_domain_size
        need = config.get_nvl_buffer_size_hint(hidden_bytes, nvl_ranks)
        if self.num_nvl_bytes < need:
            raise ValueError(f"num_nvl_bytes ({self.num_nvl_bytes}) is too small for this call: "
                             f"config.get_nvl_buffer_size_hint({hidden_bytes}, {nvl_ranks}) = {need}")
        if self.num_nodes > 1:
            need = config.get_rdma_buffer_size_hint(hidden_bytes, self.group_size)
            if self.num_rdma_bytes < need:
                raise ValueError(f"num_rdma_bytes ({self.num_rdma_bytes}) is too small for this call: "
                                 f"config.get_rdma_buffer_size_hint({hidden_bytes}, {self.group_size}) = {need}")

    def _check_x(self, x: Union[torch.Tensor, Fp8Pair]) -> Tuple[int, int, int]:
        """Validate bf16 ``x`` or the FP8 pair; return (num_tokens, hidden, hidden_bytes)."""
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError("x as FP8 must be a pair (data, scales)")
            data = self._check_device("x[0]", x[0], dtype=torch.float8_e4m3fn, shape=(None, None))
            num_tokens, hidden = data.shape
            if hidden % 128 != 0:
                raise ValueError(f"x[0]: FP8 hidden must be a multiple of 128, got {hidden}")
            self._check_device("x[1]", x[1], dtype=torch.float32, shape=(num_tokens, hidden // 128),
                               contiguous=False)
        else:
            data = self._check_device("x", x, dtype=torch.bfloat16, shape=(None, None))
            num_tokens, hidden = data.shape
            if hidden % 8 != 0:
                raise ValueError(f"x: hidden must be a multiple of 8 (16-byte rows), got {hidden}")
        return num_tokens, hidden, hidden * 2

    def dispatch(self, x: Union[torch.Tensor, Fp8Pair], handle: Optional[Any] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False
                 ) -> Tuple[Union[torch.Tensor, Fp8Pair], Optional[torch.Tensor], Optional[torch.Tensor],
                            Optional[List[int]], Any, EventOverlap]:
        """Send each token to every rank that holds one of its top-k experts (once per rank).

        Args:
            x: bf16 ``[T, H]``, or the FP8 pair ``(e4m3 [T, H], float32 scales [T, H/128])`` (scales may
                have any strides).
            handle: a handle from an earlier dispatch: reuse its layout (cached mode); then
                ``topk_idx``/``topk_weights`` must be None and the layout arguments are ignored.
            num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert:
                the layout, as returned by :meth:`get_dispatch_layout` (``num_tokens_per_rdma_rank``
                only needed with several nodes).
            topk_idx: ``[T, K]`` int64 expert ids (-1: none); with ``topk_weights`` ``[T, K]`` float32.
            expert_alignment: round each local expert's count up to a multiple of this.
            num_worst_tokens: if > 0, no host sync: outputs have exactly this many rows, rows past the
                real count have ``recv_topk_idx == -1``, and the per-expert list is empty.
            config: kernel tuning (default :meth:`get_dispatch_config`).
            previous_event, async_finish, allocate_on_comm_stream: stream control, see the class docs.

        Returns:
            ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)``;
            rows are ordered by source rank, then token index on that rank. In cached mode:
            ``(recv_x, None, None, None, None, event)``.
        """
        num_tokens, hidden, hidden_bytes = self._check_x(x)
        _check_event_args(previous_event, async_finish, allocate_on_comm_stream)
        config = self._resolve_config(config, self.get_dispatch_config, self.group_size)
        self._check_high_throughput_buffer(hidden_bytes, config)
        _check_int("expert_alignment", expert_alignment, 1)
        _check_int("num_worst_tokens", num_worst_tokens, 0)
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("dispatch with a cached handle: topk_idx and topk_weights must be None")
            self._check_handle(handle, num_tokens, hidden)
        else:
            R = self.group_size
            if num_tokens_per_rank is None or is_token_in_rank is None or num_tokens_per_expert is None:
                raise ValueError("dispatch without a handle needs num_tokens_per_rank, is_token_in_rank and "
                                 "num_tokens_per_expert (from get_dispatch_layout)")
            self._check_device("num_tokens_per_rank", num_tokens_per_rank, dtype=torch.int32, shape=(R,))
            self._check_device("is_token_in_rank", is_token_in_rank, dtype=torch.bool, shape=(num_tokens, R))
            self._check_device("num_tokens_per_expert", num_tokens_per_expert, dtype=torch.int32, shape=(None,))
            self._check_num_experts(num_tokens_per_expert.numel())
            if self.num_nodes > 1:
                if num_tokens_per_rdma_rank is None:
                    raise ValueError(f"num_tokens_per_rdma_rank is needed with {self.num_nodes} nodes")
                self._check_device("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, dtype=torch.int32,
                                   shape=(self.num_nodes,))
            if (topk_idx is None) != (topk_weights is None):
                raise ValueError("topk_idx and topk_weights must be given together")
            if topk_idx is not None:
                self._check_device("topk_idx", topk_idx, dtype=torch.int64, shape=(num_tokens, None))
                num_topk = topk_idx.shape[1]
                if not 1 <= num_topk <= MAX_TOPK:
                    raise ValueError(f"topk_idx: num_topk must be in [1, {MAX_TOPK}], got {num_topk}")
                self._check_device("topk_weights", topk_weights, dtype=torch.float32, shape=(num_tokens, num_topk))
            # Without num_worst_tokens the host waits for the receive counts anyway, so the values are
            # checked then: by the backend on the device where it can (the outcome arrives with the
            # counts), else here (one more host sync).
            device_checked = num_worst_tokens == 0 and self._backend.checks_dispatch_values_on_device()
            if (self._value_checks or (num_worst_tokens == 0 and not device_checked)) and not _capturing():
                _check_layout_values(topk_idx, num_tokens_per_expert.numel(), is_token_in_rank, num_tokens_per_rank)
        return self._run(self._backend.dispatch, x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank,
                         is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
                         num_worst_tokens, config, previous_event, async_finish, allocate_on_comm_stream)

    def _check_handle(self, handle: Any, num_tokens: Optional[int], hidden: Optional[int]) -> None:
        for attr in ("num_tokens", "hidden", "num_output_rows"):
            if not hasattr(handle, attr):
                raise TypeError(f"handle must be the handle a dispatch of this buffer returned, got "
                                f"{type(handle).__name__}")
        if num_tokens is not None and handle.num_tokens != num_tokens:
            raise ValueError(f"x has {num_tokens} tokens but the handle was made for {handle.num_tokens}")
        if hidden is not None and handle.hidden != hidden:
            raise ValueError(f"x has hidden {hidden} but the handle was made for hidden {handle.hidden}")

    @staticmethod
    def _resolve_config(config: Optional[Config], tuned: Callable[[int], Config], num_ranks: int) -> Config:
        if config is None:
            return tuned(num_ranks)
        if not isinstance(config, Config):
            raise TypeError(f"config must be a deep_ep.Config, got {type(config).__name__}")
        return config

    def combine(self, x: torch.Tensor, handle: Any, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[None, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]] = None,
                config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Send the received rows back to their home ranks and sum them there.

        Args:
            x: bf16 ``[num_recv_rows, H]``: one row per row that dispatch delivered (in that order).
            handle: the handle dispatch returned.
            topk_weights: float32 ``[num_recv_rows, K]``, summed the same way (optional).
            bias: bf16 ``[T, H]``, or a pair of them, added to the sum.
            config, previous_event, async_finish, allocate_on_comm_stream: as in :meth:`dispatch`.

        Returns:
            ``(combined_x [T, H] bf16, combined_topk_weights [T, K] float32 or None, event)``: each token's
            plain sum (in fp32, no weights applied) over the ranks it was sent to, plus ``bias``.
        """
        self._check_handle(handle, None, None)
        rows, hidden = handle.num_output_rows, handle.hidden
        self._check_device("x", x, dtype=torch.bfloat16, shape=(rows, hidden))
        if topk_weights is not None:
            self._check_device("topk_weights", topk_weights, dtype=torch.float32, shape=(rows, None))
        biases = bias if isinstance(bias, (tuple, list)) else (bias,)
        if len(biases) > 2:
            raise ValueError("bias must be a tensor or a pair of tensors")
        for i, b in enumerate(biases):
            if b is not None:
                self._check_device(f"bias[{i}]" if isinstance(bias, (tuple, list)) else "bias", b,
                                   dtype=torch.bfloat16, shape=(handle.num_tokens, hidden))
        _check_event_args(previous_event, async_finish, allocate_on_comm_stream)
        config = self._resolve_config(config, self.get_combine_config, self.group_size)
        self._check_high_throughput_buffer(hidden * 2, config)
        return self._run(self._backend.combine, x, handle, topk_weights,
                         tuple(bias) if isinstance(bias, list) else bias, config, previous_event,
                         async_finish, allocate_on_comm_stream)

    # ------------------------------------------------------------------ low-latency
    def _check_low_latency(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        if not self.low_latency_mode:
            raise RuntimeError("low-latency calls need Buffer(..., low_latency_mode=True)")
        # A decode step repeats the same sizes every call: checked once, they are remembered (the
        # size hint alone is a few microseconds of host time per call).
        key = (num_max_dispatch_tokens_per_rank, hidden, num_experts)
        if all(type(v) is int for v in key) and key in self._low_latency_sizes_ok:
            return
        _check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1)
        self._check_num_experts(num_experts)
        if hidden % 128 != 0:
            raise ValueError(f"low-latency hidden must be a multiple of 128, got {hidden}")
        need = low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, self.group_size, num_experts)
        if self.num_rdma_bytes < need:
            raise ValueError(f"num_rdma_bytes ({self.num_rdma_bytes}) is too small: "
                             f"get_low_latency_rdma_size_hint({num_max_dispatch_tokens_per_rank}, {hidden}, "
                             f"{self.group_size}, {num_experts}) = {need}")
        self._low_latency_sizes_ok.add(key)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Reset the low-latency buffers' signals (collective; needed after a high-throughput call that
        reused the same memory)."""
        _check_int("hidden", hidden, 1)
        self._check_low_latency(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        self._run(self._backend.clean_low_latency_buffer, num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False
                             ) -> Tuple[Union[torch.Tensor, Fp8Pair], torch.Tensor, Any, EventOverlap,
                                        Optional[Callable[[], None]]]:
        """Decode-time dispatch: each token goes to the slot of every expert it selected.

        Args:
            x: bf16 ``[T, H]``, ``T <= num_max_dispatch_tokens_per_rank``, ``H`` a multiple of 128.
            topk_idx: int64 ``[T, K]`` expert ids (-1: none).
            num_max_dispatch_tokens_per_rank: the most tokens any rank dispatches (same on every rank).
            num_experts: total experts.
            cumulative_local_expert_recv_stats: int32 ``[num_local_experts]``, incremented by the counts.
            dispatch_wait_recv_cost_stats: int64 ``[num_ranks]``, accumulates receive-wait time (ns)
                per source rank.
            use_fp8: cast to FP8 (scale per token per 128 channels: amax / 448, amax >= 1e-4).
            round_scale: round scales up to powers of two.
            use_ue8m0: pack the (power-of-two) scales' exponents 4 per int32 (needs ``round_scale``).
            async_finish: return an event instead of making the current stream wait.
            return_recv_hook: only issue the sends; calling ``hook()`` completes the receive.

        Returns:
            ``(recv_x, recv_count, handle, event, hook)``: ``recv_x`` is
            ``[num_local_experts, num_ranks * num_max, H]`` (bf16, or the pair ``(e4m3, scales)`` with
            scales ``[.., H/128]`` fp32 or ``[.., H/512]`` int32 with ``use_ue8m0``); per expert the
            ``recv_count[e]`` valid rows are packed at the front. At most two results may be alive.
        """
        num_tokens, hidden = self._check_device("x", x, dtype=torch.bfloat16, shape=(None, None)).shape
        self._check_low_latency(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        if num_tokens > num_max_dispatch_tokens_per_rank:
            raise ValueError(f"x has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank="
                             f"{num_max_dispatch_tokens_per_rank}")
        self._check_device("topk_idx", topk_idx, dtype=torch.int64, shape=(num_tokens, None))
        if not 1 <= topk_idx.shape[1] <= MAX_TOPK:
            raise ValueError(f"topk_idx: num_topk must be in [1, {MAX_TOPK}], got {topk_idx.shape[1]}")
        if self._value_checks:
            _check_topk_range("topk_idx", topk_idx, num_experts)
        if cumulative_local_expert_recv_stats is not None:
            self._check_device("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats,
                               dtype=torch.int32, shape=(num_experts // self.group_size,))
        if dispatch_wait_recv_cost_stats is not None:
            self._check_device("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats,
                               dtype=torch.int64, shape=(self.group_size,))
        if (round_scale or use_ue8m0) and not use_fp8:
            raise ValueError("round_scale and use_ue8m0 need use_fp8=True")
        if use_ue8m0 and not round_scale:
            raise ValueError("use_ue8m0=True needs round_scale=True (ue8m0 stores power-of-two scales)")
        if use_ue8m0 and hidden % 512 != 0:
            raise ValueError(f"use_ue8m0 needs hidden to be a multiple of 512, got {hidden}")
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot both be set")
        return self._run(self._backend.low_latency_dispatch, x, topk_idx, num_max_dispatch_tokens_per_rank,
                         num_experts, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats,
                         bool(use_fp8), bool(round_scale), bool(use_ue8m0), bool(async_finish),
                         bool(return_recv_hook))

    def _check_ll_handle(self, handle: Any) -> None:
        for attr in ("num_tokens", "hidden", "num_experts", "num_max_dispatch_tokens_per_rank"):
            if not hasattr(handle, attr):
                raise TypeError(f"handle must be the handle low_latency_dispatch returned, got {type(handle).__name__}")

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: Any, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, EventOverlap, Optional[Callable[[], None]]]:
        """Decode-time combine: ``combined_x[t] = sum_k topk_weights[t, k] * x[expert(t, k), row of t]``.

        Args:
            x: bf16 ``[num_local_experts, num_ranks * num_max, H]``, the expert outputs in the rows
                low_latency_dispatch delivered.
            topk_idx, topk_weights: the dispatch's ``[T, K]`` ids and float32 weights.
            handle: the handle low_latency_dispatch returned.
            use_logfmt: accepted; the rows travel as bf16 (documented fallback, no extra error).
            zero_copy: ``x`` was already written into :meth:`get_next_low_latency_combine_buffer`.
            async_finish, return_recv_hook: as in :meth:`low_latency_dispatch`.
            out: bf16 ``[T, H]`` to write the result into.
            combine_wait_recv_cost_stats: int64 ``[num_ranks]``, accumulates receive-wait time (ns).

        Returns:
            ``(combined_x [T, H] bf16, event, hook)``.
        """
        self._check_ll_handle(handle)
        R = self.group_size
        self._check_low_latency(handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts)
        self._check_device("x", x, dtype=torch.bfloat16,
                           shape=(handle.num_experts // R, R * handle.num_max_dispatch_tokens_per_rank, handle.hidden))
        self._check_device("topk_idx", topk_idx, dtype=torch.int64, shape=(handle.num_tokens, None))
        self._check_device("topk_weights", topk_weights, dtype=torch.float32, shape=tuple(topk_idx.shape))
        if out is not None:
            self._check_device("out", out, dtype=torch.bfloat16, shape=(handle.num_tokens, handle.hidden))
        if combine_wait_recv_cost_stats is not None:
            self._check_device("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, dtype=torch.int64,
                               shape=(R,))
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot both be set")
        return self._run(self._backend.low_latency_combine, x, topk_idx, topk_weights, handle, bool(use_logfmt),
                         bool(zero_copy), bool(async_finish), bool(return_recv_hook), out,
                         combine_wait_recv_cost_stats)

    def get_next_low_latency_combine_buffer(self, handle: Any) -> torch.Tensor:
        """The bf16 ``[num_local_experts, num_ranks * num_max, H]`` buffer that a ``zero_copy`` combine
        with this handle reads: write the expert outputs there directly."""
        self._check_ll_handle(handle)
        return self._run(self._backend.get_next_low_latency_combine_buffer, handle)

    # ------------------------------------------------------------------ shrink mode
    def _check_shrink(self) -> None:
        if not self.enable_shrink:
            raise RuntimeError("mask calls need Buffer(..., enable_shrink=True)")

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Mask (``mask=True``) or unmask rank ``rank_to_mask`` in the low-latency calls."""
        self._check_shrink()
        _check_int("rank_to_mask", rank_to_mask)
        if rank_to_mask >= self.group_size:
            raise ValueError(f"rank_to_mask must be < {self.group_size}, got {rank_to_mask}")
        self._run(self._backend.low_latency_update_mask_buffer, rank_to_mask, bool(mask))

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Write each rank's mask state (1 = masked) into int32 ``mask_status [num_ranks]``."""
        self._check_shrink()
        self._check_device("mask_status", mask_status, dtype=torch.int32, shape=(self.group_size,))
        self._run(self._backend.low_latency_query_mask_buffer, mask_status)

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmask every rank."""
        self._check_shrink()
        self._run(self._backend.low_latency_clean_mask_buffer)
