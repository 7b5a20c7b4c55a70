"""Shared helpers of the GPU tests: one process per GPU over NCCL, poisoning, comparisons.

A GPU test module is runnable as a script (``--num-processes N``) and collected by pytest, which
skips it with a reason when there are fewer GPUs than it needs or no extension.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import time
import traceback
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# NVLink multicast stays off everywhere (it can take a shared host's GPUs out of service).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
for _key, _value in SAFE_ENV.items():
    os.environ[_key] = _value


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def hopper_gpus() -> bool:
    return gpu_count() > 0 and all(torch.cuda.get_device_capability(i) == (9, 0) for i in range(gpu_count()))


def extension_available() -> bool:
    try:
        import deep_ep_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def skip_reason(num_processes: int) -> Optional[str]:
    """Why a GPU test with ``num_processes`` ranks cannot run here, or None."""
    if gpu_count() < num_processes:
        return f"needs {num_processes} GPUs, found {gpu_count()}"
    if not hopper_gpus():
        return "needs Hopper (sm_90) GPUs"
    if not extension_available():
        return "the deep_ep_cpp extension is not built"
    return None


def fresh_seed() -> int:
    """``DEEP_EP_TEST_SEED`` when set (to repeat a run), else a fresh random seed."""
    value = os.environ.get("DEEP_EP_TEST_SEED")
    return int(value) if value else int.from_bytes(os.urandom(3), "little")


def script_seed(num_processes: int, seed: Optional[int]) -> Optional[int]:
    """For a GPU test run as a script: None, after printing why, when it cannot run here with
    ``num_processes`` ranks; else ``seed`` (or fresh_seed() when None), printed."""
    reason = skip_reason(num_processes)
    if reason is not None:
        print(f"skipped: {reason}")
        return None
    seed = seed if seed is not None else fresh_seed()
    print(f"seed {seed}", flush=True)
    return seed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, num_processes: int, port: int, fn: Callable, args: Tuple[Any, ...],
            errors: Any) -> None:
    for key, value in SAFE_ENV.items():
        os.environ[key] = value
    # A rank that dies of a signal (SIGSEGV in an extension) leaves no traceback in `errors`:
    # this prints its Python stack on stderr instead.
    faulthandler.enable(all_threads=True)
    torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=local_rank,
                                world_size=num_processes, device_id=torch.device("cuda", local_rank))
        group = dist.group.WORLD
        fn(local_rank, num_processes, group, *args)
        torch.cuda.synchronize()
        dist.barrier()
    except BaseException:
        errors.put((local_rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, num_processes: int, *args: Any) -> None:
    """Run ``fn(rank, num_ranks, group, *args)`` in one process per GPU over NCCL.

    Raises:
        RuntimeError: a rank failed; the message carries every failed rank's traceback.
    """
    context = mp.get_context("spawn")
    # The port is free when chosen but may be taken before rank 0 listens on it: then (and only
    # then) the whole run starts again on another port.
    for attempt in range(3):
        errors = context.SimpleQueue()
        port = _free_port()
        try:
            mp.start_processes(_worker, args=(num_processes, port, fn, args, errors), nprocs=num_processes,
                               join=True, start_method="spawn")
            return
        except Exception as error:
            reports = []
            while not errors.empty():
                rank, text = errors.get()
                reports.append(f"--- rank {rank} ---\n{text}")
            if attempt < 2 and any("EADDRINUSE" in text for text in reports):
                print(f"port {port} was taken before the rendezvous; again on another port", flush=True)
                continue
            raise RuntimeError("GPU test failed:\n" + "\n".join(reports)) from error


def poison_(t: Optional[torch.Tensor]) -> None:
    """Fill a tensor with a value no kernel writes by accident (NaN for floats, 0x5A bytes else)."""
    if t is None:
        return
    if t.is_floating_point() and t.element_size() >= 2:
        t.fill_(float("nan"))
    else:
        t.view(torch.uint8).fill_(0x5A)


def poison_allocator(stream: Optional[torch.cuda.Stream], *shapes_of: Any) -> None:
    """Leave poisoned blocks in the caching allocator of ``stream`` (where the backend allocates
    its outputs), sized like the given tensors, so an output the kernel never writes cannot
    inherit correct bytes from an earlier call. ``None`` entries and tuples are flattened."""
    flat = []
    for t in shapes_of:
        if isinstance(t, (tuple, list)):
            flat.extend(x for x in t if isinstance(x, torch.Tensor))
        elif isinstance(t, torch.Tensor):
            flat.append(t)
    with torch.cuda.stream(stream if stream is not None else torch.cuda.current_stream()):
        blocks = [torch.empty_like(t) for t in flat]
        for b in blocks:
            poison_(b)
        del blocks


def assert_bitwise_equal(name: str, actual: Optional[torch.Tensor], expected: Optional[torch.Tensor]) -> None:
    """Same shape, same dtype, same bytes."""
    if actual is None or expected is None:
        assert actual is None and expected is None, f"{name}: one side is None"
        return
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    a = actual.contiguous().view(torch.uint8)
    b = expected.contiguous().view(torch.uint8)
    if not torch.equal(a, b):
        mismatch = (a != b).nonzero()
        raise AssertionError(f"{name}: {mismatch.shape[0]} bytes differ, first at byte index "
                             f"{mismatch[0].tolist()} of shape {tuple(a.shape)}")


def assert_close_to_reference(name: str, actual: torch.Tensor, reference: torch.Tensor,
                              magnitude: torch.Tensor, magnitude_tolerance: float = 2.0 ** -20) -> None:
    """``actual`` (bf16) within one bf16 rounding of the float64 ``reference``, plus
    ``magnitude_tolerance`` times ``magnitude`` (the sum of the absolute terms): by default float32
    accumulation error; 2**-8 for one bf16 rounding of partial sums (the internode kernels)."""
    diff = (actual.double() - reference).abs()
    tolerance = reference.abs() * 2.0 ** -8 + magnitude * magnitude_tolerance + 1e-30
    bad = diff > tolerance
    if bool(torch.isnan(actual).any()):
        raise AssertionError(f"{name}: NaN in the result (an element was never written)")
    if bool(bad.any()):
        index = bad.nonzero()[0].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} elements off, e.g. at {index}: got "
                             f"{float(actual[tuple(index)])}, reference {float(reference[tuple(index)])}")


def check_graph_replay(step: Callable[[], Tuple[torch.Tensor, ...]], static: dict,
                       fresh_inputs: Callable[[int], dict], names: Tuple[str, ...]) -> None:
    """Capture ``step`` (which reads the tensors of ``static``) in a CUDA graph, then three times:
    copy new inputs into ``static``, poison the graph's outputs, replay, and compare them byte for
    byte with an eager ``step`` on the same inputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as graph capture requires
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for replay in range(3):
        fresh = fresh_inputs(replay)
        for k in static:
            static[k].copy_(fresh[k])
        for t in outs:
            poison_(t)
        graph.replay()
        eager = step()
        for name, a, b in zip(names, outs, eager):
            assert_bitwise_equal(f"graph replay {replay} {name}", a, b)
    torch.cuda.synchronize()


