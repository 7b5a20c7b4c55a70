"""Low-latency dispatch and combine on the torch backend vs the oracle (world sizes 1, 2, 4).

The packed per-expert layout leaves the order of the (expert, source rank) blocks and of the
rows inside a block free, so rows are matched by content: each expected token's exact bytes
(bf16 row, or the oracle's own FP8 codes + scales) identify its source, and we check that the
rows of each source are contiguous and that the multiset of rows is exactly what was sent.
Combine is checked with experts that scale their input by a power of two per expert.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

import oracle
from case_inputs import (
    Checks,
    Scenario,
    check_close,
    low_latency_buffer,
    make_inputs,
    random_scenarios,
    to_numpy_f32,
)
from dist_utils import CaseContext, CaseSet

CASES = CaseSet(__name__)


@dataclasses.dataclass
class Mode:
    use_fp8: bool = True
    round_scale: bool = False
    use_ue8m0: bool = False

    def describe(self) -> str:
        return f"use_fp8={self.use_fp8} round_scale={self.round_scale} use_ue8m0={self.use_ue8m0}"

    def kwargs(self) -> dict:
        return dict(use_fp8=self.use_fp8, round_scale=self.round_scale, use_ue8m0=self.use_ue8m0)


MODES = [Mode(), Mode(round_scale=True), Mode(round_scale=True, use_ue8m0=True), Mode(use_fp8=False)]


def expert_scale(num_experts: int) -> List[float]:
    """The test's experts multiply their input by 2 ** (e % 5 - 2): exact in bf16."""
    return [2.0 ** (e % 5 - 2) for e in range(num_experts)]


