"""`viditq` command: quantize, info, demo, calibrate."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

from tqdm.auto import tqdm

from .config import PRESETS, ViDiTQConfig
from .checkpoint import checkpoint_summary, load_any
from .kernels import warmup as warmup_kernels
from .layer_spec import LayerSpec


def cmd_quantize(args) -> None:
    config = ViDiTQConfig(
        preset=args.preset, weight_bits=args.weight_bits, act_bits=args.act_bits, group_size=args.group_size,
        modules_to_not_convert=args.keep_fp, components=args.components,
    )
    from .hub import push_to_hub, save_pretrained

    steps = ["load + quantize", "save"] + (["push"] if args.push else [])
    with tqdm(total=len(steps), desc="viditq quantize", unit="step") as bar:
        bar.set_postfix_str(steps[0])
        obj = load_any(args.src, quantization_config=config)
        bar.update()
        bar.set_postfix_str("save")
        save_pretrained(obj, args.out)
        bar.update()
        if args.push:
            bar.set_postfix_str("push")
            url = push_to_hub(obj, args.push, token=args.token, private=args.private)
            bar.update()
            print(f"pushed: {url}")
    print_summary(checkpoint_summary(args.out), layers=False)


def print_summary(summary: dict, layers: bool) -> None:
    for name, info in summary.items():
        print(f"{name}: {info['model_class']} ({info['num_quantized']} quantized layers)")
        for label, count in sorted(info["formats"].items()):
            print(f"  {label:<12} {count:>5} layers")
        print(f"  average weight bits: {info['average_weight_bits']:.2f}")
        recipes = ", ".join(f"{label} {count}" for label, count in sorted(info["recipes"].items()))
        print(f"  channel balancing: {recipes}")
        if layers:
            for layer, entry in info["layers"].items():
                spec = LayerSpec.from_json(entry, layer)
                alpha = "" if spec.smooth_alpha is None else f" (alpha {spec.smooth_alpha:g})"
                print(f"    {layer:<60} {spec.label()} {spec.in_features}->{spec.out_features} "
                      f"{spec.recipe_label()}{alpha}")
        print(f"  weight bytes: {info['weight_bytes']:,} (FP16 equivalent {info['fp16_bytes']:,}; "
              f"ratio to FP16 {info['weight_bytes'] / info['fp16_bytes']:.3f}x)")


ROUTE_TOKENS = 256  # the input `info --kernels` asks the route table about: a typical DiT layer's token count


def kernel_routes(layers: dict, dtype_name: str | None, tokens: int = ROUTE_TOKENS) -> dict:
    """Per layer of a plan: the kernel route this machine takes for a `[tokens, in_features]` input of the
    model's dtype, its channel balancing, and why each faster route does not apply (`kernels.routes`)."""
    import torch

    from . import kernels

    warmup_kernels()  # the routes that need the C++ kernels report what they would do once built
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name or "float32")
    inputs, rows = {}, {}
    for name, entry in layers.items():
        spec = LayerSpec.from_json(entry, name)
        x = inputs.setdefault(spec.in_features, torch.empty(tokens, spec.in_features, dtype=dtype, device=device))
        row = {}
        for key, bits in (("", spec.weight_bits), ("early_", spec.early_weight_bits)):
            if bits:
                call = kernels.LayerCall.of_spec(spec, bits)
                route = kernels.select_route(call, x)
                row.update({f"{key}format": call.label, f"{key}route": route.name,
                            f"{key}skipped": {n: reason for n, reason in kernels.explain(call, x) if reason}})
                row.setdefault("balancing", kernels.routes.balance_name(call, x, route))
        rows[name] = row
    return {"device": device, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "layers": rows}


def print_kernel_routes(routes: dict) -> None:
    counts: dict[str, int] = {}
    for row in routes["layers"].values():
        counts[row["route"]] = counts.get(row["route"], 0) + 1
    tally = ", ".join(f"{name} {count}" for name, count in sorted(counts.items(), key=lambda item: -item[1]))
    print(f"  kernel routes on this machine ({routes['device']}, {routes['dtype']} input of {routes['tokens']} "
          f"tokens): {tally}")
    for layer, row in routes["layers"].items():
        early = f"; early W copy {row['early_format']}: {row['early_route']}" if "early_route" in row else ""
        print(f"    {layer:<60} {row['format']:<12} {row['route']:<14} balancing: {row['balancing']}{early}")
        if row["skipped"]:
            print("        skipped: " + " | ".join(f"{name}: {reason}" for name, reason in row["skipped"].items()))


