"""The portable backend: every Buffer call on ``torch.distributed`` collectives.

It runs on CPU (gloo) and on any GPU (NCCL), is the correctness oracle of the CUDA kernels and
their fallback. Arguments arrive already validated by :class:`deep_ep.Buffer`.

Data movement: every per-token payload (hidden data, FP8 scales, top-k ids and weights, ...) is
packed into one ``uint8`` row, so one ``all_to_all_single`` with per-rank splits moves it all,
whatever the dtypes (gloo has no bf16/fp8 collectives; bytes always travel).

Differences from the kernels, by nature of collectives: the host learns the counts before it
launches the data exchange, so every call synchronizes the host once (also with
``num_worst_tokens``), and nothing here can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from .config import Config
from .utils import (EventHandle, EventOverlap, dispatch_result, per_token_cast_to_fp8, split_dispatch_x,
                    tensors_alive)

Fp8Pair = Tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Handles
# ----------------------------------------------------------------------------------------------
@dataclass
class TorchDispatchHandle:
    """Layout of one high-throughput dispatch, reused by combine and by cached dispatch.

    ``send_token_idx`` lists, destination rank by destination rank, the local tokens sent there
    (ascending); the rows received from rank ``r`` are the ``recv_counts[r]`` rows after
    ``sum(recv_counts[:r])``.
    """

    num_tokens: int
    hidden: int
    is_token_in_rank: torch.Tensor
    send_token_idx: torch.Tensor
    send_counts: List[int]
    recv_counts: List[int]
    num_recv_tokens: int
    num_output_rows: int


@dataclass
class TorchLowLatencyHandle:
    """Layout of one low-latency dispatch.

    Sender side: ``send_token``/``send_topk`` are the (token, top-k slot) pairs sent, in send
    order (destination rank, token, slot). Receiver side: received row ``i`` was placed at
    ``(recv_expert[i], recv_pos[i])``; ``src_info[e, p]`` is the source token index of that row and
    ``src_rank[e, p]`` its source rank (-1 past ``recv_count[e]``).
    """

    num_tokens: int
    hidden: int
    num_experts: int
    num_max_dispatch_tokens_per_rank: int
    buffer_idx: int
    send_token: torch.Tensor
    send_topk: torch.Tensor
    send_counts: List[int]
    recv_counts: List[int]
    recv_expert: torch.Tensor
    recv_pos: torch.Tensor
    src_info: torch.Tensor
    src_rank: torch.Tensor
    recv_count: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Byte packing
# ----------------------------------------------------------------------------------------------
def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``[N, ...]`` tensor -> ``[N, nbytes_per_row]`` uint8 view (copying only if not contiguous)."""
    t = t.contiguous()
    width = t.element_size() * (t[0].numel() if t.shape[0] > 0 else int(torch.Size(t.shape[1:]).numel()))
    return t.view(torch.uint8).reshape(t.shape[0], width)


def _pack_rows(parts: Sequence[torch.Tensor], rows: Optional[torch.Tensor]) -> Tuple[torch.Tensor, List[int]]:
    """Gather ``rows`` (all rows when None) of each part and lay them side by side as bytes.
    Returns the packed ``[num_rows, total]`` uint8 tensor and each part's byte width."""
    # Gather in each part's own dtype (wide elements: far faster than a byte-wise gather).
    gathered = [p if rows is None else p.index_select(0, rows) for p in parts]
    byte_parts = [_as_bytes(p) for p in gathered]
    widths = [p.shape[1] for p in byte_parts]
    packed = torch.cat(byte_parts, dim=1) if len(byte_parts) > 1 else byte_parts[0]
    return packed.contiguous(), widths


def _unpack_rows(packed: torch.Tensor, widths: Sequence[int]) -> List[torch.Tensor]:
    if len(widths) == 1:
        return [packed]
    out, offset = [], 0
    for w in widths:
        # A fresh dense copy: a column slice (even a one-row one) keeps the packed row stride,
        # which a later view as a wider dtype would reject.
        out.append(torch.empty((packed.shape[0], w), dtype=torch.uint8, device=packed.device)
                   .copy_(packed[:, offset:offset + w]))
        offset += w
    return out


