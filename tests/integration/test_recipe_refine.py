"""End-to-end recipe refinement (`refine_recipes`) on a real (tiny, random) PixArt pipeline."""

import copy

import pytest
from diffusers import DiffusionPipeline

from viditq_diffusers import ViDiTQConfig, quantize
from viditq_diffusers.calibration import calibrate
from viditq_diffusers.evaluation import epsilon_error
from viditq_diffusers.recipe_refine import refine_recipes
from viditq_diffusers.testing.zoo import build_tiny_pixart_pipeline

CALL = dict(num_inference_steps=2, guidance_scale=4.5, height=32, width=32, use_resolution_binning=False,
            clean_caption=False)
PROMPTS, SEEDS = ["a thick digit 7", "a thin digit 1"], [0, 1]


@pytest.fixture(scope="module")
def pipe_and_stats(tmp_path_factory):
    path = build_tiny_pixart_pipeline(tmp_path_factory.mktemp("p") / "pipe")
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    call = {k: v for k, v in CALL.items() if k not in ("num_inference_steps", "guidance_scale")}
    pipe.path = str(path)
    return pipe, calibrate(pipe, PROMPTS, 2, 4.5, seeds=SEEDS, **call)


@pytest.mark.parametrize("objective", ["eps", pytest.param("samples", marks=pytest.mark.slow)])
def test_refinement_never_worsens_and_its_plan_reproduces_the_objective(pipe_and_stats, objective):
    pipe, stats = pipe_and_stats
    before = copy.deepcopy(pipe.transformer.state_dict())
    plan, trace = refine_recipes(pipe, ViDiTQConfig(preset="w4a8", calibration=stats), PROMPTS, SEEDS,
                                 objective=objective, **CALL)
    assert all(b <= a for a, b in zip(trace, trace[1:]))
    quantized = [n for n, s in plan["layers"].items() if s.act_bits == 8]
    assert len(trace) == len(quantized) + 1
    assert all(isinstance(plan["layers"][n].smooth_alpha, (float, type(None))) for n in quantized)
    assert all(v.equal(pipe.transformer.state_dict()[k]) for k, v in before.items())  # pipe untouched
    if objective == "eps":  # the plan alone rebuilds the refined model: same teacher-forced error
        model = quantize(copy.deepcopy(pipe.transformer), ViDiTQConfig(plan=plan, calibration=stats))
        assert epsilon_error(pipe, model, PROMPTS, SEEDS, **CALL) == pytest.approx(trace[-1], rel=1e-6)


def test_refinement_names_what_it_needs(pipe_and_stats):
    pipe, stats = pipe_and_stats
    with pytest.raises(ValueError, match="objective must be one of"):
        refine_recipes(pipe, ViDiTQConfig(preset="w4a8", calibration=stats), PROMPTS, SEEDS, objective="psnr", **CALL)
    with pytest.raises(ValueError, match="needs calibration statistics"):
        refine_recipes(pipe, ViDiTQConfig(preset="w4a8"), PROMPTS, SEEDS, **CALL)
    with pytest.raises(ValueError, match="one seed per prompt"):
        refine_recipes(pipe, ViDiTQConfig(preset="w4a8", calibration=stats), PROMPTS, [0], **CALL)


def test_cli_refine_writes_a_plan_that_quantizes(pipe_and_stats, tmp_path, capsys):
    from viditq_diffusers.cli import main
    from viditq_diffusers.jsonio import read_json

    pipe, stats = pipe_and_stats
    stats.save(tmp_path / "stats.safetensors")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    out = tmp_path / "plan.json"
    stats_file = str(tmp_path / "stats.safetensors")
    assert main(["refine", pipe.path, "--calibration", stats_file, "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(out), "--steps", "2", "--height", "32", "--width", "32"]) == 0
    assert "(refined); layers chose:" in capsys.readouterr().out
    plan = read_json(out)
    model = quantize(copy.deepcopy(pipe.transformer), ViDiTQConfig(plan=str(out), calibration=stats_file))
    assert model.config.quantization_config.plan["layers"].keys() == plan["layers"].keys()
