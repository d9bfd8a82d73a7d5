"""Text encoders through transformers' quantizer API: `<Encoder>.from_pretrained(path, quantization_config=
ViDiTQConfig(...))` quantizes as it loads, the plan keeps the right layers in floating point, and a saved model
reloads without the config argument, bit for bit. Tiny configs built offline (random weights)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from torch import nn

import viditq_diffusers  # noqa: F401  (registers viditq with transformers)
from viditq_diffusers import ViDiTQConfig, ViDiTQLinear
from viditq_diffusers.convert import quantized_layers, set_submodule
from viditq_diffusers.text_encoders import TEXT_ENCODER_BLOCKS

VOCAB = 96


def t5_config(cls=transformers.T5Config):
    return cls(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=8)


def clip_config():
    return transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=16, projection_dim=32,
                                       bos_token_id=0, eos_token_id=1, pad_token_id=1)


def decoder_config(cls):  # Gemma2 (Sana) and Llama (HunyuanVideo): the decoder stacks used as text encoders
    return cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=32)


def qwen_vl_config():  # QwenImage's encoder: Qwen2.5-VL, a language model with a vision tower
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 10000.0})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[0])
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=VOCAB - 4,
                                         video_token_id=VOCAB - 3, vision_start_token_id=VOCAB - 2,
                                         vision_end_token_id=VOCAB - 1)


# class -> (config, regex of the `_keep_in_fp32_modules` linears inside the blocks: quantized weight-only in any preset)
ENCODERS = {
    "T5EncoderModel": (transformers.T5EncoderModel, t5_config, r".*\.wo"),
    "UMT5EncoderModel": (transformers.UMT5EncoderModel, lambda: t5_config(transformers.UMT5Config), r".*\.wo"),
    "CLIPTextModel": (transformers.CLIPTextModel, clip_config, None),
    "CLIPTextModelWithProjection": (transformers.CLIPTextModelWithProjection, clip_config, None),
    "Gemma2Model": (transformers.Gemma2Model, lambda: decoder_config(transformers.Gemma2Config), None),
    "LlamaModel": (transformers.LlamaModel, lambda: decoder_config(transformers.LlamaConfig), None),
    # transformers 5 saves these in the Hub's layout (`model.layers.*`, `visual.*`) and renames the keys as it
    # loads, so the FP folders below are laid out as released Qwen2.5-VL / QwenImage checkpoints are
    "Qwen2_5_VLForConditionalGeneration": (transformers.Qwen2_5_VLForConditionalGeneration, qwen_vl_config, None),
    "Qwen2_5_VLModel": (transformers.Qwen2_5_VLModel, qwen_vl_config, None),
    "Qwen2_5_VLTextModel": (transformers.Qwen2_5_VLTextModel, lambda: qwen_vl_config().text_config, None),
}


def tokens(seed: int = 0) -> torch.Tensor:  # below Qwen2.5-VL's image / video tokens (the last 4 of VOCAB)
    return torch.randint(2, VOCAB - 4, (2, 9), generator=torch.Generator().manual_seed(seed))


def encode(model, ids) -> torch.Tensor:
    """The text embedding: the last hidden state (QwenImage reads it from a Qwen2.5-VL's hidden states too)."""
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        last = getattr(out, "last_hidden_state", None)
        return (out.hidden_states[-1] if last is None else last).float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def linears(model) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, (nn.Linear, ViDiTQLinear))}


@pytest.fixture(scope="module")
def fp_checkpoints(tmp_path_factory):
    """{class name: folder of its floating-point checkpoint (fp32)}."""
    folders = {}
    for name, (cls, config, _) in ENCODERS.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name)
        cls(config()).eval().save_pretrained(folder)
        folders[name] = folder
    return folders


