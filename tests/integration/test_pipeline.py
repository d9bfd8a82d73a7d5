"""DiffusionPipeline.from_pretrained(..., quantization_config=ViDiTQConfig(...)) on a tiny PixArt pipeline."""

import pytest
import torch
from diffusers import DiffusionPipeline

from viditq_diffusers import ViDiTQConfig, ViDiTQLinear
from viditq_diffusers.testing.zoo import build_tiny_pixart_pipeline

CALL = dict(prompt="a thick digit 7", num_inference_steps=2, height=32, width=32,
            use_resolution_binning=False, clean_caption=False, output_type="np")


def generate(pipe, seed=0):
    return pipe(**CALL, generator=torch.Generator().manual_seed(seed)).images


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_tiny_pixart_pipeline(tmp_path_factory.mktemp("pixart") / "pipe", seed=0)


@pytest.fixture(scope="module")
def quantized(pipeline_dir):
    return DiffusionPipeline.from_pretrained(pipeline_dir, quantization_config=ViDiTQConfig(preset="w8a8"))


def test_only_the_transformer_is_quantized(quantized):
    assert any(isinstance(m, ViDiTQLinear) for m in quantized.transformer.modules())
    for name in ("text_encoder", "vae"):
        assert not any(isinstance(m, ViDiTQLinear) for m in getattr(quantized, name).modules()), name
    assert quantized.transformer.config.quantization_config.plan["layers"]


def test_generates_close_to_fp(pipeline_dir, quantized):
    fp = DiffusionPipeline.from_pretrained(pipeline_dir)
    image, reference = generate(quantized), generate(fp)
    assert image.shape == reference.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()
    assert 0 < abs(image - reference).max() < 0.1


def test_save_reload_bit_identical(quantized, tmp_path):
    image = generate(quantized)
    quantized.save_pretrained(tmp_path / "q")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "q")
    assert isinstance(reloaded.transformer.transformer_blocks[0].attn1.to_q, ViDiTQLinear)
    assert (generate(reloaded) == image).all()


def test_model_cpu_offload_same_output(pipeline_dir):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, quantization_config=ViDiTQConfig(preset="w8a8"))
    image = generate(pipe)
    pipe.enable_model_cpu_offload(device="cpu")  # CPU-only torch: offload "to" the CPU itself
    assert (generate(pipe) == image).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate's sequential offload needs an accelerator "
                    "(on CPU-only torch it fails inside accelerate even for a plain nn.Linear)")
def test_offload_on_gpu_same_output(pipeline_dir):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, quantization_config=ViDiTQConfig(preset="w8a8")).to("cuda")
    image = generate(pipe)
    for enable in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        pipe = DiffusionPipeline.from_pretrained(pipeline_dir, quantization_config=ViDiTQConfig(preset="w8a8"))
        getattr(pipe, enable)()
        assert (generate(pipe) == image).all(), enable
