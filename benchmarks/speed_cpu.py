"""CPU forward latency of the PixArt-alpha 512 transformer: fp32, bf16, our W8A8 / W4A8, and the peers.

One forward = batch 2 (CFG), latent 32x32 (256 image tokens), 120 T5 tokens (4096 channels), timestep [2].
Each variant lives in a worker process of its own (`variant_worker.py`): it is built there (random init, seed 0),
quantized from fp32 where it is quantized, and run once (it compiles, for compiled variants, and packs weights),
then it waits; the builds run one at a time. The parent times the variants in N interleaved rounds: each round asks
every variant for one forward, one after the other (timed in the worker, under `torch.inference_mode()`, with torch
threads = the cores this process may use), and the median per variant is reported: a slower phase of a shared
machine slows every variant alike. Every variant held at once would not fit a 24 GB machine (a worker holds its
model plus about 0.5 GB of torch and diffusers), so the fp32 and bf16 baselines stay for the whole run and the
other variants come in groups, as many as fit in `--max-rss-gib` (and in the memory available), each group timed
with the baselines and then ended: a variant's speed-ups are against the baselines' medians in its own group's
rounds. Every row also shows the weight bytes as stored and the PSNR of its output against the fp32 output (data
range = the fp32 output's). A worker that fails, to build or later, is a row that says why.

The W4A8-MP rows: the `w4a8_mp` preset (the paper's heuristic: W8 FFNs and first / last blocks), and the searched
plans that ship with the image pipeline, mapped onto this model by role and block depth (`plan_mapping.py`).
Their smoothed layers, and the calibrated default's recipe search (smoothing / rotation per layer, the default
with statistics), take statistics from `viditq_diffusers.calibrate` on the benchmark inputs at four timesteps,
as a user calibrates before quantizing (once a run: the first worker that needs them saves them for the others).
The search costs 10-20 s per layer on 2 cores (about an hour at 28
blocks): `--recipes FILE` saves its decided plan once and reuses it. At 28 blocks the default is the plan it
decided on 2026-12-07 (`recipes/pixart_alpha_calibrated_default.plan.json`, 5 of 280 layers rotated); pass
`--recipes NEW.json` to search again. After the table, each quantized variant's
layers are counted per kernel route (`kernels/routes.py`) and channel-balancing path: where its time goes.
The peak RSS printed last is that of the whole benchmark: this process and its workers, summed (sampled every
0.1 s, and each build's own peak added to what the others held then).

Peers (`pip install -e ".[bench]"`, never imported by the package): see `peers.py`. A peer that is not
installed or fails is listed with the reason instead of a time. Compiled variants compile with one inductor
process (`TORCHINDUCTOR_COMPILE_THREADS=1`): a pool of compile processes would stay resident beside each.

A GEMM table follows at the DiT shapes (M = 512 tokens; K, N in 1152 / 4608): the float matmuls, the integer
kernels with their operands already quantized, and the whole quantized linear (activation quantization,
GEMM, epilogue) as the dispatch runs it, per channel and group-wise (W4A8 with groups of 32, 64 and 128, and the
group-wise kernel called directly). The CPU's int8-relevant flags are printed first: they decide which
integer kernels are fast, and exact, here (`viditq_diffusers/kernels/onednn.py`).

    python -m benchmarks.speed_cpu [--layers 28] [--repeats 5] [--no-peers] [--skip g64 compile] [--only W4A8]
        [--recipes recipes/pixart_alpha_calibrated_default.plan.json] [--max-rss-gib 14]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import itertools
import os
import statistics
import tempfile
import time
from collections import Counter

import torch
import torch.nn.functional as F

from safetensors.torch import load_file

from benchmarks.pixart_alpha import build, inputs
from benchmarks.plan_mapping import shipped_plan_mapped
from benchmarks.tree_rss import PeakTreeRss
from benchmarks.variant_worker import VariantWorker, WorkerFailed
from viditq_diffusers import ViDiTQConfig, ViDiTQLinear, calibrate, quantize
from viditq_diffusers.calibration import CalibrationStats
from viditq_diffusers.footprint import weight_bytes
from viditq_diffusers.jsonio import write_json
from viditq_diffusers.kernels import (LayerCall, cpu_amx, cpu_int16, cpu_vnni, int_mm, onednn, quantized_linear,
                                      select_route, warmup)
from viditq_diffusers.kernels.routes import balance_name
from viditq_diffusers.layer_spec import LayerSpec
from viditq_diffusers.mixed_precision.cost import cpu_description
from viditq_diffusers.metrics import psnr
from viditq_diffusers.plan import plan_to_json

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
SHIPPED_RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes",
                               "pixart_alpha_calibrated_default.plan.json")  # the 28-block search's decisions
GEMM_SHAPES = ((512, 1152, 1152), (512, 1152, 4608), (512, 4608, 1152))
GROUP_SIZES = (32, 64, 128)
BASELINES = ("fp32 eager", "bf16 eager")  # in every group's rounds: the speed-ups are against them
CALIBRATION_TIMESTEPS = (875, 625, 375, 125)  # one per timestep bucket of `calibrate` (4 over [0, 1000))


def cpu_info() -> str:
    model, flags = cpu_description()  # FLAGS are among the route-picking flags it reports
    marks = " ".join(f"{f}{'+' if f in flags else '-'}" for f in FLAGS)
    return (f"CPU: {model}, {torch.get_num_threads()} threads; flags: {marks}\n"
            f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
            f"oneDNN int8 exact for W4: {onednn.exact_for(4)}, for W8 direct: {onednn.exact_for(8)}, "
            f"for W8 split in 4-bit halves: {onednn.exact_split()}")


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(config: ViDiTQConfig, compiled: bool = False):
    def make(model, _kwargs):
        model = quantize(model, config)
        return (torch.compile(model, fullgraph=True) if compiled else model), torch.inference_mode, weight_bytes
    return make


_calibrations: dict[tuple, CalibrationStats] = {}  # the same model and inputs give the same statistics
calibration_dir: str | None = None  # set by a worker: the statistics are shared through files there


def benchmark_calibration(model, kwargs) -> CalibrationStats:
    """`calibrate` on the benchmark inputs at `CALIBRATION_TIMESTEPS` (batch 2 = the [uncond, cond] halves);
    every variant builds the same model (seed 0), so the statistics are computed once per size and dtype, and
    with `calibration_dir` once per run: the workers that need them read the file the first one saved."""
    key = (len(model.transformer_blocks), model.config.num_attention_heads * model.config.attention_head_dim,
           kwargs["hidden_states"].dtype)
    path = calibration_dir and os.path.join(calibration_dir, "calibration-{}-{}-{}.safetensors".format(*key))
    if key not in _calibrations and path and os.path.isfile(path):
        _calibrations[key] = CalibrationStats.load(path)
    if key not in _calibrations:
        def run(_prompt, _generator):
            for t in CALIBRATION_TIMESTEPS:
                model(**{**kwargs, "timestep": torch.full_like(kwargs["timestep"], t)})
        _calibrations[key] = calibrate(model, ["speed_cpu benchmark inputs"], run=run)
        if path:
            _calibrations[key].save(path)
    return _calibrations[key]


def mapped_plan(bits: int):
    """The shipped searched `bits`-bit W4A8-MP plan mapped onto the model, its smoothing from the model's statistics
    (the alphas are decided: the sampled rows are not needed)."""
    def make(model, kwargs):
        stats = benchmark_calibration(model, kwargs).without_samples()
        config = ViDiTQConfig(preset="w4a8", plan=shipped_plan_mapped(bits, model), calibration=stats)
        return quantize(model, config), torch.inference_mode, weight_bytes
    return make


def calibrated_default(recipes: str | None):
    """`ViDiTQConfig(calibration=stats)`: W8A8 with the per-layer recipe search (smoothing / rotation). With
    `recipes`, the decided plan is read from that file when it is there (and fits), else searched and saved
    there."""
    def make(model, kwargs):
        stats = benchmark_calibration(model, kwargs)
        if recipes and os.path.isfile(recipes):
            print(f"  calibrated default: decided recipes from {recipes}", flush=True)
            config = ViDiTQConfig(plan=recipes, calibration=stats.without_samples())
        else:
            config = ViDiTQConfig(calibration=stats)
        model = quantize(model, config)
        if recipes and not os.path.isfile(recipes):
            write_json(recipes, plan_to_json(model.hf_quantizer.quantization_config.plan))
        return model, torch.inference_mode, weight_bytes
    return make


def peer(make_peer, count_bytes):
    return lambda model, kwargs: (make_peer(model, kwargs), torch.inference_mode, count_bytes)


def float_variant(model, _kwargs):
    return model, torch.inference_mode, weight_bytes


def variants(with_peers: bool, recipes: str | None = None) -> dict:
    """label -> (model dtype, make(model, forward kwargs) -> (model, grad context, weight-bytes function));
    `recipes`: the calibrated default's decided-plan file (`calibrated_default`)."""
    table = {
        "fp32 eager": (torch.float32, float_variant),
        "bf16 eager": (torch.bfloat16, float_variant),
        "ViDiT-Q W8A8": (torch.float32, ours(ViDiTQConfig(preset="w8a8"))),
        "ViDiT-Q W4A8": (torch.float32, ours(ViDiTQConfig(preset="w4a8"))),
        "ViDiT-Q W4A8 g64": (torch.float32, ours(ViDiTQConfig(preset="w4a8", group_size=64))),
        # the same quantized layers in a bf16 model: attention, norms and GELU run in bf16, as in bf16 eager
        "ViDiT-Q W8A8 (bf16 activations)": (torch.bfloat16, ours(ViDiTQConfig(preset="w8a8"))),
        "ViDiT-Q W4A8 (bf16 activations)": (torch.bfloat16, ours(ViDiTQConfig(preset="w4a8"))),
        # every layer Hadamard-rotated (balance="rotate"), as calibrated plans rotate many layers
        "ViDiT-Q W8A8 rotated (preset rotate_w8a8)": (torch.float32, ours(ViDiTQConfig(preset="rotate_w8a8"))),
        "ViDiT-Q W8A8 rotated (bf16 activations)": (torch.bfloat16, ours(ViDiTQConfig(preset="rotate_w8a8"))),
        # the mixed-precision mode: the heuristic preset and the shipped searched plans; the calibrated default
        "ViDiT-Q W4A8-MP (w4a8_mp heuristic preset)": (torch.float32, ours(ViDiTQConfig(preset="w4a8_mp"))),
        "ViDiT-Q W4A8-MP shipped 5-bit plan (mapped)": (torch.float32, mapped_plan(5)),
        "ViDiT-Q W4A8-MP shipped 6-bit plan (mapped)": (torch.float32, mapped_plan(6)),
        "ViDiT-Q W8A8 calibrated default (recipe search)": (torch.float32, calibrated_default(recipes)),
        "ViDiT-Q W8A8 (torch.compile)": (torch.float32, ours(ViDiTQConfig(preset="w8a8"), compiled=True)),
        "ViDiT-Q W4A8 (torch.compile)": (torch.float32, ours(ViDiTQConfig(preset="w4a8"), compiled=True)),
    }
    if with_peers:  # a peer that is not installed fails when it is built, and its row says so
        from benchmarks import peers

        table.update({label: (torch.float32, peer(make, peers.weight_bytes)) for label, make in peers.PEERS.items()})
    return table


