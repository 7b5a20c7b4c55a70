"""Intranode kernels (cuda backend) against the torch backend, on 2 and 4 GPUs; and their benchmark.

Every rank builds a torch-backend Buffer and a cuda-backend Buffer on the same NCCL group and
feeds both the same inputs. Dispatch must match bit for bit (row order included); combine must
lie within one bf16 rounding of a float64 reference. Outputs are poisoned first, seeds are
fresh (``--seed`` / ``DEEP_EP_TEST_SEED`` to repeat), loads uneven, one rank may send nothing.

Run as a script::

    python tests/test_intranode.py --num-processes 4            # correctness
    python tests/test_intranode.py --num-processes 4 --bench    # benchmark (DESIGN.md §6 workload)

or through pytest (skipped without enough Hopper GPUs or without the extension).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_utils  # noqa: E402
from gpu_utils import assert_bitwise_equal, assert_close_to_reference, poison_allocator  # noqa: E402

MAX_HIDDEN = 7168
MAX_SMS = 32


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def _nvl_bytes(num_ranks: int) -> int:
    import deep_ep
    return deep_ep.Config(MAX_SMS, 8, 512).get_nvl_buffer_size_hint(MAX_HIDDEN * 2, num_ranks)


def make_cuda_buffer(group: Any, nvl_bytes: int, **kwargs: Any) -> Any:
    """A cuda-backend Buffer (the intranode kernels)."""
    import deep_ep
    return deep_ep.Buffer(group, nvl_bytes, backend="cuda", **kwargs)


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def make_routing(gen: torch.Generator, num_tokens: int, num_experts: int, num_topk: int, mode: str) -> torch.Tensor:
    """``topk_idx`` int64 [T, K] on the CPU: distinct experts per token, some -1 entries."""
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if mode == "hot":  # a few experts get most tokens: very uneven per-rank loads
        scores[:, : max(1, num_experts // 16)] += 2.0
    topk_idx = scores.topk(num_topk, dim=-1).indices.to(torch.int64)
    if mode == "empty":
        return torch.full_like(topk_idx, -1)
    drop = torch.rand(num_tokens, num_topk, generator=gen) < 0.1
    topk_idx[drop] = -1
    if num_tokens > 4:  # a few tokens go nowhere
        topk_idx[torch.randperm(num_tokens, generator=gen)[: num_tokens // 50]] = -1
    return topk_idx


def make_case(rank: int, num_ranks: int, seed: int, num_tokens: int, hidden: int, num_topk: int, num_experts: int,
              mode: str) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1009 + rank)
    x = (torch.randn(num_tokens, hidden, generator=gen) * (1 + torch.rand(num_tokens, 1, generator=gen))).to(
        torch.bfloat16)
    topk_idx = make_routing(gen, num_tokens, num_experts, num_topk, mode)
    topk_weights = torch.rand(num_tokens, num_topk, generator=gen)
    bias0 = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    bias1 = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    return {k: v.cuda() for k, v in dict(x=x, topk_idx=topk_idx, topk_weights=topk_weights, bias0=bias0,
                                         bias1=bias1).items()}


def combine_input(recv_x: torch.Tensor, rank: int) -> torch.Tensor:
    """What rank ``rank`` hands to combine: its received rows scaled by a per-rank factor."""
    return (recv_x.float() * ((rank + 1) / 4.0)).to(torch.bfloat16)


def combine_reference(x: torch.Tensor, is_token_in_rank: torch.Tensor, num_ranks: int,
                      biases: Tuple[Optional[torch.Tensor], ...]) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 combine result of this rank's tokens, and the sum of the absolute terms."""
    ref = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    magnitude = torch.zeros_like(ref)
    for d in range(num_ranks):
        term = (x.float() * ((d + 1) / 4.0)).to(torch.bfloat16).double() * is_token_in_rank[:, d:d + 1].double()
        ref += term
        magnitude += term.abs()
    for b in biases:
        if b is not None:
            ref += b.double()
            magnitude += b.double().abs()
    return ref, magnitude


# ------------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------------
def compare_dispatch(tag: str, got: Tuple, ref: Tuple, cached: bool = False) -> None:
    got_x, ref_x = got[0], ref[0]
    if isinstance(ref_x, tuple):
        assert_bitwise_equal(f"{tag} recv_x fp8", got_x[0], ref_x[0])
        assert_bitwise_equal(f"{tag} recv_x scales", got_x[1], ref_x[1])
    else:
        assert_bitwise_equal(f"{tag} recv_x", got_x, ref_x)
    if cached:
        assert all(v is None for v in got[1:5]), f"{tag}: cached dispatch must return None for the layout outputs"
        return
    assert_bitwise_equal(f"{tag} recv_topk_idx", got[1], ref[1])
    assert_bitwise_equal(f"{tag} recv_topk_weights", got[2], ref[2])
    assert got[3] == ref[3], f"{tag}: num_recv_tokens_per_expert_list {got[3]} != {ref[3]}"


