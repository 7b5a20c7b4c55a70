"""The multi-process harness itself: a failure, a crash or a hang on one rank is reported
with the right rank and never blocks the suite."""

import os
import time

import torch
import torch.distributed as dist

from dist_utils import CaseSet, base_seed, run_cases

CASES = CaseSet(__name__)


@CASES.case(world_sizes=(2,))
def passes(ctx):
    total = torch.ones(1)
    dist.all_reduce(total)
    assert total.item() == ctx.world_size


@CASES.case(world_sizes=(2,))
def rank0_raises_before_a_collective(ctx):
    if ctx.rank == 0:
        raise ValueError("deliberate failure on rank 0")
    dist.all_reduce(torch.ones(1))  # rank 1 waits here for ever


@CASES.case(world_sizes=(2,))
def rank1_hangs(ctx):
    if ctx.rank == 1:
        time.sleep(3600)


@CASES.case(world_sizes=(2,))
def rank1_dies(ctx):
    if ctx.rank == 1:
        os._exit(3)
    dist.all_reduce(torch.ones(1))


@CASES.case(world_sizes=(2,))
def passes_after_the_failures(ctx):
    passes(ctx)


def test_failures_are_isolated_and_bounded():
    start = time.monotonic()
    results = run_cases(__name__, list(CASES.cases), 2, base_seed(), timeout_s=5.0)
    elapsed = time.monotonic() - start
    assert results["passes"].ok and results["passes_after_the_failures"].ok
    raised = results["rank0_raises_before_a_collective"]
    assert not raised.ok and "deliberate failure on rank 0" in raised.message and "--- rank 1 ---" in raised.message
    hung = results["rank1_hangs"]
    assert not hung.ok and "did not finish" in hung.message
    died = results["rank1_dies"]
    assert not died.ok and "exit code 3" in died.message
    assert elapsed < 120, f"the harness took {elapsed:.0f}s"
