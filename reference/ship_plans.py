"""Ship the searched mixed-precision plans with the reference pipelines (issue 7).

    python -m reference.ship_plans [--results benchmarks/mixed_precision] [--budgets 5 6]

For the image and the video pipeline, takes what `benchmarks/mixed_precision.py` wrote (the calibration
statistics and the plans searched at `--budgets` average weight bits), quantizes the transformer once so every
layer's balancing recipe (smoothing alpha, rotation) is decided, and writes into
`reference_models/<pipeline>/viditq_plans/`:
- `w4a8_mp_searched_<budget>bits.json`: the decided plans;
- `calibration.safetensors`: the statistics without their sampled rows (a decided plan needs only the
  per-channel maxima; kilobytes instead of megabytes).
Use them with `ViDiTQConfig(plan=..., calibration=...)` (README). `--results` is the benchmark's `--out` folder
after a run (its statistics files are not committed; the shipped plans came from the per-block image run
and the video run recorded in RESULTS.md, whose plans are kept in `benchmarks/mixed_precision/blocks8|1/`).
"""

from __future__ import annotations

import argparse
import copy
import os

from diffusers import DiffusionPipeline

from viditq_diffusers import ViDiTQConfig, quantize
from viditq_diffusers.calibration import CalibrationStats
from viditq_diffusers.jsonio import read_json, write_json
from viditq_diffusers.plan import average_weight_bits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINES = {"image": "pixart_digits", "video": "latte_digits"}


def plan_name(budget: float) -> str:
    return f"w4a8_mp_searched_{budget:g}bits.json"


def ship(kind: str, results: str, budgets: list[float]) -> list[str]:
    pipe = DiffusionPipeline.from_pretrained(os.path.join(ROOT, "reference_models", PIPELINES[kind]))
    stats = CalibrationStats.load(os.path.join(results, f"{kind}-calibration.safetensors"))
    out = os.path.join(ROOT, "reference_models", PIPELINES[kind], "viditq_plans")
    os.makedirs(out, exist_ok=True)
    stats.without_samples().save(os.path.join(out, "calibration.safetensors"))
    lines = []
    for budget in budgets:
        searched = read_json(os.path.join(results, f"{kind}-searched-{budget:g}bits.plan.json"))
        config = ViDiTQConfig(plan=searched, calibration=stats)
        decided = quantize(copy.deepcopy(pipe.transformer), config).config.quantization_config.plan
        write_json(os.path.join(out, plan_name(budget)), decided)
        lines.append(f"{kind}, <= {budget:g} bits: {average_weight_bits(decided):.2f} average weight bits -> {out}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "mixed_precision"))
    parser.add_argument("--budgets", type=float, nargs="+", default=[5.0, 6.0])
    args = parser.parse_args()
    for kind in PIPELINES:
        print("\n".join(ship(kind, args.results, args.budgets)))


if __name__ == "__main__":
    main()
