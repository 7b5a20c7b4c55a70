"""Internode kernels (the cuda backend's default for a group of several nodes) against the torch backend.

One host's GPUs are split into "nodes" of ``--nvl-domain-size`` ranks, so the inter-node (rail)
leg really runs, over NVSHMEM's P2P transport here. Every rank builds a torch-backend Buffer and
a cuda-backend Buffer with the same ``nvl_domain_size`` on the same NCCL group and feeds both the
same inputs: dispatch must match bit for bit (row order included), with uniform and with
group-limited routing (``deep_ep.utils.group_limited_topk``); combine must lie within one bf16
rounding of a float64 reference per node partial sum (the kernels round each node's partial sum
to bf16 once before the final sum); repeated runs must be identical. ``--bench`` prints
logical, inter-node-leg and NVLink GB/s beside the ``all_to_all_single`` baseline and the
intranode kernels on the same GPUs.

Run as a script::

    python tests/test_internode.py --num-processes 4 --nvl-domain-size 2
    python tests/test_internode.py --num-processes 4 --nvl-domain-size 1
    python tests/test_internode.py --num-processes 4 --nvl-domain-size 2 --bench

or through pytest (skipped without enough Hopper GPUs or without the extension).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, Tuple

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_utils  # noqa: E402
from gpu_utils import assert_close_to_reference  # noqa: E402
from test_intranode import (_log, _lowest, _slowest, _time_us, check_cuda_graph, print_warp_trace,  # noqa: E402
                            check_dispatch_combine, check_repeatable, collect_warp_trace, combine_input, layout_args,
                            make_case)

MAX_HIDDEN = 7168
MAX_SMS = 32
ENV_FLAG = "DEEP_EP_INTERNODE_KERNELS"


def _buffer_bytes(num_ranks: int, nvl_domain_size: int) -> Tuple[int, int]:
    import deep_ep
    config = deep_ep.Config(MAX_SMS, 8, 512, 16, 128)
    return (config.get_nvl_buffer_size_hint(MAX_HIDDEN * 2, nvl_domain_size),
            config.get_rdma_buffer_size_hint(MAX_HIDDEN * 2, num_ranks))


def _make_buffers(group: Any, num_ranks: int, nvl_domain_size: int) -> Tuple[Any, Any]:
    import deep_ep
    nvl_bytes, rdma_bytes = _buffer_bytes(num_ranks, nvl_domain_size)
    # The default environment (an opt-out from the caller's shell would test the torch backend).
    opt_out = os.environ.pop(ENV_FLAG, None)
    try:
        cuda_buf = deep_ep.Buffer(group, nvl_bytes, rdma_bytes, backend="cuda", explicitly_destroy=True,
                                  nvl_domain_size=nvl_domain_size)
    finally:
        if opt_out is not None:
            os.environ[ENV_FLAG] = opt_out
    assert cuda_buf._backend.uses_internode_kernels, "the internode kernels did not serve the buffer"
    torch_buf = deep_ep.Buffer(group, nvl_bytes, rdma_bytes, backend="torch", nvl_domain_size=nvl_domain_size)
    return torch_buf, cuda_buf


def assert_close_per_node(name: str, actual: torch.Tensor, reference: torch.Tensor, magnitude: torch.Tensor) -> None:
    """``actual`` within one bf16 rounding of the float64 ``reference`` plus one bf16 rounding of
    each node's partial sum (bounded by ``magnitude``, the sum of the absolute terms)."""
    assert_close_to_reference(name, actual, reference, magnitude, magnitude_tolerance=2.0 ** -8)


