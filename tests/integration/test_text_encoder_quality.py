"""Issue 28, quality with quantized text encoders: the T5-shaped outlier synthetic
(`viditq_diffusers.testing.t5_outliers`), `benchmarks.text_encoder_quality` on it (tiny), and the `text_encoder`
suite of `benchmarks.quality` on the shipped image pipeline (one prompt per digit, two steps)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from benchmarks import quality
from benchmarks.text_encoder_quality import ROWS, embedding_metrics, main
from viditq_diffusers.testing.t5_outliers import outlier_channels, outlier_t5_encoder

TINY = ["--d-model", "128", "--d-ff", "384", "--heads", "4", "--layers", "1", "--prompts", "2", "--tokens", "8",
        "--threads", "1"]


def test_outlier_encoder_puts_k_times_larger_channels_into_the_block_linears():
    model = outlier_t5_encoder(d_model=128, d_ff=320, num_heads=4, d_kv=32, num_layers=2, k=30.0, channels=3)
    picked = outlier_channels(128, 3, 0)
    assert model.viditq_outliers == {"synthetic": True, "seed": 0, "k": 30.0, "channels": picked}
    inputs = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: inputs.update({name: a[0]}))
             for name in ("encoder.block.1.layer.0.SelfAttention.q", "encoder.block.1.layer.1.DenseReluDense.wi_0")]
    with torch.no_grad():
        model(input_ids=torch.randint(2, 1024, (2, 16), generator=torch.Generator().manual_seed(0)))
    for hook in hooks:
        hook.remove()
    for name, x in inputs.items():  # per-channel RMS over tokens: the picked channels ~k times the others
        rms = x.flatten(0, 1).square().mean(0).sqrt()
        others = rms[[c for c in range(128) if c not in picked]].median()
        assert (rms[picked] / others).min() > 10, name
    with pytest.raises(ValueError, match="k must be positive"):
        outlier_t5_encoder(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=1, k=0.0)


def test_embedding_metrics_are_cosine_and_relative_squared_error():
    ref = torch.tensor([[3.0, 4.0]])
    assert embedding_metrics(ref, ref) == {"cosine": 1.0, "rel_error": 0.0}
    assert embedding_metrics(torch.tensor([[3.0, 5.0]]), ref)["rel_error"] == pytest.approx(1 / 25)


def test_synthetic_benchmark_table_and_why_w8a16_is_the_encoder_default(tmp_path):
    results = main([*TINY, "--out", str(tmp_path / "table.json")])
    assert json.loads((tmp_path / "table.json").read_text())["results"] == results
    assert list(results) == ["outliers k=30 on 6 channels", "no outliers (k=1)"]
    for rows in results.values():
        assert list(rows) == list(ROWS)
        assert all(set(r) == {"cosine", "rel_error", "bytes_vs_fp16"} for r in rows.values())
        assert rows["W4A16 g64"]["bytes_vs_fp16"] < rows["W8A16 (encoder default)"]["bytes_vs_fp16"] < 0.6
    outliers = results["outliers k=30 on 6 channels"]
    # the point of the table: with T5-like outliers, per-token int8 activations lose far more than int8 weights
    assert outliers["W8A8 (dynamic per-token, no calibration)"]["rel_error"] > \
        5 * outliers["W8A16 (encoder default)"]["rel_error"]
    assert outliers["W8A16 (encoder default)"]["cosine"] > 0.99


def test_quality_text_encoder_suite_rows_on_the_shipped_image_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    from reference.classifier import load_classifier

    args = argparse.Namespace(per_digit=1, steps=2, guidance=4.5, suite="text_encoder", alphas=list(quality.ALPHAS),
                              rotation_seeds=[0], grid=2)
    task = quality.ImageTask(args)
    pipe = DiffusionPipeline.from_pretrained(task.pipeline)
    pipe.set_progress_bar_config(disable=True)
    suite = quality.SUITES["text_encoder"]
    labels = ["encoder W4A16 g32, transformer FP", "W8A8 (calibrated) + encoder W8A16"]
    rows = quality.evaluate(pipe, task, args, load_classifier(), str(tmp_path / "grid"),
                            configs={label: suite[label] for label in labels})
    assert list(rows) == ["FP", *labels]
    encoder_only, both = rows[labels[0]], rows[labels[1]]
    for row in (encoder_only, both):
        assert 0.9 < row["emb_cosine"] <= 1.0 and 0 <= row["emb_rel_error"] < 0.2
        assert row["encoder_bytes_vs_fp16"] < 1.0
    assert encoder_only["eps_rel_mse"] == 0.0 and encoder_only["recipes"] == {}  # transformer kept FP
    assert both["eps_rel_mse"] > 0 and both["bytes_vs_fp16"] < 1.0 < encoder_only["bytes_vs_fp16"]  # fp32 FP
    assert both["emb_rel_error"] < encoder_only["emb_rel_error"]  # W8A16 vs W4A16 encoder
    assert (tmp_path / "grid.png").exists()
    quality.print_table("image", rows)
