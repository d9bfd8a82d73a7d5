"""Sensitivity measurement on a real (tiny, random) PixArt pipeline: one run per group x option, costs in bits,
degradations per metric, the eps proxy per family, and a resumable, settings-checked cache."""

import copy
import json

import pytest
import torch
from diffusers import DiffusionPipeline

from viditq_diffusers import metrics
from viditq_diffusers.mixed_precision import allocate, group_layers, quantized_by_default
from viditq_diffusers.mixed_precision.sensitivity import (
    FIDELITY, TEXT, dominant_metric, group_role, measure, rank_agreement,
)
from viditq_diffusers.testing.zoo import build_tiny_pixart_pipeline

CALL = dict(num_inference_steps=2, guidance_scale=4.5, height=32, width=32, use_resolution_binning=False,
            clean_caption=False)
OPTIONS = {"W4A8": {"preset": "w4a8"}, "W8A8": {"preset": "w8a8"}}
PROMPTS, SEEDS = ["a thick digit 7", "a thin digit 1"], [0, 1]


class Scorer:
    """PSNR as fidelity; the guidance-sensitive mean difference between the two prompts as 'text alignment'."""

    def __init__(self):
        self.calls = 0

    def __call__(self, samples, reference):
        self.calls += 1
        gap = lambda s: (s[0] - s[1]).abs().mean()  # noqa: E731
        return {FIDELITY: metrics.psnr(samples, reference), TEXT: -float((gap(samples) - gap(reference)).abs())}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipe = DiffusionPipeline.from_pretrained(build_tiny_pixart_pipeline(tmp_path_factory.mktemp("p") / "pipe"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quantized_groups(model):
    return {g: names for g, names in group_layers(model, 1).items() if quantized_by_default(group_role(g))}


def test_table_costs_degradations_and_proxy(pipe, tmp_path):
    groups = quantized_groups(pipe.transformer)
    assert dominant_metric("cross_attn_kv[0-1]") == TEXT and dominant_metric("ffn_up[0-1]") == FIDELITY
    table = measure(pipe, groups, OPTIONS, PROMPTS, SEEDS, Scorer(), cache=tmp_path / "s.json", **CALL)
    assert set(table) == set(groups) and all(set(t) == set(OPTIONS) for t in table.values())
    for group, names in groups.items():
        weights = sum(pipe.transformer.get_submodule(n).weight.numel() for n in names)
        assert table[group]["W4A8"]["cost"] == 4 * weights and table[group]["W8A8"]["cost"] == 8 * weights
        for entry in table[group].values():
            assert set(entry["proxy"]) == {FIDELITY, TEXT} and entry["proxy"][FIDELITY] > 0
    # 4-bit weights hurt fidelity more than 8-bit ones, group by group
    assert all(t["W4A8"]["metrics"][FIDELITY] > t["W8A8"]["metrics"][FIDELITY] for t in table.values())
    assert set(rank_agreement(table, "W4A8")) <= {FIDELITY, TEXT}
    # a heatmap a person can read: rows = groups, the worse cell of each row is the redder one
    from PIL import Image

    from viditq_diffusers.mixed_precision.heatmap import Layout, save_heatmap

    save_heatmap(table, tmp_path / "heat.png")
    image = Image.open(tmp_path / "heat.png").convert("RGB")
    layout = Layout(table)
    assert image.size == layout.size and layout.metrics == [FIDELITY, TEXT]
    for group in table:  # inside each cell, a little off its corner (the corner may be the dominant metric's box)
        w4, w8 = (image.getpixel((x + 3, y + 2)) for x, y in (layout.cell(group, FIDELITY, o) for o in OPTIONS))
        assert w4[1] < w8[1], (group, w4, w8)  # less green = redder
    # the table is the allocation's input: a budget between all-W4 and all-W8 gets a mix
    low = sum(t["W4A8"]["cost"] for t in table.values())
    choice = allocate(table, 1.5 * low).choice
    assert set(choice.values()) == {"W4A8", "W8A8"}


def test_cache_resumes_and_refuses_other_settings(pipe, tmp_path):
    groups = dict(list(quantized_groups(pipe.transformer).items())[:2])
    cache = tmp_path / "s.json"
    first = Scorer()
    table = measure(pipe, groups, OPTIONS, PROMPTS, SEEDS, first, cache=cache, proxy=False, **CALL)
    assert first.calls == 1 + 2 * len(OPTIONS)  # the FP reference, then one run per group x option
    again = Scorer()
    assert measure(pipe, groups, OPTIONS, PROMPTS, SEEDS, again, cache=cache, proxy=False, **CALL) == table
    assert again.calls == 1  # everything came from the cache
    saved = json.loads(cache.read_text())
    del saved["table"][next(iter(groups))]["W8A8"]  # an interrupted run: one entry missing
    cache.write_text(json.dumps(saved))
    resumed = Scorer()
    assert measure(pipe, groups, OPTIONS, PROMPTS, SEEDS, resumed, cache=cache, proxy=False, **CALL) == table
    assert resumed.calls == 2
    with pytest.raises(ValueError, match="other settings"):
        measure(pipe, groups, OPTIONS, PROMPTS, [5, 6], Scorer(), cache=cache, proxy=False, **CALL)
    # a new option is measured on top of the cached ones; an option redefined under a cached name is refused
    grouped = {**OPTIONS, "W4A8-g8": {"preset": "w4a8", "group_size": 8}}
    more = Scorer()
    wider = measure(pipe, groups, grouped, PROMPTS, SEEDS, more, cache=cache, proxy=False, **CALL)
    assert more.calls == 1 + len(groups) and {g: {o: wider[g][o] for o in OPTIONS} for g in groups} == table
    assert all(w["W4A8-g8"]["cost"] > w["W4A8"]["cost"] for w in wider.values())  # group scales are counted
    assert measure(pipe, groups, OPTIONS, PROMPTS, SEEDS, Scorer(), cache=cache, proxy=False, **CALL) == table
    with pytest.raises(ValueError, match="W8A8"):
        measure(pipe, groups, {"W8A8": {"preset": "w4a8"}}, PROMPTS, SEEDS, Scorer(), cache=cache, proxy=False,
                **CALL)


def test_cli_search_writes_a_plan_that_quantizes_mixed(pipe, tmp_path):
    from viditq_diffusers import ViDiTQConfig, ViDiTQLinear, quantize
    from viditq_diffusers.cli import main
    from viditq_diffusers.plan import average_weight_bits, plan_from_json

    path = tmp_path / "pipe"
    pipe.save_pretrained(path)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    out = tmp_path / "plan.json"
    assert main(["search", str(path), "--budget-bits", "6", "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(out), "--steps", "2", "--height", "32", "--width", "32", "--block-ranges", "2",
                 "--candidates", "2", "--per-layer"]) == 0
    plan = plan_from_json(json.loads(out.read_text()))  # the file's JSON entries as LayerSpecs
    assert average_weight_bits(plan) <= 6
    model = quantize(DiffusionPipeline.from_pretrained(path).transformer, ViDiTQConfig(plan=str(out)))
    bits = {m.weight_bits for m in model.modules() if isinstance(m, ViDiTQLinear)}
    assert bits == {4, 8}
    cached = json.loads((tmp_path / "plan.json.sensitivity.json").read_text())
    assert all(len(layers) == 1 for layers in cached["groups"].values())  # --per-layer: one layer per group
    assert (tmp_path / "plan.json.sensitivity.json").exists() and (tmp_path / "plan.json.heatmap.png").exists()


@pytest.mark.slow
def test_two_processes_give_the_single_process_table(pipe, tmp_path):
    from tests.support import sensitivity_worker
    from tests.support.launch import launch_two_cpu_processes

    path = tmp_path / "pipe"
    pipe.save_pretrained(path)
    out = tmp_path / "table.json"
    result = launch_two_cpu_processes(sensitivity_worker.__file__, path, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("table.json.cache.rank*")) == [
        "table.json.cache.rank0", "table.json.cache.rank1"]  # each process did its share
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker: same math
    try:
        single = sensitivity_worker.run(str(path))
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == json.loads(json.dumps(single))


def test_search_confirms_candidates_whole_and_returns_the_best_measured(pipe, tmp_path):
    from viditq_diffusers import ViDiTQConfig, quantize
    from viditq_diffusers.evaluation import generate, with_transformer
    from viditq_diffusers.mixed_precision.search import search
    from viditq_diffusers.plan import average_weight_bits

    result = search(pipe, 6.0, PROMPTS, SEEDS, options=OPTIONS, block_ranges=2, candidates=3,
                    cache=tmp_path / "cache.json", **CALL)
    assert len(result.confirmed) == 3 and [c["chosen"] for c in result.confirmed].count(True) == 1
    errors = [c["measured"][FIDELITY] for c in result.confirmed]
    chosen = next(c for c in result.confirmed if c["chosen"])
    assert chosen["measured"][FIDELITY] == min(errors) and len(set(errors)) > 1
    assert average_weight_bits(result.plan) <= 6.0
    # The returned plan is the candidate that measured best: generating with it gives that error again.
    model = quantize(copy.deepcopy(pipe.transformer), ViDiTQConfig(plan=result.plan))
    samples = generate(with_transformer(pipe, model), PROMPTS, SEEDS, **CALL)
    assert metrics.relative_mse(samples, generate(pipe, PROMPTS, SEEDS, **CALL)) == pytest.approx(
        chosen["measured"][FIDELITY], rel=1e-6)


def test_per_layer_groups_split_every_group_into_its_layers(pipe):
    from viditq_diffusers.mixed_precision.search import quantizable_groups

    groups = quantizable_groups(pipe.transformer, 1)
    layers = quantizable_groups(pipe.transformer, 1, per_layer=True)
    in_layers = sorted(n for names in layers.values() for n in names)
    assert in_layers == sorted(n for names in groups.values() for n in names)
    assert all(len(names) == 1 for names in layers.values())
    for name, (layer,) in layers.items():  # named after the group and the layer; the role still parses
        group, _, rest = name.partition(":")
        assert rest == layer and layer in groups[group] and group_role(name) == group_role(group)