def check_bad_values(rank: int, num_ranks: int, group: Any, torch_buf: Any, cuda_buf: Any, seed: int) -> None:
    """Every rank passes the same kind of bad layout values to a non-cached dispatch: each gets a
    ValueError (the kernels check them on the way to the receive counts), and the next good call works."""
    import deep_ep
    num_tokens, hidden, num_topk, num_experts = 512, 1024, 4, 8 * num_ranks
    case = make_case(rank, num_ranks, seed, num_tokens, hidden, num_topk, num_experts, "uniform")
    x, topk_idx, topk_weights = case["x"], case["topk_idx"], case["topk_weights"]
    per_rank, _, per_expert, in_rank, _ = cuda_buf.get_dispatch_layout(topk_idx, num_experts)
    config = deep_ep.Config(8, 4, 128)
    bad_topk = topk_idx.clone()
    bad_topk[num_tokens // 2, 1] = num_experts
    bad_inputs = (("topk_idx values must lie in", dict(topk_idx=bad_topk, num_tokens_per_rank=per_rank)),
                  ("does not match is_token_in_rank", dict(topk_idx=topk_idx, num_tokens_per_rank=per_rank + 1)))
    for message, kw in bad_inputs:
        with pytest.raises(ValueError, match=message):
            cuda_buf.dispatch(x, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                              topk_weights=topk_weights, config=config, **kw)
    # A combine ring below the kernel's minimum for this rank count: the error names the config's
    # field (not the buffer size), raised before anything is launched.
    recv_x, _, _, _, handle, _ = cuda_buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights,
                                                   num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                   num_tokens_per_expert=per_expert, config=config)
    with pytest.raises(ValueError, match="num_max_nvl_chunked_recv_tokens"):
        cuda_buf.combine(recv_x, handle, config=deep_ep.Config(8, 1, 2))
    check_case(rank, num_ranks, group, torch_buf, cuda_buf, seed + 1, num_tokens, hidden, num_topk, num_experts,
               "uniform", config, 1, False)


def _layout_kwargs(layout: Tuple, rdma_layout: bool) -> Dict[str, Any]:
    """get_dispatch_layout's outputs as dispatch keyword arguments; ``rdma_layout``: with the
    per-node counts (``num_tokens_per_rdma_rank``, internode kernels)."""
    per_rank, per_node, per_expert, in_rank, _ = layout
    kwargs = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    if rdma_layout:
        kwargs["num_tokens_per_rdma_rank"] = per_node
    return kwargs


def layout_args(buf: Any, topk_idx: torch.Tensor, num_experts: int, rdma_layout: bool = False) -> Dict[str, Any]:
    """``buf``'s dispatch layout of ``topk_idx`` as dispatch keyword arguments (see _layout_kwargs)."""
    return _layout_kwargs(buf.get_dispatch_layout(topk_idx, num_experts), rdma_layout)


def _async_kwargs(use_async: bool) -> Dict[str, Any]:
    """The keyword arguments of an async call (captured now), or none."""
    import deep_ep
    if not use_async:
        return {}
    return dict(previous_event=deep_ep.Buffer.capture(), async_finish=True, allocate_on_comm_stream=True)


