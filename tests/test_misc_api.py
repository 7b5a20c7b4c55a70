"""The rest of the public surface: static helpers, Config, events, local buffer views,
shrink-mode masks, destroy, backend selection.

Static helpers run in the pytest process; buffer calls run in spawned gloo groups.
"""

from __future__ import annotations

import os

import torch

from case_inputs import NVL_BYTES, Checks, Scenario, expect_error, low_latency_buffer, make_buffer, make_inputs
from dist_utils import CaseContext, CaseSet

CASES = CaseSet(__name__)


# --------------------------------------------------------------------------- in-process


def test_exports():
    import deep_ep

    for name in ("Buffer", "Config", "EventOverlap", "DeepEPTimeoutError"):
        assert hasattr(deep_ep, name), f"deep_ep.{name} is missing"
    assert issubclass(deep_ep.DeepEPTimeoutError, RuntimeError)
    from deep_ep.utils import DeepEPTimeoutError, per_token_cast_back, per_token_cast_to_fp8  # noqa: F401

    assert DeepEPTimeoutError is deep_ep.DeepEPTimeoutError


def test_kernel_failure_messages():
    from deep_ep.utils import BARRIER_TAG, INTRANODE_TARGET_NAMES, WAIT_BARRIER, describe_kernel_failure

    names = {1: "notify_dispatch", 3: "intranode_combine"}
    # (code, kernel, rank, peer, target, channel, seen, expected)
    barrier = describe_kernel_failure((1, 1, 2, 0, WAIT_BARRIER, -1, BARRIER_TAG, 0), names,
                                      INTRANODE_TARGET_NAMES, 3.0)
    assert barrier == ("deep_ep: rank 2: notify_dispatch timed out after 3 s waiting for a barrier arrival from "
                       "rank 0 (it is 1 barrier(s) behind); the buffer is now unusable"), barrier
    ring = describe_kernel_failure((1, 3, 1, 0, 2, 4, 0, 2), names, INTRANODE_TARGET_NAMES, 3.0)
    assert "intranode_combine timed out after 3 s waiting for ring data (the sender's tail) from rank 0 " \
           "(channel 4, last value 0, expected 2)" in ring, ring
    # A barrier value that is not a whole number of arrivals is printed as it is.
    odd = describe_kernel_failure((1, 1, 2, 0, WAIT_BARRIER, -1, 5, 0), names, INTRANODE_TARGET_NAMES, 3.0)
    assert "(last value 5, expected 0)" in odd, odd
    overflow = describe_kernel_failure((2, 3, 1, 0, 6, 0, 10, 8), names, INTRANODE_TARGET_NAMES, 3.0)
    assert "row 10 needed, 8 rows allocated (from rank 0)" in overflow, overflow


def test_buffer_statics():
    import deep_ep

    assert deep_ep.Buffer.num_sms == 20
    assert isinstance(deep_ep.Buffer.is_sm90_compiled(), bool)
    event = deep_ep.Buffer.capture()
    assert isinstance(event, deep_ep.EventOverlap)
    event.current_stream_wait()


def test_internode_kernels_switch(monkeypatch):
    """The internode kernels serve multi-node groups by default; DEEP_EP_INTERNODE_KERNELS=0 opts out."""
    from deep_ep.cuda_internode import ENV_FLAG, internode_kernels_requested

    monkeypatch.delenv(ENV_FLAG, raising=False)
    assert internode_kernels_requested()
    for value, expected in (("1", True), ("0", False), (" 0 ", False), ("yes", True)):
        monkeypatch.setenv(ENV_FLAG, value)
        assert internode_kernels_requested() is expected, value