def cmd_info(args) -> None:
    summary = checkpoint_summary(args.dir)
    if args.kernels:
        for info in summary.values():
            info["kernel_routes"] = kernel_routes(info["layers"], info.get("dtype"))
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for name, info in summary.items():
        print_summary({name: info}, layers=args.layers)
        if args.kernels:
            print_kernel_routes(info["kernel_routes"])


BUNDLED_PIPELINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "reference_models", "pixart_digits")
DEMO_PROMPTS = ["a thick handwritten digit 7", "a thin handwritten digit 3", "an italic handwritten digit 5",
                "a faint handwritten digit 0", "a handwritten digit 8"]


def cmd_demo(args) -> None:
    """Quantize the bundled trained PixArt pipeline, generate FP vs quantized, save a grid, print metrics."""
    if args.ui:  # the Gradio app instead, as its own process: the core never imports the apps
        if importlib.util.find_spec("gradio_app") is None:
            raise SystemExit('the Gradio app is not installed: from a checkout, pip install -e ".[gradio]"')
        sys.exit(subprocess.call([sys.executable, "-m", "gradio_app"]))
    from diffusers import DiffusionPipeline

    from .evaluation import compare_samples, epsilon_error, generate, save_grid
    from .footprint import fp16_weight_bytes, weight_bytes

    warmup_kernels()  # the C++ CPU kernels: built once per machine (about a minute, with a message), then loaded
    if not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
        raise FileNotFoundError(
            f"no diffusers pipeline at {args.pipeline!r}; the trained reference pipeline ships in the git "
            f"checkout (reference_models/pixart_digits): install from the checkout or pass --pipeline DIR."
        )
    call = dict(num_inference_steps=args.steps, guidance_scale=4.5, use_resolution_binning=False, clean_caption=False)
    seeds = list(range(len(DEMO_PROMPTS)))
    fp = DiffusionPipeline.from_pretrained(args.pipeline)
    rows, table = {}, []
    for label, config in [("FP32", None)] + [(p.upper(), ViDiTQConfig(preset=p)) for p in args.presets]:
        pipe = fp if config is None else DiffusionPipeline.from_pretrained(args.pipeline, quantization_config=config)
        pipe.set_progress_bar_config(disable=True)
        rows[label] = generate(pipe, DEMO_PROMPTS, seeds, **call)
        if config is None:
            continue
        scores = compare_samples(rows[label], rows["FP32"])
        eps = epsilon_error(fp, pipe.transformer, DEMO_PROMPTS, seeds, **call)
        ratio = weight_bytes(pipe.transformer) / fp16_weight_bytes(pipe.transformer)
        table.append(f"| {label} | {scores['psnr']:.2f} | {scores['ssim']:.4f} | {eps:.2e} | {ratio:.3f}x |")
    save_grid(rows, args.out, scale=3)
    print(f"Bundled pipeline {args.pipeline}: {len(DEMO_PROMPTS)} prompts, seeds {seeds}, {args.steps} steps")
    print("| variant | PSNR vs FP (dB) | SSIM vs FP | eps rel. MSE | transformer weights vs FP16 |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(table))
    print(f"grid (rows: {', '.join(rows)}; columns: {' / '.join(DEMO_PROMPTS)}) saved to {args.out}")


def read_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no prompts file at {path!r}; pass --prompts FILE with one prompt per line.")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"the prompts file {path!r} is empty; write one calibration prompt per line.")
    return prompts


def check_pipeline_dir(path: str) -> None:
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"no diffusers pipeline at {path!r} (no model_index.json); pass a "
                                f"pipeline directory, e.g. reference_models/pixart_digits.")


def pipeline_call(pipe, args) -> dict:
    """The extra pipeline-call arguments the command line implies (size; no caption cleaning)."""
    import inspect

    accepted = inspect.signature(pipe.__call__).parameters
    call = {key: value for key, value in (("height", args.height), ("width", args.width)) if value is not None}
    if call and "use_resolution_binning" in accepted:
        call["use_resolution_binning"] = False  # an explicit size is used as given
    if "clean_caption" in accepted:
        call["clean_caption"] = False  # as the project's evaluation harness generates
    return call


