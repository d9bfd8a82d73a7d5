"""The CPU rotation (`kernels/cpu_balance.py`): `quant.channel_balance.balance_activation` bit for bit, with and without
smoothing, for powers of two and orders with a dense Paley factor, fp32 and bf16; and a rotated layer's forward
through the dispatch equals the torch path.

On an x86 CPU with AVX2 the extension must build here (a C++ compiler and ninja are part of the test setup), so
a failed build fails these tests instead of skipping them."""

import pytest
import torch

from viditq_diffusers import ViDiTQLinear
from viditq_diffusers.kernels import balance_reason, cpu_balance
from viditq_diffusers.layer_spec import LayerSpec
from viditq_diffusers.quant.channel_balance import balance_activation
from tests.support.cpu import X86_AVX2

pytestmark = pytest.mark.skipif(not X86_AVX2, reason="the C++ CPU kernels are built for x86 CPUs with AVX2")


def test_the_extension_builds_here():
    assert cpu_balance.available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 128), (7, 96), (300, 1152), (9, 4608), (5, 64), (4, 2), (3, 12), (6, 4)])
@pytest.mark.parametrize("smoothed", [False, True])
def test_equals_balance_activation_bit_for_bit(dtype, m, k, smoothed):
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(m, k, generator=g) * torch.linspace(0.01, 50, k)).to(dtype)
    x[0, : min(3, k)] = 0.0
    smooth = torch.rand(k, generator=g) + 0.5 if smoothed else None
    for seed in (0, 7):
        assert torch.equal(cpu_balance.balance_activation(x, smooth, seed), balance_activation(x, smooth, seed))


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
