"""High-throughput dispatch and combine on the torch backend vs the oracle (world sizes 1, 2, 4).

Dispatch results are compared exactly (bytes); combine results within bf16 rounding of a
float64 oracle sum.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import numpy as np
import torch

import oracle
from case_inputs import (
    Checks,
    Scenario,
    check_close,
    check_equal,
    fp8_pair_with_strided_scales,
    high_throughput_buffer,
    make_inputs,
    random_bf16,
    random_scenarios,
    to_numpy_f32,
)
from dist_utils import CaseContext, CaseSet

CASES = CaseSet(__name__)


@dataclasses.dataclass
class Options:
    fp8: bool = False
    expert_alignment: int = 1
    num_worst_tokens: int = 0  # > 0: that many rows; computed from the scenario when -1
    with_topk: bool = True
    bias: Optional[str] = None  # None, "single" or "pair"
    combine_weights: bool = True
    async_mode: bool = False
    cached: bool = True
    combine: bool = True
    nvl_domain_size: Optional[int] = None
    explicit_config: bool = False  # pass config=get_dispatch_config / get_combine_config

    def describe(self) -> str:
        fields = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)]
        return " ".join(fields)


def _fp8_inputs(inputs) -> List[tuple]:
    """Valid FP8 pairs (from the oracle's cast) for every rank, scales as transposed views."""
    pairs = []
    for rank_inputs in inputs:
        codes, scales = oracle.fp8_cast(to_numpy_f32(rank_inputs.x))
        pairs.append(fp8_pair_with_strided_scales(codes, scales))
    return pairs


def _stack_rows(tensors: List[torch.Tensor], sources, width_like: torch.Tensor) -> torch.Tensor:
    if not sources:
        return torch.empty((0,) + tuple(width_like.shape[1:]), dtype=width_like.dtype)
    return torch.stack([tensors[src][t] for src, t in sources]).contiguous()


def _event_kwargs(options: Options):
    import deep_ep

    if not options.async_mode:
        return {}
    return dict(previous_event=deep_ep.Buffer.capture(), async_finish=True, allocate_on_comm_stream=True)


def _config_kwargs(options: Options, world_size: int, which: str):
    import deep_ep

    if not options.explicit_config:
        return {}
    getter = deep_ep.Buffer.get_dispatch_config if which == "dispatch" else deep_ep.Buffer.get_combine_config
    return dict(config=getter(world_size))


def _wait(event, options: Options) -> None:
    import deep_ep

    assert isinstance(event, deep_ep.EventOverlap), f"event is {type(event)}, expected EventOverlap"
    if options.async_mode:
        event.current_stream_wait()


def run_round_trip(ctx: CaseContext, buffer, scenario: Scenario, options: Options, checks: Checks, salt: int) -> None:
    """get_dispatch_layout -> dispatch -> (cached dispatch) -> combine, every output checked."""
    rank, world_size = ctx.rank, ctx.world_size
    gen = ctx.generator(salt)
    inputs = make_inputs(gen, scenario)
    where = f"[{scenario.describe()}] [{options.describe()}]"
    num_experts = scenario.num_experts
    topk_all = [inp.topk_idx.numpy() for inp in inputs]
    weights_all = [inp.topk_weights.numpy() for inp in inputs]
    expected_all = [
        oracle.dispatch(topk_all, weights_all, num_experts, world_size, d, options.expert_alignment)
        for d in range(world_size)
    ]
    expected = expected_all[rank]
    num_recv = len(expected.sources)

    per_rank, per_rdma, per_expert, in_rank, event = buffer.get_dispatch_layout(
        inputs[rank].topk_idx, num_experts, **_event_kwargs(options)
    )
    _wait(event, options)

    worst = options.num_worst_tokens
    if worst == -1:
        worst = max(1, sum(scenario.num_tokens))  # an upper bound of what any rank receives

    if options.fp8:
        pairs = _fp8_inputs(inputs)
        x_arg = pairs[rank]
    else:
        x_arg = inputs[rank].x
    topk_kwargs = {}
    if options.with_topk:
        topk_kwargs = dict(topk_idx=inputs[rank].topk_idx, topk_weights=inputs[rank].topk_weights)
    result = buffer.dispatch(
        x_arg,
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        expert_alignment=options.expert_alignment,
        num_worst_tokens=worst,
        **topk_kwargs,
        **_event_kwargs(options),
        **_config_kwargs(options, world_size, "dispatch"),
    )
    assert isinstance(result, tuple) and len(result) == 6, f"dispatch returned {type(result)} of length {len(result)}"
    recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, event = result
    _wait(event, options)
    rows = worst if worst > 0 else num_recv

    def check_rows(actual: torch.Tensor, expected_rows: torch.Tensor, what: str) -> None:
        assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual)}"
        assert actual.shape[0] == rows, f"{what}: {actual.shape[0]} rows, expected {rows}"
        check_equal(actual[:num_recv], expected_rows, what)

    # recv_x (bf16 or the FP8 pair)
    if options.fp8:
        def check_fp8():
            assert isinstance(recv_x, tuple) and len(recv_x) == 2, f"FP8 recv_x is {type(recv_x)}, expected a pair"
            check_rows(recv_x[0], _stack_rows([p[0] for p in pairs], expected.sources, pairs[0][0]), "recv_x[0] (fp8 data)")
            check_rows(recv_x[1], _stack_rows([p[1] for p in pairs], expected.sources, pairs[0][1]), "recv_x[1] (scales)")
        checks.run(f"{where} recv_x", check_fp8)
    else:
        checks.run(
            f"{where} recv_x",
            lambda: check_rows(recv_x, _stack_rows([i.x for i in inputs], expected.sources, inputs[0].x), "recv_x"),
        )

    if options.with_topk:
        def check_topk():
            check_rows(recv_topk_idx, torch.from_numpy(expected.recv_topk_idx), "recv_topk_idx")
            if worst > 0:
                padding = recv_topk_idx[num_recv:]
                assert bool((padding == -1).all()), f"recv_topk_idx rows past {num_recv} must be -1: {padding}"
            check_rows(recv_topk_weights, torch.from_numpy(expected.recv_topk_weights), "recv_topk_weights")
        checks.run(f"{where} recv_topk_idx/weights", check_topk)
    else:
        checks.run(
            f"{where} without topk_idx",
            lambda: _assert(recv_topk_idx is None and recv_topk_weights is None,
                            f"recv_topk_idx/recv_topk_weights should be None without topk_idx, got "
                            f"{type(recv_topk_idx)}, {type(recv_topk_weights)}"),
        )

    expected_list = [] if worst > 0 else expected.num_recv_tokens_per_expert
    checks.run(
        f"{where} num_recv_tokens_per_expert_list",
        lambda: _assert(
            isinstance(per_expert_list, list) and all(type(v) is int for v in per_expert_list)
            and per_expert_list == expected_list,
            f"got {per_expert_list!r}, expected {expected_list!r} (a list of Python ints)",
        ),
    )

    if options.cached:
        def check_cached():
            if options.fp8:
                second = [(p[0].view(torch.uint8).flip(1).contiguous().view(torch.float8_e4m3fn), p[1] * 2)
                          for p in pairs]
                cached_x = second[rank]
            else:
                second = [random_bf16(gen, n, scenario.hidden) for n in scenario.num_tokens]
                cached_x = second[rank]
            out = buffer.dispatch(cached_x, handle=handle, **_event_kwargs(options),
                                  **_config_kwargs(options, world_size, "dispatch"))
            assert isinstance(out, tuple) and len(out) == 6, f"cached dispatch returned {type(out)}"
            assert out[1:5] == (None, None, None, None), (
                f"cached dispatch must return (recv_x, None, None, None, None, event), got {[type(v) for v in out]}"
            )
            _wait(out[5], options)
            if options.fp8:
                check_rows(out[0][0], _stack_rows([s[0] for s in second], expected.sources, second[0][0]), "cached recv_x[0]")
                check_rows(out[0][1], _stack_rows([s[1] for s in second], expected.sources, second[0][1]), "cached recv_x[1]")
            else:
                check_rows(out[0], _stack_rows(second, expected.sources, second[0]), "cached recv_x")
        checks.run(f"{where} cached dispatch", check_cached)

    if not options.combine:
        return

    # Combine: rank d sends back values_all[d] (random rows known to every rank).
    values_all = [random_bf16(gen, len(e.sources), scenario.hidden) for e in expected_all]
    x_combine = values_all[rank]
    if worst > 0:
        # Rows past the real count are garbage that combine must not read.
        padding = torch.full((worst - num_recv, scenario.hidden), 1e4, dtype=torch.bfloat16)
        x_combine = torch.cat([x_combine, padding])
    combine_weights = None
    if options.combine_weights and options.with_topk:
        combine_weights = recv_topk_weights
    biases = []
    bias_arg = None
    if options.bias is not None:
        count = 1 if options.bias == "single" else 2
        biases_all = [[random_bf16(gen, n, scenario.hidden) for n in scenario.num_tokens] for _ in range(count)]
        biases = [b[rank] for b in biases_all]
        bias_arg = biases[0] if count == 1 else (biases[0], biases[1])
    combined_x, combined_weights, event = buffer.combine(
        x_combine, handle, topk_weights=combine_weights, bias=bias_arg, **_event_kwargs(options),
        **_config_kwargs(options, world_size, "combine"),
    )
    _wait(event, options)
    num_tokens = scenario.num_tokens[rank]
    expected_x, magnitude = oracle.combine(
        [e.sources for e in expected_all],
        [to_numpy_f32(v).astype(np.float64) for v in values_all],
        rank,
        num_tokens,
        [to_numpy_f32(b).astype(np.float64) for b in biases],
    )

    def check_combined_x():
        assert combined_x.dtype == torch.bfloat16, f"combined_x dtype {combined_x.dtype}, expected bfloat16"
        check_close(combined_x, expected_x, magnitude, "combined_x")
    checks.run(f"{where} combined_x", check_combined_x)

    if combine_weights is None:
        checks.run(
            f"{where} combined_topk_weights",
            lambda: _assert(combined_weights is None, f"expected None without topk_weights, got {type(combined_weights)}"),
        )
    else:
        expected_w, magnitude_w = oracle.combine(
            [e.sources for e in expected_all],
            [e.recv_topk_weights.astype(np.float64) for e in expected_all],
            rank,
            num_tokens,
        )
        def check_combined_weights():
            assert combined_weights.dtype == torch.float32, f"dtype {combined_weights.dtype}, expected float32"
            check_close(combined_weights, expected_w, magnitude_w, "combined_topk_weights", rel=1e-6)
        checks.run(f"{where} combined_topk_weights", check_combined_weights)


