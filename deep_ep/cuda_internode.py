"""Internode high-throughput calls on the CUDA kernels: the Python side of ``csrc/internode.cpp``.

Checked on 4 x H200 as 2 x 2 and 4 x 1, and 2 x 1; as 2 x 2 at 0.74-0.85x the intranode kernels'
bandwidth (docs/benchmarks.md). :class:`InternodeKernelsMixin` goes first in the bases of the CUDA
backend. It serves ``get_dispatch_layout``, ``dispatch`` and ``combine`` when the group spans
several nodes (``num_nodes > 1``), the extension has NVSHMEM, ``num_rdma_bytes > 0``,
``num_nvl_bytes`` exceeds the NVLink control area, ``nvl_domain_size <= 8``, at most 24 nodes and
64 ranks, unless ``DEEP_EP_INTERNODE_KERNELS=0`` is set on every rank when the Buffer is built.
Otherwise every call falls through to the next class, and with several nodes that is the torch
backend over NCCL.

Design (KERNELS.md "High-throughput internode"): nodes are groups of ``nvl_domain_size``
consecutive ranks; ranks of the same local index form a "rail". Dispatch is a composition:

1. ``notify`` (NVSHMEM): every rank learns what every rank sends it, the tokens its rail peers
   send to its node, and what it must forward to each rank of its node.
2. rail leg: each token crosses to a node at most once, to the rank of the same local index
   there, with its FP8 scales, node-relative top-k ids, weights, source index and the set of
   ranks of that node that want it, into a staging area ordered by source node, then token.
   Every warp of the rail kernel's blocks carries one sub-stream (its own ring); a rail peer
   that ``nvshmem_ptr`` reaches (P2P) gets the slots by direct stores, any other by NVSHMEM puts
   with signal.
3. NVLink leg: the verified intranode kernels (``deep_ep_cpp.Buffer`` over the ranks of the node)
   forward the staged tokens, remapping the top-k ids to local experts.
4. the rows in the order of the contract: by global source rank, then token index. The NVLink
   leg's kernels write each row straight to its place through a row map (``_row_segments``: the
   leg's rows form runs, one per (forwarding rank, source node), each moved by a constant), so no
   pass over the rows is needed; with ``DEEP_EP_INTERNODE_ROW_MAP=0`` a row permutation (torch
   ops moving 16-byte words) does it after the leg instead.

Combine reverses it: the intranode combine reads the rows through the same map (or after the
permutation's inverse), sums (the rows of a token from
the ranks of one node are summed in fp32 at the forwarding rank, rounded to bf16 once), the rail
leg home (one partial row per (token, node)), and the home rank's fp32 sum of those partial rows
plus the biases. The intermediate bf16 rounding of each node's partial sum is the one difference
from the torch backend's single rounding.

``num_worst_tokens`` needs no host sync (the staging area then has ``nvl_domain_size *
num_worst_tokens`` rows, an upper bound); cached handles, FP8, top-k remap, ``expert_alignment``
and events work as in the intranode path. NVSHMEM is initialized once per process: by the
low-latency runtime when ``low_latency_mode=True`` (this path then takes its own symmetric
allocation from the same heap), else here.

Environment: ``DEEP_EP_INTERNODE_KERNELS`` (``0`` turns the kernels off), ``DEEP_EP_INTERNODE_ROW_MAP`` (``0``: the
permutation passes instead of the row map, read when the Buffer is built), ``DEEP_EP_TIMEOUT_S`` (default 100)
bounds every kernel wait; a timeout raises :class:`deep_ep.DeepEPTimeoutError` naming the rank,
the kernel and what it waited for, and leaves the buffer failed.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import cuda_ll
from .config import Config
from .torch_backend import _group_device, view_bytes
from .utils import (INTRANODE_TARGET_NAMES, DeepEPTimeoutError, EventOverlap, describe_kernel_failure,
                    dispatch_result, empty_combine_rows, empty_dispatch_rows, empty_layout, host_wait_timeout_message,
                    split_bias, split_dispatch_x, timeout_from_env)

try:  # the extension is optional; without NVSHMEM it has no InternodeRuntime
    import deep_ep_cpp as _ext
except ImportError:  # pragma: no cover - depends on the build
    _ext = None

Fp8Pair = Tuple[torch.Tensor, torch.Tensor]

ENV_FLAG = "DEEP_EP_INTERNODE_KERNELS"
ROW_MAP_FLAG = "DEEP_EP_INTERNODE_ROW_MAP"
_MAX_NODE_RANKS = 8
_MAX_LAYOUT_RANKS = 64

# Codes of csrc/kernels/exception.cuh and csrc/kernels/internode_api.cuh.
_KERNEL_NAMES = {1: "notify_dispatch (NVLink leg)", 2: "intranode_dispatch (NVLink leg)",
                 3: "intranode_combine (NVLink leg)", 4: "intranode_barrier", 5: "internode_notify",
                 6: "internode_rail_dispatch", 7: "internode_rail_combine"}
_TARGET_NAMES = {
    **INTRANODE_TARGET_NAMES,
    7: "every rank's counts of this call",
    8: "rail ring data (the rail peer's tail)",
    9: "free rail ring slots (the rail peer's head)",
    10: "room in the staging area (num_worst_tokens too small)",
}


def internode_kernels_requested() -> bool:
    """Whether the internode kernels may serve a multi-node group: yes unless
    ``DEEP_EP_INTERNODE_KERNELS=0`` turns them off."""
    return os.environ.get(ENV_FLAG, "1").strip() != "0"


def internode_kernels_available() -> bool:
    """Whether the extension was built with the internode runtime (NVSHMEM) and the intranode one."""
    return _ext is not None and hasattr(_ext, "InternodeRuntime") and hasattr(_ext, "Buffer")


def open_nvl_buffer(group: dist.ProcessGroup, first: int, local: int, num_local: int, num_nvl_bytes: int,
                    timeout_s: float) -> Any:
    """Collective over ``group``: the intranode runtime (``deep_ep_cpp.Buffer``) of the ``num_local``
    ranks ``first`` to ``first + num_local - 1`` of ``group``, this rank being their ``local``-th,
    with the buffers of those ranks mapped through CUDA IPC."""
    buffer = _ext.Buffer(local, num_local, num_nvl_bytes, timeout_s)
    handles: List[Optional[bytes]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(handles, bytes(buffer.get_local_ipc_handle()), group=group)
    buffer.sync([bytes(h) for h in handles[first:first + num_local]])
    return buffer


def _single_host(group: dist.ProcessGroup) -> bool:
    hosts: List[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return len(set(hosts)) == 1


@dataclass
class KernelDispatchHandle:
    """The fields that the dispatch handles of the kernels (intranode and internode) start with;
    each subclass documents them with its own."""

    num_tokens: int
    hidden: int
    num_experts: int
    num_output_rows: int
    num_recv_tokens: Optional[int]
    is_token_in_rank: torch.Tensor


@dataclass
class InternodeDispatchHandle(KernelDispatchHandle):
    """Layout of one internode dispatch on the kernels, reused by combine and cached dispatch.

    Attributes:
        num_tokens, hidden, num_experts, num_output_rows, num_recv_tokens: as in the intranode handle
            (``num_recv_tokens`` is ``None`` with ``num_worst_tokens``).
        is_token_in_rank: ``[num_tokens, num_ranks]`` bool, this rank's routing.
        recv_from_rank: int32 ``[num_ranks]``, rows received from each source rank.
        rail_prefix: int32 ``[num_nodes + 1]``, first staging row of each source node, then the total.
        rail_src_num_tokens: int32 ``[num_nodes]``, ``num_tokens`` of the rail peer on each node.
        forward_counts: int32 ``[nvl_domain_size]``, staged tokens forwarded to each rank of this node.
        staging_rows: rows of the staging area.
        staging_src_token: int32 ``[staging_rows]``, each staged token's index at its source.
        forward_in_rank: bool ``[staging_rows, nvl_domain_size]``, the NVLink leg's routing.
        intra_rank_prefix, intra_src_num_tokens, intra_src_idx: the NVLink leg's layout.
        row_order: int64 ``[num_output_rows]``: the NVLink leg's row ``i`` is output row
            ``row_order[i]``, for the permutation passes (``None`` with the row map, or when
            ``nvl_domain_size == 1``: the orders agree).
        row_segments: int32 ``[2, nvl_domain_size * num_nodes]``, the NVLink leg kernels' row map
            (``None`` without it, or when ``nvl_domain_size == 1``).
        padded: outputs have ``num_worst_tokens`` rows.
    """

    recv_from_rank: torch.Tensor
    rail_prefix: torch.Tensor
    rail_src_num_tokens: torch.Tensor
    forward_counts: torch.Tensor
    staging_rows: int
    staging_src_token: torch.Tensor
    forward_in_rank: torch.Tensor
    intra_rank_prefix: torch.Tensor
    intra_src_num_tokens: torch.Tensor
    intra_src_idx: torch.Tensor
    row_order: Optional[torch.Tensor]
    row_segments: Optional[torch.Tensor]
    padded: bool


def _leg_runs(recv_from_rank: torch.Tensor, nvl_domain_size: int,
              num_nodes: int) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The NVLink leg's runs of rows, one per (forwarding local rank l, source node n) at
    ``l * N + n``: their first and end rows in the leg, and their first row in the contract's
    order (by global source rank ``n * L + l``). None with one rank per node (the orders agree)."""
    L, N = nvl_domain_size, num_nodes
    if L == 1:
        return None
    counts = recv_from_rank.to(torch.int64)
    final_start = (torch.cumsum(counts, 0) - counts).view(N, L).t().reshape(-1)
    leg_counts = counts.view(N, L).t().reshape(-1)
    leg_end = torch.cumsum(leg_counts, 0)
    return leg_end - leg_counts, leg_end, final_start


