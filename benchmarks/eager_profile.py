"""Where one forward's time goes, per op category: bf16 eager, W8A8 eager and W8A8 + torch.compile.

The PixArt-alpha 512 transformer (`pixart_alpha.py`: random init, seed 0, bf16) is built once; a copy is quantized
W8A8 (`ViDiTQConfig("w8a8")`: attention, norms, GELU, the caption projection and the timestep embedding stay bf16,
as in `speed_cpu.py`'s "(bf16 activations)" row) and run eager and compiled (`torch.compile(fullgraph=True)` of
the same layers). One forward = batch 2, 256 image tokens, 120 T5 tokens.

Each forward runs under `torch.profiler` (CPU, record_shapes off) on 1 thread, so that other processes on a shared
machine distort less. An op's self CPU time goes to the category of its OUTERMOST categorized op (the `aten::addmm`
under `aten::linear` is a float linear, the `aten::copy_` under `viditq::linear` a quantized linear); time spent
outside every op (Python, module calls, the dispatcher before the first op) is "outside ops". Inductor's generated
kernels are named by its kernel profiling (`cpp.enable_kernel_profile`) and counted as "compiled fused kernels".
The variants run in interleaved rounds (each round: every variant once profiled, once not); per category the median
over the rounds is shown, the total is the sum of those medians, and "unprofiled" the median wall time without the
profiler.

    python -m benchmarks.eager_profile [--layers 28] [--repeats 5] [--no-compile] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import sys
import time
from collections import Counter, defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.pixart_alpha import build, inputs
from benchmarks.speed_cpu import cpu_info
from viditq_diffusers import ViDiTQConfig, quantize
from viditq_diffusers.kernels import warmup

QUANTIZED, FLOAT_LINEAR, ATTENTION, NORM = "quantized linears", "float linears + patch conv", "attention", "norms"
ELEMENTWISE, COPIES, FUSED, OTHER = "elementwise", "copies / casts / reshapes", "compiled fused kernels", "other ops"
OUTSIDE = "outside ops (Python)"
CATEGORIES = (QUANTIZED, FLOAT_LINEAR, ATTENTION, NORM, ELEMENTWISE, COPIES, FUSED, OTHER, OUTSIDE)

# aten names (without the "aten::" prefix) per category; an op in none of them is "other ops"
NAMES = {
    FLOAT_LINEAR: {"linear", "addmm", "mm", "bmm", "baddbmm", "matmul", "_linear_pointwise", "conv2d", "convolution",
                   "_convolution", "mkldnn_convolution", "_mkl_linear", "mkldnn_linear"},
    NORM: {"layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "rms_norm", "_fused_rms_norm"},
    ELEMENTWISE: {"mul", "mul_", "add", "add_", "sub", "div", "gelu", "silu", "sin", "cos", "exp", "pow", "neg",
                  "rsqrt", "sqrt", "tanh", "sigmoid", "where", "addcmul", "clamp", "reciprocal", "softmax", "_softmax",
                  "mean", "sum", "abs", "round", "maximum", "minimum", "fill_", "zero_"},
    COPIES: {"to", "_to_copy", "copy_", "contiguous", "clone", "cat", "stack", "permute", "transpose", "t", "view",
             "_unsafe_view", "reshape", "flatten", "unflatten", "expand", "unsqueeze", "squeeze", "chunk", "split",
             "narrow", "slice", "select", "as_strided", "index_select", "repeat", "alias", "detach", "_reshape_alias",
             "unbind", "split_with_sizes"},
}


def category(name: str) -> str | None:
    """The category of one profiled op, or None for an event that only wraps others (record_function regions,
    the compiled graph's call) and is "other ops" only where nothing outer is categorized."""
    if name.startswith("viditq::"):
        return QUANTIZED
    if "scaled_dot_product" in name or "flash_attention" in name:
        return ATTENTION
    if "cpp_fused" in name or name.startswith("triton_"):  # inductor's kernels, e.g. graph_0_cpp_fused_gelu_view_6
        return FUSED
    if name.startswith("aten::"):
        short = name.removeprefix("aten::")
        for what, names in NAMES.items():
            if short in names:
                return what
        return OTHER
    return None


def categorized(events) -> tuple[dict[str, float], dict[str, int], Counter]:
    """Seconds of self CPU time and top-level op calls per category, and seconds per op name."""
    seconds, calls, per_op = defaultdict(float), Counter(), Counter()
    for event in events:
        outer, parent = category(event.name), event.cpu_parent
        top = outer is not None
        while parent is not None:
            found = category(parent.name)
            if found is not None:
                outer, top = found, False
            parent = parent.cpu_parent
        what = outer or OTHER
        seconds[what] += event.self_cpu_time_total / 1e6
        per_op[(what, event.name)] += event.self_cpu_time_total / 1e6
        if top:
            calls[what] += 1
    return seconds, calls, per_op


def profile_once(model, kwargs: dict) -> dict:
    """One profiled forward (seconds and top-level op calls per category, "outside ops" included, seconds per op,
    wall time) and one unprofiled forward (wall time, minor page faults)."""
    with torch.inference_mode():
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            start = time.perf_counter()
            model(**kwargs)
            wall = time.perf_counter() - start
        seconds, calls, per_op = categorized(prof.events())
        seconds[OUTSIDE] = max(0.0, wall - sum(seconds.values()))
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        model(**kwargs)
        plain = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return dict(seconds=seconds, calls=calls, ops=per_op, wall=wall, unprofiled=plain, page_faults=faults)


def median_of(runs: list[dict]) -> dict:
    """Per category and per op the median over the runs; the median wall times and page faults."""
    ops = set().union(*(run["ops"] for run in runs))
    return dict(seconds={what: statistics.median(run["seconds"].get(what, 0.0) for run in runs) for what in CATEGORIES},
                ops=Counter({key: statistics.median(run["ops"].get(key, 0.0) for run in runs) for key in ops}),
                calls=runs[0]["calls"], **{key: statistics.median(run[key] for run in runs)
                                           for key in ("wall", "unprofiled", "page_faults")})


def profile_interleaved(variants: dict, kwargs: dict, repeats: int) -> dict[str, dict]:
    """`median_of` per variant; each round runs every variant once, so a slow phase of a shared machine slows every
    variant alike."""
    runs = {label: [] for label in variants}
    for _ in range(repeats):
        for label, model in variants.items():
            runs[label].append(profile_once(model, kwargs))
    return {label: median_of(done) for label, done in runs.items()}


def print_table(results: dict[str, dict]) -> None:
    """Per category and variant: median ms (share of the sum of the medians) and top-level op calls."""
    labels = list(results)
    print("\n| category | " + " | ".join(f"{label} ms (share) [calls]" for label in labels) + " |")
    print("|---|" + "---:|" * len(labels))
    totals = {label: sum(result["seconds"].values()) for label, result in results.items()}
    for what in CATEGORIES:
        cells = []
        for label, result in results.items():
            s, n = result["seconds"][what], result["calls"].get(what, 0)
            cells.append(f"{s * 1e3:.1f} ({100 * s / totals[label]:.1f}%)" + (f" [{n}]" if what != OUTSIDE else ""))
        print(f"| {what} | " + " | ".join(cells) + " |")
    print("| total (sum of the medians) | " + " | ".join(f"{totals[label] * 1e3:.1f} (100%)" for label in labels)
          + " |")
    print("| profiled wall, median | " + " | ".join(f"{r['wall'] * 1e3:.1f}" for r in results.values()) + " |")
    print("| unprofiled wall, median | " + " | ".join(f"{r['unprofiled'] * 1e3:.1f}" for r in results.values())
          + " |")
    print("| minor page faults per unprofiled forward | " + " | ".join(f"{r['page_faults']:,.0f}"
                                                                    for r in results.values()) + " |")


def print_difference(eager: dict, compiled: dict) -> None:
    """What compile saves per category: W8A8 eager minus W8A8 compiled, in ms and as a share of the eager total."""
    total = sum(eager["seconds"].values())
    print("\nW8A8: eager minus compiled per category (positive: compile saves it)")
    print("| category | eager ms | compiled ms | saved ms | saved, % of eager total |")
    print("|---|---:|---:|---:|---:|")
    for what in (*CATEGORIES, None):
        e = eager["seconds"][what] if what else total
        c = compiled["seconds"][what] if what else sum(compiled["seconds"].values())
        print(f"| {what or 'total'} | {e * 1e3:.1f} | {c * 1e3:.1f} | {(e - c) * 1e3:.1f} | "
              f"{100 * (e - c) / total:.1f}% |")


def print_heaviest(label: str, result: dict, count: int) -> None:
    total = sum(result["seconds"].values())
    print(f"\n{label}: the {count} heaviest ops (self CPU time per forward, median over the repeats)")
    for (what, name), s in result["ops"].most_common(count):
        print(f"  {s * 1e3:8.1f} ms  {100 * s / total:5.1f}%  {name}  [{what}]")


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28, help="transformer blocks (28 = PixArt-alpha)")
    parser.add_argument("--repeats", type=int, default=5, help="profiled forwards per variant (and as many unprofiled)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: less distorted by other processes)")
    parser.add_argument("--no-compile", action="store_true", help="skip W8A8 + torch.compile")
    parser.add_argument("--top", type=int, default=15, help="heaviest ops listed per variant")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        warmup()  # the C++ kernels, built or loaded before anything is timed
        print(cpu_info())
        print(f"load average at start: {os.getloadavg()[0]:.1f}")
        print(f"PixArt-alpha 512 transformer, {args.layers} blocks, bf16; batch 2, 256 image tokens, 120 text tokens; "
              f"{args.threads} thread(s), 1 warm-up, median of {args.repeats} interleaved rounds", flush=True)

        model, kwargs = build(torch.bfloat16, args.layers), inputs(torch.bfloat16)
        variants = {"bf16 eager": model, "W8A8 eager": quantize(copy.deepcopy(model), ViDiTQConfig("w8a8"))}
        if not args.no_compile:
            import torch._inductor.config as inductor_config
            inductor_config.cpp.enable_kernel_profile = True  # the generated kernels show up by name
            variants["W8A8 compiled"] = torch.compile(variants["W8A8 eager"], fullgraph=True)  # the same layers
        for label, variant in list(variants.items()):
            start = time.perf_counter()
            try:
                with torch.inference_mode():
                    variant(**kwargs)  # warm-up: weight layouts packed, the graph compiled
            except Exception as err:  # a compiler that fails here is reported, not fatal
                print(f"  {label}: failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
                del variants[label]
                continue
            print(f"  {label}: warmed up in {time.perf_counter() - start:.0f} s", flush=True)
        print(f"profiling {len(variants)} variants in {args.repeats} interleaved rounds", flush=True)
        results = profile_interleaved(variants, kwargs, args.repeats)
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")

        print_table(results)
        bf16 = results["bf16 eager"]["unprofiled"]
        print("\nspeed-up vs bf16 eager (unprofiled medians, this thread count): " + ", ".join(
            f"{label} {bf16 / r['unprofiled']:.2f}x" for label, r in results.items()))
        if "W8A8 compiled" in results:
            print_difference(results["W8A8 eager"], results["W8A8 compiled"])
        for label, result in results.items():
            print_heaviest(label, result, args.top)
    finally:
        torch.set_num_threads(threads)  # a caller (the test) keeps its own
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