def test_set_num_sms():
    import deep_ep

    try:
        deep_ep.Buffer.set_num_sms(24)
        assert deep_ep.Buffer.num_sms == 24
        for bad in (23, 1, 0, -2):
            message = expect_error(lambda: deep_ep.Buffer.set_num_sms(bad), ["new_num_sms", "num_sms"], f"set_num_sms({bad})")
            assert message is None, message
            assert deep_ep.Buffer.num_sms == 24, f"set_num_sms({bad}) changed num_sms to {deep_ep.Buffer.num_sms}"
    finally:
        deep_ep.Buffer.num_sms = 20


def test_event_overlap_context_manager():
    import deep_ep

    with deep_ep.EventOverlap() as event:
        pass
    with deep_ep.EventOverlap(None, extra_tensors=(torch.zeros(2),)):
        pass
    with deep_ep.Buffer.capture():
        pass
    deep_ep.EventOverlap(None).current_stream_wait()
    assert event is None or isinstance(event, deep_ep.EventOverlap)


def test_config_defaults_and_hints():
    import deep_ep

    config = deep_ep.Config()
    assert (config.num_sms, config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens,
            config.num_max_rdma_chunked_send_tokens, config.num_max_rdma_chunked_recv_tokens) == (20, 6, 256, 6, 256)
    custom = deep_ep.Config(24, 8, 128, 8, 128)
    assert custom.num_sms == 24 and custom.num_max_nvl_chunked_recv_tokens == 128
    for num_ranks in (2, 4, 8):
        nvl = [config.get_nvl_buffer_size_hint(h, num_ranks) for h in (256, 4096, 7168 * 2)]
        rdma = [config.get_rdma_buffer_size_hint(h, num_ranks) for h in (256, 4096, 7168 * 2)]
        assert all(isinstance(v, int) and v > 0 for v in nvl), nvl
        assert all(isinstance(v, int) and v >= 0 for v in rdma), rdma
        assert nvl == sorted(nvl) and rdma == sorted(rdma), f"hints not monotone in hidden_bytes: {nvl} {rdma}"
    for hidden_bytes in (256, 7168 * 2):
        nvl = [config.get_nvl_buffer_size_hint(hidden_bytes, r) for r in (2, 4, 8)]
        rdma = [config.get_rdma_buffer_size_hint(hidden_bytes, r) for r in (2, 4, 8, 16)]
        assert nvl == sorted(nvl) and rdma == sorted(rdma), f"hints not monotone in num_ranks: {nvl} {rdma}"
    # More tokens in flight need more room.
    assert custom.get_nvl_buffer_size_hint(4096, 4) <= deep_ep.Config(24, 8, 256, 8, 256).get_nvl_buffer_size_hint(4096, 4)


def test_tuned_configs():
    import deep_ep

    for num_ranks in (2, 4, 8, 16):
        for getter in (deep_ep.Buffer.get_dispatch_config, deep_ep.Buffer.get_combine_config):
            config = getter(num_ranks)
            assert isinstance(config, deep_ep.Config), f"{getter.__name__}({num_ranks}) gave {type(config)}"
            assert config.get_nvl_buffer_size_hint(7168 * 2, num_ranks) > 0


def test_low_latency_size_hint_monotone():
    import deep_ep

    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint
    base = (128, 7168, 8, 256)
    value = hint(*base)
    assert isinstance(value, int) and value > 0
    for position, bigger in ((0, 256), (1, 8192), (2, 16), (3, 288)):
        args = list(base)
        args[position] = bigger
        assert hint(*args) >= value, f"size hint shrinks when argument {position} grows: {args}"
    for position, smaller in ((0, 1), (1, 128), (3, 8)):
        args = list(base)
        args[position] = smaller
        assert 0 < hint(*args) <= value, f"size hint grows when argument {position} shrinks: {args}"
    # The hint covers the bf16 data of every (expert, token) slot at least once.
    assert value >= 256 * 128 * 7168 * 2, "hint smaller than one bf16 copy of [experts, num_max, hidden]"


# --------------------------------------------------------------------------- distributed


