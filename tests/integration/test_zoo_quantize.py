"""Every zoo class: quantize through from_pretrained, run, save, reload without config, bit-identical.

Error checks are two-sided: the quantized model must be close to FP, and it must match a
float64 fake-quant simulation of W?A8 much better than the weight-only simulation, which
fails if activations were not quantized or weights were quantized wrong.
"""

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from viditq_diffusers import ViDiTQConfig, ViDiTQLinear, quantize
from viditq_diffusers.testing.zoo import ZOO, run

FORMATS = {  # preset kwargs -> max relative L2 error vs FP
    "w8a8": (dict(preset="w8a8"), 0.05),
    "w4a8": (dict(preset="w4a8"), 0.35),
    "w4a8-g32": (dict(preset="w4a8", group_size=32), 0.35),
    "w8a16": (dict(preset="w8a16"), 0.05),
}


class Simulated(nn.Module):
    """A ViDiTQLinear run through its float64 reference, optionally without activation quantization."""

    def __init__(self, layer: ViDiTQLinear, quantize_acts: bool):
        super().__init__()
        self.layer, self.quantize_acts = layer, quantize_acts

    def forward(self, x):
        if self.quantize_acts:
            return self.layer.reference_forward(x).to(x.dtype)
        return nn.functional.linear(x, self.layer.dequantized_weight().to(x.dtype), self.layer.bias)


def simulate(model, quantize_acts):
    for name, module in list(model.named_modules()):
        if isinstance(module, ViDiTQLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Simulated(module, quantize_acts))
    return model


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def group_divides(model, size):
    return all(m.in_features % size == 0 for n, m in model.named_modules() if isinstance(m, ViDiTQLinear))


@pytest.fixture(scope="module", params=sorted(ZOO))
def fp_checkpoint(request, tmp_path_factory):
    entry = ZOO[request.param]
    path = tmp_path_factory.mktemp(request.param) / "fp"
    entry.build(seed=0).save_pretrained(path)
    fp = entry.cls.from_pretrained(path)
    inputs = entry.make_inputs(1)
    with torch.no_grad():
        reference = run(fp, inputs)
    return entry, path, inputs, reference


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_quantize_save_reload(fp_checkpoint, fmt, tmp_path):
    entry, path, inputs, reference = fp_checkpoint
    kwargs, bound = FORMATS[fmt]
    try:
        model = entry.cls.from_pretrained(path, quantization_config=ViDiTQConfig(**kwargs))
    except ValueError as error:
        assert "does not divide" in str(error) and kwargs.get("group_size")
        pytest.skip(f"group size {kwargs['group_size']} does not divide every layer of {entry.cls_name}")
    layers = [m for m in model.modules() if isinstance(m, ViDiTQLinear)]
    assert layers, "some layers must be quantized"
    with torch.no_grad():
        out = run(model, inputs)
    assert torch.isfinite(out).all()
    error = rel(out, reference)
    assert error < bound, f"{entry.cls_name} {fmt}: relative error {error:.4f} >= {bound}"

    model.save_pretrained(tmp_path / "q")
    reloaded = entry.cls.from_pretrained(tmp_path / "q")
    assert isinstance(reloaded.hf_quantizer.quantization_config, ViDiTQConfig)
    with torch.no_grad():
        assert torch.equal(run(reloaded, inputs), out), "reload must be bit-identical"

    # The real output matches the simulation of exactly this quantization...
    with torch.no_grad():
        sim = run(simulate(entry.cls.from_pretrained(tmp_path / "q"), True), inputs)
        weight_only = run(simulate(entry.cls.from_pretrained(tmp_path / "q"), False), inputs)
    assert rel(out, sim) < 2e-3  # rounding ties can flip after float64 vs float32 upstream
    if kwargs["preset"].endswith("a8"):
        # ...and not the weight-only one: activations really are quantized.
        assert rel(out, weight_only) > 5 * max(rel(out, sim), 1e-6)


@pytest.mark.parametrize("cls_name", sorted(ZOO))
def test_default_roles_keep_embedders_adaln_and_io_in_fp(cls_name):
    from viditq_diffusers.plan import build_plan

    model = ZOO[cls_name].build()
    planned = set(build_plan(model, ViDiTQConfig())["layers"])
    keep_fp32 = model._keep_in_fp32_modules or []
    for name in planned:
        parts = name.split(".")
        assert parts[1].isdigit(), f"{name}: only layers inside transformer blocks are quantized"
        assert not any(p.startswith(("norm", "emb", "time", "caption")) or p.endswith("_mod") for p in parts), name
        assert not any(p in keep_fp32 for p in parts), f"{name} is in _keep_in_fp32_modules"
    assert any(n.endswith(("to_q", "attn.to_q")) for n in planned), "attention is quantized"
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name in ("proj_out", "x_embedder", "proj_in", "context_embedder", "caption_projection.linear_1"):
        assert name not in planned
    assert planned < linears


def test_dequantize_gives_back_plain_linears(tmp_path):
    entry = ZOO["PixArtTransformer2DModel"]
    entry.build().save_pretrained(tmp_path / "fp")
    model = entry.cls.from_pretrained(tmp_path / "fp", quantization_config=ViDiTQConfig(preset="w8a16"))
    inputs = entry.make_inputs(0)
    with torch.no_grad():
        quantized = run(model, inputs)
        model.dequantize()
        assert not any(isinstance(m, ViDiTQLinear) for m in model.modules()) and not model.is_quantized
        assert rel(run(model, inputs), quantized) < 1e-5  # same weights, now as floats
    model.save_pretrained(tmp_path / "deq")  # a plain FP checkpoint again
    assert "quantization_config" not in (tmp_path / "deq" / "config.json").read_text()


def test_half_model_and_sharded_checkpoint_reload_bit_identical(tmp_path):
    entry = ZOO["WanTransformer3DModel"]  # has _keep_in_fp32_modules
    entry.build().save_pretrained(tmp_path / "fp")
    model = entry.cls.from_pretrained(tmp_path / "fp", torch_dtype=torch.bfloat16,
                                      quantization_config=ViDiTQConfig(preset="w4a8", group_size=32))
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.blocks[0].norm2.weight.dtype == torch.float32  # kept in fp32 by the class
    inputs = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in entry.make_inputs(0).items()}
    with torch.no_grad():
        out = run(model, inputs)
    model.save_pretrained(tmp_path / "q", max_shard_size="20KB")
    assert len(list((tmp_path / "q").glob("*.safetensors"))) > 1
    reloaded = entry.cls.from_pretrained(tmp_path / "q")  # no torch_dtype: the plan remembers bf16
    assert reloaded.blocks[0].norm2.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(run(reloaded, inputs), out)


def test_save_is_atomic(tmp_path):
    from viditq_diffusers.hub import atomic_save

    def crash_half_way(directory):
        (Path(directory) / "config.json").write_text("{}")
        (Path(directory) / "weights.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save(crash_half_way, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [], "nothing half-written under a final name, no temporary left"


def test_saved_files_get_the_usual_permissions(tmp_path):
    """diffusers writes safetensors through a 0600 temp file: the saved checkpoint must be readable like
    any file the user creates (mode 0666 & ~umask), not private to its owner."""
    entry = ZOO["PixArtTransformer2DModel"]
    model = quantize(entry.build(), ViDiTQConfig(preset="w8a8"))
    model.save_pretrained(tmp_path / "q")
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "q").iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~mask}, modes
