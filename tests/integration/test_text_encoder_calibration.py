"""Calibrating a text encoder on prompts with `calibrate(pipe, prompts, component="text_encoder")`: statistics
keyed by the encoder's layers that serve W8A8 with balancing on that encoder, through `<Encoder>.from_pretrained`
and a pipeline's `quant_mapping`. The encoder is the synthetic T5 with T5-like activation outliers
(`viditq_diffusers.testing.t5_outliers`) at the tiny PixArt pipeline's width, so the pipeline still runs."""

from __future__ import annotations

import pytest
import torch
import transformers

import viditq_diffusers  # noqa: F401  (registers viditq with transformers)
from viditq_diffusers import ViDiTQConfig, ViDiTQLinear, calibrate
from viditq_diffusers.text_encoders import TEXT_ENCODER_BLOCKS

WORDS = "a photo of cat dog red blue car house tree under over small big the sky night day".split()


def prompts(count: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (8,), generator=generator)) for _ in range(count)]


@pytest.fixture(scope="module")
def outlier_pipeline(tmp_path_factory):
    """(pipeline folder, encoder folder): the tiny PixArt pipeline with its T5 swapped for the outlier T5."""
    from diffusers import DiffusionPipeline

    from viditq_diffusers.testing.t5_outliers import outlier_t5_encoder
    from viditq_diffusers.testing.zoo import build_tiny_pixart_pipeline

    root = tmp_path_factory.mktemp("outliers")
    pipe = DiffusionPipeline.from_pretrained(build_tiny_pixart_pipeline(root / "pixart"))
    pipe.text_encoder = outlier_t5_encoder(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=2,
                                           vocab_size=len(pipe.tokenizer), k=30.0, channels=2)
    pipe.save_pretrained(root / "pipe")
    pipe.text_encoder.save_pretrained(root / "encoder")
    return root / "pipe", root / "encoder"


@pytest.fixture(scope="module")
def pipe(outlier_pipeline):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(outlier_pipeline[0])


@pytest.fixture(scope="module")
def stats(pipe):
    return calibrate(pipe, prompts(16, seed=0), component="text_encoder")


