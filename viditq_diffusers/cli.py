"""`viditq` command: quantize, info, demo, calibrate, search, refine.

Every failure is one line on stderr, `viditq <command>: error: <message>`, with exit status 2 when the command
line is wrong (argparse's own errors, a value out of range, an option the given model needs or does not support)
and 1 when the command line is fine but the work failed (files, the disk, the network, a checkpoint). `--debug`
also prints the traceback. Output paths are checked before any work, so a bad `--out` never costs a whole run.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import traceback

from tqdm.auto import tqdm

from .config import PRESETS, ViDiTQConfig
from .checkpoint import checkpoint_summary, load_any
from .kernels import warmup as warmup_kernels
from .layer_spec import LayerSpec

MIN_STEPS = 2  # PixArt's pipeline reads a second scheduler output at 1 step, which multistep schedulers lack
MAX_STEPS = 1000  # the schedulers' training timesteps: more inference steps than that is an error in diffusers
PIXART_PIPELINES = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")  # what `viditq demo` generates with


class UsageError(Exception):
    """The command line is wrong for what it names (an option the model needs, or one it does not support):
    exit status 2, like argparse's own errors."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (`viditq <command>: error: ...`) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# -- argument types: a bad value is an argparse error that names the option (exit status 2) ----------------------

def integer(low: int | None = None, high: int | None = None, multiple: int = 1, why: str = ""):
    """An argparse type: an integer in [low, high] (a bound of None: unbounded), a multiple of `multiple`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        in_range = (low is None or value >= low) and (high is None or value <= high)
        if not in_range or value % multiple:
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            each = f", a multiple of {multiple}" if multiple > 1 else ""
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}{each}, got {value}{why}")
        return value
    return parse


def number(low: float, high: float | None = None):
    """An argparse type: a finite float in [low, high] (high None: unbounded); NaN and Inf are refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            bounds = f">= {low:g}" if high is None else f"in [{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds}, got {text!r}")
        return value
    return parse


STEPS = integer(MIN_STEPS, MAX_STEPS, why=f" (PixArt's pipeline fails on 1 step with multistep schedulers; the "
                                           f"schedulers have {MAX_STEPS} training timesteps)")
SIZE = integer(8, 16384, multiple=8, why=" (pixels; the VAE halves the size three times)")
SEED = integer(0, 2**63 - 1)


# -- output paths: checked before any work ------------------------------------------------------------------------

def check_writable(folder: str, option: str, path: str) -> None:
    """Create and drop a temporary file in `folder`: the real test of writing there (permissions, a read-only
    mount, also for root, who passes `os.access` checks)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OSError(f"cannot write {option} {path!r}: the folder {folder!r} is not writable ({error.strerror}); "
                      f"pass an {option} in a writable folder") from error


def check_output_file(path: str, option: str = "--out") -> None:
    """`path` will be written as a file: its folder exists and is writable, and it is not a folder itself."""
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"{option} {path!r} is a folder; pass a file path inside it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, f"the folder of {option} {path!r} does not exist ({folder}); "
                                              f"create it first or pass another {option}")
    check_writable(folder, option, path)


def check_output_dir(path: str, option: str = "--out") -> None:
    """`path` will be a folder (created with its parents if needed): no file in the way, writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(errno.EEXIST, f"{option} {path!r} is an existing file; pass a folder (it is created "
                                            f"if needed)")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(errno.ENOTDIR, f"{option} {path!r} lies under the file {existing!r}; pass a "
                                                f"folder path")
    check_writable(existing, option, path)


# -- quantize -------------------------------------------------------------------------------------------------------

