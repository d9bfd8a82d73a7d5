"""`modules_to_not_convert` matches layers the way diffusers' other backends do: a leaf name, a dotted component (or
run of them), the full name, a prefix, or an fnmatch pattern; components match whole; entries that match nothing
warn. Excluded layers stay `nn.Linear` with their floating-point weights."""

import warnings

import pytest
import torch
from torch import nn

from viditq_diffusers import ViDiTQConfig, ViDiTQLinear
from viditq_diffusers.plan import matches_any
from viditq_diffusers.testing.zoo import ZOO, run

FLUX = ZOO["FluxTransformer2DModel"]
PIXART = ZOO["PixArtTransformer2DModel"]

# entry -> the layers of the tiny Flux's default plan it keeps in floating point
FLUX_CASES = {
    "to_k": {"transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_k"},  # leaf name
    "proj_out": {"single_transformer_blocks.0.proj_out"},  # a component, also inside a block
    "transformer_blocks.0": {  # a run of components: one block, not single_transformer_blocks.0
        "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_q_proj",
        "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.attn.to_add_out",
        "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_v", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
        "transformer_blocks.0.ff_context.net.0.proj", "transformer_blocks.0.ff_context.net.2"},
    "transformer_blocks.0.attn.to_q": {"transformer_blocks.0.attn.to_q"},  # full name
    "transformer_blocks.0.ff_context": {  # prefix
        "transformer_blocks.0.ff_context.net.0.proj", "transformer_blocks.0.ff_context.net.2"},
    "ff.net.2": {"transformer_blocks.0.ff.net.2"},  # a run inside the name; ff_context.net.2 is another component
    "add_*_proj": {  # fnmatch on a component
        "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_q_proj",
        "transformer_blocks.0.attn.add_v_proj"},
    "single_transformer_blocks.*.attn.to_?": {  # fnmatch on the full name
        "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_v"},
}


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux") / "fp"
    FLUX.build(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def flux_default(flux_dir):
    """The default plan's layers, and the floating-point weights of every linear."""
    model = FLUX.cls.from_pretrained(flux_dir, quantization_config=ViDiTQConfig())
    planned = {n for n, m in model.named_modules() if isinstance(m, ViDiTQLinear)}
    fp = FLUX.cls.from_pretrained(flux_dir)
    weights = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in fp.named_modules()
               if isinstance(m, nn.Linear)}
    return planned, weights


@pytest.mark.parametrize("entry", sorted(FLUX_CASES))
def test_each_form_keeps_its_layers_in_floating_point(flux_dir, flux_default, entry):
    planned, fp_weights = flux_default
    kept = FLUX_CASES[entry]
    assert kept <= planned
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="modules_to_not_convert")  # an entry that matches stays quiet
        model = FLUX.cls.from_pretrained(flux_dir, quantization_config=ViDiTQConfig(modules_to_not_convert=[entry]))
    quantized = {n for n, m in model.named_modules() if isinstance(m, ViDiTQLinear)}
    assert quantized == planned - kept
    assert set(model.hf_quantizer.quantization_config.plan["layers"]) == planned - kept
    for name in kept:
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear, name
        weight, bias = fp_weights[name]
        assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias), f"{name}: FP weights changed"
    with torch.no_grad():
        assert torch.isfinite(run(model, FLUX.make_inputs(0))).all()


def test_components_match_whole():
    """Unlike a substring test, a component is matched whole."""
    assert not matches_any("single_transformer_blocks.0.attn.to_q", ["transformer_blocks.0"])
    assert not matches_any("transformer_blocks.10.attn1.to_q", ["transformer_blocks.1"])
    assert not matches_any("transformer_blocks.0.attn1.to_k_norm", ["to_k"])
    assert not matches_any("transformer_blocks.0.attn1.to_k", ["attn"])
    assert matches_any("transformer_blocks.0.attn1.to_k", ["attn1"])
    assert matches_any("transformer_blocks.10.attn1.to_k", ["transformer_blocks.1*"])  # a pattern may say more


def test_cross_attention_by_component(tmp_path):
    """PixArt: "attn2" keeps the cross-attention's four linears, nothing else."""
    PIXART.build(seed=0).save_pretrained(tmp_path / "fp")
    model = PIXART.cls.from_pretrained(tmp_path / "fp", quantization_config=ViDiTQConfig(
        modules_to_not_convert=["attn2"]))
    linears = {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, ViDiTQLinear))}
    assert {n for n, kind in linears.items() if "attn2" in n} == {
        f"transformer_blocks.0.attn2.{leaf}" for leaf in ("to_q", "to_k", "to_v", "to_out.0")}
    assert all(kind is nn.Linear for n, kind in linears.items() if "attn2" in n)
    assert linears["transformer_blocks.0.attn1.to_k"] is ViDiTQLinear


@pytest.mark.parametrize("entry", ["to_kk", "transformer_blocks.0.atn", "blocks.0", "transformer_blocks.7",
                                   "ff.*.proj_in"])
def test_an_entry_that_matches_nothing_warns(flux_dir, entry):
    with pytest.warns(UserWarning, match=rf"modules_to_not_convert entry '{entry}' matches no module of "
                                         rf"FluxTransformer2DModel.*a dotted component"):
        model = FLUX.cls.from_pretrained(flux_dir, quantization_config=ViDiTQConfig(
            modules_to_not_convert=[entry, "to_k"]))
    assert type(model.transformer_blocks[0].attn.to_k) is nn.Linear  # the other entry still applies


def test_cli_keep_fp_takes_the_same_entries(tmp_path):
    from viditq_diffusers import cli
    from viditq_diffusers.testing.zoo import build_tiny_pixart_pipeline

    src = build_tiny_pixart_pipeline(tmp_path / "pipe")
    assert cli.main(["quantize", str(src), "--preset", "w8a8", "--keep-fp", "to_k", "ff", "--out",
                     str(tmp_path / "q")]) in (0, None)
    model = PIXART.cls.from_pretrained(tmp_path / "q", subfolder="transformer")
    layers = model.hf_quantizer.quantization_config.plan["layers"]
    assert sorted(layers) == [f"transformer_blocks.{i}.{attn}.{leaf}" for i in (0, 1) for attn in ("attn1", "attn2")
                              for leaf in ("to_out.0", "to_q", "to_v")]
    assert type(model.transformer_blocks[0].attn2.to_k) is nn.Linear
