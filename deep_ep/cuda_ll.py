"""Low-latency (decode) calls on the CUDA kernels: the Python side of ``csrc/low_latency.cpp``.

:class:`LowLatencyKernelsMixin` goes first in the bases of the CUDA backend
(``class CudaBackend(LowLatencyKernelsMixin, TorchBackend)``). When the Buffer is built with
``low_latency_mode=True`` and ``num_rdma_bytes > 0`` and the extension has NVSHMEM, it
initializes NVSHMEM (unique id from rank 0, shared through the torch group) and runs
``low_latency_dispatch``/``low_latency_combine`` and their companions on the kernels; otherwise
every call falls through to the next class (the torch backend).

Kernel design (``csrc/kernels/internode_ll.cu``): a token crosses NVLink once per destination
rank and is fanned out to the local experts on the receiver; rows are packed per expert in
(source rank, token, top-k slot) order, so results are deterministic. Combine, by default
("reduced"), also crosses once per (token, rank): the home rank broadcasts its top-k weights,
each rank sends the weighted sum of its experts' rows for the token (fp32 sum, one bf16
rounding; a rank with just one of the token's experts sends that row as is, without waiting for
the weights, and the home rank applies its weight), and the home rank adds those partial rows;
``DEEP_EP_LL_COMBINE=rows`` (and every hook-mode combine, whose send must not wait for peers)
sends one row per (token, expert) and sums with the weights on the home rank. ``use_logfmt`` is
accepted and ignored: rows always travel as bf16 (the documented fallback, no extra error).

Environment: ``DEEP_EP_TIMEOUT_S`` (default 100) bounds every wait inside the kernels;
``DEEP_EP_LL_COMBINE`` (``reduced`` or ``rows``) picks the combine.
NVSHMEM's own variables pass through, except that NVLink multicast is always off
(``NVSHMEM_DISABLE_NVLS=1``), the remote (IB) transport defaults to ``none`` on hosts without
InfiniBand devices, the symmetric heap defaults to ``num_rdma_bytes`` plus headroom, and the
unique-id bootstrap uses the loopback interface when every rank is on one host.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from .utils import DeepEPTimeoutError, EventOverlap, tensors_alive, timeout_from_env
from .torch_backend import view_bytes

try:  # the extension is optional: without it (or without NVSHMEM) the torch path serves
    import deep_ep_cpp as _ext
except ImportError:  # pragma: no cover - depends on the build
    _ext = None

_COMBINE_MODES = ("reduced", "rows")
_HEAP_HEADROOM_BYTES = 1 << 29
# NVSHMEM is initialized once per process; a second low-latency Buffer must wait for destroy().
_active_runtime: Optional[Any] = None

Fp8Pair = Tuple[torch.Tensor, torch.Tensor]


def low_latency_kernels_available() -> bool:
    """Whether the extension was built with the NVSHMEM low-latency kernels."""
    return _ext is not None and hasattr(_ext, "LowLatencyRuntime")


def low_latency_required_bytes(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                               num_experts: int) -> int:
    """Bytes of symmetric memory the kernels' layout needs (both alternating buffers).

    Raises:
        RuntimeError: the extension has no low-latency kernels.
    """
    if not low_latency_kernels_available():
        raise RuntimeError("deep_ep_cpp was built without the NVSHMEM low-latency kernels")
    return int(_ext.LowLatencyRuntime.required_bytes(num_max_dispatch_tokens_per_rank, hidden, num_ranks,
                                                      num_experts))


def _combine_mode_from_env() -> str:
    mode = os.environ.get("DEEP_EP_LL_COMBINE", _COMBINE_MODES[0])
    if mode not in _COMBINE_MODES:
        raise ValueError(f"DEEP_EP_LL_COMBINE must be one of {_COMBINE_MODES}, got {mode!r}")
    return mode


def _has_infiniband() -> bool:
    try:
        return len(os.listdir("/sys/class/infiniband")) > 0
    except OSError:
        return False


def prepare_nvshmem_environment(num_rdma_bytes: int, single_host: bool) -> None:
    """Set NVSHMEM's environment before its initialization (see the module docstring)."""
    # Multicast objects can take a shared host's GPUs out of service: never use them.
    os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
    if not _has_infiniband():
        # No NIC: P2P over NVLink is the only transport; do not fail looking for IB.
        os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
        os.environ.setdefault("NVSHMEM_IB_ENABLE_IBGDA", "0")
    wanted = num_rdma_bytes + _HEAP_HEADROOM_BYTES
    current = os.environ.get("NVSHMEM_SYMMETRIC_SIZE")
    if current is None or (current.isdigit() and int(current) < wanted):
        os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(wanted)
    if single_host and os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo")


