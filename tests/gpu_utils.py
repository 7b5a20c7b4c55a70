"""Shared helpers of the GPU tests: one process per GPU over NCCL, poisoning, comparisons.

A GPU test module is runnable as a script (``--num-processes N``) and collected by pytest, which
skips it with a reason when there are fewer GPUs than it needs or no extension.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable, Optional, Tuple

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, num_processes: int, port: int, fn: Callable, args: Tuple[Any, ...],
            errors: Any) -> None:
    for key, value in SAFE_ENV.items():
        os.environ[key] = value
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
    errors = context.SimpleQueue()
    port = _free_port()
    try:
        mp.start_processes(_worker, args=(num_processes, port, fn, args, errors), nprocs=num_processes,
                           join=True, start_method="spawn")
    except Exception as error:
        reports = []
        while not errors.empty():
            rank, text = errors.get()
            reports.append(f"--- rank {rank} ---\n{text}")
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
                              magnitude: torch.Tensor) -> None:
    """``actual`` (bf16) within one bf16 rounding of the float64 ``reference``, plus float32
    accumulation error relative to ``magnitude`` (the sum of the absolute terms)."""
    diff = (actual.double() - reference).abs()
    tolerance = reference.abs() * 2.0 ** -8 + magnitude * 2.0 ** -20 + 1e-30
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