class LowLatencyOracle:
    """Expected low-latency results on one rank, from every rank's inputs."""

    def __init__(self, inputs, scenario: Scenario, mode: Mode, world_size: int, rank: int) -> None:
        self.inputs = inputs
        self.scenario = scenario
        self.mode = mode
        self.rank = rank
        self.world_size = world_size
        self.num_local = scenario.num_experts // world_size
        topk_all = [inp.topk_idx.numpy() for inp in inputs]
        self.expected = oracle.low_latency_dispatch(topk_all, scenario.num_experts, world_size, rank)
        self.casts: List[Tuple[np.ndarray, np.ndarray]] = []
        for inp in inputs:
            if mode.use_fp8:
                self.casts.append(oracle.fp8_cast(to_numpy_f32(inp.x), mode.round_scale, mode.use_ue8m0))
            else:
                bits = inp.x.contiguous().view(torch.int16).numpy()
                self.casts.append((bits, np.zeros((bits.shape[0], 0), np.float32)))

    def signature(self, src: int, t: int) -> bytes:
        data, scales = self.casts[src]
        return data[t].tobytes() + scales[t].tobytes()

    def dequantized(self, src: int) -> np.ndarray:
        """What a token looks like after the dispatch, as float32 (what the experts read)."""
        if not self.mode.use_fp8:
            return to_numpy_f32(self.inputs[src].x)
        codes, scales = self.casts[src]
        if self.mode.use_ue8m0:
            scales = oracle.ue8m0_unpack(scales, codes.shape[1] // 128)
        values = oracle.e4m3_codes_to_float(codes).astype(np.float32)
        groups = codes.shape[1] // 128
        return (values.reshape(codes.shape[0], groups, 128) * scales[:, :groups, None]).reshape(codes.shape)

    def combine(self) -> Tuple[np.ndarray, np.ndarray]:
        deq = torch.from_numpy(self.dequantized(self.rank)).to(torch.bfloat16).float().numpy()
        inp = self.inputs[self.rank]
        return oracle.low_latency_combine(
            deq, inp.topk_idx.numpy(), inp.topk_weights.numpy(), expert_scale(self.scenario.num_experts)
        )


def _row_bytes(data: torch.Tensor, scales: Optional[torch.Tensor], mode: Mode, le: int, count: int) -> List[bytes]:
    if mode.use_fp8:
        codes = data[le, :count].contiguous().view(torch.uint8).numpy()
        scale_rows = scales[le, :count].contiguous().numpy()
    else:
        codes = data[le, :count].contiguous().view(torch.int16).numpy()
        scale_rows = np.zeros((count, 0), np.float32)
    return [codes[i].tobytes() + scale_rows[i].tobytes() for i in range(count)]


def check_dispatch(result, ref: LowLatencyOracle, num_max: int) -> None:
    """recv_x / recv_count of one rank against the oracle (see the module docstring)."""
    recv_x, recv_count = result[0], result[1]
    scenario, mode = ref.scenario, ref.mode
    hidden, num_local = scenario.hidden, ref.num_local
    slots = ref.world_size * num_max
    if mode.use_fp8:
        assert isinstance(recv_x, tuple) and len(recv_x) == 2, f"FP8 recv_x is {type(recv_x)}, expected a pair"
        data, scales = recv_x
        assert data.dtype == torch.float8_e4m3fn, f"recv_x[0] dtype {data.dtype}"
        if mode.use_ue8m0:
            assert scales.dtype == torch.int32, f"recv_x[1] dtype {scales.dtype}, expected int32 (ue8m0 packed)"
            expected_scale_shape = (num_local, slots, hidden // 512)
        else:
            assert scales.dtype == torch.float32, f"recv_x[1] dtype {scales.dtype}, expected float32"
            expected_scale_shape = (num_local, slots, hidden // 128)
        assert tuple(scales.shape) == expected_scale_shape, (
            f"recv_x[1] shape {tuple(scales.shape)}, expected {expected_scale_shape}"
        )
    else:
        assert isinstance(recv_x, torch.Tensor), f"bf16 recv_x is {type(recv_x)}"
        data, scales = recv_x, None
        assert data.dtype == torch.bfloat16, f"recv_x dtype {data.dtype}, expected bfloat16"
    assert tuple(data.shape) == (num_local, slots, hidden), (
        f"recv_x data shape {tuple(data.shape)}, expected {(num_local, slots, hidden)}"
    )
    assert recv_count.dtype == torch.int32 and tuple(recv_count.shape) == (num_local,), (
        f"recv_count {recv_count.dtype} {tuple(recv_count.shape)}, expected int32 ({num_local},)"
    )
    for le in range(num_local):
        expected_blocks = ref.expected[le]
        expected_count = sum(len(v) for v in expected_blocks.values())
        count = int(recv_count[le])
        assert count == expected_count, f"recv_count[{le}] = {count}, expected {expected_count}"
        owner: Dict[bytes, int] = {}
        expected_sigs = collections.Counter()
        for src, tokens in expected_blocks.items():
            for t in tokens:
                sig = ref.signature(src, t)
                owner[sig] = src
                expected_sigs[sig] += 1
        actual = _row_bytes(data, scales, mode, le, count)
        unknown = [i for i, sig in enumerate(actual) if sig not in owner]
        if unknown:
            raise AssertionError(
                f"local expert {le}: {len(unknown)} of {count} received rows match no token sent to it "
                f"(first: row {unknown[0]}); " + _explain_mismatch(actual[unknown[0]], expected_blocks, ref)
            )
        assert collections.Counter(actual) == expected_sigs, f"local expert {le}: rows are not the tokens sent to it"
        runs = [owner[sig] for sig in actual]
        seen, previous = set(), None
        for src in runs:
            if src != previous:
                assert src not in seen, f"local expert {le}: rows from source rank {src} are not contiguous: {runs}"
                seen.add(src)
                previous = src


def _explain_mismatch(row: bytes, expected_blocks, ref: LowLatencyOracle) -> str:
    """Which sent token the row is closest to, and how many bytes of data/scales differ."""
    best = None
    for src, tokens in expected_blocks.items():
        for t in tokens:
            sig = ref.signature(src, t)
            if len(sig) != len(row):
                return f"row has {len(row)} bytes, expected {len(sig)}"
            diff = sum(a != b for a, b in zip(sig, row))
            if best is None or diff < best[0]:
                best = (diff, src, t, sig)
    if best is None:
        return "no token was expected"
    diff, src, t, sig = best
    data_bytes = ref.casts[src][0][t].nbytes
    data_diff = sum(a != b for a, b in zip(sig[:data_bytes], row[:data_bytes]))
    return (
        f"closest: token {t} of rank {src}, {data_diff} data bytes and {diff - data_diff} scale bytes differ "
        f"({ref.mode.describe()}; oracle scales of that token: {ref.casts[src][1][t][:4]}...)"
    )


def expert_output(result, ref: LowLatencyOracle, num_max: int, fill: float = 0.0) -> torch.Tensor:
    """The test's experts: out = dequantized input * expert_scale[e]; rows past the count = fill."""
    recv_x, recv_count = result[0], result[1]
    if ref.mode.use_fp8:
        data, scales = recv_x
        values = data.float()
        if ref.mode.use_ue8m0:
            exps = scales.contiguous().view(torch.uint8).to(torch.int32)
            scales = (exps << 23).view(torch.float32)
        else:
            scales = scales.contiguous()
        values = (values.view(*values.shape[:2], -1, 128) * scales[..., : values.shape[-1] // 128, None]).view(values.shape)
    else:
        values = recv_x.float()
    values = values.to(torch.bfloat16).float()
    factors = expert_scale(ref.scenario.num_experts)
    out = torch.full(values.shape, fill, dtype=torch.bfloat16)
    for le in range(ref.num_local):
        count = int(recv_count[le])
        factor = factors[ref.rank * ref.num_local + le]
        out[le, :count] = (values[le, :count] * factor).to(torch.bfloat16)
    return out


def _ll_scenarios(seed: int, world_size: int, count: int, hidden_choices=(512, 1024)) -> List[Tuple[Scenario, int]]:
    """Scenarios with num_max_dispatch_tokens_per_rank >= every rank's token count."""
    rng = random.Random(seed ^ 0x5A5A)
    out = []
    for scenario in random_scenarios(seed, world_size, count, hidden_choices=hidden_choices, max_tokens=24):
        num_max = max(scenario.num_tokens + [1]) + rng.randint(0, 4)
        out.append((scenario, num_max))
    return out


def round_trip(ctx, buffer, scenario, num_max, mode, checks: Checks, salt: int, *, combine=True,
               dispatch_kwargs=None, combine_kwargs=None, zero_copy=False, use_out=False, fill=0.0,
               combine_rel=1e-2, with_stats=False) -> None:
    where = f"[{scenario.describe()} num_max={num_max}] [{mode.describe()}]"
    if dispatch_kwargs:
        where += f" dispatch{dispatch_kwargs}"
    if combine_kwargs or zero_copy or use_out or fill:
        where += f" combine{combine_kwargs or {}} zero_copy={zero_copy} out={use_out} fill={fill}"
    inputs = make_inputs(ctx.generator(salt), scenario)
    ref = LowLatencyOracle(inputs, scenario, mode, ctx.world_size, ctx.rank)
    mine = inputs[ctx.rank]
    dispatch_kwargs = dict(dispatch_kwargs or {})
    hook_mode = dispatch_kwargs.get("return_recv_hook", False)
    stats = None
    if with_stats:
        stats = torch.full((ref.num_local,), 5, dtype=torch.int32)
        dispatch_kwargs["cumulative_local_expert_recv_stats"] = stats
        dispatch_kwargs["dispatch_wait_recv_cost_stats"] = torch.zeros(ctx.world_size, dtype=torch.int64)
    result = buffer.low_latency_dispatch(mine.x, mine.topk_idx, num_max, scenario.num_experts,
                                         **mode.kwargs(), **dispatch_kwargs)
    assert isinstance(result, tuple) and len(result) == 5, f"low_latency_dispatch returned {type(result)}"
    handle, event, hook = result[2], result[3], result[4]
    if hook_mode:
        assert callable(hook), f"return_recv_hook=True must return a callable hook, got {type(hook)}"
        hook()
    if dispatch_kwargs.get("async_finish"):
        event.current_stream_wait()
    checks.run(f"{where} dispatch", lambda: check_dispatch(result, ref, num_max))
    if stats is not None:
        expected_counts = [5 + sum(len(v) for v in blocks.values()) for blocks in ref.expected]
        checks.run(f"{where} cumulative_local_expert_recv_stats",
                   lambda: _assert(stats.tolist() == expected_counts,
                                   f"cumulative stats {stats.tolist()}, expected {expected_counts}"))
    if not combine:
        return
    y = expert_output(result, ref, num_max, fill)
    combine_kwargs = dict(combine_kwargs or {})
    combine_hook = combine_kwargs.get("return_recv_hook", False)
    if zero_copy:
        buf = buffer.get_next_low_latency_combine_buffer(handle)
        checks.run(
            f"{where} combine buffer",
            lambda: _assert(buf.dtype == torch.bfloat16 and tuple(buf.shape) == tuple(y.shape),
                            f"get_next_low_latency_combine_buffer: {buf.dtype} {tuple(buf.shape)}, "
                            f"expected bfloat16 {tuple(y.shape)}"),
        )
        buf.copy_(y)
        y = buf
        combine_kwargs["zero_copy"] = True
    out = None
    if use_out:
        out = torch.full((scenario.num_tokens[ctx.rank], scenario.hidden), float("nan"), dtype=torch.bfloat16)
        combine_kwargs["out"] = out
    combined = buffer.low_latency_combine(y, mine.topk_idx, mine.topk_weights, handle, **combine_kwargs)
    assert isinstance(combined, tuple) and len(combined) == 3, f"low_latency_combine returned {type(combined)}"
    combined_x, event, hook = combined
    if combine_hook:
        assert callable(hook), f"return_recv_hook=True must return a callable hook, got {type(hook)}"
        hook()
    if combine_kwargs.get("async_finish"):
        event.current_stream_wait()
    expected, magnitude = ref.combine()

    def check_combined():
        assert combined_x.dtype == torch.bfloat16, f"combined_x dtype {combined_x.dtype}"
        check_close(combined_x, expected, magnitude, "combined_x", rel=combine_rel)
        if out is not None:
            assert combined_x.data_ptr() == out.data_ptr(), "combined_x is not the `out` tensor"
            check_close(out, expected, magnitude, "out", rel=combine_rel)

    checks.run(f"{where} combine", check_combined)


def _assert(condition, message):
    assert condition, message


@CASES.case(world_sizes=(1, 2, 4))
def fp8_and_bf16_modes(ctx: CaseContext) -> None:
    """Every dispatch mode (FP8, round_scale, ue8m0, bf16), each followed by combine."""
    checks = Checks(f"on rank {ctx.rank}")
    salt = 0
    for scenario, num_max in _ll_scenarios(ctx.seed, ctx.world_size, 4, hidden_choices=(384, 512, 1024)):
        buffer = low_latency_buffer(ctx, num_max, scenario.hidden, scenario.num_experts)
        for mode in MODES:
            if mode.use_ue8m0 and scenario.hidden % 512 != 0:
                continue  # 4 scales per int32: ue8m0 needs hidden % 512 == 0
            salt += 1
            round_trip(ctx, buffer, scenario, num_max, mode, checks, salt)
    checks.finish()


@CASES.case(world_sizes=(1, 2, 4))
def edge_shapes(ctx: CaseContext) -> None:
    w = ctx.world_size
    cases = [
        (Scenario([0] * w, 512, 4, 16), 3),
        (Scenario([4] * w, 512, 3, 16, masked_fraction=1.0), 4),
        (Scenario([6] * w, 512, 9, 256), 6),
        (Scenario([5] * w, 512, 8, 8), 8),
        (Scenario([16] * w, 512, 6, 64, hot_experts=True), 16),
        (Scenario([1] + [0] * (w - 1), 512, 1, 8), 1),
    ]
    checks = Checks(f"on rank {ctx.rank}")
    for salt, (scenario, num_max) in enumerate(cases):
        buffer = low_latency_buffer(ctx, num_max, scenario.hidden, scenario.num_experts)
        for mode in (MODES[0], MODES[3]):
            round_trip(ctx, buffer, scenario, num_max, mode, checks, salt)
    checks.finish()


@CASES.case(world_sizes=(1, 2, 4))
def large_hidden(ctx: CaseContext) -> None:
    checks = Checks(f"on rank {ctx.rank}")
    for i, hidden in enumerate((2048, 4096, 7168)):
        scenario, _ = _ll_scenarios(ctx.seed + i, ctx.world_size, 1)[0]
        scenario.hidden = hidden
        scenario.num_tokens = [min(n, 4) for n in scenario.num_tokens]
        scenario.num_experts = min(scenario.num_experts, 32)
        scenario.num_topk = min(scenario.num_topk, scenario.num_experts)
        num_max = 4
        buffer = low_latency_buffer(ctx, num_max, hidden, scenario.num_experts)
        for mode in (MODES[0], MODES[2], MODES[3]):
            round_trip(ctx, buffer, scenario, num_max, mode, checks, 10 * i + len(mode.describe()))
    checks.finish()


@CASES.case(world_sizes=(1, 2, 4))
def stats_tensors(ctx: CaseContext) -> None:
    """cumulative_local_expert_recv_stats grows by recv_count; wait-cost stats keep shape/dtype."""
    scenario, num_max = _ll_scenarios(ctx.seed, ctx.world_size, 1)[0]
    buffer = low_latency_buffer(ctx, num_max, scenario.hidden, scenario.num_experts)
    num_local = scenario.num_experts // ctx.world_size
    cumulative = torch.zeros(num_local, dtype=torch.int32)
    dispatch_wait = torch.zeros(ctx.world_size, dtype=torch.int64)
    combine_wait = torch.zeros(ctx.world_size, dtype=torch.int64)
    inputs = make_inputs(ctx.generator(), scenario)
    mine = inputs[ctx.rank]
    total = torch.zeros(num_local, dtype=torch.int64)
    for _ in range(2):
        recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
            mine.x, mine.topk_idx, num_max, scenario.num_experts,
            cumulative_local_expert_recv_stats=cumulative, dispatch_wait_recv_cost_stats=dispatch_wait,
        )
        total += recv_count.long()
        y = torch.zeros((num_local, ctx.world_size * num_max, scenario.hidden), dtype=torch.bfloat16)
        buffer.low_latency_combine(y, mine.topk_idx, mine.topk_weights, handle,
                                   combine_wait_recv_cost_stats=combine_wait)
        assert cumulative.dtype == torch.int32 and tuple(cumulative.shape) == (num_local,)
        assert torch.equal(cumulative.long(), total), f"cumulative stats {cumulative.tolist()}, expected {total.tolist()}"
        for name, stats in (("dispatch_wait_recv_cost_stats", dispatch_wait), ("combine_wait_recv_cost_stats", combine_wait)):
            assert stats.dtype == torch.int64 and tuple(stats.shape) == (ctx.world_size,), f"{name}: {stats.dtype} {tuple(stats.shape)}"
            assert bool((stats >= 0).all()), f"{name} has negative entries: {stats.tolist()}"
    expected = oracle.low_latency_dispatch([i.topk_idx.numpy() for i in inputs], scenario.num_experts, ctx.world_size, ctx.rank)
    expected_counts = [2 * sum(len(v) for v in blocks.values()) for blocks in expected]
    assert cumulative.tolist() == expected_counts, f"cumulative stats {cumulative.tolist()}, expected {expected_counts}"


@CASES.case(world_sizes=(1, 2, 4))
def hooks_and_async(ctx: CaseContext) -> None:
    """return_recv_hook: results complete once hook() ran; async_finish returns a usable event."""
    checks = Checks(f"on rank {ctx.rank}")
    scenario, num_max = _ll_scenarios(ctx.seed, ctx.world_size, 1)[0]
    buffer = low_latency_buffer(ctx, num_max, scenario.hidden, scenario.num_experts)
    round_trip(ctx, buffer, scenario, num_max, MODES[0], checks, 1,
               dispatch_kwargs=dict(return_recv_hook=True), combine_kwargs=dict(return_recv_hook=True),
               with_stats=True)
    round_trip(ctx, buffer, scenario, num_max, MODES[3], checks, 2,
               dispatch_kwargs=dict(return_recv_hook=True), combine_kwargs=dict(return_recv_hook=True))
    round_trip(ctx, buffer, scenario, num_max, MODES[1], checks, 3,
               dispatch_kwargs=dict(async_finish=True), combine_kwargs=dict(async_finish=True), with_stats=True)
    # Hook mode with the other combine options.
    round_trip(ctx, buffer, scenario, num_max, MODES[3], checks, 4, dispatch_kwargs=dict(return_recv_hook=True),
               combine_kwargs=dict(return_recv_hook=True), zero_copy=True, use_out=True)
    checks.finish()


@CASES.case(world_sizes=(1, 2, 4))
def combine_options(ctx: CaseContext) -> None:
    """zero_copy through get_next_low_latency_combine_buffer, out=, use_logfmt accepted."""
    checks = Checks(f"on rank {ctx.rank}")
    scenario, num_max = _ll_scenarios(ctx.seed, ctx.world_size, 1)[0]
    buffer = low_latency_buffer(ctx, num_max, scenario.hidden, scenario.num_experts)
    round_trip(ctx, buffer, scenario, num_max, MODES[3], checks, 1, zero_copy=True)
    round_trip(ctx, buffer, scenario, num_max, MODES[0], checks, 2, use_out=True)
    round_trip(ctx, buffer, scenario, num_max, MODES[0], checks, 3, zero_copy=True, use_out=True)
    # LogFMT is a lossy wire format: accept it and allow its coarser rounding.
    round_trip(ctx, buffer, scenario, num_max, MODES[0], checks, 4, combine_kwargs=dict(use_logfmt=True), combine_rel=0.1)
    checks.finish()


@CASES.case(world_sizes=(1, 2, 4))
def combine_ignores_padding_rows(ctx: CaseContext) -> None:
    """Rows past recv_count hold garbage (NaN here); combine must read only the rows tokens landed in."""
    checks = Checks(f"on rank {ctx.rank}")
    scenario, num_max = _ll_scenarios(ctx.seed, ctx.world_size, 1)[0]
    buffer = low_latency_buffer(ctx, num_max, scenario.hidden, scenario.num_experts)
    round_trip(ctx, buffer, scenario, num_max, MODES[3], checks, 1, fill=float("nan"))
    checks.finish()


@CASES.case(world_sizes=(1, 2, 4))
def two_results_alive(ctx: CaseContext) -> None:
    """Two low-latency results may be alive at once: A stays intact after dispatching B."""
    scenario, num_max = _ll_scenarios(ctx.seed, ctx.world_size, 1)[0]
    buffer = low_latency_buffer(ctx, num_max, scenario.hidden, scenario.num_experts)
    refs, results = [], []
    for salt in (1, 2):
        inputs = make_inputs(ctx.generator(salt), scenario)
        refs.append(LowLatencyOracle(inputs, scenario, MODES[0], ctx.world_size, ctx.rank))
        mine = inputs[ctx.rank]
        results.append(buffer.low_latency_dispatch(mine.x, mine.topk_idx, num_max, scenario.num_experts))
    check_dispatch(results[0], refs[0], num_max)
    check_dispatch(results[1], refs[1], num_max)
    for ref, result in zip(refs, results):
        mine = ref.inputs[ctx.rank]
        y = expert_output(result, ref, num_max)
        combined_x, _, _ = buffer.low_latency_combine(y, mine.topk_idx, mine.topk_weights, result[2])
        expected, magnitude = ref.combine()
        check_close(combined_x, expected, magnitude, "combined_x")


@CASES.case(world_sizes=(1, 2, 4))
def clean_buffer_then_round_trip(ctx: CaseContext) -> None:
    checks = Checks(f"on rank {ctx.rank}")
    scenario, num_max = _ll_scenarios(ctx.seed, ctx.world_size, 1)[0]
    buffer = low_latency_buffer(ctx, num_max, scenario.hidden, scenario.num_experts)
    round_trip(ctx, buffer, scenario, num_max, MODES[0], checks, 1)
    buffer.clean_low_latency_buffer(num_max, scenario.hidden, scenario.num_experts)
    round_trip(ctx, buffer, scenario, num_max, MODES[0], checks, 2)
    # A smaller request on the same buffer after cleaning is valid too.
    buffer.clean_low_latency_buffer(max(1, num_max // 2), scenario.hidden, scenario.num_experts)
    small = dataclasses.replace(scenario, num_tokens=[min(n, max(1, num_max // 2)) for n in scenario.num_tokens])
    round_trip(ctx, buffer, small, max(1, num_max // 2), MODES[3], checks, 3)
    checks.finish()


test_case = CASES.pytest_function()
