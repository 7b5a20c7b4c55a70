"""Low-latency dispatch/combine kernels (NVSHMEM) against the torch backend and float64 references.

Needs Hopper GPUs, the ``deep_ep_cpp`` extension built with NVSHMEM; pytest skips (with the
reason) elsewhere. Runnable as a script::

    python tests/test_low_latency.py --num-processes 4          # correctness
    python tests/test_low_latency.py --num-processes 4 --bench  # correctness, then the benchmark
    python tests/test_low_latency.py --num-processes 4 --no-shrink  # the same checks without shrink mode
    python tests/test_low_latency.py --num-processes 4 --no-nvlink  # every peer through NVSHMEM puts

Checks, per configuration and mode (FP8, FP8 round_scale, FP8 ue8m0, bf16): every valid row's
bytes and scales bit-exact with the contract's cast of its source token (``exact_cast``; the
torch backend's own cast is reported when it differs: on CUDA, torch divides by a Python float
by multiplying with the reciprocal), the same (expert, source token) sets and counts as the
torch backend, the packed layout (contiguous source blocks, layout ranges); both combine modes
(reduced, rows) within bf16 tolerance of a float64 reference and close to the torch backend;
then hook mode, async_finish, zero_copy, ``out=``, the stats tensors, CUDA-graph replay, 100
repeated runs with identical results, and shrink mode (one rank skips a call; the others mask
it after the timeout). Without shrink mode the dispatch receive takes another path (scan-free:
rows placed from the senders' counts and positions), so ``--no-shrink`` (and the pytest variant
``no_shrink``) run every check but the shrink one on such a buffer. ``--no-nvlink``
(``allow_nvlink_for_low_latency_mode=False``; the pytest variant ``nvshmem_puts``) sends to every
peer with NVSHMEM's device puts and signals, the path that peers across hosts take.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
for _path in (_TESTS_DIR, _REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import gpu_utils  # noqa: E402

# (num_max_dispatch_tokens_per_rank, hidden, num_experts per rank, num_topk)
CONFIGS = [
    (128, 7168, 64, 8),     # the decode workload (256 experts on 4 ranks)
    (96, 1152, 3, 6),       # hidden not a multiple of 512, few experts
    (512, 8192, 16, 16),    # the limits: top-16, hidden 8192
]
MAX_TOKENS_LIMIT_CONFIG = (1024, 2048, 8, 4)  # up to 1024 tokens per rank
COMBINE_MODES = ("reduced", "rows")


def _set_combine_mode(buffer, mode: str) -> None:
    setter = getattr(buffer._backend, "low_latency_set_combine_mode", None)
    if setter is not None:
        setter(mode)


def _skip_reason(num_processes: int) -> Optional[str]:
    """gpu_utils.skip_reason, and the extension must have the NVSHMEM kernels."""
    reason = gpu_utils.skip_reason(num_processes)
    if reason is not None:
        return reason
    try:
        from deep_ep.cuda_ll import low_latency_kernels_available
    except ImportError as error:
        return f"deep_ep does not import: {error}"
    if not low_latency_kernels_available():
        return "deep_ep_cpp is absent or was built without NVSHMEM"
    return None


# ----------------------------------------------------------------------------------------------
# Buffers
# ----------------------------------------------------------------------------------------------
# The benchmark of issue 4: 128 tokens x 7168 hidden, top-8 of 256 experts (in all) per rank.
BENCH_CONFIG = (128, 7168, 256, 8)


def _rdma_bytes(configs, num_ranks: int) -> int:
    from deep_ep import Buffer
    from deep_ep.cuda_ll import low_latency_required_bytes

    need = 0
    for m, h, per_rank, _ in configs:
        e = per_rank * num_ranks
        hint = Buffer.get_low_latency_rdma_size_hint(m, h, num_ranks, e)
        kernel_need = low_latency_required_bytes(m, h, num_ranks, e)
        # The Python hint mirrors the kernels' layout: users size their buffers with it.
        assert hint == kernel_need, f"size hint {hint} != kernel layout {kernel_need} for {(m, h, num_ranks, e)}"
        need = max(need, hint)
    return need


def make_kernel_buffer(group, num_rdma_bytes: int, enable_shrink: bool = True, allow_nvlink: bool = True):
    """A Buffer whose low-latency calls run on the kernels: the cuda backend when it carries
    LowLatencyKernelsMixin, else a torch Buffer whose backend is swapped for the mixin on top
    of the torch backend (so these tests do not depend on the rest of the cuda backend)."""
    from deep_ep import Buffer
    from deep_ep.cuda_ll import LowLatencyKernelsMixin
    from deep_ep.torch_backend import TorchBackend

    if os.environ.get("DEEP_EP_LL_TEST_STANDALONE", "0") != "1":
        try:
            buffer = Buffer(group, 0, num_rdma_bytes, low_latency_mode=True, allow_nvlink_for_low_latency_mode=allow_nvlink,
                            explicitly_destroy=True, enable_shrink=enable_shrink, backend="cuda")
            if isinstance(buffer._backend, LowLatencyKernelsMixin) and buffer._backend.uses_low_latency_kernels:
                return buffer
            buffer.destroy()
        except Exception as error:  # noqa: BLE001 - fall back to the standalone wiring, say why
            print(f"[rank {dist.get_rank()}] cuda backend unusable for the low-latency test ({error}); "
                  "using LowLatencyKernelsMixin over TorchBackend", flush=True)

    class KernelBackend(LowLatencyKernelsMixin, TorchBackend):
        pass

    buffer = Buffer(group, 0, num_rdma_bytes, low_latency_mode=True, allow_nvlink_for_low_latency_mode=allow_nvlink,
                    explicitly_destroy=True, enable_shrink=enable_shrink, backend="torch")
    buffer._backend = KernelBackend(group, 0, num_rdma_bytes, True, buffer.nvl_domain_size, 24, allow_nvlink, False,
                                    True, enable_shrink)
    assert buffer._backend.uses_low_latency_kernels
    return buffer


# ----------------------------------------------------------------------------------------------
# Inputs and references
# ----------------------------------------------------------------------------------------------
def make_inputs(rank: int, num_tokens: int, hidden: int, num_experts: int, num_topk: int, seed: int,
                drop_fraction: float = 0.1):
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed * 7919 + rank)
    x = (torch.randn(num_tokens, hidden, generator=gen) * (1 + torch.rand(num_tokens, 1, generator=gen) * 4))
    # Some tokens entirely small (amax clamp), some channels large.
    if num_tokens > 2:
        x[1] *= 1e-7
    x = x.to(torch.bfloat16)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    topk_idx = scores.topk(num_topk, dim=1).indices.to(torch.int64)
    drop = torch.rand(num_tokens, num_topk, generator=gen) < drop_fraction
    topk_idx = topk_idx.masked_fill(drop, -1)
    weights = torch.rand(num_tokens, num_topk, generator=gen).float() + 0.1
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return x.to(dev), topk_idx.to(dev), weights.to(dev)


def expert_factor(num_experts: int, device) -> torch.Tensor:
    return 1.0 + torch.arange(num_experts, device=device, dtype=torch.float32) / num_experts


def simulate_experts(recv_x, recv_count: torch.Tensor, rank: int, num_experts: int) -> torch.Tensor:
    """Fake expert outputs: the dequantized row times a per-expert factor, bf16; rows past the
    count are zero."""
    from deep_ep.utils import per_token_cast_back

    if isinstance(recv_x, tuple):
        data, scales = recv_x
        num_local, slots, hidden = data.shape
        values = per_token_cast_back(data.view(-1, hidden), scales.view(num_local * slots, -1)).view(num_local, slots, hidden)
    else:
        values = recv_x
        num_local, slots, hidden = values.shape
    factor = expert_factor(num_experts, values.device)[rank * num_local:(rank + 1) * num_local]
    y = (values.float() * factor.view(-1, 1, 1)).to(torch.bfloat16)
    valid = torch.arange(slots, device=y.device).view(1, -1) < recv_count.view(-1, 1)
    return y * valid.unsqueeze(-1)


def combine_reference(x: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor, num_experts: int, use_fp8: bool,
                      round_scale: bool, dead_ranks: Tuple[int, ...] = (), num_ranks: int = 1) -> torch.Tensor:
    """float64 expected combine for this rank's tokens (each expert output computed locally)."""
    from deep_ep.utils import per_token_cast_back

    if use_fp8:
        data, scales = exact_cast(x, round_scale=round_scale)
        values = per_token_cast_back(data, scales).float()
    else:
        values = x.float()
    factor = expert_factor(num_experts, x.device)
    num_local = num_experts // num_ranks
    ref = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for k in range(topk_idx.shape[1]):
        e = topk_idx[:, k]
        valid = e >= 0
        for dead in dead_ranks:
            valid &= (e // num_local) != dead
        y = (values * factor[e.clamp(min=0)].unsqueeze(1)).to(torch.bfloat16).double()
        ref += torch.where(valid.unsqueeze(1), y * weights[:, k].double().unsqueeze(1), torch.zeros_like(y))
    return ref


def check_close(name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    got64 = got.double()
    assert torch.isfinite(got64).all(), f"{name}: non-finite values"
    scale = ref.abs().max().item() + 1e-6
    err = (got64 - ref).abs()
    bound = ref.abs() * 2 ** -7 + scale * 2 ** -9
    worst = (err - bound).max().item()
    assert worst <= 0, f"{name}: max error {err.max().item():.3e} exceeds the bf16 bound (scale {scale:.3e})"


def exact_cast(x: torch.Tensor, round_scale: bool = False, use_ue8m0: bool = False):
    """The FP8 rule of the contract, with a true fp32 division for ``amax / 448`` on any device
    (on CUDA, torch's ``tensor / python_float`` multiplies by the reciprocal instead, which
    differs in the last bit of about half the scales)."""
    from deep_ep.utils import _pack_ue8m0

    num_tokens, hidden = x.shape
    grouped = x.float().view(num_tokens, hidden // 128, 128)
    amax = grouped.abs().amax(dim=-1).clamp(min=1e-4)
    scale = amax / torch.full_like(amax, 448.0)
    if round_scale or use_ue8m0:
        bits = scale.view(torch.int32)
        exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
        scale = (exponent << 23).view(torch.float32)
    data = (grouped / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).view(num_tokens, hidden)
    return data, (_pack_ue8m0(scale) if use_ue8m0 else scale)


class SourceRows:
    """Every rank's tokens in the form they must arrive (FP8 per the contract, or bf16)."""

    def __init__(self, inputs_of_all_ranks, use_fp8: bool, round_scale: bool, use_ue8m0: bool) -> None:
        data, scales, offsets = [], [], [0]
        for x in inputs_of_all_ranks:
            if use_fp8:
                d, sc = exact_cast(x, round_scale, use_ue8m0)
                data.append(d.view(torch.uint8))
                scales.append(sc.contiguous().view(torch.int32))
            else:
                data.append(x.view(torch.uint8))
            offsets.append(offsets[-1] + x.shape[0])
        self.data = torch.cat(data)
        self.scales = torch.cat(scales) if use_fp8 else None
        self.offsets = torch.tensor(offsets[:-1], device=self.data.device)

    def rows(self, src_rank: torch.Tensor, src_token: torch.Tensor):
        index = self.offsets[src_rank.long()] + src_token.long()
        return self.data[index], (self.scales[index] if self.scales is not None else None)


def _as_bytes(recv_x, e: int, n: int):
    if isinstance(recv_x, tuple):
        return recv_x[0][e, :n].view(torch.uint8), recv_x[1][e, :n].contiguous().view(torch.int32)
    return recv_x[e, :n].view(torch.uint8), None


def check_rows_against_sources(tag: str, recv_x, count, handle, sources: SourceRows) -> Optional[str]:
    """Every valid row equals its source token's expected bytes. Returns a message or None."""
    src_info, src_rank = handle.src_info, handle.src_rank
    for e in range(count.numel()):
        n = int(count[e])
        if n == 0:
            continue
        data, scales = _as_bytes(recv_x, e, n)
        want_data, want_scales = sources.rows(src_rank[e, :n], src_info[e, :n])
        bad_rows = (data != want_data).any(dim=1)
        if scales is not None:
            bad_rows |= (scales != want_scales).any(dim=1)
        if bool(bad_rows.any()):
            r = int(bad_rows.nonzero()[0])
            diff = int((data[r] != want_data[r]).sum())
            sdiff = int((scales[r] != want_scales[r]).sum()) if scales is not None else 0
            return (f"{tag}: expert {e}: {int(bad_rows.sum())}/{n} rows differ; first row {r} (from rank "
                    f"{int(src_rank[e, r])} token {int(src_info[e, r])}): {diff} data bytes, {sdiff} scales differ; "
                    f"got {data[r, :8].tolist()} want {want_data[r, :8].tolist()}"
                    + (f" scales got {scales[r, :4].tolist()} want {want_scales[r, :4].tolist()}" if sdiff else ""))
    return None


def check_dispatch(tag: str, got, got_count, got_handle, want, want_count, want_handle, sources: SourceRows,
                   rank: int) -> None:
    """Kernel dispatch vs the contract (bytes) and the torch backend (which rows, counts)."""
    assert torch.equal(got_count.cpu(), want_count.cpu()), f"{tag}: recv_count {got_count.tolist()} != {want_count.tolist()}"
    problem = check_rows_against_sources(tag, got, got_count, got_handle, sources)
    assert problem is None, problem
    torch_problem = check_rows_against_sources(tag + " (torch backend)", want, want_count, want_handle, sources)
    if torch_problem is not None:
        log(rank, f"  note: the torch backend's rows are not the contract's bytes here: {torch_problem}")
    num_max = got_handle.num_max_dispatch_tokens_per_rank
    if not hasattr(got_handle, "layout_range"):
        return
    layout = got_handle.layout_range.cpu()
    num_local, num_ranks = layout.shape
    for e in range(num_local):
        n = int(got_count[e])
        if n == 0:
            continue
        got_keys = got_handle.src_rank[e, :n].long() * num_max + got_handle.src_info[e, :n].long()
        want_keys = want_handle.src_rank[e, :n].long() * num_max + want_handle.src_info[e, :n].long()
        assert torch.equal(torch.sort(got_keys).values, torch.sort(want_keys).values), \
            f"{tag}: expert {e} received other tokens than the torch backend"
        # Rows of one source rank are contiguous and match layout_range.
        ranks = got_handle.src_rank[e, :n].cpu()
        for s in range(num_ranks):
            begin, cnt = int(layout[e, s]) >> 32, int(layout[e, s]) & 0xFFFFFFFF
            assert int((ranks == s).sum()) == cnt, f"{tag}: expert {e}: layout_range count for rank {s}"
            if cnt:
                assert bool((ranks[begin:begin + cnt] == s).all()), f"{tag}: expert {e}: block of rank {s} not contiguous"


# ----------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------
def _check_errors(buffer) -> None:
    check = getattr(buffer._backend, "low_latency_check_errors", None)
    if check is not None:
        check()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def log(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def run_config(buffer, ref, rank: int, num_ranks: int, cfg, seed: int) -> None:
    num_max, hidden, per_rank, num_topk = cfg
    num_experts = per_rank * num_ranks
    num_tokens = num_max if rank == 0 else max(1, num_max - 7 * rank)
    x, topk_idx, weights = make_inputs(rank, num_tokens, hidden, num_experts, num_topk, seed)
    all_x = [make_inputs(r, num_max if r == 0 else max(1, num_max - 7 * r), hidden, num_experts, num_topk, seed)[0]
             for r in range(num_ranks)]
    modes = [("fp8", True, False, False), ("fp8-round", True, True, False), ("bf16", False, False, False)]
    if hidden % 512 == 0:
        modes.append(("fp8-ue8m0", True, True, True))
    for name, use_fp8, round_scale, use_ue8m0 in modes:
        tag = f"cfg={cfg} {name}"
        got = buffer.low_latency_dispatch(x, topk_idx, num_max, num_experts, use_fp8=use_fp8, round_scale=round_scale,
                                          use_ue8m0=use_ue8m0)
        want = ref.low_latency_dispatch(x, topk_idx, num_max, num_experts, use_fp8=use_fp8, round_scale=round_scale,
                                        use_ue8m0=use_ue8m0)
        torch.cuda.synchronize()
        _check_errors(buffer)
        sources = SourceRows(all_x, use_fp8, round_scale, use_ue8m0)
        check_dispatch(tag, got[0], got[1], got[2], want[0], want[1], want[2], sources, rank)
        y_got = simulate_experts(got[0], got[1], rank, num_experts)
        y_want = simulate_experts(want[0], want[1], rank, num_experts)
        out_want = ref.low_latency_combine(y_want, topk_idx, weights, want[2])[0]
        expected = combine_reference(x, topk_idx, weights, num_experts, use_fp8, round_scale, num_ranks=num_ranks)
        for combine_mode in COMBINE_MODES:
            _set_combine_mode(buffer, combine_mode)
            out_got = buffer.low_latency_combine(y_got, topk_idx, weights, got[2])[0]
            _sync()
            _check_errors(buffer)
            check_close(f"{tag} {combine_mode} combine vs float64", out_got, expected)
            # The torch backend may quantize differently in the last bit (see exact_cast): close only.
            from deep_ep.utils import calc_diff
            diff = calc_diff(out_got, out_want)
            assert diff < 1e-4, f"{tag}: kernel ({combine_mode}) and torch combine differ (calc_diff {diff:.2e})"
            # The next combine with the same handle writes into the slots this one read.
            dist.barrier()
        _set_combine_mode(buffer, COMBINE_MODES[0])
        log(rank, f"  ok  {tag} (combine: {', '.join(COMBINE_MODES)})")


def run_options(buffer, rank: int, num_ranks: int, seed: int) -> None:
    """Hook mode, async_finish, zero_copy, out=, stats, graphs, repeats on the decode config."""
    from deep_ep.utils import hash_tensor

    num_max, hidden, per_rank, num_topk = CONFIGS[0]
    num_experts = per_rank * num_ranks
    num_local = num_experts // num_ranks
    x, topk_idx, weights = make_inputs(rank, num_max, hidden, num_experts, num_topk, seed + 1)
    expected = combine_reference(x, topk_idx, weights, num_experts, True, False, num_ranks=num_ranks)

    base = buffer.low_latency_dispatch(x, topk_idx, num_max, num_experts)
    base_y = simulate_experts(base[0], base[1], rank, num_experts)
    base_out = buffer.low_latency_combine(base_y, topk_idx, weights, base[2])[0]
    torch.cuda.synchronize()
    check_close("eager combine", base_out, expected)

    def same_dispatch(tag, result):
        assert torch.equal(result[1], base[1]), f"{tag}: recv_count differs"
        for e in range(num_local):
            n = int(base[1][e])
            assert torch.equal(result[0][0][e, :n].view(torch.uint8), base[0][0][e, :n].view(torch.uint8)), f"{tag}: data"
            assert torch.equal(result[0][1][e, :n], base[0][1][e, :n]), f"{tag}: scales"
            assert torch.equal(result[2].packed_src_info[e, :n], base[2].packed_src_info[e, :n]), f"{tag}: src_info"

    # Hook mode: the call only sends; hook() receives.
    recv_x, count, handle, event, hook = buffer.low_latency_dispatch(x, topk_idx, num_max, num_experts,
                                                                     return_recv_hook=True)
    assert hook is not None
    hook()
    torch.cuda.synchronize()
    same_dispatch("hook dispatch", (recv_x, count, handle))
    y = simulate_experts(recv_x, count, rank, num_experts)
    out, _, hook = buffer.low_latency_combine(y, topk_idx, weights, handle, return_recv_hook=True)
    hook()
    torch.cuda.synchronize()
    check_close("hook combine", out, expected)
    log(rank, "  ok  hook mode")

    # async_finish
    recv_x, count, handle, event, _ = buffer.low_latency_dispatch(x, topk_idx, num_max, num_experts, async_finish=True)
    event.current_stream_wait()
    same_dispatch("async dispatch", (recv_x, count, handle))
    y = simulate_experts(recv_x, count, rank, num_experts)
    out, event, _ = buffer.low_latency_combine(y, topk_idx, weights, handle, async_finish=True)
    event.current_stream_wait()
    torch.cuda.synchronize()
    assert torch.equal(out, base_out), "async combine differs"
    log(rank, "  ok  async_finish")

    # zero_copy and out=
    recv_x, count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, num_max, num_experts)
    y = simulate_experts(recv_x, count, rank, num_experts)
    buffer.get_next_low_latency_combine_buffer(handle).copy_(y)
    out = torch.full_like(base_out, float("nan"))
    result, _, _ = buffer.low_latency_combine(buffer.get_next_low_latency_combine_buffer(handle), topk_idx, weights,
                                              handle, zero_copy=True, out=out)
    torch.cuda.synchronize()
    assert result.data_ptr() == out.data_ptr(), "out= was not used"
    assert torch.equal(out, base_out), "zero_copy combine differs"
    log(rank, "  ok  zero_copy, out=")

    # Stats tensors
    cumulative = torch.zeros(num_local, dtype=torch.int32, device=x.device)
    dispatch_wait = torch.zeros(num_ranks, dtype=torch.int64, device=x.device)
    combine_wait = torch.zeros(num_ranks, dtype=torch.int64, device=x.device)
    for _ in range(2):
        recv_x, count, handle, _, _ = buffer.low_latency_dispatch(
            x, topk_idx, num_max, num_experts, cumulative_local_expert_recv_stats=cumulative,
            dispatch_wait_recv_cost_stats=dispatch_wait)
        y = simulate_experts(recv_x, count, rank, num_experts)
        buffer.low_latency_combine(y, topk_idx, weights, handle, combine_wait_recv_cost_stats=combine_wait)
    # The same with a receive hook (its receive-only launch measures the waits itself).
    hooked = buffer.low_latency_dispatch(x, topk_idx, num_max, num_experts,
                                         cumulative_local_expert_recv_stats=cumulative,
                                         dispatch_wait_recv_cost_stats=dispatch_wait, return_recv_hook=True)
    hooked[4]()
    torch.cuda.synchronize()
    same_dispatch("hook with stats", hooked)
    assert torch.equal(cumulative, 3 * base[1]), "cumulative_local_expert_recv_stats"
    assert bool((dispatch_wait >= 0).all()) and bool((combine_wait >= 0).all()), "wait stats negative"
    log(rank, f"  ok  stats (dispatch wait ns {dispatch_wait.tolist()})")

    # CUDA graph: dispatch + experts + combine, replayed with new inputs.
    static_x, static_idx, static_w = x.clone(), topk_idx.clone(), weights.clone()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            g_recv, g_count, g_handle, _, _ = buffer.low_latency_dispatch(static_x, static_idx, num_max, num_experts)
            g_y = simulate_experts(g_recv, g_count, rank, num_experts)
            g_out = buffer.low_latency_combine(g_y, static_idx, static_w, g_handle)[0]
    torch.cuda.current_stream().wait_stream(stream)
    for replay in range(3):
        nx, nidx, nw = make_inputs(rank, num_max, hidden, num_experts, num_topk, seed + 100 + replay)
        static_x.copy_(nx)
        static_idx.copy_(nidx)
        static_w.copy_(nw)
        graph.replay()
        torch.cuda.synchronize()
        _check_errors(buffer)
        check_close(f"graph replay {replay}", g_out, combine_reference(nx, nidx, nw, num_experts, True, False,
                                                                       num_ranks=num_ranks))
    # Eager calls still agree after the replays (the device-side call counters advanced).
    after = buffer.low_latency_dispatch(x, topk_idx, num_max, num_experts)
    torch.cuda.synchronize()
    same_dispatch("eager after graph", after)
    buffer.low_latency_combine(simulate_experts(after[0], after[1], rank, num_experts), topk_idx, weights, after[2])
    log(rank, "  ok  CUDA graph replay")

    # 100 repeated runs, identical results.
    want = (hash_tensor(base[0][0]), hash_tensor(base_out))
    for i in range(100):
        recv_x, count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, num_max, num_experts)
        y = simulate_experts(recv_x, count, rank, num_experts)
        out = buffer.low_latency_combine(y, topk_idx, weights, handle)[0]
        if i % 10 == 9 or i == 0:
            valid_rows = torch.cat([recv_x[0][e, :int(count[e])].view(torch.uint8).reshape(-1) for e in range(num_local)])
            base_rows = torch.cat([base[0][0][e, :int(base[1][e])].view(torch.uint8).reshape(-1) for e in range(num_local)])
            assert torch.equal(valid_rows, base_rows), f"repeat {i}: dispatch differs"
            assert hash_tensor(out) == want[1], f"repeat {i}: combine differs"
    torch.cuda.synchronize()
    log(rank, "  ok  100 repeated runs identical")


# The fault checks' shape (tokens, hidden, experts per rank, top-k) and their kernel timeout.
_FAULT_CASE = (64, 1024, 4, 4)
_FAULT_TIMEOUT_S = 2.0


def _fault_case(buffer, rank: int, num_ranks: int, seed: int):
    """Inputs of a fault check on a clean buffer with the short timeout: (num_max, hidden,
    num_experts, victim rank, x, topk_idx, weights); the victim is the last rank."""
    num_max, hidden, per_rank, num_topk = _FAULT_CASE
    num_experts = per_rank * num_ranks
    x, topk_idx, weights = make_inputs(rank, num_max, hidden, num_experts, num_topk, seed)
    buffer.clean_low_latency_buffer(num_max, hidden, num_experts)
    buffer._backend.low_latency_set_timeout(_FAULT_TIMEOUT_S)
    return num_max, hidden, num_experts, num_ranks - 1, x, topk_idx, weights


def run_shrink(buffer, rank: int, num_ranks: int, seed: int) -> None:
    """One rank skips a call; the others mask it after the timeout and complete."""
    num_max, hidden, num_experts, victim, x, topk_idx, weights = _fault_case(buffer, rank, num_ranks, seed + 7)
    if rank != victim:
        start = time.time()
        recv_x, count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, num_max, num_experts)
        y = simulate_experts(recv_x, count, rank, num_experts)
        out = buffer.low_latency_combine(y, topk_idx, weights, handle)[0]
        torch.cuda.synchronize()
        _check_errors(buffer)
        mask = torch.zeros(num_ranks, dtype=torch.int32, device=x.device)
        buffer.low_latency_query_mask_buffer(mask)
        torch.cuda.synchronize()
        assert mask.tolist() == [1 if r == victim else 0 for r in range(num_ranks)], f"mask {mask.tolist()}"
        expected = combine_reference(x, topk_idx, weights, num_experts, True, False, dead_ranks=(victim,),
                                     num_ranks=num_ranks)
        check_close("shrink combine", out, expected)
        log(rank, f"  ok  shrink: rank {victim} masked after {time.time() - start:.1f} s; combine excludes it")
    dist.barrier()
    torch.cuda.synchronize()
    buffer._backend.low_latency_set_timeout(float(os.environ.get("DEEP_EP_TIMEOUT_S", "100")))
    buffer.low_latency_clean_mask_buffer()
    buffer.clean_low_latency_buffer(num_max, hidden, num_experts)
    torch.cuda.synchronize()
    # Everyone back in step: a normal call works again.
    recv_x, count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, num_max, num_experts)
    out = buffer.low_latency_combine(simulate_experts(recv_x, count, rank, num_experts), topk_idx, weights, handle)[0]
    torch.cuda.synchronize()
    check_close("after shrink", out, combine_reference(x, topk_idx, weights, num_experts, True, False,
                                                       num_ranks=num_ranks))
    log(rank, "  ok  calls work again after clean_mask + clean")