def _create_runtime(group: dist.ProcessGroup, rank: int, num_ranks: int, num_rdma_bytes: int,
                    allow_nvlink: bool, enable_shrink: bool) -> Any:
    """Collective: bootstrap NVSHMEM through ``group`` and allocate the symmetric buffer."""
    global _active_runtime
    if _active_runtime is not None:
        raise RuntimeError("deep_ep: only one low-latency Buffer per process at a time (NVSHMEM is "
                           "process-wide); destroy() the previous one first")
    hosts = [None] * num_ranks
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    prepare_nvshmem_environment(num_rdma_bytes, single_host=len(set(hosts)) == 1)
    unique_id = [_ext.LowLatencyRuntime.get_unique_id() if rank == 0 else None]
    dist.broadcast_object_list(unique_id, src=dist.get_global_rank(group, 0), group=group)
    timeout_s = timeout_from_env()
    runtime = _ext.LowLatencyRuntime(rank, num_ranks, unique_id[0], num_rdma_bytes, allow_nvlink, enable_shrink,
                                     timeout_s)
    _active_runtime = runtime
    return runtime


@dataclass
class CudaLowLatencyHandle:
    """Layout of one kernel low-latency dispatch (opaque to users).

    ``packed_src_info[e, r]`` = source token | top-k slot << 16 | source rank << 20 for the
    ``recv_count[e]`` valid rows of local expert ``e``; ``layout_range[e, s]`` = first row << 32 |
    row count of the block that came from rank ``s``; ``slot_rows[s * M + t, k]`` = the row
    (``e * num_ranks * M + r``) that token ``t`` of rank ``s`` got for its top-k entry ``k``, where
    that expert is local (used by the reduced combine).
    """

    num_tokens: int
    hidden: int
    num_experts: int
    num_max_dispatch_tokens_per_rank: int
    num_topk: int
    buffer_idx: int
    packed_src_info: torch.Tensor
    layout_range: torch.Tensor
    recv_count: torch.Tensor
    slot_rows: torch.Tensor

    def _valid_rows(self) -> torch.Tensor:
        rows = torch.arange(self.packed_src_info.shape[1], device=self.packed_src_info.device)
        return rows.unsqueeze(0) < self.recv_count.unsqueeze(1)

    @property
    def src_info(self) -> torch.Tensor:
        """Source token index of each row (-1 past ``recv_count``), as in the torch handle."""
        return torch.where(self._valid_rows(), self.packed_src_info & 0xFFFF, torch.full_like(self.packed_src_info, -1))

    @property
    def src_rank(self) -> torch.Tensor:
        """Source rank of each row (-1 past ``recv_count``)."""
        rank = torch.bitwise_right_shift(self.packed_src_info, 20) & 0xFFF
        return torch.where(self._valid_rows(), rank, torch.full_like(self.packed_src_info, -1))


