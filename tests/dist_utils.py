"""Run test cases in N CPU processes joined by a gloo process group.

A test module declares its cases with a :class:`CaseSet`::

    CASES = CaseSet(__name__)

    @CASES.case(world_sizes=(1, 2, 4))
    def layout_random(ctx: CaseContext) -> None:
        ...

    test_case = CASES.pytest_function()

Spawning a process that imports torch costs seconds, so all cases of one module and one world
size run inside a single spawned job, one case after the other; pytest still reports one test
per (case, world size). A case that fails (or hangs, or kills its process) ends that job: its
peers may be stuck in a collective that will never complete, so the parent kills every
process, records the failure with each rank's traceback, and starts a fresh job for the
cases that had not finished. Nothing can hang: every case has a wall-clock limit.

Environment knobs: ``DEEP_EP_TEST_SEED`` (base seed; conftest.py draws a fresh one per
session and prints it), ``DEEP_EP_TEST_CASE_TIMEOUT`` (seconds per case, default 120).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
import queue as queue_module
import shutil
import tempfile
import time
import traceback
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import multiprocessing as mp

# Seconds a job waits after the first failure report for the other ranks' reports of the same
# case (they may fail too, and their tracebacks help); the peers of a failed rank usually hang.
_GRACE_AFTER_FAILURE_S = 3.0
_POLL_INTERVAL_S = 0.1


def base_seed() -> int:
    """The session's base seed (``DEEP_EP_TEST_SEED``; conftest.py sets a fresh one)."""
    seed = os.environ.get("DEEP_EP_TEST_SEED")
    if seed is None:
        seed = str(int.from_bytes(os.urandom(4), "little"))
        os.environ["DEEP_EP_TEST_SEED"] = seed
    return int(seed)


def case_seed(seed: int, case_name: str, world_size: int) -> int:
    """Seed of one case: differs per case and world size, identical on every rank."""
    return (seed * 1_000_003 + zlib.crc32(case_name.encode()) * 17 + world_size) % (2**62)


def case_timeout_s() -> float:
    return float(os.environ.get("DEEP_EP_TEST_CASE_TIMEOUT", "120"))


@dataclasses.dataclass
class CaseContext:
    """What a case receives in each process.

    Attributes:
        rank: this process's rank in ``group``.
        world_size: number of processes.
        group: the gloo process group (the default group).
        seed: the case's seed; identical on every rank, so every rank can regenerate
            every rank's inputs.
    """

    rank: int
    world_size: int
    group: object
    seed: int

    def generator(self, salt: int = 0):
        """A CPU ``torch.Generator`` seeded identically on every rank."""
        import torch

        gen = torch.Generator()
        gen.manual_seed((self.seed + 7919 * salt) % (2**62))
        return gen


@dataclasses.dataclass
class CaseResult:
    """Outcome of one case at one world size."""

    ok: bool
    message: str = ""


@dataclasses.dataclass
class _RegisteredCase:
    name: str
    fn: Callable[[CaseContext], None]
    world_sizes: Tuple[int, ...]
    timeout_s: Optional[float] = None


class CaseSet:
    """The cases of one test module, run in one spawned job per world size."""

    def __init__(self, module_name: str) -> None:
        self.module_name = module_name
        self.cases: Dict[str, _RegisteredCase] = {}
        self._results: Dict[int, Dict[str, CaseResult]] = {}
        self._job_seconds: Dict[int, float] = {}

    def case(self, world_sizes: Sequence[int] = (1, 2, 4), timeout_s: Optional[float] = None) -> Callable:
        """Decorator that registers ``fn(ctx)`` as a case run at each of ``world_sizes``.

        ``timeout_s`` overrides ``DEEP_EP_TEST_CASE_TIMEOUT`` for a case that is expected to
        finish quickly (e.g. one that checks that nothing hangs).
        """

        def register(fn: Callable[[CaseContext], None]) -> Callable[[CaseContext], None]:
            if fn.__name__ in self.cases:
                raise ValueError(f"duplicate case name {fn.__name__}")
            self.cases[fn.__name__] = _RegisteredCase(fn.__name__, fn, tuple(world_sizes), timeout_s)
            return fn

        return register

    def names_for(self, world_size: int) -> List[str]:
        return [name for name, case in self.cases.items() if world_size in case.world_sizes]

    def result(self, case_name: str, world_size: int) -> CaseResult:
        """Runs the module's job for ``world_size`` on first use, then answers from the cache."""
        if world_size not in self._results:
            start = time.monotonic()
            self._results[world_size] = run_cases(
                self.module_name,
                self.names_for(world_size),
                world_size,
                base_seed(),
                case_timeouts={n: c.timeout_s for n, c in self.cases.items() if c.timeout_s is not None},
            )
            self._job_seconds[world_size] = time.monotonic() - start
        return self._results[world_size][case_name]

    def pytest_function(self) -> Callable:
        """A pytest test function parametrized over every (world size, case) pair."""
        import pytest

        params = [
            pytest.param(world_size, name, id=f"ws{world_size}-{name}")
            for world_size in sorted({w for c in self.cases.values() for w in c.world_sizes})
            for name in self.names_for(world_size)
        ]

        @pytest.mark.parametrize("world_size,case_name", params)
        def test_case(world_size: int, case_name: str) -> None:
            outcome = self.result(case_name, world_size)
            if not outcome.ok:
                pytest.fail(outcome.message, pytrace=False)

        return test_case


