"""push_to_hub against a local Hub-compatible server, then from_pretrained("user/repo"), bit-identical."""

import pytest
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import hf_hub_download

from tests.support.hub_server import LocalHub
from viditq_diffusers import ViDiTQConfig, push_to_hub
from viditq_diffusers.cli import main as cli
from viditq_diffusers.testing.zoo import ZOO, build_tiny_pixart_pipeline, run

PIXART = ZOO["PixArtTransformer2DModel"]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with LocalHub() as hub:
        hub.patch_env(monkeypatch, home=tmp_path / "hf_home", token="hf_test_token")
        yield hub
        assert hub.unhandled == []


def test_model_push_and_reload(hub, tmp_path):
    PIXART.build(seed=0).save_pretrained(tmp_path / "fp")
    model = PIXART.cls.from_pretrained(tmp_path / "fp", quantization_config=ViDiTQConfig(preset="w4a8", group_size=32))
    url = model.push_to_hub("user/pixart-w4a8")
    assert "user/pixart-w4a8" in url and ("POST", "/api/models/user/pixart-w4a8/commit/main") in hub.requests
    assert any(path.startswith("/lfs-upload/") for _, path in hub.requests), "safetensors goes through LFS"

    reloaded = PIXART.cls.from_pretrained("user/pixart-w4a8")
    inputs = PIXART.make_inputs(0)
    with torch.no_grad():
        assert torch.equal(run(reloaded, inputs), run(model, inputs))

    card = open(hf_hub_download("user/pixart-w4a8", "README.md")).read()
    for expected in ("library_name: diffusers", "ViDiT-Q", "W4A8-g32: 10", "weights in FP16", "ratio",
                     'PixArtTransformer2DModel.from_pretrained("user/pixart-w4a8")', "import viditq_diffusers"):
        assert expected in card, expected


def test_pipeline_push_and_reload(hub, tmp_path):
    path = build_tiny_pixart_pipeline(tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(path, quantization_config=ViDiTQConfig(preset="w8a8"))
    push_to_hub(pipe, "user/tiny-pixart-w8a8")
    reloaded = DiffusionPipeline.from_pretrained("user/tiny-pixart-w8a8")
    call = dict(prompt="a thin digit 3", num_inference_steps=2, height=32, width=32, output_type="np",
                use_resolution_binning=False, clean_caption=False)
    images = [p(**call, generator=torch.Generator().manual_seed(3)).images for p in (pipe, reloaded)]
    assert (images[0] == images[1]).all()
    card = open(hf_hub_download("user/tiny-pixart-w8a8", "README.md")).read()
    assert "| transformer | PixArtTransformer2DModel |" in card and "DiffusionPipeline.from_pretrained" in card


def test_cli_quantize_and_push(hub, tmp_path, capsys):
    PIXART.build(seed=0).save_pretrained(tmp_path / "fp")
    assert cli(["quantize", str(tmp_path / "fp"), "--preset", "w8a8", "--out", str(tmp_path / "q"),
                "--push", "user/cli-w8a8"]) == 0
    assert "pushed: " in capsys.readouterr().out
    local, remote = PIXART.cls.from_pretrained(tmp_path / "q"), PIXART.cls.from_pretrained("user/cli-w8a8")
    inputs = PIXART.make_inputs(0)
    with torch.no_grad():
        assert torch.equal(run(local, inputs), run(remote, inputs))


def test_push_without_token_fails(monkeypatch, tmp_path):
    with LocalHub() as hub:
        hub.patch_env(monkeypatch, home=tmp_path / "hf_home")
        PIXART.build(seed=0).save_pretrained(tmp_path / "fp")
        model = PIXART.cls.from_pretrained(tmp_path / "fp", quantization_config=ViDiTQConfig())
        with pytest.raises(Exception, match="401"):
            model.push_to_hub("user/no-token", token=False)


def test_text_encoder_and_whole_pipeline_push_and_reload(hub, tmp_path):
    """A quantized transformers text encoder pushes with transformers' own `push_to_hub`, and a pipeline whose text
    encoder is quantized too with ours; both reload from the Hub without a config, bit for bit."""
    import transformers

    from viditq_diffusers import ViDiTQLinear

    path = build_tiny_pixart_pipeline(tmp_path / "pipe")
    encoder = transformers.T5EncoderModel.from_pretrained(path, subfolder="text_encoder",
                                                          quantization_config=ViDiTQConfig("w8a16"))
    encoder.push_to_hub("user/t5-w8a16")
    again = transformers.T5EncoderModel.from_pretrained("user/t5-w8a16")
    ids = torch.randint(2, 50, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids)[0], encoder(input_ids=ids)[0])
    assert any(isinstance(m, ViDiTQLinear) for m in again.modules())

    pipe = DiffusionPipeline.from_pretrained(
        path, quantization_config=ViDiTQConfig(preset="w8a8", components=["transformer", "text_encoder"]))
    push_to_hub(pipe, "user/tiny-pixart-w8a8-te")
    reloaded = DiffusionPipeline.from_pretrained("user/tiny-pixart-w8a8-te")
    assert any(isinstance(m, ViDiTQLinear) for m in reloaded.text_encoder.modules())
    call = dict(prompt="a thin digit 3", num_inference_steps=2, height=32, width=32, output_type="np",
                use_resolution_binning=False, clean_caption=False)
    images = [p(**call, generator=torch.Generator().manual_seed(3)).images for p in (pipe, reloaded)]
    assert (images[0] == images[1]).all()