class LowLatencyKernelsMixin:
    """The low-latency Buffer calls on the NVSHMEM kernels; see the module docstring."""

    def __init__(self, group: dist.ProcessGroup, num_nvl_bytes: int, num_rdma_bytes: int, low_latency_mode: bool,
                 nvl_domain_size: int, num_qps_per_rank: int, allow_nvlink_for_low_latency_mode: bool,
                 allow_mnnvl: bool, explicitly_destroy: bool, enable_shrink: bool) -> None:
        super().__init__(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, nvl_domain_size,  # type: ignore[call-arg]
                         num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, explicitly_destroy,
                         enable_shrink)
        self._ll = None
        self._ll_combine_mode = _combine_mode_from_env()
        if (low_latency_mode and num_rdma_bytes > 0 and low_latency_kernels_available()
                and self.device.type == "cuda"):
            self._ll = _create_runtime(self.group, self.rank, self.num_ranks, num_rdma_bytes,
                                       bool(allow_nvlink_for_low_latency_mode), bool(enable_shrink))

    # ------------------------------------------------------------------ plumbing
    @property
    def uses_low_latency_kernels(self) -> bool:
        """True when the low-latency calls run on the NVSHMEM kernels."""
        return self._ll is not None

    def destroy(self) -> None:
        global _active_runtime
        if self._ll is not None:
            self._ll.destroy()
            if _active_runtime is self._ll:
                _active_runtime = None
            self._ll = None
        super().destroy()  # type: ignore[misc]

    def low_latency_check_errors(self) -> None:
        """Raise :class:`DeepEPTimeoutError` if a low-latency kernel reported a timeout.

        Kernels report into host-mapped memory; this is checked at the start of every call and
        in the receive hook, and can be called after a synchronization to check the last call.
        """
        if self._ll is not None:
            record = self._ll.error_record()
            if record is not None:
                rank, kernel, peer, seen, expected, waited_ns = record
                raise DeepEPTimeoutError(
                    f"deep_ep low-latency: rank {rank} timed out in {kernel} waiting for rank {peer} "
                    f"(seen {seen}, expected >= {expected}, waited {waited_ns // 1_000_000} ms)")

    def low_latency_set_combine_mode(self, mode: str) -> None:
        """``"reduced"`` (default): each rank sends one weighted partial row per (token, rank);
        ``"rows"``: one row per (token, expert), summed with the weights on the home rank."""
        if mode not in _COMBINE_MODES:
            raise ValueError(f"combine mode must be one of {_COMBINE_MODES}, got {mode!r}")
        self._ll_combine_mode = mode

    def low_latency_set_timeout(self, timeout_s: float) -> None:
        """Bound every later kernel wait by ``timeout_s`` seconds (default ``DEEP_EP_TIMEOUT_S`` or 100)."""
        if self._ll is not None:
            self._ll.set_timeout(float(timeout_s))

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size], offset: int,
                                use_rdma_buffer: bool) -> torch.Tensor:
        if not (use_rdma_buffer and self._ll is not None):
            return super().get_local_buffer_tensor(dtype, size, offset, use_rdma_buffer)  # type: ignore[misc]
        return view_bytes(self._ll.rdma_buffer()[offset:], dtype, size)

    def _ll_launch(self, async_finish: bool, launch: Callable[[], None], keep_alive: Sequence[Any]) -> EventOverlap:
        """Run ``launch`` on the comm stream with ``async_finish`` (returning its event), else on
        the current stream (nothing to wait for, and a CUDA graph sees one stream)."""
        if async_finish and self.comm_stream is not None:
            with self._on_comm_stream(None):  # type: ignore[attr-defined]
                launch()
            return self._finish(True, keep_alive, ())  # type: ignore[attr-defined]
        launch()
        return EventOverlap(None)

    # ------------------------------------------------------------------ calls
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        if self._ll is None:
            return super().clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden,  # type: ignore[misc]
                                                    num_experts)
        self.low_latency_check_errors()
        self._ll.clean(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        # Every rank restarts the alternation from buffer 0 (a rank that skipped a call in
        # shrink mode is back in step).
        self._ll_buffer_idx = 0

    def get_next_low_latency_combine_buffer(self, handle: Any) -> torch.Tensor:
        if self._ll is None or not isinstance(handle, CudaLowLatencyHandle):
            return super().get_next_low_latency_combine_buffer(handle)  # type: ignore[misc]
        return self._ll.combine_buffer(handle.buffer_idx, handle.num_max_dispatch_tokens_per_rank, handle.hidden,
                                       handle.num_experts)

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor],
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor], use_fp8: bool, round_scale: bool,
                             use_ue8m0: bool, async_finish: bool, return_recv_hook: bool):
        if self._ll is None:
            return super().low_latency_dispatch(  # type: ignore[misc]
                x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, cumulative_local_expert_recv_stats,
                dispatch_wait_recv_cost_stats, use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook)
        self.low_latency_check_errors()
        num_tokens, hidden = x.shape
        x = x.contiguous()
        topk_idx = topk_idx.contiguous()
        buffer_idx = self._next_ll_buffer()  # type: ignore[attr-defined]

        # Allocated in C++: six torch.empty calls from Python cost more host time than the launch.
        recv_data, recv_scales, recv_count, packed_src_info, layout_range, slot_rows = self._ll.dispatch_outputs(
            num_max_dispatch_tokens_per_rank, hidden, num_experts, use_fp8, use_ue8m0)
        handle = CudaLowLatencyHandle(num_tokens, hidden, num_experts, num_max_dispatch_tokens_per_rank,
                                      topk_idx.shape[1], buffer_idx, packed_src_info, layout_range, recv_count,
                                      slot_rows)
        recv_x: Union[torch.Tensor, Fp8Pair] = (recv_data, recv_scales) if use_fp8 else recv_data
        runtime = self._ll

        def launch(phases: int) -> None:
            runtime.dispatch(x, topk_idx, recv_data, recv_scales, recv_count, packed_src_info, layout_range, slot_rows,
                             cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats,
                             num_max_dispatch_tokens_per_rank, num_experts, buffer_idx, use_fp8, round_scale,
                             use_ue8m0, phases)

        if return_recv_hook:
            launch(_ext.LL_PHASE_SEND)

            def hook() -> None:
                self.low_latency_check_errors()
                launch(_ext.LL_PHASE_RECV)

            return recv_x, recv_count, handle, EventOverlap(None), hook
        keep_alive = (x, topk_idx, recv_data, recv_scales, recv_count, packed_src_info, layout_range, slot_rows,
                      cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats)
        event = self._ll_launch(async_finish, lambda: launch(_ext.LL_PHASE_SEND | _ext.LL_PHASE_RECV),
                                tensors_alive(*keep_alive))
        return recv_x, recv_count, handle, event, None

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: Any,
                            use_logfmt: bool, zero_copy: bool, async_finish: bool, return_recv_hook: bool,
                            out: Optional[torch.Tensor], combine_wait_recv_cost_stats: Optional[torch.Tensor]):
        if self._ll is None or not isinstance(handle, CudaLowLatencyHandle):
            return super().low_latency_combine(  # type: ignore[misc]
                x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish, return_recv_hook, out,
                combine_wait_recv_cost_stats)
        self.low_latency_check_errors()
        hidden = handle.hidden
        topk_idx = topk_idx.contiguous()
        topk_weights = topk_weights.contiguous()
        source = None if zero_copy else x.contiguous()
        combined = out if out is not None else torch.empty((handle.num_tokens, hidden), dtype=torch.bfloat16,
                                                           device=topk_idx.device)
        runtime = self._ll
        # The reduced combine's send waits for the home ranks' weights, so a hook's send (which
        # must not depend on peers) always moves one row per (token, expert).
        reduced = self._ll_combine_mode == "reduced" and not return_recv_hook

        def launch(phases: int) -> None:
            runtime.combine(source, topk_idx, topk_weights, handle.packed_src_info, handle.recv_count,
                            handle.slot_rows, combined, combine_wait_recv_cost_stats,
                            handle.num_max_dispatch_tokens_per_rank, hidden, handle.num_experts, handle.buffer_idx,
                            zero_copy, reduced, phases)

        if return_recv_hook:
            launch(_ext.LL_PHASE_SEND)

            def hook() -> None:
                self.low_latency_check_errors()
                launch(_ext.LL_PHASE_RECV)

            return combined, EventOverlap(None), hook
        keep_alive = (source, topk_idx, topk_weights, handle.packed_src_info, handle.recv_count, handle.slot_rows,
                      combined, combine_wait_recv_cost_stats)
        event = self._ll_launch(async_finish, lambda: launch(_ext.LL_PHASE_SEND | _ext.LL_PHASE_RECV),
                                tensors_alive(*keep_alive))
        return combined, event, None

    # ------------------------------------------------------------------ shrink mode
    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool) -> None:
        if self._ll is None:
            return super().low_latency_update_mask_buffer(rank_to_mask, mask)  # type: ignore[misc]
        self._ll.update_mask(rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        if self._ll is None:
            return super().low_latency_query_mask_buffer(mask_status)  # type: ignore[misc]
        self._ll.query_mask(mask_status)

    def low_latency_clean_mask_buffer(self) -> None:
        if self._ll is None:
            return super().low_latency_clean_mask_buffer()  # type: ignore[misc]
        self._ll.clean_mask()