def test_every_supported_class_is_tested():
    assert set(ENCODERS) == set(TEXT_ENCODER_BLOCKS)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_quantize_as_load_layers_quality_and_bit_identical_reload(name, fp_checkpoints, tmp_path):
    cls, _, weight_only_pattern = ENCODERS[name]
    folder = fp_checkpoints[name]
    fp = cls.from_pretrained(folder).eval()
    config = ViDiTQConfig("w8a16")
    model = cls.from_pretrained(folder, quantization_config=config).eval()
    assert config.plan is None  # the caller's config is not written into

    # which linears: every attention / FFN linear of the blocks (T5's `wo` included, weight-only), none outside
    blocks = TEXT_ENCODER_BLOCKS[name]
    layers = linears(model)
    in_blocks = {n for n in layers if any(re.match(rf"{re.escape(b)}\.\d+\.", n) for b in blocks)}
    assert {n for n, kind in layers.items() if kind == "ViDiTQLinear"} == in_blocks
    assert all(layers[n] == "Linear" for n in set(layers) - in_blocks)  # outside the blocks: FP
    if name == "CLIPTextModelWithProjection":
        assert layers["text_projection"] == "Linear"
    if name.startswith("Qwen2_5_VL") and name != "Qwen2_5_VLTextModel":  # the vision tower and lm_head stay FP
        fp_outside = {n for n in layers if "visual." in n or n == "lm_head"}
        assert fp_outside and all(layers[n] == "Linear" for n in fp_outside)
    assert bool(weight_only_pattern) == bool(getattr(model, "_keep_in_fp32_modules", None))
    assert set(model.config.quantization_config.plan["layers"]) == in_blocks
    assert all(not p.requires_grad for n, p in model.named_parameters()
               if isinstance(model.get_submodule(n.rpartition(".")[0]), ViDiTQLinear))

    # the same layers as quantizing the loaded floating-point model in memory, bit for bit
    plan, built = quantized_layers(fp, ViDiTQConfig("w8a16"))
    for layer_name, layer in built:
        set_submodule(fp, layer_name, layer)
    ids = tokens()
    out = encode(model, ids)
    assert torch.equal(out, encode(fp, ids))
    reference = encode(cls.from_pretrained(folder).eval(), ids)
    assert cosine(out, reference) > 0.999

    # save, reload without the config argument: config.json carries it
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "viditq" and saved["preset"] == "w8a16"
    reloaded = cls.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.config.quantization_config, ViDiTQConfig)
    assert linears(reloaded) == layers
    assert torch.equal(encode(reloaded, ids), out)
    assert torch.equal(encode(reloaded, tokens(1)), encode(model, tokens(1)))


def test_t5_bf16_loads_and_reloads_in_bf16(fp_checkpoints, tmp_path):
    folder = fp_checkpoints["T5EncoderModel"]
    model = transformers.T5EncoderModel.from_pretrained(folder, quantization_config=ViDiTQConfig("w8a16"),
                                                        dtype=torch.bfloat16).eval()
    q = model.encoder.block[0].layer[0].SelfAttention.q
    assert isinstance(q, ViDiTQLinear) and q.weight.dtype == torch.bfloat16 and q.qweight.dtype == torch.int8
    assert model.config.quantization_config.plan["dtype"] == "bfloat16"
    reference = encode(transformers.T5EncoderModel.from_pretrained(folder, dtype=torch.bfloat16).eval(), tokens())
    out = encode(model, tokens())
    assert cosine(out, reference) > 0.995
    model.save_pretrained(tmp_path)
    reloaded = transformers.T5EncoderModel.from_pretrained(tmp_path).eval()  # dtype from config.json
    assert reloaded.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.bfloat16
    assert torch.equal(encode(reloaded, tokens()), out)