def _from_bytes(b: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    if b.dim() == 2 and b.shape[0] > 0 and b.stride() != (b.shape[1], 1):
        b = torch.empty(b.shape, dtype=torch.uint8, device=b.device).copy_(b)
    return b.contiguous().view(dtype).reshape(*shape)


class TorchBackend:
    """Every Buffer call implemented with ``torch.distributed`` collectives (gloo or NCCL)."""

    name = "torch"

    def __init__(self, group: dist.ProcessGroup, num_nvl_bytes: int, num_rdma_bytes: int,
                 low_latency_mode: bool, nvl_domain_size: int, num_qps_per_rank: int,
                 allow_nvlink_for_low_latency_mode: bool, allow_mnnvl: bool,
                 explicitly_destroy: bool, enable_shrink: bool) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.nvl_domain_size = nvl_domain_size
        self.num_nodes = self.num_ranks // nvl_domain_size
        self.enable_shrink = enable_shrink
        self.device = _group_device(group)
        self.comm_stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self._local_buffers: dict = {}
        self._ll_buffer_idx = 0
        self._ll_combine_buffers: List[Optional[torch.Tensor]] = [None, None]
        self._mask = torch.zeros(self.num_ranks, dtype=torch.int32, device=self.device)

    # ------------------------------------------------------------------ plumbing
    def destroy(self) -> None:
        self._local_buffers.clear()
        self._ll_combine_buffers = [None, None]

    def get_comm_stream(self) -> Optional["torch.cuda.Stream"]:
        return self.comm_stream

    def checks_dispatch_values_on_device(self) -> bool:
        """Whether a non-cached ``dispatch`` without ``num_worst_tokens`` checks its layout values
        itself (reporting them with the receive counts), so that ``Buffer`` need not sync for them."""
        return False

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size], offset: int,
                                use_rdma_buffer: bool) -> torch.Tensor:
        total = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
        key = "rdma" if use_rdma_buffer else "nvl"
        if key not in self._local_buffers:
            self._local_buffers[key] = torch.empty(total, dtype=torch.uint8, device=self.device)
        return view_bytes(self._local_buffers[key][offset:], dtype, size)

    @contextlib.contextmanager
    def _on_comm_stream(self, previous_event: Optional[EventOverlap]):
        """Run the body on the comm stream, after ``previous_event`` (else the current stream)."""
        if self.comm_stream is None:
            yield
            return
        compute = torch.cuda.current_stream(self.device)
        if previous_event is not None and previous_event.event is not None:
            previous_event.stream_wait(self.comm_stream)
        else:
            self.comm_stream.wait_stream(compute)
        with torch.cuda.stream(self.comm_stream):
            yield

    def _finish(self, async_finish: bool, inputs: Sequence[Any], outputs: Sequence[Any]) -> EventOverlap:
        """Close a call per the stream rules: tensors stay alive for the stream that uses them;
        the current stream waits, or an event is returned with ``async_finish``."""
        if self.comm_stream is None:
            return EventOverlap(None)
        compute = torch.cuda.current_stream(self.device)
        for t in tensors_alive(*inputs):
            if t.is_cuda:
                t.record_stream(self.comm_stream)
        for t in tensors_alive(*outputs):
            if t.is_cuda:
                t.record_stream(compute)
        event = EventHandle(self.comm_stream)
        if async_finish:
            return EventOverlap(event, extra_tensors=tensors_alive(*inputs, *outputs))
        event.current_stream_wait()
        return EventOverlap(None)

    def _all_to_all(self, send: torch.Tensor, send_counts: List[int], recv_counts: List[int],
                    async_op: bool = False):
        recv = torch.empty((sum(recv_counts),) + tuple(send.shape[1:]), dtype=send.dtype, device=send.device)
        work = dist.all_to_all_single(recv, send, recv_counts, send_counts, group=self.group, async_op=async_op)
        return (recv, work) if async_op else recv

    def _exchange_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """``counts`` ``[num_ranks * k]`` (k values per destination) -> what every source sent us."""
        counts = counts.to(torch.int64).contiguous()
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        return recv

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap], async_finish: bool,
                            allocate_on_comm_stream: bool):
        with self._on_comm_stream(previous_event):
            layout = compute_dispatch_layout(topk_idx, num_experts, self.num_ranks, self.nvl_domain_size)
        event = self._finish(async_finish, (topk_idx,), layout)
        return (*layout, event)

    # ------------------------------------------------------------------ high-throughput
    def dispatch(self, x: Union[torch.Tensor, Fp8Pair], handle: Optional[TorchDispatchHandle],
                 num_tokens_per_rank: Optional[torch.Tensor], num_tokens_per_rdma_rank: Optional[torch.Tensor],
                 is_token_in_rank: Optional[torch.Tensor], num_tokens_per_expert: Optional[torch.Tensor],
                 topk_idx: Optional[torch.Tensor], topk_weights: Optional[torch.Tensor],
                 expert_alignment: int, num_worst_tokens: int, config: Config,
                 previous_event: Optional[EventOverlap], async_finish: bool, allocate_on_comm_stream: bool):
        is_fp8, data, scales = split_dispatch_x(x)
        num_tokens, hidden = data.shape
        cached = handle is not None
        with self._on_comm_stream(previous_event):
            per_expert_list: List[int] = []
            if handle is None:
                send_rank, send_token_idx = is_token_in_rank.t().nonzero(as_tuple=True)
                send_counts_t = torch.bincount(send_rank, minlength=self.num_ranks)
                recv_counts_t = self._exchange_counts(send_counts_t)
                num_local_experts = num_tokens_per_expert.numel() // self.num_ranks
                recv_per_expert = self._exchange_counts(num_tokens_per_expert)
                counts = torch.cat([send_counts_t, recv_counts_t,
                                    recv_per_expert.view(self.num_ranks, num_local_experts).sum(0)]).tolist()
                send_counts = counts[:self.num_ranks]
                recv_counts = counts[self.num_ranks:2 * self.num_ranks]
                if num_worst_tokens == 0:
                    per_expert_list = [(c + expert_alignment - 1) // expert_alignment * expert_alignment
                                       for c in counts[2 * self.num_ranks:]]
                num_recv = sum(recv_counts)
                if num_worst_tokens > 0:
                    self._check_worst_tokens(num_recv, num_worst_tokens)
                handle = TorchDispatchHandle(num_tokens, hidden, is_token_in_rank, send_token_idx,
                                             send_counts, recv_counts, num_recv,
                                             num_worst_tokens if num_worst_tokens > 0 else num_recv)
            parts = [data] + ([scales.contiguous()] if is_fp8 else [])
            with_topk = topk_idx is not None
            if with_topk:
                parts += [topk_idx.contiguous(), topk_weights.contiguous()]
            packed, widths = _pack_rows(parts, handle.send_token_idx)
            received = _unpack_rows(self._all_to_all(packed, handle.send_counts, handle.recv_counts), widths)
            rows, num_recv = handle.num_output_rows, handle.num_recv_tokens

            def padded(t: torch.Tensor, fill: float) -> torch.Tensor:
                if rows == num_recv:
                    return t
                out = torch.full((rows,) + tuple(t.shape[1:]), fill, dtype=t.dtype, device=t.device)
                out[:num_recv] = t
                return out

            recv_data = padded(_from_bytes(received[0], data.dtype, (num_recv, hidden)), 0)
            recv_x: Union[torch.Tensor, Fp8Pair] = recv_data
            if is_fp8:
                num_scales = scales.shape[1]
                recv_x = (recv_data, padded(_from_bytes(received[1], torch.float32, (num_recv, num_scales)), 0))
            recv_topk_idx = recv_topk_weights = None
            if with_topk:
                k = topk_idx.shape[1]
                global_idx = _from_bytes(received[-2], torch.int64, (num_recv, k))
                weights = _from_bytes(received[-1], torch.float32, (num_recv, k))
                recv_topk_idx, recv_topk_weights = _remap_topk(global_idx, weights, self.rank, num_local_experts)
                recv_topk_idx, recv_topk_weights = padded(recv_topk_idx, -1), padded(recv_topk_weights, 0)
        event = self._finish(async_finish, (x, topk_idx, topk_weights, is_token_in_rank),
                             (recv_x, recv_topk_idx, recv_topk_weights))
        return dispatch_result(cached, recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, event)

    def _check_worst_tokens(self, num_recv: int, num_worst_tokens: int) -> None:
        """Every rank learns every rank's receive count, so that all of them raise together
        (one rank leaving the exchange alone would break the collectives of the others)."""
        counts = torch.zeros(self.num_ranks, dtype=torch.int64, device=self.device)
        counts[self.rank] = num_recv
        dist.all_reduce(counts, group=self.group)
        over = [(r, c) for r, c in enumerate(counts.tolist()) if c > num_worst_tokens]
        if over:
            detail = ", ".join(f"rank {r} receives {c}" for r, c in over)
            raise ValueError(f"dispatch: num_worst_tokens={num_worst_tokens} is too small ({detail})")

    def combine(self, x: torch.Tensor, handle: TorchDispatchHandle, topk_weights: Optional[torch.Tensor],
                bias: Union[None, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], config: Config,
                previous_event: Optional[EventOverlap], async_finish: bool, allocate_on_comm_stream: bool):
        hidden = x.shape[1]
        with self._on_comm_stream(previous_event):
            num_recv = handle.num_recv_tokens
            parts = [x[:num_recv]]
            if topk_weights is not None:
                parts.append(topk_weights[:num_recv])
            packed, widths = _pack_rows(parts, None)
            back = _unpack_rows(self._all_to_all(packed, handle.recv_counts, handle.send_counts), widths)
            num_back = len(handle.send_token_idx)
            acc = torch.zeros(handle.num_tokens, hidden, dtype=torch.float32, device=x.device)
            acc.index_add_(0, handle.send_token_idx, _from_bytes(back[0], x.dtype, (num_back, hidden)).float())
            for b in (bias if isinstance(bias, tuple) else (bias,)):
                if b is not None:
                    acc += b.float()
            combined_x = acc.to(torch.bfloat16)
            combined_weights = None
            if topk_weights is not None:
                k = topk_weights.shape[1]
                combined_weights = torch.zeros(handle.num_tokens, k, dtype=torch.float32, device=x.device)
                combined_weights.index_add_(0, handle.send_token_idx,
                                            _from_bytes(back[1], torch.float32, (num_back, k)))
        event = self._finish(async_finish, (x, topk_weights, bias), (combined_x, combined_weights))
        return combined_x, combined_weights, event

    # ------------------------------------------------------------------ low-latency
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        # Collectives carry no state between calls: nothing to clean. Keep the ranks in step,
        # as the kernel version (a barrier) does.
        dist.barrier(group=self.group)

    def _next_ll_buffer(self) -> int:
        idx = self._ll_buffer_idx
        self._ll_buffer_idx ^= 1
        return idx

    def _ll_combine_buffer(self, idx: int, shape: Tuple[int, int, int]) -> torch.Tensor:
        buf = self._ll_combine_buffers[idx]
        if buf is None or tuple(buf.shape) != shape:
            buf = torch.empty(shape, dtype=torch.bfloat16, device=self.device)
            self._ll_combine_buffers[idx] = buf
        return buf

    def get_next_low_latency_combine_buffer(self, handle: TorchLowLatencyHandle) -> torch.Tensor:
        num_local_experts = handle.num_experts // self.num_ranks
        return self._ll_combine_buffer(handle.buffer_idx, (num_local_experts,
                                                           self.num_ranks * handle.num_max_dispatch_tokens_per_rank,
                                                           handle.hidden))

    def _masked_topk(self, topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
        """Drop the top-k entries that point at masked ranks (shrink mode)."""
        if not self.enable_shrink:
            return topk_idx
        num_local = num_experts // self.num_ranks
        dest = topk_idx.clamp(min=0) // num_local
        dead = self._mask.to(torch.bool)[dest] & (topk_idx >= 0)
        return topk_idx.masked_fill(dead, -1)

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor],
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor], use_fp8: bool,
                             round_scale: bool, use_ue8m0: bool, async_finish: bool, return_recv_hook: bool):
        num_tokens, hidden = x.shape
        num_ranks = self.num_ranks
        num_local = num_experts // num_ranks
        num_slots = num_ranks * num_max_dispatch_tokens_per_rank
        buffer_idx = self._next_ll_buffer()
        with self._on_comm_stream(None):
            topk = self._masked_topk(topk_idx, num_experts)
            token, slot = (topk >= 0).nonzero(as_tuple=True)
            expert = topk[token, slot]
            dest = expert // num_local
            order = torch.sort(dest, stable=True).indices
            token, slot, expert, dest = token[order], slot[order], expert[order], dest[order]
            send_per_expert = torch.bincount(expert, minlength=num_experts)
            recv_per_expert = self._exchange_counts(send_per_expert).view(num_ranks, num_local)
            send_counts_t = send_per_expert.view(num_ranks, num_local).sum(1)
            counts = torch.cat([send_counts_t, recv_per_expert.sum(1)]).tolist()
            send_counts, recv_counts = counts[:num_ranks], counts[num_ranks:]

            if use_fp8:
                data, scales = per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
                parts = [data, scales]
            else:
                parts = [x]
            meta = (expert % num_local).to(torch.int32).unsqueeze(1)
            token_bytes, widths = _pack_rows(parts, token)
            packed = torch.cat([token_bytes, _as_bytes(meta), _as_bytes(token.to(torch.int32).unsqueeze(1))], 1)
            received, work = self._all_to_all(packed, send_counts, recv_counts, async_op=True)

            # Rows past recv_count are unspecified (as with the kernels): no fill of the whole area.
            recv_data = torch.empty((num_local, num_slots, hidden),
                                    dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16, device=x.device)
            recv_scales = None
            if use_fp8:
                recv_scales = torch.empty((num_local, num_slots) + tuple(parts[1].shape[1:]),
                                          dtype=parts[1].dtype, device=x.device)
            recv_count = recv_per_expert.sum(0).to(torch.int32)
            src_info = torch.full((num_local, num_slots), -1, dtype=torch.int32, device=x.device)
            src_rank = torch.full_like(src_info, -1)
            handle = TorchLowLatencyHandle(num_tokens, hidden, num_experts, num_max_dispatch_tokens_per_rank,
                                           buffer_idx, token, slot, send_counts, recv_counts, None, None,
                                           src_info, src_rank, recv_count)
            data_width = sum(widths)

            def receive() -> None:
                start = time.perf_counter_ns()
                work.wait()
                waited = time.perf_counter_ns() - start
                rows = received.shape[0]
                local_expert = _from_bytes(received[:, data_width:data_width + 4], torch.int32, (rows,)).long()
                src_token = _from_bytes(received[:, data_width + 4:data_width + 8], torch.int32, (rows,))
                source = torch.repeat_interleave(torch.arange(num_ranks, device=x.device),
                                                 torch.tensor(recv_counts, device=x.device))
                by_expert = torch.sort(local_expert, stable=True).indices
                starts = torch.cumsum(recv_count.long(), 0) - recv_count.long()
                pos = torch.empty_like(local_expert)
                pos[by_expert] = torch.arange(rows, device=x.device) - starts[local_expert[by_expert]]
                payload = _unpack_rows(received[:, :data_width], widths)
                recv_data[local_expert, pos] = _from_bytes(payload[0], recv_data.dtype, (rows, hidden))
                if use_fp8:
                    recv_scales[local_expert, pos] = _from_bytes(payload[1], recv_scales.dtype,
                                                                 (rows,) + tuple(recv_scales.shape[2:]))
                src_info[local_expert, pos] = src_token
                src_rank[local_expert, pos] = source.to(torch.int32)
                handle.recv_expert, handle.recv_pos = local_expert, pos
                if cumulative_local_expert_recv_stats is not None:
                    cumulative_local_expert_recv_stats.add_(recv_count)
                if dispatch_wait_recv_cost_stats is not None:
                    # Collectives cannot tell which source arrived last: charge the wait to every
                    # source that sent us something.
                    dispatch_wait_recv_cost_stats.add_((torch.tensor(recv_counts, device=x.device) > 0).to(torch.int64) * waited)

        recv_x = (recv_data, recv_scales) if use_fp8 else recv_data
        return self._finish_low_latency(receive, async_finish, return_recv_hook, (x, topk_idx),
                                        (recv_data, recv_scales, recv_count),
                                        lambda event, hook: (recv_x, recv_count, handle, event, hook))

    def _finish_low_latency(self, receive: Callable[[], None], async_finish: bool, return_recv_hook: bool,
                            inputs: Sequence[Any], outputs: Sequence[Any], result: Callable):
        """Either complete the receive now, or hand it to the caller as the hook."""
        if return_recv_hook:
            def hook() -> None:
                with self._on_comm_stream(None):
                    receive()
                self._finish(False, inputs, outputs)
            return result(EventOverlap(None), hook)
        with self._on_comm_stream(None):
            receive()
        return result(self._finish(async_finish, inputs, outputs), None)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: TorchLowLatencyHandle, use_logfmt: bool, zero_copy: bool,
                            async_finish: bool, return_recv_hook: bool, out: Optional[torch.Tensor],
                            combine_wait_recv_cost_stats: Optional[torch.Tensor]):
        # use_logfmt: this backend always moves bf16 rows (the documented fallback).
        if zero_copy:
            x = self.get_next_low_latency_combine_buffer(handle)
        hidden = handle.hidden
        with self._on_comm_stream(None):
            rows = x[handle.recv_expert, handle.recv_pos]
            back, work = self._all_to_all(_as_bytes(rows), handle.recv_counts, handle.send_counts, async_op=True)
            combined = out if out is not None else torch.empty(handle.num_tokens, hidden, dtype=torch.bfloat16,
                                                               device=x.device)

            def receive() -> None:
                start = time.perf_counter_ns()
                work.wait()
                waited = time.perf_counter_ns() - start
                values = _from_bytes(back, torch.bfloat16, (back.shape[0], hidden)).float()
                weights = topk_weights[handle.send_token, handle.send_topk].float().unsqueeze(1)
                acc = torch.zeros(handle.num_tokens, hidden, dtype=torch.float32, device=x.device)
                acc.index_add_(0, handle.send_token, values * weights)
                combined.copy_(acc)
                if combine_wait_recv_cost_stats is not None:
                    combine_wait_recv_cost_stats.add_((torch.tensor(handle.send_counts, device=x.device) > 0
                                                     ).to(torch.int64) * waited)

        return self._finish_low_latency(receive, async_finish, return_recv_hook, (x, topk_idx, topk_weights),
                                        (combined,), lambda event, hook: (combined, event, hook))

    # ------------------------------------------------------------------ shrink mode
    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool) -> None:
        self._mask[rank_to_mask] = 1 if mask else 0

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        mask_status.copy_(self._mask.to(mask_status.device))

    def low_latency_clean_mask_buffer(self) -> None:
        self._mask.zero_()