def cuda_event_times_us(fn: Callable[[int], Any], iters: int, warmup: int) -> List[float]:
    """Device time (us, CUDA events on the current stream) of each of ``iters`` calls ``fn(i)``,
    after ``warmup`` calls ``fn(i)``, a synchronize and a barrier of the default group."""
    return _event_times_us(fn, iters, warmup, cover_host=False)[0]


# A GPU sleep long enough to cover one call's host work (about 0.5 ms at Hopper clocks).
HOST_COVER_SLEEP_CYCLES = 1_000_000


def covered_event_times_us(fn: Callable[[int], Any], iters: int, warmup: int) -> Tuple[List[float], List[float]]:
    """Device time (us) of each of ``iters`` calls ``fn(i)`` with the host's work hidden, and the
    host time (us) of each call.

    Back-to-back calls timed by events measure the host too once a call's host work outlasts its
    kernels: the stream runs dry and the gap lands between the events. Here a GPU sleep before
    each call keeps the stream busy while the host enqueues the call, so the events bracket the
    call's device work only. The host time is the wall time of ``fn(i)`` alone.
    """
    return _event_times_us(fn, iters, warmup, cover_host=True)


def _event_times_us(fn: Callable[[int], Any], iters: int, warmup: int,
                    cover_host: bool) -> Tuple[List[float], List[float]]:
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    dist.barrier()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    host: List[float] = []
    for i in range(iters):
        if cover_host:
            torch.cuda._sleep(HOST_COVER_SLEEP_CYCLES)
        starts[i].record()
        begin = time.perf_counter()
        fn(i)
        host.append((time.perf_counter() - begin) * 1e6)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1000.0 for s, e in zip(starts, ends)], host


def host_time_us(fn: Callable[[], Any], calls: int = 40, repeats: int = 5) -> float:
    """Host wall time per call (us) of ``calls`` back-to-back calls ``fn()``: the median over
    ``repeats``, then the slowest rank. Every rank must call it (kernels may wait for each other)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        dist.barrier()
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - begin) / calls * 1e6)
    torch.cuda.synchronize()
    dist.barrier()
    times.sort()
    return max_over_ranks(times[len(times) // 2])


def print_host_profile(fn: Callable[[], Any], rank: int, title: str, calls: int = 200) -> None:
    """Where the host time of ``calls`` calls ``fn()`` goes: a cProfile, top 25 by own time, of
    rank 0. Every rank must call it: the kernels of one call wait for every rank's."""
    import cProfile
    import io
    import pstats

    torch.cuda.synchronize()
    dist.barrier()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    dist.barrier()
    if rank != 0:
        return
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    print(f"host profile of {calls} {title} calls (rank 0):\n{text.getvalue()}", flush=True)


def _all_reduce_value(value: float, op: Any) -> float:
    t = torch.tensor([value], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=op)
    return float(t.item())


def max_over_ranks(value: float) -> float:
    """The largest ``value`` of all ranks (default group): the slowest rank's time."""
    return _all_reduce_value(value, dist.ReduceOp.MAX)


def min_over_ranks(value: float) -> float:
    """The smallest ``value`` of all ranks (default group): the slowest rank's bandwidth."""
    return _all_reduce_value(value, dist.ReduceOp.MIN)
