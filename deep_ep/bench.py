"""The main job: ``python -m deep_ep.bench`` checks and times dispatch/combine.

It runs the high-throughput workload (``Buffer.dispatch`` in bf16 and FP8, ``Buffer.combine``
in bf16) and the low-latency workload (FP8 ``low_latency_dispatch``, bf16
``low_latency_combine``, and the two back to back) on the best backend available:

- CUDA GPUs present: one process per GPU over NCCL, using ``Buffer``'s default backend (the
  CUDA kernels where they are usable, else the torch backend); ``--backend`` overrides.
- No GPU: ``--num-processes`` CPU processes (default 4) over gloo, at smaller default sizes.

Every process regenerates all ranks' inputs from one shared seed, so each rank can compute
its expected outputs with a deliberately simple oracle. Each workload is first checked
(dispatch exactly, combine within bf16 tolerance), then timed against the plain
``torch.distributed.all_to_all_single`` of the same bytes with the same per-peer split sizes.

Metric (DESIGN.md section 6):

- **time** of a workload: each rank takes the median over ``--iters`` timed calls (after
  ``--warmup`` untimed ones; CUDA events on GPU, ``time.perf_counter`` on CPU); the reported
  time is the slowest rank's median.
- **logical bandwidth** (GB/s, 1e9 bytes/s) = the bytes of token data a rank receives,
  including the rows it sends to itself, averaged over the ranks, divided by that time.
  Token data means hidden rows only (bf16: ``2 * hidden`` bytes per row; FP8:
  ``hidden + 4 * hidden / 128`` bytes per row, data plus float32 scales), not top-k ids,
  weights or layout metadata. High-throughput dispatch counts one row per (token,
  destination rank); low-latency dispatch one row per (token, expert). For a combine the
  bytes are those of the rows the rank sends back, which equal the bytes it received in the
  matching bf16 dispatch. ``ll-dispatch-combine`` counts both legs.
- **baseline**: ``all_to_all_single`` on uint8 tensors moving exactly those bytes with the
  same per-peer split sizes (two calls for ``ll-dispatch-combine``), timed the same way in
  the same run. **speed-up** = baseline time / library time.

What is timed: the layout (``get_dispatch_layout``) is computed once, up front, and is not
part of any timed call; ``dispatch(x, <layout tensors>)`` and ``combine(x, handle)`` are each
timed as one call (no top-k ids or weights, as in DeepEP's own benchmark), which covers the
backend's whole work for that call including any host synchronisation it needs. The
low-latency calls are timed as made by an inference engine: ``low_latency_dispatch(x,
topk_idx, ...)`` with FP8 cast, and ``low_latency_combine(x, topk_idx, topk_weights,
handle)``.

Exit status: 0 when every check passed, 1 when any failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import math
import os
import secrets
import statistics
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

HIGH_THROUGHPUT_WORKLOADS = ("ht-dispatch-bf16", "ht-dispatch-fp8", "ht-combine-bf16")
LOW_LATENCY_WORKLOADS = ("ll-dispatch-fp8", "ll-combine-bf16", "ll-dispatch-combine")
ALL_WORKLOADS = HIGH_THROUGHPUT_WORKLOADS + LOW_LATENCY_WORKLOADS
WORKLOAD_GROUPS = {"ht": HIGH_THROUGHPUT_WORKLOADS, "ll": LOW_LATENCY_WORKLOADS, "all": ALL_WORKLOADS}

# Defaults per device kind. GPU: DESIGN.md section 6. CPU: sized so that the default run
# (4 gloo processes) finishes within a minute on a 2-core machine (about 20 s measured).
GPU_DEFAULTS = dict(num_tokens=4096, hidden=7168, num_topk=8, num_experts=256, ll_num_tokens=128,
                    iters=50, warmup=10)
CPU_DEFAULTS = dict(num_tokens=512, hidden=2048, num_topk=8, num_experts=32, ll_num_tokens=128,
                    iters=20, warmup=3)
CPU_DEFAULT_NUM_PROCESSES = 4

# Multicast/NVLS paths stay off on the shared machines (see the device notes).
MULTICAST_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1",
                     "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}

FP8_GROUP = 128  # channels per FP8 scale


@dataclasses.dataclass
class BenchOptions:
    """Resolved command-line options, passed to every worker process."""
    device: str  # "cuda" or "cpu"
    num_processes: int
    backend: Optional[str]
    num_tokens: int
    hidden: int
    num_topk: int
    num_experts: int
    ll_num_tokens: int
    workloads: List[str]
    iters: int
    warmup: int
    num_sms: Optional[int]
    seed: int
    timeout_s: float


@dataclasses.dataclass
class WorkloadResult:
    """One row of the table (and of the JSON file)."""
    workload: str
    backend: str
    ranks: int
    time_us: Optional[float]
    gbps: Optional[float]
    baseline_time_us: Optional[float]
    baseline_gbps: Optional[float]
    speedup: Optional[float]
    check_ok: bool
    check_message: str
    bytes_per_rank: float
    rank_median_us: List[Optional[float]]
    baseline_rank_median_us: List[Optional[float]]


# ----------------------------------------------------------------------------------------
# Inputs, regenerated identically in every process from the shared seed.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class RankInputs:
    """One rank's tokens and routing."""
    x: torch.Tensor  # bf16 [T, H]
    topk_idx: torch.Tensor  # int64 [T, K], -1 = no expert
    topk_weights: torch.Tensor  # float32 [T, K], positive


