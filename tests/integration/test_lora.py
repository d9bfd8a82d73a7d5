"""LoRA on ViDiT-Q-quantized transformers through diffusers' and PEFT's own LoRA machinery.

Real PEFT, real diffusers, tiny zoo models, LoRA files written as safetensors in the diffusers/PEFT format
(`transformer.<module>.lora_A.weight` / `.lora_B.weight`) and loaded with `load_lora_adapter` or a pipeline's
`load_lora_weights`.
"""

import inspect

import pytest

pytest.importorskip("peft")

import diffusers  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from diffusers.loaders import PeftAdapterMixin  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from peft.tuners.lora import Linear as PeftLoraLinear  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from torch import nn  # noqa: E402

import viditq_diffusers  # noqa: E402
from viditq_diffusers import ViDiTQConfig, ViDiTQLinear  # noqa: E402
from viditq_diffusers.layer_spec import LayerSpec  # noqa: E402
from viditq_diffusers.lora import (  # noqa: E402
    ViDiTQLoraLinear, add_low_rank, disable_peft_support, dispatch_viditq, enable_peft_support,
    register_custom_module,
)
from viditq_diffusers.testing.zoo import ZOO, run  # noqa: E402

# The zoo classes whose diffusers model class has PEFT's adapter mixin (`load_lora_adapter`). PixArt, DiT,
# HunyuanDiT, Latte and Allegro have none in diffusers 0.42.
LORA_CLASSES = [
    "SD3Transformer2DModel", "FluxTransformer2DModel", "SanaTransformer2DModel", "QwenImageTransformer2DModel",
    "CogVideoXTransformer3DModel", "WanTransformer3DModel", "HunyuanVideoTransformer3DModel",
    "LTXVideoTransformer3DModel", "MochiTransformer3DModel", "SanaVideoTransformer3DModel",
]


@pytest.fixture(autouse=True)
def peft_support():
    # what `import viditq_diffusers` should do once the package registers it on import
    enable_peft_support()
    yield


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def models(cls_name: str, preset: str = "w8a8"):
    entry = ZOO[cls_name]
    fp = entry.build(0)
    q = viditq_diffusers.quantize(entry.build(0), ViDiTQConfig(preset=preset))
    return entry, fp, q


def quantized_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, ViDiTQLinear)]


