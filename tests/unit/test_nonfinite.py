"""NaN and Inf through every kernel route this machine can run (issue 25, BAD 1): the same outputs as the torch path
(`tests/support/kernel_routes.py` states the contract), and a torch path that never makes them finite.

What the quantized linear does with them (`quant.formats.round_to_codes`): a row holding a NaN gets a NaN token
scale, so its whole output row is NaN; a row holding an Inf (and no NaN) gets an Inf scale, its +-Inf saturate
to the code limits and the rest round to 0 (or +-1 next to the largest floats), so each output is +-Inf with the
sign of FP's `Inf * w` (NaN where the integer sum is 0). Static activation scales do not clip such rows: they take
their per-token scale. A NaN or Inf weight scale (a hand-edited checkpoint) makes its output channel NaN or +-Inf.

Triton runs under its CPU interpreter here (tests/conftest.py); the AMX kernel's GEMM only on CPUs with AMX, its
quantization (AVX-512) wherever AVX-512 is."""

import os

import pytest
import torch

from viditq_diffusers import ViDiTQLinear
from viditq_diffusers.kernels import (ROUTE_NAMES, LayerCall, cpu_amx, cpu_build, cpu_vnni, select_route,
                                      triton_available)
from viditq_diffusers.kernels.cpu_flags import cpu_model_and_flags
from viditq_diffusers.layer_spec import LayerSpec
from viditq_diffusers.quant.formats import quantize_activation_per_token, quantize_activation_static
from tests.support.kernel_routes import (assert_route_matches, assert_same_nonfinite, interpreter_exact_rows, run_route,
                                         runnable_routes, torch_path, triton_reference)

NAN, INF = float("nan"), float("inf")
K, N = 64, 8


