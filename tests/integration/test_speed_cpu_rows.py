"""benchmarks/speed_cpu.py's W4A8-MP and calibrated-default rows, their route counts and the group-wise GEMM rows,
run at a tiny size: a 2-block PixArt transformer of hidden 64 (a Hadamard order, and a multiple of the plans'
group size 64) stands in for the 28-block, hidden-1152 one. Then the run itself at 1 block: each variant in a worker
process of its own, in groups, with rows for the variants that fail, and the peak RSS of all processes summed."""

import importlib.util
import os
import subprocess
import sys
import time

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from benchmarks import speed_cpu
from benchmarks.pixart_alpha import CONFIG
from benchmarks.plan_mapping import shipped_plan_mapped
from benchmarks.tree_rss import PeakTreeRss, tree_rss_bytes
from benchmarks.variant_worker import VariantWorker
from viditq_diffusers import ViDiTQLinear
from viditq_diffusers.kernels import cpu_int16

NEW_ROWS = {"heuristic": "ViDiT-Q W4A8-MP (w4a8_mp heuristic preset)",
            "5-bit": "ViDiT-Q W4A8-MP shipped 5-bit plan (mapped)",
            "6-bit": "ViDiT-Q W4A8-MP shipped 6-bit plan (mapped)",
            "calibrated default": "ViDiT-Q W8A8 calibrated default (recipe search)"}


def tiny_model() -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**{**CONFIG, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 32,
                                        "cross_attention_dim": 64, "caption_channels": 32, "sample_size": 8})
    return model.eval().requires_grad_(False)


def tiny_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(2, 8, 32,
                                                                                                      generator=g),
                timestep=torch.full((2,), 500, dtype=torch.long), added_cond_kwargs={"resolution": None,
                                                                                    "aspect_ratio": None},
                return_dict=False)


@pytest.fixture(autouse=True)
def fresh_statistics():
    speed_cpu._calibrations.clear()
    yield
    speed_cpu._calibrations.clear()


def quantized_specs(model) -> dict:
    return {name: m.spec for name, m in model.named_modules() if isinstance(m, ViDiTQLinear)}


def test_each_new_row_is_listed_and_skipped_by_its_own_word():
    labels = list(speed_cpu.variants(with_peers=False))
    assert set(NEW_ROWS.values()) <= set(labels)
    for word, label in NEW_ROWS.items():
        assert [x for x in labels if speed_cpu.skipped(x, [word])] == [label]
    assert not speed_cpu.skipped("bf16 eager", ["eager"])


@pytest.mark.parametrize("bits", [5, 6])
def test_mapped_plan_row_quantizes_as_the_mapped_plan_says(bits):
    make = speed_cpu.variants(with_peers=False)[NEW_ROWS[f"{bits}-bit"]][1]
    model, kwargs = tiny_model(), tiny_inputs()
    expected = shipped_plan_mapped(bits, model)["layers"]
    quantized, grad_context, count_bytes = make(model, kwargs)
    with grad_context():
        out = quantized(**kwargs)[0]
    assert torch.isfinite(out).all() and count_bytes(quantized) > 0
    specs = quantized_specs(quantized)
    assert specs == expected  # every entry as mapped: bits, groups, decided alphas, rotation seeds
    assert any(s.group_size == 64 for s in specs.values()) and any(s.smoothed for s in specs.values())
    counts = speed_cpu.route_counts(quantized, torch.float32)
    routes = counts.split("; balancing")[0]
    assert sum(int(part.split()[0]) for part in routes.split(", ")) == len(expected), counts
    assert "W4A8-g64 -> " in counts


def test_heuristic_row_and_the_calibrated_default_saving_its_recipes(tmp_path):
    heuristic = speed_cpu.variants(with_peers=False)[NEW_ROWS["heuristic"]][1]
    specs = quantized_specs(heuristic(tiny_model(), tiny_inputs())[0])
    assert {s.weight_bits for s in specs.values()} == {8}  # 2 blocks: the first and the last are W8

    recipes = tmp_path / "recipes.plan.json"
    make = speed_cpu.variants(with_peers=False, recipes=str(recipes))[NEW_ROWS["calibrated default"]][1]
    searched, _, _ = make(tiny_model(), tiny_inputs())
    assert recipes.is_file()
    speed_cpu._calibrations.clear()
    reread, _, _ = make(tiny_model(), tiny_inputs())  # the saved decided plan, no search
    assert quantized_specs(reread) == quantized_specs(searched)
    assert all(s.decided and s.weight_bits == 8 for s in quantized_specs(searched).values())
    with torch.inference_mode():
        assert torch.equal(reread(**tiny_inputs())[0], searched(**tiny_inputs())[0])