def route_counts(model, dtype) -> str:
    """How many quantized layers take each kernel route (and each channel-balancing path) for a `dtype` CPU input,
    e.g. "142 W4A8 -> onednn_direct, 74 W4A8-g64 -> cpu_group; balancing: 204 torch, 47 cpu_balance"; "" for a
    model without quantized layers."""
    routes, balancing = Counter(), Counter()
    for layer in model.modules():
        if isinstance(layer, ViDiTQLinear):
            call = LayerCall.of_spec(layer.spec)
            x = torch.empty(2, call.in_features, dtype=dtype)
            route = select_route(call, x)
            routes[f"{call.label} -> {route.name}"] += 1
            balancing[balance_name(call, x, route)] += 1
    if not routes:
        return ""
    balancing.pop("none", None)
    shown = ", ".join(f"{n} {what}" for what, n in routes.most_common())
    return shown + "; balancing: " + (", ".join(f"{n} {how}" for how, n in balancing.most_common()) or "none")


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's malloc_trim), so the float weights and
    temporaries of one variant's quantization do not stay resident while every variant is held for timing."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


def prepare_variant(dtype, make, layers: int) -> dict:
    """A variant built, warmed up (compiled, weights packed) and kept for timing, with its output, weight bytes and
    route counts."""
    model, kwargs = build(dtype, layers), inputs(dtype)
    model, grad_context, count_bytes = make(model, kwargs)
    with grad_context():
        out = model(**kwargs)[0].float()
    release_freed_memory()
    return dict(model=model, kwargs=kwargs, grad_context=grad_context, nbytes=count_bytes(model), out=out,
                routes=route_counts(model, dtype))