def stored_quantization(src: str) -> dict[str, dict]:
    """{component: its ViDiT-Q quantization_config} of an already quantized model or pipeline folder."""
    if os.path.isfile(os.path.join(src, "model_index.json")):
        with open(os.path.join(src, "model_index.json"), encoding="utf-8") as f:
            folders = {name: os.path.join(src, name) for name in json.load(f) if not name.startswith("_")}
    else:
        folders = {"model": src}
    found = {}
    for name, folder in folders.items():
        try:
            with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
                qconfig = json.load(f).get("quantization_config") or {}
        except (OSError, ValueError, AttributeError):
            continue  # not a model folder (tokenizer, scheduler) or not ours to judge here: loading says more
        if isinstance(qconfig, dict) and qconfig.get("quant_method") == "viditq":
            found[name] = qconfig
    return found


def check_requantize(args, stored: dict[str, dict]) -> None:
    """A quantized source is only copied (diffusers keeps its stored config, so another preset would silently
    keep the old bits): allowed when the command asks for exactly what it holds, refused otherwise."""
    defaults = PRESETS[args.preset]
    wanted = {"preset": args.preset,
              "weight_bits": defaults["weight_bits"] if args.weight_bits is None else args.weight_bits,
              "act_bits": defaults["act_bits"] if args.act_bits is None else args.act_bits,
              "group_size": defaults["group_size"] if args.group_size is None else args.group_size}
    missing = [c for c in args.components if c not in stored] if "model" not in stored else []
    extras = [option for option, value in (("--keep-fp", args.keep_fp), ("--plan", args.plan),
                                           ("--calibration", args.calibration)) if value]
    for name, qconfig in stored.items():
        held = {key: qconfig.get(key) for key in wanted}
        if held != wanted or missing or extras:
            text = lambda d: ", ".join(f"{key} {value}" for key, value in d.items())  # noqa: E731
            why = (f"the components {missing} are not quantized in it" if missing and held == wanted else
                   f"{' / '.join(extras)} would be ignored" if held == wanted else
                   f"its {name} holds {text(held)}; the options ask for {text(wanted)}, which loading would "
                   f"ignore (the stored config decides)")
            raise UsageError(f"{args.src!r} is already ViDiT-Q quantized: {why}. Quantize the floating-point model "
                             f"instead (quantizing twice would re-round integer weights), or pass --preset "
                             f"{held['preset']} with no other quantization options to copy it as it is.")


def build_config(args) -> ViDiTQConfig:
    """The ViDiTQConfig the options ask for; an error in their terms (the options, not Python keywords)."""
    options = dict(preset=args.preset, weight_bits=args.weight_bits, act_bits=args.act_bits,
                   group_size=args.group_size, modules_to_not_convert=args.keep_fp, components=args.components,
                   plan=args.plan, calibration=args.calibration)
    try:
        return ViDiTQConfig(**options)
    except (ValueError, TypeError) as error:
        # said in the command line's words: whether it is --calibration that is missing or extra
        toggled = dict(options, calibration=None if args.calibration else "statistics.safetensors")
        try:
            ViDiTQConfig(**toggled)
        except (ValueError, TypeError):
            raise error from None  # not about --calibration: the config's own message
        if args.calibration:
            raise UsageError(f"--preset {args.preset} uses no calibration statistics: leave out --calibration") \
                from error
        raise UsageError(f"--preset {args.preset} needs activation statistics: record them with `viditq calibrate "
                         f"PIPE --prompts FILE --out stats.safetensors`, then pass --calibration "
                         f"stats.safetensors") from error


