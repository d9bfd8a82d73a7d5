"""The `viditq` console script, run as a user would (a real subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from viditq_diffusers.testing.zoo import build_tiny_pixart_pipeline

VIDITQ = str(Path(sys.executable).with_name("viditq"))
ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))  # this checkout's package


def viditq(*args, check=True):
    result = subprocess.run([VIDITQ, *map(str, args)], capture_output=True, text=True, timeout=300, env=ENV)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_quantize_pipeline_and_info(tmp_path):
    src = build_tiny_pixart_pipeline(tmp_path / "pipe")
    out = viditq("quantize", src, "--preset", "w4a8", "--group-size", "32", "--out", tmp_path / "q")
    assert "transformer: PixArtTransformer2DModel" in out.stdout and "W4A8-g32" in out.stdout
    assert (tmp_path / "q" / "model_index.json").exists() and not list((tmp_path / "q").rglob(".viditq-tmp-*"))
    info = json.loads(viditq("info", tmp_path / "q", "--json").stdout)
    summary = info["transformer"]
    assert summary["formats"] == {"W4A8-g32": summary["num_quantized"]} and summary["num_quantized"] > 0
    assert 0 < summary["weight_bytes"] < summary["fp16_bytes"]
    assert summary["average_weight_bits"] == 4 + (32 + 8) / 32  # codes + group scales
    listing = viditq("info", tmp_path / "q", "--layers").stdout
    assert "average weight bits: 5.25" in listing
    assert "transformer_blocks.0.attn1.to_q" in listing and "ratio to FP16" in listing


@pytest.mark.slow
def test_demo_prints_metrics_and_saves_grid(tmp_path):
    # the tiny random pipeline stands in for the bundled trained one (same code path, faster)
    src = build_tiny_pixart_pipeline(tmp_path / "pipe")
    out = viditq("demo", "--pipeline", src, "--presets", "w8a8", "w4a8", "--steps", "3",
                 "--out", tmp_path / "g.png").stdout
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| W")}
    assert set(rows) == {"W8A8", "W4A8"}
    psnr = {name: float(line.split("|")[2]) for name, line in rows.items()}
    assert psnr["W8A8"] > psnr["W4A8"] > 20
    assert (tmp_path / "g.png").stat().st_size > 0


def test_demo_without_pipeline_says_how(tmp_path):
    result = viditq("demo", "--pipeline", tmp_path, check=False)
    assert result.returncode == 1 and "no diffusers pipeline at" in result.stderr


@pytest.mark.slow
def test_errors_are_clear(tmp_path):
    result = viditq("info", tmp_path, check=False)
    assert result.returncode == 1 and "holds no ViDiT-Q quantized model" in result.stderr
    result = viditq("quantize", tmp_path / "nope", "--out", tmp_path / "x", check=False)
    assert result.returncode == 1 and "is not a folder; pass a diffusers model folder" in result.stderr


@pytest.mark.slow
def test_calibrate_writes_statistics(tmp_path):
    from viditq_diffusers.calibration import CalibrationStats

    src = build_tiny_pixart_pipeline(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("a thick digit 7\n\na thin digit 3\n")
    out = viditq("calibrate", src, "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "s.safetensors",
                 "--steps", "2", "--buckets", "2", "--seed", "5", "--height", "32", "--width", "32").stdout
    assert "calibrated PixArtTransformer2DModel: 20 layers, 2 prompts x 2 steps" in out
    assert "max outlier ratio" in out
    stats = CalibrationStats.load(tmp_path / "s.safetensors")
    assert stats.settings["seeds"] == [5, 6] and stats.settings["timestep_buckets"] == 2
    assert all(b.shape[0] == 2 for b in stats.bucket_absmax.values())
    (tmp_path / "empty.txt").write_text("\n \n")
    for prompts, message in [("empty.txt", "is empty; write one calibration prompt per line"),
                             ("missing.txt", "no prompts file at")]:
        result = viditq("calibrate", src, "--prompts", tmp_path / prompts, "--out", tmp_path / "x.safetensors",
                        check=False)
        assert result.returncode == 1 and message in result.stderr
    assert not (tmp_path / "x.safetensors").exists()

    # the pipeline's text encoder, once per prompt, keyed by its own layer names
    out = viditq("calibrate", src, "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "t5.safetensors",
                 "--component", "text_encoder").stdout
    assert "calibrated T5EncoderModel:" in out and "2 prompts\n" in out
    encoder = CalibrationStats.load(tmp_path / "t5.safetensors")
    assert encoder.model_class == "T5EncoderModel" and all(n.startswith("encoder.block.") for n in encoder.layers)
    result = viditq("calibrate", src, "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "y.safetensors",
                    "--component", "tokenizer", check=False)
    assert result.returncode == 1 and "tokenizer" in result.stderr and not (tmp_path / "y.safetensors").exists()