@pytest.mark.parametrize("name", ["T5EncoderModel", "UMT5EncoderModel"])
def test_t5_wo_computes_in_fp32_in_an_fp16_load(name, fp_checkpoints, tmp_path):
    """transformers keeps `_keep_in_fp32_modules` (`wo`) in fp32 when loading in fp16, as its activations overflow
    fp16: quantized weight-only, `wo` still takes fp32 inputs and computes in fp32, and reloads bit-identical."""
    cls = ENCODERS[name][0]
    model = cls.from_pretrained(fp_checkpoints[name], quantization_config=ViDiTQConfig("w8a8"),
                                dtype=torch.float16).eval()
    ffn = model.encoder.block[0].layer[1].DenseReluDense
    assert isinstance(ffn.wo, ViDiTQLinear) and ffn.wo.spec.label() == "W8A16" and ffn.wo.qweight.dtype == torch.int8
    assert ffn.wo.weight.dtype == torch.float32 and ffn.wi_0.weight.dtype == torch.float16
    seen = []
    ffn.wo.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    out = encode(model, tokens())
    assert seen == [(torch.float32, torch.float32)] and torch.isfinite(out).all()
    reference = encode(cls.from_pretrained(fp_checkpoints[name], dtype=torch.float16).eval(), tokens())
    assert cosine(out, reference) > 0.995
    model.save_pretrained(tmp_path)
    reloaded = cls.from_pretrained(tmp_path).eval()
    assert reloaded.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert torch.equal(encode(reloaded, tokens()), out)


@pytest.mark.parametrize("kwargs, label, wo_label, minimum", [
    ({"preset": "w4a16", "group_size": 32}, "W4A16-g32", "W4A16-g32", 0.98),  # random 64-wide weights, every linear W4
    ({"preset": "w8a8"}, "W8A8", "W8A16", 0.995),  # `wo`'s activations are never quantized
])
def test_t5_other_presets(kwargs, label, wo_label, minimum, fp_checkpoints, tmp_path):
    folder = fp_checkpoints["T5EncoderModel"]
    model = transformers.T5EncoderModel.from_pretrained(folder, quantization_config=ViDiTQConfig(**kwargs)).eval()
    layers = model.config.quantization_config.plan["layers"]
    assert {spec.label() for name, spec in layers.items() if not name.endswith(".wo")} == {label}
    assert {spec.label() for name, spec in layers.items() if name.endswith(".wo")} == {wo_label}
    reference = encode(transformers.T5EncoderModel.from_pretrained(folder).eval(), tokens())
    out = encode(model, tokens())
    assert cosine(out, reference) > minimum
    model.save_pretrained(tmp_path)
    assert torch.equal(encode(transformers.T5EncoderModel.from_pretrained(tmp_path).eval(), tokens()), out)


@pytest.mark.parametrize("config", [ViDiTQConfig(), ViDiTQConfig(group_size=32), {"quant_method": "viditq"}],
                         ids=["ViDiTQConfig()", "group_size only", "dict"])
def test_a_config_without_a_precision_gives_an_encoder_w8a16_and_config_json_says_so(config, fp_checkpoints,
                                                                                      tmp_path):
    """No preset, bits, calibration or plan: a text encoder takes its own default, weight-only W8A16 (the
    denoiser's is W8A8); the saved config.json records the preset applied, so the reload needs no argument."""
    folder = fp_checkpoints["T5EncoderModel"]
    model = transformers.T5EncoderModel.from_pretrained(folder, quantization_config=config).eval()
    group = 32 if isinstance(config, ViDiTQConfig) and config.group_size else None
    assert precisions(model) == {(8, 16)}
    assert {m.group_size for m in model.modules() if isinstance(m, ViDiTQLinear)} == {group}
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (saved["preset"], saved["weight_bits"], saved["act_bits"], saved["group_size"]) == ("w8a16", 8, 16, group)
    assert torch.equal(encode(transformers.T5EncoderModel.from_pretrained(tmp_path).eval(), tokens()),
                       encode(model, tokens()))