def write_lora(path, model, names, seed, rank=4, std=0.2) -> str:
    """A random LoRA for `names` of `model` as a diffusers-format safetensors file; returns its folder."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names:
        layer = model.get_submodule(name)
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) * std
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * std
    path.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(path / "pytorch_lora_weights.safetensors"))
    return str(path)


def load(model, folder: str, adapter_name: str) -> None:
    model.load_lora_adapter(folder, weight_name="pytorch_lora_weights.safetensors", adapter_name=adapter_name)


def pipeline(cls_name: str, transformer):
    """A diffusers pipeline object around `transformer` only (its other components None): enough for the
    pipeline-level LoRA API, which acts on the transformer."""
    cls = getattr(diffusers, cls_name)
    kwargs = {k: None for k in inspect.signature(cls.__init__).parameters if k != "self"}
    return cls(**{**kwargs, "transformer": transformer, "scheduler": diffusers.FlowMatchEulerDiscreteScheduler()})


def quant_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of every quantized layer (codes, scales, zero points, smoothing, bias, ...)."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, ViDiTQLinear):
            for key, tensor in [*module.named_buffers(recurse=False), *module.named_parameters(recurse=False)]:
                state[f"{name.replace('.base_layer', '')}.{key}"] = tensor.detach().clone()
    return state


def assert_same_state(model, state) -> None:
    now = quant_state(model)
    assert now.keys() == state.keys()
    for key, tensor in state.items():
        assert now[key].dtype == tensor.dtype and torch.equal(now[key], tensor), key


@torch.no_grad()
def forward(model, inputs):
    return run(model, inputs)


# ------------------------------------------------------------------------------------------------ loading


def test_zoo_classes_with_diffusers_lora_loading():
    for name in LORA_CLASSES:
        assert issubclass(ZOO[name].cls, PeftAdapterMixin), name


@pytest.mark.parametrize("cls_name", LORA_CLASSES)
def test_load_lora_adapter_into_quantized_model(cls_name, tmp_path):
    entry, fp, q = models(cls_name)
    names = quantized_names(q)
    folder = write_lora(tmp_path / "lora", q, names, seed=1)
    x = entry.make_inputs(0)
    fp0, q0 = forward(fp, x), forward(q, x)
    originals = {n: q.get_submodule(n) for n in names}

    load(fp, folder, "style")
    load(q, folder, "style")
    for name in names:  # every targeted quantized layer got the LoRA: nothing dropped
        layer = q.get_submodule(name)
        assert isinstance(layer, ViDiTQLoraLinear) and layer.get_base_layer() is originals[name], name
        assert layer.weight.dtype == torch.float32  # the compute dtype, not the int8 codes
    fp1, q1 = forward(fp, x), forward(q, x)

    assert rel(fp1, fp0) > 0.03 and rel(q1, q0) > 0.03  # the LoRA changes the output
    # quantized + LoRA is as close to FP + LoRA as the quantized model is to the FP one
    assert rel(q1, fp1) <= 2 * rel(q0, fp0) + 1e-3, (rel(q1, fp1), rel(q0, fp0))


@pytest.mark.parametrize("pipe_name, cls_name", [
    ("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
    ("FluxPipeline", "FluxTransformer2DModel"),  # Flux's loader reads each layer's weight shape
])
def test_pipeline_load_lora_weights(pipe_name, cls_name, tmp_path):
    entry, fp, q = models(cls_name)
    names = quantized_names(q)
    folder = write_lora(tmp_path / "lora", q, names, seed=2)
    x = entry.make_inputs(0)
    fp0, q0 = forward(fp, x), forward(q, x)
    fp_pipe, q_pipe = pipeline(pipe_name, fp), pipeline(pipe_name, q)
    for pipe in (fp_pipe, q_pipe):
        pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors", adapter_name="style")
    assert all(isinstance(q.get_submodule(n), ViDiTQLoraLinear) for n in names)
    q1, fp1 = forward(q, x), forward(fp, x)
    assert rel(q1, q0) > 0.03 and rel(q1, fp1) <= 2 * rel(q0, fp0) + 1e-3

    q_pipe.unload_lora_weights()
    assert not any(isinstance(m, BaseTunerLayer) for m in q.modules())
    assert torch.equal(forward(q, x), q0)


# ------------------------------------------------------------------------------------------------ switching


def test_set_adapters_disable_delete_unload_restore_bit_identically(tmp_path):
    entry, fp, q = models("SD3Transformer2DModel")
    names = quantized_names(q)
    a = write_lora(tmp_path / "a", q, names, seed=3)
    b = write_lora(tmp_path / "b", q, names[::2], seed=4)
    x = entry.make_inputs(0)
    fp0, q0 = forward(fp, x), forward(q, x)
    state = quant_state(q)
    fp_pipe, pipe = pipeline("StableDiffusion3Pipeline", fp), pipeline("StableDiffusion3Pipeline", q)
    for p in (fp_pipe, pipe):
        p.load_lora_weights(a, weight_name="pytorch_lora_weights.safetensors", adapter_name="a")
        p.load_lora_weights(b, weight_name="pytorch_lora_weights.safetensors", adapter_name="b")

    for p in (fp_pipe, pipe):
        p.set_adapters(["a", "b"], adapter_weights=[0.5, 1.0])
    q_ab, fp_ab = forward(q, x), forward(fp, x)
    assert rel(q_ab, q0) > 0.03 and rel(q_ab, fp_ab) <= 2 * rel(q0, fp0) + 1e-3

    for p in (fp_pipe, pipe):
        p.set_adapters("a")
    q_a, fp_a = forward(q, x), forward(fp, x)
    assert rel(q_a, q_ab) > 0.01 and rel(q_a, fp_a) <= 2 * rel(q0, fp0) + 1e-3

    pipe.disable_lora()
    assert torch.equal(forward(q, x), q0)
    pipe.enable_lora()
    assert torch.equal(forward(q, x), q_a)

    pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 1.0])
    assert torch.equal(forward(q, x), q_ab)

    pipe.delete_adapters("a")
    q_b = forward(q, x)
    assert rel(q_b, q0) > 0.01 and not torch.equal(q_b, q_ab)
    pipe.delete_adapters("b")
    assert any(isinstance(m, ViDiTQLoraLinear) for m in q.modules())  # empty LoRA layers stay until unload
    assert torch.equal(forward(q, x), q0)

    pipe.load_lora_weights(a, weight_name="pytorch_lora_weights.safetensors", adapter_name="again")
    assert not torch.equal(forward(q, x), q0)
    pipe.unload_lora_weights()
    assert not any(isinstance(m, BaseTunerLayer) for m in q.modules())
    assert all(type(q.get_submodule(n)) is ViDiTQLinear for n in names)
    assert torch.equal(forward(q, x), q0)
    assert_same_state(q, state)


# ------------------------------------------------------------------------------------------------ fusing


def test_fuse_requantizes_and_unfuse_restores_codes(tmp_path):
    entry, fp, q = models("FluxTransformer2DModel")
    names = quantized_names(q)
    folder = write_lora(tmp_path / "lora", q, names, seed=5)
    x = entry.make_inputs(0)
    fp0, q0 = forward(fp, x), forward(q, x)
    state = quant_state(q)
    fp_pipe, pipe = pipeline("FluxPipeline", fp), pipeline("FluxPipeline", q)
    for p in (fp_pipe, pipe):
        p.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors", adapter_name="style")
    fp1, q_unfused = forward(fp, x), forward(q, x)

    pipe.fuse_lora()
    for name in names:
        layer = q.get_submodule(name)
        assert layer.merged and layer.merged_adapters == ["style"]
        assert not torch.equal(layer.get_base_layer().qweight, state[f"{name}.qweight"]), name  # re-quantized
        assert layer.weight.dtype == torch.float32
    q_fused = forward(q, x)
    assert rel(q_fused, q0) > 0.03
    assert rel(q_fused, fp1) <= 2 * rel(q0, fp0) + 2e-3, (rel(q_fused, fp1), rel(q0, fp0))

    with pytest.raises(ValueError, match="unfuse_lora"):  # deleting a fused adapter would drop it silently
        pipe.delete_adapters("style")

    pipe.unfuse_lora()
    assert_same_state(q, state)
    assert torch.equal(forward(q, x), q_unfused)

    # fuse, then drop the LoRA layers: a plain quantized model that carries the LoRA in its codes
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert not any(isinstance(m, BaseTunerLayer) for m in q.modules())
    assert all(type(q.get_submodule(n)) is ViDiTQLinear for n in names)
    assert torch.equal(forward(q, x), q_fused)

    # ... which saves and reloads like any quantized checkpoint (same plan, codes with the LoRA baked in)
    q.save_pretrained(tmp_path / "fused")
    reloaded = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "fused")
    assert torch.equal(forward(reloaded, x), q_fused)


def _layer(layout: dict, dtype=torch.float32):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(dtype)
    smoothing = torch.rand(64) + 0.5 if layout.pop("smooth", False) else None
    spec = LayerSpec.for_linear(linear, **layout, smooth_alpha=None if smoothing is None else 0.5)
    return linear, ViDiTQLinear.from_linear(linear, spec, smoothing)


@pytest.mark.parametrize("layout", [
    dict(weight_bits=8, act_bits=8),
    dict(weight_bits=4, act_bits=8, group_size=16, symmetric=True),
    dict(weight_bits=4, act_bits=8, group_size=16, smooth=True, rotation_seed=3),  # smoothed and rotated
    dict(weight_bits=4, act_bits=8, early_weight_bits=8, early_timestep=500.0),  # timestep-wise copy
    dict(weight_bits=8, act_bits=16),
], ids=["w8a8", "w4a8-g16-sym", "w4a8-smooth-rotate", "w4-early-w8", "w8a16"])
def test_merge_keeps_the_layers_plan(layout):
    linear, base = _layer(dict(layout))
    # PEFT's documented custom-module route, for a LoraConfig built by hand
    model = nn.Sequential(base)
    config = register_custom_module(LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_bias=True))
    inject_adapter_in_model(config, model, adapter_name="a")
    layer = model[0]
    assert isinstance(layer, ViDiTQLoraLinear)
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_(0, 0.1)
        layer.lora_B["a"].bias.normal_(0, 0.1)
    x = torch.randn(16, 64) * torch.linspace(0.2, 3, 64)
    merged_w = linear.weight.detach().double() + layer.get_delta_weight("a")
    merged_b = linear.bias.detach().double() + layer.lora_B["a"].bias.detach().double() * layer.scaling["a"]
    target = nn.functional.linear(x.double(), merged_w, merged_b)
    # the same layout quantizing the merged FP weight directly: the error scale fusing can be held to
    direct = ViDiTQLinear.from_linear(nn.Linear(64, 48).requires_grad_(False), base.spec, base.smoothing())
    direct.set_weight(merged_w.float(), "", base.smoothing())
    weight_err = (direct.dequantized_weight().double() - merged_w).abs().max().item()

    before = {k: v.clone() for k, v in base.state_dict().items()}
    smooth, seed = base.smoothing(), base.rotation_seed
    with torch.no_grad():
        y_unfused = layer(x)
        layer.merge()
        y_fused = layer(x)
    assert rel(y_unfused, target) < 0.1 and rel(y_fused, target) <= 2 * rel(y_unfused, target) + 0.005
    # fused with the layer's own plan: same smoothing factors, same rotation, same layout; one more rounding
    assert base.rotation_seed == seed and (smooth is None or torch.equal(base.smoothing(), smooth))
    assert (base.qweight.dtype, base.qweight.shape) == (before["qweight"].dtype, before["qweight"].shape)
    assert (base.dequantized_weight(float64=True) - merged_w).abs().max().item() <= 2.5 * weight_err
    if base.early_weight_bits is not None:  # the W8 early copy is re-quantized from its own W8 codes
        _, plain8 = _layer(dict(weight_bits=8, act_bits=8))
        w8_err = (plain8.dequantized_weight().double() - linear.weight.double()).abs().max().item()
        assert (base.dequantized_weight(early=True, float64=True) - merged_w).abs().max().item() <= 3 * w8_err
    assert torch.allclose(base.bias.double(), merged_b, atol=1e-6)
    assert base.weight.dtype == torch.float32 and base.weight.numel() == 0

    with torch.no_grad():
        layer.unmerge()
        y_back = layer(x)
    assert torch.equal(y_back, y_unfused)
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_active_adapter_that_is_not_fused_still_runs():
    linear, base = _layer(dict(weight_bits=8, act_bits=8))
    model = nn.Sequential(base)
    for name in ("a", "b"):
        inject_adapter_in_model(LoraConfig(r=4, target_modules=["0"], init_lora_weights="gaussian"), model, name)
        with torch.no_grad():
            model[0].lora_B[name].weight.normal_(0, 0.1)
    layer = model[0]
    layer.set_adapter(["a", "b"])
    layer.merge(adapter_names=["a"])
    assert layer.merged_adapters == ["a"]
    x = torch.randn(16, 64)
    target = nn.functional.linear(
        x.double(), linear.weight.double() + layer.get_delta_weight("a") + layer.get_delta_weight("b"),
        linear.bias.double())
    with torch.no_grad():
        y = layer(x)
        layer.set_adapter("a")
        y_a = layer(x)
    assert rel(y, target) < 0.02 and rel(y, y_a) > 0.05  # b runs as a branch on top of the fused a


@pytest.mark.parametrize("shape, bias, dtype", [
    ((2, 5, 48), False, torch.float32), ((7, 48), False, torch.float32),
    ((2, 5, 48), True, torch.float32), ((2, 5, 48), False, torch.bfloat16),
])
def test_add_low_rank_is_the_branch_added_to_the_output(shape, bias, dtype):
    g = torch.Generator().manual_seed(0)
    result = torch.randn(shape, generator=g).to(dtype)
    down = torch.randn(*shape[:-1], 4, generator=g)
    weight, b = torch.randn(48, 4, generator=g), (torch.randn(48, generator=g) if bias else None)
    expected = result + (nn.functional.linear(down, weight, b) * 0.5).to(dtype)
    before = result.clone()
    with torch.enable_grad():  # autograd on: `result` is left as it is
        out = add_low_rank(result, down, weight, b, 0.5)
    assert torch.equal(result, before) and out.shape == shape and out.dtype == dtype
    torch.testing.assert_close(out, expected)
    with torch.no_grad():  # inference: accumulated into `result` itself (the fast path) or a new tensor
        out = add_low_rank(result, down, weight, b, 0.5)
    torch.testing.assert_close(out, expected)


def test_lora_branch_trains_on_the_quantized_layer_output():
    # gradients reach the LoRA factors through the accumulating up-projection
    _, base = _layer(dict(weight_bits=8, act_bits=8))
    model = nn.Sequential(base)
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["0"], init_lora_weights="gaussian"), model, "a")
    model[0](torch.randn(8, 64)).square().sum().backward()
    assert model[0].lora_B["a"].weight.grad is not None and model[0].lora_B["a"].weight.grad.abs().sum() > 0


def test_dispatcher_picks_only_viditq_layers():
    config = LoraConfig(r=2, target_modules=["0"])
    _, base = _layer(dict(weight_bits=8, act_bits=8))
    layer = dispatch_viditq(base, "a", config, r=2, lora_alpha=4, target_name="0")
    assert isinstance(layer, ViDiTQLoraLinear) and layer.get_base_layer() is base and layer.scaling["a"] == 2
    assert dispatch_viditq(nn.Linear(4, 4), "a", config, r=2, lora_alpha=4) is None


def test_merge_refuses_non_finite_weights():
    _, base = _layer(dict(weight_bits=8, act_bits=8))
    model = nn.Sequential(base)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), model, adapter_name="a")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        model[0].lora_B["a"].weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="nothing was fused"):
        model[0].merge()
    assert not model[0].merged
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())


def test_half_precision_branch():
    linear, base = _layer(dict(weight_bits=8, act_bits=8), dtype=torch.bfloat16)
    model = nn.Sequential(base)
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["0"], init_lora_weights="gaussian"), model, "a")
    layer = model[0]
    assert layer.lora_A["a"].weight.dtype == torch.bfloat16  # PEFT follows the base layer's compute dtype
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_(0, 0.1)
        x = torch.randn(8, 64, dtype=torch.bfloat16)
        y = layer(x)
        assert y.dtype == torch.bfloat16
        layer.merge()
        assert base.weight.dtype == torch.bfloat16 and layer(x).dtype == torch.bfloat16
        layer.unmerge()
        assert torch.equal(layer(x), y)


# ------------------------------------------------------------------------------------------------ FP layers


def test_lora_on_layers_kept_in_floating_point(tmp_path):
    entry, fp, q = models("FluxTransformer2DModel")
    fp_names = ["x_embedder", "context_embedder", "transformer_blocks.0.norm1.linear", "proj_out"]
    assert not any(isinstance(q.get_submodule(n), ViDiTQLinear) for n in fp_names)
    names = fp_names + quantized_names(q)[:4]
    folder = write_lora(tmp_path / "lora", q, names, seed=6, std=0.1)
    x = entry.make_inputs(0)
    fp0, q0 = forward(fp, x), forward(q, x)
    load(fp, folder, "mixed")
    load(q, folder, "mixed")
    for name in fp_names:  # PEFT's default path
        assert type(q.get_submodule(name)) is PeftLoraLinear
    assert all(isinstance(q.get_submodule(n), ViDiTQLoraLinear) for n in names[len(fp_names):])
    q1, fp1 = forward(q, x), forward(fp, x)
    assert rel(q1, q0) > 0.03 and rel(q1, fp1) <= 2 * rel(q0, fp0) + 1e-3
    q.disable_lora()
    assert torch.equal(forward(q, x), q0)
    q.enable_lora()
    q.unload_lora()
    assert torch.equal(forward(q, x), q0)


# ------------------------------------------------------------------------------------------------ refusals


def test_without_registration_peft_refuses_instead_of_dropping(tmp_path):
    entry, _, q = models("SD3Transformer2DModel")
    names = quantized_names(q)[:2]
    folder = write_lora(tmp_path / "lora", q, names, seed=7)
    disable_peft_support()
    try:
        with pytest.raises(ValueError, match="ViDiTQLinear.*not supported"):
            load(q, folder, "style")
    finally:
        enable_peft_support()
    assert not any(isinstance(m, BaseTunerLayer) for m in q.modules())
    load(q, folder, "style")  # registered again: loads
    assert all(isinstance(q.get_submodule(n), ViDiTQLoraLinear) for n in names)


def test_dora_is_refused_with_a_reason(tmp_path):
    _, _, q = models("SD3Transformer2DModel")
    name = quantized_names(q)[0]
    folder = write_lora(tmp_path / "lora", q, [name], seed=8)
    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    sd = safetensors.torch.load_file(str(path))
    sd[f"transformer.{name}.lora_magnitude_vector"] = torch.ones(q.get_submodule(name).out_features)
    safetensors.torch.save_file(sd, str(path))
    with pytest.raises(ValueError, match="plain LoRA only"):
        load(q, folder, "dora")


# ------------------------------------------------------------------------------------------------ compile


def test_compiles_fullgraph_with_an_unfused_lora(tmp_path):
    entry, _, q = models("FluxTransformer2DModel")
    load(q, write_lora(tmp_path / "lora", q, quantized_names(q), seed=9), "style")
    x = entry.make_inputs(0)
    expected = forward(q, x)
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True, backend="eager")
    assert torch.equal(forward(compiled, x), expected)
