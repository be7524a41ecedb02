"""The counter-based Gaussian sampler: the compiled kernel equals its numpy definition bit for bit,
any slice of a stream equals the same slice of the whole, and the values are standard normal."""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch

from dropup.convert import gauss


def _reference(key: int, first: int, n: int, mean: float, std: float) -> torch.Tensor:
    return torch.from_numpy(gauss.reference_values(key, first, n, mean, std))


@pytest.mark.parametrize("first,n", [(0, 1), (1, 1), (0, 2), (1, 2), (3, 1000), (0, 1 << 20),
                                     (12345, 777_777)])
def test_compiled_kernel_equals_numpy_definition(first, n):
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}) on this machine: only the numpy path exists here")
    assert gauss.backend() == "c", "a C compiler exists but the kernel did not build"
    for key, mean, std in ((0, 0.0, 1.0), (2**64 - 1, -0.013, 0.0217), (987654321, 3.5, 1e-3)):
        want = _reference(key, first, n, mean, std)
        got = gauss.gaussian(n, mean, std, key, first=first)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
        got16 = gauss.gaussian(n, mean, std, key, torch.bfloat16, first=first)
        assert torch.equal(got16.view(torch.int16), want.to(torch.bfloat16).view(torch.int16))


def test_value_depends_only_on_key_and_position():
    full = gauss.gaussian(5001, 0.0, 1.0, key=7)
    for first, n in ((0, 1), (1, 1), (1, 2), (2, 3), (999, 2), (4000, 1001)):
        assert torch.equal(gauss.gaussian(n, 0.0, 1.0, key=7, first=first), full[first:first + n])
    assert torch.equal(full, gauss.gaussian(5001, 0.0, 1.0, key=7))
    assert not torch.equal(full, gauss.gaussian(5001, 0.0, 1.0, key=8))


def test_shapes_dtypes_and_out():
    z = gauss.gaussian((64, 33), 0.5, 2.0, key=3)
    assert z.shape == (64, 33) and z.dtype == torch.float32
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        # every dtype is the float32 values rounded once
        assert torch.equal(gauss.gaussian((64, 33), 0.5, 2.0, 3, dt), z.to(dt))
    buf = torch.empty(64, 33, dtype=torch.bfloat16)
    assert gauss.gaussian((64, 33), 0.5, 2.0, 3, out=buf) is buf
    assert torch.equal(buf, z.to(torch.bfloat16))
    with pytest.raises(ValueError):
        gauss.gaussian((64, 33), 0.0, 1.0, 3, out=torch.empty(33, 64).t())


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def test_values_are_standard_normal():
    n = 1 << 22
    z = gauss.gaussian(n, 0.0, 1.0, key=2024).double()
    se = 1.0 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1.0) < 5 * math.sqrt(2.0) * se
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15.0) * se  # skewness
    assert abs((z**4).mean().item() - 3.0) < 5 * math.sqrt(96.0) * se  # kurtosis
    # Kolmogorov-Smirnov distance to N(0, 1); 1.95 / sqrt(n) is the 0.1% critical value
    s = z.sort().values
    cdf = _normal_cdf(s)
    ecdf_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    d = torch.maximum(ecdf_hi - cdf, cdf - (ecdf_hi - 1.0 / n)).max().item()
    assert d < 1.95 * se, d
    # tails, where a poor uniform-to-normal transform shows first
    for k in (2.0, 3.0, 4.0, 4.5):
        p = 2.0 * (1.0 - _normal_cdf(torch.tensor(k, dtype=torch.float64)).item())
        got = (z.abs() > k).double().mean().item()
        assert abs(got - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-7, (k, got, p)
    assert z.abs().max().item() < 6.8  # the radius cannot exceed sqrt(2 * 33 * ln 2)


def test_no_correlation_within_and_between_streams():
    n = 1 << 20
    a = gauss.gaussian(n, 0.0, 1.0, key=11).double()
    b = gauss.gaussian(n, 0.0, 1.0, key=12).double()
    bound = 5.0 / math.sqrt(n)

    def corr(x, y):
        return torch.corrcoef(torch.stack([x, y]))[0, 1].item()

    assert abs(corr(a[0::2], a[1::2])) < bound * math.sqrt(2)  # the two values of a pair
    assert abs(corr(a[:-1], a[1:])) < bound  # neighbours
    assert abs(corr(a[:-2], a[2:])) < bound  # neighbouring pairs
    assert abs(corr(a, b)) < bound  # streams of neighbouring keys
    # squares too: Box-Muller pairs share a radius, and a weak hash would show here
    assert abs(corr(a[0::2] ** 2, a[1::2] ** 2)) < bound * math.sqrt(2) * 3


def test_numpy_path_is_chunked_like_the_kernel():
    # the fallback walks a long stream in chunks; chunk edges must not show in the values
    n = 2 * gauss._CHUNK + 3
    whole = _reference(5, 1, n, 0.0, 1.0)
    parts = torch.cat([_reference(5, 1, 1000, 0.0, 1.0), _reference(5, 1001, n - 1000, 0.0, 1.0)])
    assert torch.equal(whole, parts)
    assert np.isfinite(whole.numpy()).all()
