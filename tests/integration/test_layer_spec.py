"""`LayerSpec`, the plan entry as a type: the JSON format did not change when it replaced the per-layer dicts.

(a) every shipped plan round-trips through `LayerSpec.from_json` / `to_json` to the same dict and the same file
bytes; (b) the shipped reference transformer quantized with presets and shipped plans gives the same state dict,
the same outputs and the same `quantization_config` in config.json as before the type existed (hashes below).
"""

import glob
import hashlib
import json
import os
import tempfile
from dataclasses import replace

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from viditq_diffusers import ViDiTQConfig, ViDiTQLinear, quantize
from viditq_diffusers.calibration import CalibrationStats
from viditq_diffusers.kernels.cpu_flags import cpu_model_and_flags
from tests.support import REPO
from viditq_diffusers.layer_spec import LayerSpec
from viditq_diffusers.plan import plan_from_json, plan_to_json

ROOT = str(REPO)
PIPELINE = os.path.join(ROOT, "reference_models", "pixart_digits")
PLANS = os.path.join(PIPELINE, "viditq_plans")


SHIPPED_PLANS = sorted(glob.glob(os.path.join(ROOT, "reference_models", "*", "viditq_plans", "*.json"))
                       + glob.glob(os.path.join(ROOT, "benchmarks", "**", "*.plan.json"), recursive=True))
W4 = {"weight_bits": 4, "act_bits": 8, "group_size": 64, "symmetric": False, "method": "minmax", "in_features": 128,
      "out_features": 96, "bias": True}


def test_plans_are_shipped():
    assert len(SHIPPED_PLANS) > 20  # the reference pipelines' and the benchmarks' plans


@pytest.mark.parametrize("path", SHIPPED_PLANS, ids=lambda p: os.path.relpath(p, ROOT))
def test_shipped_plan_round_trips_to_the_same_bytes(path):
    with open(path) as f:
        text = f.read()
    data = json.loads(text)
    back = plan_to_json(plan_from_json(data))
    assert back == data and json.dumps(back) == json.dumps(data)  # same keys, values and key order
    assert json.dumps(back, indent=1, sort_keys=True) == text  # jsonio.write_json writes the file byte for byte


def test_to_json_writes_optional_keys_that_differ_from_their_default_or_were_written():
    spec = LayerSpec.from_json(W4)
    assert spec.to_json() == W4 and list(spec.to_json()) == list(W4)
    assert LayerSpec(**W4, rotation_seed=3).to_json() == {**W4, "rotation_seed": 3}
    # the recipe search records "decided against" as null, and a file's null keys stay written
    decided = LayerSpec(**W4, smooth_alpha="search").with_recipe(None, None)
    assert decided.to_json() == {**W4, "smooth_alpha": None, "rotation_seed": None}
    assert LayerSpec.from_json(decided.to_json()).to_json() == decided.to_json()
    # a key added later goes last, as it did when the entry was a dict
    late = replace(LayerSpec.from_json({**W4, "smooth_alpha": 0.5}), act_scale=0.25)
    assert list(late.to_json())[-2:] == ["smooth_alpha", "act_scale"]
    assert decided == LayerSpec(**W4)  # json_keys is not part of equality: the same layer either way


def test_from_json_names_unknown_and_missing_keys():
    with pytest.raises(ValueError, match=r"plan entry 'blocks.0': unknown keys \['alpha'\] / missing keys \['bias'\]"):
        LayerSpec.from_json({**{k: v for k, v in W4.items() if k != "bias"}, "alpha": 0.5}, "blocks.0")
    with pytest.raises(ValueError, match="unknown method 'gptq'"):
        LayerSpec.from_json({**W4, "method": "gptq"})
    with pytest.raises(ValueError, match="smooth_alpha must be"):
        LayerSpec(**W4, smooth_alpha="maybe")


def test_label():
    assert LayerSpec(**W4).label() == "W4A8-g64"
    naive = LayerSpec(**{**W4, "group_size": None}, weight_per_tensor=True, act_scale=0.1)
    assert naive.label() == "W4A8-tensor-static"
    assert LayerSpec(**W4, early_weight_bits=8, early_timestep=750.0).label() == "W4A8-g64 (W8 while t >= 750)"


def test_a_layer_needs_a_decided_spec():
    linear = torch.nn.Linear(128, 96)
    with pytest.raises(ValueError, match="smooth_alpha is still 'search'"):
        ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, 4, smooth_alpha="search"))
    layer = ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, 4, group_size=64))
    assert (layer.weight_bits, layer.group_size, layer.in_features, layer.spec.label()) == (4, 64, 128, "W4A8-g64")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_hash(model) -> str:
    """Names, dtypes, shapes and raw bytes of the whole state dict (integer codes, scales' bit patterns, FP rest)."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def output_hash(model) -> str:
    """Bytes of the transformer output for a fixed input, on one thread (float BLAS sums in a fixed order)."""
    g = torch.Generator().manual_seed(0)
    x, text, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 64, generator=g), torch.tensor([999, 400])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            y = model(x, encoder_hidden_states=text, timestep=t,
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    finally:
        torch.set_num_threads(threads)
    return sha256(y.contiguous().numpy().tobytes())


def config_hash(model) -> str:
    """The `quantization_config` of a saved checkpoint's config.json, as diffusers writes it."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    return sha256(json.dumps(config["quantization_config"], indent=2, sort_keys=True).encode())


def stats_with_tokens() -> CalibrationStats:
    """The shipped (slim) statistics plus seeded random input rows, so the recipe search runs deterministically."""
    stats = CalibrationStats.load(os.path.join(PLANS, "calibration.safetensors"))
    g = torch.Generator().manual_seed(0)
    tokens = {name: torch.randn(48, len(a), generator=g) * a.float()
              for name, a in sorted(stats.channel_absmax.items())}
    return replace(stats, sample_tokens=tokens)


