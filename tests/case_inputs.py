"""Inputs and comparisons shared by the CPU test cases.

Inputs come from a generator seeded identically on every rank and are drawn for all ranks in
rank order, so every process holds every rank's inputs (what the oracle needs).
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Callable, List, Optional, Sequence, Tuple, Type

import numpy as np
import torch

EXPERT_COUNTS = (8, 16, 32, 64, 128, 256)


@dataclasses.dataclass
class Scenario:
    """One routing problem: tokens per rank, hidden size and how tokens pick experts."""

    num_tokens: List[int]  # per rank
    hidden: int
    num_topk: int
    num_experts: int
    hot_experts: bool = False  # most picks go to a few experts (uneven loads)
    masked_fraction: float = 0.0  # share of top-k entries set to -1
    all_masked_rows: int = 0  # tokens per rank whose whole top-k is -1

    def describe(self) -> str:
        return (
            f"tokens={self.num_tokens} hidden={self.hidden} topk={self.num_topk} "
            f"experts={self.num_experts} hot={self.hot_experts} masked={self.masked_fraction} "
            f"all_masked_rows={self.all_masked_rows}"
        )


@dataclasses.dataclass
class RankInputs:
    x: torch.Tensor  # bf16 [T, H]
    topk_idx: torch.Tensor  # int64 [T, K]
    topk_weights: torch.Tensor  # float32 [T, K]


def random_scenarios(
    seed: int,
    world_size: int,
    count: int,
    hidden_choices: Sequence[int] = (128, 256, 512),
    max_tokens: int = 48,
    max_topk: int = 9,
) -> List[Scenario]:
    """``count`` varied scenarios; the first ones always cover the edge cases."""
    rng = random.Random(seed)
    scenarios = []
    for i in range(count):
        experts = [e for e in EXPERT_COUNTS if e % world_size == 0]
        num_experts = rng.choice(experts)
        num_topk = rng.randint(1, min(max_topk, num_experts))
        num_tokens = [rng.randint(1, max_tokens) for _ in range(world_size)]
        if i == 0:
            num_tokens[rng.randrange(world_size)] = 0  # a rank with no tokens
        scenarios.append(
            Scenario(
                num_tokens=num_tokens,
                hidden=rng.choice(hidden_choices),
                num_topk=num_topk,
                num_experts=num_experts,
                hot_experts=(i % 3 == 1) or rng.random() < 0.3,
                masked_fraction=rng.choice((0.0, 0.0, 0.2, 0.5)),
                all_masked_rows=2 if i % 2 == 0 else rng.randint(0, 2),
            )
        )
    return scenarios


def make_topk_idx(gen: torch.Generator, scenario: Scenario, num_tokens: int) -> torch.Tensor:
    """Distinct experts per token, with the scenario's -1 entries and hot experts."""
    if num_tokens == 0:
        return torch.empty((0, scenario.num_topk), dtype=torch.int64)
    weights = torch.ones(num_tokens, scenario.num_experts)
    if scenario.hot_experts:
        hot = torch.randperm(scenario.num_experts, generator=gen)[: max(1, scenario.num_experts // 8)]
        weights[:, hot] = 50.0
    topk = torch.multinomial(weights, scenario.num_topk, replacement=False, generator=gen)
    masked = torch.rand(topk.shape, generator=gen) < scenario.masked_fraction
    topk = topk.masked_fill(masked, -1)
    rows = torch.randperm(num_tokens, generator=gen)[: min(scenario.all_masked_rows, num_tokens)]
    topk[rows] = -1
    return topk.to(torch.int64).contiguous()


def make_inputs(gen: torch.Generator, scenario: Scenario) -> List[RankInputs]:
    """Every rank's inputs, drawn in rank order from the shared generator."""
    inputs = []
    for num_tokens in scenario.num_tokens:
        x = torch.randn(num_tokens, scenario.hidden, generator=gen)
        # Spread magnitudes per token so FP8 scales differ between tokens.
        x = x * torch.exp2(torch.randint(-4, 5, (num_tokens, 1), generator=gen).float())
        topk_idx = make_topk_idx(gen, scenario, num_tokens)
        topk_weights = torch.rand(num_tokens, scenario.num_topk, generator=gen) + 0.1
        inputs.append(RankInputs(x.to(torch.bfloat16).contiguous(), topk_idx, topk_weights.contiguous()))
    return inputs


def random_bf16(gen: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=gen).to(torch.bfloat16)


def to_numpy_f32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's values as bytes (row-major, any strides), for exact comparisons."""
    tensor = tensor.detach().contiguous().cpu()
    return tensor.view(torch.uint8).numpy() if tensor.numel() else np.zeros(0, np.uint8)


def fp8_pair_with_strided_scales(
    codes: np.ndarray, scales: np.ndarray
) -> Tuple[torch.Tensor, torch.Tensor]:
    """An FP8 pair whose scales are the transpose of a contiguous ``[H/128, T]`` tensor."""
    data = torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn)
    scales_t = torch.from_numpy(np.ascontiguousarray(scales.T)).clone()
    return data, scales_t.T


def check_equal(actual, expected, what: str) -> None:
    """Exact equality of two tensors (dtype, shape, bytes)."""
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    )
    if not np.array_equal(raw_bytes(actual), raw_bytes(expected)):
        diff = (raw_bytes(actual).reshape(-1) != raw_bytes(expected).reshape(-1)).nonzero()[0]
        raise AssertionError(f"{what}: {len(diff)} bytes differ (first at byte {diff[0]})")


