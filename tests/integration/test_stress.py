"""viditq_diffusers.testing.stress: function-preserving outlier injection on adaLN-single DiTs (PixArt, Latte)."""

import pytest
import torch
from diffusers import DiffusionPipeline

from viditq_diffusers.testing.stress import channel_absmax_ratio, stress
from viditq_diffusers.testing.zoo import ZOO, build_tiny_pixart_pipeline, run

from tests.support import REPO

MODELS = ["PixArtTransformer2DModel", "LatteTransformer3DModel"]


def float64(name, seed=0):
    """The zoo model and its inputs in float64."""
    entry = ZOO[name]
    inputs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in entry.make_inputs(seed).items()}
    return entry.build(seed).double(), inputs


@pytest.mark.parametrize("name", MODELS)
def test_stress_preserves_output_and_creates_outliers(name):
    model, inputs = float64(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stressed = stress(model, seed=0, k=100.0)
    with torch.no_grad():
        ref, out = run(model, inputs), run(stressed, inputs)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-10  # issue asks <= 1e-5; measured ~2e-16
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert stressed.viditq_stress["synthetic"] and not hasattr(model, "viditq_stress")

    plain, hot = channel_absmax_ratio(model, inputs), channel_absmax_ratio(stressed, inputs)
    n_blocks = len(model.transformer_blocks) + len(getattr(model, "temporal_transformer_blocks", []))
    assert set(plain) == set(hot) and len(hot) == 2 * n_blocks  # to_q and ff.net.0.proj of every block
    assert max(plain.values()) < 5 and min(hot.values()) >= 50, (plain, hot)


def test_outlier_ratio_varies_with_timestep():
    model, inputs = float64("PixArtTransformer2DModel")
    stressed = stress(model, seed=0, k=100.0)
    early, late = (channel_absmax_ratio(stressed, dict(inputs, timestep=torch.tensor([t, t]))) for t in (10, 900))
    rel = {n: abs(early[n] - late[n]) / early[n] for n in early}
    assert max(rel.values()) > 0.05, (early, late)


def test_explicit_channels_and_errors():
    model, inputs = float64("PixArtTransformer2DModel")
    stressed = stress(model, k=10.0, channels={"msa": [0, 5], "mlp": [7]})
    assert stressed.viditq_stress["channels"] == {"msa": [0, 5], "mlp": [7]}
    with torch.no_grad():
        assert torch.allclose(run(stressed, inputs), run(model, inputs), rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="adaln_single"):
        stress(ZOO["DiTTransformer2DModel"].build(0))  # ada_norm_zero: no shared adaLN-single
    with pytest.raises(ValueError):
        stress(model, channels=[0, 99])


def test_stressed_pipeline_generates_same_image(tmp_path):
    pipe = DiffusionPipeline.from_pretrained(build_tiny_pixart_pipeline(tmp_path / "pipe", seed=0))
    stressed = stress(pipe, seed=1, k=100.0)
    assert type(stressed) is type(pipe) and stressed.transformer is not pipe.transformer
    call = dict(prompt="a thick digit 7", num_inference_steps=2, height=32, width=32, use_resolution_binning=False,
                clean_caption=False, output_type="np")
    ref = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    out = stressed(**call, generator=torch.Generator().manual_seed(0)).images
    assert abs(out - ref).max() < 1e-4  # float32
    ratios = channel_absmax_ratio(stressed.transformer, dict(
        hidden_states=torch.randn(1, 4, 16, 16), timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(
            1, 8, 32), added_cond_kwargs={"resolution": None, "aspect_ratio": None}))
    assert min(ratios.values()) >= 50


def test_default_pick_gives_timestep_varying_outliers_on_the_trained_model():
    """On the trained reference transformer (whose modulation really depends on the timestep), the default
    channel pick gives outliers >= 50x at every timestep whose size changes with the timestep."""
    pipe = DiffusionPipeline.from_pretrained(REPO / "reference_models" / "pixart_digits")
    emb, mask, _, _ = pipe.encode_prompt("a handwritten digit 3", do_classifier_free_guidance=False,
                                         clean_caption=False, max_sequence_length=8)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
                  encoder_hidden_states=emb, encoder_attention_mask=mask,
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    stressed = stress(pipe.transformer, k=100.0)
    assert stressed.viditq_stress["pick"] == "time_varying"
    ratios = [channel_absmax_ratio(stressed, dict(inputs, timestep=torch.tensor([t]))) for t in (10, 500, 990)]
    assert min(min(r.values()) for r in ratios) >= 50
    swing = [max(r[n] for r in ratios) / min(r[n] for r in ratios) for n in ratios[0]]
    assert sorted(swing)[len(swing) // 2] > 1.2, swing  # the median layer's ratio moves by > 20%