def check_dispatch_combine(rank: int, num_ranks: int, group: Any, torch_buf: Any, cuda_buf: Any,
                           case: Dict[str, torch.Tensor], tag: str, num_experts: int, config: Any, alignment: int,
                           use_async: bool, *, rdma_layout: bool,
                           assert_combine_close: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None],
                           check_torch_combine: bool) -> None:
    """One case of the cuda backend against the torch backend (intranode and internode kernels):
    layout, bf16 / FP8 / cached dispatch bit for bit, combine (two, one, no biases; no weights)
    against a float64 reference, num_worst_tokens; every cuda-backend output poisoned first.

    Args:
        rdma_layout: the layout has per-node counts (internode): they must match and go to
            dispatch; else both backends must return None for them.
        assert_combine_close: the tolerance of the kernels' combine against the reference.
        check_torch_combine: also hold the torch backend's combine to ``assert_close_to_reference``.
    """
    import deep_ep
    x, topk_idx, topk_weights = case["x"], case["topk_idx"], case["topk_weights"]

    # layout
    ref_layout = torch_buf.get_dispatch_layout(topk_idx, num_experts)
    got_layout = cuda_buf.get_dispatch_layout(topk_idx, num_experts)
    layout_names = [(0, "num_tokens_per_rank"), (2, "num_tokens_per_expert"), (3, "is_token_in_rank")]
    if rdma_layout:
        layout_names.insert(1, (1, "num_tokens_per_rdma_rank"))
    for i, name in layout_names:
        assert_bitwise_equal(f"{tag} layout {name}", got_layout[i], ref_layout[i])
    if not rdma_layout:
        assert got_layout[1] is None and ref_layout[1] is None
    layout = _layout_kwargs(got_layout, rdma_layout)
    in_rank = layout["is_token_in_rank"]

    comm_stream = cuda_buf.get_comm_stream()

    def run_dispatch(buf: Any, x_in: Any, poison_as: Optional[Tuple] = None, **kw: Any) -> Tuple:
        if poison_as is not None:
            poison_allocator(comm_stream, *poison_as[:3])
        out = buf.dispatch(x_in, **kw, config=config, **_async_kwargs(use_async))
        if use_async:
            out[-1].current_stream_wait()
        return out

    # bf16 dispatch with top-k
    ref = run_dispatch(torch_buf, x, **layout, topk_idx=topk_idx, topk_weights=topk_weights,
                       expert_alignment=alignment)
    got = run_dispatch(cuda_buf, x, poison_as=ref, **layout, topk_idx=topk_idx, topk_weights=topk_weights,
                       expert_alignment=alignment)
    compare_dispatch(f"{tag} bf16", got, ref)
    handle, ref_handle = got[4], ref[4]

    # FP8 dispatch, scales in column-major strides
    x_fp8, scales = deep_ep.per_token_cast_to_fp8(x)
    scales_cm = scales.t().contiguous().t()
    ref8 = run_dispatch(torch_buf, (x_fp8, scales_cm), **layout, topk_idx=topk_idx, topk_weights=topk_weights)
    got8 = run_dispatch(cuda_buf, (x_fp8, scales_cm), poison_as=ref8, **layout, topk_idx=topk_idx,
                        topk_weights=topk_weights)
    compare_dispatch(f"{tag} fp8", got8, ref8)

    # cached dispatch of new data (bf16 and fp8)
    x2 = (x.float() * -0.5 + 1).to(torch.bfloat16)
    ref_c = run_dispatch(torch_buf, x2, handle=ref_handle)
    compare_dispatch(f"{tag} cached", run_dispatch(cuda_buf, x2, poison_as=ref_c, handle=handle), ref_c, cached=True)
    ref_c8 = run_dispatch(torch_buf, (x_fp8, scales), handle=ref_handle)
    compare_dispatch(f"{tag} cached fp8", run_dispatch(cuda_buf, (x_fp8, scales), poison_as=ref_c8, handle=handle),
                     ref_c8, cached=True)

    # combine: weights and two biases; one bias; none
    recv_x = got[0]
    comb_in = combine_input(recv_x, rank)
    expected_weights = torch.where(topk_idx >= 0, topk_weights, torch.zeros_like(topk_weights))
    for biases in ((case["bias0"], case["bias1"]), (case["bias0"], None), (None, None)):
        bias_arg = biases if biases[1] is not None else biases[0]
        extra = _async_kwargs(use_async)
        poison_allocator(comm_stream, x, topk_weights)
        combined, combined_w, event = cuda_buf.combine(comb_in, handle, topk_weights=got[2], bias=bias_arg,
                                                       config=config, **extra)
        if use_async:
            event.current_stream_wait()
        ref_comb, magnitude = combine_reference(x, in_rank, num_ranks, biases)
        assert_combine_close(f"{tag} combine biases={sum(b is not None for b in biases)}", combined, ref_comb,
                             magnitude)
        assert_bitwise_equal(f"{tag} combined_topk_weights", combined_w, expected_weights)
        if check_torch_combine:
            torch_comb = torch_buf.combine(comb_in, ref_handle, topk_weights=ref[2], bias=bias_arg)[0]
            assert_close_to_reference(f"{tag} torch-backend combine", torch_comb, ref_comb, magnitude)
    poison_allocator(comm_stream, x)
    combined_nw, none_w, _ = cuda_buf.combine(comb_in, handle, config=config)
    assert none_w is None
    ref_comb, magnitude = combine_reference(x, in_rank, num_ranks, (None, None))
    assert_combine_close(f"{tag} combine no weights", combined_nw, ref_comb, magnitude)

    # num_worst_tokens: no host sync, fixed row count, padding rows zero / -1 / 0; combine ignores the padding
    total_tokens = torch.tensor([x.shape[0]], device="cuda")
    dist.all_reduce(total_tokens, group=group)
    worst = int(total_tokens.item()) + 7
    ref_w = torch_buf.dispatch(x, **layout, topk_idx=topk_idx, topk_weights=topk_weights,
                               num_worst_tokens=worst, config=config)
    poison_allocator(comm_stream, *ref_w[:3])
    got_w = cuda_buf.dispatch(x, **layout, topk_idx=topk_idx, topk_weights=topk_weights,
                              num_worst_tokens=worst, config=config)
    compare_dispatch(f"{tag} worst", got_w, ref_w)
    comb_in_w = combine_input(got_w[0], rank)
    real = int(recv_x.shape[0])
    comb_in_w[real:] = float("nan")  # must never be read
    poison_allocator(comm_stream, x)
    combined_w_out = cuda_buf.combine(comb_in_w, got_w[4], config=config)[0]
    assert_combine_close(f"{tag} worst combine", combined_w_out, ref_comb, magnitude)


def check_case(rank: int, num_ranks: int, group: Any, torch_buf: Any, cuda_buf: Any, seed: int, num_tokens: int,
               hidden: int, num_topk: int, num_experts: int, mode: str, config: Any, alignment: int,
               use_async: bool) -> None:
    """check_dispatch_combine on a make_case input: intranode layout, combine within one bf16
    rounding (assert_close_to_reference), the torch backend's combine checked as well."""
    tag = (f"[seed={seed} T={num_tokens} H={hidden} K={num_topk} E={num_experts} mode={mode} "
           f"sms={config.num_sms} chunk={config.num_max_nvl_chunked_send_tokens} "
           f"cap={config.num_max_nvl_chunked_recv_tokens} align={alignment} async={use_async}]")
    case = make_case(rank, num_ranks, seed, num_tokens, hidden, num_topk, num_experts, mode)
    check_dispatch_combine(rank, num_ranks, group, torch_buf, cuda_buf, case, tag, num_experts, config, alignment,
                           use_async, rdma_layout=False, assert_combine_close=assert_close_to_reference,
                           check_torch_combine=True)


