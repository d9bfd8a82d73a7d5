"""The cost model on a real (tiny, random) PixArt pipeline: each layer timed at each option through the model's own
kernel routes, a JSON table that round-trips and is refused on another kind of machine, shape maps, and the search
and `viditq search` under a latency budget."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline

from viditq_diffusers.layer_spec import LayerSpec
from viditq_diffusers.mixed_precision import cost
from viditq_diffusers.mixed_precision.cost import (
    CostTable, decided_specs, format_label, group_seconds, layer_tokens,
)
from viditq_diffusers.mixed_precision.search import quantizable_groups, search
from viditq_diffusers.testing.zoo import build_tiny_pixart_pipeline

CALL = dict(num_inference_steps=2, guidance_scale=4.5, height=32, width=32, use_resolution_binning=False,
            clean_caption=False)
OPTIONS = {"W4A8": {"preset": "w4a8"}, "W8A8": {"preset": "w8a8"}, "W4A8-g32": {"preset": "w4a8", "group_size": 32}}
PROMPTS, SEEDS = ["a thick digit 7", "a thin digit 1"], [0, 1]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipe = DiffusionPipeline.from_pretrained(build_tiny_pixart_pipeline(tmp_path_factory.mktemp("p") / "pipe"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def layers_of(groups):
    return [name for names in groups.values() for name in names]


def test_tokens_are_the_rows_each_layer_sees_in_one_forward(pipe):
    groups = quantizable_groups(pipe.transformer, 1)
    tokens = layer_tokens(pipe, layers_of(groups), PROMPTS, SEEDS, **CALL)
    assert set(tokens) == set(layers_of(groups))
    side = 32 // pipe.vae_scale_factor // pipe.transformer.config.patch_size
    image_rows = 2 * len(PROMPTS) * side ** 2  # CFG doubles the batch
    assert tokens["transformer_blocks.0.attn1.to_q"] == image_rows
    assert tokens["transformer_blocks.0.attn2.to_k"] > image_rows  # cross-attention K/V run on the text tokens


def test_table_measures_each_shape_once_round_trips_and_refuses_another_cpu(pipe, tmp_path):
    groups = quantizable_groups(pipe.transformer, 1)
    table = CostTable(repeats=1, warmup=1)
    seconds, w8a8 = group_seconds(pipe, groups, OPTIONS, table, tokens=16)
    assert set(seconds) == set(groups) and all(set(s) == set(OPTIONS) for s in seconds.values())
    assert all(v > 0 for s in seconds.values() for v in s.values()) and w8a8 > 0
    # one entry per distinct (format, K, N, M, dtype): the tiny model's 20 layers have few distinct shapes
    specs = decided_specs(pipe.transformer, {**OPTIONS, "unit": {"preset": "w8a8"}}, layers_of(groups))
    distinct = {(format_label(s), s.in_features, s.out_features) for by in specs.values() for s in by.values()}
    assert table.measured == len(table.entries) == len(distinct)
    assert w8a8 == pytest.approx(sum(seconds[g]["W8A8"] for g in groups))  # the unit is the W8A8 option here
    entry = next(iter(table.entries.values()))
    assert entry["M"] == 16 and entry["dtype"] == "float32" and entry["format"].startswith("W")

    path = tmp_path / "plan.json.costs.json"
    table.save(path)
    saved = json.loads(path.read_text())
    assert saved["machine"]["threads"] == torch.get_num_threads() and saved["machine"]["cpu"]
    loaded = CostTable.load(path)
    assert group_seconds(pipe, groups, OPTIONS, loaded, tokens=16) == (seconds, w8a8)
    assert loaded.measured == 0  # every time came from the file

    foreign = dict(saved, machine={**saved["machine"], "cpu": "Some Other CPU", "cpu_flags": ["avx2"]})
    path.write_text(json.dumps(foreign))
    with pytest.raises(ValueError, match="another kind of machine.*cpu: 'Some Other CPU' there.*Measure here"):
        CostTable.load(path)
    path.write_text(json.dumps(dict(saved, machine={**saved["machine"], "threads": 999})))
    with pytest.warns(UserWarning, match="threads 999"):
        again = CostTable.load(path)
    assert again.entries == {}  # measured again, not mixed
    path.write_text(json.dumps({"entries": {}}))
    with pytest.raises(ValueError, match="not a viditq cost table"):
        CostTable.load(path)


def test_shape_map_costs_the_layers_at_another_models_shapes(pipe):
    groups = quantizable_groups(pipe.transformer, 1)
    layers = layers_of(groups)
    big = {name: (128, 128, 8) for name in layers}
    big[layers[0]] = [(128, 128, 8), (128, 256, 8)]  # a layer mapped onto two big ones: their times add up
    table = CostTable(repeats=1, warmup=0)
    seconds, _ = group_seconds(pipe, groups, {"W8A8": OPTIONS["W8A8"]}, table, shapes=big)
    assert {(e["K"], e["N"], e["M"]) for e in table.entries.values()} == {(128, 128, 8), (128, 256, 8)}
    with pytest.raises(ValueError, match=r"missing \['transformer_blocks.0.attn1.to_q'\]"):
        group_seconds(pipe, groups, OPTIONS, table, shapes={n: big[n] for n in layers[1:]})
    with pytest.raises(ValueError, match=r"unknown \['nope'\]"):
        group_seconds(pipe, groups, OPTIONS, table, shapes={**big, "nope": (8, 8, 8)})
    with pytest.raises(ValueError, match=r"shapes\['transformer_blocks.0.attn1.to_q'\] K must be an integer >= 1"):
        group_seconds(pipe, groups, OPTIONS, table, shapes={**big, layers[0]: (0, 8, 8)})
    # a group size that does not divide the mapped K is named with its layer
    with pytest.raises(ValueError, match=r"cannot be costed at \[\(48, 128, 8\)\].*group_size=32"):
        group_seconds(pipe, groups, OPTIONS, table, shapes={**big, layers[0]: (48, 128, 8)})


def test_search_keeps_the_plan_within_the_latency_budget(pipe, tmp_path):
    costs = tmp_path / "plan.json.costs.json"
    options = {o: OPTIONS[o] for o in ("W4A8-g32", "W8A8")}  # two options: half the sensitivity runs
    kwargs = dict(prompts=PROMPTS[:1], seeds=SEEDS[:1], options=options, block_ranges=1, cache=tmp_path / "s.json",
                  cost_tokens=64, **CALL)
    bits_only = search(pipe, 6.0, costs=costs, **kwargs)  # a cost table asked for: the latency is reported
    assert costs.exists() and bits_only.latency > 0
    # the bit-only plan's own latency as the budget: it fits, so the answer is as good, and no slower
    budget = bits_only.latency * (1 + 1e-9)
    result = search(pipe, 6.0, max_latency=budget, costs=CostTable.load(costs), **kwargs)
    assert result.seconds == bits_only.seconds  # the saved times, not new ones
    assert result.latency <= budget and result.average_bits <= 6.0 + 1e-9
    assert result.allocation.degradation == pytest.approx(bits_only.allocation.degradation)
    assert result.allocation.seconds == pytest.approx(
        sum(result.seconds[g][o] for g, o in result.allocation.choice.items()))
    fastest = min(sum(min(s.values()) for s in result.seconds.values()) / result.w8a8_seconds, 1.0)
    with pytest.raises(ValueError, match=r"no plan fits both budgets.*x W8A8.*average bits"):
        search(pipe, 6.0, max_latency=fastest * 0.5, costs=costs, **kwargs)
    assert search(pipe, 6.0, **kwargs).latency is None  # no cost model asked for: none measured


@pytest.mark.parametrize("kwargs, error, expected", [
    (dict(max_latency=0), ValueError, r"search: max_latency must be >= 1e-06, got 0\.0; pass the plan's largest"),
    (dict(max_latency="1"), TypeError, r"search: max_latency must be a number, got '1' \(str\)"),
    (dict(costs=3), TypeError, r"search: costs must be a cost table's path"),
    (dict(cost_tokens=0), ValueError, r"search: cost_tokens must be an integer >= 1, got 0"),
])
def test_search_latency_arguments_name_themselves(pipe, kwargs, error, expected):
    with pytest.raises(error, match=expected):
        search(pipe, 6.0, ["a digit 7"], [0], **kwargs)


@pytest.mark.slow  # a whole search of the shipped image pipeline: about 20 s alone, more on a busy machine
def test_cli_search_with_a_latency_budget_on_the_shipped_image_pipeline(tmp_path, capsys):
    from tests.support import REPO
    from viditq_diffusers.cli import main
    from viditq_diffusers.plan import average_weight_bits, plan_from_json

    (tmp_path / "prompts.txt").write_text("a handwritten digit 3")
    out = tmp_path / "plan.json"
    args = ["search", str(REPO / "reference_models" / "pixart_digits"), "--budget-bits", "6", "--prompts",
            str(tmp_path / "prompts.txt"), "--out", str(out), "--steps", "2", "--height", "32", "--width", "32",
            "--block-ranges", "1", "--max-latency", "3.0"]  # loose: the test machine's times are noisy
    assert main(args) == 0
    assert average_weight_bits(plan_from_json(json.loads(out.read_text()))) <= 6
    printed = capsys.readouterr().out
    latency = float(printed.split("predicted latency of the quantized layers: ")[1].split("x all-W8A8")[0].split()[-1])
    assert 0 < latency <= 3.0 and "budget 3x" in printed
    table = json.loads((tmp_path / "plan.json.costs.json").read_text())
    assert table["machine"]["cpu"] and table["entries"]
    assert main(args[:-2] + ["--max-latency", "0.01"]) == 1  # no plan is 100x faster than W8A8: a clear error
    assert "no plan fits both budgets" in capsys.readouterr().err


def test_ship_plans_re_search_reproduces_the_shipped_plan_when_the_latency_budget_does_not_bind(tmp_path):
    """`reference/ship_plans.py --max-latency`: the benchmark's cached sensitivity table, the shipped plans' groups
    and options; with a budget no plan reaches it picks exactly the shipped 5-bit image plan's precisions."""
    import shutil

    from reference.ship_plans import PIPELINES, ROOT, search_with_latency
    from tests.support import REPO

    shutil.copy(REPO / "benchmarks" / "mixed_precision" / "image-sensitivity.json", tmp_path)
    pipe = DiffusionPipeline.from_pretrained(f"{ROOT}/reference_models/{PIPELINES['image']}")
    path = search_with_latency("image", pipe, None, str(tmp_path), 5.0, 100.0, 16, None)
    searched = json.loads(open(path).read())["layers"]
    shipped = json.loads((REPO / "reference_models" / "pixart_digits" / "viditq_plans" /
                          "w4a8_mp_searched_5bits.json").read_text())["layers"]
    assert {n: (e["weight_bits"], e["group_size"]) for n, e in searched.items()} == {
        n: (e["weight_bits"], e["group_size"]) for n, e in shipped.items()}
    assert json.loads(open(f"{path}.costs.json").read())["entries"]  # the cost table beside the plan