def cmd_quantize(args) -> None:
    from .hub import push_to_hub, save_pretrained

    if not os.path.isdir(args.src):
        raise FileNotFoundError(errno.ENOENT, f"{args.src!r} is not a folder; pass a diffusers model folder "
                                              f"(config.json) or pipeline folder (model_index.json)")
    for option, path in (("--plan", args.plan), ("--calibration", args.calibration)):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, f"{option} {path!r} does not exist")
    check_output_dir(args.out)
    stored = stored_quantization(args.src)
    if stored:
        check_requantize(args, stored)
        load_options = {}  # a copy: the stored config decides, as it would anyway
    else:
        load_options = {"quantization_config": build_config(args)}

    steps = ["load + quantize", "save"] + (["push"] if args.push else [])
    with tqdm(total=len(steps), desc="viditq quantize", unit="step") as bar:
        bar.set_postfix_str(steps[0])
        obj = load_any(args.src, **load_options)
        bar.update()
        bar.set_postfix_str("save")
        save_pretrained(obj, args.out)
        bar.update()
        if args.push:
            bar.set_postfix_str("push")
            try:
                url = push_to_hub(obj, args.push, token=args.token, private=args.private)
            except Exception as error:
                raise RuntimeError(f"the checkpoint is saved in {args.out}, but pushing it to the Hub repo "
                                   f"{args.push!r} failed ({type(error).__name__}: {error}); check the network "
                                   f"and the token (--token or HF_TOKEN), then run the command again") from error
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
    for name, info in summary.items():
        if not info["weight_bytes"]:
            folder = args.dir if name == "model" else os.path.join(args.dir, name)
            raise ValueError(f"{folder!r} has a ViDiT-Q config.json but no weights (no .safetensors file with "
                             f"tensors): the checkpoint is incomplete; save or download it again")
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
            raise RuntimeError('the Gradio app is not installed: from a checkout, pip install -e ".[gradio]"')
        sys.exit(subprocess.call([sys.executable, "-m", "gradio_app"]))
    from diffusers import DiffusionPipeline

    from .evaluation import compare_samples, epsilon_error, generate, save_grid
    from .footprint import fp16_weight_bytes, weight_bytes

    if not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
        raise FileNotFoundError(
            f"no diffusers pipeline at {args.pipeline!r}; the trained reference pipeline ships in the git "
            f"checkout (reference_models/pixart_digits): install from the checkout or pass --pipeline DIR."
        )
    with open(os.path.join(args.pipeline, "model_index.json"), encoding="utf-8") as f:
        pipeline_class = json.load(f).get("_class_name")
    if pipeline_class not in PIXART_PIPELINES:
        raise UsageError(f"--pipeline {args.pipeline!r} is a {pipeline_class}; the demo generates with "
                         f"{' or '.join(PIXART_PIPELINES)} only. Other pipelines: `viditq quantize`, or the Python "
                         f"API (viditq_diffusers.evaluation.generate)")
    check_output_file(args.out)
    warmup_kernels()  # the C++ CPU kernels: built once per machine (about a minute, with a message), then loaded
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
    if "use_resolution_binning" in accepted:
        # the size is used as given, or the transformer's own square size: binning maps a square size in its
        # tables onto itself and refuses the others ("Invalid sample size")
        call["use_resolution_binning"] = False
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
    check_output_file(args.out)  # before the run, not after it
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    pipe = DiffusionPipeline.from_pretrained(args.pipeline).to(state.device)
    seeds = [args.seed + i for i in range(len(prompts))]
    if args.component == "transformer":
        stats = calibrate(pipe, prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, seeds=seeds,
                          timestep_buckets=args.buckets, **pipeline_call(pipe, args))
        runs = f"{len(prompts)} prompts x {args.steps} steps, {args.buckets} timestep buckets"
    else:  # a text encoder runs once per prompt: no steps, buckets or image size
        stats = calibrate(pipe, prompts, seeds=seeds, component=args.component)
        runs = f"{len(prompts)} prompts"
    if not state.is_main_process:
        return
    stats.save(args.out)
    ratios = stats.outlier_ratio()
    worst = max(ratios, key=ratios.get)
    print(f"calibrated {stats.model_class}: {len(stats.layers)} layers, {runs}")
    print(f"max outlier ratio (max / median input channel absmax): {ratios[worst]:.1f}x in {worst}")
    print(f"saved to {args.out}")