def group_limited_case(rank: int, seed: int, num_tokens: int, hidden: int, num_topk: int, num_experts: int,
                       num_nodes: int) -> Dict[str, torch.Tensor]:
    """Like make_case, with DeepSeek-style routing: top-k experts within the best node groups."""
    import deep_ep
    case = make_case(rank, 1, seed, num_tokens, hidden, num_topk, num_experts, "uniform")
    gen = torch.Generator().manual_seed(seed * 7919 + rank)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    groups = max(1, num_nodes // 2)
    topk_idx, weights = deep_ep.utils.group_limited_topk(scores, num_nodes, groups, num_topk)
    case["topk_idx"], case["topk_weights"] = topk_idx.cuda(), weights.float().cuda()
    return case


def check_case(rank: int, num_ranks: int, group: Any, torch_buf: Any, cuda_buf: Any, case: Dict[str, torch.Tensor],
               tag: str, num_experts: int, config: Any, alignment: int, use_async: bool) -> None:
    """test_intranode's check_dispatch_combine with the internode layout (per-node counts checked
    and passed to dispatch) and combine tolerance (assert_close_per_node)."""
    check_dispatch_combine(rank, num_ranks, group, torch_buf, cuda_buf, case, tag, num_experts, config, alignment,
                           use_async, rdma_layout=True, assert_combine_close=assert_close_per_node,
                           check_torch_combine=False)


def _layout(buf: Any, topk_idx: torch.Tensor, num_experts: int) -> Dict[str, torch.Tensor]:
    return layout_args(buf, topk_idx, num_experts, rdma_layout=True)


def correctness_worker(rank: int, num_ranks: int, group: Any, seed: int, nvl_domain_size: int, quick: bool) -> None:
    import deep_ep
    torch.manual_seed(seed + rank)
    num_nodes = num_ranks // nvl_domain_size
    torch_buf, cuda_buf = _make_buffers(group, num_ranks, nvl_domain_size)
    gen = torch.Generator().manual_seed(seed)
    cases = [
        # (tokens, hidden, topk, experts, routing, config, alignment, async)
        (4096, 7168, 8, 256, "uniform", deep_ep.Config(24, 4, 256, 8, 128), 1, False),
        (4096, 7168, 8, 256, "group", deep_ep.Config(24, 4, 256, 8, 128), 1, False),
        (1000, 2048, 4, 8 * num_ranks, "hot", deep_ep.Config(8, 1, 48, 2, 32), 128, False),
        (777, 4096, 9, 32 * num_ranks, "uniform", deep_ep.Config(2, 2, 64, 4, 16), 4, True),
        (513, 256, 2, 2 * num_ranks, "hot", deep_ep.Config(32, 8, 512, 16, 128), 1, False),
        (300, 7168, 6, 64 * num_ranks, "group", deep_ep.Config(16, 6, 96, 6, 64), 16, True),
    ]
    if quick:
        cases = cases[:3]
    for i, (t, h, k, e, mode, config, align, use_async) in enumerate(cases):
        case_seed = seed + 31 * i
        t_rank = max(0, t + int(torch.randint(-t // 4, t // 4 + 1, (1,), generator=gen)) * (rank % 2 * 2 - 1))
        if i == 2 and rank == num_ranks - 1:
            mode = "empty"  # this rank sends nothing
        if i == 3 and rank == 0:
            t_rank = 0
        if mode == "group":
            case = group_limited_case(rank, case_seed, t_rank, h, k, e, num_nodes)
        else:
            case = make_case(rank, num_ranks, case_seed, t_rank, h, k, e, mode)
        tag = (f"[case {i} seed={case_seed} T={t_rank} H={h} K={k} E={e} {mode} L={nvl_domain_size} "
               f"config={config} align={align} async={use_async}]")
        check_case(rank, num_ranks, group, torch_buf, cuda_buf, case, tag, e, config, align, use_async)
        _log(rank, f"case {i}: T~{t} H={h} K={k} E={e} {mode} sms={config.num_sms}: ok")
    check_cuda_graph(rank, num_ranks, cuda_buf, seed + 7, deep_ep.Config(16, 4, 128, 4, 64), rdma_layout=True)
    _log(rank, "cuda graph capture + replay: ok")
    check_repeatable(rank, num_ranks, cuda_buf, seed + 11, deep_ep.Config(24, 4, 256, 8, 128),
                     repeats=5 if quick else 20, rdma_layout=True)
    _log(rank, "repeated runs identical: ok")
    cuda_buf.destroy()
    torch_buf.destroy()


# ------------------------------------------------------------------------------------------------
# benchmark
# ------------------------------------------------------------------------------------------------
# Kernel-name substrings of one internode call, first match wins: the rail legs, the NVLink leg,
# the row reorder (dispatch: index_copy_, combine: index_select); "" takes every other device
# event (fills, copies, small torch ops).
_BREAKDOWN_KEYS = ["rail_dispatch_kernel", "rail_combine_kernel", "notify_kernel", "notify_dispatch_kernel",
                   "intranode_dispatch_kernel", "intranode_combine_kernel", "index_copy", "indexSelect", "nccl",
                   "spin_kernel", ""]


def kernel_breakdown(rank: int, op: str, fn: Any, iters: int) -> None:
    """Per-call device time of each kernel of ``fn`` (torch.profiler), slowest rank, on rank 0's log."""
    from test_low_latency import _kernel_durations
    calls = [0]

    def call() -> None:
        fn(calls[0])
        calls[0] += 1

    durations = _kernel_durations(call, iters, _BREAKDOWN_KEYS)
    parts = []
    total = 0.0
    for key in _BREAKDOWN_KEYS:
        if key in ("nccl", "spin_kernel"):
            continue  # the profiler's own rank alignment
        per_call = _slowest(sum(durations[key]) / iters)
        if per_call > 0.0:
            total += per_call
            parts.append(f"{key or 'other'} {per_call:.1f}")
    _log(rank, f"    {op} device time per call (us, slowest rank each): " + ", ".join(parts) +
               f"; sum {total:.1f}")


# Activities of the rail kernels' warp trace (csrc/kernels/warp_trace.cuh; "" = not marked).
_RAIL_TRACE_LABELS = {
    "send": ["lifetime", "wait for free slots", "copy into ring", "tail publishes", "open (wait)", "own-node copies",
             ""],
    "recv": ["lifetime", "wait for slots", "drain / sum", "end barrier + release", "numbering + barrier",
             "own-node copies", ""],
}


def rail_trace(rank: int, op: str, fn: Any, calls: int, num_channels: int) -> None:
    """DEEP_EP_RAIL_TRACE=1 (a KERNEL_TRACE=1 build): where the rail kernel's time goes."""
    import deep_ep_cpp
    cycles, clock_khz = collect_warp_trace(deep_ep_cpp.rail_trace_reset, deep_ep_cpp.rail_trace_read, fn, calls)
    print_warp_trace(rank, f"rail leg of {op}", cycles, clock_khz, 0 if op.startswith("dispatch") else 1,
                     num_channels, calls, _RAIL_TRACE_LABELS, int(deep_ep_cpp.RAIL_WARPS))


# The benchmark's workload (DESIGN.md §6): tokens, hidden, top-k, experts.
_BENCH_SHAPE = (4096, 7168, 8, 256)


def _bench_setup(rank: int, num_ranks: int, group: Any, seed: int, nvl_domain_size: int) -> Tuple[Any, ...]:
    """The benchmark's inputs (three bf16 inputs and their FP8 casts, both routings) and buffers
    (the internode kernels' and, over all ranks as one node, the intranode kernels')."""
    import deep_ep
    num_tokens, hidden, num_topk, num_experts = _BENCH_SHAPE
    num_nodes = num_ranks // nvl_domain_size
    gen = torch.Generator().manual_seed(seed + rank)
    xs = [torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16).cuda() for _ in range(3)]
    x8s = [deep_ep.per_token_cast_to_fp8(x) for x in xs]
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    routings = {"uniform": (scores.topk(num_topk, dim=-1).indices, torch.rand(num_tokens, num_topk, generator=gen)),
                "group-limited": deep_ep.utils.group_limited_topk(scores, num_nodes, max(1, num_nodes // 2),
                                                                  num_topk)}
    _, cuda_buf = _make_buffers(group, num_ranks, nvl_domain_size)
    nvl_bytes, _ = _buffer_bytes(num_ranks, num_ranks)
    intra_buf = deep_ep.Buffer(group, nvl_bytes, backend="cuda", explicitly_destroy=True, nvl_domain_size=num_ranks)
    return xs, x8s, routings, cuda_buf, intra_buf


def bench_worker(rank: int, num_ranks: int, group: Any, seed: int, nvl_domain_size: int, iters: int) -> None:
    import deep_ep
    num_tokens, hidden, num_topk, num_experts = _BENCH_SHAPE
    num_nodes = num_ranks // nvl_domain_size
    xs, x8s, routings, cuda_buf, intra_buf = _bench_setup(rank, num_ranks, group, seed, nvl_domain_size)
    # The best chunk sizes of the sweep (--sweep, 4 x H200 as 2 x 2): NVLink leg chunk 2 with a
    # 512-token ring, rail chunk 16 (the same NVLink chunk as the intranode kernels compared here).
    config = deep_ep.Config(24, 2, 512, 16, 128)
    intra_config = deep_ep.Config(24, 2, 256)
    _log(rank, f"bench: {num_ranks} ranks as {num_nodes} nodes x {nvl_domain_size}, {torch.cuda.get_device_name()}, "
               f"{num_tokens} tokens x {hidden} top-{num_topk} of {num_experts}; {config}; median of {iters}, "
               f"slowest rank; GB/s of the slowest rank")
    for name, (topk_idx, topk_weights) in routings.items():
        topk_idx, topk_weights = topk_idx.cuda(), topk_weights.float().cuda()
        layout = _layout(cuda_buf, topk_idx, num_experts)
        recv_x, _, _, _, handle, _ = cuda_buf.dispatch(xs[0], **layout, topk_idx=topk_idx, topk_weights=topk_weights,
                                                       config=config)
        rows = recv_x.shape[0]
        node = rank // nvl_domain_size
        per_node = layout["num_tokens_per_rdma_rank"].tolist()
        rail_tokens = sum(c for m, c in enumerate(per_node) if m != node)
        forwarded = int(handle.forward_counts.sum())
        comb_ins = [combine_input(recv_x, rank), combine_input(recv_x, rank + 1)]
        per_rank = layout["num_tokens_per_rank"]
        recv_counts = torch.empty(num_ranks, dtype=torch.int64, device="cuda")
        dist.all_to_all_single(recv_counts, per_rank.to(torch.int64))
        send_counts, recv_counts_l = per_rank.tolist(), recv_counts.tolist()

        def a2a(row_bytes: int, reverse: bool) -> float:
            s, r = (recv_counts_l, send_counts) if reverse else (send_counts, recv_counts_l)
            send = torch.randint(0, 255, (sum(s) * row_bytes,), dtype=torch.uint8, device="cuda")
            recv = torch.empty(sum(r) * row_bytes, dtype=torch.uint8, device="cuda")
            return _time_us(lambda i: dist.all_to_all_single(recv, send, [c * row_bytes for c in r],
                                                             [c * row_bytes for c in s]), iters)

        intra_layout = intra_buf.get_dispatch_layout(topk_idx, num_experts)
        _, _, _, _, intra_handle, _ = intra_buf.dispatch(
            xs[0], num_tokens_per_rank=intra_layout[0], is_token_in_rank=intra_layout[3],
            num_tokens_per_expert=intra_layout[2], topk_idx=topk_idx, topk_weights=topk_weights, config=intra_config)
        fp8_row = hidden + hidden // 128 * 4
        ops = [
            ("dispatch_bf16", hidden * 2, lambda i: cuda_buf.dispatch(xs[i % 3], handle=handle, config=config),
             lambda i: intra_buf.dispatch(xs[i % 3], handle=intra_handle, config=intra_config), False),
            ("dispatch_fp8", fp8_row, lambda i: cuda_buf.dispatch(x8s[i % 3], handle=handle, config=config),
             lambda i: intra_buf.dispatch(x8s[i % 3], handle=intra_handle, config=intra_config), False),
            ("combine_bf16", hidden * 2, lambda i: cuda_buf.combine(comb_ins[i % 2], handle, config=config),
             lambda i: intra_buf.combine(comb_ins[i % 2], intra_handle, config=intra_config), True),
        ]
        _log(rank, f"routing {name}: rank 0 receives {rows} rows, sends {rail_tokens} tokens over the rails, "
                   f"forwards {forwarded} rows over NVLink")
        for op, row_bytes, fn, intra_fn, reverse in ops:
            t = _time_us(fn, iters)
            t_intra = _time_us(intra_fn, iters)
            t_base = a2a(row_bytes, reverse)
            logical = _lowest(rows * row_bytes / t / 1e3)
            rail = _lowest(rail_tokens * row_bytes / t / 1e3)
            nvlink = _lowest(forwarded * row_bytes / t / 1e3)
            intra = _lowest(rows * row_bytes / t_intra / 1e3)
            base = _lowest(rows * row_bytes / t_base / 1e3)
            _log(rank, f"{name:13s} {op:13s}: {_slowest(t):8.1f} us  logical {logical:6.1f} GB/s  rail {rail:6.1f} "
                       f"GB/s  NVLink {nvlink:6.1f} GB/s | intranode kernels {intra:6.1f} GB/s "
                       f"(ratio {logical / intra:.2f}) | all_to_all_single {base:6.1f} GB/s")
            if name == "uniform" and op in ("dispatch_bf16", "combine_bf16"):
                kernel_breakdown(rank, op, fn, iters)
                if os.environ.get("DEEP_EP_RAIL_TRACE") == "1":
                    rail_trace(rank, op, fn, iters, config.num_sms // 2)
    intra_buf.destroy()
    cuda_buf.destroy()


def sweep_worker(rank: int, num_ranks: int, group: Any, seed: int, nvl_domain_size: int, iters: int) -> None:
    """Chunk sizes of the internode kernels at 24 SMs (the benchmark's workload): for each Config,
    dispatch (bf16, FP8) and combine against the intranode kernels (24 SMs, chunk 2) in the same
    run, as ratios of logical bandwidth (the issue's measure), slowest rank."""
    import deep_ep
    num_experts = _BENCH_SHAPE[3]
    num_nodes = num_ranks // nvl_domain_size
    xs, x8s, routings, cuda_buf, intra_buf = _bench_setup(rank, num_ranks, group, seed, nvl_domain_size)
    intra_config = deep_ep.Config(24, 2, 256)
    # The NVLink leg's chunks hardly matter (an earlier sweep over 2/4/8 x 256/512); the rail's
    # tail is published every min(rail chunk, ring slots / 2) slots (a 128-slot ring gives each
    # warp's ring 8), so only rail chunks below 4 differ from one another (and not in combine over
    # P2P, whose rings publish every slot).
    configs = [deep_ep.Config(24, 2, nvl_recv, rdma_send, 128)
               for nvl_recv in (256, 512) for rdma_send in (1, 2, 4, 16)]
    _log(rank, f"sweep: {num_ranks} ranks as {num_nodes} nodes x {nvl_domain_size}, {torch.cuda.get_device_name()}; "
               f"ratios to the intranode kernels ({intra_config}); median of {iters}, slowest rank")
    for name, (topk_idx, topk_weights) in routings.items():
        topk_idx, topk_weights = topk_idx.cuda(), topk_weights.float().cuda()
        layout = _layout(cuda_buf, topk_idx, num_experts)
        intra_layout = intra_buf.get_dispatch_layout(topk_idx, num_experts)
        intra_recv, _, _, _, intra_handle, _ = intra_buf.dispatch(
            xs[0], num_tokens_per_rank=intra_layout[0], is_token_in_rank=intra_layout[3],
            num_tokens_per_expert=intra_layout[2], topk_idx=topk_idx, topk_weights=topk_weights, config=intra_config)
        intra_in = [combine_input(intra_recv, rank), combine_input(intra_recv, rank + 1)]
        rows = intra_recv.shape[0]
        intra = {
            "bf16": _slowest(_time_us(lambda i: intra_buf.dispatch(xs[i % 3], handle=intra_handle,
                                                                    config=intra_config), iters)),
            "fp8": _slowest(_time_us(lambda i: intra_buf.dispatch(x8s[i % 3], handle=intra_handle,
                                                                   config=intra_config), iters)),
            "combine": _slowest(_time_us(lambda i: intra_buf.combine(intra_in[i % 2], intra_handle,
                                                                      config=intra_config), iters)),
        }
        _log(rank, f"{name}: intranode {intra['bf16']:.1f} / {intra['fp8']:.1f} / {intra['combine']:.1f} us "
                   f"(dispatch bf16 / FP8 / combine)")
        for config in configs:
            recv_x, _, _, _, handle, _ = cuda_buf.dispatch(xs[0], **layout, topk_idx=topk_idx,
                                                           topk_weights=topk_weights, config=config)
            assert recv_x.shape[0] == rows
            comb_in = [combine_input(recv_x, rank), combine_input(recv_x, rank + 1)]
            t = {
                "bf16": _slowest(_time_us(lambda i: cuda_buf.dispatch(xs[i % 3], handle=handle, config=config),
                                          iters)),
                "fp8": _slowest(_time_us(lambda i: cuda_buf.dispatch(x8s[i % 3], handle=handle, config=config),
                                         iters)),
                "combine": _slowest(_time_us(lambda i: cuda_buf.combine(comb_in[i % 2], handle, config=config),
                                             iters)),
            }
            # Same rows and bytes on both paths: the ratio of logical bandwidths is the inverse time ratio.
            _log(rank, f"  {config}: " + "  ".join(f"{op} {t[op]:7.1f} us (ratio {intra[op] / t[op]:.2f})"
                                                  for op in ("bf16", "fp8", "combine")))
    intra_buf.destroy()
    cuda_buf.destroy()


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------
_seed = gpu_utils.fresh_seed


@pytest.mark.parametrize("num_nodes,nvl_domain_size", [(2, 2), (4, 1), (2, 4), (3, 2)])
def test_row_order(num_nodes: int, nvl_domain_size: int) -> None:
    """(CPU) The permutation from the NVLink leg's block order (forwarding local rank, source node)
    to the contract's (global source rank), padding rows in place; the byte-wise scatter; and the
    kernels' row map, which must give the same permutation."""
    import types
    from deep_ep.cuda_internode import InternodeKernelsMixin, _scatter_rows
    N, L = num_nodes, nvl_domain_size
    R = N * L
    gen = torch.Generator().manual_seed(N * 10 + L)
    stub = types.SimpleNamespace(nvl_domain_size=L, num_nodes=N, num_ranks=R, device=torch.device("cpu"))
    for trial in range(20):
        counts = torch.randint(0, 5, (R,), generator=gen)
        if trial % 5 == 0:
            counts.zero_()
        total = int(counts.sum())
        rows = total + (trial % 3) * 4
        order = InternodeKernelsMixin._row_order(stub, counts.to(torch.int32), rows)
        if L == 1:
            assert order is None
            continue
        leg = [(n * L + l, i) for l in range(L) for n in range(N) for i in range(int(counts[n * L + l]))]
        out = [(n * L + l, i) for n in range(N) for l in range(L) for i in range(int(counts[n * L + l]))]
        position = {v: j for j, v in enumerate(out)}
        assert order.tolist() == [position[v] for v in leg] + list(range(total, rows))
        src = torch.randn(rows, 3).to(torch.bfloat16)
        assert torch.equal(_scatter_rows(src, order)[order], src)
        # The kernels' row map (csrc/kernels/intranode.cu map_row) gives the same permutation:
        # a leg row of forwarding rank l goes to its run j (the first of l's runs that ends past
        # it) and moves by that run's delta; rows past every run stay.
        segments = InternodeKernelsMixin._row_segments(stub, counts.to(torch.int32))
        assert segments.dtype == torch.int32 and tuple(segments.shape) == (2, L * N)
        ends, deltas = segments.tolist()
        leg_prefix = [sum(int(counts[n * L + m]) for m in range(l) for n in range(N)) for l in range(L + 1)]
        mapped = []
        for row in range(rows):
            l = next((m for m in range(L) if row < leg_prefix[m + 1]), L - 1)
            run = next((j for j in range(N) if row < ends[l * N + j]), None)
            mapped.append(row if run is None else row + deltas[l * N + run])
        assert mapped == order.tolist()


@pytest.mark.parametrize("nvl_domain_size", [2, 1])
def test_internode(nvl_domain_size: int) -> None:
    reason = gpu_utils.skip_reason(4)
    if reason is None:
        import deep_ep_cpp
        if not hasattr(deep_ep_cpp, "InternodeRuntime"):
            reason = "the extension was built without NVSHMEM (no internode kernels)"
    if reason is not None:
        pytest.skip(reason)
    gpu_utils.spawn(correctness_worker, 4, _seed(), nvl_domain_size, True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=4)
    parser.add_argument("--nvl-domain-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats")
    parser.add_argument("--bench", action="store_true", help="run the benchmark instead of the checks")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--sweep", action="store_true", help="the benchmark over the internode chunk sizes")
    args = parser.parse_args()
    if args.num_processes % args.nvl_domain_size != 0 or args.num_processes // args.nvl_domain_size < 2:
        parser.error("--nvl-domain-size must divide --num-processes into at least 2 nodes")
    seed = gpu_utils.script_seed(args.num_processes, args.seed)
    if seed is None:
        return
    start = time.time()
    if args.sweep:
        gpu_utils.spawn(sweep_worker, args.num_processes, seed, args.nvl_domain_size, args.iters)
    elif args.bench:
        gpu_utils.spawn(bench_worker, args.num_processes, seed, args.nvl_domain_size, args.iters)
    else:
        gpu_utils.spawn(correctness_worker, args.num_processes, seed, args.nvl_domain_size, args.quick)
        print(f"test_internode: all checks passed on {args.num_processes} GPUs as "
              f"{args.num_processes // args.nvl_domain_size} nodes x {args.nvl_domain_size} "
              f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