def _derived_seed(seed: int, family: int, rank: int) -> int:
    return (seed * 1_000_003 + family * 10_007 + rank) % (2 ** 63 - 1)


def make_rank_inputs(seed: int, family: int, rank: int, num_tokens: int, hidden: int, num_topk: int,
                     num_experts: int, device: torch.device) -> RankInputs:
    """Random inputs of one rank; the same (seed, family, rank) gives the same tensors everywhere.

    Args:
        seed: the run's shared seed.
        family: 0 for the high-throughput inputs, 1 for the low-latency ones.
        rank: whose inputs to make.
        num_tokens, hidden, num_topk, num_experts: the shapes.
        device: where to make them (a CUDA generator on GPU, so large inputs are cheap).

    Returns:
        Normal-distributed bf16 tokens (never all zero), distinct top-k experts per token with
        a few slots set to -1, and positive weights.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(_derived_seed(seed, family, rank))
    x = torch.randn(num_tokens, hidden, generator=generator, device=device).to(torch.bfloat16)
    scores = torch.rand(num_tokens, num_experts, generator=generator, device=device)
    topk_idx = scores.topk(num_topk, dim=1).indices.to(torch.int64)
    # A few unused slots, as in real routing with dropped or padded choices.
    dropped = torch.rand(num_tokens, num_topk, generator=generator, device=device) < 0.02
    topk_idx = topk_idx.masked_fill(dropped, -1)
    topk_weights = torch.rand(num_tokens, num_topk, generator=generator, device=device) + 0.05
    return RankInputs(x=x, topk_idx=topk_idx, topk_weights=topk_weights)


def _rank_of_expert(topk_idx: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """Rank that holds each top-k expert, -1 for an unused slot."""
    return torch.where(topk_idx >= 0, topk_idx // num_local_experts, torch.full_like(topk_idx, -1))


def _token_in_rank(topk_idx: torch.Tensor, num_ranks: int, num_local_experts: int) -> torch.Tensor:
    """[T, R] bool: does token t go to rank r (any of its experts lives there)."""
    owner = _rank_of_expert(topk_idx, num_local_experts)
    ranks = torch.arange(num_ranks, device=topk_idx.device)
    return (owner.unsqueeze(-1) == ranks).any(dim=1)


def _pairs_to_rank(topk_idx: torch.Tensor, num_ranks: int, num_local_experts: int) -> torch.Tensor:
    """[R] int64: number of (token, expert) pairs whose expert lives on each rank."""
    owner = _rank_of_expert(topk_idx, num_local_experts)
    ranks = torch.arange(num_ranks, device=topk_idx.device)
    return (owner.unsqueeze(-1) == ranks).sum(dim=(0, 1))


def _fp8_row_bytes(hidden: int) -> int:
    return hidden + 4 * (hidden // FP8_GROUP)


def _dequantize(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 rows from FP8 data [n, H] and float32 scales [n, H/128] (any strides)."""
    n, hidden = data.shape
    values = data.float().view(n, hidden // FP8_GROUP, FP8_GROUP)
    return (values * scales.float().reshape(n, hidden // FP8_GROUP, 1)).view(n, hidden)


def _combine_rank_factor(rank: int) -> float:
    """Per-rank factor that the high-throughput combine check applies to returned rows."""
    return 1.0 + (rank % 8) / 8.0


def _combine_expert_factors(num_experts: int, device: torch.device) -> torch.Tensor:
    """Per-expert factor of the low-latency combine check's stand-in expert computation."""
    return 1.0 + (torch.arange(num_experts, device=device) % 8).float() / 8.0


def _fake_expert_output(rows: torch.Tensor, factor) -> torch.Tensor:
    """bf16(rows * factor), rows in float32; the same ops in the oracle and on received rows."""
    return (rows * factor).to(torch.bfloat16)


# ----------------------------------------------------------------------------------------
# Checks. Each returns (ok, message); messages name the first thing that differed.
# ----------------------------------------------------------------------------------------

CheckResult = Tuple[bool, str]


def _first_failure(checks: Sequence[Tuple[str, bool]]) -> CheckResult:
    for what, passed in checks:
        if not passed:
            return False, f"{what} differs from the oracle"
    return True, "ok"


def _bf16_close(got: torch.Tensor, expected: torch.Tensor, abs_sum: torch.Tensor, what: str) -> CheckResult:
    """got (bf16) vs expected (float32 sum) within bf16 rounding of the summed magnitude."""
    if not isinstance(got, torch.Tensor) or got.dtype != torch.bfloat16:
        return False, f"{what} is not a bf16 tensor"
    if got.shape != expected.shape:
        return False, f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    error = (got.float() - expected).abs()
    bound = abs_sum * 2.0 ** -7 + 1e-6
    if not bool(torch.isfinite(got.float()).all()):
        return False, f"{what} has non-finite values"
    if bool((error > bound).any()):
        worst = int((error - bound).flatten().argmax())
        return False, (f"{what} off at flat index {worst}: got {got.flatten()[worst].item():.5g}, "
                       f"expected {expected.flatten()[worst].item():.5g}")
    return True, "ok"


def _same(a: Optional[torch.Tensor], b: torch.Tensor) -> bool:
    """Exactly equal: same shape, dtype and bits."""
    if not isinstance(a, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return bool(torch.equal(a.contiguous(), b.contiguous()))


class HighThroughputOracle:
    """Expected high-throughput results of one rank, from every rank's inputs."""

    def __init__(self, all_inputs: List[RankInputs], rank: int, num_experts: int) -> None:
        self.rank = rank
        self.num_ranks = len(all_inputs)
        self.num_local_experts = num_experts // self.num_ranks
        self.inputs = all_inputs
        in_rank = [_token_in_rank(inp.topk_idx, self.num_ranks, self.num_local_experts) for inp in all_inputs]
        # tokens_to[s][d]: how many tokens rank s sends to rank d (one row per destination rank).
        self.tokens_to = torch.stack([m.sum(dim=0) for m in in_rank]).cpu().to(torch.int64)
        self.my_in_rank = in_rank[rank]
        self.rows_from = [m[:, rank] for m in in_rank]  # which tokens of each source come here
        first = rank * self.num_local_experts
        recv_idx = torch.cat([inp.topk_idx[rows] for inp, rows in zip(all_inputs, self.rows_from)])
        mine = (recv_idx >= first) & (recv_idx < first + self.num_local_experts)
        self.recv_topk_idx = torch.where(mine, recv_idx - first, torch.full_like(recv_idx, -1))
        recv_w = torch.cat([inp.topk_weights[rows] for inp, rows in zip(all_inputs, self.rows_from)])
        self.recv_topk_weights = torch.where(mine, recv_w, torch.zeros_like(recv_w))
        self.recv_per_expert = [int((self.recv_topk_idx == e).sum()) for e in range(self.num_local_experts)]

    def check_layout(self, layout, num_experts: int) -> CheckResult:
        num_tokens_per_rank, _num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = layout
        topk_idx = self.inputs[self.rank].topk_idx
        experts = torch.arange(num_experts, device=topk_idx.device)
        expected_per_expert = (topk_idx.unsqueeze(-1) == experts).any(dim=1).sum(dim=0).to(torch.int32)
        expected_per_rank = self.my_in_rank.sum(dim=0).to(torch.int32)
        return _first_failure([
            ("get_dispatch_layout num_tokens_per_rank", _same(num_tokens_per_rank, expected_per_rank)),
            ("get_dispatch_layout num_tokens_per_expert", _same(num_tokens_per_expert, expected_per_expert)),
            ("get_dispatch_layout is_token_in_rank", _same(is_token_in_rank, self.my_in_rank)),
        ])

    def check_dispatch(self, result, sources: List) -> CheckResult:
        """sources[s]: rank s's dispatched x (bf16 tensor or FP8 pair)."""
        recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, _handle, _event = result
        if isinstance(sources[0], tuple):
            expected_data = torch.cat([src[0][rows] for src, rows in zip(sources, self.rows_from)])
            expected_scales = torch.cat([src[1][rows] for src, rows in zip(sources, self.rows_from)])
            if not isinstance(recv_x, tuple):
                return False, "recv_x is not an (FP8 data, scales) pair"
            x_checks = [("recv_x FP8 data", _same(recv_x[0], expected_data)),
                        ("recv_x scales", _same(recv_x[1], expected_scales))]
        else:
            expected = torch.cat([src[rows] for src, rows in zip(sources, self.rows_from)])
            x_checks = [("recv_x", _same(recv_x, expected))]
        return _first_failure(x_checks + [
            ("recv_topk_idx", _same(recv_topk_idx, self.recv_topk_idx)),
            ("recv_topk_weights", _same(recv_topk_weights, self.recv_topk_weights)),
            ("num_recv_tokens_per_expert_list", list(per_expert_list) == self.recv_per_expert),
        ])

    def combine_input(self, recv_x: torch.Tensor) -> torch.Tensor:
        """What this rank sends back in the combine check: its received rows times its factor."""
        return _fake_expert_output(recv_x.float(), _combine_rank_factor(self.rank))

    def check_combine(self, result) -> CheckResult:
        combined_x, combined_weights, _event = result
        mine = self.inputs[self.rank]
        x = mine.x.float()
        expected = torch.zeros_like(x)
        abs_sum = torch.zeros_like(x)
        for r in range(self.num_ranks):
            sent = self.my_in_rank[:, r].unsqueeze(1)
            term = _fake_expert_output(x, _combine_rank_factor(r)).float() * sent
            expected += term
            abs_sum += term.abs()
        ok, message = _bf16_close(combined_x, expected, abs_sum, "combined_x")
        if not ok:
            return ok, message
        expected_weights = torch.where(mine.topk_idx >= 0, mine.topk_weights, torch.zeros_like(mine.topk_weights))
        return _first_failure([("combined_topk_weights", _same(combined_weights, expected_weights))])


class LowLatencyOracle:
    """Expected low-latency results of one rank, from every rank's inputs."""

    def __init__(self, all_inputs: List[RankInputs], rank: int, num_experts: int,
                 num_max_dispatch_tokens_per_rank: int, cast_to_fp8: Callable) -> None:
        self.rank = rank
        self.num_ranks = len(all_inputs)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.num_ranks
        self.num_max = num_max_dispatch_tokens_per_rank
        self.inputs = all_inputs
        self.fp8 = [cast_to_fp8(inp.x) for inp in all_inputs]
        self.pairs_to = torch.stack([_pairs_to_rank(inp.topk_idx, self.num_ranks, self.num_local_experts)
                                     for inp in all_inputs]).cpu().to(torch.int64)
        self.expert_factors = _combine_expert_factors(num_experts, all_inputs[0].x.device)

    @staticmethod
    def _row_keys(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """One uint8 row per token: FP8 bytes then scale bytes, for exact multiset matching."""
        return torch.cat([data.contiguous().view(torch.uint8), scales.float().contiguous().view(torch.uint8)], dim=1)

    def check_dispatch(self, result) -> CheckResult:
        """Rows per local expert match the oracle as multisets; each source's rows are contiguous."""
        recv_x, recv_count, _handle, _event, _hook = result
        if not isinstance(recv_x, tuple):
            return False, "recv_x is not an (FP8 data, scales) pair"
        data, scales = recv_x
        rows = self.num_ranks * self.num_max
        hidden = self.inputs[0].x.shape[1]
        if tuple(data.shape) != (self.num_local_experts, rows, hidden):
            return False, f"recv_x data has shape {tuple(data.shape)}"
        if tuple(scales.shape) != (self.num_local_experts, rows, hidden // FP8_GROUP):
            return False, f"recv_x scales have shape {tuple(scales.shape)}"
        if recv_count.dtype != torch.int32 or tuple(recv_count.shape) != (self.num_local_experts,):
            return False, f"recv_count is {recv_count.dtype} {tuple(recv_count.shape)}"
        for local in range(self.num_local_experts):
            expert = self.rank * self.num_local_experts + local
            keys, sources = [], []
            for s, (inp, (src_data, src_scales)) in enumerate(zip(self.inputs, self.fp8)):
                chosen = (inp.topk_idx == expert).any(dim=1)
                keys.append(self._row_keys(src_data[chosen], src_scales[chosen]))
                sources.append(torch.full((int(chosen.sum()),), s, dtype=torch.int64, device=chosen.device))
            expected_keys, expected_sources = torch.cat(keys), torch.cat(sources)
            count = int(recv_count[local])
            if count != expected_keys.shape[0]:
                return False, f"recv_count[{local}] = {count}, expected {expected_keys.shape[0]}"
            if count == 0:
                continue
            got_keys = self._row_keys(data[local, :count], scales[local, :count])
            # Rows may come in any order: match them as multisets, then map each to its source.
            _, ids = torch.unique(torch.cat([expected_keys, got_keys]), dim=0, return_inverse=True)
            expected_ids, got_ids = ids[:count], ids[count:]
            if not torch.equal(expected_ids.sort().values, got_ids.sort().values):
                return False, f"rows received for local expert {local} differ from the oracle"
            source_of_id = torch.full((int(ids.max()) + 1,), -1, dtype=torch.int64, device=ids.device)
            source_of_id[expected_ids] = expected_sources
            got_sources = source_of_id[got_ids]
            blocks = int((got_sources[1:] != got_sources[:-1]).sum()) + 1
            if blocks != int(got_sources.unique().numel()):
                return False, f"rows of local expert {local} from one source rank are not contiguous"
        return True, "ok"

    def expert_output(self, recv_x, recv_count) -> torch.Tensor:
        """Stand-in expert computation on the received rows; unused rows hold a large value."""
        data, scales = recv_x
        out = torch.full(data.shape, 1e4, dtype=torch.bfloat16, device=data.device)
        for local in range(self.num_local_experts):
            count = min(max(int(recv_count[local]), 0), data.shape[1])  # a wrong count must not crash here
            factor = self.expert_factors[self.rank * self.num_local_experts + local]
            out[local, :count] = _fake_expert_output(_dequantize(data[local, :count], scales[local, :count]), factor)
        return out

    def check_combine(self, result) -> CheckResult:
        combined_x, _event, _hook = result
        mine = self.inputs[self.rank]
        rows = _dequantize(*self.fp8[self.rank])
        expected = torch.zeros_like(rows)
        abs_sum = torch.zeros_like(rows)
        for k in range(mine.topk_idx.shape[1]):
            idx = mine.topk_idx[:, k]
            valid = (idx >= 0).unsqueeze(1)
            factor = self.expert_factors[idx.clamp(min=0)].unsqueeze(1)
            term = mine.topk_weights[:, k].unsqueeze(1) * _fake_expert_output(rows, factor).float() * valid
            expected += term
            abs_sum += term.abs()
        return _bf16_close(combined_x, expected, abs_sum, "combined_x")


# ----------------------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------------------

class BenchContext:
    """Per-process state: rank, device, options and the progress counter."""

    def __init__(self, rank: int, world_size: int, device: torch.device, options: BenchOptions) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.options = options
        self.done = 0

    def progress(self, name: str, what: str) -> None:
        if self.rank == 0:
            position = f"{self.done + 1}/{len(self.options.workloads)}"
            print(f"[bench] {name} {position} {what}", file=sys.stderr, flush=True)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        self.synchronize()
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()


def time_calls(ctx: BenchContext, call: Callable[[], object]) -> float:
    """Median seconds of one call over ctx.options.iters runs, after the warm-up runs."""
    for _ in range(ctx.options.warmup):
        call()
    ctx.barrier()
    if ctx.device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(ctx.options.iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(ctx.options.iters)]
        for start, end in zip(starts, ends):
            start.record()
            call()
            end.record()
        torch.cuda.synchronize(ctx.device)
        seconds = [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]
    else:
        seconds = []
        for _ in range(ctx.options.iters):
            begin = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - begin)
    return statistics.median(seconds)


def make_all_to_all(ctx: BenchContext, send_bytes: Sequence[int], recv_bytes: Sequence[int]) -> Callable[[], None]:
    """The baseline: one all_to_all_single of uint8 tensors with these per-peer byte counts."""
    send = torch.randint(1, 255, (sum(send_bytes),), dtype=torch.uint8, device=ctx.device)
    recv = torch.empty(sum(recv_bytes), dtype=torch.uint8, device=ctx.device)
    send_splits, recv_splits = [int(b) for b in send_bytes], [int(b) for b in recv_bytes]

    def baseline() -> None:
        dist.all_to_all_single(recv, send, recv_splits, send_splits)
    return baseline


def _agree(ok: bool, message: str) -> CheckResult:
    """Combine every rank's verdict: ok only if all passed; the first failure is reported."""
    verdicts: List = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, (ok, message))
    for r, (rank_ok, rank_message) in enumerate(verdicts):
        if not rank_ok:
            return False, f"rank {r}: {rank_message}"
    return True, "ok"


def _report_exception(what: str, error: Exception) -> str:
    """One line per rank, and the traceback once (rank 0), so a failure does not flood the log."""
    line = f"{type(error).__name__}: {error}"
    if dist.get_rank() == 0:
        traceback.print_exc(file=sys.stderr)
    print(f"[bench] rank {dist.get_rank()}: {what} raised {line}", file=sys.stderr, flush=True)
    return line


def _safely(what: Callable[[], CheckResult]) -> CheckResult:
    try:
        return what()
    except Exception as error:  # a failed check is reported in the table, not raised
        return False, _report_exception("check", error)


def measure(ctx: BenchContext, name: str, backend: str, check: Callable[[], CheckResult],
            call: Callable[[], object], baseline: Callable[[], None], bytes_per_rank: float) -> WorkloadResult:
    """Check one workload, time it and its baseline, and gather the slowest rank's numbers."""
    ctx.progress(name, "checking ...")
    ok, message = _safely(check)
    ctx.progress(name, f"timing {ctx.options.iters} iterations (+{ctx.options.warmup} warm-up) ...")
    try:
        median = time_calls(ctx, call)
    except Exception as error:
        line = _report_exception("timing", error)
        median = None
        ok, message = (False, f"timing raised {line}") if ok else (ok, message)
    baseline_median = time_calls(ctx, baseline)
    medians: List = [None] * ctx.world_size
    dist.all_gather_object(medians, (median, baseline_median))
    ok, message = _agree(ok, message)
    ctx.done += 1

    lib = [m[0] for m in medians]
    base = [m[1] for m in medians]
    slowest = None if any(m is None for m in lib) else max(lib)
    slowest_base = max(base)
    return WorkloadResult(
        workload=name, backend=backend, ranks=ctx.world_size,
        time_us=None if slowest is None else slowest * 1e6,
        gbps=None if not slowest else bytes_per_rank / slowest / 1e9,
        baseline_time_us=slowest_base * 1e6,
        baseline_gbps=bytes_per_rank / slowest_base / 1e9 if slowest_base else None,
        speedup=None if not slowest else slowest_base / slowest,
        check_ok=ok, check_message=message, bytes_per_rank=bytes_per_rank,
        rank_median_us=[None if m is None else m * 1e6 for m in lib],
        baseline_rank_median_us=[m * 1e6 for m in base])


def _backend_name(buffer) -> str:
    name = getattr(buffer, "backend", None)
    if isinstance(name, str):
        return name
    backend = getattr(buffer, "_backend", None)
    return type(backend).__name__.lower().replace("backend", "") if backend is not None else "?"


def _make_buffer(ctx: BenchContext, **kwargs):
    from deep_ep import Buffer
    if ctx.options.backend is not None:
        kwargs["backend"] = ctx.options.backend
    return Buffer(dist.group.WORLD, explicitly_destroy=True, **kwargs)


# ----------------------------------------------------------------------------------------
# The two workload families.
# ----------------------------------------------------------------------------------------

def run_high_throughput(ctx: BenchContext) -> Tuple[List[WorkloadResult], Dict]:
    """Check and time the selected high-throughput workloads; returns results and header info.

    Every rank makes the same library calls in the same order whatever its local checks say
    (the calls are collective); a check compares only after the calls it needs are done.
    """
    from deep_ep import Buffer
    from deep_ep.utils import per_token_cast_to_fp8

    opts, rank, num_ranks = ctx.options, ctx.rank, ctx.world_size
    all_inputs = [make_rank_inputs(opts.seed, 0, r, opts.num_tokens, opts.hidden, opts.num_topk,
                                   opts.num_experts, ctx.device) for r in range(num_ranks)]
    oracle = HighThroughputOracle(all_inputs, rank, opts.num_experts)
    mine = all_inputs[rank]
    fp8_inputs = [per_token_cast_to_fp8(inp.x) for inp in all_inputs]

    hidden_bytes = opts.hidden * 2
    num_nvl_bytes = 0
    for config in (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks)):
        num_nvl_bytes = max(num_nvl_bytes, config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks))
    buffer = _make_buffer(ctx, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=0)
    backend = _backend_name(buffer)
    info = {"num_sms": Buffer.num_sms}
    results: List[WorkloadResult] = []
    cache: Dict = {}
    try:
        # The layout is computed once and is not part of any timed call.
        layout = buffer.get_dispatch_layout(mine.topk_idx, opts.num_experts)
        layout_verdict = _agree(*_safely(lambda: oracle.check_layout(layout, opts.num_experts)))
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = layout
        layout_args = dict(num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                           is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert)
        routed_args = dict(layout_args, topk_idx=mine.topk_idx, topk_weights=mine.topk_weights)

        def routed_bf16_dispatch():
            """The bf16 dispatch with top-k (made once; its handle serves the combine)."""
            if "bf16" not in cache:
                cache["bf16"] = buffer.dispatch(mine.x, **routed_args)
            return cache["bf16"]

        def combine_input():
            if "combine_x" not in cache:
                cache["combine_x"] = oracle.combine_input(routed_bf16_dispatch()[0])
            return cache["combine_x"]

        def check_bf16_dispatch() -> CheckResult:
            return oracle.check_dispatch(routed_bf16_dispatch(), [inp.x for inp in all_inputs])

        def check_fp8_dispatch() -> CheckResult:
            return oracle.check_dispatch(buffer.dispatch(fp8_inputs[rank], **routed_args), fp8_inputs)

        def check_combine() -> CheckResult:
            recv_x, _, recv_weights, _, handle, _ = routed_bf16_dispatch()
            return oracle.check_combine(buffer.combine(combine_input(), handle, topk_weights=recv_weights))

        def layout_first(check: Callable[[], CheckResult]) -> Callable[[], CheckResult]:
            # The verdict is the same on every rank, so skipping keeps the calls collective.
            return check if layout_verdict[0] else (lambda: (False, layout_verdict[1]))

        rows_to = oracle.tokens_to  # [source, destination] token rows
        bf16_row, fp8_row = 2 * opts.hidden, _fp8_row_bytes(opts.hidden)
        rows_in_mean = float(rows_to.sum()) / num_ranks  # rows a rank receives, averaged over ranks
        for name in opts.workloads:
            if name == "ht-dispatch-bf16":
                results.append(measure(
                    ctx, name, backend, layout_first(check_bf16_dispatch),
                    lambda: buffer.dispatch(mine.x, **layout_args),
                    make_all_to_all(ctx, rows_to[rank] * bf16_row, rows_to[:, rank] * bf16_row),
                    rows_in_mean * bf16_row))
            elif name == "ht-dispatch-fp8":
                results.append(measure(
                    ctx, name, backend, layout_first(check_fp8_dispatch),
                    lambda: buffer.dispatch(fp8_inputs[rank], **layout_args),
                    make_all_to_all(ctx, rows_to[rank] * fp8_row, rows_to[:, rank] * fp8_row),
                    rows_in_mean * fp8_row))
            elif name == "ht-combine-bf16":
                results.append(measure(
                    ctx, name, backend, layout_first(check_combine),
                    lambda: buffer.combine(combine_input(), routed_bf16_dispatch()[4]),
                    make_all_to_all(ctx, rows_to[:, rank] * bf16_row, rows_to[rank] * bf16_row),
                    rows_in_mean * bf16_row))
        ctx.barrier()
    finally:
        cache.clear()
        buffer.destroy()
    return results, info


def run_low_latency(ctx: BenchContext) -> List[WorkloadResult]:
    """Check and time the selected low-latency workloads (collective calls as in run_high_throughput)."""
    from deep_ep import Buffer
    from deep_ep.utils import per_token_cast_to_fp8

    opts, rank, num_ranks = ctx.options, ctx.rank, ctx.world_size
    num_max = opts.ll_num_tokens
    all_inputs = [make_rank_inputs(opts.seed, 1, r, opts.ll_num_tokens, opts.hidden, opts.num_topk,
                                   opts.num_experts, ctx.device) for r in range(num_ranks)]
    oracle = LowLatencyOracle(all_inputs, rank, opts.num_experts, num_max, per_token_cast_to_fp8)
    mine = all_inputs[rank]
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(num_max, opts.hidden, num_ranks, opts.num_experts)
    buffer = _make_buffer(ctx, num_nvl_bytes=0, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True,
                          num_qps_per_rank=max(1, opts.num_experts // num_ranks))
    backend = _backend_name(buffer)
    results: List[WorkloadResult] = []
    cache: Dict = {}
    try:
        buffer.clean_low_latency_buffer(num_max, opts.hidden, opts.num_experts)

        def dispatch():
            return buffer.low_latency_dispatch(mine.x, mine.topk_idx, num_max, opts.num_experts, use_fp8=True)

        def combine(expert_output: torch.Tensor, handle):
            return buffer.low_latency_combine(expert_output, mine.topk_idx, mine.topk_weights, handle)

        def prepared():
            """A dispatch's handle and the stand-in expert output of its rows (made once per workload)."""
            if "handle" not in cache:
                recv_x, recv_count, handle, _, _ = cache["dispatch"] = dispatch()
                cache["expert_output"], cache["handle"] = oracle.expert_output(recv_x, recv_count), handle
            return cache["expert_output"], cache["handle"]

        def check_combine() -> CheckResult:
            return oracle.check_combine(combine(*prepared()))

        def check_round_trip() -> CheckResult:
            combined = combine(*prepared())
            ok, message = oracle.check_dispatch(cache["dispatch"])
            return oracle.check_combine(combined) if ok else (ok, message)

        def round_trip():
            expert_output, _ = prepared()
            _, _, handle, _, _ = dispatch()
            return combine(expert_output, handle)

        pairs_to = oracle.pairs_to  # [source, destination] (token, expert) pairs
        fp8_row, bf16_row = _fp8_row_bytes(opts.hidden), 2 * opts.hidden
        pairs_in_mean = float(pairs_to.sum()) / num_ranks
        dispatch_baseline = make_all_to_all(ctx, pairs_to[rank] * fp8_row, pairs_to[:, rank] * fp8_row)
        combine_baseline = make_all_to_all(ctx, pairs_to[:, rank] * bf16_row, pairs_to[rank] * bf16_row)

        def both_baselines() -> None:
            dispatch_baseline()
            combine_baseline()

        for name in opts.workloads:
            cache.clear()  # each workload starts from a fresh dispatch (two-buffer rule)
            if name == "ll-dispatch-fp8":
                results.append(measure(ctx, name, backend, lambda: oracle.check_dispatch(dispatch()), dispatch,
                                       dispatch_baseline, pairs_in_mean * fp8_row))
            elif name == "ll-combine-bf16":
                results.append(measure(ctx, name, backend, check_combine, lambda: combine(*prepared()),
                                       combine_baseline, pairs_in_mean * bf16_row))
            elif name == "ll-dispatch-combine":
                results.append(measure(ctx, name, backend, check_round_trip, round_trip,
                                       both_baselines, pairs_in_mean * (fp8_row + bf16_row)))
        ctx.barrier()
    finally:
        cache.clear()
        buffer.destroy()
    return results


# ----------------------------------------------------------------------------------------
# Processes.
# ----------------------------------------------------------------------------------------

def _worker(rank: int, world_size: int, store_port: int, options: Dict, result_path: str) -> None:
    opts = BenchOptions(**options)
    timeout = datetime.timedelta(seconds=opts.timeout_s)
    if opts.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        process_backend = "nccl"
    else:
        torch.set_num_threads(1)  # several processes share few cores
        device = torch.device("cpu")
        process_backend = "gloo"
    store = dist.TCPStore("127.0.0.1", store_port, None, False, timeout)
    init_args = dict(store=store, rank=rank, world_size=world_size, timeout=timeout)
    if device.type == "cuda" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        init_args["device_id"] = device  # binds the group to this GPU (torch >= 2.3)
    dist.init_process_group(process_backend, **init_args)
    try:
        import deep_ep
        if opts.num_sms is not None:
            deep_ep.Buffer.set_num_sms(opts.num_sms)
        ctx = BenchContext(rank, world_size, device, opts)
        results: List[WorkloadResult] = []
        info: Dict = {"num_sms": deep_ep.Buffer.num_sms}
        if any(w in HIGH_THROUGHPUT_WORKLOADS for w in opts.workloads):
            ht_results, info = run_high_throughput(ctx)
            results += ht_results
        if any(w in LOW_LATENCY_WORKLOADS for w in opts.workloads):
            results += run_low_latency(ctx)
        if rank == 0:
            order = {name: i for i, name in enumerate(opts.workloads)}
            results.sort(key=lambda r: order[r.workload])
            info["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
            with open(result_path, "w") as file:
                json.dump({"info": info, "results": [dataclasses.asdict(r) for r in results]}, file)
    finally:
        dist.destroy_process_group()


def _format_number(value: Optional[float], digits: int, suffix: str = "") -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}{suffix}"


def format_table(results: List[Dict]) -> str:
    """The results as an aligned text table."""
    header = ["workload", "backend", "ranks", "time (us)", "GB/s", "baseline (us)", "baseline GB/s",
              "speed-up", "check"]
    rows = [[r["workload"], r["backend"], str(r["ranks"]),
             _format_number(r["time_us"], 1), _format_number(r["gbps"], 2 if (r["gbps"] or 0) < 100 else 1),
             _format_number(r["baseline_time_us"], 1),
             _format_number(r["baseline_gbps"], 2 if (r["baseline_gbps"] or 0) < 100 else 1),
             _format_number(r["speedup"], 2, "x"), "ok" if r["check_ok"] else "FAIL"] for r in results]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    left = {0, 1, 8}

    def line(cells: List[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [line(header), line(["-" * w for w in widths])] + [line(row) for row in rows]
    return "\n".join(out)


METRIC_NOTE = ("time = slowest rank's median over {iters} timed calls (after {warmup} warm-up; {clock}). "
               "GB/s = logical bandwidth: token bytes a rank receives, incl. from itself, averaged over ranks "
               "(combine: bytes of the rows it sends back), / time. baseline = torch.distributed."
               "all_to_all_single of the same bytes with the same per-peer splits; speed-up = baseline time / time.")


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[BenchOptions, Optional[str]]:
    """Parse the command line and fill the device-dependent defaults; returns (options, --json path)."""
    parser = argparse.ArgumentParser(prog="python -m deep_ep.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cuda: one process per GPU over NCCL; cpu: gloo processes (default: cuda if present)")
    parser.add_argument("--num-processes", type=int, default=None,
                        help=f"ranks (default: all GPUs, or {CPU_DEFAULT_NUM_PROCESSES} CPU processes)")
    parser.add_argument("--backend", choices=("torch", "cuda"), default=None,
                        help="deep_ep backend (default: Buffer's default)")
    parser.add_argument("--num-tokens", type=int, help="high-throughput tokens per rank")
    parser.add_argument("--hidden", type=int, help="hidden size (a multiple of 128)")
    parser.add_argument("--num-topk", type=int, help="experts per token")
    parser.add_argument("--num-experts", type=int, help="experts in all (a multiple of the rank count)")
    parser.add_argument("--ll-num-tokens", type=int, help="low-latency tokens per rank (= num_max_dispatch_tokens_per_rank)")
    parser.add_argument("--workloads", default="ht,ll",
                        help=f"comma list of ht, ll, all or names: {', '.join(ALL_WORKLOADS)}")
    parser.add_argument("--iters", type=int, help="timed iterations per workload")
    parser.add_argument("--warmup", type=int, help="untimed warm-up iterations per workload")
    parser.add_argument("--num-sms", type=int, default=None, help="Buffer.set_num_sms before the run (even)")
    parser.add_argument("--seed", type=int, default=None, help="input seed (default: a fresh one, printed)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a stuck collective fails")
    parser.add_argument("--json", metavar="FILE", default=None, help="also save the results as JSON")
    args = parser.parse_args(argv)

    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "cpu"
    else:
        device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    defaults = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    if args.num_processes is None:
        num_processes = torch.cuda.device_count() if device == "cuda" else CPU_DEFAULT_NUM_PROCESSES
    else:
        num_processes = args.num_processes
    if num_processes < 1:
        parser.error("--num-processes must be at least 1")
    if device == "cuda" and num_processes > torch.cuda.device_count():
        parser.error(f"--num-processes {num_processes}: only {torch.cuda.device_count()} GPUs")

    workloads: List[str] = []
    for item in (w.strip() for w in args.workloads.split(",") if w.strip()):
        names = WORKLOAD_GROUPS.get(item, (item,) if item in ALL_WORKLOADS else None)
        if names is None:
            parser.error(f"--workloads: unknown {item!r}; use ht, ll, all or {', '.join(ALL_WORKLOADS)}")
        workloads += [n for n in names if n not in workloads]
    if not workloads:
        parser.error("--workloads selects nothing")

    sizes = {key: getattr(args, key) if getattr(args, key) is not None else defaults[key]
             for key in ("num_tokens", "hidden", "num_topk", "num_experts", "ll_num_tokens", "iters", "warmup")}
    if sizes["num_tokens"] < 0 or sizes["ll_num_tokens"] < 1:
        parser.error("--num-tokens must be >= 0 and --ll-num-tokens >= 1")
    if sizes["hidden"] < FP8_GROUP or sizes["hidden"] % FP8_GROUP:
        parser.error(f"--hidden must be a positive multiple of {FP8_GROUP}")
    if sizes["num_experts"] % num_processes:
        parser.error(f"--num-experts {sizes['num_experts']} is not a multiple of the rank count {num_processes}")
    if not 1 <= sizes["num_topk"] <= sizes["num_experts"]:
        parser.error("--num-topk must be between 1 and --num-experts")
    if sizes["iters"] < 1 or sizes["warmup"] < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    if args.num_sms is not None and (args.num_sms <= 0 or args.num_sms % 2):
        parser.error("--num-sms must be a positive even number")
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    options = BenchOptions(device=device, num_processes=num_processes, backend=args.backend,
                           workloads=workloads, num_sms=args.num_sms, seed=seed, timeout_s=args.timeout, **sizes)
    return options, args.json


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; returns the exit status (0: every check passed)."""
    options, json_path = parse_args(argv)
    os.environ.update(MULTICAST_OFF_ENV)
    if options.device == "cpu" and os.path.exists("/sys/class/net/lo"):
        # Every process is on this host: keep gloo on loopback, whatever the hostname resolves to.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch.multiprocessing as mp
    import deep_ep.bench as this_module  # spawn pickles the worker by its importable name

    print(f"deep_ep bench: seed {options.seed} (--seed {options.seed} repeats this run)", flush=True)
    store = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=options.timeout_s),
                          wait_for_workers=False)
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deep_ep_bench_") as scratch:
        result_path = os.path.join(scratch, "results.json")
        try:
            mp.spawn(this_module._worker,
                     args=(options.num_processes, store.port, dataclasses.asdict(options), result_path),
                     nprocs=options.num_processes, join=True)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:  # the others were stopped
            print(f"deep_ep bench: a rank process failed, no results:\n{error}", file=sys.stderr)
            return 1
        with open(result_path) as file:
            gathered = json.load(file)
    wall_s = time.perf_counter() - begin
    info, results = gathered["info"], gathered["results"]

    if options.device == "cuda":
        where = f"{options.num_processes} x {info['gpu']} (NCCL), Buffer.num_sms = {info['num_sms']}"
    else:
        where = f"{options.num_processes} CPU processes (gloo)"
    print(f"device: {where}")
    print(f"high-throughput: {options.num_tokens} tokens x {options.hidden} hidden, top-{options.num_topk} of "
          f"{options.num_experts} experts; low-latency: {options.ll_num_tokens} tokens")
    print(format_table(results))
    clock = "CUDA events" if options.device == "cuda" else "perf_counter"
    print(METRIC_NOTE.format(iters=options.iters, warmup=options.warmup, clock=clock))
    failed = [r for r in results if not r["check_ok"]]
    for r in failed:
        print(f"FAIL {r['workload']}: {r['check_message']}")
    print(f"{len(results) - len(failed)}/{len(results)} checks passed; wall time {wall_s:.1f} s")

    if json_path:
        document = {"options": dataclasses.asdict(options), "device": where, "wall_s": wall_s,
                    "torch": torch.__version__, **info, "results": results}
        with open(json_path, "w") as file:
            json.dump(document, file, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
