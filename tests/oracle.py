"""A deliberately simple reference for every deep_ep call, independent of the package.

Every process knows every rank's inputs (they come from a shared seed), so each rank can
compute what every rank must receive. Expected results are computed token by token with
plain Python loops and numpy, straight from the wording of DESIGN.md §4; nothing here is
clever, and nothing here imports deep_ep.

Conventions: ``topk_idx_all[r]`` is rank r's ``topk_idx`` as a numpy int64 array
``[num_tokens_r, num_topk]``; expert ``e`` lives on rank ``e // num_local_experts``.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

FP8_MAX = 448.0
FP8_GROUP = 128
AMAX_FLOOR = np.float32(1e-4)


# --------------------------------------------------------------------------- layout


@dataclasses.dataclass
class Layout:
    num_tokens_per_rank: np.ndarray  # [R] int
    num_tokens_per_rdma_rank: Optional[np.ndarray]  # [nodes] int, None with one node
    num_tokens_per_expert: np.ndarray  # [E] int
    is_token_in_rank: np.ndarray  # [T, R] bool


def token_dest_ranks(topk_row: Sequence[int], num_local_experts: int) -> List[int]:
    """Sorted ranks that hold at least one of the token's experts."""
    return sorted({int(e) // num_local_experts for e in topk_row if int(e) != -1})


def layout(topk_idx: np.ndarray, num_experts: int, num_ranks: int, nvl_domain_size: int) -> Layout:
    """Expected get_dispatch_layout outputs for one rank's ``topk_idx``."""
    num_local = num_experts // num_ranks
    num_nodes = num_ranks // nvl_domain_size
    per_rank = np.zeros(num_ranks, dtype=np.int64)
    per_node = np.zeros(num_nodes, dtype=np.int64)
    per_expert = np.zeros(num_experts, dtype=np.int64)
    in_rank = np.zeros((topk_idx.shape[0], num_ranks), dtype=bool)
    for t in range(topk_idx.shape[0]):
        for e in topk_idx[t]:
            if int(e) != -1:
                per_expert[int(e)] += 1
        ranks = token_dest_ranks(topk_idx[t], num_local)
        for d in ranks:
            in_rank[t, d] = True
            per_rank[d] += 1
        for node in sorted({d // nvl_domain_size for d in ranks}):
            per_node[node] += 1
    return Layout(per_rank, per_node if num_nodes > 1 else None, per_expert, in_rank)


# --------------------------------------------------------------------------- dispatch / combine


@dataclasses.dataclass
class DispatchResult:
    """What one destination rank must receive from the high-throughput dispatch."""

    sources: List[Tuple[int, int]]  # row i came from (source rank, token index)
    recv_topk_idx: Optional[np.ndarray]  # [N, K] int64, local ids or -1
    recv_topk_weights: Optional[np.ndarray]  # [N, K] float32, 0 where the id is -1
    num_recv_tokens_per_expert: List[int]  # per local expert, rounded up to the alignment


def dispatch(
    topk_idx_all: Sequence[np.ndarray],
    topk_weights_all: Optional[Sequence[np.ndarray]],
    num_experts: int,
    num_ranks: int,
    dest_rank: int,
    expert_alignment: int = 1,
) -> DispatchResult:
    """Expected dispatch result on ``dest_rank``: rows ordered by source rank, then token."""
    num_local = num_experts // num_ranks
    sources: List[Tuple[int, int]] = []
    idx_rows: List[List[int]] = []
    weight_rows: List[List[float]] = []
    for src in range(num_ranks):
        topk = topk_idx_all[src]
        for t in range(topk.shape[0]):
            if dest_rank not in token_dest_ranks(topk[t], num_local):
                continue
            sources.append((src, t))
            ids, weights = [], []
            for k in range(topk.shape[1]):
                e = int(topk[t, k])
                kept = e != -1 and e // num_local == dest_rank
                ids.append(e - dest_rank * num_local if kept else -1)
                if topk_weights_all is not None:
                    weights.append(float(topk_weights_all[src][t, k]) if kept else 0.0)
            idx_rows.append(ids)
            weight_rows.append(weights)
    num_topk = topk_idx_all[0].shape[1]
    recv_idx = np.array(idx_rows, dtype=np.int64).reshape(len(sources), num_topk)
    counts = []
    for local in range(num_local):
        count = sum(1 for row in idx_rows if local in row)
        counts.append((count + expert_alignment - 1) // expert_alignment * expert_alignment)
    recv_weights = None
    if topk_weights_all is not None:
        recv_weights = np.array(weight_rows, dtype=np.float32).reshape(len(sources), num_topk)
    return DispatchResult(sources, recv_idx, recv_weights, counts)


def combine(
    sources_all: Sequence[Sequence[Tuple[int, int]]],
    values_all: Sequence[np.ndarray],
    home_rank: int,
    num_tokens: int,
    biases: Sequence[np.ndarray] = (),
) -> Tuple[np.ndarray, np.ndarray]:
    """Expected combine on ``home_rank``: each token sums the rows that come back to it.

    ``sources_all[d]`` lists where each row held by rank d came from, ``values_all[d]`` holds
    those rows (``[N_d, C]``). Returns (sum in float64 ``[num_tokens, C]``, sum of absolute
    values of every term, for the rounding tolerance).
    """
    width = values_all[0].shape[1]
    total = np.zeros((num_tokens, width), dtype=np.float64)
    magnitude = np.zeros((num_tokens, width), dtype=np.float64)
    for d, sources in enumerate(sources_all):
        for i, (src, t) in enumerate(sources):
            if src == home_rank:
                total[t] += values_all[d][i]
                magnitude[t] += np.abs(values_all[d][i])
    for bias in biases:
        total += bias
        magnitude += np.abs(bias)
    return total, magnitude


# --------------------------------------------------------------------------- low-latency


def low_latency_dispatch(
    topk_idx_all: Sequence[np.ndarray], num_experts: int, num_ranks: int, dest_rank: int
) -> List[Dict[int, List[int]]]:
    """For each local expert of ``dest_rank``: source rank -> token indices sent to it."""
    num_local = num_experts // num_ranks
    expected: List[Dict[int, List[int]]] = [dict() for _ in range(num_local)]
    for src in range(num_ranks):
        topk = topk_idx_all[src]
        for t in range(topk.shape[0]):
            for e in topk[t]:
                e = int(e)
                if e != -1 and e // num_local == dest_rank:
                    expected[e % num_local].setdefault(src, []).append(t)
    return expected


def low_latency_combine(
    x: np.ndarray,
    topk_idx: np.ndarray,
    topk_weights: np.ndarray,
    expert_scale: Sequence[float],
) -> Tuple[np.ndarray, np.ndarray]:
    """Expected low-latency combine of one rank's tokens.

    The experts of the test are ``out = x_token * expert_scale[e]``, so
    ``combined[t] = sum_k w[t, k] * x[t] * expert_scale[topk_idx[t, k]]`` over valid k.
    Returns (float64 result, sum of absolute values of the terms).
    """
    total = np.zeros(x.shape, dtype=np.float64)
    magnitude = np.zeros(x.shape, dtype=np.float64)
    for t in range(x.shape[0]):
        for k in range(topk_idx.shape[1]):
            e = int(topk_idx[t, k])
            if e == -1:
                continue
            term = float(topk_weights[t, k]) * x[t].astype(np.float64) * expert_scale[e]
            total[t] += term
            magnitude[t] += np.abs(term)
    return total, magnitude


# --------------------------------------------------------------------------- FP8 (e4m3fn)


def _e4m3_positive_table() -> Tuple[np.ndarray, np.ndarray]:
    """Every finite non-negative float8_e4m3fn value (ascending) and its code."""
    values, codes = [], []
    for code in range(0x7F):  # 0x7F is NaN
        exponent, mantissa = code >> 3, code & 7
        if exponent == 0:
            value = mantissa / 8.0 * 2.0**-6
        else:
            value = (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7)
        values.append(value)
        codes.append(code)
    return np.array(values, dtype=np.float64), np.array(codes, dtype=np.uint8)


_E4M3_VALUES, _E4M3_CODES = _e4m3_positive_table()


def float_to_e4m3_codes(values: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest e4m3fn code, ties to even.

    x / (amax / 448) can land an ulp above 448; round-to-nearest still gives 448 for anything
    below 464 (half-way to the next step, which e4m3fn lacks), so that is all we accept.
    """
    v = values.astype(np.float64)
    magnitude = np.abs(v)
    assert np.all(magnitude < 464.0), "value outside the e4m3 range: the scale rule is broken"
    hi = np.searchsorted(_E4M3_VALUES, magnitude, side="left").clip(0, len(_E4M3_VALUES) - 1)
    lo = (hi - 1).clip(0, None)
    d_hi = _E4M3_VALUES[hi] - magnitude
    d_lo = magnitude - _E4M3_VALUES[lo]
    take_lo = (d_lo < d_hi) | ((d_lo == d_hi) & (_E4M3_CODES[lo] % 2 == 0))
    code = np.where(take_lo, _E4M3_CODES[lo], _E4M3_CODES[hi]).astype(np.uint8)
    return np.where(np.signbit(v), code | 0x80, code).astype(np.uint8)


def e4m3_codes_to_float(codes: np.ndarray) -> np.ndarray:
    codes = codes.astype(np.int64)
    magnitude = _E4M3_VALUES[(codes & 0x7F).clip(0, len(_E4M3_VALUES) - 1)]
    return np.where(codes & 0x80, -magnitude, magnitude)


def round_scale_up_to_power_of_two(scale: np.ndarray) -> np.ndarray:
    """2 ** ceil(log2(scale)) on float32 bits: a non-zero mantissa bumps the exponent."""
    bits = scale.astype(np.float32).view(np.uint32)
    has_mantissa = (bits & np.uint32(0x007FFFFF)) != 0
    rounded = np.where(has_mantissa, (bits & np.uint32(0xFF800000)) + np.uint32(0x00800000), bits)
    return rounded.astype(np.uint32).view(np.float32)


def fp8_cast(
    x: np.ndarray, round_scale: bool = False, use_ue8m0: bool = False
) -> Tuple[np.ndarray, np.ndarray]:
    """The FP8 rule of the contract, one token and one 128-channel group at a time.

    ``x``: float32 ``[T, H]`` (bf16 values). Returns (e4m3 codes uint8 ``[T, H]``, scales):
    float32 ``[T, H/128]``, or with ``use_ue8m0`` int32 ``[T, H/512]`` holding the exponent
    bytes, group j in byte j % 4 of int32 j // 4.
    """
    num_tokens, hidden = x.shape
    groups = hidden // FP8_GROUP
    codes = np.zeros((num_tokens, hidden), dtype=np.uint8)
    scales = np.zeros((num_tokens, groups), dtype=np.float32)
    for t in range(num_tokens):
        for g in range(groups):
            block = x[t, g * FP8_GROUP : (g + 1) * FP8_GROUP].astype(np.float32)
            amax = np.float32(np.max(np.abs(block)))
            amax = max(amax, AMAX_FLOOR)
            scale = np.float32(amax / np.float32(FP8_MAX))
            if round_scale:
                scale = round_scale_up_to_power_of_two(np.array([scale], dtype=np.float32))[0]
            scales[t, g] = scale
            codes[t, g * FP8_GROUP : (g + 1) * FP8_GROUP] = float_to_e4m3_codes(
                (block / np.float32(scale)).astype(np.float32)
            )
    if not use_ue8m0:
        return codes, scales
    assert groups % 4 == 0, "ue8m0 packing needs hidden % 512 == 0"
    exponent_bytes = ((scales.view(np.uint32) >> 23) & 0xFF).astype(np.uint8)
    packed = np.zeros((num_tokens, groups // 4), dtype=np.int64)
    for t in range(num_tokens):
        for g in range(groups):
            packed[t, g // 4] |= int(exponent_bytes[t, g]) << (8 * (g % 4))
    return codes, packed.astype(np.uint32).view(np.int32)


def ue8m0_unpack(packed: np.ndarray, groups: int) -> np.ndarray:
    """float32 scales from packed exponent bytes (inverse of the packing above)."""
    exponent_bytes = packed.astype(np.int32).view(np.uint8).reshape(packed.shape[0], packed.shape[1] * 4)[:, :groups]
    return (exponent_bytes.astype(np.uint32) << 23).view(np.float32)
