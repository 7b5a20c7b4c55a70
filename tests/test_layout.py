"""get_dispatch_layout on the torch backend vs the oracle (world sizes 1, 2, 4)."""

import torch

import oracle
from case_inputs import NVL_BYTES, Checks, check_equal, make_buffer, make_inputs, random_scenarios
from dist_utils import CaseContext, CaseSet

CASES = CaseSet(__name__)


def _check_layout(buffer, scenario, inputs, rank, world_size, nvl_domain_size, checks, label, **kwargs):
    import deep_ep

    expected = oracle.layout(inputs[rank].topk_idx.numpy(), scenario.num_experts, world_size, nvl_domain_size)
    per_rank, per_rdma, per_expert, in_rank, event = buffer.get_dispatch_layout(
        inputs[rank].topk_idx, scenario.num_experts, **kwargs
    )
    if kwargs.get("async_finish"):
        event.current_stream_wait()
    where = f"{label} [{scenario.describe()}]"
    checks.run(f"{where} event", lambda: _assert_event(event, deep_ep.EventOverlap))
    checks.run(
        f"{where} num_tokens_per_rank",
        lambda: check_equal(per_rank, torch.from_numpy(expected.num_tokens_per_rank).int(), "num_tokens_per_rank"),
    )
    checks.run(
        f"{where} num_tokens_per_expert",
        lambda: check_equal(per_expert, torch.from_numpy(expected.num_tokens_per_expert).int(), "num_tokens_per_expert"),
    )
    checks.run(
        f"{where} is_token_in_rank",
        lambda: check_equal(in_rank, torch.from_numpy(expected.is_token_in_rank), "is_token_in_rank"),
    )
    if expected.num_tokens_per_rdma_rank is None:
        checks.run(
            f"{where} num_tokens_per_rdma_rank",
            lambda: _assert(per_rdma is None, f"expected None with one node, got {per_rdma}"),
        )
    else:
        checks.run(
            f"{where} num_tokens_per_rdma_rank",
            lambda: check_equal(
                per_rdma, torch.from_numpy(expected.num_tokens_per_rdma_rank).int(), "num_tokens_per_rdma_rank"
            ),
        )


def _assert(condition, message):
    assert condition, message


def _assert_event(event, event_type):
    assert isinstance(event, event_type), f"event is {type(event)}, expected EventOverlap"


@CASES.case(world_sizes=(1, 2, 4))
def layout_random(ctx: CaseContext) -> None:
    buffer = make_buffer(ctx, num_nvl_bytes=NVL_BYTES)
    checks = Checks(f"on rank {ctx.rank}")
    gen = ctx.generator()
    for scenario in random_scenarios(ctx.seed, ctx.world_size, count=8, max_tokens=64):
        inputs = make_inputs(gen, scenario)
        _check_layout(buffer, scenario, inputs, ctx.rank, ctx.world_size, ctx.world_size, checks, "layout")
    checks.finish()


@CASES.case(world_sizes=(1, 2, 4))
def layout_async_and_events(ctx: CaseContext) -> None:
    import deep_ep

    buffer = make_buffer(ctx, num_nvl_bytes=NVL_BYTES)
    checks = Checks(f"on rank {ctx.rank}")
    gen = ctx.generator()
    for scenario in random_scenarios(ctx.seed, ctx.world_size, count=2):
        inputs = make_inputs(gen, scenario)
        previous = deep_ep.Buffer.capture()
        _check_layout(
            buffer, scenario, inputs, ctx.rank, ctx.world_size, ctx.world_size, checks, "async layout",
            previous_event=previous, async_finish=True, allocate_on_comm_stream=True,
        )
        _check_layout(
            buffer, scenario, inputs, ctx.rank, ctx.world_size, ctx.world_size, checks, "async layout, no previous",
            async_finish=True,
        )
    checks.finish()


@CASES.case(world_sizes=(2, 4))
def layout_multi_node(ctx: CaseContext) -> None:
    """nvl_domain_size < world size: several "nodes", num_tokens_per_rdma_rank per node."""
    checks = Checks(f"on rank {ctx.rank}")
    gen = ctx.generator()
    domain_sizes = [d for d in (1, 2) if d < ctx.world_size]
    for nvl_domain_size in domain_sizes:
        buffer = make_buffer(ctx, num_nvl_bytes=NVL_BYTES, num_rdma_bytes=NVL_BYTES, nvl_domain_size=nvl_domain_size)
        for scenario in random_scenarios(ctx.seed + nvl_domain_size, ctx.world_size, count=4):
            inputs = make_inputs(gen, scenario)
            _check_layout(
                buffer, scenario, inputs, ctx.rank, ctx.world_size, nvl_domain_size, checks,
                f"layout nvl_domain_size={nvl_domain_size}",
            )
    checks.finish()


@CASES.case(world_sizes=(1, 2, 4))
def layout_edge_shapes(ctx: CaseContext) -> None:
    """All ranks empty; every top-k -1; top-k 1 and 9; 8 and 256 experts; one hot expert."""
    from case_inputs import Scenario

    buffer = make_buffer(ctx, num_nvl_bytes=NVL_BYTES)
    checks = Checks(f"on rank {ctx.rank}")
    gen = ctx.generator()
    w = ctx.world_size
    scenarios = [
        Scenario([0] * w, 128, 4, 16),
        Scenario([5] * w, 128, 3, 16, masked_fraction=1.0),
        Scenario([7] * w, 128, 1, 8),
        Scenario([9] * w, 128, 9, 256),
        Scenario([30] * w, 128, 8, 256, hot_experts=True),
        Scenario([3] * w, 128, 8, 8),
    ]
    for scenario in scenarios:
        inputs = make_inputs(gen, scenario)
        _check_layout(buffer, scenario, inputs, ctx.rank, w, w, checks, "layout edge")
    checks.finish()


test_case = CASES.pytest_function()
