"""The kernel route table (`kernels/routes.py`): which route a call takes, by name, and why the faster ones do not;
`kernels.warmup` as the only place that builds; `VIDITQ_LOG_ROUTES=1`; `viditq info --kernels`.

Cases marked "this CPU" hold on x86 with AVX-512 VNNI and no AMX (the test machine, e.g. AMD Zen 4) and skip
elsewhere; the others hold on any machine."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from viditq_diffusers import LayerSpec, ViDiTQConfig, ViDiTQLinear, cli, kernels
from viditq_diffusers.kernels import (ROUTE_NAMES, LayerCall, cpu_amx, cpu_build, cpu_int16, cpu_vnni, explain,
                                      onednn, route, select_route)
from viditq_diffusers.kernels.routes import FORCED
from viditq_diffusers.testing.zoo import build_tiny_pixart_pipeline
from tests.support.quantized_weights import random_weights

VNNI_NO_AMX = (cpu_build.unsupported_reason() is None and onednn.available() and onednn.exact_for(8)
               and cpu_vnni.cpu_has_vnni() and not cpu_amx.cpu_has_amx())
this_cpu = pytest.mark.skipif(not VNNI_NO_AMX, reason="expects x86 with AVX-512 VNNI (oneDNN exact for W8), no AMX")

W8 = LayerCall(1152, 1152, 8, 8, asymmetric=True)  # the default W8A8 layer
W4 = LayerCall(1152, 1152, 4, 8, asymmetric=True)


def name(layer, x):
    return select_route(layer, x).name


def test_the_table_is_ordered_fastest_first():
    assert ROUTE_NAMES == ("triton", "cpu_amx", "cpu_vnni", "cpu_direct", "cpu_int16", "cpu_group", "onednn_direct",
                           "onednn_split", "torch")
    with pytest.raises(ValueError, match="the routes are triton, cpu_amx"):
        route("cuda")


def test_forced_torch_route(monkeypatch):
    monkeypatch.setenv("VIDITQ_KERNELS", "torch")
    x = torch.randn(256, 1152)
    for layer in (W8, W4, LayerCall(1152, 64, 4, 8, rotated=True)):
        assert name(layer, x) == "torch"
        assert all(reason == FORCED for _, reason in explain(layer, x)[:-1])
        assert explain(layer, x)[-1] == ("torch", None)


def test_a16_runs_torch_and_says_why():
    x = torch.randn(256, 1152)
    layer = LayerCall(1152, 1152, 4, 16)
    assert name(layer, x) == "torch"
    reasons = dict(explain(layer, x))
    assert reasons["triton"] == "not a CUDA tensor"
    assert all(reasons[n].startswith("A16") for n in ROUTE_NAMES[1:-1] if reasons[n] != FORCED)


def test_group_wise_weights_on_cpu_take_the_group_kernel():
    x = torch.randn(256, 1152)
    layer = LayerCall(1152, 1152, 4, 8, groups=1152 // 64, asymmetric=True)
    assert layer.label == "W4A8-g64"
    for n in ("cpu_amx", "cpu_vnni", "cpu_direct", "cpu_int16", "onednn_direct", "onednn_split"):
        assert route(n).applies(layer, x) == "group-wise weights"
    kernels.warmup(verbose=False)  # loads the int16 kernel on every x86 CPU with AVX2
    if cpu_build.unsupported_reason() is None:
        assert name(layer, x) == "cpu_group"
    else:
        assert name(layer, x) == "torch" and route("cpu_group").applies(layer, x) == cpu_int16.missing_reason()


@pytest.mark.parametrize("layer,why", [
    (LayerCall(1152, 64, 8, 8), "per-channel weights: this route is for group-wise ones"),
    (LayerCall(1152, 64, 4, 8, groups=1152 // 64, static_act_scale=True), "static activation scale"),
    (LayerCall(1152, 64, 4, 16, groups=1152 // 64), "A16"),
    (LayerCall(99, 64, 4, 8, groups=3), "group size 33 is not even (the kernel multiplies K in pairs)"),
])
def test_the_group_kernel_says_why_it_does_not_apply(layer, why):
    assert route("cpu_group").applies(layer, torch.randn(4, layer.in_features)).startswith(why)
    assert name(layer, torch.randn(4, layer.in_features)) != "cpu_group"


def test_static_activation_scales_skip_the_per_token_kernels():
    x = torch.randn(256, 1152)
    layer = LayerCall(1152, 1152, 8, 8, asymmetric=True, static_act_scale=True)
    reasons = dict(explain(layer, x))
    for n in ("cpu_amx", "cpu_vnni", "cpu_direct", "cpu_int16"):
        assert "static activation scale" in reasons[n]
    assert name(layer, x) in (("onednn_split", "onednn_direct") if onednn.available() else ("torch",))


def test_cpu_tensors_never_take_triton():
    assert route("triton").applies(W4, torch.randn(256, 1152)) == "not a CUDA tensor"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_routes():
    x = torch.randn(256, 1152, device="cuda")
    assert name(W4, x) == "triton"
    assert name(W4, x[:2]) == "torch"  # adaLN-sized: launch-bound
    assert route("cpu_direct").applies(W4, x) == "not a CPU tensor"


@this_cpu
def test_this_cpu_routes():
    x = torch.randn(256, 1152)
    kernels.warmup(verbose=False)
    assert name(W8, x) == "cpu_vnni" and name(W4, x) == "cpu_vnni"
    assert dict(explain(W8, x)) == {"triton": "not a CUDA tensor", "cpu_amx": "no AMX on this CPU", "cpu_vnni": None}
    assert route("cpu_direct").applies(W8, x) is None  # the next route, where the VNNI kernel is not built
    assert route("cpu_int16").applies(W8, x) == "oneDNN's direct int8 GEMM is exact for W8 on this CPU, and faster"
    static = LayerCall(1152, 1152, 8, 8, asymmetric=True, static_act_scale=True)
    assert name(static, x) == "onednn_split"  # code - zero does not fit int8
    assert name(LayerCall(1152, 1152, 8, 8, static_act_scale=True), x) == "onednn_direct"  # symmetric: it does


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_route_that_applies_gives_the_torch_bits(bits, dtype):
    codes, qweight, scale, zero = random_weights(bits, 48, 256)
    x = (torch.randn(40, 256, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    smooth = torch.rand(256, generator=torch.Generator().manual_seed(2)) + 0.5
    args = (qweight, bits, scale, zero, torch.randn(48), 8, None, smooth, 5)
    layer = LayerCall.of_op(x, qweight, bits, scale, zero, 8, None, smooth, 5)
    expected = route("torch").run(x, *args)
    taken = [r for r in ROUTE_NAMES if route(r).applies(layer, x) is None]
    assert taken[-1] == "torch" and name(layer, x) == taken[0]
    for r in taken:
        assert torch.equal(route(r).run(x, *args), expected), r


def test_routes_never_build_and_say_so(tmp_path):
    """A fresh process with an empty kernel cache: before `kernels.warmup()` the C++ routes report "not built"
    and a slower route runs; nothing is compiled."""
    script = (
        "import torch\n"
        "from viditq_diffusers.kernels import LayerCall, cpu_build, explain, select_route\n"
        "layer, x = LayerCall(256, 64, 4, 8), torch.randn(32, 256)\n"
        "print(select_route(layer, x).name)\n"
        "print(dict(explain(layer, x)).get('cpu_direct'))\n"
    )
    env = dict(os.environ, VIDITQ_KERNEL_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                         check=True).stdout.splitlines()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.so"))
    if cpu_build.unsupported_reason() is None and onednn.available():
        assert out == ["onednn_direct", cpu_build.NOT_BUILT]


def test_log_routes_once_per_layer_format(monkeypatch, caplog):
    monkeypatch.setenv("VIDITQ_LOG_ROUTES", "1")
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    layer = ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, 8, 8))
    x = torch.randn(2, 21, 96)
    expected = name(LayerCall.of_op(x.reshape(-1, 96), layer.qweight, 8, layer.scales(), layer.weight_zero, 8, None,
                                    None, None), x.reshape(-1, 96))
    with caplog.at_level(logging.INFO, logger="viditq_diffusers.kernels"):
        layer(x)
        layer(x)
        layer(x[:, :5])  # another token count, same format and route: not logged again
    lines = [r.getMessage() for r in caplog.records if r.name == "viditq_diffusers.kernels"]
    assert len(lines) == 1 and f"-> {expected}" in lines[0] and "W8A8 (asym) 96->40" in lines[0]


def test_info_kernels_on_a_saved_checkpoint(tmp_path, capsys):
    from diffusers import PixArtTransformer2DModel

    pipe = build_tiny_pixart_pipeline(tmp_path / "pipe")
    model = PixArtTransformer2DModel.from_pretrained(f"{pipe}/transformer",
                                                     quantization_config=ViDiTQConfig(preset="w8a8"))
    model.save_pretrained(tmp_path / "q")
    assert cli.main(["info", "--kernels", "--json", str(tmp_path / "q")]) == 0
    routes = json.loads(capsys.readouterr().out)["model"]["kernel_routes"]
    assert routes["tokens"] == 256 and routes["dtype"] == "float32"
    rows = routes["layers"]
    assert rows and all(row["format"] == "W8A8" for row in rows.values())
    assert all(row["route"] in ROUTE_NAMES for row in rows.values())
    if routes["device"] == "cpu":
        assert all(row["skipped"]["triton"] == "not a CUDA tensor" for row in rows.values())
    if VNNI_NO_AMX:
        assert {row["route"] for row in rows.values()} == {"cpu_vnni"}
    assert cli.main(["info", "--kernels", str(tmp_path / "q")]) == 0
    text = capsys.readouterr().out
    assert f"kernel routes on this machine ({routes['device']}, float32 input of 256 tokens)" in text
    assert "transformer_blocks.0.attn1.to_q" in text and "skipped: triton: " in text