@CASES.case(world_sizes=(1, 2, 4))
def buffer_attributes(ctx: CaseContext) -> None:
    import torch.distributed as dist

    buffer = make_buffer(ctx, num_nvl_bytes=NVL_BYTES, num_rdma_bytes=4096)
    assert buffer.rank == ctx.rank and buffer.group_size == ctx.world_size
    assert buffer.group is ctx.group or buffer.group == ctx.group
    assert buffer.num_nvl_bytes == NVL_BYTES and buffer.num_rdma_bytes == 4096
    assert buffer.low_latency_mode is False
    assert buffer.get_comm_stream() is None, "the CPU torch backend has no comm stream"
    ll = low_latency_buffer(ctx, 8, 512, 4 * ctx.world_size)
    assert ll.low_latency_mode is True
    assert dist.get_world_size() == ctx.world_size


@CASES.case(world_sizes=(1, 2, 4))
def local_buffer_tensor(ctx: CaseContext) -> None:
    nvl_bytes, rdma_bytes = 1 << 16, 1 << 12
    buffer = make_buffer(ctx, num_nvl_bytes=nvl_bytes, num_rdma_bytes=rdma_bytes)
    whole = buffer.get_local_buffer_tensor(torch.bfloat16)
    assert whole.dtype == torch.bfloat16 and whole.numel() == nvl_bytes // 2, f"{whole.dtype} {whole.numel()}"
    shaped = buffer.get_local_buffer_tensor(torch.int32, size=torch.Size([16, 8]), offset=256)
    assert shaped.dtype == torch.int32 and tuple(shaped.shape) == (16, 8)
    pattern = torch.arange(128, dtype=torch.int32).view(16, 8) * (ctx.rank + 1)
    shaped.copy_(pattern)
    again = buffer.get_local_buffer_tensor(torch.int32, size=torch.Size([16, 8]), offset=256)
    assert torch.equal(again, pattern), "a second view of the same bytes does not see the write"
    raw = buffer.get_local_buffer_tensor(torch.uint8, offset=256)
    assert raw.numel() == nvl_bytes - 256
    assert torch.equal(raw[:512].view(torch.int32).view(16, 8), pattern), "views at the same offset disagree"
    rdma = buffer.get_local_buffer_tensor(torch.float32, use_rdma_buffer=True)
    assert rdma.numel() == rdma_bytes // 4, f"rdma view has {rdma.numel()} floats"
    rdma.fill_(1.5)
    assert bool((buffer.get_local_buffer_tensor(torch.float32, use_rdma_buffer=True) == 1.5).all())
    message = expect_error(
        lambda: buffer.get_local_buffer_tensor(torch.float32, size=torch.Size([nvl_bytes])), ["size", "offset"],
        "a view larger than the buffer",
    )
    assert message is None, message


@CASES.case(world_sizes=(1, 2, 4))
def shrink_mask_calls(ctx: CaseContext) -> None:
    scenario = Scenario([4] * ctx.world_size, 512, 2, 2 * ctx.world_size)
    buffer = low_latency_buffer(ctx, 4, scenario.hidden, scenario.num_experts, enable_shrink=True)
    status = torch.full((ctx.world_size,), 7, dtype=torch.int32)
    buffer.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0] * ctx.world_size, f"fresh mask {status.tolist()}"
    last = ctx.world_size - 1
    buffer.low_latency_update_mask_buffer(last, True)
    buffer.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0] * last + [1], f"after masking rank {last}: {status.tolist()}"
    buffer.low_latency_update_mask_buffer(last, False)
    buffer.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0] * ctx.world_size, f"after unmasking: {status.tolist()}"
    buffer.low_latency_update_mask_buffer(0, True)
    buffer.low_latency_clean_mask_buffer()
    buffer.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0] * ctx.world_size, f"after clean: {status.tolist()}"
    # Nothing masked: the low-latency calls work as usual.
    mine = make_inputs(ctx.generator(), scenario)[ctx.rank]
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(mine.x, mine.topk_idx, 4, scenario.num_experts,
                                                                   use_fp8=False)
    y = torch.zeros(recv_x.shape, dtype=torch.bfloat16)
    combined, _, _ = buffer.low_latency_combine(y, mine.topk_idx, mine.topk_weights, handle)
    assert tuple(combined.shape) == tuple(mine.x.shape)