def check_cuda_graph(rank: int, num_ranks: int, cuda_buf: Any, seed: int, config: Any,
                     rdma_layout: bool = False) -> None:
    """Layout + dispatch (num_worst_tokens) + combine captured in one CUDA graph, replayed.
    ``rdma_layout``: dispatch gets the per-node counts too (internode kernels)."""
    num_tokens, hidden, num_topk, num_experts = 256, 2048, 4, 8 * num_ranks
    case = make_case(rank, num_ranks, seed, num_tokens, hidden, num_topk, num_experts, "uniform")
    worst = num_tokens * num_ranks
    static = {k: case[k].clone() for k in ("x", "topk_idx", "topk_weights")}

    def step() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layout = layout_args(cuda_buf, static["topk_idx"], num_experts, rdma_layout)
        recv_x, recv_idx, _, _, handle, _ = cuda_buf.dispatch(static["x"], **layout, topk_idx=static["topk_idx"],
                                                              topk_weights=static["topk_weights"],
                                                              num_worst_tokens=worst, config=config)
        combined = cuda_buf.combine(recv_x, handle, config=config)[0]
        return recv_x, recv_idx, combined

    gpu_utils.check_graph_replay(
        step, static,
        lambda replay: make_case(rank, num_ranks, seed + 100 + replay, num_tokens, hidden, num_topk, num_experts,
                                 "uniform"),
        ("recv_x", "recv_topk_idx", "combined"))


def check_repeatable(rank: int, num_ranks: int, cuda_buf: Any, seed: int, config: Any, repeats: int = 50,
                     rdma_layout: bool = False) -> None:
    """The same inputs give the same bytes every time (no races). ``rdma_layout``: dispatch gets
    the per-node counts too (internode kernels)."""
    num_tokens, hidden, num_topk, num_experts = 1024, 4096, 8, 16 * num_ranks
    case = make_case(rank, num_ranks, seed, num_tokens, hidden, num_topk, num_experts, "hot")
    layout = layout_args(cuda_buf, case["topk_idx"], num_experts, rdma_layout)
    recv_x, _, recv_w, _, handle, _ = cuda_buf.dispatch(case["x"], **layout, topk_idx=case["topk_idx"],
                                                        topk_weights=case["topk_weights"], config=config)
    comb_in = combine_input(recv_x, rank)
    first_combined = cuda_buf.combine(comb_in, handle, topk_weights=recv_w, config=config)[0]
    comm_stream = cuda_buf.get_comm_stream()
    for i in range(repeats):
        poison_allocator(comm_stream, recv_x, first_combined)
        again = cuda_buf.dispatch(case["x"], handle=handle, config=config)[0]
        assert_bitwise_equal(f"repeat {i} dispatch", again, recv_x)
        combined = cuda_buf.combine(comb_in, handle, topk_weights=recv_w, config=config)[0]
        assert_bitwise_equal(f"repeat {i} combine", combined, first_combined)


def _buffer_with_timeout(group: Any, num_ranks: int, timeout_s: float) -> Any:
    """A cuda-backend buffer whose kernels give up waiting after ``timeout_s``."""
    os.environ["DEEP_EP_TIMEOUT_S"] = str(timeout_s)
    try:
        return make_cuda_buffer(group, _nvl_bytes(num_ranks), explicitly_destroy=True)
    finally:
        del os.environ["DEEP_EP_TIMEOUT_S"]


def _expect_peer_timeout(rank: int, group: Any, timeout_s: float, call: Callable[[], Any], what: str,
                         kernel: str) -> Optional[str]:
    """Rank 0 sleeps past the timeout instead of taking part; every other rank runs ``call``, which
    must raise DeepEPTimeoutError naming this rank, ``kernel`` and rank 0 within the timeout. Returns
    the message on the other ranks (None on rank 0); ``what`` names the skipped call."""
    import deep_ep
    torch.cuda.synchronize()
    dist.barrier(group=group)
    if rank == 0:
        time.sleep(timeout_s + 6)
        return None
    start = time.monotonic()
    raised = None
    try:
        call()
    except deep_ep.DeepEPTimeoutError as error:
        raised = str(error)
    elapsed = time.monotonic() - start
    assert raised is not None, f"rank {rank}: no DeepEPTimeoutError after a peer skipped {what}"
    assert f"rank {rank}" in raised and kernel in raised and "rank 0" in raised, raised
    assert elapsed < timeout_s + 5, f"rank {rank}: the timeout took {elapsed:.1f} s"
    print(f"rank {rank}: {what} timeout reported after {elapsed:.2f} s: {raised}", flush=True)
    return raised


