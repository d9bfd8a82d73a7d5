"""Random quantized weights for the CPU kernel tests (test_cpu_amx, test_cpu_direct, test_cpu_int16)."""

import torch

from viditq_diffusers.quant.formats import pack_int4, quantize_weight


def random_weights(bits, n, k, seed=0, symmetric=False, per_tensor=False):
    """(int8 codes [n, k], the codes as a layer stores them (packed two per byte for W4), scale, zero) of a
    random [n, k] weight, shifted by 0.7 unless symmetric so that the zero points are far from 0."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) + (0 if symmetric else 0.7)
    codes, scale, zero = quantize_weight(w, bits, None, symmetric, per_tensor)
    return codes, (pack_int4(codes) if bits == 4 else codes), scale, zero