@CASES.case(world_sizes=(1, 2, 4))
def destroy_explicitly(ctx: CaseContext) -> None:
    buffer = make_buffer(ctx, num_nvl_bytes=NVL_BYTES, explicitly_destroy=True)
    topk = torch.tensor([[0, -1]], dtype=torch.int64)
    buffer.get_dispatch_layout(topk, 2 * ctx.world_size)
    buffer.destroy()
    try:
        buffer.get_dispatch_layout(topk, 2 * ctx.world_size)
    except Exception:  # noqa: BLE001 - any clear error will do
        pass
    else:
        raise AssertionError("a call on a destroyed buffer did not raise")
    # A new buffer on the same group works.
    fresh = make_buffer(ctx, num_nvl_bytes=NVL_BYTES, explicitly_destroy=True)
    per_rank = fresh.get_dispatch_layout(topk, 2 * ctx.world_size)[0]
    assert per_rank.tolist() == [1] + [0] * (ctx.world_size - 1)
    fresh.destroy()


@CASES.case(world_sizes=(1, 2))
def backend_selection(ctx: CaseContext) -> None:
    import deep_ep

    checks = Checks(f"on rank {ctx.rank}")
    saved = os.environ.pop("DEEP_EP_BACKEND", None)
    try:
        explicit = deep_ep.Buffer(ctx.group, NVL_BYTES, backend="torch")
        checks.run("backend='torch'", lambda: _assert_torch(explicit))
        default = deep_ep.Buffer(ctx.group, NVL_BYTES)
        checks.run("default backend on a CPU group", lambda: _assert_torch(default))
        os.environ["DEEP_EP_BACKEND"] = "torch"
        from_env = deep_ep.Buffer(ctx.group, NVL_BYTES)
        checks.run("DEEP_EP_BACKEND=torch", lambda: _assert_torch(from_env))
        os.environ["DEEP_EP_BACKEND"] = "cuda"
        checks.add(expect_error(lambda: deep_ep.Buffer(ctx.group, NVL_BYTES), ["cuda", "backend"],
                                "DEEP_EP_BACKEND=cuda on a CPU-only gloo group",
                                types=(ValueError, TypeError, RuntimeError)))
        explicit_wins = deep_ep.Buffer(ctx.group, NVL_BYTES, backend="torch")
        checks.run("backend='torch' with DEEP_EP_BACKEND=cuda", lambda: _assert_torch(explicit_wins))
        os.environ["DEEP_EP_BACKEND"] = "bogus"
        checks.add(expect_error(lambda: deep_ep.Buffer(ctx.group, NVL_BYTES), ["backend", "DEEP_EP_BACKEND"],
                                "DEEP_EP_BACKEND=bogus"))
    finally:
        os.environ.pop("DEEP_EP_BACKEND", None)
        if saved is not None:
            os.environ["DEEP_EP_BACKEND"] = saved
    # Whatever was selected above, a correct call works on each torch buffer.
    topk = torch.tensor([[0]], dtype=torch.int64)
    for buffer in (explicit, default, from_env):
        per_rank = buffer.get_dispatch_layout(topk, ctx.world_size)[0]
        checks.run("layout", lambda: _assert(per_rank.tolist() == [1] + [0] * (ctx.world_size - 1), per_rank))
    checks.finish()


def _assert_torch(buffer) -> None:
    backend = getattr(buffer, "_backend", None)
    assert type(backend).__name__ == "TorchBackend", f"backend object is {type(backend).__name__}"


def _assert(condition, message) -> None:
    assert condition, message


test_case = CASES.pytest_function()
