"""The CUDA backend: Buffer calls on the kernels of the ``deep_ep_cpp`` extension.

Intranode (all ranks in one NVLink domain, ``num_nodes == 1``): ``get_dispatch_layout``,
``dispatch`` and ``combine`` run on the kernels of ``csrc/kernels/intranode.cu`` over a buffer
that every rank maps through CUDA IPC. Low-latency calls come from
:class:`deep_ep.cuda_ll.LowLatencyKernelsMixin`. Several nodes (``num_nodes > 1``): the internode
kernels of :class:`deep_ep.cuda_internode.InternodeKernelsMixin` serve layout, dispatch and combine
(unless ``DEEP_EP_INTERNODE_KERNELS=0``); with that, and for everything else (a buffer without
RDMA or NVLink bytes), calls fall through to :class:`deep_ep.torch_backend.TorchBackend` (NCCL
across nodes).

Streams: the kernels run on the comm stream of :class:`TorchBackend`, and every output is
allocated there, with the same rules as the torch backend (``_on_comm_stream`` / ``_finish``); a
layout, dispatch and combine keep those rules in one C++ call each (``csrc/comm_frame.hpp``), which
costs the host a fraction of the Python stream switches.

Environment: ``DEEP_EP_TIMEOUT_S`` (default 100) bounds every wait inside the kernels. A kernel
that times out records what it waited for in host-mapped memory and exits; the next call (or
:meth:`CudaBackend.check_errors`) raises :class:`deep_ep.DeepEPTimeoutError` and the buffer
stays failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .config import Config
from .cuda_internode import InternodeKernelsMixin, KernelDispatchHandle, open_nvl_buffer
from .cuda_ll import LowLatencyKernelsMixin
from .torch_backend import TorchBackend, view_bytes
from .utils import (INTRANODE_TARGET_NAMES, DeepEPTimeoutError, EventOverlap, describe_kernel_failure,
                    dispatch_result, host_wait_timeout_message, raise_layout_value_errors, split_bias,
                    split_dispatch_x, tensors_alive, timeout_from_env)

try:  # the extension is optional; Buffer only picks this backend where it imports
    import deep_ep_cpp as _ext
except ImportError:  # pragma: no cover - depends on the build
    _ext = None

Fp8Pair = Tuple[torch.Tensor, torch.Tensor]

_MAX_INTRANODE_RANKS = 8

# Names of the codes in csrc/kernels/exception.cuh.
_KERNEL_NAMES = {1: "notify_dispatch", 2: "intranode_dispatch", 3: "intranode_combine", 4: "intranode_barrier"}
_TARGET_NAMES = INTRANODE_TARGET_NAMES


def intranode_kernels_available() -> bool:
    """Whether the extension with the intranode runtime is importable."""
    return _ext is not None and hasattr(_ext, "Buffer")


@dataclass
class CudaDispatchHandle(KernelDispatchHandle):
    """Layout of one intranode dispatch on the kernels, reused by combine and cached dispatch.

    Attributes:
        num_tokens, hidden: the sender side's ``x`` shape.
        num_experts: experts of the dispatch (for the top-k remap of a cached call).
        num_output_rows: rows of every output (``num_worst_tokens`` when given).
        num_recv_tokens: real received rows, or ``None`` with ``num_worst_tokens`` (never synced).
        is_token_in_rank: ``[num_tokens, num_ranks]`` bool, this rank's routing.
        recv_rank_prefix: int32 ``[num_ranks + 1]``, first received row of each source and the total.
        recv_src_num_tokens: int32 ``[num_ranks]``, each source rank's ``num_tokens``.
        recv_src_idx: int32 ``[num_output_rows]``, each received row's token index at its source.
        padded: outputs have ``num_worst_tokens`` rows (rows past the real count are padding).
    """

    recv_rank_prefix: torch.Tensor
    recv_src_num_tokens: torch.Tensor
    recv_src_idx: torch.Tensor
    padded: bool




class CudaBackend(InternodeKernelsMixin, LowLatencyKernelsMixin, TorchBackend):
    """Buffer calls on the CUDA kernels, with the torch backend for what has no kernel.

    With several nodes, layout/dispatch/combine go (through ``super()``) to the internode
    kernels, or to the torch backend where those cannot serve the buffer or
    ``DEEP_EP_INTERNODE_KERNELS=0`` was set at construction.
    """

    name = "cuda"

    def __init__(self, group: dist.ProcessGroup, num_nvl_bytes: int, num_rdma_bytes: int, low_latency_mode: bool,
                 nvl_domain_size: int, num_qps_per_rank: int, allow_nvlink_for_low_latency_mode: bool,
                 allow_mnnvl: bool, explicitly_destroy: bool, enable_shrink: bool) -> None:
        super().__init__(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, nvl_domain_size, num_qps_per_rank,
                         allow_nvlink_for_low_latency_mode, allow_mnnvl, explicitly_destroy, enable_shrink)
        self.timeout_s = timeout_from_env()
        self._runtime: Optional[Any] = None
        self._failure: Optional[str] = None
        if (self.num_nodes == 1 and self.num_ranks <= _MAX_INTRANODE_RANKS and self.device.type == "cuda"
                and intranode_kernels_available() and num_nvl_bytes > int(_ext.NVL_CONTROL_BYTES)):
            self._runtime = open_nvl_buffer(self.group, 0, self.rank, self.num_ranks, num_nvl_bytes, self.timeout_s)
            stream = self.comm_stream
            self._runtime.set_comm_stream(stream.stream_id, stream.device_index, stream.device_type)

    # ------------------------------------------------------------------ plumbing
    @property
    def uses_intranode_kernels(self) -> bool:
        """True when layout, dispatch and combine run on the intranode kernels."""
        return self._runtime is not None

    def check_errors(self) -> None:
        """Raise :class:`DeepEPTimeoutError` if a kernel of this rank reported a failure.

        Kernels report into host-mapped memory; this runs at the start of every call and may be
        called after a synchronization to check the calls before it.
        """
        if self._failure is not None:
            raise DeepEPTimeoutError(self._failure)
        if self._runtime is None:
            return
        record = self._runtime.get_error()
        if record is not None:
            self._failure = self._describe(record)
            raise DeepEPTimeoutError(self._failure)
        self.low_latency_check_errors()

    def _describe(self, record: Tuple[int, ...]) -> str:
        return describe_kernel_failure(record, _KERNEL_NAMES, _TARGET_NAMES, self.timeout_s)

    def checks_dispatch_values_on_device(self) -> bool:
        # The intranode notify runs the checks; the internode path (its own notify) does not.
        return self._runtime is not None

    def _intranode(self) -> bool:
        if self._runtime is None:
            return False
        self.check_errors()
        return True

    def destroy(self) -> None:
        if self._runtime is not None:
            failed = self._failure is not None or self._runtime.get_error() is not None
            if not failed:
                # Once this rank's kernels are done, no peer writes into its buffer any more:
                # every remote write of a call precedes something this rank waited for.
                torch.cuda.synchronize(self.device)
            # After a failure a peer may still write into this buffer: leave it allocated.
            self._runtime.destroy(failed)
            self._runtime = None
        super().destroy()

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size], offset: int,
                                use_rdma_buffer: bool) -> torch.Tensor:
        if use_rdma_buffer or self._runtime is None:
            return super().get_local_buffer_tensor(dtype, size, offset, use_rdma_buffer)
        return view_bytes(self._runtime.get_local_buffer_tensor(offset, self.num_nvl_bytes - offset), dtype, size)

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap], async_finish: bool,
                            allocate_on_comm_stream: bool):
        if not self._intranode():
            return super().get_dispatch_layout(topk_idx, num_experts, previous_event, async_finish,
                                               allocate_on_comm_stream)
        # The stream rules, the allocation and the launch in one C++ call (CommFrame).
        per_rank, per_expert, is_token_in_rank, event = self._runtime.dispatch_layout_on_comm_stream(
            topk_idx, num_experts, self._comm_waits_for(previous_event), async_finish)
        return per_rank, None, per_expert, is_token_in_rank, _overlap(
            event, (topk_idx,), (per_rank, per_expert, is_token_in_rank))

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x: Union[torch.Tensor, Fp8Pair], handle: Optional[Any],
                 num_tokens_per_rank: Optional[torch.Tensor], num_tokens_per_rdma_rank: Optional[torch.Tensor],
                 is_token_in_rank: Optional[torch.Tensor], num_tokens_per_expert: Optional[torch.Tensor],
                 topk_idx: Optional[torch.Tensor], topk_weights: Optional[torch.Tensor],
                 expert_alignment: int, num_worst_tokens: int, config: Config,
                 previous_event: Optional[EventOverlap], async_finish: bool, allocate_on_comm_stream: bool):
        if not self._intranode() or (handle is not None and not isinstance(handle, CudaDispatchHandle)):
            return super().dispatch(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                                    num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
                                    num_worst_tokens, config, previous_event, async_finish, allocate_on_comm_stream)
        is_fp8, data, scales = split_dispatch_x(x)
        num_tokens, hidden = data.shape
        waits = self._comm_waits_for(previous_event)
        # The stream rules, the allocation and the launches in one C++ call each (CommFrame).
        if handle is not None:
            recv_data, recv_scales, event = self._runtime.cached_dispatch(
                data, scales, handle.is_token_in_rank, handle.recv_rank_prefix, handle.num_output_rows,
                handle.num_experts, handle.padded, config.num_sms, config.num_max_nvl_chunked_send_tokens,
                config.num_max_nvl_chunked_recv_tokens, waits, async_finish)
            recv_x = (recv_data, recv_scales) if is_fp8 else recv_data
            return dispatch_result(True, recv_x, None, None, [], handle, _overlap(
                event, (x, handle.is_token_in_rank, handle.recv_rank_prefix), (recv_data, recv_scales)))
        (status, check_flags, num_recv, per_expert_list, recv_data, recv_scales, recv_topk_idx, recv_topk_weights,
         recv_src_idx, recv_rank_prefix, recv_src_num_tokens, event) = self._runtime.dispatch_on_comm_stream(
            data, scales, topk_idx, topk_weights, num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank,
            expert_alignment, num_worst_tokens, config.num_sms, config.num_max_nvl_chunked_send_tokens,
            config.num_max_nvl_chunked_recv_tokens, waits, async_finish)
        num_experts = num_tokens_per_expert.numel()
        if status == _ext.DISPATCH_WAIT_FAILED:
            self.check_errors()  # a kernel recorded why
            self._failure = host_wait_timeout_message(self.rank, self.timeout_s, "notify_dispatch")
            raise DeepEPTimeoutError(self._failure)
        if status == _ext.DISPATCH_BAD_LAYOUT:
            # Nothing was dispatched; every rank given the same bad layout stops here too.
            raise_layout_value_errors(bool(check_flags & _ext.CHECK_BAD_TOPK),
                                      bool(check_flags & _ext.CHECK_BAD_COUNTS), topk_idx, num_experts)
        padded = num_worst_tokens > 0
        handle = CudaDispatchHandle(num_tokens, hidden, num_experts, recv_data.shape[0],
                                    None if padded else num_recv, is_token_in_rank, recv_rank_prefix,
                                    recv_src_num_tokens, recv_src_idx, padded)
        recv_x: Union[torch.Tensor, Fp8Pair] = (recv_data, recv_scales) if is_fp8 else recv_data
        return dispatch_result(False, recv_x, recv_topk_idx, recv_topk_weights, list(per_expert_list), handle,
                               _overlap(event, (x, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_rank,
                                                num_tokens_per_expert),
                                        (recv_data, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx)))

    # ------------------------------------------------------------------ combine
    def combine(self, x: torch.Tensor, handle: Any, topk_weights: Optional[torch.Tensor],
                bias: Union[None, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], config: Config,
                previous_event: Optional[EventOverlap], async_finish: bool, allocate_on_comm_stream: bool):
        if not self._intranode() or not isinstance(handle, CudaDispatchHandle):
            return super().combine(x, handle, topk_weights, bias, config, previous_event, async_finish,
                                   allocate_on_comm_stream)
        bias0, bias1 = split_bias(bias)
        # The stream rules, the allocation and the launch in one C++ call (CommFrame).
        combined_x, combined_weights, event = self._runtime.combine_on_comm_stream(
            x, topk_weights, bias0, bias1, handle.is_token_in_rank, handle.recv_src_idx, handle.recv_rank_prefix,
            handle.recv_src_num_tokens, handle.num_tokens, config.num_sms, config.num_max_nvl_chunked_send_tokens,
            config.num_max_nvl_chunked_recv_tokens, self._comm_waits_for(previous_event), async_finish)
        return combined_x, combined_weights, _overlap(
            event, (x, topk_weights, bias0, bias1, handle.is_token_in_rank, handle.recv_src_idx,
                    handle.recv_rank_prefix, handle.recv_src_num_tokens), (combined_x, combined_weights))

    def _comm_waits_for(self, previous_event: Optional[EventOverlap]) -> bool:
        """For a call under a C++ CommFrame: make the comm stream wait for ``previous_event`` here
        and return False, or return True (the frame makes it wait for the current stream)."""
        if previous_event is not None and previous_event.event is not None:
            previous_event.stream_wait(self.comm_stream)
            return False
        return True


def _overlap(event: Optional[Any], inputs: Tuple[Any, ...], outputs: Tuple[Any, ...]) -> EventOverlap:
    """A CommFrame call's EventOverlap: its event and tensors with async_finish, else complete."""
    if event is None:
        return EventOverlap(None)
    return EventOverlap(event, extra_tensors=tensors_alive(*inputs, *outputs))
