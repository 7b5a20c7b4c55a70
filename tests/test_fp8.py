"""FP8 helpers: per_token_cast_to_fp8 matches the oracle bit for bit; per_token_cast_back round-trips.

These run in the pytest process itself (no process group needed).
"""


import numpy as np
import pytest
import torch

import oracle
from dist_utils import base_seed

SHAPES = [(1, 128), (7, 512), (16, 2048), (3, 4096), (2, 7168), (0, 512)]
MODES = [(False, False), (True, False), (True, True)]  # (round_scale, use_ue8m0)


def _input(num_tokens: int, hidden: int, salt: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(base_seed() * 31 + salt)
    x = torch.randn(num_tokens, hidden, generator=gen)
    x = x * torch.exp2(torch.randint(-20, 12, (num_tokens, 1), generator=gen).float())
    if num_tokens >= 3:
        x[0, :128] = 0.0  # amax below the 1e-4 floor
        x[1, 128:256] = 1e-7  # amax below the floor, non-zero values
        x[2, :] = torch.where(torch.arange(hidden) % 2 == 0, 448.0, -0.5)  # exactly at the FP8 limit
    return x.to(torch.bfloat16)


def _ids(params):
    return [f"{t}x{h}" for t, h in params]


@pytest.mark.parametrize("round_scale,use_ue8m0", MODES, ids=["plain", "round_scale", "ue8m0"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_cast_matches_oracle_bit_for_bit(shape, round_scale, use_ue8m0):
    from deep_ep.utils import per_token_cast_to_fp8

    num_tokens, hidden = shape
    x = _input(num_tokens, hidden, hidden + num_tokens)
    if use_ue8m0 and hidden % 512 != 0:
        with pytest.raises(ValueError):  # 4 groups per int32: packing needs hidden % 512 == 0
            per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
        return
    data, scales = per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
    codes, want_scales = oracle.fp8_cast(x.float().numpy(), round_scale, use_ue8m0)
    seed_note = f"(DEEP_EP_TEST_SEED={base_seed()})"
    assert data.dtype == torch.float8_e4m3fn, f"data dtype {data.dtype}"
    assert tuple(data.shape) == (num_tokens, hidden)
    got_codes = data.contiguous().view(torch.uint8).numpy()
    mismatch = np.argwhere(got_codes != codes)
    assert mismatch.size == 0, (
        f"{len(mismatch)} FP8 codes differ from the oracle {seed_note}; first at {tuple(mismatch[0])}: "
        f"got {got_codes[tuple(mismatch[0])]:#04x}, expected {codes[tuple(mismatch[0])]:#04x}"
    )
    if use_ue8m0:
        assert scales.dtype == torch.int32, f"packed scales dtype {scales.dtype}, expected int32"
        assert tuple(scales.shape) == (num_tokens, hidden // 512)
    else:
        assert scales.dtype == torch.float32, f"scales dtype {scales.dtype}"
        assert tuple(scales.shape) == (num_tokens, hidden // 128)
    got_scales = scales.contiguous().numpy()
    assert np.array_equal(got_scales.view(np.uint32), want_scales.view(np.uint32)), (
        f"scales differ from the oracle {seed_note}: got {got_scales[:2, :4]}, expected {want_scales[:2, :4]}"
    )


@pytest.mark.parametrize("round_scale,use_ue8m0", MODES, ids=["plain", "round_scale", "ue8m0"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_cast_back_round_trip(shape, round_scale, use_ue8m0):
    from deep_ep.utils import per_token_cast_back, per_token_cast_to_fp8

    num_tokens, hidden = shape
    x = _input(num_tokens, hidden, 7 * hidden + num_tokens)
    if use_ue8m0 and hidden % 512 != 0:
        return  # rejected, see test_cast_matches_oracle_bit_for_bit
    data, scales = per_token_cast_to_fp8(x, round_scale=round_scale, use_ue8m0=use_ue8m0)
    back = per_token_cast_back(data, scales)
    assert tuple(back.shape) == (num_tokens, hidden)
    _, float_scales = oracle.fp8_cast(x.float().numpy(), round_scale, False)
    per_channel_scale = np.repeat(float_scales, 128, axis=1).astype(np.float64)
    x64 = x.double().numpy()
    # e4m3 keeps 3 mantissa bits (relative error <= 2^-4), subnormals step by scale * 2^-9,
    # and the result may be rounded to bf16 (2^-8) on the way out.
    tolerance = np.abs(x64) * (2.0**-4 + 2.0**-8) * 1.01 + per_channel_scale * 2.0**-9
    error = np.abs(back.double().numpy() - x64)
    bad = np.argwhere(error > tolerance)
    assert bad.size == 0, (
        f"{len(bad)} values off after the round trip (DEEP_EP_TEST_SEED={base_seed()}); first at {tuple(bad[0])}: "
        f"got {back.double().numpy()[tuple(bad[0])]}, expected {x64[tuple(bad[0])]}"
    )


def test_oracle_cast_agrees_with_torch_rounding():
    """Guards the oracle itself: its e4m3 rounding equals torch's RN conversion."""
    gen = torch.Generator().manual_seed(base_seed())
    values = (torch.randn(4096, generator=gen) * torch.exp2(torch.randint(-12, 9, (4096,), generator=gen).float()))
    values = values.clamp(-448, 448)
    torch_codes = values.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(oracle.float_to_e4m3_codes(values.numpy()), torch_codes)