def run_timeout(buffer, rank: int, num_ranks: int, seed: int) -> None:
    """Without shrink mode, one rank skips a dispatch: the others' waits end after the timeout with
    DeepEPTimeoutError naming the rank they waited for (the buffer is then unusable: run last)."""
    from deep_ep import DeepEPTimeoutError

    num_max, _, num_experts, victim, x, topk_idx, _ = _fault_case(buffer, rank, num_ranks, seed + 9)
    if rank != victim:
        start = time.time()
        buffer.low_latency_dispatch(x, topk_idx, num_max, num_experts)
        torch.cuda.synchronize()
        try:
            _check_errors(buffer)
        except DeepEPTimeoutError as error:
            assert f"waiting for rank {victim}" in str(error), f"timeout names the wrong rank: {error}"
            log(rank, f"  ok  timeout without shrink mode after {time.time() - start:.1f} s: {error}")
        else:
            raise AssertionError("a dispatch whose peer skipped the call did not time out")
    dist.barrier()


def run_barrier_timeout(buffer, rank: int, num_ranks: int) -> None:
    """One rank skips the runtime's rank barrier (the benchmark's start alignment): the others'
    barrier ends after the timeout with DeepEPTimeoutError naming the barrier and the rank it waited
    for (the error record stays set: run last)."""
    from deep_ep import DeepEPTimeoutError

    runtime = buffer._backend._ll
    victim = num_ranks - 1
    buffer._backend.low_latency_set_timeout(_FAULT_TIMEOUT_S)
    runtime.barrier()  # every rank: the barrier works when all take part
    torch.cuda.synchronize()
    _check_errors(buffer)
    dist.barrier()
    if rank != victim:
        start = time.time()
        runtime.barrier()
        torch.cuda.synchronize()
        try:
            _check_errors(buffer)
        except DeepEPTimeoutError as error:
            message = str(error)
            assert "rank barrier" in message and f"waiting for rank {victim}" in message, f"wrong timeout: {message}"
            log(rank, f"  ok  rank barrier timeout after {time.time() - start:.1f} s: {message}")
        else:
            raise AssertionError("a rank barrier that one rank skipped did not time out")
    dist.barrier()


