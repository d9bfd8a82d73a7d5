"""The naive W8A8 baseline: per-tensor weights, static per-tensor activations from calibration."""

import pytest
import torch

from viditq_diffusers import ViDiTQConfig, ViDiTQLinear, quantize
from viditq_diffusers.calibration import input_absmax
from viditq_diffusers.quant.formats import quantize_activation_static, quantize_weight
from viditq_diffusers.testing.zoo import ZOO, run

PIXART = ZOO["PixArtTransformer2DModel"]


def test_static_activation_quantization_clips_beyond_the_calibrated_range():
    codes, scale = quantize_activation_static(torch.tensor([[0.5, -1.0, 3.0]]), torch.tensor(1 / 127))
    assert codes.tolist() == [[64, -127, 127]] and scale.shape == (1, 1)  # 63.5 -> 64 (half to even), 3.0 clips


def test_per_tensor_weight_scale_is_one_number():
    w = torch.randn(6, 8)
    codes, scale, zero = quantize_weight(w, 8, per_tensor=True)
    assert scale.shape == zero.shape == (1, 1)
    assert codes.min() == -128 and codes.max() == 127  # min and max of the whole tensor hit the ends


def test_preset_needs_calibration():
    with pytest.raises(ValueError, match="needs activation statistics: calibrate first"):
        ViDiTQConfig(preset="naive_w8a8")
    with pytest.raises(ValueError, match=r"only serves static per-tensor activation scales \(naive_w8a8\)"):
        ViDiTQConfig(preset="w8a8", calibration={"a": 1.0})
    with pytest.raises(ValueError, match="uses no calibration statistics"):
        ViDiTQConfig(preset="rotate_w4a8", calibration={"a": 1.0})


def test_naive_w8a8_end_to_end(tmp_path):
    PIXART.build(seed=0).save_pretrained(tmp_path / "fp")
    fp = PIXART.cls.from_pretrained(tmp_path / "fp")
    inputs = PIXART.make_inputs(0)
    absmax = input_absmax(fp, lambda: [run(fp, PIXART.make_inputs(s)) for s in range(4)])
    assert set(absmax) == {n for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear)}

    config = ViDiTQConfig(preset="naive_w8a8", calibration=absmax)
    naive = PIXART.cls.from_pretrained(tmp_path / "fp", quantization_config=config)
    layer = naive.transformer_blocks[0].attn1.to_q
    assert isinstance(layer, ViDiTQLinear) and layer.weight_per_tensor
    assert layer.act_scale == pytest.approx(absmax["transformer_blocks.0.attn1.to_q"] / 127)
    with torch.no_grad():
        reference, out = run(fp, inputs), run(naive, inputs)
        ours = run(PIXART.cls.from_pretrained(tmp_path / "fp", quantization_config=ViDiTQConfig()), inputs)
    naive_error = ((out - reference).norm() / reference.norm()).item()
    ours_error = ((ours - reference).norm() / reference.norm()).item()
    assert ours_error < naive_error < 0.5, (ours_error, naive_error)

    naive.save_pretrained(tmp_path / "naive")
    reloaded = PIXART.cls.from_pretrained(tmp_path / "naive")
    with torch.no_grad():
        assert torch.equal(run(reloaded, inputs), out)


def test_missing_layer_in_calibration(tmp_path):
    model = PIXART.build()
    with pytest.raises(ValueError,
                       match="calibration has no activation statistics for layer 'transformer_blocks.0.attn1.to_q'"):
        quantize(model, ViDiTQConfig(preset="naive_w8a8", calibration={"proj_out": 1.0}))