def cmd_search(args) -> None:
    """Mixed-precision search: per-group sensitivity, then the best plan under an average weight-bit budget (and a
    latency budget, with --max-latency)."""
    from diffusers import DiffusionPipeline

    from .calibration import CalibrationStats
    from .jsonio import read_json, write_json
    from .mixed_precision.heatmap import save_heatmap
    from .mixed_precision.search import search

    prompts = read_prompts(args.prompts)
    check_pipeline_dir(args.pipeline)
    check_output_file(args.out)
    warmup_kernels()
    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    stats = CalibrationStats.load(args.calibration) if args.calibration else None
    timed = args.max_latency is not None or args.costs or args.cost_tokens or args.cost_shapes
    costs = (args.costs or f"{args.out}.costs.json") if timed else None
    result = search(pipe, args.budget_bits, prompts, [args.seed + i for i in range(len(prompts))],
                    block_ranges=args.block_ranges, calibration=stats,
                    cache=args.cache or f"{args.out}.sensitivity.json",
                    candidates=args.candidates, per_layer=args.per_layer, max_latency=args.max_latency,
                    costs=costs, cost_tokens=args.cost_tokens,
                    cost_shapes=read_json(args.cost_shapes) if args.cost_shapes else None,
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
        speed = (f", predicted latency {candidate['seconds'] / result.w8a8_seconds:.3f}x W8A8"
                 if candidate.get("seconds") is not None else "")
        print(f"candidate {i + 1}: relative squared error predicted {candidate['predicted']['fidelity']:.3g}, "
              f"measured whole {candidate['measured']['fidelity']:.3g}{speed}"
              + (" (chosen)" if candidate["chosen"] else ""))
    print(f"average weight bits {result.average_bits:.2f} (budget {args.budget_bits}); plan saved to {args.out}, "
          f"sensitivity heatmap to {args.out}.heatmap.png")
    if result.latency is not None:
        budget = f"budget {args.max_latency:g}x" if args.max_latency is not None else "no latency budget"
        print(f"predicted latency of the quantized layers: {result.allocation.seconds * 1e3:.3f} ms, "
              f"{result.latency:.3f}x all-W8A8 ({result.w8a8_seconds * 1e3:.3f} ms; {budget}); cost table saved to "
              f"{costs}")
    print(f"quantize with: viditq quantize {args.pipeline} --plan {args.out}"
          + (f" --calibration {args.calibration}" if stats else "") + " --out DST")


def cmd_refine(args) -> None:
    """End-to-end recipe refinement: per layer, the balancing recipe that brings the whole denoiser closest to FP."""
    from diffusers import DiffusionPipeline

    from .config import ViDiTQConfig
    from .jsonio import write_json
    from .plan import summarize_recipes
    from .recipe_refine import refine_recipes

    prompts = read_prompts(args.prompts)
    check_pipeline_dir(args.pipeline)
    check_output_file(args.out)
    warmup_kernels()
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
    print(f"plan saved to {args.out}; quantize with: viditq quantize {args.pipeline} --plan {args.out} "
          f"--calibration {args.calibration} --out DST")


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """How the commands that run the pipeline on prompts call it (see `pipeline_call`)."""
    parser.add_argument("--steps", type=STEPS, default=20, help=f"denoising steps ({MIN_STEPS} to {MAX_STEPS})")
    parser.add_argument("--guidance", type=number(0.0), default=4.5,
                        help="classifier-free guidance scale (finite, >= 0; 1 or less turns guidance off)")
    parser.add_argument("--seed", type=SEED, default=0, help="prompt i uses seed SEED + i")
    parser.add_argument("--height", type=SIZE, help="image height in pixels (a multiple of 8; default: the model's)")
    parser.add_argument("--width", type=SIZE, help="image width in pixels (a multiple of 8; default: the model's)")


def build_parser() -> argparse.ArgumentParser:
    debug = Parser(add_help=False)  # --debug before or after the command; SUPPRESS keeps the first one given
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, also print the traceback")
    parser = Parser(prog="viditq", description="ViDiT-Q quantization for diffusers DiTs", parents=[debug])
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", parents=[debug], help="quantize a diffusers model or pipeline directory")
    q.add_argument("src", help="a diffusers model directory (config.json) or pipeline directory (model_index.json)")
    q.add_argument("--preset", default="w8a8", choices=sorted(PRESETS))
    q.add_argument("--weight-bits", type=int, choices=[4, 8])
    q.add_argument("--act-bits", type=int, choices=[8, 16], help="8: integer activations; 16: weight-only")
    q.add_argument("--group-size", type=integer(1), help="input channels per weight scale (default: per channel)")
    q.add_argument("--keep-fp", nargs="*", default=None, help="extra layer names/patterns to keep in floating point")
    q.add_argument("--components", nargs="+", default=["transformer"], help="pipeline components to quantize")
    q.add_argument("--calibration", metavar="STATS",
                   help="statistics from `viditq calibrate` (.safetensors): needed by the smoothing and static presets")
    q.add_argument("--plan", help="a plan from `viditq search` or `viditq refine` (JSON): it decides every layer")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--push", metavar="REPO_ID", help="also push to the Hugging Face Hub")
    q.add_argument("--token", help="Hub token (default: the logged-in token / HF_TOKEN)")
    q.add_argument("--private", action="store_true")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("info", parents=[debug],
                       help="print the plan summary and weight memory of a quantized checkpoint")
    i.add_argument("dir")
    i.add_argument("--layers", action="store_true", help="list every quantized layer")
    i.add_argument("--json", action="store_true")
    i.add_argument("--kernels", action="store_true",
                   help=f"per layer, the kernel route this machine takes (for {ROUTE_TOKENS} tokens) and why faster "
                        f"ones do not apply")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", parents=[debug],
                       help="quantize the bundled trained pipeline, save an FP-vs-quantized grid, print metrics")
    d.add_argument("--pipeline", default=BUNDLED_PIPELINE, help="a diffusers PixArt pipeline directory")
    d.add_argument("--presets", nargs="+", default=["w8a8"], choices=[p for p in PRESETS if p != "naive_w8a8"])
    d.add_argument("--steps", type=STEPS, default=20, help=f"denoising steps ({MIN_STEPS} to {MAX_STEPS})")
    d.add_argument("--out", default="viditq-demo.png", help="where to save the grid PNG")
    d.add_argument("--ui", action="store_true",
                   help="launch the Gradio app (FP / W8A8 / W4A8-MP in the browser) instead")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("search", parents=[debug],
                       help="search a mixed-precision plan (W4A8 / W8A8 per layer group) under a bit budget")
    s.add_argument("pipeline", help="a diffusers pipeline directory (model_index.json) with a transformer")
    s.add_argument("--budget-bits", type=number(4.0, 8.0), required=True,
                   help="average weight bits, e.g. 5.0 (4 to 8)")
    s.add_argument("--prompts", required=True, help="text file, one prompt per line (seeds SEED, SEED+1, ...)")
    s.add_argument("--out", required=True, help="where to write the plan (JSON)")
    s.add_argument("--calibration", help="statistics from `viditq calibrate`: the options then balance channels")
    s.add_argument("--block-ranges", type=integer(1), default=4, help="groups = layer role x this many block ranges")
    s.add_argument("--per-layer", action="store_true",
                   help="every layer its own group: finer plans, one sensitivity run per layer and option")
    s.add_argument("--candidates", type=integer(1), default=1,
                   help="generate the allocation's best N plans whole and keep the best measured (default 1: off)")
    s.add_argument("--cache", help="sensitivity cache (JSON; default OUT.sensitivity.json): reruns resume")
    s.add_argument("--max-latency", type=number(1e-3),
                   help="latency budget: the quantized layers' predicted time as a multiple of all of them at W8A8 "
                        "on this machine, e.g. 1.0 = no slower than W8A8 (times measured by the cost model)")
    s.add_argument("--costs", help="cost table (JSON; default OUT.costs.json): reused when it exists and was measured "
                                   "on this kind of CPU, else measured and saved there")
    s.add_argument("--cost-tokens", type=integer(1),
                   help="time every layer with this many rows (tokens x batch; default: the rows each layer sees "
                        "in the search's pipeline call)")
    s.add_argument("--cost-shapes", help="time the layers at another model's shapes: JSON {layer: [K, N, M]} (or a "
                                         "list of such triples per layer, summed)")
    add_generation_args(s)
    s.set_defaults(func=cmd_search)

    r = sub.add_parser("refine", parents=[debug],
                       help="choose each layer's balancing recipe by the whole denoiser's error (a plan)")
    r.add_argument("pipeline", help="a diffusers pipeline directory (model_index.json) with a transformer")
    r.add_argument("--calibration", required=True, help="statistics from `viditq calibrate` (.safetensors)")
    r.add_argument("--prompts", required=True, help="text file, one prompt per line (seeds SEED, SEED+1, ...)")
    r.add_argument("--out", required=True, help="where to write the plan (JSON)")
    r.add_argument("--preset", default="w4a8", choices=["w8a8", "w4a8", "w4a8_mp"])
    r.add_argument("--objective", default="eps", choices=["eps", "samples"],
                   help="eps: teacher-forced denoiser error (default); samples: final-sample MSE")
    add_generation_args(r)
    r.set_defaults(func=cmd_refine)

    c = sub.add_parser("calibrate", parents=[debug],
                       help="record per-layer activation statistics (runs under accelerate launch too)")
    c.add_argument("pipeline", help="a diffusers pipeline directory (model_index.json) with a transformer")
    c.add_argument("--prompts", required=True, help="text file, one calibration prompt per line")
    c.add_argument("--out", required=True, help="where to write the statistics (.safetensors)")
    c.add_argument("--buckets", type=integer(1, MAX_STEPS), default=4, help="timestep buckets")
    c.add_argument("--component", default="transformer",
                   help="the component to record: the denoiser (default) or a text encoder ('text_encoder', "
                        "'text_encoder_2', ...), whose statistics serve ViDiTQConfig('w8a8', calibration=...) on it")
    add_generation_args(c)
    c.set_defaults(func=cmd_calibrate)
    parser.commands = sub.choices  # so that main() reports an unknown option under its command's name
    return parser