# ----------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------
def _median_max(values_us: List[float]) -> float:
    """Median over iterations on this rank, then the slowest rank."""
    return gpu_utils.max_over_ranks(statistics.median(values_us))


def _time_calls(fn, iterations: int, warmup: int = 10) -> float:
    return _median_max(gpu_utils.cuda_event_times_us(lambda _: fn(), iterations, warmup))


_ALIGN_SLEEP_CYCLES = 1_000_000  # about 0.5 ms at Hopper clocks


def _kernel_durations(fn, iterations: int, keys: Optional[List[str]] = None,
                      align: Optional[Callable[[], None]] = None) -> Dict[str, List[float]]:
    """Device durations (us) of our kernels over ``iterations`` calls of ``fn``, in launch order.

    ``keys`` (default: the low-latency dispatch and combine kernels) are substrings of kernel
    names; each kernel counts under the first key its name contains (``""`` catches the rest).
    ``align``, if given, is a device-side barrier of all ranks enqueued right before each call
    (after the GPU-side sleep): without it the kernels start as the NCCL all-reduce leaves the
    ranks, microseconds apart (its last step reaches the ranks at different times), and the
    earliest rank's kernel time includes the wait for the latest one's data.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    # A small all-reduce lines the ranks up on the GPU, and a GPU-side sleep after it gives every
    # host the time to enqueue the call before its GPU gets there: the kernels then start
    # together, and their times are their own rather than the launch skew between ranks (which
    # host overhead alone makes tens of microseconds).
    token = torch.zeros(1, device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            dist.all_reduce(token)
            torch.cuda._sleep(_ALIGN_SLEEP_CYCLES)
            if align is not None:
                align()
            fn()
        torch.cuda.synchronize()
    found: Dict[str, List[Tuple[float, float]]] = {k: [] for k in (keys or ["dispatch_kernel", "combine_kernel"])}
    for ev in prof.events():
        for key in found:
            # The catch-all takes device events only (not the host's launch calls).
            if key == "" and "CUDA" not in str(getattr(ev, "device_type", "CUDA")):
                continue
            if key in ev.name:
                try:
                    found[key].append((ev.time_range.start, ev.time_range.elapsed_us()))
                except AttributeError:
                    found[key].append((0.0, float(getattr(ev, "device_time_total", 0.0))))
                break
    return {k: [d for _, d in sorted(v)] for k, v in found.items()}


_TRACE_POINTS = {
    "dispatch": ["ids in smem", "send tasks done", "counts published", "send signalled", "counts/sources in",
                 "recv offsets ready", "rows placed", "end", "header read (sum)", "row loaded (sum)", "send fenced",
                 "send-only end", "bulk: staged (sum)", "bulk: issued (sum)", "bulk: x in, w0 (sum)",
                 "bulk: header (sum)", "bulk: header start", "bulk: positions"],
    "combine": ["weights sent", "send tasks done", "", "send signalled", "sources arrived", "", "rows reduced", "end",
                "", "", "send fenced", "send-only end", "", "", "", "", "", ""],
}


def _print_phase_trace(title: str, fn, rank: int, iterations: int, align: Optional[Callable[[], None]] = None) -> None:
    """DEEP_EP_LL_TRACE=1: where the kernels' time goes (kernels/phase_trace.cuh). For each marked
    point, the time from a block's start, averaged over the calls: median and max over blocks."""
    import deep_ep_cpp

    deep_ep_cpp.ll_trace_reset(True)
    _kernel_durations(fn, iterations, align=align)
    torch.cuda.synchronize()
    cycles, calls, clock_khz = deep_ep_cpp.ll_trace_read()
    deep_ep_cpp.ll_trace_reset(False)
    num_points = len(_TRACE_POINTS["dispatch"])
    table = torch.tensor(cycles, dtype=torch.float64).view(2, -1, num_points)
    lines = [f"[rank {rank}] phase trace, {title} (us from block start; median / max over blocks; SM clock "
             f"{clock_khz / 1e3:.0f} MHz)"]
    for kind, (name, labels) in enumerate(_TRACE_POINTS.items()):
        if calls[kind] == 0:
            continue
        us = table[kind] / calls[kind] / clock_khz * 1e3
        for point, label in enumerate(labels):
            col = us[:, point]
            if label and float(col.max()) > 0:
                # Median over the blocks that reached the point (some have no receive task).
                lines.append(f"  {name:8s} {point:2d} {label:20s} {float(col[col > 0].median()):8.2f} {float(col.max()):8.2f}"
                             f"  (max at block {int(col.argmax())})")
    print("\n".join(lines), flush=True)