def embedding(encoder, tokenizer, texts) -> torch.Tensor:
    batch = tokenizer(texts, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state


def test_statistics_are_keyed_by_the_encoders_layers(stats, pipe):
    encoder = pipe.text_encoder
    assert stats.model_class == "T5EncoderModel"
    blocks = TEXT_ENCODER_BLOCKS["T5EncoderModel"][0]
    assert stats.layers and all(name.startswith(f"{blocks}.") for name in stats.layers)
    assert all(stats.in_features[n] == encoder.get_submodule(n).in_features for n in stats.layers)
    assert stats.settings["component"] == "text_encoder" and stats.settings["timestep_buckets"] == 1
    assert all(stats.bucket_absmax[n].shape[0] == 1 for n in stats.layers) and not stats.cfg_absmax
    stats.check_matches(encoder)
    # the outliers the synthetic puts on 2 hidden channels show in the inputs of the attention projections
    assert stats.outlier_ratio()[f"{blocks}.0.layer.0.SelfAttention.q"] > 5


def test_calibrated_w8a8_encoder_has_less_embedding_error_than_uncalibrated(stats, pipe, outlier_pipeline):
    """Measured here on prompts the calibration did not see: balancing from the statistics ("search") against
    plain dynamic W8A8, both against the floating-point encoder."""
    folder, tokenizer = outlier_pipeline[1], pipe.tokenizer
    held_out = prompts(8, seed=1)
    reference = embedding(transformers.T5EncoderModel.from_pretrained(folder).eval(), tokenizer, held_out)

    def error(config) -> float:
        model = transformers.T5EncoderModel.from_pretrained(folder, quantization_config=config).eval()
        formats = {(m.weight_bits, m.act_bits) for m in model.modules() if isinstance(m, ViDiTQLinear)}
        assert formats == {(8, 8), (8, 16)}  # (8, 16): `wo`
        out = embedding(model, tokenizer, held_out)
        return float((out - reference).norm() / reference.norm())

    calibrated = ViDiTQConfig("w8a8", calibration=stats)
    assert calibrated.balance == "search"
    plain, balanced = error(ViDiTQConfig("w8a8")), error(calibrated)
    # about 0.6x here (0.4x to 0.8x over other held-out prompt sets): the margin keeps it from passing on noise
    assert balanced < 0.85 * plain, (balanced, plain)


def test_quant_mapping_takes_the_encoder_statistics(stats, outlier_pipeline, pipe):
    """The same statistics through diffusers' `PipelineQuantizationConfig`: the pipeline's encoder is the one
    `from_pretrained` builds, bit for bit, and the pipeline still generates."""
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    mapping = {"text_encoder": ViDiTQConfig("w8a8", calibration=stats), "transformer": ViDiTQConfig("w8a8")}
    quantized = DiffusionPipeline.from_pretrained(outlier_pipeline[0],
                                                  quantization_config=PipelineQuantizationConfig(quant_mapping=mapping))
    alone = transformers.T5EncoderModel.from_pretrained(outlier_pipeline[1],
                                                        quantization_config=ViDiTQConfig("w8a8", calibration=stats))
    texts = prompts(2, seed=2)
    assert torch.equal(embedding(quantized.text_encoder.eval(), pipe.tokenizer, texts),
                       embedding(alone.eval(), pipe.tokenizer, texts))
    specs = quantized.text_encoder.config.quantization_config.plan["layers"].values()
    assert any(spec.smooth_alpha is not None or spec.rotation_seed is not None for spec in specs)
    quantized.set_progress_bar_config(disable=True)
    images = quantized(texts[:1], num_inference_steps=2, height=32, width=32, use_resolution_binning=False,
                       output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(images).all()


def test_a_bare_encoder_is_calibrated_with_run(pipe, stats):
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    bare = calibrate(encoder, prompts(4, seed=0), run=lambda prompt, generator: encoder(**tokenizer([prompt],
                                                                                                    return_tensors="pt")))
    assert bare.layers == stats.layers and bare.settings["component"] is None and not bare.cfg_absmax


@pytest.mark.parametrize("component, message", [
    ("text_encoder_2", r"'text_encoder_2' is not a component of this PixArtAlphaPipeline.*'text_encoder'"),
    ("tokenizer", r"'tokenizer' is a T5Tokenizer\w* in this PixArtAlphaPipeline.*'text_encoder'"),
    ("vae", r"'vae' is a AutoencoderKL in this PixArtAlphaPipeline"),
])
def test_a_component_that_is_no_text_encoder_is_refused(pipe, component, message):
    with pytest.raises(ValueError, match=message):
        calibrate(pipe, ["a cat"], component=component)


def test_component_on_a_bare_model_is_refused(pipe):
    with pytest.raises(ValueError, match=r"component='text_encoder' names a component of a diffusers pipeline"):
        calibrate(pipe.text_encoder, ["a cat"], component="text_encoder")


def test_statistics_of_another_model_are_refused(stats, pipe, tmp_path):
    # another T5 (other widths): the layers do not match
    wider = transformers.T5EncoderModel(transformers.T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128,
                                                              num_layers=2, num_heads=4,
                                                              feed_forward_proj="gated-gelu"))
    wider.save_pretrained(tmp_path / "wider")
    with pytest.raises(ValueError, match=r"(?s)recorded on another T5EncoderModel.*input features.*component="):
        transformers.T5EncoderModel.from_pretrained(tmp_path / "wider",
                                                    quantization_config=ViDiTQConfig("w8a8", calibration=stats))
    # the encoder's statistics on the denoiser
    with pytest.raises(ValueError, match=r"recorded on T5EncoderModel, this model is PixArtTransformer2DModel; "
                                         r"recalibrate with `viditq calibrate"):
        stats.check_matches(pipe.transformer)