def check_timeout(rank: int, num_ranks: int, group: Any, seed: int) -> None:
    """Rank 0 never calls combine: every other rank gets DeepEPTimeoutError within the timeout."""
    import deep_ep
    timeout_s = 3.0
    buf = _buffer_with_timeout(group, num_ranks, timeout_s)
    config = deep_ep.Config(8, 4, 64)
    case = make_case(rank, num_ranks, seed, 2048, 2048, 8, 8 * num_ranks, "uniform")
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(case["topk_idx"], 8 * num_ranks)
    recv_x, _, _, _, handle, _ = buf.dispatch(case["x"], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                              num_tokens_per_expert=per_expert, topk_idx=case["topk_idx"],
                                              topk_weights=case["topk_weights"], config=config)

    def combine_twice() -> None:
        buf.combine(recv_x, handle, config=config)
        torch.cuda.synchronize()  # the kernel gives up after the timeout
        buf.combine(recv_x, handle, config=config)  # raises: the kernel recorded why

    if _expect_peer_timeout(rank, group, timeout_s, combine_twice, "combine", "intranode_combine") is not None:
        try:
            buf.get_dispatch_layout(case["topk_idx"], 8 * num_ranks)
        except RuntimeError as error:
            assert "failure" in str(error) or "unusable" in str(error), str(error)
        else:
            raise AssertionError("a failed buffer accepted another call")
    dist.barrier(group=group)
    buf.destroy()


def check_notify_timeout(rank: int, num_ranks: int, group: Any, seed: int) -> None:
    """Rank 0 never calls a non-cached dispatch: every other rank's count exchange times out and its
    dispatch raises DeepEPTimeoutError naming notify_dispatch and rank 0 within the timeout."""
    import deep_ep
    timeout_s = 3.0
    buf = _buffer_with_timeout(group, num_ranks, timeout_s)
    case = make_case(rank, num_ranks, seed, 512, 2048, 8, 8 * num_ranks, "uniform")
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(case["topk_idx"], 8 * num_ranks)
    _expect_peer_timeout(
        rank, group, timeout_s,
        lambda: buf.dispatch(case["x"], num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                             num_tokens_per_expert=per_expert, topk_idx=case["topk_idx"],
                             topk_weights=case["topk_weights"], config=deep_ep.Config(8, 4, 64)),
        "non-cached dispatch", "notify_dispatch")
    dist.barrier(group=group)
    buf.destroy()


