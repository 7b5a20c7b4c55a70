"""Events, errors, FP8 cast helpers and routing helpers shared by every backend."""

from __future__ import annotations

import os
from typing import Any, Iterable, List, Optional, Tuple

import torch

FP8_E4M3_MAX = 448.0
FP8_AMAX_FLOOR = 1e-4
FP8_GROUP = 128


class DeepEPTimeoutError(RuntimeError):
    """Raised when a communication call waited longer than the configured timeout.

    The message names the rank, the kernel (or collective) and what it waited for. After a
    timeout the buffer's internal counters are no longer consistent; the buffer is marked failed
    and later calls on it raise at once.
    """


DEFAULT_TIMEOUT_S = 100.0


def timeout_from_env() -> float:
    """The bound of every kernel wait, in seconds: ``DEEP_EP_TIMEOUT_S``, default 100."""
    value = os.environ.get("DEEP_EP_TIMEOUT_S", "").strip()
    if value == "":
        return DEFAULT_TIMEOUT_S
    try:
        timeout = float(value)
    except ValueError:
        raise ValueError(f"DEEP_EP_TIMEOUT_S must be a number of seconds, got {value!r}") from None
    if timeout <= 0:
        raise ValueError(f"DEEP_EP_TIMEOUT_S must be positive, got {value!r}")
    return timeout


KERNEL_ERROR_OVERFLOW = 2  # codes of csrc/kernels/exception.cuh: 1 = timeout, 2 = overflow

# The barrier of csrc/kernels/buffer.cuh (barrier_block): wait target 1; each arrival adds
# kBarrierTag to the arriving rank's own slot for every peer, and each peer's arrival takes it off.
WAIT_BARRIER = 1
BARRIER_TAG = 1 << 20

# Names of the wait targets of csrc/kernels/exception.cuh (the intranode kernels; the internode
# path adds its own after them).
INTRANODE_TARGET_NAMES = {
    1: "a barrier arrival",
    2: "ring data (the sender's tail)",
    3: "free ring slots (the receiver's head)",
    4: "the sender's token count of a ring",
    5: "the receiver's end-of-call acknowledgement",
    6: "room in the output (num_worst_tokens too small)",
}


def describe_kernel_failure(record: Tuple[int, ...], kernel_names: dict, target_names: dict,
                            timeout_s: float) -> str:
    """The message of a kernel's error record ``(code, kernel, rank, peer, target, channel, seen,
    expected)``, naming the rank, the kernel and what it waited for."""
    code, kernel, rank, peer, target, channel, seen, expected = record
    kernel_name = kernel_names.get(kernel, f"kernel {kernel}")
    target_name = target_names.get(target, f"target {target}")
    where = f"channel {channel}, " if channel >= 0 else ""
    if code == KERNEL_ERROR_OVERFLOW:
        return (f"deep_ep: rank {rank}: {kernel_name}: {target_name}: row {seen} needed, {expected} rows "
                f"allocated (from rank {peer}); the buffer is now unusable")
    if target == WAIT_BARRIER and seen > 0 and seen % BARRIER_TAG == 0:
        # The rank's own slot for that peer holds one tag per arrival the peer has not matched.
        state = f"{where}it is {seen // BARRIER_TAG} barrier(s) behind"
    else:
        state = f"{where}last value {seen}, expected {expected}"
    return (f"deep_ep: rank {rank}: {kernel_name} timed out after {timeout_s:g} s waiting for {target_name} "
            f"from rank {peer} ({state}); the buffer is now unusable")


class EventHandle:
    """A CUDA event recorded on a stream (the current stream by default).

    Args:
        stream: the stream to record on; ``None`` means the current stream.
    """

    def __init__(self, stream: Optional["torch.cuda.Stream"] = None) -> None:
        self.event = torch.cuda.Event()
        self.event.record(stream if stream is not None else torch.cuda.current_stream())

    def current_stream_wait(self) -> None:
        """Make the current CUDA stream wait until the event has completed."""
        torch.cuda.current_stream().wait_event(self.event)

    def stream_wait(self, stream: "torch.cuda.Stream") -> None:
        """Make ``stream`` wait until the event has completed."""
        stream.wait_event(self.event)

    def synchronize(self) -> None:
        """Block the host until the event has completed."""
        self.event.synchronize()