def test_group_wise_gemm_rows():
    row = speed_cpu.time_grouped(torch.randn(4, 128), 128, 8, repeats=1)
    for size in speed_cpu.GROUP_SIZES:
        assert row[f"ViDiT-Q W4A8-g{size} linear, as dispatched"] > 0
        kernel = f"W4A8-g{size} our group-wise kernel (cpu_int16.linear_grouped)"
        assert (kernel in row) == cpu_int16.available()


def test_the_shipped_28_block_recipes_fit_the_pixart_alpha_sized_model():
    from benchmarks.plan_mapping import meta_model
    from viditq_diffusers.plan import read_plan, validate_plan

    plan = read_plan(speed_cpu.SHIPPED_RECIPES)
    validate_plan(meta_model(), plan)  # every layer's name, shape and bias fit the 28-block model
    assert sum(spec.rotation_seed is not None for spec in plan["layers"].values()) == 5


def test_the_printed_cpu_flags_are_among_those_the_cpu_description_reports():
    from viditq_diffusers.kernels.cpu_flags import ROUTE_FLAGS

    assert set(speed_cpu.FLAGS) <= set(ROUTE_FLAGS)  # cpu_info marks a flag it was never told about as missing


TORCHAO = "torchao int8 dyn-act/int8-weight (eager)"


@pytest.mark.slow
def test_a_one_block_run_in_worker_processes_one_variant_a_group(capsys):
    labels = ["fp32 eager", "bf16 eager", "ViDiT-Q W8A8", TORCHAO, "no such variant", "ViDiT-Q W4A8"]
    with PeakTreeRss() as peak:  # max_rss 0: every group holds one variant (and the two baselines)
        rows, routes = speed_cpu.run_variants(labels, layers=1, rounds=2, recipes=None, peak=peak, threads=1,
                                              max_rss=0)
    speed_cpu.print_variant_table(rows, routes)
    print(speed_cpu.peak_line(peak.bytes))
    out = capsys.readouterr().out
    assert list(rows) == labels
    assert out.count("interleaved rounds") == 2  # W8A8, then W4A8: one group each
    fp32_seconds, vs_fp32, _, fp32_bytes, fp32_psnr = rows["fp32 eager"]
    assert fp32_seconds > 0 and vs_fp32 == 1 and fp32_psnr == float("inf") and fp32_bytes > 0
    for label in ("bf16 eager", "ViDiT-Q W8A8", "ViDiT-Q W4A8"):
        seconds, vs_fp32, vs_bf16, nbytes, quality = rows[label]
        assert seconds > 0 and vs_fp32 > 0 and vs_bf16 > 0 and 0 < nbytes < fp32_bytes and 30 < quality < 200
    assert set(routes) == {"ViDiT-Q W8A8", "ViDiT-Q W4A8"} and "W4A8 -> " in routes["ViDiT-Q W4A8"]
    assert rows["no such variant"] == "KeyError: 'no such variant'"
    if importlib.util.find_spec("torchao") is None:  # the dev install: the peer's row says why it has no time
        assert rows[TORCHAO] == "ModuleNotFoundError: No module named 'torchao'"
        assert f"| {TORCHAO} | failed: ModuleNotFoundError: No module named 'torchao' | | | | |" in out
    else:
        assert rows[TORCHAO][0] > 0
    # three workers at a time (the baselines and one variant), each with torch imported: more than 1 GiB together
    assert 1 < peak.bytes / 2**30 < 8
    assert f"peak RSS: {peak.bytes / 2**30:.1f} GiB (this process and its variant workers together" in out


@pytest.mark.slow
def test_a_worker_that_dies_while_timed_becomes_a_row(tmp_path):
    worker = VariantWorker("bf16 eager", 1, None, 1, str(tmp_path), 0)
    try:
        assert worker.built()["nbytes"] > 0 and worker.run() > 0
        worker.process.kill()
        rows = {}
        assert speed_cpu.time_interleaved({"bf16 eager": worker}, 2, rows) == {}
        assert rows == {"bf16 eager": "while timed: killed by signal 9 (out of memory?)"}
    finally:
        worker.close()


def test_the_tree_rss_sums_the_children():
    hold = "b = bytearray(300 * 2**20); print(flush=True); import time; time.sleep(60)"  # 300 MiB, resident
    children = [subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE) for _ in range(2)]
    try:
        for child in children:
            child.stdout.readline()  # allocated
        alone = tree_rss_bytes(os.getpid()) - sum(tree_rss_bytes(c.pid) for c in children)
        assert tree_rss_bytes() >= alone + 2 * 300 * 2**20
        with PeakTreeRss(interval=0.01) as peak:
            time.sleep(0.05)
        assert peak.bytes >= alone + 2 * 300 * 2**20
    finally:
        for child in children:
            child.kill()
            child.wait()