def run_bench(buffer, ref, rank: int, num_ranks: int, seed: int, iterations: int) -> Dict[str, float]:
    num_max, hidden, num_experts, num_topk = BENCH_CONFIG
    num_local = num_experts // num_ranks
    x, topk_idx, weights = make_inputs(rank, num_max, hidden, num_experts, num_topk, seed + 11, drop_fraction=0.0)
    results: Dict[str, float] = {}
    state = {}

    def dispatch():
        state["d"] = buffer.low_latency_dispatch(x, topk_idx, num_max, num_experts)

    dispatch()
    torch.cuda.synchronize()
    recv_x, count, handle = state["d"][:3]
    y = simulate_experts(recv_x, count, rank, num_experts)
    # The benchmark's buffer has no shrink mode, where the kernels may split one expert's receive
    # over several blocks (the checks above run with shrink mode): check what is timed, once.
    all_x = [make_inputs(r, num_max, hidden, num_experts, num_topk, seed + 11, drop_fraction=0.0)[0]
             for r in range(num_ranks)]
    want = ref.low_latency_dispatch(x, topk_idx, num_max, num_experts)
    torch.cuda.synchronize()
    _check_errors(buffer)
    check_dispatch("bench", recv_x, count, handle, want[0], want[1], want[2], SourceRows(all_x, True, False, False),
                   rank)
    expected = combine_reference(x, topk_idx, weights, num_experts, True, False, num_ranks=num_ranks)
    for combine_mode in COMBINE_MODES:
        _set_combine_mode(buffer, combine_mode)
        out = buffer.low_latency_combine(y, topk_idx, weights, handle)[0]
        _sync()
        _check_errors(buffer)
        check_close(f"bench {combine_mode} combine", out, expected)
        dist.barrier()  # the next combine with the same handle writes into the slots this one read
    log(rank, "  ok  benchmark configuration checked (no shrink mode)")
    recv_rows = int(count.sum())
    fp8_row = hidden + hidden // 128 * 4

    def both():
        r = buffer.low_latency_dispatch(x, topk_idx, num_max, num_experts)
        buffer.low_latency_combine(y, topk_idx, weights, r[2])

    # Kernel device times (profiler), dispatch and combine back to back as in a decode step, the
    # ranks' starts lined up by a device-side barrier (the runtime's rank barrier). The same
    # with the starts as the NCCL all-reduce leaves them (the method of earlier sessions) is
    # printed too: the difference is the ranks' start skew, which the earliest rank waits out.
    runtime = getattr(buffer._backend, "_ll", None)
    device_barrier = runtime.barrier if runtime is not None else None
    for combine_mode in reversed(COMBINE_MODES):
        _set_combine_mode(buffer, combine_mode)
        durations = _kernel_durations(both, iterations, align=device_barrier)
        results["kernel_dispatch_us"] = _median_max(durations["dispatch_kernel"] or [0.0])
        results[f"kernel_combine_{combine_mode}_us"] = _median_max(durations["combine_kernel"] or [0.0])
    results["kernel_combine_us"] = results[f"kernel_combine_{COMBINE_MODES[0]}_us"]
    _set_combine_mode(buffer, COMBINE_MODES[0])
    durations = _kernel_durations(both, iterations)
    results["kernel_dispatch_nccl_aligned_us"] = _median_max(durations["dispatch_kernel"] or [0.0])
    results["kernel_combine_nccl_aligned_us"] = _median_max(durations["combine_kernel"] or [0.0])

    # Per call as seen by a stream (includes host launch overhead when the GPU waits for it).
    results["call_dispatch_us"] = _time_calls(dispatch, iterations)
    results["call_combine_us"] = _time_calls(lambda: buffer.low_latency_combine(y, topk_idx, weights, handle), iterations)
    results["call_dispatch_combine_us"] = _time_calls(both, iterations)
    # Host time per call: what the Python API, the backend and the runtime spend before the
    # launch returns (the GPU never blocks the host here: launches are queued).
    results["host_dispatch_us"] = gpu_utils.host_time_us(dispatch)
    results["host_combine_us"] = gpu_utils.host_time_us(lambda: buffer.low_latency_combine(y, topk_idx, weights, handle))
    if os.environ.get("DEEP_EP_LL_HOST_PROFILE", "0") == "1":
        gpu_utils.print_host_profile(both, rank, "dispatch + combine")  # every rank calls (the kernels wait for each other)
        # The pieces of a dispatch call's host time, each timed alone (launch-only pieces run the
        # kernels too: every rank makes the same calls).
        backend = buffer._backend
        pieces = {"whole call": dispatch,
                  "backend call (no Buffer checks)": lambda: backend.low_latency_dispatch(
                      x, topk_idx, num_max, num_experts, None, None, True, False, False, False, False),
                  "torch.empty of recv_x": lambda: torch.empty((num_local, num_ranks * num_max, hidden),
                                                               dtype=torch.float8_e4m3fn, device="cuda"),
                  "empty kernel launch": lambda: torch.cuda._sleep(0)}
        if runtime is not None:
            pieces["dispatch_outputs (C++)"] = lambda: runtime.dispatch_outputs(num_max, hidden, num_experts, True, False)
        for name, fn in pieces.items():
            log(rank, f"  host time of {name}: {gpu_utils.host_time_us(fn):.1f} us")

    # One CUDA graph of dispatch + combine (the decode step's communication), replayed back to back.
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            both()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iterations):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    results["graph_dispatch_combine_us"] = _median_max([begin.elapsed_time(end) * 1000 / iterations])

    # Hook mode: the send kernel, then the receive kernel (launched by hook()).
    align = torch.zeros(1, device="cuda")

    def hooked():
        r = buffer.low_latency_dispatch(x, topk_idx, num_max, num_experts, return_recv_hook=True)
        dist.all_reduce(align)  # every send done: the receive kernels below find their data
        r[4]()
        c = buffer.low_latency_combine(y, topk_idx, weights, r[2], return_recv_hook=True)
        dist.all_reduce(align)
        c[2]()

    if os.environ.get("DEEP_EP_LL_TRACE", "0") == "1":
        _set_combine_mode(buffer, COMBINE_MODES[0])
        _print_phase_trace("one launch, starts lined up by the rank barrier", both, rank, iterations,
                           align=device_barrier)
        _print_phase_trace("hook mode", hooked, rank, iterations)

    durations = _kernel_durations(hooked, iterations)
    d, c = durations["dispatch_kernel"], durations["combine_kernel"]
    results["hook_dispatch_send_us"] = _median_max(d[0::2] or [0.0])
    results["hook_dispatch_recv_us"] = _median_max(d[1::2] or [0.0])
    results["hook_combine_send_us"] = _median_max(c[0::2] or [0.0])
    results["hook_combine_recv_us"] = _median_max(c[1::2] or [0.0])

    # Baselines: the torch backend (all_to_all_single underneath) and a bare all_to_all_single of
    # the same per-(token, expert) bytes.
    ref_iters = max(10, iterations // 10)
    state_ref = {}

    def ref_dispatch():
        state_ref["d"] = ref.low_latency_dispatch(x, topk_idx, num_max, num_experts)

    results["torch_dispatch_us"] = _time_calls(ref_dispatch, ref_iters, warmup=3)
    rx, rc, rh = state_ref["d"][:3]
    ry = simulate_experts(rx, rc, rank, num_experts)
    results["torch_combine_us"] = _time_calls(lambda: ref.low_latency_combine(ry, topk_idx, weights, rh), ref_iters,
                                              warmup=3)
    pairs_per_rank = torch.bincount((topk_idx[topk_idx >= 0] // num_local), minlength=num_ranks)
    recv_pairs = torch.empty_like(pairs_per_rank)
    dist.all_to_all_single(recv_pairs, pairs_per_rank)
    send_splits, recv_splits = pairs_per_rank.tolist(), recv_pairs.tolist()
    for name, row_bytes in (("a2a_dispatch_us", fp8_row), ("a2a_combine_us", hidden * 2)):
        send = torch.empty(sum(send_splits), row_bytes, dtype=torch.uint8, device=x.device)
        recv = torch.empty(sum(recv_splits), row_bytes, dtype=torch.uint8, device=x.device)
        results[name] = _time_calls(lambda: dist.all_to_all_single(recv, send, recv_splits, send_splits), ref_iters,
                                    warmup=3)
    if results["kernel_dispatch_us"] > 0:
        results["kernel_dispatch_GBps"] = recv_rows * fp8_row / results["kernel_dispatch_us"] / 1e3
    if results["kernel_combine_us"] > 0:
        results["kernel_combine_GBps"] = recv_rows * hidden * 2 / results["kernel_combine_us"] / 1e3
    return results


# ----------------------------------------------------------------------------------------------
# Process entry
# ----------------------------------------------------------------------------------------------
def _worker(rank: int, num_ranks: int, group, bench: bool, iterations: int, seed: int, quick: bool,
            bench_only: bool = False, shrink: bool = True, nvlink: bool = True) -> None:
    """One rank of the run (gpu_utils.spawn has set up the NCCL group)."""
    os.environ.setdefault("DEEP_EP_TIMEOUT_S", "60")
    from deep_ep import Buffer

    configs = CONFIGS[:1] if quick or bench_only else CONFIGS + [MAX_TOKENS_LIMIT_CONFIG]
    # The benchmark's shape (256 experts) needs more room than the checks' on fewer ranks.
    bench_m, bench_hidden, bench_experts, bench_topk = BENCH_CONFIG
    bench_sizes = [(bench_m, bench_hidden, bench_experts // num_ranks, bench_topk)] if bench or bench_only else []
    num_rdma_bytes = _rdma_bytes(configs + bench_sizes, num_ranks)
    shrink = shrink and not bench_only
    buffer = make_kernel_buffer(group, num_rdma_bytes, enable_shrink=shrink, allow_nvlink=nvlink)
    ref = Buffer(group, 0, num_rdma_bytes, low_latency_mode=True, explicitly_destroy=True, backend="torch")
    log(rank, f"[{num_ranks} ranks] low-latency kernels vs torch backend; backend class "
              f"{type(buffer._backend).__name__}, rdma bytes {num_rdma_bytes}, shrink mode {shrink}, "
              f"direct NVLink stores {nvlink}")
    try:
        if not bench_only:
            for i, cfg in enumerate(configs):
                run_config(buffer, ref, rank, num_ranks, cfg, seed + i)
            run_options(buffer, rank, num_ranks, seed)
            if not quick and shrink:
                run_shrink(buffer, rank, num_ranks, seed)
                if not bench:
                    run_barrier_timeout(buffer, rank, num_ranks)  # last: its error record stays set
            dist.barrier()
            if not shrink and not bench:
                run_timeout(buffer, rank, num_ranks, seed)  # last: the buffer is unusable after it
            log(rank, f"[{num_ranks} ranks] all low-latency checks passed")
        if bench or bench_only:
            results = run_bench(buffer, ref, rank, num_ranks, seed, iterations)
            if rank == 0:
                name = torch.cuda.get_device_name()
                print(f"[{num_ranks} x {name}] 128 tokens x 7168 hidden, top-8 of 256 experts, FP8 dispatch, "
                      f"bf16 combine; median of {iterations} calls, slowest rank"
                      f"{'' if nvlink else '; NVSHMEM puts (allow_nvlink_for_low_latency_mode=False)'}", flush=True)
                for key, value in results.items():
                    print(f"  {key:28s} {value:10.2f}", flush=True)
    finally:
        dist.barrier()
        torch.cuda.synchronize()
        buffer.destroy()
        ref.destroy()


def run(num_processes: int, bench: bool = False, iterations: int = 200, seed: int = 0, quick: bool = False,
        bench_only: bool = False, shrink: bool = True, nvlink: bool = True) -> None:
    gpu_utils.spawn(_worker, num_processes, bench, iterations, seed, quick, bench_only, shrink, nvlink)


# ----------------------------------------------------------------------------------------------
# pytest
# ----------------------------------------------------------------------------------------------
try:
    import pytest

    # The buffer variants, each with its own dispatch receive or send path: the default (shrink
    # mode), no shrink mode (the scan-free receive) and every peer through NVSHMEM puts.
    _VARIANTS = {"shrink": {}, "no_shrink": {"shrink": False}, "nvshmem_puts": {"quick": True, "nvlink": False}}

    @pytest.mark.parametrize("variant", list(_VARIANTS))
    @pytest.mark.parametrize("num_processes", [2, 4])
    def test_low_latency_kernels(num_processes: int, variant: str) -> None:
        reason = _skip_reason(num_processes)
        if reason is not None:
            pytest.skip(reason)
        seed = gpu_utils.fresh_seed()
        print(f"seed {seed} (DEEP_EP_TEST_SEED repeats it)", flush=True)
        run(num_processes, seed=seed, **_VARIANTS[variant])
except ImportError:  # running as a script without pytest
    pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    parser.add_argument("--bench", action="store_true", help="run the benchmark after the checks")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None, help="default: DEEP_EP_TEST_SEED, else a fresh one")
    parser.add_argument("--quick", action="store_true", help="only the decode configuration, no shrink test")
    parser.add_argument("--bench-only", action="store_true", help="skip the checks, run the benchmark")
    parser.add_argument("--no-shrink", action="store_true",
                        help="a buffer without shrink mode (the scan-free dispatch receive); no shrink test")
    parser.add_argument("--no-nvlink", action="store_true",
                        help="allow_nvlink_for_low_latency_mode=False: every peer is written with NVSHMEM puts")
    cli = parser.parse_args()
    skip = _skip_reason(cli.num_processes)
    if skip is not None:
        print(f"test_low_latency: skipped ({skip})")
        sys.exit(0)
    seed = cli.seed if cli.seed is not None else gpu_utils.fresh_seed()
    print(f"seed {seed}", flush=True)
    run(cli.num_processes, bench=cli.bench, iterations=cli.iterations, seed=seed, quick=cli.quick,
        bench_only=cli.bench_only, shrink=not cli.no_shrink, nvlink=not cli.no_nvlink)
