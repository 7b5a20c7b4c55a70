"""Every bad input of DESIGN.md §5 gets a clear error, and the buffer still works afterwards.

Each bad call must raise ValueError/TypeError (RuntimeError where noted) whose message names
the offending argument. After every bad call a correct call runs on the same buffer and its
result is checked against the oracle. All ranks make the same bad call (an error is raised
before any communication, so all ranks must agree on it).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

import oracle
from case_inputs import (
    NVL_BYTES,
    Checks,
    Scenario,
    check_close,
    check_equal,
    expect_error,
    fp8_pair_with_strided_scales,
    high_throughput_buffer,
    low_latency_buffer,
    make_buffer,
    make_inputs,
    to_numpy_f32,
)
from dist_utils import CaseContext, CaseSet

CASES = CaseSet(__name__)

ARG_ERRORS = (ValueError, TypeError)


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, every other column of a twice-as-wide tensor."""
    wide = torch.zeros((t.shape[0], t.shape[1] * 2), dtype=t.dtype)
    wide[:, ::2] = t
    view = wide[:, ::2]
    assert not view.is_contiguous() or t.numel() <= 1
    return view


class Errors:
    """Runs bad calls, each followed by a good call, collecting what went wrong."""

    def __init__(self, ctx: CaseContext, good_call: Callable[[], None]) -> None:
        self.checks = Checks(f"on rank {ctx.rank}")
        self.good_call = good_call

    def bad(self, what: str, call: Callable[[], object], names: Sequence[str], types=ARG_ERRORS) -> None:
        self.checks.add(expect_error(call, names, what, types))
        try:
            self.good_call()
        except AssertionError as error:
            self.checks.add(f"correct call after [{what}] gave a wrong result: {error}")
        except Exception as error:  # noqa: BLE001
            self.checks.add(f"correct call after [{what}] raised {type(error).__name__}: {error}")

    def finish(self) -> None:
        self.checks.finish()


def _scenario(world_size: int) -> Scenario:
    return Scenario([6] * world_size, 256, 3, 4 * world_size)


@CASES.case(world_sizes=(1, 2, 4))
def layout_errors(ctx: CaseContext) -> None:
    scenario = _scenario(ctx.world_size)
    inputs = make_inputs(ctx.generator(), scenario)
    buffer = make_buffer(ctx, num_nvl_bytes=NVL_BYTES)
    topk = inputs[ctx.rank].topk_idx
    E = scenario.num_experts
    expected = oracle.layout(topk.numpy(), E, ctx.world_size, ctx.world_size)

    def good():
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, E)
        check_equal(per_rank, torch.from_numpy(expected.num_tokens_per_rank).int(), "num_tokens_per_rank")
        check_equal(per_expert, torch.from_numpy(expected.num_tokens_per_expert).int(), "num_tokens_per_expert")
        check_equal(in_rank, torch.from_numpy(expected.is_token_in_rank), "is_token_in_rank")

    errors = Errors(ctx, good)
    errors.bad("topk_idx int32", lambda: buffer.get_dispatch_layout(topk.int(), E), ["topk_idx"])
    errors.bad("topk_idx float", lambda: buffer.get_dispatch_layout(topk.float(), E), ["topk_idx"])
    errors.bad("topk_idx 1-D", lambda: buffer.get_dispatch_layout(topk.reshape(-1), E), ["topk_idx"])
    errors.bad("topk_idx 3-D", lambda: buffer.get_dispatch_layout(topk.unsqueeze(0), E), ["topk_idx"])
    errors.bad("topk_idx non-contiguous", lambda: buffer.get_dispatch_layout(_non_contiguous(topk), E), ["topk_idx"])
    errors.bad("topk_idx on the meta device", lambda: buffer.get_dispatch_layout(_meta(topk), E), ["topk_idx"])
    too_big = topk.clone()
    too_big[0, 0] = E
    errors.bad("topk_idx == num_experts", lambda: buffer.get_dispatch_layout(too_big, E), ["topk_idx"])
    too_small = topk.clone()
    too_small[-1, -1] = -2
    errors.bad("topk_idx == -2", lambda: buffer.get_dispatch_layout(too_small, E), ["topk_idx"])
    errors.bad("topk_idx not a tensor", lambda: buffer.get_dispatch_layout(topk.tolist(), E), ["topk_idx"])
    if ctx.world_size > 1:
        errors.bad("num_experts % num_ranks != 0", lambda: buffer.get_dispatch_layout(topk, E + 1), ["num_experts"])
    errors.bad("num_experts = 0", lambda: buffer.get_dispatch_layout(topk, 0), ["num_experts"])
    errors.bad(
        "allocate_on_comm_stream without previous_event",
        lambda: buffer.get_dispatch_layout(topk, E, async_finish=True, allocate_on_comm_stream=True),
        ["previous_event", "allocate_on_comm_stream"],
    )
    errors.finish()