@pytest.mark.parametrize("kwargs", [{"preset": "w8a8"}, {"act_bits": 8}, {"weight_bits": 8}])
def test_a_chosen_precision_is_kept_on_an_encoder(kwargs, fp_checkpoints):
    model = transformers.T5EncoderModel.from_pretrained(fp_checkpoints["T5EncoderModel"],
                                                        quantization_config=ViDiTQConfig(**kwargs))
    assert precisions(model) == {(8, 8), (8, 16)}  # (8, 16): `wo`, weight-only in every preset


def test_the_default_config_still_reads_as_the_denoisers_w8a8():
    """`ViDiTQConfig()` is unchanged as data: the denoiser checkpoints it writes, its equality and its repr."""
    default, w8a8 = ViDiTQConfig(), ViDiTQConfig("w8a8")
    assert default.to_dict() == w8a8.to_dict() and default == w8a8 and repr(default) == repr(w8a8)
    assert default.preset == "w8a8" and (default.weight_bits, default.act_bits) == (8, 8)
    assert w8a8.for_text_encoder() is w8a8 and default.for_text_encoder() == ViDiTQConfig("w8a16")


def test_unsupported_class_names_it_and_the_supported_ones(tmp_path):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4)
    transformers.BertModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"BertModel.*T5EncoderModel, UMT5EncoderModel, CLIPTextModel"):
        transformers.BertModel.from_pretrained(tmp_path, quantization_config=ViDiTQConfig("w8a16"))


def test_denoiser_mixed_precision_preset_is_refused(fp_checkpoints):
    with pytest.raises(ValueError, match=r"w4a8_mp.*T5EncoderModel.*'w8a16'"):
        transformers.T5EncoderModel.from_pretrained(fp_checkpoints["T5EncoderModel"],
                                                    quantization_config=ViDiTQConfig("w4a8_mp"))


@pytest.mark.parametrize("name, layer", [
    ("T5EncoderModel", "encoder.block.0.layer.0.SelfAttention.q"),
    # saved under the Hub's key names (`model.layers.0...`): the check maps them to the model's names first
    ("Qwen2_5_VLForConditionalGeneration", "model.language_model.layers.0.self_attn.q_proj"),
])
def test_reload_refuses_a_plan_edited_in_config_json(name, layer, fp_checkpoints, tmp_path):
    cls = ENCODERS[name][0]
    model = cls.from_pretrained(fp_checkpoints[name], quantization_config=ViDiTQConfig("w8a16"))
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"]["plan"]["layers"][layer]["weight_bits"] = 4
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"(?s)does not match the weights saved with it.*{re.escape(layer)}"):
        cls.from_pretrained(tmp_path)


def test_a_lora_on_a_quantized_encoder_passes_transformers_training_check_and_trains(fp_checkpoints):
    """transformers' Trainer refuses a quantized model whose method cannot train (`hf_quantizer.is_trainable`);
    a LoRA trains through ViDiT-Q layers, so a quantized encoder with one passes, and a step moves only the LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers.trainer_utils import validate_quantization_for_training

    model = transformers.T5EncoderModel.from_pretrained(fp_checkpoints["T5EncoderModel"],
                                                        quantization_config=ViDiTQConfig("w8a8"))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights="gaussian"))
    validate_quantization_for_training(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(input_ids=tokens())[0].float().pow(2).mean().backward()
    torch.optim.SGD(trainable, lr=0.1).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


PIPELINE_CALL = dict(num_inference_steps=2, guidance_scale=4.5, height=32, width=32, use_resolution_binning=False,
                     clean_caption=False, output_type="pt")


def generate(pipe):
    return pipe(["a digit 7"], generator=torch.Generator().manual_seed(0), **PIPELINE_CALL).images


def precisions(model) -> set[tuple[int, int]]:
    return {(m.weight_bits, m.act_bits) for m in model.modules() if isinstance(m, ViDiTQLinear)}


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from viditq_diffusers.testing.zoo import build_tiny_pixart_pipeline
    return build_tiny_pixart_pipeline(tmp_path_factory.mktemp("pipe") / "pixart")


def test_pipeline_components_quantize_the_text_encoder_w8a16_and_reload_bit_identical(tiny_pipeline, tmp_path):
    """`components=["transformer", "text_encoder"]`: the denoiser takes the config, the T5 encoder the encoders'
    default W8A16; the whole pipeline saves and reloads without a config, the same images bit for bit."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        tiny_pipeline, quantization_config=ViDiTQConfig("w8a8", components=["transformer", "text_encoder"]))
    pipe.set_progress_bar_config(disable=True)
    assert precisions(pipe.text_encoder) == {(8, 16)} and precisions(pipe.transformer) == {(8, 8)}
    images = generate(pipe)
    pipe.save_pretrained(tmp_path / "q")
    again = DiffusionPipeline.from_pretrained(tmp_path / "q")
    again.set_progress_bar_config(disable=True)
    assert precisions(again.text_encoder) == {(8, 16)}
    assert torch.equal(generate(again), images)