def _assert(condition, message):
    assert condition, message


def _run_scenarios(ctx, scenarios, options_list, label):
    checks = Checks(f"on rank {ctx.rank} ({label})")
    salt = 0
    for scenario in scenarios:
        for options in options_list:
            salt += 1
            buffer = high_throughput_buffer(ctx, scenario.hidden, options.nvl_domain_size)
            run_round_trip(ctx, buffer, scenario, options, checks, salt)
    checks.finish()


@CASES.case(world_sizes=(1, 2, 4))
def bf16_random_routing(ctx: CaseContext) -> None:
    """Random scenarios: 0-token rank, all -1 rows, hot experts, top-k 1..9, 8..256 experts."""
    scenarios = random_scenarios(ctx.seed, ctx.world_size, count=6)
    _run_scenarios(ctx, scenarios, [Options()], "bf16")


@CASES.case(world_sizes=(1, 2, 4))
def fp8_pair_strided_scales(ctx: CaseContext) -> None:
    scenarios = random_scenarios(ctx.seed, ctx.world_size, count=3, hidden_choices=(128, 384, 512))
    _run_scenarios(ctx, scenarios, [Options(fp8=True)], "fp8")


@CASES.case(world_sizes=(1, 2, 4))
def expert_alignment(ctx: CaseContext) -> None:
    scenarios = random_scenarios(ctx.seed, ctx.world_size, count=2)
    options = [Options(expert_alignment=a, cached=False) for a in (2, 4, 128)]
    _run_scenarios(ctx, scenarios, options, "expert_alignment")


