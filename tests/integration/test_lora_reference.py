"""The shipped mirror LoRA (reference_models/pixart_digits_lora) on the reference PixArt pipeline, FP and W8A8.

W8A8 is calibrated (`viditq_diffusers.calibrate`, channel balancing with the per-layer recipe search), so the
LoRA branch runs beside smoothed and rotated layers and fusing re-quantizes through them. PixArt has no
diffusers LoRA loader: the file is loaded with `load_lora_file` (PEFT's injection underneath) and the
adapters are managed with the PEFT / diffusers functions diffusers' own loader calls.
"""

import copy
import os

import pytest

pytest.importorskip("peft")

import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from diffusers.utils.peft_utils import (  # noqa: E402
    delete_adapter_layers, recurse_remove_peft_layers, set_adapter_layers, set_weights_and_activate_adapters,
)
from peft.functional import set_adapter  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from viditq_diffusers import ViDiTQConfig, ViDiTQLinear, calibrate  # noqa: E402
from viditq_diffusers.evaluation import generate  # noqa: E402
from viditq_diffusers.lora import ViDiTQLoraLinear, load_lora_file  # noqa: E402
from viditq_diffusers.metrics import psnr  # noqa: E402

from reference.classifier import load_classifier  # noqa: E402
from tests.support import REPO  # noqa: E402
from reference.data import prompt_for  # noqa: E402
from reference.train_lora import ASYMMETRIC, mirror_score  # noqa: E402
from tests.integration.test_lora import assert_same_state, quant_state  # noqa: E402

ROOT = str(REPO)
PIPELINE = os.path.join(ROOT, "reference_models", "pixart_digits")
LORA = os.path.join(ROOT, "reference_models", "pixart_digits_lora")
CALL = dict(guidance_scale=4.5, height=32, width=32, use_resolution_binning=False, clean_caption=False)
DIGITS = list(ASYMMETRIC) * 2  # two samples per digit that looks different mirrored
PROMPTS = [prompt_for(d, ("plain", "thick", "italic")[i % 3]) for i, d in enumerate(DIGITS)]
SEEDS = list(range(len(PROMPTS)))
STEPS = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the budget of these tests; also keeps the outputs bit-reproducible
    yield
    torch.set_num_threads(threads)


def load(path, **kwargs):
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def fp():
    return load(PIPELINE)


@pytest.fixture(scope="module")
def w8a8(fp):
    stats = calibrate(fp, [prompt_for(2, "plain"), prompt_for(5, "thick")], num_inference_steps=8, **CALL)
    return load(PIPELINE, quantization_config=ViDiTQConfig(preset="w8a8", calibration=stats))


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def sample(pipe, steps=STEPS):
    return generate(pipe, PROMPTS, SEEDS, num_inference_steps=steps, **CALL)


def unload(model):
    """What diffusers' `unload_lora` does: drop every LoRA layer (base layers back in place) and the config."""
    recurse_remove_peft_layers(model)
    if hasattr(model, "peft_config"):
        del model.peft_config


@pytest.fixture
def lora_free(fp, w8a8):
    yield
    for pipe in (fp, w8a8):
        unload(pipe.transformer)


def lora_layers(model) -> list[ViDiTQLoraLinear]:
    return [m for m in model.modules() if isinstance(m, ViDiTQLoraLinear)]


# ------------------------------------------------------------------------------------------------ quality


@pytest.mark.slow
def test_quantized_lora_is_as_faithful_as_quantization_and_mirrors(fp, w8a8, classifier, lora_free):
    fp0, q0 = sample(fp), sample(w8a8)
    for pipe in (fp, w8a8):
        load_lora_file(pipe.transformer, LORA, adapter_name="mirror")
    # every quantized linear got the LoRA (the file targets exactly the layers ViDiT-Q quantizes)
    assert len(lora_layers(w8a8.transformer)) == sum(isinstance(m, ViDiTQLinear) for m in w8a8.transformer.modules())
    fp1, q1 = sample(fp), sample(w8a8)

    base, with_lora = psnr(q0, fp0), psnr(q1, fp1)
    print(f"PSNR W8A8 vs FP: {base:.2f} dB; W8A8+LoRA vs FP+LoRA: {with_lora:.2f} dB")
    assert with_lora >= base - 2.0, (with_lora, base)

    scores = {name: mirror_score(classifier, x, DIGITS) for name, x in
              (("fp", fp0), ("w8a8", q0), ("fp+lora", fp1), ("w8a8+lora", q1))}
    print(scores)
    # without the LoRA the digits are drawn upright; with it, mirrored: most read as the digit only when
    # flipped back, in the quantized model as in FP
    assert scores["w8a8"]["upright"] >= 0.85 and scores["w8a8"]["flipped"] <= 0.4
    assert scores["w8a8+lora"]["flipped"] >= 0.7
    assert scores["w8a8+lora"]["flipped"] - scores["w8a8"]["flipped"] >= 0.5
    assert scores["w8a8+lora"]["mirrored"] - scores["w8a8"]["mirrored"] >= 1.0
    assert scores["w8a8+lora"]["mirrored"] >= scores["fp+lora"]["mirrored"] - 0.15


# ------------------------------------------------------------------------------------------------ switching


