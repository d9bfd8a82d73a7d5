"""The oneDNN CPU path: bit-identical to the exact torch path wherever the dispatch takes it, and never
taken where this CPU's oneDNN would saturate (8-bit weights on AVX2 without VNNI)."""

import pytest
import torch

from viditq_diffusers import ViDiTQLinear
from viditq_diffusers.kernels import onednn, use_onednn
from viditq_diffusers.kernels.torch_ops import linear_int
from viditq_diffusers.quant.formats import pack_int4, quantize_activation_per_token, quantize_weight

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN (mkldnn) int8 ops")


def weights(bits, n, k, seed=0, per_tensor=False, symmetric=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) + (0 if symmetric else 0.7)  # shifted: zero points far from 0
    codes, scale, zero = quantize_weight(w, bits, None, symmetric, per_tensor)
    return codes, scale, zero, (pack_int4(codes) if bits == 4 else codes)


@pytest.mark.parametrize("m,k,n", [(1, 64, 8), (7, 63, 5), (300, 1152, 96), (17, 4608, 24)])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_w4_matches_the_exact_torch_path_bit_for_bit(m, k, n, per_tensor, symmetric):
    assert onednn.exact_for(4)  # 2 x 255 x 15 never saturates int16: exact on every x86 ISA level
    codes, scale, zero, qweight = weights(4, n, k, k, per_tensor, symmetric)
    assert (zero is None) == symmetric
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 6, k)
    bias = torch.randn(n)
    xq, x_scale = quantize_activation_per_token(x, 8)
    out = onednn.linear_onednn(xq, x_scale, qweight, 4, scale, zero, bias, torch.float32)
    assert torch.equal(out, linear_int(x, codes, scale, zero, bias, 8))


def test_w8_goes_through_onednn_only_where_it_is_exact():
    """Extreme codes in every pair: the probe's verdict must agree with a fresh, larger product."""
    g = torch.Generator().manual_seed(3)
    codes = torch.where(torch.rand(64, 512, generator=g) < 0.5, -127, 127).to(torch.int8)
    xq = torch.where(torch.rand(40, 512, generator=g) < 0.5, -127, 127).to(torch.int8)
    out = onednn.gemm(xq, torch.ops.onednn.qlinear_prepack(codes, None), torch.ones(64),
                      torch.zeros(64, dtype=torch.int64))
    assert torch.equal(out.double(), xq.double() @ codes.double().T) == onednn.exact_for(8)
    x, scale = torch.randn(32, 512), torch.ones(64, 1)
    assert use_onednn(x, 8, 8, scale, None) == onednn.exact_for(8)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_module_forward_equals_the_torch_path(bits, symmetric, monkeypatch):
    torch.manual_seed(0)
    layer = ViDiTQLinear.from_linear(torch.nn.Linear(96, 40), bits, 8, None, symmetric=symmetric)
    x = torch.randn(2, 21, 96) * torch.linspace(0.2, 4, 96)
    fast = layer(x)
    monkeypatch.setenv("VIDITQ_KERNELS", "torch")
    assert torch.equal(fast, layer(x))


def test_dispatch_keeps_groups_asymmetric_w8_and_a16_on_the_torch_path():
    x, zero = torch.randn(20, 128), torch.zeros(8, 1, dtype=torch.int8)
    assert use_onednn(x, 4, 8, torch.ones(8, 1), None) and use_onednn(x, 4, 8, torch.ones(8, 1), zero)
    assert not use_onednn(x, 4, 8, torch.ones(8, 2), None)  # group-wise scales
    assert not use_onednn(x, 8, 8, torch.ones(8, 1), zero)  # code - zero does not fit int8
    assert not use_onednn(x, 4, 16, torch.ones(8, 1), None)


def test_the_packed_weight_follows_in_place_changes():
    codes, scale, zero, qweight = weights(4, 16, 64, symmetric=False)
    x = torch.randn(9, 64)
    xq, x_scale = quantize_activation_per_token(x, 8)
    first = onednn.linear_onednn(xq, x_scale, qweight, 4, scale, zero, None, torch.float32)
    new_codes = -codes.clamp(-7, 7)
    qweight.copy_(pack_int4(new_codes))  # e.g. load_state_dict into an existing layer
    second = onednn.linear_onednn(xq, x_scale, qweight, 4, scale, zero, None, torch.float32)
    assert not torch.equal(first, second)
    assert torch.equal(second, linear_int(x, new_codes, scale, zero, None, 8))
    zero.add_(1).clamp_(-8, 7)  # the zero points too
    third = onednn.linear_onednn(xq, x_scale, qweight, 4, scale, zero, None, torch.float32)
    assert torch.equal(third, linear_int(x, new_codes, scale, zero, None, 8))