def _worker(
    rank: int,
    world_size: int,
    init_file: str,
    module_name: str,
    case_names: List[str],
    seed: int,
    timeout_s: float,
    reports,
) -> None:
    """Body of one spawned process: join the group, run the cases in order, report each."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    current = "<process group setup>"
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        module = importlib.import_module(module_name)
        case_set: CaseSet = getattr(module, "CASES")
        for name in case_names:
            current = name
            reports.put(("start", rank, name, ""))
            ctx = CaseContext(rank, world_size, dist.group.WORLD, case_seed(seed, name, world_size))
            case_set.cases[name].fn(ctx)
            reports.put(("ok", rank, name, ""))
        current = "<process group teardown>"
        dist.barrier()
        dist.destroy_process_group()
        reports.put(("done", rank, "", ""))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        reports.put(("fail", rank, current, traceback.format_exc()))
        # Leave the process to the parent, which kills the whole job: exiting here could make
        # the peers see a closed socket first and report that instead of the real cause.
        # Should the parent itself die, do not linger as an orphan.
        parent = os.getppid()
        give_up = time.monotonic() + 600
        while os.getppid() == parent and time.monotonic() < give_up:
            time.sleep(0.5)


def _format_failure(case_name: str, world_size: int, seed: int, per_rank: Dict[int, str]) -> str:
    lines = [
        f"case {case_name} failed at world size {world_size}; "
        f"reproduce with DEEP_EP_TEST_SEED={seed} (case seed {case_seed(seed, case_name, world_size)})"
    ]
    for rank in sorted(per_rank):
        lines.append(f"--- rank {rank} ---")
        lines.append(per_rank[rank].rstrip())
    return "\n".join(lines)


def _run_job(
    module_name: str,
    case_names: List[str],
    world_size: int,
    seed: int,
    timeout_s: float,
    case_timeouts: Dict[str, float],
) -> Tuple[Dict[str, CaseResult], List[str], Optional[str]]:
    """Runs ``case_names`` in one job. Returns (results of finished cases, cases left to run, the
    traceback of a process-group setup failure or None)."""
    ctx = mp.get_context("spawn")
    reports = ctx.Queue()
    tmpdir = tempfile.mkdtemp(prefix="deep_ep_test_")
    init_file = os.path.join(tmpdir, "store")
    processes = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, init_file, module_name, case_names, seed, timeout_s, reports),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()

    finished_upto = [0] * world_size  # per rank: number of cases that passed
    failures: Dict[int, Dict[int, str]] = {}  # case index -> rank -> traceback
    done = [False] * world_size
    crashed = [False] * world_size
    reached_failure_at: Optional[float] = None
    setup_failure: Optional[str] = None
    # Spawning and importing torch in every process shares 2 cores: allow for it once.
    deadline = time.monotonic() + timeout_s + 60.0
    try:
        while not all(done):
            try:
                kind, rank, name, text = reports.get(timeout=_POLL_INTERVAL_S)
            except queue_module.Empty:
                kind = None
            now = time.monotonic()
            if kind == "start":
                # Each case gets its own limit, counted from the last rank's start of a case
                # (the first deadline also covers process start-up).
                deadline = now + case_timeouts.get(name, timeout_s)
            elif kind == "ok":
                finished_upto[rank] += 1
            elif kind == "done":
                done[rank] = True
            elif kind == "fail":
                if name == "<process group setup>":
                    setup_failure = text
                # A failure outside any case (setup/teardown) counts against the case it was at.
                failures.setdefault(finished_upto[rank], {})[rank] = text
            for rank, process in enumerate(processes):
                if not done[rank] and not crashed[rank] and process.exitcode not in (None, 0):
                    crashed[rank] = True
                    failures.setdefault(finished_upto[rank], {}).setdefault(
                        rank, f"process died with exit code {process.exitcode}"
                    )
            if failures:
                first = min(failures)
                # Wait until every rank got as far as the failed case (a slower rank may still
                # be in an earlier one), then a short grace for the others' own reports.
                if all(finished_upto[r] >= first or r in failures[first] for r in range(world_size)):
                    if reached_failure_at is None:
                        reached_failure_at = now
                    settled = all(
                        finished_upto[r] > first or r in failures[first] for r in range(world_size)
                    )
                    if settled or now - reached_failure_at > _GRACE_AFTER_FAILURE_S:
                        break
            if now > deadline:
                break
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        for process in processes:
            process.join(timeout=10)
        reports.close()
        shutil.rmtree(tmpdir, ignore_errors=True)

    results: Dict[str, CaseResult] = {}
    passed_by_all = min(finished_upto)
    for name in case_names[:passed_by_all]:
        results[name] = CaseResult(True)
    if all(done):
        return results, [], None
    culprit_index = min(passed_by_all, len(case_names) - 1)
    culprit = case_names[culprit_index]
    if passed_by_all >= len(case_names):
        culprit_label = culprit + " (process group teardown after the last case)"
    else:
        culprit_label = culprit
    culprit_timeout = case_timeouts.get(culprit, timeout_s)
    per_rank = dict(failures.get(passed_by_all, {}))
    for rank in range(world_size):
        if rank not in per_rank and finished_upto[rank] == passed_by_all:
            per_rank[rank] = (
                "did not finish (hung, most likely waiting in a collective for a rank that "
                f"failed, or ran past its time limit of {culprit_timeout:.0f}s)"
            )
    results[culprit] = CaseResult(False, _format_failure(culprit_label, world_size, seed, per_rank))
    if setup_failure is not None:
        # The job never got to run a case (e.g. the package does not import): every case
        # would fail the same way, so do not respawn once per case.
        for name in case_names[culprit_index + 1 :]:
            results[name] = CaseResult(False, f"not run: process setup failed\n{setup_failure}")
        return results, [], setup_failure
    return results, case_names[culprit_index + 1 :], None


# Signs of a rendezvous that broke for reasons outside the code under test (seen once in CI on a
# loaded 2-core machine: "Gloo connectFullMesh failed ... Connection closed by peer").
_TRANSIENT_SETUP_SIGNS = ("connectFullMesh", "Connection closed by peer", "Connection refused",
                          "Connection reset by peer", "EADDRINUSE")
_SETUP_RETRIES = 2


def run_cases(
    module_name: str,
    case_names: List[str],
    world_size: int,
    seed: int,
    timeout_s: Optional[float] = None,
    case_timeouts: Optional[Dict[str, float]] = None,
) -> Dict[str, CaseResult]:
    """Runs the named cases of ``module_name`` (its ``CASES``) in ``world_size`` processes.

    Returns one :class:`CaseResult` per case. A failure costs a fresh job for the cases after it.
    ``timeout_s`` (default ``DEEP_EP_TEST_CASE_TIMEOUT``) bounds each case; ``case_timeouts``
    overrides it per case name.
    """
    timeout_s = case_timeout_s() if timeout_s is None else timeout_s
    results: Dict[str, CaseResult] = {}
    remaining = list(case_names)
    setup_retries = _SETUP_RETRIES
    while remaining:
        finished, left, setup_failure = _run_job(
            module_name, remaining, world_size, seed, timeout_s, dict(case_timeouts or {})
        )
        if (setup_failure is not None and setup_retries > 0
                and any(sign in setup_failure for sign in _TRANSIENT_SETUP_SIGNS)):
            # The gloo rendezvous itself broke (a connection closed or refused while the job's
            # processes met): no case ran, so the same cases get a fresh job.
            setup_retries -= 1
            continue
        results.update(finished)
        remaining = left
    return results
