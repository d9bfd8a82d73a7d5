"""The CPU balancing pass (`kernels/cpu_balance.py`): `quant.channel_balance.balance_activation_kernel_order` bit for
bit, with and without smoothing, for powers of two and orders with a dense Paley factor, fp32 and bf16, NaN and Inf
rows, strided inputs, on its AVX-512 and its AVX2 code; and a rotated layer's forward through the dispatch equals
the torch path.

On an x86 CPU with AVX2 the extension must build here (a C++ compiler and ninja are part of the test setup), so
a failed build fails these tests instead of skipping them."""

import pytest
import torch

from viditq_diffusers import ViDiTQLinear
from viditq_diffusers.kernels import balance_reason, cpu_balance
from viditq_diffusers.layer_spec import LayerSpec
from viditq_diffusers.quant import hadamard
from viditq_diffusers.quant.channel_balance import balance_activation, balance_activation_kernel_order
from tests.support.cpu import X86_AVX2

pytestmark = pytest.mark.skipif(not X86_AVX2, reason="the C++ CPU kernels are built for x86 CPUs with AVX2")


def test_the_extension_builds_here():
    assert cpu_balance.available()


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal values, signed zeros and Inf included, NaN at the same places (NaN payloads may differ)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    assert torch.equal(actual[~nan], expected[~nan]) and torch.equal(actual[~nan].signbit(), expected[~nan].signbit())


def rows_for(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Random rows of growing channel scale; row 0 has zeros and -0, and (m > 4) NaN and +-Inf rows."""
    g = torch.Generator().manual_seed(k + m)
    x = torch.randn(m, k, generator=g) * torch.linspace(0.01, 50, k)
    x[0, : min(3, k)] = 0.0
    x[0, -1] = -0.0
    if m > 4:
        x[1, k // 2] = float("nan")
        x[2, k - 1] = float("inf")
        x[3, 0], x[3, k // 3] = float("-inf"), float("inf")
        x[4] = 3e38  # overflows to Inf inside the sums
    return x.to(dtype)


# (p, 2^k): 1152 = 36 x 32, 3072 = 12 x 256, 4608 = 36 x 128 (the DiT widths), 192 = 12 x 16 and 96 = 12 x 8
# (the dense factor on one or two 8-lane vectors), 24 = 12 x 2 and 12 (scalar), powers of two (no dense factor).
@pytest.mark.parametrize("avx512", [True, False], ids=["avx512-if-here", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 128), (7, 96), (301, 1152), (9, 4608), (5, 3072), (5, 64), (4, 2), (3, 12),
                                 (6, 4), (11, 192), (13, 24)])
@pytest.mark.parametrize("smoothed", [False, True])
def test_equals_the_kernel_order_reference_bit_for_bit(avx512, dtype, m, k, smoothed):
    x = rows_for(m, k, dtype)
    smooth = torch.rand(k, generator=torch.Generator().manual_seed(1)) + 0.5 if smoothed else None
    for seed in (0, 7):
        assert_same_bits(cpu_balance.balance_activation(x, smooth, seed, avx512),
                         balance_activation_kernel_order(x, smooth, seed))


def test_the_dense_factor_is_exercised():
    """The widths above that have a dense factor (p > 1), and that it changes the bits of the matmul order."""
    assert [hadamard._split_order(k) for k in (1152, 3072, 4608, 192, 96, 24)] == [
        (36, 32), (12, 256), (36, 128), (12, 16), (12, 8), (12, 2)]
    x = rows_for(64, 1152, torch.float32)[5:]
    assert not torch.equal(balance_activation_kernel_order(x, None, 0), balance_activation(x, None, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_inputs(dtype):
    wide = rows_for(9, 2 * 1152, dtype)
    for x in (wide[:, :1152], wide[:, ::2], wide[::2, 1152:], wide.reshape(2 * 1152, 9).T[:, :1152],
              wide[:1, :1152].expand(5, 1152)):
        assert not x.is_contiguous() or x.shape[0] == 1
        assert_same_bits(cpu_balance.balance_activation(x, None, 3), balance_activation_kernel_order(x, None, 3))


def test_no_rows():
    x = torch.empty(0, 1152)
    assert cpu_balance.balance_activation(x, torch.ones(1152), 3).shape == (0, 1152)


def test_a_bad_smoothing_vector_gets_the_same_error():
    with pytest.raises(ValueError, match="one per input channel"):
        cpu_balance.balance_activation(torch.randn(4, 64), torch.ones(63), 0)


def test_dispatch_rules(monkeypatch):
    x = torch.randn(8, 64)
    assert balance_reason(True, x) is None
    assert balance_reason(False, x).startswith("no rotation")  # smoothing alone stays one torch multiply
    assert "float32 and bfloat16 only" in balance_reason(True, x.half())  # fp16 rounds differently: torch
    assert balance_reason(True, torch.randn(2, 8, 64)) == "not a 2-D input"  # the op sees 2-D inputs only
    monkeypatch.setenv("VIDITQ_KERNELS", "torch")
    assert "VIDITQ_KERNELS=torch" in balance_reason(True, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rotated_layer_equals_the_torch_path(dtype, monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(1152, 96).to(dtype)
    spec = LayerSpec.for_linear(linear, 8, 8, smooth_alpha=0.5, rotation_seed=3)
    layer = ViDiTQLinear.from_linear(linear, spec, torch.rand(1152) + 0.5)
    assert layer.rotation_seed == 3 and layer.act_smooth is not None
    x = torch.randn(2, 40, 1152, dtype=dtype)
    fast = layer(x)
    monkeypatch.setenv("VIDITQ_KERNELS", "torch")
    assert torch.equal(fast, layer(x))
