"""Tolerances on the scale of the values compared. A float32 result is rounded to a few ulps of the terms that make
it, and which few depends on the CPU (AVX2 and AVX-512 kernels add in different orders): an entry near zero, a
cancellation of larger terms, carries the rounding of the tensor's scale, not of its own size."""
import numpy as np
import pytest
import torch


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    """Every entry of a within rel x (|b| + max |b|) of b's."""
    return torch.allclose(a, b, rtol=rel, atol=rel * b.abs().max().item())


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float):
    """close(), with torch.testing's report of the entries that differ."""
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * b.abs().max().item())


def approx_scaled(expected, rel: float):
    """pytest.approx for numbers that share one scale, max |expected|: each may differ by rel of it."""
    return pytest.approx(expected, abs=rel * float(np.max(np.abs(expected))))