def time_interleaved(workers: dict[str, VariantWorker], rounds: int, rows: dict) -> dict[str, list[float]]:
    """Seconds per forward; each round runs every variant once, one at a time, so a slow phase of a shared machine
    slows every variant alike instead of the ones that happened to run then. A worker that dies gets its reason in
    `rows` and leaves the rounds."""
    times = {label: [] for label in workers}
    for _ in range(rounds):
        for label, worker in workers.items():
            if label in rows:
                continue
            try:
                times[label].append(worker.run())
            except WorkerFailed as err:
                rows[label] = f"while timed: {err}"
                print(f"  {label}: failed: {rows[label]}", flush=True)
    return {label: seconds for label, seconds in times.items() if label not in rows}


def run_variants(labels: list[str], layers: int, rounds: int, recipes: str | None, peak: PeakTreeRss, threads: int,
                 max_rss: float) -> tuple[dict, dict]:
    """Each variant built in a worker process of its own, one build at a time, and timed in interleaved rounds.

    The two baselines stay for the whole run; the other variants come in groups, as many as fit in `max_rss` bytes
    (all processes' RSS now plus the largest build peak so far, for the next build), each group timed in `rounds`
    rounds with the baselines and then ended. A variant's speed-ups are against the baselines' medians in its own
    group's rounds. Returns `{label: (median s, vs fp32, vs bf16, weight bytes, PSNR vs fp32) or the reason it
    failed}` and `{label: route counts}`. `peak` also gets the RSS before each build plus that build's own peak
    (VmHWM), which sampling could miss."""
    rows, built, outputs, alive = {}, {}, {}, {}
    times, numbers = {label: [] for label in BASELINES}, itertools.count()
    with tempfile.TemporaryDirectory(prefix="speed_cpu-") as workdir:

        def start(label: str) -> VariantWorker | None:
            before = peak.sample()
            worker = VariantWorker(label, layers, recipes, threads, workdir, next(numbers))
            try:
                built[label] = worker.built()
            except WorkerFailed as err:
                worker.close()
                rows[label] = str(err)
                print(f"  {label}: failed: {rows[label]}", flush=True)
                return None
            peak.include(before + built[label]["peak_rss"])
            outputs[label] = worker.output
            print(f"  {label}: built and warmed up (its RSS {built[label]['rss'] / 2**30:.1f} GiB, at most "
                  f"{built[label]['peak_rss'] / 2**30:.1f}; all processes {peak.sample() / 2**30:.1f} GiB)",
                  flush=True)
            return worker

        try:
            for label in BASELINES:
                worker = start(label)
                if worker is None:
                    raise SystemExit(f"speed_cpu: the {label} baseline failed ({rows[label]}): no speed-ups")
                alive[label] = worker
            baselines = dict(alive)  # the groups' workers come and go in `alive`, so that they are ended on errors
            pending, group_number = [label for label in labels if label not in BASELINES], 0
            while pending or group_number == 0:
                group_number += 1
                group = {}
                while pending and (not group or fits(max(b["peak_rss"] for b in built.values()), max_rss, peak)):
                    label = pending.pop(0)
                    worker = start(label)
                    if worker is not None:
                        alive[label] = group[label] = worker
                if not group and group_number > 1:
                    break  # the last ones failed to build: nothing left to time
                print(f"group {group_number}: timing {len(group)} variants and the 2 baselines in {rounds} "
                      f"interleaved rounds (load average {os.getloadavg()[0]:.1f})", flush=True)
                group_times = time_interleaved({**baselines, **group}, rounds, rows)
                for label in BASELINES:
                    if label not in group_times:
                        raise SystemExit(f"speed_cpu: the {label} baseline failed ({rows[label]}): no speed-ups")
                    times[label] += group_times[label]
                base = {label: statistics.median(group_times[label]) for label in BASELINES}
                for label, seconds in group_times.items():
                    if label not in BASELINES:
                        median = statistics.median(seconds)
                        rows[label] = (median, base["fp32 eager"] / median, base["bf16 eager"] / median)
                for label in group:
                    alive.pop(label).close()
        finally:
            for worker in alive.values():
                worker.close()
        for label in BASELINES:
            median = statistics.median(times[label])
            rows[label] = (median, statistics.median(times["fp32 eager"]) / median,
                           statistics.median(times["bf16 eager"]) / median)
        reference = load_file(outputs["fp32 eager"])["out"]
        data_range = float(reference.max() - reference.min())
        for label in labels:
            if not isinstance(rows[label], str):
                out = load_file(outputs[label])["out"]
                quality = float("inf") if label == "fp32 eager" else psnr(out, reference, data_range)
                rows[label] = (*rows[label], built[label]["nbytes"], quality)
    return ({label: rows[label] for label in labels},
            {label: built[label]["routes"] for label in labels if label in built and built[label]["routes"]})