def check_close(
    actual: torch.Tensor, expected: np.ndarray, magnitude: np.ndarray, what: str, rel: float = 1e-2
) -> None:
    """bf16 result vs a float64 oracle: error within ``rel`` of the terms' total magnitude."""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    )
    got = actual.detach().double().cpu().numpy()
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    bound = rel * magnitude + 1e-6
    bad = np.abs(got - expected) > bound
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} values off; first at {where}: "
            f"got {got[where]}, expected {expected[where]} (tolerance {bound[where]:.3g})"
        )


def names_argument(message: str, name: str) -> bool:
    """Whether ``message`` mentions ``name`` as a word (so "x" does not match "expected")."""
    return re.search(r"(?<![A-Za-z0-9_])" + re.escape(name) + r"(?![A-Za-z0-9_])", message) is not None


def expect_error(
    fn: Callable[[], object],
    names: Sequence[str],
    what: str,
    types: Tuple[Type[BaseException], ...] = (ValueError, TypeError),
) -> Optional[str]:
    """Returns None if ``fn`` raises one of ``types`` naming one of ``names``; else a complaint."""
    try:
        fn()
    except types as error:
        message = str(error)
        if not any(names_argument(message, name) for name in names):
            return f"{what}: {type(error).__name__} raised, but its message names none of {list(names)}: {message!r}"
        return None
    except Exception as error:  # noqa: BLE001
        return f"{what}: expected {[t.__name__ for t in types]}, got {type(error).__name__}: {error}"
    return f"{what}: no error raised"


class Checks:
    """Collects failed checks so one case reports all of them at once."""

    def __init__(self, context: str = "") -> None:
        self.failures: List[str] = []
        self.context = context

    def add(self, failure: Optional[str]) -> None:
        if failure:
            self.failures.append(failure)

    def run(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except AssertionError as error:
            self.failures.append(f"{what}: {error}")

    def finish(self) -> None:
        if self.failures:
            raise AssertionError(
                f"{len(self.failures)} check(s) failed {self.context}:\n- " + "\n- ".join(self.failures)
            )


def make_buffer(ctx, **kwargs):
    """A torch-backend Buffer over the case's group."""
    import deep_ep

    kwargs.setdefault("backend", "torch")
    return deep_ep.Buffer(ctx.group, **kwargs)


NVL_BYTES = 1 << 24  # enough for calls that move no hidden data (layout, mask calls)


def high_throughput_buffer(ctx, hidden: int, nvl_domain_size: Optional[int] = None, **kwargs):
    """A Buffer sized the documented way: the Config size hints of the tuned configs."""
    import deep_ep

    num_ranks = ctx.world_size
    configs = (deep_ep.Buffer.get_dispatch_config(num_ranks), deep_ep.Buffer.get_combine_config(num_ranks))
    nvl_bytes = max(c.get_nvl_buffer_size_hint(hidden * 2, num_ranks) for c in configs)
    rdma_bytes = 0
    if nvl_domain_size is not None and nvl_domain_size < num_ranks:
        rdma_bytes = max(c.get_rdma_buffer_size_hint(hidden * 2, num_ranks) for c in configs)
        kwargs["nvl_domain_size"] = nvl_domain_size
    return make_buffer(ctx, num_nvl_bytes=nvl_bytes, num_rdma_bytes=rdma_bytes, **kwargs)


def low_latency_buffer(ctx, num_max_tokens: int, hidden: int, num_experts: int, **kwargs):
    """A low-latency Buffer of get_low_latency_rdma_size_hint bytes."""
    import deep_ep

    num_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(num_max_tokens, hidden, ctx.world_size, num_experts)
    kwargs.setdefault("num_qps_per_rank", max(1, num_experts // ctx.world_size))
    return make_buffer(ctx, num_rdma_bytes=num_bytes, low_latency_mode=True, **kwargs)