def correctness_worker(rank: int, num_ranks: int, group: Any, seed: int, quick: bool, skip_timeout: bool) -> None:
    """Every check of this module: the cases, graph, repeatability, tuned-config, bad-value and
    timeout checks."""
    import deep_ep
    torch_buf = deep_ep.Buffer(group, _nvl_bytes(num_ranks), backend="torch")
    torch.manual_seed(seed + rank)
    nvl_bytes = _nvl_bytes(num_ranks)
    cuda_buf = make_cuda_buffer(group, nvl_bytes, explicitly_destroy=True)
    assert type(cuda_buf._backend).__name__ == "CudaBackend" and cuda_buf._backend.uses_intranode_kernels
    gen = torch.Generator().manual_seed(seed)
    base_cases = [
        # (tokens, hidden, topk, experts, mode, config, alignment, async)
        (4096, 7168, 8, 256, "uniform", deep_ep.Config(24, 4, 256), 1, False),
        (1000, 2048, 4, 8 * num_ranks, "hot", deep_ep.Config(8, 1, 48), 128, False),
        (777, 4096, 9, 32 * num_ranks, "uniform", deep_ep.Config(2, 2, 64), 4, True),
        (513, 256, 2, 2 * num_ranks, "hot", deep_ep.Config(32, 8, 512), 1, False),
        (300, 7168, 6, 64 * num_ranks, "uniform", deep_ep.Config(16, 6, 96), 16, True),
        # a send chunk larger than a sub-ring holds, with many laps around small rings
        (2000, 1024, 8, 8 * num_ranks, "uniform", deep_ep.Config(4, 24, 48), 1, False),
    ]
    if quick:
        base_cases = [base_cases[0], base_cases[1], base_cases[-1]]
    for i, (t, h, k, e, mode, config, align, use_async) in enumerate(base_cases):
        case_seed = seed + 31 * i
        # uneven token counts; in case 1 the last rank sends nothing; in case 2 rank 0 has no tokens
        t_rank = max(0, t + int(torch.randint(-t // 4, t // 4 + 1, (1,), generator=gen)) * (rank % 2 * 2 - 1))
        rank_mode = "empty" if (i == 1 and rank == num_ranks - 1) else mode
        if i == 2 and rank == 0:
            t_rank = 0
        check_case(rank, num_ranks, group, torch_buf, cuda_buf, case_seed, t_rank, h, k, e, rank_mode, config,
                   align, use_async)
        _log(rank, f"case {i}: T~{t} H={h} K={k} E={e} {mode} sms={config.num_sms}: ok")
    check_cuda_graph(rank, num_ranks, cuda_buf, seed + 7, deep_ep.Config(16, 4, 128))
    _log(rank, "cuda graph capture + replay: ok")
    check_repeatable(rank, num_ranks, cuda_buf, seed + 11, deep_ep.Config(24, 4, 256),
                     repeats=10 if quick else 50)
    _log(rank, "repeated runs identical: ok")
    # set_num_sms + default configs
    deep_ep.Buffer.set_num_sms(12)
    check_case(rank, num_ranks, group, torch_buf, cuda_buf, seed + 99, 600, 1024, 8, 16 * num_ranks, "uniform",
               deep_ep.Buffer.get_dispatch_config(num_ranks), 1, False)
    deep_ep.Buffer.set_num_sms(20)
    _log(rank, "set_num_sms + tuned configs: ok")
    check_bad_values(rank, num_ranks, group, torch_buf, cuda_buf, seed + 13)
    _log(rank, "bad layout values -> ValueError, buffer still usable: ok")
    cuda_buf.destroy()
    if not skip_timeout:
        check_timeout(rank, num_ranks, group, seed + 5)
        _log(rank, "timeout -> DeepEPTimeoutError: ok")
        check_notify_timeout(rank, num_ranks, group, seed + 6)
        _log(rank, "count-exchange timeout -> DeepEPTimeoutError: ok")
    torch_buf.destroy()


# ------------------------------------------------------------------------------------------------
# benchmark
# ------------------------------------------------------------------------------------------------
def _time_us(fn: Callable[[int], Any], iters: int, warmup: int = 5) -> float:
    """Median device time (us) on this rank of ``iters`` back-to-back calls ``fn(i)``."""
    return statistics.median(gpu_utils.cuda_event_times_us(fn, iters, warmup))


def _covered_time_us(fn: Callable[[int], Any], iters: int, warmup: int = 5) -> Tuple[float, float]:
    """Median device time (us) on this rank of ``iters`` calls ``fn(i)`` with each call's host work
    hidden behind a GPU sleep (gpu_utils.covered_event_times_us), and the median host time per call."""
    device, host = gpu_utils.covered_event_times_us(fn, iters, warmup)
    return statistics.median(device), statistics.median(host)


_slowest = gpu_utils.max_over_ranks
_lowest = gpu_utils.min_over_ranks


# Activities of the warp trace (csrc/kernels/warp_trace.cuh: kTraceTotal ... kTraceLocal; slot 6
# counts rows) for the intranode kernels; "" = not marked.
INTRANODE_TRACE_LABELS = {
    "send": ["lifetime", "wait for free slots / ack", "copy into ring", "tail publishes", "", "own-rank rows", ""],
    "recv": ["lifetime", "wait for slots / metadata", "drain / sum", "end barrier + release", "numbering + barrier",
             "", ""],
}


def print_warp_trace(rank: int, title: str, cycles: List[int], clock_khz: int, kernel: int, num_channels: int,
                     calls: int, labels: Dict[str, List[str]], warps: int) -> None:
    """A warp trace table (KERNEL_TRACE=1 builds: ``[2 kernels][blocks][8]`` cycles summed over a
    block's warps and ``calls``): per role (even blocks send, odd receive) and activity, us per
    call and warp, mean over the role's blocks and the largest block; then rows per block and call."""
    table = torch.tensor(cycles, dtype=torch.float64).view(2, -1, 8)[kernel, :2 * num_channels]
    lines = [f"[rank {rank}] warp trace, {title}: us per call and warp (mean over the role's blocks / max block)"]
    for role, rows in (("send", table[0::2]), ("recv", table[1::2])):
        per_warp = rows / calls / clock_khz * 1e3 / warps
        for slot, label in enumerate(labels[role]):
            col = per_warp[:, slot]
            if label and float(col.max()) > 0:
                lines.append(f"  {role} {label:26s} {float(col.mean()):8.1f} {float(col.max()):8.1f}")
        lines.append(f"  {role} rows per block and call     {float((rows[:, 6] / calls).mean()):8.1f}")
    print("\n".join(lines), flush=True)


def collect_warp_trace(reset: Callable[[bool], None], read: Callable[[], Tuple[List[int], int]],
                       fn: Callable[[int], Any], calls: int) -> Tuple[List[int], int]:
    """``calls`` calls of ``fn`` with a warp trace on (``reset``/``read``: the extension's pair for
    one kernel family): the table's cycles and the SM clock (kHz)."""
    reset(True)
    for i in range(calls):
        fn(i)
    torch.cuda.synchronize()
    cycles, clock_khz = read()
    reset(False)
    return cycles, clock_khz


def intranode_trace(rank: int, op: str, fn: Any, calls: int, num_channels: int) -> None:
    """DEEP_EP_INTRANODE_TRACE=1 (a KERNEL_TRACE=1 build): where the intranode kernel's time goes."""
    import deep_ep_cpp
    cycles, clock_khz = collect_warp_trace(deep_ep_cpp.intranode_trace_reset, deep_ep_cpp.intranode_trace_read, fn,
                                           calls)
    print_warp_trace(rank, op, cycles, clock_khz, 1 if op.startswith("combine") else 0, num_channels, calls,
                     INTRANODE_TRACE_LABELS, int(deep_ep_cpp.INTRANODE_WARPS))


def bench_worker(rank: int, num_ranks: int, group: Any, seed: int, iters: int, json_path: Optional[str]) -> None:
    """The SM and chunk sweeps, each row beside all_to_all_single of the same bytes, and a summary table."""
    import deep_ep
    num_tokens, hidden, num_topk, num_experts = 4096, 7168, 8, 256
    gen = torch.Generator().manual_seed(seed + rank)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    topk_idx = scores.topk(num_topk, dim=-1).indices.cuda()
    topk_weights = torch.rand(num_tokens, num_topk, generator=gen).cuda()
    xs = [torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16).cuda() for _ in range(3)]
    x8s = [deep_ep.per_token_cast_to_fp8(x) for x in xs]
    nvl_bytes = _nvl_bytes(num_ranks)

    buf = make_cuda_buffer(group, nvl_bytes, explicitly_destroy=True)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    recv_x, _, _, _, handle, _ = buf.dispatch(xs[0], **layout, topk_idx=topk_idx, topk_weights=topk_weights,
                                              config=deep_ep.Config(24, 4, 256))
    rows = recv_x.shape[0]
    comb_ins = [combine_input(recv_x, rank), combine_input(recv_x, rank + 1)]
    bf16_bytes = rows * hidden * 2
    fp8_bytes = rows * (hidden + hidden // 128 * 4)

    # all_to_all_single baselines of the same bytes (send splits per destination, receive per source)
    send_counts = per_rank.tolist()
    recv_counts = torch.empty(num_ranks, dtype=torch.int64, device="cuda")
    dist.all_to_all_single(recv_counts, per_rank.to(torch.int64))
    recv_counts = recv_counts.tolist()

    def a2a_time(row_bytes: int, reverse: bool) -> float:
        s_counts, r_counts = (recv_counts, send_counts) if reverse else (send_counts, recv_counts)
        send = torch.randint(0, 255, (sum(s_counts) * row_bytes,), dtype=torch.uint8, device="cuda")
        recv = torch.empty(sum(r_counts) * row_bytes, dtype=torch.uint8, device="cuda")
        s_split = [c * row_bytes for c in s_counts]
        r_split = [c * row_bytes for c in r_counts]
        return _time_us(lambda i: dist.all_to_all_single(recv, send, r_split, s_split), iters)

    baseline = {"dispatch_bf16": a2a_time(hidden * 2, False),
                "dispatch_fp8": a2a_time(hidden + hidden // 128 * 4, False),
                "combine_bf16": a2a_time(hidden * 2, True)}
    byte_counts = {"dispatch_bf16": bf16_bytes, "dispatch_fp8": fp8_bytes, "combine_bf16": bf16_bytes}
    results: List[Dict[str, Any]] = []

    def record(op: str, sms: int, chunk: int, cap: int, t_us: float, covered: Tuple[float, float]) -> None:
        gbps = byte_counts[op] / t_us / 1e3
        base_gbps = byte_counts[op] / baseline[op] / 1e3
        row = dict(op=op, num_sms=sms, chunk=chunk, capacity=cap, time_us=_slowest(t_us),
                   gbps_min=_lowest(gbps), baseline_us=_slowest(baseline[op]), baseline_gbps_min=_lowest(base_gbps),
                   covered_time_us=_slowest(covered[0]), covered_gbps_min=_lowest(byte_counts[op] / covered[0] / 1e3),
                   host_us=_slowest(covered[1]))
        row["speedup"] = row["gbps_min"] / row["baseline_gbps_min"]
        results.append(row)
        _log(rank, f"{op:14s} sms={sms:2d} chunk={chunk:2d} cap={cap:3d}: {row['time_us']:8.1f} us "
                   f"{row['gbps_min']:6.1f} GB/s | all_to_all_single {row['baseline_us']:8.1f} us "
                   f"{row['baseline_gbps_min']:6.1f} GB/s | x{row['speedup']:.2f} | host covered "
                   f"{row['covered_time_us']:8.1f} us {row['covered_gbps_min']:6.1f} GB/s, host {row['host_us']:6.1f} us")

    def measure(sms: int, chunk: int, cap: int) -> None:
        config = deep_ep.Config(sms, chunk, cap)
        calls = {"dispatch_bf16": lambda i: buf.dispatch(xs[i % 3], handle=handle, config=config),
                 "dispatch_fp8": lambda i: buf.dispatch(x8s[i % 3], handle=handle, config=config),
                 "combine_bf16": lambda i: buf.combine(comb_ins[i % 2], handle, config=config)}
        for op, call in calls.items():
            try:
                t_us = _time_us(call, iters)
                covered = _covered_time_us(call, iters)
            except ValueError as error:
                # A ring below the kernel's minimum for this rank count (the combine needs more
                # slots per sub-ring than dispatch): the same on every rank, raised before launch.
                if "num_max_nvl_chunked_recv_tokens" not in str(error):
                    raise
                _log(rank, f"{op:14s} sms={sms:2d} chunk={chunk:2d} cap={cap:3d}: skipped ({error})")
                continue
            record(op, sms, chunk, cap, t_us, covered)

    _log(rank, f"bench: {num_ranks} ranks, {torch.cuda.get_device_name()}, {num_tokens} tokens x {hidden} "
               f"top-{num_topk} of {num_experts}; rank 0 receives {rows} rows; median of {iters}, slowest rank")
    for sms in (8, 12, 16, 20, 24, 28, 32):
        measure(sms, 2, 256)
    for chunk, cap in ((1, 256), (4, 256), (8, 256), (2, 32), (2, 64), (2, 128), (2, 512)):
        measure(24, chunk, cap)
    # DEEP_EP_WARPS_PER_PEER (fewer concurrent flows per channel and peer) was swept on
    # 2026-11-28: 2 or 3 warps lose 10-40 %, 4 is within noise of the default 6 (docs/benchmarks.md).
    # the full (non-cached) dispatch: notify + host wait for the counts + data
    config = deep_ep.Config(24, 2, 256)
    if os.environ.get("DEEP_EP_INTRANODE_TRACE") == "1":
        intranode_trace(rank, "dispatch_bf16", lambda i: buf.dispatch(xs[i % 3], handle=handle, config=config), iters,
                        config.num_sms // 2)
        intranode_trace(rank, "dispatch_fp8", lambda i: buf.dispatch(x8s[i % 3], handle=handle, config=config), iters,
                        config.num_sms // 2)
        intranode_trace(rank, "combine_bf16", lambda i: buf.combine(comb_ins[i % 2], handle, config=config), iters,
                        config.num_sms // 2)
    if os.environ.get("DEEP_EP_INTRANODE_HOST_PROFILE") == "1":
        # Where a cached call's host time goes (every rank calls: the kernels wait for each other).
        gpu_utils.print_host_profile(lambda: buf.dispatch(x8s[0], handle=handle, config=config), rank,
                                     "cached FP8 dispatch", 100)
        gpu_utils.print_host_profile(lambda: buf.combine(comb_ins[0], handle, config=config), rank, "combine", 100)
        # The pieces of a cached FP8 dispatch's host time, each timed alone (every rank makes the
        # same calls: the launches among them run their kernels).
        backend = buf._backend
        runtime = backend._runtime
        data, scales = x8s[0]
        rows = handle.num_output_rows
        outs = (torch.empty(rows, hidden, dtype=data.dtype, device="cuda"),
                torch.empty(rows, scales.shape[1], dtype=torch.float32, device="cuda"),
                torch.empty(rows, dtype=torch.int32, device="cuda"))
        pieces = {
            "Buffer.dispatch": lambda: buf.dispatch(x8s[0], handle=handle, config=config),
            "backend.dispatch (no Buffer checks)": lambda: backend.dispatch(
                x8s[0], handle, None, None, None, None, None, None, 1, 0, config, None, False, False),
            "runtime.dispatch (C++ checks + launch)": lambda: runtime.dispatch(
                data, scales, None, None, handle.is_token_in_rank, handle.recv_rank_prefix, outs[0], outs[1], None,
                None, outs[2], handle.num_experts, False, config.num_sms, config.num_max_nvl_chunked_send_tokens,
                config.num_max_nvl_chunked_recv_tokens, None),
            "the three output torch.empty": lambda: (
                torch.empty(rows, hidden, dtype=data.dtype, device="cuda"),
                torch.empty(rows, scales.shape[1], dtype=torch.float32, device="cuda"),
                torch.empty(rows, dtype=torch.int32, device="cuda")),
            "empty kernel launch": lambda: torch.cuda._sleep(0),
            "Buffer.combine": lambda: buf.combine(comb_ins[0], handle, config=config),
            "Buffer.get_dispatch_layout": lambda: buf.get_dispatch_layout(topk_idx, num_experts),
        }
        for name, fn in pieces.items():
            _log(rank, f"host time of {name}: {gpu_utils.host_time_us(fn):.1f} us")
    full = lambda i: buf.dispatch(xs[i % 3], **layout, topk_idx=topk_idx, topk_weights=topk_weights, config=config)
    record("dispatch_bf16", 24, -1, 256, _time_us(full, iters), _covered_time_us(full, iters))
    _log(rank, "(chunk=-1: non-cached dispatch incl. count exchange, host wait and value checks)")
    buf.destroy()
    if rank == 0:
        print_summary(results)
    if rank == 0 and json_path:
        with open(json_path, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), num_ranks=num_ranks,
                           sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
                           results=results), f, indent=1)


def print_summary(results: List[Dict[str, Any]]) -> None:
    """One line per (op, SMs, chunk, capacity): the kernels' GB/s, all_to_all_single's, and the ratio."""
    print("\nsummary: GB/s of the slowest rank; chunk -1 = non-cached dispatch; GB/s and a2a: back-to-back "
          "calls; covered: each call's host work hidden behind a GPU sleep (device time alone); host: us per call")
    print(f"{'op':14s} {'sms':>3s} {'chunk':>5s} {'cap':>4s} | {'GB/s':>7s} | {'a2a GB/s':>8s} | ratio | "
          f"{'covered':>7s} | {'host us':>7s}")
    for row in results:
        print(f"{row['op']:14s} {row['num_sms']:3d} {row['chunk']:5d} {row['capacity']:4d} | {row['gbps_min']:7.1f} | "
              f"{row['baseline_gbps_min']:8.1f} | x{row['speedup']:.2f} | {row['covered_gbps_min']:7.1f} | "
              f"{row['host_us']:7.1f}")


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------
_seed = gpu_utils.fresh_seed


@pytest.mark.parametrize("num_processes", [2, 4])
def test_intranode(num_processes: int) -> None:
    reason = gpu_utils.skip_reason(num_processes)
    if reason is not None:
        pytest.skip(reason)
    gpu_utils.spawn(correctness_worker, num_processes, _seed(), False, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats")
    parser.add_argument("--skip-timeout", action="store_true", help="skip the timeout test")
    parser.add_argument("--bench", action="store_true", help="run the benchmark instead of the checks")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--json", default=None, help="benchmark results to this file")
    args = parser.parse_args()
    seed = gpu_utils.script_seed(args.num_processes, args.seed)
    if seed is None:
        return
    start = time.time()
    if args.bench:
        gpu_utils.spawn(bench_worker, args.num_processes, seed, args.iters, args.json)
    else:
        gpu_utils.spawn(correctness_worker, args.num_processes, seed, args.quick, args.skip_timeout)
        print(f"test_intranode: all checks passed on {args.num_processes} GPUs ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
