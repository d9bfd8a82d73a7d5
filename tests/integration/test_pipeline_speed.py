"""benchmarks/pipeline_speed.py at a tiny size: the real pipeline runs, every stage is timed, outputs are finite."""

import pytest
import torch

from benchmarks.pipeline_speed import ROWS, T5_XXL, build_t5_encoder, fill_random, run_child, run_row, table, \
    t5_parameters

TINY = dict(resolution=64, steps=2, t5_layers=1, transformer_layers=1)
SPLIT = ("encode s", "denoise s", "decode s", "s / image", "peak RSS GiB", "quantize s", "finite")


@pytest.fixture(scope="module", params=["fp32", "w4a8_mp_bf16"])
def result(request):
    return run_row(request.param, **TINY)


def test_a_row_times_every_stage_of_one_image(result):
    assert result["finite"] == {"embeddings": True, "latents": True, "image": True}
    assert result["image_shape"] == [1, 3, 64, 64]
    stages = result["encode_s"] + result["denoise_s"] + result["decode_s"]
    assert all(result[k] > 0 for k in ("encode_s", "denoise_s", "decode_s"))
    assert result["total_s"] == pytest.approx(stages, rel=1e-6)
    assert (result["quantize_s"] is None) == (ROWS[result["row"]][1] is None)
    assert result["peak_rss_gib"] > 0.5  # the process holds a 0.3 B-parameter encoder and the transformer


def test_the_table_has_the_split_columns_and_the_finite_flag(result):
    text = table([result])
    header, _, line = text.splitlines()
    assert all(f" {column} |" in header for column in SPLIT)
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert len(cells) == len(header.strip("|").split("|")) and cells[-1] == "yes"


def test_a_non_finite_stage_is_named_in_the_table(result):
    broken = {**result, "finite": {**result["finite"], "latents": False}}
    assert table([broken]).splitlines()[-1].endswith("| NO: latents |")


def test_a_failed_row_keeps_its_place_with_the_reason():
    failed = dict(row="bf16", resolution=512, error="killed by signal 9 (out of memory?)")
    assert "| bf16 eager | 512 | failed: killed by signal 9 (out of memory?) |" in table([failed])


def test_the_encoder_is_t5_xxl_shaped_built_in_its_dtype_and_finite():
    model = build_t5_encoder(1, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in model.parameters()) == t5_parameters(1)
    assert model.shared.weight is model.encoder.embed_tokens.weight
    assert model.config.d_model == T5_XXL["d_model"] and model.config.d_ff == T5_XXL["d_ff"]
    assert t5_parameters(24) == pytest.approx(4.76e9, rel=0.01)  # the real T5-XXL encoder
    weight = model.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.float()
    assert not (weight[0] == weight[1]).all() and weight.std() == pytest.approx(4096 ** -0.5, rel=0.05)
    with torch.inference_mode():
        out = model(torch.arange(120)[None] % 153, attention_mask=torch.ones(1, 120, dtype=torch.long))[0]
    assert torch.isfinite(out).all()


def test_fill_random_is_deterministic():
    a, b = torch.nn.Linear(300, 7), torch.nn.Linear(300, 7)
    fill_random(a)
    fill_random(b)
    assert torch.equal(a.weight, b.weight) and (a.bias == 1).all()


@pytest.mark.slow
def test_the_parent_runs_a_row_in_a_child_process():
    args = type("Args", (), dict(steps=2, t5_layers=1, t5_dtype="bf16", transformer_layers=1, threads=1))()
    result = run_child(args, "bf16", 64)
    assert "error" not in result, result
    assert result["finite"] == {"embeddings": True, "latents": True, "image": True} and result["peak_rss_gib"] > 0.5
