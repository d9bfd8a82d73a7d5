"""The oneDNN CPU path: bit-identical to the exact torch path wherever the dispatch takes it, and never
fed what this CPU's oneDNN would saturate on (8-bit weights on AVX2 without VNNI go split in 4-bit halves)."""

import pytest
import torch

from viditq_diffusers import ViDiTQLinear
from viditq_diffusers.kernels import LayerCall, onednn, route
from viditq_diffusers.kernels.torch_ops import linear_int
from viditq_diffusers.layer_spec import LayerSpec
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
    symmetric_w8 = LayerCall(512, 64, 8, 8)  # where direct W8 saturates, symmetric W8 goes split too
    assert (route("onednn_split").applies(symmetric_w8, xq.float()) is None) == (not onednn.exact_for(8))
    assert (route("onednn_direct").applies(symmetric_w8, xq.float()) is None) == onednn.exact_for(8)
    assert onednn.exact_split()  # 2 x 255 x 16 never saturates int16


@pytest.mark.parametrize("m,k,n", [(1, 64, 8), (7, 63, 5), (300, 1152, 96), (17, 4608, 24)])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_w8_matches_the_exact_torch_path_bit_for_bit(m, k, n, per_tensor, symmetric):
    codes, scale, zero, qweight = weights(8, n, k, k, per_tensor, symmetric)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 6, k)
    bias = torch.randn(n)
    layer = LayerCall.of_op(x, qweight, 8, scale, zero, 8, None, None, None)
    split = not symmetric or not onednn.exact_for(8)
    taken = route("onednn_split" if split else "onednn_direct")
    assert taken.applies(layer, x) is None
    assert route("onednn_direct" if split else "onednn_split").applies(layer, x) is not None
    out = taken.run(x, qweight, 8, scale, zero, bias, 8, None, None, None)
    assert torch.equal(out, linear_int(x, codes, scale, zero, bias, 8))


def test_split_w8_is_exact_at_the_widest_codes():
    """code - zero at -255 and +255 (halves -16 and 15), activations at +-127 and -128, K at the limit."""
    k, g = onednn.SPLIT_MAX_K, torch.Generator().manual_seed(5)
    codes = torch.where(torch.rand(6, k, generator=g) < 0.5, -128, 127).to(torch.int8)
    zero = torch.tensor([[127], [-128], [127], [-128], [0], [5]], dtype=torch.int8)
    xq = torch.where(torch.rand(5, k, generator=g) < 0.5, -127, 127).to(torch.int8)
    xq[0] = -128
    xq[1] = torch.where(codes[0] - zero[0, 0].to(torch.int16) < 0, -128, 127)  # the largest possible |sum|
    x_scale, scale = torch.ones(5, 1), torch.ones(6, 1)
    out = onednn.linear_onednn(xq, x_scale, codes, 8, scale, zero, None, torch.float32, split=True)
    exact = (xq.double() @ (codes.double() - zero.double()).T).to(torch.int64)
    assert exact.abs().max() > 2**26  # each half's sum near 2^24, where an fp32 sum of the halves would round
    assert torch.equal(out, exact.to(torch.float32))  # the int32 accumulator, converted once (as the torch path)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_module_forward_equals_the_torch_path(bits, symmetric, monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    layer = ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, bits, 8, symmetric=symmetric))
    x = torch.randn(2, 21, 96) * torch.linspace(0.2, 4, 96)
    fast = layer(x)
    monkeypatch.setenv("VIDITQ_KERNELS", "torch")
    assert torch.equal(fast, layer(x))


def test_routes_keep_groups_wide_split_w8_and_a16_off_onednn():
    x = torch.randn(20, 128)

    def onednn_route(layer, x):
        return [name for name in ("onednn_direct", "onednn_split") if route(name).applies(layer, x) is None]

    assert onednn_route(LayerCall(128, 8, 4, 8), x) == ["onednn_direct"]
    assert onednn_route(LayerCall(128, 8, 4, 8, asymmetric=True), x) == ["onednn_direct"]  # code - zero fits int8
    assert onednn_route(LayerCall(128, 8, 8, 8, asymmetric=True), x) == ["onednn_split"]  # it does not for W8
    assert onednn_route(LayerCall(128, 8, 4, 8, static_act_scale=True), x) == ["onednn_direct"]  # static: fine
    assert route("onednn_direct").applies(LayerCall(128, 8, 4, 8, groups=2), x) == "group-wise weights"
    wide = torch.randn(2, onednn.SPLIT_MAX_K + 1)
    assert "could round in fp32" in route("onednn_split").applies(LayerCall(wide.shape[1], 8, 8, 8, asymmetric=True),
                                                                   wide)
    assert onednn_route(LayerCall(wide.shape[1], 8, 4, 8, asymmetric=True), wide) == ["onednn_direct"]
    assert onednn_route(LayerCall(128, 8, 4, 16), x) == []  # A16


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