class EventOverlap:
    """A handle on communication that may still be running, for overlapping it with compute.

    Args:
        event: the event that marks the end of the communication (``None``: already complete,
            as on CPU or with ``async_finish=False``).
        extra_tensors: tensors kept alive until the event is waited on.

    Use ``current_stream_wait()``, or the object as a context manager: the body of the ``with``
    block runs while the communication proceeds, and the current stream waits for it on exit.
    """

    def __init__(self, event: Optional[Any] = None, extra_tensors: Optional[Tuple[Any, ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the communication to finish."""
        if self.event is not None:
            self.event.current_stream_wait()

    def stream_wait(self, stream: Any) -> None:
        """Make ``stream`` wait for the communication to finish (no-op when already complete)."""
        if self.event is None:
            return
        if hasattr(self.event, "stream_wait"):
            self.event.stream_wait(stream)
        else:  # an extension EventHandle: switch to the stream and wait there
            with torch.cuda.stream(stream):
                self.event.current_stream_wait()

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self.current_stream_wait()


def check_topk_range(name: str, topk_idx: torch.Tensor, num_experts: int) -> None:
    """Raise ``ValueError`` unless every value of ``topk_idx`` lies in ``[-1, num_experts)``.

    Reads the tensor's minimum and maximum back to the host (a sync); callers skip it inside
    CUDA-graph capture, where the kernels drop out-of-range ids instead of writing out of bounds.
    """
    if topk_idx.numel() == 0:
        return
    lo, hi = int(topk_idx.min()), int(topk_idx.max())
    if lo < -1 or hi >= num_experts:
        raise ValueError(f"{name} values must lie in [-1, {num_experts}), got min {lo}, max {hi}")


def raise_layout_value_errors(bad_range: bool, bad_counts: bool, topk_idx: Optional[torch.Tensor],
                              num_experts: int) -> None:
    """Turn the outcome of dispatch's value checks (on the host or the device) into the error."""
    if bad_range and topk_idx is not None:
        check_topk_range("topk_idx", topk_idx, num_experts)  # raises, naming the offending values
    if bad_range:
        raise ValueError(f"topk_idx values must lie in [-1, {num_experts})")
    if bad_counts:
        raise ValueError("num_tokens_per_rank does not match is_token_in_rank (column sums)")


# ----------------------------------------------------------------------------------------------
# Glue of the high-throughput backends (argument unpacking, output allocation, results)
# ----------------------------------------------------------------------------------------------
def split_dispatch_x(x: Any) -> Tuple[bool, torch.Tensor, Optional[torch.Tensor]]:
    """A dispatch's ``x`` (a tensor, or an FP8 ``(data, scales)`` pair) as ``(is_fp8, data, scales)``,
    ``scales`` being ``None`` without FP8."""
    is_fp8 = isinstance(x, tuple)
    return is_fp8, (x[0] if is_fp8 else x), (x[1] if is_fp8 else None)


def split_bias(bias: Any) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """A combine's ``bias`` (``None``, a tensor, or a pair of tensors) as a pair (``None`` where absent)."""
    return bias if isinstance(bias, tuple) else (bias, None)


def empty_layout(num_tokens: int, num_ranks: int, num_experts: int,
                 device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The outputs of a layout kernel: int32 tokens per rank ``[num_ranks]``, int32 tokens per
    expert ``[num_experts]`` and bool ``is_token_in_rank`` ``[num_tokens, num_ranks]``."""
    per_rank = torch.empty(num_ranks, dtype=torch.int32, device=device)
    per_expert = torch.empty(num_experts, dtype=torch.int32, device=device)
    is_token_in_rank = torch.empty(num_tokens, num_ranks, dtype=torch.bool, device=device)
    return per_rank, per_expert, is_token_in_rank


def empty_dispatch_rows(rows: int, hidden: int, dtype: torch.dtype, scales: Optional[torch.Tensor],
                        topk_idx: Optional[torch.Tensor], device: torch.device) -> Tuple[
                            torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The rows a dispatch kernel writes: data ``[rows, hidden]`` of ``dtype``, fp32 FP8 scales
    ``[rows, scales.shape[1]]`` (``None`` without ``scales``), int64 top-k ids and fp32 top-k
    weights ``[rows, topk_idx.shape[1]]`` (both ``None`` without ``topk_idx``)."""
    data = torch.empty(rows, hidden, dtype=dtype, device=device)
    out_scales = (torch.empty(rows, scales.shape[1], dtype=torch.float32, device=device)
                  if scales is not None else None)
    out_topk_idx = out_topk_weights = None
    if topk_idx is not None:
        out_topk_idx = torch.empty(rows, topk_idx.shape[1], dtype=torch.int64, device=device)
        out_topk_weights = torch.empty(rows, topk_idx.shape[1], dtype=torch.float32, device=device)
    return data, out_scales, out_topk_idx, out_topk_weights


def empty_combine_rows(rows: int, hidden: int, topk_weights: Optional[torch.Tensor],
                       device: torch.device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The rows a combine kernel writes: bf16 ``[rows, hidden]`` and fp32 top-k weights
    ``[rows, topk_weights.shape[1]]`` (``None`` without ``topk_weights``)."""
    combined_x = torch.empty(rows, hidden, dtype=torch.bfloat16, device=device)
    combined_weights = None
    if topk_weights is not None:
        combined_weights = torch.empty(rows, topk_weights.shape[1], dtype=torch.float32, device=device)
    return combined_x, combined_weights


def dispatch_result(cached: bool, recv_x: Any, recv_topk_idx: Optional[torch.Tensor],
                    recv_topk_weights: Optional[torch.Tensor], per_expert_list: List[int], handle: Any,
                    event: Any) -> Tuple[Any, ...]:
    """What a backend's ``dispatch`` returns: a cached call gives only ``recv_x`` and the event."""
    if cached:
        return recv_x, None, None, None, None, event
    return recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, event


def host_wait_timeout_message(rank: int, timeout_s: float, kernel: str) -> str:
    """The failure of a host wait for the receive counts of ``kernel`` that ran past ``timeout_s``."""
    return (f"deep_ep: rank {rank}: the host waited more than {timeout_s:g} s for the receive counts of "
            f"{kernel}; the buffer is now unusable")


def _round_scale_up_to_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Round positive normal fp32 values up to the next power of two, exactly, on the bits."""
    bits = scale.contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent << 23).view(torch.float32)


def _pack_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Pack the exponent bytes of power-of-two fp32 scales ``[..., G]`` into int32 ``[..., G/4]``."""
    groups = scale.shape[-1]
    if groups % 4 != 0:
        raise ValueError(f"use_ue8m0 needs hidden to be a multiple of 512, got {groups * FP8_GROUP}")
    exponent = ((scale.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    # Group j lands in byte j % 4 of int32 j // 4 (little-endian), regardless of host order.
    e = exponent.reshape(*scale.shape[:-1], groups // 4, 4).to(torch.int32)
    return e[..., 0] | (e[..., 1] << 8) | (e[..., 2] << 16) | (e[..., 3] << 24)


def unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of the ue8m0 packing: int32 ``[..., G/4]`` -> fp32 power-of-two scales ``[..., G]``."""
    p = packed.to(torch.int32)
    exponents = torch.stack([(p >> (8 * i)) & 0xFF for i in range(4)], dim=-1)
    exponents = exponents.reshape(*packed.shape[:-1], packed.shape[-1] * 4)
    return (exponents << 23).view(torch.float32)


def per_token_cast_to_fp8(x: torch.Tensor, round_scale: bool = False,
                          use_ue8m0: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cast ``x`` to FP8 (e4m3) with one scale per token per 128 channels.

    This is the reference of the FP8 rule every backend reproduces bit for bit: per group of 128
    channels, ``amax = max(|x|)`` in fp32, clamped to at least 1e-4; ``scale = amax / 448``
    (fp32, round to nearest); with ``round_scale`` the scale is rounded up to a power of two;
    ``data = x / scale`` (fp32, round to nearest) converted to ``torch.float8_e4m3fn``.

    Args:
        x: ``[num_tokens, hidden]`` tensor (bf16 or fp32), ``hidden`` a multiple of 128.
        round_scale: round each scale up to a power of two.
        use_ue8m0: pack the scales' exponents 4 per int32 (needs ``round_scale`` semantics, which
            it implies, and ``hidden`` a multiple of 512).

    Returns:
        ``(data, scales)``: ``data`` e4m3 ``[num_tokens, hidden]``; ``scales`` fp32
        ``[num_tokens, hidden / 128]``, or int32 ``[num_tokens, hidden / 512]`` with ``use_ue8m0``.
    """
    if x.dim() != 2 or x.shape[1] % FP8_GROUP != 0:
        raise ValueError(f"x must be [num_tokens, hidden] with hidden % 128 == 0, got {tuple(x.shape)}")
    num_tokens, hidden = x.shape
    grouped = x.float().reshape(num_tokens, hidden // FP8_GROUP, FP8_GROUP)
    amax = grouped.abs().amax(dim=-1).clamp(min=FP8_AMAX_FLOOR)
    # Tensor / tensor: a true division on every device (CUDA turns `/ python_float` into a
    # multiplication by the reciprocal, which is off by one ulp for about half the values).
    scale = amax / torch.full_like(amax, FP8_E4M3_MAX)
    if round_scale or use_ue8m0:
        scale = _round_scale_up_to_pow2(scale)
    data = (grouped / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).reshape(num_tokens, hidden)
    if use_ue8m0:
        return data, _pack_ue8m0(scale)
    return data, scale


def per_token_cast_back(x_fp8: torch.Tensor, x_scales: torch.Tensor) -> torch.Tensor:
    """Undo :func:`per_token_cast_to_fp8`: ``data * scale`` per 128-channel group, as bf16.

    Args:
        x_fp8: e4m3 ``[..., hidden]``.
        x_scales: fp32 ``[..., hidden / 128]``, or ue8m0-packed int32 ``[..., hidden / 512]``.
    """
    if x_scales.dtype == torch.int32:
        x_scales = unpack_ue8m0(x_scales)
    hidden = x_fp8.shape[-1]
    grouped = x_fp8.float().reshape(*x_fp8.shape[:-1], hidden // FP8_GROUP, FP8_GROUP)
    return (grouped * x_scales.float().unsqueeze(-1)).reshape(x_fp8.shape).to(torch.bfloat16)


def group_limited_topk(scores: torch.Tensor, num_groups: int, num_topk_groups: int,
                       num_topk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Group-limited gating (DeepSeek-V3 style): top-k experts within the best expert groups.

    The experts are split into ``num_groups`` equal groups (one group per node when used for
    expert parallelism); each group is ranked by the sum of its two highest scores (its highest
    when a group holds one expert); the token keeps the ``num_topk_groups`` best groups and picks
    its ``num_topk`` experts among them. So a token reaches at most ``num_topk_groups`` groups.

    Args:
        scores: ``[num_tokens, num_experts]`` routing scores.
        num_groups: number of expert groups; must divide ``num_experts``.
        num_topk_groups: groups a token may use.
        num_topk: experts per token.

    Returns:
        ``(topk_idx int64 [num_tokens, num_topk], topk_weights float32 [num_tokens, num_topk])``,
        the weights being the chosen scores.
    """
    num_tokens, num_experts = scores.shape
    if num_experts % num_groups != 0:
        raise ValueError(f"num_groups ({num_groups}) must divide num_experts ({num_experts})")
    per_group = num_experts // num_groups
    if num_topk > num_topk_groups * per_group:
        raise ValueError("num_topk exceeds the experts available in num_topk_groups groups")
    grouped = scores.float().view(num_tokens, num_groups, per_group)
    group_score = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
    kept_groups = group_score.topk(num_topk_groups, dim=-1).indices
    group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept_groups, True)
    masked = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)
    weights, idx = masked.topk(num_topk, dim=-1)
    return idx.to(torch.int64), weights


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """A scale-free distance between two tensors: ``1 - 2<x,y> / (|x|^2 + |y|^2)`` in float64."""
    x, y = x.double() + 1, y.double() + 1
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


def hash_tensor(t: torch.Tensor) -> int:
    """An order-sensitive checksum of a tensor's bytes (to compare repeated runs cheaply)."""
    flat = t.contiguous().view(torch.uint8).view(-1).to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64) % 65521
    return int((flat * weights).sum().item())


def tensors_alive(*tensors: Iterable[Any]) -> Tuple[Any, ...]:
    """Flatten tensors and tuples of tensors (``None`` dropped) for ``EventOverlap.extra_tensors``."""
    out = []
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, (tuple, list)):
            out.extend(x for x in t if isinstance(x, torch.Tensor))
        elif isinstance(t, torch.Tensor):
            out.append(t)
    return tuple(out)