def test_pipeline_quantization_config_gives_each_component_its_preset(tiny_pipeline):
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    mapping = {"text_encoder": ViDiTQConfig("w4a16", group_size=32), "transformer": ViDiTQConfig("w4a8")}
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline,
                                             quantization_config=PipelineQuantizationConfig(quant_mapping=mapping))
    assert precisions(pipe.text_encoder) == {(4, 16)} and precisions(pipe.transformer) == {(4, 8)}
    assert {m.group_size for m in pipe.text_encoder.modules() if isinstance(m, ViDiTQLinear)} == {32}


def test_pipeline_quantization_config_with_default_configs_gives_encoder_w8a16_and_denoiser_w8a8(tiny_pipeline,
                                                                                                    tmp_path):
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    mapping = {"text_encoder": ViDiTQConfig(), "transformer": ViDiTQConfig()}
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline,
                                             quantization_config=PipelineQuantizationConfig(quant_mapping=mapping))
    assert precisions(pipe.text_encoder) == {(8, 16)} and precisions(pipe.transformer) == {(8, 8)}
    pipe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "transformer" / "config.json").read_text())["quantization_config"]
    assert {k: v for k, v in saved.items() if k != "plan"} == {
        k: v for k, v in json.loads(json.dumps(ViDiTQConfig("w8a8").to_dict())).items() if k != "plan"}


def test_pipeline_components_naming_a_tokenizer_is_refused(tiny_pipeline):
    from diffusers import DiffusionPipeline

    with pytest.raises(ValueError, match=r"\['tokenizer'\].*not a diffusers model or a supported text encoder"):
        DiffusionPipeline.from_pretrained(tiny_pipeline,
                                          quantization_config=ViDiTQConfig(components=["transformer", "tokenizer"]))


def test_quantize_on_a_loaded_encoder_equals_quantize_as_load_and_saves(fp_checkpoints, tmp_path):
    """`viditq_diffusers.quantize` on an encoder already in memory: the encoder default (W8A16) as on load, the
    same outputs bit for bit, the caller's config untouched, and a save that reloads without the config."""
    folder = fp_checkpoints["T5EncoderModel"]
    config = ViDiTQConfig()
    model = viditq_diffusers.quantize(transformers.T5EncoderModel.from_pretrained(folder).eval(), config)
    loaded = transformers.T5EncoderModel.from_pretrained(folder, quantization_config=ViDiTQConfig()).eval()
    assert config.plan is None and precisions(model) == {(8, 16)}
    assert torch.equal(encode(model, tokens()), encode(loaded, tokens()))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["preset"] == "w8a16"
    assert torch.equal(encode(transformers.T5EncoderModel.from_pretrained(tmp_path).eval(), tokens()),
                       encode(model, tokens()))
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match="BertModel.*supported transformers text encoders"):
        viditq_diffusers.quantize(bert, ViDiTQConfig())
