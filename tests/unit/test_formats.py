"""Pure integer-format math."""

import pytest
import torch

from viditq_diffusers.quant.formats import (
    dequantize_weight, pack_int4, quantize_activation_per_token, quantize_weight, unpack_int4,
)


@pytest.mark.parametrize("in_features", [7, 8, 33])
def test_int4_pack_roundtrip(in_features):
    codes = torch.randint(-8, 8, (5, in_features), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (in_features + 1) // 2)
    assert torch.equal(unpack_int4(packed, in_features), codes)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_weight_rounding_error_is_half_a_step(bits, group_size, symmetric):
    w = torch.randn(6, 64) * torch.linspace(0.1, 3, 64)
    codes, scale, zero = quantize_weight(w, bits, group_size, symmetric)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and codes.min() >= lo and codes.max() <= hi
    assert scale.shape == (6, 64 // (group_size or 64)) and scale.dtype == torch.float32
    assert (zero is None) == symmetric
    err = (dequantize_weight(codes, scale, zero) - w).abs()
    step = scale.repeat_interleave(group_size or 64, dim=1)
    assert (err <= step / 2 + 1e-6).all()
    # fewer bits, coarser grid: the error is really that of a `bits`-bit grid
    assert err.max() > step.min() / 100


def test_asymmetric_zero_maps_exactly_and_all_zero_row_is_safe():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    codes, scale, zero = quantize_weight(w, 4)
    deq = dequantize_weight(codes, scale, zero)
    assert torch.isfinite(deq).all() and deq[0].abs().max() == 0 and deq[1, 0] == 0


def test_activation_per_token_round_half_even_and_zero_rows():
    x = torch.tensor([[0.0, 0.0, 0.0], [127.0, 0.5, 1.5], [-254.0, 3.0, 1.0]])
    codes, scale = quantize_activation_per_token(x)
    assert torch.isfinite(scale).all() and codes[0].abs().max() == 0 and scale[0] == 0
    assert codes[1].tolist() == [127, 0, 2]  # 0.5 -> 0 and 1.5 -> 2: half to even
    assert codes[2].tolist() == [-127, 2, 0]  # 3/2 = 1.5 -> 2, 1/2 = 0.5 -> 0
    assert scale[2].item() == pytest.approx(2.0)


def test_bits_and_group_errors():
    with pytest.raises(ValueError, match="group_size=5 does not divide in_features=64"):
        quantize_weight(torch.randn(2, 64), 8, group_size=5)