# ----------------------------------------------------------------------------------------------
# Pure functions (shared with the CUDA backend's fallbacks and the tests' expectations)
# ----------------------------------------------------------------------------------------------
def compute_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int,
                            nvl_domain_size: int) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-rank, per-node and per-expert token counts and the token-to-rank map of ``topk_idx``."""
    num_tokens = topk_idx.shape[0]
    num_local = num_experts // num_ranks
    valid = topk_idx >= 0
    per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).to(torch.int32)
    dest = torch.where(valid, topk_idx // num_local, num_ranks)
    is_token_in_rank = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=topk_idx.device)
    is_token_in_rank.scatter_(1, dest, True)
    is_token_in_rank = is_token_in_rank[:, :num_ranks].contiguous()
    per_rank = is_token_in_rank.sum(0).to(torch.int32)
    per_rdma_rank = None
    num_nodes = num_ranks // nvl_domain_size
    if num_nodes > 1:
        in_node = is_token_in_rank.view(num_tokens, num_nodes, nvl_domain_size).any(-1)
        per_rdma_rank = in_node.sum(0).to(torch.int32)
    return per_rank, per_rdma_rank, per_expert, is_token_in_rank


def view_bytes(raw: torch.Tensor, dtype: torch.dtype, size: Optional[torch.Size]) -> torch.Tensor:
    """View a uint8 buffer as ``dtype``: the whole of it (whole elements), or its first ``size``."""
    element_size = torch.empty((), dtype=dtype).element_size()
    usable = raw[: raw.numel() // element_size * element_size].view(dtype)
    if size is None:
        return usable
    return usable[: int(torch.Size(size).numel())].view(size)


def _remap_topk(global_idx: torch.Tensor, weights: torch.Tensor, rank: int,
                num_local_experts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Global expert ids -> this rank's local ids (-1 elsewhere); weights zeroed where -1."""
    lo = rank * num_local_experts
    here = (global_idx >= lo) & (global_idx < lo + num_local_experts)
    local = torch.where(here, global_idx - lo, torch.full_like(global_idx, -1))
    return local, torch.where(here, weights, torch.zeros_like(weights))


def _group_device(group: dist.ProcessGroup) -> torch.device:
    """CPU for gloo groups, the current CUDA device for NCCL groups."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