@CASES.case(world_sizes=(1, 2, 4))
def num_worst_tokens(ctx: CaseContext) -> None:
    """num_worst_tokens > 0: padded outputs, -1 rows, empty list (combine checked separately)."""
    scenarios = random_scenarios(ctx.seed, ctx.world_size, count=3)
    options = [Options(num_worst_tokens=-1, combine=False), Options(num_worst_tokens=-1, fp8=True, combine=False)]
    _run_scenarios(ctx, scenarios, options, "num_worst_tokens")


@CASES.case(world_sizes=(1, 2, 4))
def combine_after_num_worst_tokens(ctx: CaseContext) -> None:
    """Combine of a num_worst_tokens dispatch: x has the padded row count; padding is ignored."""
    scenarios = random_scenarios(ctx.seed, ctx.world_size, count=2)
    _run_scenarios(ctx, scenarios, [Options(num_worst_tokens=-1, cached=False)], "combine after worst")


@CASES.case(world_sizes=(1, 2, 4))
def without_topk_idx(ctx: CaseContext) -> None:
    scenarios = random_scenarios(ctx.seed, ctx.world_size, count=3)
    _run_scenarios(ctx, scenarios, [Options(with_topk=False)], "no topk_idx")


@CASES.case(world_sizes=(1, 2, 4))
def combine_bias_and_weights(ctx: CaseContext) -> None:
    scenarios = random_scenarios(ctx.seed, ctx.world_size, count=2)
    options = [
        Options(bias="single", cached=False),
        Options(bias="pair", cached=False),
        Options(bias="pair", combine_weights=False, cached=False),
        Options(explicit_config=True),
    ]
    _run_scenarios(ctx, scenarios, options, "bias")


