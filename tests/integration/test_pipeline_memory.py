"""benchmarks/pipeline_memory.py at tiny sizes: the shard-by-shard T5 loads as transformers saves it, the whole
script runs end to end (build, cache, one child per loaded row, the computed Flux rows) and its table has its shape."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import T5EncoderModel

from benchmarks.pipeline_memory import GIB, ROWS, cached_pipeline_folder, folder_name, save_t5_shard_by_shard, \
    t5_config

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(t5_layers=3, t5_width=128, transformer_layers=1, transformer_heads=2)
COLUMNS = 11
LOADED = ("fp16", "transformer_w8a8", "w8", "w4")


def test_the_t5_written_shard_by_shard_loads_with_every_key(tmp_path):
    """Several shards (one block each here), the index, config.json: transformers loads it with no missing or
    unexpected key, the embedding tied, every weight finite."""
    config = t5_config(3, 128)
    save_t5_shard_by_shard(config, tmp_path / "t5", shard_bytes=1)
    shards = sorted((tmp_path / "t5").glob("model-*.safetensors"))
    assert len(shards) == 1 + 3  # the embedding and final norm, then one per block
    model, info = T5EncoderModel.from_pretrained(tmp_path / "t5", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16 and model.encoder.embed_tokens.weight is model.shared.weight
    assert all(torch.isfinite(p).all() for p in model.parameters())
    index = json.loads((tmp_path / "t5" / "model.safetensors.index.json").read_text())
    stored = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            stored.update({key: f.get_slice(key).get_shape() for key in f.keys()})
    assert set(index["weight_map"]) == set(stored) == set(model.state_dict()) - {"encoder.embed_tokens.weight"}


def test_t5_width_must_allow_heads_and_groups():
    with pytest.raises(ValueError, match="--t5-width must be a multiple of 128.*got 100"):
        t5_config(1, 100)


@pytest.mark.slow
def test_the_script_runs_end_to_end_and_prints_the_table(tmp_path):
    """Tiny sizes: the pipeline is built once into --cache, each row loads in its own child, the measured bytes
    equal the bytes computed on the meta device, and the table has a measured and a computed line per PixArt-Sigma
    row and a computed line per Flux row."""
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in TINY.items()]
    done = subprocess.run([sys.executable, "-m", "benchmarks.pipeline_memory", "--cache", str(tmp_path),
                           "--threads", "1", "--rows", *LOADED, *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    table = [line for line in lines if line.startswith(("| PixArt-Sigma |", "| Flux.1 |"))]
    assert len(table) == len(LOADED) + 2 * len(ROWS)  # PixArt-Sigma measured and computed, Flux computed
    assert all(len(line.strip("|").split("|")) == COLUMNS for line in table)
    measured = [line for line in table if "| measured |" in line]
    assert len(measured) == len(LOADED) and all("failed" not in line for line in measured)
    # ratio goals on PixArt-Sigma's whole-pipeline rows only, load-peak goals on the loaded quantized rows only
    assert sum(line.split("|")[9].strip().endswith("met") for line in table) == 2 + 2  # measured, computed
    assert sum(line.split("|")[11].strip().endswith("met") for line in measured) == len(LOADED) - 1
    assert "measured bytes == computed bytes for every loaded PixArt-Sigma row: yes" in done.stdout
    for row, loaded in result["pixart_sigma"].items():
        assert loaded["bytes"] == result["pixart_sigma_computed"][row]
        assert loaded["peak_rss"] >= loaded["import_rss"] > 0.1 * GIB
    sizes = {row: sum(b.values()) for row, b in result["pixart_sigma_computed"].items()}
    assert sizes["fp16"] > sizes["transformer_w8a8"] > sizes["w8"] > sizes["w4"]
    # every T5 block: q, k, v, o, wi_0, wi_1 and wo (weight-only)
    assert result["pixart_sigma"]["w8"]["quantized_layers"] == {"text_encoder": 3 * 7, "transformer": 10}
    assert result["pixart_sigma"]["w4"]["quantized_layers"] == {"text_encoder": 3 * 7, "transformer": 10}
    flux = {row: sum(b.values()) for row, b in result["flux_computed"].items()}
    assert 31 * GIB < flux["fp16"] < 32 * GIB and flux["w4"] < flux["w8"] < flux["transformer_w8a8"] < flux["fp16"]

    # a rerun finds the folder and does not rebuild it
    folder = tmp_path / folder_name(argparse.Namespace(**TINY))
    before = {f: f.stat().st_mtime_ns for f in folder.rglob("*")}
    assert cached_pipeline_folder(argparse.Namespace(cache=str(tmp_path), **TINY)) == folder
    assert {f: f.stat().st_mtime_ns for f in folder.rglob("*")} == before