def test_costed_specs_are_the_ones_quantizing_decides_balancing_included(pipe):
    """With statistics the options balance channels (smoothing, rotation per layer); the cost model times each
    layer with the recipe quantizing decides for it, so a rotated layer's time includes its rotation."""
    import copy

    from viditq_diffusers import ViDiTQConfig, calibrate, quantize

    call = {k: v for k, v in CALL.items() if k not in ("num_inference_steps", "guidance_scale")}
    stats = calibrate(pipe, PROMPTS[:1], num_inference_steps=2, guidance_scale=4.5, seeds=SEEDS[:1], **call)
    groups = quantizable_groups(pipe.transformer, 1)
    options = {"W4A8": OPTIONS["W4A8"], "again": OPTIONS["W4A8"]}
    specs = decided_specs(pipe.transformer, options, layers_of(groups), stats)
    quantized = quantize(copy.deepcopy(pipe.transformer), ViDiTQConfig(preset="w4a8", calibration=stats))
    assert specs["W4A8"] == quantized.config.quantization_config.plan["layers"]
    assert specs["again"] is specs["W4A8"]  # an option listed twice is decided once
    assert any(s.recipe_label() != "plain" for s in specs["W4A8"].values())
    table = CostTable(repeats=1, warmup=0)
    group_seconds(pipe, groups, options, table, tokens=8, calibration=stats)
    assert {e["format"] for e in table.entries.values()} >= {format_label(s) for s in specs["W4A8"].values()}


def test_entries_are_measured_interleaved_round_by_round(monkeypatch):
    """Each round times every missing entry once (a drift in the machine's speed shifts all entries alike), each
    entry keeps the median of its rounds, and an entry the table has is not timed again."""
    order, real = [], cost.layer_timer

    def recording_timer(spec, tokens, *args, **kwargs):
        timer = real(spec, tokens, *args, **kwargs)

        def timed():
            order.append(spec.label())
            return timer()
        return timed
    monkeypatch.setattr(cost, "layer_timer", recording_timer)
    linear = torch.nn.Linear(64, 32)
    w8, w4 = (LayerSpec.for_linear(linear, bits, 8, smooth_alpha=0.0) for bits in (8, 4))
    table = CostTable(repeats=3, warmup=0)
    table.measure([(w8, 64, 32, 4, torch.float32), (w4, 64, 32, 4, torch.float32)])
    assert order == [w8.label(), w4.label()] * 3
    assert table.measured == 2 and all(e["seconds"] > 0 for e in table.entries.values())
    table.seconds(w8, 64, 32, 4, torch.float32)
    assert len(order) == 6