@CASES.case(world_sizes=(1, 2, 4))
def async_events(ctx: CaseContext) -> None:
    """previous_event + async_finish + allocate_on_comm_stream on every call; event as context manager."""
    import deep_ep

    scenarios = random_scenarios(ctx.seed, ctx.world_size, count=2)
    _run_scenarios(ctx, scenarios, [Options(async_mode=True, bias="single"), Options(async_mode=True, fp8=True)], "async")
    # `with event:` overlaps the block with the communication, then waits.
    scenario = scenarios[0]
    buffer = high_throughput_buffer(ctx, scenario.hidden)
    inputs = make_inputs(ctx.generator(99), scenario)
    *layout, event = buffer.get_dispatch_layout(inputs[ctx.rank].topk_idx, scenario.num_experts, async_finish=True)
    with event:
        pass
    expected = oracle.layout(inputs[ctx.rank].topk_idx.numpy(), scenario.num_experts, ctx.world_size, ctx.world_size)
    check_equal(layout[0], torch.from_numpy(expected.num_tokens_per_rank).int(), "num_tokens_per_rank after `with event`")
    assert isinstance(event, deep_ep.EventOverlap)


@CASES.case(world_sizes=(1, 2, 4))
def large_hidden(ctx: CaseContext) -> None:
    """hidden 2048 / 4096 / 7168 with few tokens, bf16 and FP8, with combine."""
    scenarios = []
    for i, hidden in enumerate((2048, 4096, 7168)):
        scenario = random_scenarios(ctx.seed + i, ctx.world_size, count=1, max_tokens=6)[0]
        scenario.hidden = hidden
        scenarios.append(scenario)
    _run_scenarios(ctx, scenarios, [Options(bias="single"), Options(fp8=True, combine=False)], "large hidden")


@CASES.case(world_sizes=(1, 2, 4))
def edge_shapes(ctx: CaseContext) -> None:
    """Every rank empty; every top-k -1; top-k 9 of 256; top-k 8 of 8; one hot expert."""
    w = ctx.world_size
    scenarios = [
        Scenario([0] * w, 128, 4, 16),
        Scenario([4] * w, 128, 3, 16, masked_fraction=1.0),
        Scenario([9] * w, 256, 9, 256),
        Scenario([5] * w, 128, 8, 8),
        Scenario([24] * w, 128, 2, 64, hot_experts=True),
        Scenario([1] + [0] * (w - 1), 128, 1, 8),
    ]
    _run_scenarios(ctx, scenarios, [Options(bias="single")], "edge shapes")


@CASES.case(world_sizes=(2, 4))
def multi_node(ctx: CaseContext) -> None:
    """nvl_domain_size < world size (internode semantics): same results, rdma counts given."""
    scenarios = random_scenarios(ctx.seed, ctx.world_size, count=3)
    options = [Options(nvl_domain_size=d, bias="single") for d in (1, 2) if d < ctx.world_size]
    options.append(Options(nvl_domain_size=1, fp8=True))
    _run_scenarios(ctx, scenarios, options, "multi-node")


test_case = CASES.pytest_function()