DISK_FULL = "No space left on device"
HINTS = {errno.ENOSPC: "the disk is full: free space or write to another disk",
         errno.EROFS: "a read-only file system: write somewhere else",
         errno.EACCES: "no permission: write somewhere else or fix the permissions"}


def describe(error: BaseException) -> str:
    """One line for an error: our messages as they are, an error from the operating system with its path and
    what to do, any other exception with its type (something not foreseen: --debug shows where)."""
    from safetensors import SafetensorError

    if isinstance(error, OSError) and error.errno is not None:
        text = (f"{error.filename}: " if error.filename else "") + (error.strerror or str(error))
        text += f" ({HINTS[error.errno]})" if error.errno in HINTS else ""
    elif isinstance(error, (UsageError, ValueError, RuntimeError, OSError, SafetensorError)):
        text = str(error)
        if DISK_FULL in text:  # safetensors' writer reports a full disk in its own error type
            text += f" ({HINTS[errno.ENOSPC]})"
    else:
        text = f"{type(error).__name__}: {error} (an unexpected error: --debug shows the traceback)"
    return " ".join(text.split())


def main(argv=None) -> int:
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as done:  # argparse: --help (0) or a usage error, already printed as one line (2)
        return done.code
    prefix = f"viditq {args.command}"
    debug = getattr(args, "debug", False)
    try:
        args.func(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prefix}: error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            traceback.print_exc()
        print(f"{prefix}: error: {describe(error)}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
