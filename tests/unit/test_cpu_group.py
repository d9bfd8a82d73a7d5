"""Group-wise weight scales on the int16 CPU kernel (route `cpu_group`, `cpu_int16.linear_grouped`): bit for bit the
torch path (`torch_ops.linear_int`: per group the exact int32 sum, converted to fp32, times the group's scale, added
in group order), on each microkernel, W8 and W4, symmetric or not, group sizes 32 / 64 / 128, fp32 and bf16
inputs, NaN and Inf rows.

On an x86 CPU with AVX2 the kernel must build here, so a failed build fails these tests instead of skipping them."""

import pytest
import torch

from viditq_diffusers import kernels
from viditq_diffusers.kernels import LayerCall, cpu_int16, select_route
from viditq_diffusers.kernels.torch_ops import linear_int
from viditq_diffusers.quant.formats import pack_int4, quantize_weight
from tests.support.cpu import X86_AVX2
from tests.support.kernel_routes import assert_route_matches
from tests.support.quantized_weights import random_weights

pytestmark = pytest.mark.skipif(not X86_AVX2, reason="the int16 kernel is for x86 CPUs with AVX2")


def grouped_weights(bits, n, k, size, symmetric, seed=0):
    """(int8 codes, the codes as a layer stores them, scale [n, k / size], zero or None) of a random weight."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) + (0 if symmetric else 0.7)
    codes, scale, zero = quantize_weight(w, bits, size, symmetric, False)
    return codes, (pack_int4(codes) if bits == 4 else codes), scale, zero


def inputs(m, k, dtype, seed=1):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.1, 6, k)
    x[0, :5] = 0.0  # exact zeros
    return x.to(dtype)


def test_warmup_loads_the_kernel_on_every_avx2_cpu():
    """Group-wise layers need the int16 kernel also where oneDNN is exact for W8 (VNNI / AMX)."""
    assert kernels.warmup(verbose=False)[cpu_int16.NAME] is None
    assert cpu_int16.available()


@pytest.fixture(params=["avx2", "vnni"])
def microkernel(request):
    """Each GEMM microkernel this CPU has: `vpmaddwd` + `vpaddd` (every AVX2 CPU); with AVX-512 VNNI `vpdpwssd`, and
    `vpdpbusd` on the int8 layout where `code - zero` fits int8."""
    kernels.warmup(verbose=False)
    ext = cpu_int16.extension()
    default = ext.microkernel("")
    try:
        ext.microkernel(request.param)
    except RuntimeError:
        pytest.skip(f"no {request.param} on this CPU")
    yield request.param
    ext.microkernel(default)


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_torch_path_bit_for_bit(size, bits, symmetric, dtype, microkernel):
    shapes = [(1, 128, 16), (3, 256, 48), (4, 1152, 16), (17, 1152, 1152), (64, 256, 48), (64, 1152, 48)]
    for i, (m, k, n) in enumerate(shapes):
        codes, qweight, scale, zero = grouped_weights(bits, n, k, size, symmetric, seed=i)
        x = inputs(m, k, dtype, seed=i)
        int8_layout = cpu_int16.packed_grouped_weight(qweight, bits, k, k // size, zero)[1] is not None
        assert int8_layout == (microkernel == "vnni" and (bits == 4 or symmetric))  # vpdpbusd where code - zero fits
        for bias in (torch.randn(n), None):
            out = cpu_int16.linear_grouped(x, qweight, bits, scale, zero, bias)
            assert out.dtype == dtype
            assert torch.equal(out, linear_int(x, codes, scale, zero, bias, 8)), (m, k, n, bias is None)


@pytest.mark.parametrize("m,k,n", [(1, 1152, 1152), (17, 128, 48), (64, 1152, 16)])
def test_more_shapes_at_group_size_64(m, k, n):
    kernels.warmup(verbose=False)
    codes, qweight, scale, zero = grouped_weights(4, n, k, 64, False)
    x = inputs(m, k, torch.float32)
    assert torch.equal(cpu_int16.linear_grouped(x, qweight, 4, scale, zero, None),
                       linear_int(x, codes, scale, zero, None, 8))


@pytest.mark.parametrize("bits", [8, 4])
def test_rows_past_one_l2_chunk(bits, microkernel):
    """At K = 4608 the kernel walks the rows in chunks whose activations stay in L2 (56 to 224 rows on 512 KB to
    2 MB L2s): 300 rows (a ragged last panel) span several chunks, each with its own K-block partial sums."""
    m, k, n = 301, 4608, 40
    codes, qweight, scale, zero = grouped_weights(bits, n, k, 64, False, seed=7)
    x = inputs(m, k, torch.float32, seed=7)
    assert torch.equal(cpu_int16.linear_grouped(x, qweight, bits, scale, zero, None),
                       linear_int(x, codes, scale, zero, None, 8))


def test_exact_at_the_widest_codes_over_many_groups(microkernel):
    """Codes +-127 against `code - zero` at -255 / +255, K = 4608 in groups of 128 (36 groups, 4 K blocks): each
    group's int32 sum is exact, and the fp32 group sums add in the torch path's order."""
    k, g = 4608, torch.Generator().manual_seed(5)
    codes = torch.where(torch.rand(4, k, generator=g) < 0.5, -128, 127).to(torch.int8)
    zero = torch.tensor([127, -128, 0, 5], dtype=torch.int8).reshape(4, 1).expand(4, k // 128).contiguous()
    d = codes.to(torch.int64) - zero.repeat_interleave(128, dim=1).to(torch.int64)
    x = torch.where(d < 0, -127.0, 127.0)
    scale = torch.rand(4, k // 128, generator=g) + 0.5
    out = cpu_int16.linear_grouped(x, codes, 8, scale, zero, None)
    assert torch.equal(out, linear_int(x, codes, scale, zero, None, 8))
    # without zero points (the int8 layout under VNNI): codes -128 / 127 against activation codes +-127
    x = torch.where(codes < 0, -127.0, 127.0)
    out = cpu_int16.linear_grouped(x, codes, 8, scale, None, None)
    assert torch.equal(out, linear_int(x, codes, scale, None, None, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_rows_give_the_torch_paths_outputs(dtype, microkernel):
    codes, qweight, scale, zero = grouped_weights(4, 48, 256, 64, False)
    x = inputs(8, 256, torch.float32)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    x[3, 9] = float("-inf")
    x[4] = float("inf")
    x[5, 3], x[5, 200] = float("inf"), float("-inf")
    x[6] = 0.0
    x = x.to(dtype)
    bias = torch.randn(48)
    expected = linear_int(x, codes, scale, zero, bias, 8)
    assert torch.isnan(expected[1]).all() and not torch.isfinite(expected[2:6]).any()
    assert_route_matches("cpu_group", cpu_int16.linear_grouped(x, qweight, 4, scale, zero, bias), expected)


def test_per_channel_w8_on_both_microkernels(microkernel):
    """The per-channel int16 route runs the same microkernel."""
    codes, _, scale, zero = random_weights(8, 40, 1152)
    x = inputs(17, 1152, torch.float32)
    assert torch.equal(cpu_int16.linear_int16(x, codes, scale, zero, None), linear_int(x, codes, scale, zero, None, 8))


def test_w4a8_g64_takes_the_route():
    kernels.warmup(verbose=False)
    _, qweight, scale, zero = grouped_weights(4, 1152, 1152, 64, False)
    x = torch.randn(16, 1152)
    call = LayerCall.of_op(x, qweight, 4, scale, zero, 8, None, None, None)
    assert call.label == "W4A8-g64" and select_route(call, x).name == "cpu_group"