def nonfinite_input(dtype: torch.dtype, k: int = K) -> tuple[torch.Tensor, dict[str, int]]:
    """Rows: ordinary, zero, NaN, Inf and huge finite ones (`k` channels); {what: row}."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, k, generator=g) * 2
    rows = {}

    def row(what, **cols):
        i = len(rows) + 1  # row 0 stays ordinary
        rows[what] = i
        for col, value in cols.items():
            x[i, int(col[1:])] = value
        return i

    x[row("zero")] = 0.0
    x[row("all NaN")] = NAN
    row("one NaN", c5=NAN)
    row("one +Inf", c7=INF)
    row("one -Inf", c7=-INF)
    x[row("all +Inf")] = INF
    row("+Inf and -Inf", c3=INF, c9=-INF)
    row("NaN and Inf", c3=NAN, c9=INF)
    row("3e38", c2=3e38)
    x[row("all +-3e38")] = torch.where(torch.arange(k) % 3 == 0, -3e38, 3e38)
    row("-Inf next to 2e38", c4=-INF, c11=2e38)
    x[row("subnormal")] = 1e-40
    row("1e30 (beyond fp16)", c0=1e30)
    return x.to(dtype), rows


def layer_for(bits, symmetric, static, balance, group=None, hand_edited=False, dtype=torch.float32, k=K):
    torch.manual_seed(bits + 2 * symmetric)
    linear = torch.nn.Linear(k, N)
    spec = LayerSpec.for_linear(linear, bits, 8, group, symmetric, act_scale=0.05 if static else None,
                                smooth_alpha=0.5 if balance != "none" else None,
                                rotation_seed=3 if balance == "smooth+rotate" else None)
    layer = ViDiTQLinear.from_linear(linear, spec, torch.rand(k) + 0.5 if balance != "none" else None).to(dtype)
    if hand_edited:  # a NaN and an Inf weight scale, as a hand-edited checkpoint could hold
        scales = layer.scales().clone()
        scales[1, 0], scales[2, -1] = NAN, INF
        layer.weight_scale = scales.view(torch.int32)
    return layer


def op_args(layer, x):
    act_scale = None if layer.act_scale is None else torch.tensor(layer.act_scale)
    return (x, layer.qweight, layer.weight_bits, layer.scales(), layer.weight_zero, layer.bias, act_scale,
            layer.smoothing(), layer.rotation_seed)


def check_every_route(layer, x, monkeypatch, what):
    args = op_args(layer, x)
    expected = torch_path(*args, monkeypatch=monkeypatch)
    call = LayerCall.of_op(x, layer.qweight, layer.weight_bits, layer.scales(), layer.weight_zero, 8, args[6],
                           args[7], args[8])
    names = runnable_routes(call)
    assert select_route(call, x).name in names, "the route this call takes here is among those tested"
    for name in names:
        if name == "triton":
            reference = triton_reference(*args[:6], args[7], args[8])  # = expected where nothing is rotated
            rows = interpreter_exact_rows(x)
            assert_route_matches(name, run_route(name, *args)[rows], reference[rows], what)
        else:
            assert_route_matches(name, run_route(name, *args), expected, what)
    return expected


def test_every_route_that_can_run_here_is_exercised():
    """The calls above reach every route of the table this machine can run (each call's own pick included, which
    `check_every_route` asserts); those they do not reach cannot run here."""
    reached = set()
    for bits in (8, 4):
        for symmetric in (False, True):
            for static in (False, True):
                for groups in (1, 2):
                    reached.update(runnable_routes(LayerCall(K, N, bits, 8, groups, not symmetric, static)))
    missing = set(ROUTE_NAMES) - reached
    assert missing <= {"cpu_amx", "cpu_vnni", "triton"}, missing
    assert "cpu_amx" not in missing or not cpu_amx.available()
    assert "cpu_vnni" not in missing or not cpu_vnni.available()
    assert "triton" not in missing or not triton_available() or os.environ.get("TRITON_INTERPRET") != "1"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("balance", ["none", "smooth", "smooth+rotate"])
@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [8, 4])
def test_every_route_gives_the_torch_paths_nan_and_inf(bits, symmetric, static, balance, dtype, monkeypatch):
    x, rows = nonfinite_input(dtype)
    layer = layer_for(bits, symmetric, static, balance, dtype=dtype)
    y = check_every_route(layer, x, monkeypatch, f"W{bits} {balance} {dtype}")
    nan_rows = [rows["all NaN"], rows["one NaN"], rows["NaN and Inf"]]
    assert torch.isnan(y[nan_rows]).all(), "a NaN in a row makes its whole output row NaN"
    assert torch.isfinite(y[[0, rows["zero"], rows["subnormal"]]]).all()
    inf_rows = [rows[w] for w in ("one +Inf", "one -Inf", "all +Inf", "+Inf and -Inf", "-Inf next to 2e38")]
    assert not torch.isfinite(y[inf_rows]).any(), "an Inf in a row never gives a finite output"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_a_rotation_with_a_dense_factor_gives_the_torch_paths_nan_and_inf(bits, dtype, monkeypatch):
    """K = 192 = 12 x 16 rotates with a dense Hadamard factor of order 12 (K = 64 has none): the C++ balancing
    pass before the CPU routes (`cpu_balance`) and Triton's fused one give the torch path's NaN and Inf rows."""
    x, rows = nonfinite_input(dtype, 192)
    layer = layer_for(bits, False, False, "smooth+rotate", dtype=dtype, k=192)
    y = check_every_route(layer, x, monkeypatch, f"W{bits} K=192 {dtype}")
    assert torch.isnan(y[[rows["all NaN"], rows["one NaN"], rows["NaN and Inf"]]]).all()
    assert torch.isfinite(y[[0, rows["zero"], rows["subnormal"]]]).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
def test_an_inf_input_gives_fps_sign(bits, static, monkeypatch):
    """Without rotation a lone +-Inf at input k gives, at output n, +-Inf with the sign of FP's `Inf * w[n, k]`
    (the quantized weight's sign; NaN where that weight is 0), bias or not."""
    x, rows = nonfinite_input(torch.float32)
    layer = layer_for(bits, False, static, "none")
    y = check_every_route(layer, x, monkeypatch, f"W{bits}")
    w = layer.dequantized_weight()
    for what, sign in (("one +Inf", 1.0), ("one -Inf", -1.0)):
        fp = sign * INF * w[:, 7]
        assert_same_nonfinite(y[rows[what]], fp, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("bits", [8, 4])
def test_nan_and_inf_weight_scales_reach_their_channel(bits, group, dtype, monkeypatch):
    """A hand-edited checkpoint's NaN weight scale gives a NaN output channel and an Inf one a +-Inf channel, on
    every route; never the finite output a route that drops them would give."""
    x, rows = nonfinite_input(dtype)
    layer = layer_for(bits, False, False, "none", group, hand_edited=True, dtype=dtype)
    y = check_every_route(layer, x, monkeypatch, f"W{bits} g{group}")
    assert torch.isnan(y[:, 1]).all()
    assert torch.isinf(y[[0, rows["subnormal"]], 2]).all()


@pytest.mark.parametrize("balance", ["none", "smooth+rotate"])
def test_the_float64_reference_agrees(balance, monkeypatch):
    """`reference_forward` (float64 fake quantization) has the torch path's NaN and Inf outputs: NaN rows NaN,
    Inf rows +-Inf with the same signs (the token scale multiplies the sum, as in the integer path)."""
    x, _ = nonfinite_input(torch.float32)
    layer = layer_for(8, False, False, balance)
    monkeypatch.setenv("VIDITQ_KERNELS", "torch")
    assert_same_nonfinite(layer.reference_forward(x).float(), layer(x), "reference_forward")


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_triton_rotation_with_a_dense_factor_keeps_a_lone_inf(monkeypatch):
    """K = 96 rotates as a dense factor of order 3, held as a 4-row tile: its padding row is 0 * Inf = NaN, which
    made the whole row NaN where the torch path gives +-Inf (found by test_kernel_properties.py)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 12)
    layer = ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, 8, 8, rotation_seed=3))
    x = torch.randn(3, 96)
    x[0, 0], x[1, 50] = INF, -INF
    args = (x, layer.qweight, 8, layer.scales(), layer.weight_zero, layer.bias, None, None, 3)
    expected = triton_reference(*args[:6], None, 3)
    assert torch.isinf(expected[:2]).all()
    assert_route_matches("triton", run_route("triton", *args), expected)


def test_static_scales_do_not_clip_nan_or_inf():
    x = torch.tensor([[0.5, -1.0, 3.0], [0.5, NAN, 1.0], [INF, 1.0, 1.0], [-INF, 1e30, 0.0]])
    codes, scale = quantize_activation_static(x, torch.tensor(1 / 127))
    assert codes[0].tolist() == [64, -127, 127]  # finite values beyond the scale still clip
    assert scale[0].item() == scale[0].item() and torch.isnan(scale[1]).all() and torch.isinf(scale[2:]).all()
    assert codes[2].tolist() == [127, 0, 0] and codes[3].tolist() == [-128, 0, 0]


def test_per_token_codes_of_an_inf_row_saturate():
    x = torch.tensor([[INF, 1.0, -3e38, 2e38], [-INF, 0.0, 1.0, 1.0]])
    codes, scale = quantize_activation_per_token(x)
    assert torch.isinf(scale).all()
    assert codes.tolist() == [[127, 0, -1, 1], [-128, 0, 0, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_amx_kernels_quantization_keeps_nan_and_inf(dtype):
    """The AMX route's own quantization (AVX-512, runnable without AMX): the torch path's scales, NaN and Inf
    included, and its codes on every row without a NaN."""
    if cpu_build.unsupported_reason() or not cpu_amx.cpu_has_amx() and not _has_avx512():
        pytest.skip("needs x86 with AVX-512")
    ext = cpu_build.build(cpu_amx.NAME, "cpu_amx.cpp", "the AMX int8 GEMM", "test only")
    assert ext is not None and ext.avx512_ready()
    x, _ = nonfinite_input(dtype)
    x = torch.cat([x, x[:, :37]], dim=1)  # K = 101: a ragged last block
    codes, scale, rowsum = ext.quantize_s8(x)
    ref_codes, ref_scale = quantize_activation_per_token(x)
    assert_same_nonfinite(scale, ref_scale.reshape(-1), "AMX scales")
    finite = torch.isfinite(ref_scale.reshape(-1))
    assert torch.equal(scale[finite], ref_scale.reshape(-1)[finite])
    clean = ~torch.isnan(ref_scale.reshape(-1))
    assert torch.equal(codes[:x.shape[0], :x.shape[1]][clean], ref_codes[clean])
    assert torch.equal(rowsum[clean], ref_codes[clean].sum(1, dtype=torch.int32))


def _has_avx512() -> bool:
    return "avx512bw" in cpu_model_and_flags()[1]
