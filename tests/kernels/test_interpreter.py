"""The interpreter's fp32 -> bf16 conversion rounds to nearest even, as PyTorch and GPUs do."""

import pytest
import torch

from optimum_disc.kernels import interpreted
from optimum_disc.kernels.interpreter import bf16_bits_rounded_to_nearest_even
from optimum_disc.kernels.matmul import linear


def test_bits_match_torch(seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)
    ties = torch.tensor(
        [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2.0**-130 * 3], dtype=torch.float32
    )
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4e38, 1e-45])
    x = torch.cat([x, ties, specials])
    want = x.to(torch.bfloat16).view(torch.int16).numpy().view("uint16")
    got = bf16_bits_rounded_to_nearest_even(x.numpy())
    nan = torch.isnan(x).numpy()
    assert (got[~nan] == want[~nan]).all(), f"seed={seed}"
    assert torch.isnan(torch.from_numpy(got[nan].view("int16")).view(torch.bfloat16)).all()


@pytest.mark.skipif(not interpreted(), reason="the interpreter's conversion")
def test_kernel_outputs_round_to_nearest():
    # Each output sums 1 + 2**-8 + 2**-12 exactly in fp32: above the midpoint between 1 and the
    # next bf16 value, 1 + 2**-7. Truncation gives 1, rounding to nearest 1 + 2**-7.
    x = torch.zeros(4, 16, dtype=torch.bfloat16)
    x[:, :3] = torch.tensor([1.0, 2**-8, 2**-12], dtype=torch.bfloat16)
    w = torch.zeros(8, 16, dtype=torch.bfloat16)
    w[:, :3] = 1.0
    y = linear(x, w)
    assert y.dtype == torch.bfloat16 and (y.float() == 1 + 2**-7).all(), y