def fits(build_peak: int, max_rss: float, peak: PeakTreeRss) -> bool:
    """Whether one more build (its peak as large as `build_peak`) fits in `max_rss` for all processes together, and
    in the memory this machine has available now (other programs may hold some: 1 GiB is left to them)."""
    return build_peak <= min(max_rss - peak.sample(), mem_available() - 2**30)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def print_variant_table(rows: dict, routes: dict) -> None:
    print("\n| variant | median s | speed-up vs fp32 | speed-up vs bf16 | weight MiB | PSNR vs fp32 dB |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, row in rows.items():
        if isinstance(row, str):
            print(f"| {label} | failed: {row} | | | | |")
            continue
        seconds, vs_fp32, vs_bf16, nbytes, quality = row
        print(f"| {label} | {seconds:.2f} | {vs_fp32:.2f}x | {vs_bf16:.2f}x | {nbytes / 2**20:,.0f} | {quality:.2f} |")
    print("\nQuantized layers per kernel route (format -> route) and per channel-balancing path:")
    for label, counts in routes.items():
        print(f"- {label}: {counts}")


def time_gemms(repeats: int) -> dict[tuple, dict[str, float]]:
    """Per shape: the kernels alone (operands ready) and the quantized linear as the dispatch runs it."""
    results = {}
    g = torch.Generator().manual_seed(0)
    for m, k, n in GEMM_SHAPES:
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k**0.5
        x8, w8 = (t.mul(127 / t.abs().max()).round().to(torch.int8) for t in (x, w))
        xb, wb = x.bfloat16(), w.bfloat16()
        row = {"fp32 F.linear": median_time(lambda: F.linear(x, w), repeats),
               "bf16 F.linear": median_time(lambda: F.linear(xb, wb), repeats),
               "int8 torch._int_mm": median_time(lambda: torch._int_mm(x8, w8.t()), repeats)}
        for bits in (8, 4):
            linear = torch.nn.Linear(k, n, bias=False)
            layer = ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, bits, 8, symmetric=True))
            codes = layer.codes()
            row[f"int8 x int{bits} our int_mm (exact fp32 BLAS)"] = median_time(lambda: int_mm(x8, codes), repeats)
            if onednn.available():
                if bits == 8:  # the direct route, exact only with VNNI / AMX
                    direct, zeros = torch.ops.onednn.qlinear_prepack(codes, None), torch.zeros(n, dtype=torch.int64)
                    tag = "" if onednn.exact_for(8) else " [saturates here: not used]"
                    row[f"int8 x int8 oneDNN direct{tag}"] = median_time(
                        lambda: onednn.gemm(x8, direct, torch.ones(n), zeros), repeats)
                split = bits == 8 and not onednn.exact_for(8)  # as routed (onednn_split: 2N rows, both halves)
                if bits == 4 or split:
                    packed, zeros = onednn.packed_weight(layer.qweight, bits, k, None, split)
                    label = ("int8 x int4 oneDNN" if bits == 4
                             else "int8 x int8 oneDNN split (two 4-bit halves, one GEMM)")
                    row[label] = median_time(lambda: onednn.gemm(x8, packed, torch.ones(len(zeros)), zeros), repeats)
            if cpu_amx.available():
                xq, x_scale, rowsum = cpu_amx.extension().quantize_s8(x)
                tiles = cpu_amx.packed_weight(layer.qweight, bits, k)
                row[f"int8 x int{bits} our AMX GEMM, epilogue fused"] = median_time(
                    lambda: cpu_amx.extension().gemm(xq, x_scale, rowsum, tiles, n, None, layer.scales(), None, False),
                    repeats)
            if cpu_vnni.available():  # one call: its quantization and epilogue cannot be timed apart
                row[f"int8 x int{bits} our VNNI GEMM, quantization and epilogue fused"] = median_time(
                    lambda: cpu_vnni.linear_vnni(x, layer.qweight, bits, layer.scales(), None, None), repeats)
            linear = torch.nn.Linear(k, n, bias=False)
            default = ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, bits, 8))  # asymmetric weights
            for label, activation in (("", x), (", bf16 input", xb)):
                row[f"ViDiT-Q W{bits}A8 linear, as dispatched{label}"] = median_time(
                    lambda: quantized_linear(activation, default.qweight, bits, default.scales(), default.weight_zero,
                                             None, 8), repeats)
        row.update(time_grouped(x, k, n, repeats))
        results[(m, k, n)] = row
    return results