def cmd_calibrate(args) -> None:
    """Record activation statistics on a pipeline; works alone or under `accelerate launch` (prompts sharded)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from diffusers import DiffusionPipeline

    from .calibration import calibrate

    prompts = read_prompts(args.prompts)
    check_pipeline_dir(args.pipeline)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    pipe = DiffusionPipeline.from_pretrained(args.pipeline).to(state.device)
    call = pipeline_call(pipe, args)
    seeds = [args.seed + i for i in range(len(prompts))]
    stats = calibrate(pipe, prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, seeds=seeds,
                      timestep_buckets=args.buckets, **call)
    if not state.is_main_process:
        return
    stats.save(args.out)
    ratios = stats.outlier_ratio()
    worst = max(ratios, key=ratios.get)
    print(f"calibrated {stats.model_class}: {len(stats.layers)} layers, {len(prompts)} prompts x {args.steps} steps, "
          f"{args.buckets} timestep buckets")
    print(f"max outlier ratio (max / median input channel absmax): {ratios[worst]:.1f}x in {worst}")
    print(f"saved to {args.out}")


def cmd_search(args) -> None:
    """Mixed-precision search: per-group sensitivity, then the best plan under an average weight-bit budget."""
    from diffusers import DiffusionPipeline

    from .calibration import CalibrationStats
    from .jsonio import write_json
    from .mixed_precision.heatmap import save_heatmap
    from .mixed_precision.search import search

    warmup_kernels()
    prompts = read_prompts(args.prompts)
    check_pipeline_dir(args.pipeline)
    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    stats = CalibrationStats.load(args.calibration) if args.calibration else None
    result = search(pipe, args.budget_bits, prompts, [args.seed + i for i in range(len(prompts))],
                    block_ranges=args.block_ranges, calibration=stats,
                    cache=args.cache or f"{args.out}.sensitivity.json",
                    candidates=args.candidates, per_layer=args.per_layer,
                    num_inference_steps=args.steps, guidance_scale=args.guidance, **pipeline_call(pipe, args))
    write_json(args.out, result.plan)
    save_heatmap(result.table, f"{args.out}.heatmap.png")
    print("| group | layers | chosen | " + " | ".join(f"rel. sq. error {o}" for o in next(iter(result.table.values())))
          + " |")
    print("|---|---:|---|" + "---:|" * len(next(iter(result.table.values()))))
    for group, options in result.table.items():
        drops = " | ".join(f"{entry['metrics']['fidelity']:.3g}" for entry in options.values())
        print(f"| {group} | {len(result.groups[group])} | {result.allocation.choice[group]} | {drops} |")
    for i, candidate in enumerate(result.confirmed):
        print(f"candidate {i + 1}: relative squared error predicted {candidate['predicted']['fidelity']:.3g}, "
              f"measured whole {candidate['measured']['fidelity']:.3g}"
              + (" (chosen)" if candidate["chosen"] else ""))
    print(f"average weight bits {result.average_bits:.2f} (budget {args.budget_bits}); plan saved to {args.out}, "
          f"sensitivity heatmap to {args.out}.heatmap.png")
    print(f"quantize with ViDiTQConfig(plan={args.out!r}" + (", calibration=stats)" if stats else ")"))


def cmd_refine(args) -> None:
    """End-to-end recipe refinement: per layer, the balancing recipe that brings the whole denoiser closest to FP."""
    from diffusers import DiffusionPipeline

    from .config import ViDiTQConfig
    from .jsonio import write_json
    from .plan import summarize_recipes
    from .recipe_refine import refine_recipes

    warmup_kernels()
    prompts = read_prompts(args.prompts)
    check_pipeline_dir(args.pipeline)
    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    config = ViDiTQConfig(preset=args.preset, calibration=args.calibration, balance="search")
    plan, trace = refine_recipes(pipe, config, prompts, [args.seed + i for i in range(len(prompts))],
                                 objective=args.objective, num_inference_steps=args.steps,
                                 guidance_scale=args.guidance, **pipeline_call(pipe, args))
    write_json(args.out, plan)
    mix = ", ".join(f"{k} {v}" for k, v in sorted(summarize_recipes(plan).items()))
    print(f"{args.objective} error vs FP on {len(prompts)} prompts: {trace[0]:.4g} (per-layer search) -> "
          f"{trace[-1]:.4g} (refined); layers chose: {mix}")
    print(f"plan saved to {args.out}; quantize with ViDiTQConfig(plan={args.out!r}, calibration={args.calibration!r})")


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """How the commands that run the pipeline on prompts call it (see `pipeline_call`)."""
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed SEED + i")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viditq", description="ViDiT-Q quantization for diffusers DiTs")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a diffusers model or pipeline directory")
    q.add_argument("src", help="a diffusers model directory (config.json) or pipeline directory (model_index.json)")
    q.add_argument("--preset", default="w8a8", choices=sorted(PRESETS))
    q.add_argument("--weight-bits", type=int)
    q.add_argument("--act-bits", type=int)
    q.add_argument("--group-size", type=int)
    q.add_argument("--keep-fp", nargs="*", default=None, help="extra layer names/patterns to keep in floating point")
    q.add_argument("--components", nargs="+", default=["transformer"], help="pipeline components to quantize")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--push", metavar="REPO_ID", help="also push to the Hugging Face Hub")
    q.add_argument("--token", help="Hub token (default: the logged-in token / HF_TOKEN)")
    q.add_argument("--private", action="store_true")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("info", help="print the plan summary and weight memory of a quantized checkpoint")
    i.add_argument("dir")
    i.add_argument("--layers", action="store_true", help="list every quantized layer")
    i.add_argument("--json", action="store_true")
    i.add_argument("--kernels", action="store_true",
                   help=f"per layer, the kernel route this machine takes (for {ROUTE_TOKENS} tokens) and why faster "
                        f"ones do not apply")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo",
                       help="quantize the bundled trained pipeline, save an FP-vs-quantized grid, print metrics")
    d.add_argument("--pipeline", default=BUNDLED_PIPELINE, help="a diffusers PixArt pipeline directory")
    d.add_argument("--presets", nargs="+", default=["w8a8"], choices=[p for p in PRESETS if p != "naive_w8a8"])
    d.add_argument("--steps", type=int, default=20)
    d.add_argument("--out", default="viditq-demo.png", help="where to save the grid PNG")
    d.add_argument("--ui", action="store_true",
                   help="launch the Gradio app (FP / W8A8 / W4A8-MP in the browser) instead")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("search", help="search a mixed-precision plan (W4A8 / W8A8 per layer group) under a bit budget")
    s.add_argument("pipeline", help="a diffusers pipeline directory (model_index.json) with a transformer")
    s.add_argument("--budget-bits", type=float, required=True, help="average weight bits, e.g. 5.0 (4 to 8)")
    s.add_argument("--prompts", required=True, help="text file, one prompt per line (seeds SEED, SEED+1, ...)")
    s.add_argument("--out", required=True, help="where to write the plan (JSON)")
    s.add_argument("--calibration", help="statistics from `viditq calibrate`: the options then balance channels")
    s.add_argument("--block-ranges", type=int, default=4, help="groups = layer role x this many block ranges")
    s.add_argument("--per-layer", action="store_true",
                   help="every layer its own group: finer plans, one sensitivity run per layer and option")
    s.add_argument("--candidates", type=int, default=1,
                   help="generate the allocation's best N plans whole and keep the best measured (default 1: off)")
    s.add_argument("--cache", help="sensitivity cache (JSON; default OUT.sensitivity.json): reruns resume")
    add_generation_args(s)
    s.set_defaults(func=cmd_search)

    r = sub.add_parser("refine", help="choose each layer's balancing recipe by the whole denoiser's error (a plan)")
    r.add_argument("pipeline", help="a diffusers pipeline directory (model_index.json) with a transformer")
    r.add_argument("--calibration", required=True, help="statistics from `viditq calibrate` (.safetensors)")
    r.add_argument("--prompts", required=True, help="text file, one prompt per line (seeds SEED, SEED+1, ...)")
    r.add_argument("--out", required=True, help="where to write the plan (JSON)")
    r.add_argument("--preset", default="w4a8", choices=["w8a8", "w4a8", "w4a8_mp"])
    r.add_argument("--objective", default="eps", choices=["eps", "samples"],
                   help="eps: teacher-forced denoiser error (default); samples: final-sample MSE")
    add_generation_args(r)
    r.set_defaults(func=cmd_refine)

    c = sub.add_parser("calibrate", help="record per-layer activation statistics (runs under accelerate launch too)")
    c.add_argument("pipeline", help="a diffusers pipeline directory (model_index.json) with a transformer")
    c.add_argument("--prompts", required=True, help="text file, one calibration prompt per line")
    c.add_argument("--out", required=True, help="where to write the statistics (.safetensors)")
    c.add_argument("--buckets", type=int, default=4, help="timestep buckets")
    add_generation_args(c)
    c.set_defaults(func=cmd_calibrate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"viditq {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