@pytest.mark.slow
def test_switch_disable_delete_unload_restore_bit_identically(w8a8, lora_free):
    model = w8a8.transformer
    state = quant_state(model)
    q0 = sample(w8a8, steps=4)
    load_lora_file(model, LORA, adapter_name="mirror")
    load_lora_file(model, LORA, adapter_name="weak")
    set_weights_and_activate_adapters(model, ["weak"], [0.5])  # diffusers' set_adapters
    q_weak = sample(w8a8, steps=4)
    set_adapter(model, "mirror", inference_mode=True)  # PEFT: switch back to the full-strength adapter
    q_mirror = sample(w8a8, steps=4)
    assert psnr(q_mirror, q0) < 30 and psnr(q_weak, q0) < 40 and not torch.equal(q_weak, q_mirror)

    set_adapter_layers(model, enabled=False)  # diffusers' disable_lora
    assert torch.equal(sample(w8a8, steps=4), q0)
    set_adapter_layers(model, enabled=True)
    assert torch.equal(sample(w8a8, steps=4), q_mirror)

    delete_adapter_layers(model, "mirror")  # PEFT activates the remaining adapter (at weight 0.5)
    assert torch.equal(sample(w8a8, steps=4), q_weak)
    delete_adapter_layers(model, "weak")  # no adapter left: the LoRA layers stay, empty, until unloaded
    assert lora_layers(model) and torch.equal(sample(w8a8, steps=4), q0)

    unload(model)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert torch.equal(sample(w8a8, steps=4), q0)
    assert_same_state(model, state)


# ------------------------------------------------------------------------------------------------ fusing


@pytest.mark.slow
def test_fuse_requantizes_and_unfuse_restores(w8a8, classifier, lora_free):
    model = w8a8.transformer
    state = quant_state(model)
    load_lora_file(model, LORA, adapter_name="mirror")
    unfused = sample(w8a8)

    for layer in lora_layers(model):  # diffusers' fuse_lora, layer by layer
        layer.merge()
    for layer in lora_layers(model):
        assert layer.merged_adapters == ["mirror"]
    codes_changed = [not torch.equal(layer.get_base_layer().qweight, state[f"{name}.qweight"])
                     for name, layer in model.named_modules() if isinstance(layer, ViDiTQLoraLinear)]
    assert all(codes_changed)  # re-quantized with the delta, not dropped
    fused = sample(w8a8)
    # one more weight rounding: close to the unfused LoRA and just as mirrored
    print(f"PSNR fused vs unfused LoRA (W8A8): {psnr(fused, unfused):.2f} dB")
    assert psnr(fused, unfused) > 35, psnr(fused, unfused)
    fused_score, unfused_score = (mirror_score(classifier, m, DIGITS)["mirrored"] for m in (fused, unfused))
    assert fused_score >= unfused_score - 0.15

    with pytest.raises(ValueError, match="unfuse_lora"):
        delete_adapter_layers(model, "mirror")

    for layer in lora_layers(model):  # diffusers' unfuse_lora
        layer.unmerge()
    assert_same_state(model, state)
    assert torch.equal(sample(w8a8), unfused)

    # fused, then unloaded (on a copy; the module's pipeline stays as it was): a plain W8A8 model with the
    # LoRA in its codes
    baked = copy.deepcopy(model)
    for layer in lora_layers(baked):
        layer.merge()
    unload(baked)
    assert not any(isinstance(m, BaseTunerLayer) for m in baked.modules())
    assert sum(isinstance(m, ViDiTQLinear) for m in baked.modules()) == len(lora_layers(model))
    baked_pipe = type(w8a8)(**{**w8a8.components, "transformer": baked})
    baked_pipe.set_progress_bar_config(disable=True)
    assert torch.equal(sample(baked_pipe), fused)


# ------------------------------------------------------------------------------------------------ loading


def test_load_lora_file_refuses_what_it_cannot_load(fp, tmp_path, lora_free):
    model = fp.transformer
    with pytest.raises(FileNotFoundError):
        load_lora_file(model, str(tmp_path / "nothing"))
    save_file({"unet.down.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="diffusers/PEFT format"):
        load_lora_file(model, str(tmp_path / "other.safetensors"))
    # a LoRA for a layer this model does not have: an error, not a silently skipped tensor
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 128),
               "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(128, 4),
               "transformer.transformer_blocks.0.attn1.nope.lora_A.weight": torch.zeros(4, 128),
               "transformer.transformer_blocks.0.attn1.nope.lora_B.weight": torch.zeros(128, 4)},
              str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="match no layer|not found"):
        load_lora_file(model, str(tmp_path / "wrong.safetensors"), adapter_name="wrong")
    unload(model)

    config = load_lora_file(model, LORA, adapter_name="mirror")
    assert config.r == 8 and config.lora_alpha == 8
    with pytest.raises(ValueError, match="already loaded"):
        load_lora_file(model, LORA, adapter_name="mirror")
    # without the config in the metadata, rank and alpha come from the tensors as diffusers infers them
    from safetensors.torch import load_file
    save_file(load_file(os.path.join(LORA, "pytorch_lora_weights.safetensors")), str(tmp_path / "bare.safetensors"))
    inferred = load_lora_file(model, str(tmp_path / "bare.safetensors"), adapter_name="bare")
    assert inferred.r == 8 and inferred.lora_alpha == 8