def _dispatch_setup(ctx: CaseContext, hidden: int = 256):
    scenario = Scenario([6] * ctx.world_size, hidden, 3, 4 * ctx.world_size)
    inputs = make_inputs(ctx.generator(), scenario)
    buffer = high_throughput_buffer(ctx, hidden * 2)  # room for the "another hidden" checks
    mine = inputs[ctx.rank]
    layout = buffer.get_dispatch_layout(mine.topk_idx, scenario.num_experts)[:4]
    topk_all = [i.topk_idx.numpy() for i in inputs]
    weights_all = [i.topk_weights.numpy() for i in inputs]
    expected_all = [
        oracle.dispatch(topk_all, weights_all, scenario.num_experts, ctx.world_size, d) for d in range(ctx.world_size)
    ]
    return scenario, inputs, buffer, mine, layout, expected_all


def _layout_kwargs(layout):
    return dict(num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1],
                num_tokens_per_expert=layout[2], is_token_in_rank=layout[3])


@CASES.case(world_sizes=(1, 2, 4))
def dispatch_errors(ctx: CaseContext) -> None:
    scenario, inputs, buffer, mine, layout, expected_all = _dispatch_setup(ctx)
    expected = expected_all[ctx.rank]
    kw = _layout_kwargs(layout)
    topk_kw = dict(topk_idx=mine.topk_idx, topk_weights=mine.topk_weights)
    state = {}

    def good():
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(mine.x, **kw, **topk_kw)
        rows = [inputs[s].x[t] for s, t in expected.sources]
        want = torch.stack(rows) if rows else torch.empty(0, scenario.hidden, dtype=torch.bfloat16)
        check_equal(recv_x, want, "recv_x")
        check_equal(recv_idx, torch.from_numpy(expected.recv_topk_idx), "recv_topk_idx")
        assert counts == expected.num_recv_tokens_per_expert, f"counts {counts}"
        state["handle"] = handle

    good()
    handle = state["handle"]
    errors = Errors(ctx, good)
    x = mine.x
    errors.bad("x float32", lambda: buffer.dispatch(x.float(), **kw, **topk_kw), ["x"])
    errors.bad("x 1-D", lambda: buffer.dispatch(x.reshape(-1), **kw, **topk_kw), ["x"])
    errors.bad("x non-contiguous", lambda: buffer.dispatch(_non_contiguous(x), **kw, **topk_kw), ["x"])
    errors.bad("x on the meta device", lambda: buffer.dispatch(_meta(x), **kw, **topk_kw), ["x"])
    errors.bad("x with a token count that disagrees with is_token_in_rank",
               lambda: buffer.dispatch(x[:-1].contiguous(), **kw, **topk_kw), ["x", "is_token_in_rank", "topk_idx"])
    codes, scales = oracle.fp8_cast(to_numpy_f32(x))
    data, strided_scales = fp8_pair_with_strided_scales(codes, scales)
    errors.bad("FP8 scales float16", lambda: buffer.dispatch((data, strided_scales.half()), **kw, **topk_kw),
               ["x", "x[1]", "scales", "x_scales"])
    errors.bad("FP8 scales wrong shape",
               lambda: buffer.dispatch((data, torch.ones(data.shape[0], data.shape[1] // 128 + 1)), **kw, **topk_kw),
               ["x", "x[1]", "scales", "x_scales"])
    errors.bad("FP8 data bf16 in the pair", lambda: buffer.dispatch((x, strided_scales), **kw, **topk_kw),
               ["x", "x[0]"])
    errors.bad("FP8 pair of three", lambda: buffer.dispatch((data, strided_scales, strided_scales), **kw, **topk_kw),
               ["x"])
    bad_topk = mine.topk_idx.clone()
    bad_topk[0, 0] = scenario.num_experts
    errors.bad("topk_idx out of range", lambda: buffer.dispatch(x, **kw, topk_idx=bad_topk, topk_weights=mine.topk_weights),
               ["topk_idx"])
    errors.bad("topk_idx int32", lambda: buffer.dispatch(x, **kw, topk_idx=mine.topk_idx.int(), topk_weights=mine.topk_weights),
               ["topk_idx"])
    errors.bad("topk_weights float64",
               lambda: buffer.dispatch(x, **kw, topk_idx=mine.topk_idx, topk_weights=mine.topk_weights.double()),
               ["topk_weights"])
    errors.bad("topk_weights wrong shape",
               lambda: buffer.dispatch(x, **kw, topk_idx=mine.topk_idx, topk_weights=mine.topk_weights[:, :1].contiguous()),
               ["topk_weights"])
    bad_kw = dict(kw, is_token_in_rank=kw["is_token_in_rank"].int())
    errors.bad("is_token_in_rank int32", lambda: buffer.dispatch(x, **bad_kw, **topk_kw), ["is_token_in_rank"])
    bad_kw = dict(kw, num_tokens_per_rank=kw["num_tokens_per_rank"].long())
    errors.bad("num_tokens_per_rank int64", lambda: buffer.dispatch(x, **bad_kw, **topk_kw), ["num_tokens_per_rank"])
    bad_kw = dict(kw, num_tokens_per_expert=kw["num_tokens_per_expert"].float())
    errors.bad("num_tokens_per_expert float", lambda: buffer.dispatch(x, **bad_kw, **topk_kw), ["num_tokens_per_expert"])
    errors.bad("cached handle with topk_idx", lambda: buffer.dispatch(x, handle=handle, topk_idx=mine.topk_idx),
               ["topk_idx"])
    errors.bad("cached handle with topk_weights", lambda: buffer.dispatch(x, handle=handle, topk_weights=mine.topk_weights),
               ["topk_weights"])
    errors.bad("cached handle, x with another hidden",
               lambda: buffer.dispatch(torch.zeros(x.shape[0], x.shape[1] * 2, dtype=torch.bfloat16), handle=handle),
               ["x", "hidden", "handle"])
    errors.bad("handle of the wrong type", lambda: buffer.dispatch(x, handle=object()), ["handle"])
    errors.bad("allocate_on_comm_stream without previous_event",
               lambda: buffer.dispatch(x, **kw, **topk_kw, async_finish=True, allocate_on_comm_stream=True),
               ["previous_event", "allocate_on_comm_stream"])
    errors.bad("expert_alignment 0", lambda: buffer.dispatch(x, **kw, **topk_kw, expert_alignment=0), ["expert_alignment"])
    errors.bad("num_worst_tokens -1", lambda: buffer.dispatch(x, **kw, **topk_kw, num_worst_tokens=-1), ["num_worst_tokens"])
    errors.bad("config of the wrong type", lambda: buffer.dispatch(x, **kw, **topk_kw, config=object()), ["config"])
    errors.finish()


@CASES.case(world_sizes=(1, 2, 4))
def dispatch_buffer_too_small(ctx: CaseContext) -> None:
    """A buffer smaller than the config's size hint: a clear error, and a big enough one works."""
    scenario = Scenario([4] * ctx.world_size, 1024, 2, 2 * ctx.world_size)
    inputs = make_inputs(ctx.generator(), scenario)
    mine = inputs[ctx.rank]
    small = make_buffer(ctx, num_nvl_bytes=4096)
    layout = small.get_dispatch_layout(mine.topk_idx, scenario.num_experts)[:4]
    message = expect_error(
        lambda: small.dispatch(mine.x, **_layout_kwargs(layout), topk_idx=mine.topk_idx, topk_weights=mine.topk_weights),
        ["num_nvl_bytes"], "dispatch with num_nvl_bytes=4096",
    )
    assert message is None, message
    big = high_throughput_buffer(ctx, scenario.hidden)
    recv_x = big.dispatch(mine.x, **_layout_kwargs(layout), topk_idx=mine.topk_idx, topk_weights=mine.topk_weights)[0]
    expected = oracle.dispatch([i.topk_idx.numpy() for i in inputs], None, scenario.num_experts, ctx.world_size, ctx.rank)
    rows = [inputs[s].x[t] for s, t in expected.sources]
    check_equal(recv_x, torch.stack(rows) if rows else torch.empty(0, scenario.hidden, dtype=torch.bfloat16), "recv_x")


@CASES.case(world_sizes=(1, 2, 4))
def combine_errors(ctx: CaseContext) -> None:
    scenario, inputs, buffer, mine, layout, expected_all = _dispatch_setup(ctx)
    expected = expected_all[ctx.rank]
    recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
        mine.x, **_layout_kwargs(layout), topk_idx=mine.topk_idx, topk_weights=mine.topk_weights
    )
    num_recv = len(expected.sources)
    values_all = [torch.randn(len(e.sources), scenario.hidden, generator=ctx.generator(5)).bfloat16() for e in expected_all]
    want, magnitude = oracle.combine([e.sources for e in expected_all],
                                     [to_numpy_f32(v).astype(np.float64) for v in values_all],
                                     ctx.rank, scenario.num_tokens[ctx.rank])
    y = values_all[ctx.rank]

    def good():
        combined, _, _ = buffer.combine(y, handle)
        check_close(combined, want, magnitude, "combined_x")

    errors = Errors(ctx, good)
    T, H = scenario.num_tokens[ctx.rank], scenario.hidden
    errors.bad("x float32", lambda: buffer.combine(y.float(), handle), ["x"])
    errors.bad("x with one row too many", lambda: buffer.combine(torch.zeros(num_recv + 1, H, dtype=torch.bfloat16), handle), ["x"])
    errors.bad("x with another hidden", lambda: buffer.combine(torch.zeros(num_recv, H + 128, dtype=torch.bfloat16), handle), ["x"])
    if num_recv > 0:
        errors.bad("x non-contiguous", lambda: buffer.combine(_non_contiguous(y), handle), ["x"])
    errors.bad("x on the meta device", lambda: buffer.combine(_meta(y), handle), ["x"])
    errors.bad("handle None", lambda: buffer.combine(y, None), ["handle"])
    errors.bad("handle of the wrong type", lambda: buffer.combine(y, object()), ["handle"])
    errors.bad("topk_weights float64", lambda: buffer.combine(y, handle, topk_weights=recv_w.double()), ["topk_weights"])
    errors.bad("topk_weights wrong rows",
               lambda: buffer.combine(y, handle, topk_weights=torch.zeros(num_recv + 1, 3)), ["topk_weights"])
    errors.bad("bias wrong shape", lambda: buffer.combine(y, handle, bias=torch.zeros(T + 1, H, dtype=torch.bfloat16)), ["bias"])
    errors.bad("bias float32", lambda: buffer.combine(y, handle, bias=torch.zeros(T, H)), ["bias"])
    errors.bad("bias pair, second wrong dtype",
               lambda: buffer.combine(y, handle, bias=(torch.zeros(T, H, dtype=torch.bfloat16), torch.zeros(T, H))),
               ["bias", "bias[1]"])
    errors.bad("allocate_on_comm_stream without previous_event",
               lambda: buffer.combine(y, handle, async_finish=True, allocate_on_comm_stream=True),
               ["previous_event", "allocate_on_comm_stream"])
    errors.bad("config of the wrong type", lambda: buffer.combine(y, handle, config="fast"), ["config"])
    errors.finish()


def _ll_setup(ctx: CaseContext):
    scenario = Scenario([5] * ctx.world_size, 512, 3, 4 * ctx.world_size)
    num_max = 8
    inputs = make_inputs(ctx.generator(), scenario)
    buffer = low_latency_buffer(ctx, num_max, scenario.hidden, scenario.num_experts)
    expected = oracle.low_latency_dispatch([i.topk_idx.numpy() for i in inputs], scenario.num_experts,
                                           ctx.world_size, ctx.rank)
    counts = [sum(len(v) for v in blocks.values()) for blocks in expected]
    return scenario, num_max, inputs, buffer, counts


@CASES.case(world_sizes=(1, 2, 4))
def low_latency_dispatch_errors(ctx: CaseContext) -> None:
    scenario, num_max, inputs, buffer, counts = _ll_setup(ctx)
    mine = inputs[ctx.rank]
    E, H = scenario.num_experts, scenario.hidden

    def good():
        recv_x, recv_count, _, _, _ = buffer.low_latency_dispatch(mine.x, mine.topk_idx, num_max, E)
        assert recv_count.tolist() == counts, f"recv_count {recv_count.tolist()}, expected {counts}"

    errors = Errors(ctx, good)
    x, topk = mine.x, mine.topk_idx
    errors.bad("x float32", lambda: buffer.low_latency_dispatch(x.float(), topk, num_max, E), ["x"])
    errors.bad("x 1-D", lambda: buffer.low_latency_dispatch(x.reshape(-1), topk, num_max, E), ["x"])
    errors.bad("x non-contiguous", lambda: buffer.low_latency_dispatch(_non_contiguous(x), topk, num_max, E), ["x"])
    errors.bad("x on the meta device", lambda: buffer.low_latency_dispatch(_meta(x), topk, num_max, E), ["x"])
    errors.bad("hidden not a multiple of 128",
               lambda: buffer.low_latency_dispatch(torch.zeros(x.shape[0], 200, dtype=torch.bfloat16), topk, num_max, E),
               ["x", "hidden"])
    errors.bad("topk_idx int32", lambda: buffer.low_latency_dispatch(x, topk.int(), num_max, E), ["topk_idx"])
    errors.bad("topk_idx rows differ from x", lambda: buffer.low_latency_dispatch(x, topk[:-1].contiguous(), num_max, E),
               ["topk_idx", "x"])
    bad = topk.clone()
    bad[0, 0] = E
    errors.bad("topk_idx out of range", lambda: buffer.low_latency_dispatch(x, bad, num_max, E), ["topk_idx"])
    bad = topk.clone()
    bad[0, 0] = -3
    errors.bad("topk_idx below -1", lambda: buffer.low_latency_dispatch(x, bad, num_max, E), ["topk_idx"])
    errors.bad("more tokens than num_max_dispatch_tokens_per_rank",
               lambda: buffer.low_latency_dispatch(x, topk, x.shape[0] - 1, E),
               ["num_max_dispatch_tokens_per_rank", "x"])
    if ctx.world_size > 1:
        errors.bad("num_experts % num_ranks != 0",
                   lambda: buffer.low_latency_dispatch(x, topk, num_max, E + 1), ["num_experts"])
    errors.bad("buffer too small (num_max larger than the buffer was sized for)",
               lambda: buffer.low_latency_dispatch(x, topk, num_max * 64, E),
               ["num_rdma_bytes", "num_max_dispatch_tokens_per_rank"])
    errors.bad("buffer too small (more experts than the buffer was sized for)",
               lambda: buffer.low_latency_dispatch(x, topk, num_max, E * 64),
               ["num_rdma_bytes", "num_experts"])
    num_local = E // ctx.world_size
    errors.bad("cumulative_local_expert_recv_stats int64",
               lambda: buffer.low_latency_dispatch(x, topk, num_max, E,
                                                   cumulative_local_expert_recv_stats=torch.zeros(num_local, dtype=torch.int64)),
               ["cumulative_local_expert_recv_stats"])
    errors.bad("cumulative_local_expert_recv_stats wrong shape",
               lambda: buffer.low_latency_dispatch(x, topk, num_max, E,
                                                   cumulative_local_expert_recv_stats=torch.zeros(num_local + 1, dtype=torch.int32)),
               ["cumulative_local_expert_recv_stats"])
    errors.bad("dispatch_wait_recv_cost_stats int32",
               lambda: buffer.low_latency_dispatch(x, topk, num_max, E,
                                                   dispatch_wait_recv_cost_stats=torch.zeros(ctx.world_size, dtype=torch.int32)),
               ["dispatch_wait_recv_cost_stats"])
    errors.finish()


@CASES.case(world_sizes=(1, 2, 4))
def low_latency_needs_low_latency_mode(ctx: CaseContext) -> None:
    scenario = Scenario([3] * ctx.world_size, 512, 2, 2 * ctx.world_size)
    mine = make_inputs(ctx.generator(), scenario)[ctx.rank]
    buffer = high_throughput_buffer(ctx, scenario.hidden)
    message = expect_error(
        lambda: buffer.low_latency_dispatch(mine.x, mine.topk_idx, 4, scenario.num_experts),
        ["low_latency_mode"], "low_latency_dispatch on a buffer without low_latency_mode",
        types=(ValueError, TypeError, RuntimeError),
    )
    assert message is None, message


@CASES.case(world_sizes=(1, 2, 4))
def low_latency_combine_errors(ctx: CaseContext) -> None:
    scenario, num_max, inputs, buffer, counts = _ll_setup(ctx)
    mine = inputs[ctx.rank]
    E, H = scenario.num_experts, scenario.hidden
    num_local = E // ctx.world_size
    _, _, handle, _, _ = buffer.low_latency_dispatch(mine.x, mine.topk_idx, num_max, E, use_fp8=False)
    y = torch.zeros(num_local, ctx.world_size * num_max, H, dtype=torch.bfloat16)
    T = mine.x.shape[0]

    def good():
        combined, _, _ = buffer.low_latency_combine(y, mine.topk_idx, mine.topk_weights, handle)
        assert combined.dtype == torch.bfloat16 and tuple(combined.shape) == (T, H), f"{combined.dtype} {tuple(combined.shape)}"
        assert bool((combined == 0).all()), "combining zeros gave non-zero values"

    errors = Errors(ctx, good)
    w, topk = mine.topk_weights, mine.topk_idx
    errors.bad("x float32", lambda: buffer.low_latency_combine(y.float(), topk, w, handle), ["x"])
    errors.bad("x wrong shape", lambda: buffer.low_latency_combine(y[:, :-1].contiguous(), topk, w, handle), ["x"])
    errors.bad("x on the meta device", lambda: buffer.low_latency_combine(_meta(y), topk, w, handle), ["x"])
    errors.bad("topk_weights float64", lambda: buffer.low_latency_combine(y, topk, w.double(), handle), ["topk_weights"])
    errors.bad("topk_weights shape differs from topk_idx",
               lambda: buffer.low_latency_combine(y, topk, w[:, :1].contiguous(), handle), ["topk_weights", "topk_idx"])
    errors.bad("topk_idx int32", lambda: buffer.low_latency_combine(y, topk.int(), w, handle), ["topk_idx"])
    errors.bad("handle of the wrong type", lambda: buffer.low_latency_combine(y, topk, w, object()), ["handle"])
    errors.bad("out wrong shape",
               lambda: buffer.low_latency_combine(y, topk, w, handle, out=torch.zeros(T + 1, H, dtype=torch.bfloat16)), ["out"])
    errors.bad("out float32", lambda: buffer.low_latency_combine(y, topk, w, handle, out=torch.zeros(T, H)), ["out"])
    errors.bad("combine_wait_recv_cost_stats int32",
               lambda: buffer.low_latency_combine(y, topk, w, handle,
                                                  combine_wait_recv_cost_stats=torch.zeros(ctx.world_size, dtype=torch.int32)),
               ["combine_wait_recv_cost_stats"])
    errors.finish()


@CASES.case(world_sizes=(1, 2, 4))
def constructor_errors(ctx: CaseContext) -> None:
    import deep_ep

    checks = Checks(f"on rank {ctx.rank}")
    checks.add(expect_error(lambda: make_buffer(ctx, num_nvl_bytes=-1), ["num_nvl_bytes"], "num_nvl_bytes=-1"))
    checks.add(expect_error(lambda: make_buffer(ctx, num_rdma_bytes=-5), ["num_rdma_bytes"], "num_rdma_bytes=-5"))
    checks.add(expect_error(lambda: make_buffer(ctx, backend="nonsense"), ["backend"], "backend='nonsense'"))
    if ctx.world_size == 4:
        checks.add(expect_error(lambda: make_buffer(ctx, nvl_domain_size=3), ["nvl_domain_size"], "nvl_domain_size=3 of 4 ranks"))
    checks.add(expect_error(lambda: make_buffer(ctx, nvl_domain_size=0), ["nvl_domain_size"], "nvl_domain_size=0"))
    checks.add(expect_error(lambda: deep_ep.Buffer.set_num_sms(23), ["new_num_sms", "num_sms"], "set_num_sms(23)"))
    assert deep_ep.Buffer.num_sms == 20, f"num_sms changed to {deep_ep.Buffer.num_sms} by a rejected call"
    # The group still works: a correct buffer and call afterwards.
    buffer = make_buffer(ctx, num_nvl_bytes=NVL_BYTES)
    topk = torch.tensor([[0, -1]], dtype=torch.int64)
    per_rank = buffer.get_dispatch_layout(topk, ctx.world_size * 2)[0]
    checks.run("layout after the bad constructors",
               lambda: check_equal(per_rank, torch.tensor([1] + [0] * (ctx.world_size - 1), dtype=torch.int32), "num_tokens_per_rank"))
    checks.finish()



@CASES.case(world_sizes=(2, 4), timeout_s=30)
def num_worst_tokens_too_small_on_one_rank(ctx: CaseContext) -> None:
    """Only rank 0 receives more rows than num_worst_tokens: it gets a clear error, no rank
    hangs, nothing is written out of bounds, and the buffer keeps working on every rank."""
    world_size = ctx.world_size
    scenario = Scenario([4] * world_size, 256, 1, 2 * world_size)
    inputs = make_inputs(ctx.generator(), scenario)
    for rank_inputs in inputs:
        rank_inputs.topk_idx.fill_(0)  # every token goes to expert 0, on rank 0
    mine = inputs[ctx.rank]
    buffer = high_throughput_buffer(ctx, scenario.hidden)
    layout = buffer.get_dispatch_layout(mine.topk_idx, scenario.num_experts)[:4]
    kwargs = dict(_layout_kwargs(layout), topk_idx=mine.topk_idx, topk_weights=mine.topk_weights)
    checks = Checks(f"on rank {ctx.rank}")
    try:
        result = buffer.dispatch(mine.x, **kwargs, num_worst_tokens=2)
    except ValueError as error:
        checks.add(expect_error(lambda: (_ for _ in ()).throw(error), ["num_worst_tokens"], "overflow error"))
    else:
        if ctx.rank == 0:
            checks.add(f"rank 0 receives {4 * world_size} rows > num_worst_tokens=2 but dispatch returned")
        else:
            recv_x, recv_idx = result[0], result[1]
            checks.run("non-overflowing rank", lambda: _assert_empty_worst(recv_x, recv_idx))
    # Every rank then makes a correct call: this hangs if the bad call left the ranks out of step.
    recv_x = buffer.dispatch(mine.x, **kwargs)[0]
    topk_all = [i.topk_idx.numpy() for i in inputs]
    expected = oracle.dispatch(topk_all, None, scenario.num_experts, world_size, ctx.rank)
    rows = [inputs[s].x[t] for s, t in expected.sources]
    want = torch.stack(rows) if rows else torch.empty(0, scenario.hidden, dtype=torch.bfloat16)
    checks.run("dispatch after the overflow", lambda: check_equal(recv_x, want, "recv_x"))
    checks.finish()


def _assert_empty_worst(recv_x, recv_idx) -> None:
    assert recv_x.shape[0] == 2, f"recv_x has {recv_x.shape[0]} rows, expected num_worst_tokens=2"
    assert bool((recv_idx == -1).all()), f"a rank that receives nothing has recv_topk_idx {recv_idx.tolist()}"


test_case = CASES.pytest_function()