def time_grouped(x: torch.Tensor, k: int, n: int, repeats: int) -> dict[str, float]:
    """W4A8 with group-wise weight scales (asymmetric, as the plans use them) at `GROUP_SIZES`: the linear as
    dispatched, and the group-wise kernel called directly where it is built (it quantizes the activations too)."""
    row = {}
    linear = torch.nn.Linear(k, n, bias=False)
    for size in GROUP_SIZES:
        layer = ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, 4, 8, size))
        args = (layer.qweight, 4, layer.scales(), layer.weight_zero, None)
        row[f"ViDiT-Q W4A8-g{size} linear, as dispatched"] = median_time(
            lambda: quantized_linear(x, *args, 8), repeats)
        if cpu_int16.available():
            row[f"W4A8-g{size} our group-wise kernel (cpu_int16.linear_grouped)"] = median_time(
                lambda: cpu_int16.linear_grouped(x, *args), repeats)
    return row


def skipped(label: str, skip: list[str]) -> bool:
    """`--skip`: a variant whose label contains one of the words is left out; the two float baselines never are."""
    return any(word in label for word in skip) and label not in ("fp32 eager", "bf16 eager")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28, help="transformer blocks (28 = PixArt-alpha)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per variant (interleaved rounds)")
    parser.add_argument("--gemm-repeats", type=int, default=10)
    parser.add_argument("--no-peers", action="store_true", help="skip the peer libraries")
    parser.add_argument("--skip", nargs="*", default=[], help="skip variants whose label contains any of these")
    parser.add_argument("--only", nargs="*", default=[], help="only the variants whose label contains one of these "
                                                              "(and the fp32 and bf16 baselines)")
    parser.add_argument("--max-rss-gib", type=float, default=14.0,
                        help="how much all the variant workers may hold at a time (the groups' size)")
    parser.add_argument("--gemm-only", action="store_true", help="only the GEMM table (a few minutes)")
    parser.add_argument("--recipes", help="the calibrated default's decided plan: read if the file exists, else "
                                          "searched (slow) and written there; at 28 blocks the shipped one")
    args = parser.parse_args(argv)
    if args.recipes is None and args.layers == 28:
        args.recipes = SHIPPED_RECIPES
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    warmup()  # the C++ kernels, built or loaded before anything is timed
    print(cpu_info())
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    if args.gemm_only:
        print_gemm_table(args.gemm_repeats)
        return
    print(f"PixArt-alpha 512 transformer, {args.layers} blocks; batch 2, 256 image tokens, 120 text tokens; "
          f"1 warm-up, median of {args.repeats} interleaved forwards", flush=True)

    labels = [label for label in variants(not args.no_peers, args.recipes) if not skipped(label, args.skip)]
    labels = [label for label in labels if not args.only or label in ("fp32 eager", "bf16 eager")
              or any(word in label for word in args.only)]
    with PeakTreeRss() as peak:
        rows, routes = run_variants(labels, args.layers, args.repeats, args.recipes, peak, torch.get_num_threads(),
                                    args.max_rss_gib * 2**30)
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        print_variant_table(rows, routes)
        print_gemm_table(args.gemm_repeats)
    print(peak_line(peak.bytes))


def peak_line(nbytes: int) -> str:
    return (f"\npeak RSS: {nbytes / 2**30:.1f} GiB (this process and its variant workers together, "
            f"summed over processes)")


def print_gemm_table(repeats: int) -> None:
    print("\nGEMM at DiT shapes, median ms (speed-up vs fp32 F.linear); 'as dispatched' includes the per-token "
          "activation quantization and the epilogue")
    with torch.inference_mode():
        gemms = time_gemms(repeats)
    shapes = list(gemms)
    print("| kernel | " + " | ".join(f"{m}x{k}x{n}" for m, k, n in shapes) + " |")
    print("|---|" + "---:|" * len(shapes))
    for name in gemms[shapes[0]]:
        cells = [f"{gemms[s][name] * 1e3:.1f} ({gemms[s]['fp32 F.linear'] / gemms[s][name]:.2f}x)" for s in shapes]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
