"""Ship the searched mixed-precision plans with the reference pipelines (issue 7; latency budget: issue 26).

    python -m reference.ship_plans [--results benchmarks/mixed_precision] [--budgets 5 6]
    python -m reference.ship_plans --max-latency 1.0 [--cost-tokens M] [--cost-shapes image=SHAPES.json ...]

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

With `--max-latency X` the plans are searched again first, under the bit budget and a latency budget of X times the
all-W8A8 time (`viditq_diffusers.mixed_precision.cost`): the same sensitivity table (the benchmark's cache,
`<kind>-sensitivity.json` in `--results`; no generation runs), the same groups as the shipped plans (image: 8 block
ranges, video: 1) and single-precision options (those the cache measured), each layer timed on this machine at each
option. The times are those of the rows each layer saw in the search's pipeline call (read back from the cache), or
of `--cost-tokens` rows, or at the shapes of a shape map (`--cost-shapes KIND=FILE`, JSON `{layer: [K, N, M]}` or a
list of such triples per layer: the shapes of a bigger model the plan will be mapped onto by layer role and block
position). The searched plan and its cost table are written to `--results` as
`<kind>-searched-<budget>bits-latency<X>.plan.json` (+ `.costs.json`), then shipped as above. Time it on a quiet
machine: the times steer the plan.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os

from diffusers import DiffusionPipeline

from viditq_diffusers import ViDiTQConfig, quantize
from viditq_diffusers.calibration import CalibrationStats
from viditq_diffusers.jsonio import read_json, write_json
from viditq_diffusers.mixed_precision.allocation import allocate
from viditq_diffusers.mixed_precision.cost import group_seconds, seconds_limit
from viditq_diffusers.mixed_precision.search import cost_table, plan_from_choice, quantizable_groups
from viditq_diffusers.plan import average_weight_bits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINES = {"image": "pixart_digits", "video": "latte_digits"}
BLOCK_RANGES = {"image": 8, "video": 1}  # the groups of the shipped plans' searches (RESULTS.md)
SINGLE = ("W4A8", "W4A8-g64", "W8A8")  # the single-precision options; the video cache has no W4A8-g64 runs


def plan_name(budget: float) -> str:
    return f"w4a8_mp_searched_{budget:g}bits.json"


def searched_name(kind: str, budget: float, max_latency: float | None) -> str:
    latency = "" if max_latency is None else f"-latency{max_latency:g}"
    return f"{kind}-searched-{budget:g}bits{latency}.plan.json"


def search_call(fingerprint: dict) -> dict:
    """The pipeline call the sensitivity cache was measured with (its fingerprint keeps each value's repr)."""
    try:
        return {k: ast.literal_eval(v) for k, v in fingerprint["call"].items()}
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"the sensitivity cache's pipeline call {fingerprint['call']} cannot be read back ({e}); "
                         f"pass --cost-tokens M") from None


def search_with_latency(kind: str, pipe, stats, results: str, budget: float, max_latency: float,
                        tokens: int | None, shapes: dict | None) -> str:
    """Allocate again from the benchmark's sensitivity cache under both budgets; returns the plan's path."""
    cache = read_json(os.path.join(results, f"{kind}-sensitivity.json"))
    groups = quantizable_groups(pipe.transformer, BLOCK_RANGES[kind])
    # the options measured for some group (as the benchmark's search, which took the options the cache has)
    options = {o: cache["options"][o] for o in SINGLE if any(o in cache["table"].get(g, {}) for g in groups)}
    missing = [f"{g}/{o}" for g in groups for o in options if o not in cache["table"].get(g, {})]
    if missing:
        raise ValueError(f"the sensitivity cache in {results} lacks {missing[:5]}; run benchmarks.mixed_precision "
                         f"with --block-ranges {BLOCK_RANGES[kind]} first")
    table = {g: {o: cache["table"][g][o] for o in options} for g in groups}
    path = os.path.join(results, searched_name(kind, budget, max_latency))
    costs = cost_table(f"{path}.costs.json", "cpu")
    fingerprint = cache["fingerprint"]
    call = {} if tokens is not None or shapes is not None else search_call(fingerprint)
    seconds, w8a8 = group_seconds(pipe, groups, options, costs, fingerprint["prompts"], fingerprint["seeds"],
                                  stats, tokens, shapes, **call)
    costs.save(f"{path}.costs.json")
    weights = sum(pipe.transformer.get_submodule(n).weight.numel() for names in groups.values() for n in names)
    found = allocate(table, budget * weights, seconds=seconds, max_seconds=seconds_limit(max_latency, w8a8),
                     units=(w8a8, weights))
    write_json(path, plan_from_choice(pipe.transformer, groups, options, found.choice, stats))
    print(f"{kind}, <= {budget:g} bits, <= {max_latency:g}x W8A8: predicted {found.seconds / w8a8:.3f}x W8A8 "
          f"({found.seconds * 1e3:.2f} ms of quantized layers) -> {path}")
    return path


def ship(kind: str, results: str, budgets: list[float], max_latency: float | None = None, tokens: int | None = None,
         shapes: dict | None = None) -> list[str]:
    pipe = DiffusionPipeline.from_pretrained(os.path.join(ROOT, "reference_models", PIPELINES[kind]))
    pipe.set_progress_bar_config(disable=True)
    stats = CalibrationStats.load(os.path.join(results, f"{kind}-calibration.safetensors"))
    out = os.path.join(ROOT, "reference_models", PIPELINES[kind], "viditq_plans")
    os.makedirs(out, exist_ok=True)
    stats.without_samples().save(os.path.join(out, "calibration.safetensors"))
    lines = []
    for budget in budgets:
        if max_latency is None:
            path = os.path.join(results, searched_name(kind, budget, None))
        else:
            path = search_with_latency(kind, pipe, stats, results, budget, max_latency, tokens, shapes)
        config = ViDiTQConfig(plan=read_json(path), calibration=stats)
        decided = quantize(copy.deepcopy(pipe.transformer), config).config.quantization_config.plan
        write_json(os.path.join(out, plan_name(budget)), decided)
        lines.append(f"{kind}, <= {budget:g} bits: {average_weight_bits(decided):.2f} average weight bits -> {out}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "mixed_precision"))
    parser.add_argument("--budgets", type=float, nargs="+", default=[5.0, 6.0])
    parser.add_argument("--only", choices=list(PIPELINES), help="one pipeline only")
    parser.add_argument("--max-latency", type=float,
                        help="search again under this multiple of the all-W8A8 time too, e.g. 1.0 (module docstring)")
    parser.add_argument("--cost-tokens", type=int, help="time every layer with this many rows")
    parser.add_argument("--cost-shapes", nargs="+", default=[], metavar="KIND=FILE",
                        help="time a pipeline's layers at a shape map's shapes (JSON {layer: [K, N, M]})")
    args = parser.parse_args()
    shapes = {}
    for item in args.cost_shapes:
        kind, _, path = item.partition("=")
        if kind not in PIPELINES or not path:
            parser.error(f"--cost-shapes takes KIND=FILE with KIND in {sorted(PIPELINES)}, got {item!r}")
        shapes[kind] = read_json(path)
    if (args.cost_tokens or shapes) and args.max_latency is None:
        parser.error("--cost-tokens and --cost-shapes only apply with --max-latency")
    for kind in PIPELINES:
        if args.only in (None, kind):
            print("\n".join(ship(kind, args.results, args.budgets, args.max_latency, args.cost_tokens,
                                 shapes.get(kind))))


if __name__ == "__main__":
    main()