def configs() -> dict:
    stats = CalibrationStats.load(os.path.join(PLANS, "calibration.safetensors"))
    return {
        "w8a8": lambda: ViDiTQConfig("w8a8"),
        "shipped_w4a8_mp_5bits": lambda: ViDiTQConfig(
            plan=os.path.join(PLANS, "w4a8_mp_searched_5bits.json"), calibration=stats),
        "smoothquant_w8a8": lambda: ViDiTQConfig("smoothquant_w8a8", calibration=stats),
        "paper_w4a8_g32_timestep_wise": lambda: ViDiTQConfig(
            "paper_w4a8", group_size=32, alpha=0.5, early_weight_bits=8, calibration=stats),
        "w4a8_search": lambda: ViDiTQConfig("w4a8", calibration=stats_with_tokens()),
        "undecided_mp_plan_search": lambda: ViDiTQConfig(
            plan=os.path.join(ROOT, "benchmarks", "mixed_precision", "blocks2", "image-searched-5bits.plan.json"),
            calibration=stats_with_tokens()),
    }


def hashes(name: str) -> tuple[str, str, str]:
    model = PixArtTransformer2DModel.from_pretrained(PIPELINE, subfolder="transformer")
    quantize(model, configs()[name]())
    return state_hash(model), output_hash(model), config_hash(model)


# (state dict, output, quantization_config) sha256 per config, computed on the code BEFORE LayerSpec replaced the
# plan dicts (main at 6b2be00), with VIDITQ_KERNELS=torch (`python -m tests.integration.test_layer_spec` prints
# them). They must not change: a refactor that changes them changed what a plan means, a checkpoint's bytes or its
# outputs.
EXPECTED = {
    "w8a8": ("6aaa0265c221f3842499178db465cb5b59d728346f3c66de30952a783e570551",
             "730202974a80b282ea6e5350cb43650c9765126173d1b21c2daecfcaa0a3a24a",
             "9e8a63d659100d142adf1630d0278a51b78fe491a16ebf29f75d949dbbf1d7b7"),
    "shipped_w4a8_mp_5bits": ("2a1eeddbd8ae96ce3c39cb700414dfe7c3cfc8cc78d901b81287d34c084963b2",
                              "e7b342a036c10ac0098fec6197b31b74eb3e5585bdbabed1b82540595c800f92",
                              "5389adb5c781c3a6c10175d1468debb79b6209c9edb51d2f24c5df11bf3643a7"),
    "smoothquant_w8a8": ("b11491c46c4d69476c19eaec81fc411a1ba977e29c0b1cd85c4ff7202134aeee",
                         "4749b2c4455d18f2c993357fe362a289f05969fcd3ef7208d26f84cc1eef1e45",
                         "fdcf54464a9afc0db0cabd652d3683caf6dd033bf2f6920408f3fef055070ff1"),
    "paper_w4a8_g32_timestep_wise": ("5b64ee63e69ab2c91b9873fe8c67d8fd5bead5606636a24df8aadc5e62a71ad7",
                                     "694a88d4d041213d862f9a8334b7c14722785132a9a9db945275d1a126cd2424",
                                     "21b1b7f11300920680cd27ec7dd5ed755ac6897a1f5a80d5225c35535ebe0c0f"),
    "w4a8_search": ("e153e2f254cb7d79862143f5522c2bada4a8a8427d576f94360d3e8c7ba9e27a",
                    "47725af04debe702156b0fbe9d6e5c5c4c5aaf9d068a3df7b9342b2f8cf20244",
                    "a9d3d29fdeb2174c6188d882e227dec37b5cfe8fa8c4889436dac2f4034786f3"),
    "undecided_mp_plan_search": ("576a3a51380e8cb01ea978e1eb9812b14ddc1353cfdfcb7cb69cc7f63fe3bd95",
                                 "cec020a4da2362f9d0d50b63a6d2bd11f163fe91c6186fc9f83eec416ff8054b",
                                 "ed7e462a12b4eafe024d886688b94649ab6653b932a603b36797f345afd153e5"),
}


# Where they were recorded. Float BLAS and vector math (the outputs; behind the weights, the smoothing factors,
# rotations and the recipe search's errors) may round differently on another kind of CPU, so the weight and output
# hashes are checked on this kind only. Configs without a search write the same quantization_config everywhere.
RECORDED_ON = ("AMD EPYC", "AVX512")  # /proc/cpuinfo's model name, torch's CPU capability
SAME_CONFIG_EVERYWHERE = ("w8a8", "shipped_w4a8_mp_5bits", "smoothquant_w8a8", "paper_w4a8_g32_timestep_wise")


def cpu_kind() -> tuple[str, str]:
    return cpu_model_and_flags()[0], torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_quantized_reference_model_is_unchanged(name, monkeypatch):
    monkeypatch.setenv("VIDITQ_KERNELS", "torch")  # the torch path: no kernel choice in the bits
    state, output, config = hashes(name)
    if name in SAME_CONFIG_EVERYWHERE:
        assert config == EXPECTED[name][2]
    if cpu_kind() != RECORDED_ON:
        pytest.skip(f"weight and output hashes were recorded on {RECORDED_ON}; this CPU is {cpu_kind()}, where "
                    f"float math may round differently")
    assert (state, output, config) == EXPECTED[name]


if __name__ == "__main__":
    os.environ["VIDITQ_KERNELS"] = "torch"
    for name in configs():
        print(f"    {name!r}: {hashes(name)!r},")