def _word_size(*tensors: torch.Tensor) -> int:
    """The widest word (16, 8, 4, 2 or 1 bytes) that tiles the rows of every contiguous 2-D tensor."""
    if any(t.numel() == 0 for t in tensors):
        return 1
    for size in (16, 8, 4, 2):
        if all(t.shape[1] * t.element_size() % size == 0 and t.stride(0) * t.element_size() % size == 0 and
               t.data_ptr() % size == 0 for t in tensors):
            return size
    return 1


# complex128 is torch's only 16-byte element type; it is only moved here, never computed on,
# so its bytes are copied exactly (the CUDA index kernels copy elements as opaque words).
_WORD_DTYPES = {16: torch.complex128, 8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _row_words(t: torch.Tensor, size: int) -> torch.Tensor:
    """A contiguous 2-D tensor's rows as `size`-byte words.

    The row permutations below are elementwise torch kernels, bound by their per-element index
    arithmetic rather than by memory: on 16-byte words they move a row with 16x fewer elements
    than on raw bytes (a 14 KB row is 896 elements instead of 14336; 1792 on 8-byte words), and
    the bytes, FP8 included, are copied exactly.
    """
    return t.view(torch.uint8).view(_WORD_DTYPES[size])


def _scatter_rows(src: Optional[torch.Tensor], order: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``out[order[i]] = src[i]`` for a contiguous 2-D tensor, on raw bytes (any dtype, FP8 included)."""
    if src is None or order is None:
        return src
    out = torch.empty_like(src)
    size = _word_size(src, out)
    _row_words(out, size).index_copy_(0, order, _row_words(src, size))
    return out


def _gather_rows(src: Optional[torch.Tensor], order: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``src[order]`` for a 2-D tensor, moved as words when it is contiguous (see _row_words)."""
    if src is None or order is None:
        return src
    if src.dim() != 2 or not src.is_contiguous():
        return src.index_select(0, order)
    out = torch.empty(order.numel(), src.shape[1], dtype=src.dtype, device=src.device)
    size = _word_size(src, out)
    torch.index_select(_row_words(src, size), 0, order, out=_row_words(out, size))
    return out


class InternodeKernelsMixin:
    """The high-throughput Buffer calls across nodes on the CUDA kernels (opt-in; module docstring)."""

    def __init__(self, group: dist.ProcessGroup, num_nvl_bytes: int, num_rdma_bytes: int, low_latency_mode: bool,
                 nvl_domain_size: int, num_qps_per_rank: int, allow_nvlink_for_low_latency_mode: bool,
                 allow_mnnvl: bool, explicitly_destroy: bool, enable_shrink: bool) -> None:
        num_ranks = dist.get_world_size(group)
        num_nodes = num_ranks // nvl_domain_size
        wanted = (num_nodes > 1 and internode_kernels_requested() and internode_kernels_available()
                  and _group_device(group).type == "cuda" and num_rdma_bytes > 0
                  and num_nvl_bytes > int(_ext.NVL_CONTROL_BYTES) and nvl_domain_size <= _MAX_NODE_RANKS
                  and num_nodes <= int(_ext.INTERNODE_MAX_NODES) and num_ranks <= _MAX_LAYOUT_RANKS)
        single_host = _single_host(group) if wanted else False
        if wanted and low_latency_mode and cuda_ll.low_latency_kernels_available():
            # The low-latency runtime initializes NVSHMEM in the base class; make its heap hold
            # both allocations (it only ever raises NVSHMEM_SYMMETRIC_SIZE).
            cuda_ll.prepare_nvshmem_environment(2 * num_rdma_bytes, single_host)
        super().__init__(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode,  # type: ignore[call-arg]
                         nvl_domain_size, num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl,
                         explicitly_destroy, enable_shrink)
        self._internode: Optional[Any] = None
        self._node_buffer: Optional[Any] = None
        self._internode_failure: Optional[str] = None
        self._internode_owns_nvshmem = False
        self._internode_row_map = os.environ.get(ROW_MAP_FLAG, "1").strip() != "0"
        if wanted:
            self._internode_timeout_s = timeout_from_env()
            self._create_internode(num_nvl_bytes, num_rdma_bytes, single_host)

    def _create_internode(self, num_nvl_bytes: int, num_rdma_bytes: int, single_host: bool) -> None:
        """Collective: the node-local NVLink buffer, then the NVSHMEM runtime of the rail legs."""
        L = self.nvl_domain_size
        node, local = divmod(self.rank, L)
        self._node_buffer = open_nvl_buffer(self.group, node * L, local, L, num_nvl_bytes, self._internode_timeout_s)

        ll_runtime = getattr(self, "_ll", None)
        if ll_runtime is not None:
            unique_id = b""  # NVSHMEM is already up (low-latency runtime): allocate from its heap
        else:
            if cuda_ll._active_runtime is not None:
                raise RuntimeError("deep_ep: NVSHMEM is already in use by another Buffer of this process; "
                                   "destroy() it before building an internode Buffer")
            cuda_ll.prepare_nvshmem_environment(num_rdma_bytes, single_host)
            ids = [_ext.InternodeRuntime.get_unique_id() if self.rank == 0 else None]
            dist.broadcast_object_list(ids, src=dist.get_global_rank(self.group, 0), group=self.group)
            unique_id = ids[0]
        self._internode = _ext.InternodeRuntime(self.rank, self.num_ranks, L, unique_id, num_rdma_bytes,
                                                self._internode_timeout_s)
        if ll_runtime is None:
            self._internode_owns_nvshmem = True
            cuda_ll._active_runtime = self._internode

    # ------------------------------------------------------------------ plumbing
    @property
    def uses_internode_kernels(self) -> bool:
        """True when layout, dispatch and combine across nodes run on the internode kernels."""
        return self._internode is not None

    def _internode_describe(self, record: Tuple[int, ...]) -> str:
        return describe_kernel_failure(record, _KERNEL_NAMES, _TARGET_NAMES, self._internode_timeout_s)

    def internode_check_errors(self) -> None:
        """Raise :class:`DeepEPTimeoutError` if a kernel of the internode path reported a failure.

        The NVLink leg's records name ranks by their index inside the node.
        """
        if self._internode_failure is not None:
            raise DeepEPTimeoutError(self._internode_failure)
        for runtime in (self._internode, self._node_buffer):
            record = runtime.get_error() if runtime is not None else None
            if record is not None:
                self._internode_failure = self._internode_describe(record)
                raise DeepEPTimeoutError(self._internode_failure)

    def destroy(self) -> None:
        if self._internode is not None:
            failed = (self._internode_failure is not None or self._internode.get_error() is not None
                      or self._node_buffer.get_error() is not None)
            if not failed:
                torch.cuda.synchronize(self.device)
            self._internode.destroy(failed)
            self._node_buffer.destroy(failed)
            if cuda_ll._active_runtime is self._internode:
                cuda_ll._active_runtime = None
            self._internode = None
            self._node_buffer = None
        super().destroy()  # type: ignore[misc]

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size], offset: int,
                                use_rdma_buffer: bool) -> torch.Tensor:
        if use_rdma_buffer or self._node_buffer is None:
            return super().get_local_buffer_tensor(dtype, size, offset, use_rdma_buffer)  # type: ignore[misc]
        return view_bytes(self._node_buffer.get_local_buffer_tensor(offset, self.num_nvl_bytes - offset), dtype, size)

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap], async_finish: bool,
                            allocate_on_comm_stream: bool):
        if self._internode is None:
            return super().get_dispatch_layout(topk_idx, num_experts, previous_event,  # type: ignore[misc]
                                               async_finish, allocate_on_comm_stream)
        self.internode_check_errors()
        with self._on_comm_stream(previous_event):  # type: ignore[attr-defined]
            num_tokens = topk_idx.shape[0]
            per_rank, per_expert, is_token_in_rank = empty_layout(num_tokens, self.num_ranks, num_experts, self.device)
            self._internode.get_dispatch_layout(topk_idx, num_experts, per_rank, per_expert, is_token_in_rank)
            per_node = is_token_in_rank.view(num_tokens, self.num_nodes, self.nvl_domain_size).any(dim=2).sum(
                dim=0, dtype=torch.int32)
        event = self._finish(async_finish, (topk_idx,),  # type: ignore[attr-defined]
                             (per_rank, per_node, per_expert, is_token_in_rank))
        return per_rank, per_node, per_expert, is_token_in_rank, event

    # ------------------------------------------------------------------ dispatch
    def _internode_wait_counts(self, num_local_experts: int) -> Tuple[int, int, List[int]]:
        ok, rows, staged, per_expert = self._internode.wait_notify(num_local_experts)
        if ok:
            return rows, staged, list(per_expert)
        self.internode_check_errors()  # a kernel recorded why
        self._internode_failure = host_wait_timeout_message(self.rank, self._internode_timeout_s, "internode_notify")
        raise DeepEPTimeoutError(self._internode_failure)

    def _row_order(self, recv_from_rank: torch.Tensor, rows: int) -> Optional[torch.Tensor]:
        """Where each row of the NVLink leg goes in the output (device ops only, no host sync).

        The NVLink leg delivers blocks ordered by (forwarding local rank l, source node n); the
        contract orders them by global source rank n * L + l.
        """
        runs = _leg_runs(recv_from_rank, self.nvl_domain_size, self.num_nodes)
        if runs is None:
            return None
        leg_start, leg_end, final_start = runs
        row = torch.arange(rows, dtype=torch.int64, device=self.device)
        block = torch.searchsorted(leg_end, row, right=True).clamp_(max=self.num_ranks - 1)
        order = row - leg_start[block] + final_start[block]
        # Padding rows (num_worst_tokens) stay where they are.
        return torch.where(row < leg_end[-1], order, row)

    def _row_segments(self, recv_from_rank: torch.Tensor) -> Optional[torch.Tensor]:
        """The row map of the NVLink leg's kernels that puts its rows in the contract's order
        (device ops only, no host sync; the same permutation as :meth:`_row_order`).

        The leg's rows from forwarding rank ``l`` come as one run per source node ``n`` (global
        source rank ``n * L + l``), in node order. Returns int32 ``[2, L * N]``: at ``l * N + n``
        the end (exclusive) of that run among the leg's rows, and what its rows move by (the
        run's first row in the contract's order minus its first row in the leg). Rows past the
        last run (padding) stay.
        """
        runs = _leg_runs(recv_from_rank, self.nvl_domain_size, self.num_nodes)
        if runs is None:
            return None
        leg_start, leg_end, final_start = runs
        return torch.stack((leg_end, final_start - leg_start)).to(torch.int32).contiguous()

    def dispatch(self, x: Union[torch.Tensor, Fp8Pair], handle: Optional[Any],
                 num_tokens_per_rank: Optional[torch.Tensor], num_tokens_per_rdma_rank: Optional[torch.Tensor],
                 is_token_in_rank: Optional[torch.Tensor], num_tokens_per_expert: Optional[torch.Tensor],
                 topk_idx: Optional[torch.Tensor], topk_weights: Optional[torch.Tensor],
                 expert_alignment: int, num_worst_tokens: int, config: Config,
                 previous_event: Optional[EventOverlap], async_finish: bool, allocate_on_comm_stream: bool):
        if self._internode is None or (handle is not None and not isinstance(handle, InternodeDispatchHandle)):
            return super().dispatch(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank,  # type: ignore[misc]
                                    is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                                    expert_alignment, num_worst_tokens, config, previous_event, async_finish,
                                    allocate_on_comm_stream)
        self.internode_check_errors()
        is_fp8, data, scales = split_dispatch_x(x)
        num_tokens, hidden = data.shape
        R, L, N = self.num_ranks, self.nvl_domain_size, self.num_nodes
        device = self.device
        cached = handle is not None

        def i32(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=torch.int32, device=device)

        with self._on_comm_stream(previous_event):  # type: ignore[attr-defined]
            per_expert_list: List[int] = []
            if cached:
                num_experts, rows, padded = handle.num_experts, handle.num_output_rows, handle.padded
                is_token_in_rank = handle.is_token_in_rank
                rail_prefix, staging_rows = handle.rail_prefix, handle.staging_rows
                forward_in_rank = handle.forward_in_rank
                intra_rank_prefix = handle.intra_rank_prefix
                # The rail leg rewrites the staging layout with the same values; scratch keeps the
                # handle's tensors read-only.
                staging_src_token = torch.empty_like(handle.staging_src_token)
                staging_forward = torch.zeros_like(handle.forward_in_rank)
            else:
                num_experts = num_tokens_per_expert.numel()
                recv_from_rank, recv_rank_prefix, rail_prefix = i32(R), i32(R + 1), i32(N + 1)
                rail_src_num_tokens, forward_counts = i32(N), i32(L)
                padded = num_worst_tokens > 0
                self._internode.notify(num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank, expert_alignment,
                                       recv_from_rank, recv_rank_prefix, rail_prefix, rail_src_num_tokens,
                                       forward_counts, not padded)
                if padded:
                    rows, num_recv = num_worst_tokens, None
                    # Every staged token reaches at least one rank of this node, each of which
                    # receives at most num_worst_tokens rows.
                    staging_rows = L * num_worst_tokens
                else:
                    num_recv, staging_rows, per_expert_list = self._internode_wait_counts(num_experts // R)
                    rows = num_recv
                staging_rows = max(staging_rows, 1)
                staging_src_token = i32(staging_rows)
                forward_in_rank = torch.zeros(staging_rows, L, dtype=torch.bool, device=device)
                staging_forward = forward_in_rank
                intra_rank_prefix, intra_src_num_tokens = i32(L + 1), i32(L)

            # Rail leg: into the staging area.
            staging_x, staging_scales, staging_topk_idx, staging_topk_weights = empty_dispatch_rows(
                staging_rows, hidden, data.dtype, scales, topk_idx, device)
            self._internode.rail_dispatch(data, scales, topk_idx, topk_weights, is_token_in_rank, rail_prefix,
                                          staging_x, staging_scales, staging_topk_idx, staging_topk_weights,
                                          staging_src_token, staging_forward, num_experts, config.num_sms,
                                          config.num_max_rdma_chunked_send_tokens,
                                          config.num_max_rdma_chunked_recv_tokens)
            if not cached:
                # Counts only: one dummy expert per rank of the node (the host never reads them).
                self._node_buffer.notify_dispatch(forward_counts, torch.zeros(L, dtype=torch.int32, device=device),
                                                  staging_rows, 1, intra_rank_prefix, intra_src_num_tokens, False,
                                                  None, None)

            # NVLink leg: the intranode kernels over the ranks of this node.
            leg_x, leg_scales, leg_topk_idx, leg_topk_weights = empty_dispatch_rows(rows, hidden, data.dtype, scales,
                                                                                    topk_idx, device)
            leg_src_idx = i32(rows)
            # Output order: source rank, then token; written so by the leg through the row map,
            # else permuted after it.
            if cached:
                row_order, row_segments = handle.row_order, handle.row_segments
            elif self._internode_row_map:
                row_order, row_segments = None, self._row_segments(recv_from_rank)
            else:
                row_order, row_segments = self._row_order(recv_from_rank, rows), None
            self._node_buffer.dispatch(staging_x, staging_scales, staging_topk_idx, staging_topk_weights,
                                       forward_in_rank, intra_rank_prefix, leg_x, leg_scales, leg_topk_idx,
                                       leg_topk_weights, leg_src_idx, num_experts // N, padded, config.num_sms,
                                       config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens,
                                       row_segments)
            recv_data = _scatter_rows(leg_x, row_order)
            recv_scales = _scatter_rows(leg_scales, row_order)
            recv_topk_idx = _scatter_rows(leg_topk_idx, row_order)
            recv_topk_weights = _scatter_rows(leg_topk_weights, row_order)
            if not cached:
                handle = InternodeDispatchHandle(num_tokens, hidden, num_experts, rows, num_recv, is_token_in_rank,
                                                 recv_from_rank, rail_prefix, rail_src_num_tokens, forward_counts,
                                                 staging_rows, staging_src_token, forward_in_rank, intra_rank_prefix,
                                                 intra_src_num_tokens, leg_src_idx, row_order, row_segments, padded)
        recv_x: Union[torch.Tensor, Fp8Pair] = (recv_data, recv_scales) if is_fp8 else recv_data
        keep = (x, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, rail_prefix,
                staging_x, staging_scales, staging_topk_idx, staging_topk_weights, staging_src_token, staging_forward,
                forward_in_rank, intra_rank_prefix, leg_x, leg_scales, leg_topk_idx, leg_topk_weights, leg_src_idx,
                row_order, row_segments)
        event = self._finish(async_finish, keep,  # type: ignore[attr-defined]
                             (recv_data, recv_scales, recv_topk_idx, recv_topk_weights))
        return dispatch_result(cached, recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, event)

    # ------------------------------------------------------------------ combine
    def combine(self, x: torch.Tensor, handle: Any, topk_weights: Optional[torch.Tensor],
                bias: Union[None, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], config: Config,
                previous_event: Optional[EventOverlap], async_finish: bool, allocate_on_comm_stream: bool):
        if self._internode is None or not isinstance(handle, InternodeDispatchHandle):
            return super().combine(x, handle, topk_weights, bias, config, previous_event,  # type: ignore[misc]
                                   async_finish, allocate_on_comm_stream)
        self.internode_check_errors()
        bias0, bias1 = split_bias(bias)
        device = self.device
        hidden = x.shape[1]
        with self._on_comm_stream(previous_event):  # type: ignore[attr-defined]
            order = handle.row_order
            # With the row map (or one node rank) the leg reads x in the contract's order itself.
            leg_x = _gather_rows(x, order) if order is not None else x.contiguous()
            leg_weights = (_gather_rows(topk_weights, order) if order is not None or topk_weights is None
                           else topk_weights.contiguous())
            # NVLink leg: each staged token's rows from the ranks of this node, summed (fp32, one rounding).
            partial, partial_weights = empty_combine_rows(handle.staging_rows, hidden, topk_weights, device)
            self._node_buffer.combine(leg_x, leg_weights, None, None, handle.forward_in_rank, handle.intra_src_idx,
                                      handle.intra_rank_prefix, handle.intra_src_num_tokens, partial, partial_weights,
                                      config.num_sms, config.num_max_nvl_chunked_send_tokens,
                                      config.num_max_nvl_chunked_recv_tokens, handle.row_segments)
            # Rail leg: one partial row per (token, node) home, summed there with the biases.
            combined_x, combined_weights = empty_combine_rows(handle.num_tokens, hidden, topk_weights, device)
            self._internode.rail_combine(partial, partial_weights, handle.rail_prefix, handle.rail_src_num_tokens,
                                         handle.staging_src_token, handle.is_token_in_rank, bias0, bias1, combined_x,
                                         combined_weights, config.num_sms, config.num_max_rdma_chunked_send_tokens,
                                         config.num_max_rdma_chunked_recv_tokens)
        keep = (x, topk_weights, bias0, bias1, leg_x, leg_weights, partial, partial_weights, handle.forward_in_rank,
                handle.intra_src_idx, handle.intra_rank_prefix, handle.intra_src_num_tokens, handle.rail_prefix,
                handle.rail_src_num_tokens, handle.staging_src_token, handle.is_token_in_rank, order,
                handle.row_segments)
        event = self._finish(async_finish, keep, (combined_x, combined_weights))  # type: ignore[attr-defined]
        return combined_x, combined_weights, event
