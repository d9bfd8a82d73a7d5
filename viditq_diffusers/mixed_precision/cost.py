"""The cost model: how long each precision option takes for each layer, measured on the machine at hand.

A layer's time at an option is measured, not predicted: a `ViDiTQLinear` is built for the option's decided plan
entry (bits, group size, symmetry, smoothing, rotation: the things that pick a kernel route and its work) at the
layer's shape, `K` input features, `N` outputs, fed `M` tokens (rows) in the model's dtype, and its forward (the
same route dispatch the model runs) is timed: the median of `repeats` timings after `warmup` calls, each of
enough calls to take 10 ms (`layer_timer`), every layer needed timed once per round (`CostTable.measure`). The
weights are random; the kernels' time does not depend on their values.

A time depends only on the format, the shape and the machine, so the measurements live in a `CostTable` keyed by
(format label, K, N, M, dtype): identical shapes are measured once, and a table saved as JSON (`save`, atomically)
can be passed back in to skip measuring. `search` keeps it beside the plan as `PLAN.costs.json`.

A table records the machine it was measured on (`machine()`). A table from another kind of machine is refused:
another CPU (model or the instruction sets the kernels dispatch on: AVX2, AVX-512 VNNI, AMX...), another device
or another kernel mode (`VIDITQ_KERNELS`) runs other kernel routes, so its times rank the options differently,
and a plan fitted to them would be fitted to that machine, silently. Another torch version or thread count on
the same kind of machine only gives a warning, and the table's times are measured again (not mixed with new
ones): the same routes run, but the absolute times move.

The time of a plan is the sum of its layers' times (the layers run one after another); the latency budget is a
multiple of the same sum with every layer at W8A8 (`W8A8_OPTION`). Only the quantized layers are timed:
attention itself, norms and the layers kept in floating point cost the same in every plan.

Shapes: by default each layer's own `(K, N)` and the tokens it sees in one denoiser forward of the search's
pipeline call (`layer_tokens`), or one token count for all (`tokens`). A shape map `{layer: (K, N, M)}` (or a list
of such triples, summed) costs a plan searched on a small model at the shapes of a big one it will be mapped to.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from ..checks import integer, shown
from ..config import ViDiTQConfig
from ..evaluation import generate
from ..jsonio import read_json, write_json
from ..kernels.cpu_flags import cpu_model_and_flags, route_flags
from ..layer_spec import LayerSpec
from ..nn import ViDiTQLinear
from ..plan import build_plan
from ..recipe import decide_layer

FORMAT, VERSION = "viditq cost table", 1
W8A8_OPTION = {"preset": "w8a8"}  # the latency budget's unit: every quantized layer at W8A8
KIND_KEYS = ("arch", "cpu", "cpu_flags", "device", "kernels")  # another value: another machine kind, refused
SOFT_KEYS = ("torch", "threads")  # another value: same routes, other absolute times; warned, measured again


def cpu_description() -> tuple[str, list[str]]:
    """(CPU model name, the route-picking flags it has)."""
    return cpu_model_and_flags()[0], route_flags()


def machine(device: torch.device | str = "cpu") -> dict:
    """What a cost table's times depend on besides the layer: the CPU kind, the device, the kernel mode, torch
    and the thread count."""
    device = torch.device(device)
    cpu, flags = cpu_description()
    return {"arch": platform.machine(), "cpu": cpu, "cpu_flags": flags,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "kernels": os.environ.get("VIDITQ_KERNELS", "auto"), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def format_label(spec: LayerSpec) -> str:
    """What decides a layer's kernel and its work, e.g. "W4A8-g64 asym smooth+rotate bias"."""
    if not spec.decided:
        raise ValueError(f"a cost needs a decided plan entry (smooth_alpha={spec.smooth_alpha!r}); decide it first "
                         f"(recipe.decide_layer)")
    return f"{spec.label()} {'sym' if spec.symmetric else 'asym'} {spec.recipe_label()}" + (" bias" if spec.bias
                                                                                          else "")


def entry_key(label: str, k: int, n: int, m: int, dtype: torch.dtype) -> str:
    return f"{label} | K={k} N={n} M={m} | {str(dtype).removeprefix('torch.')}"


def at_shape(spec: LayerSpec, k: int, n: int) -> LayerSpec:
    """`spec` for a layer of `k` inputs and `n` outputs (a shape map's shape)."""
    if (k, n) == (spec.in_features, spec.out_features):
        return spec
    return replace(spec, in_features=k, out_features=n, json_keys=())


@torch.no_grad()
def layer_timer(spec: LayerSpec, tokens: int, dtype: torch.dtype = torch.float32, device="cpu", warmup: int = 2,
                min_seconds: float = 0.01) -> Callable[[], float]:
    """A function that times a `ViDiTQLinear` planned as `spec` on `tokens` rows (built and warmed up `warmup` calls
    here): seconds per forward, each timing as many calls as take `min_seconds` (at most 1000; a small layer's
    single call is too short for the clock and the scheduler)."""
    gen = torch.Generator().manual_seed(0)
    k, n = spec.in_features, spec.out_features
    linear = nn.Linear(k, n, bias=spec.bias, dtype=dtype)
    linear.weight.copy_(torch.randn(n, k, generator=gen) * k ** -0.5)
    smoothing = torch.rand(k, generator=gen) + 0.5 if spec.smoothed else None
    layer = ViDiTQLinear.from_linear(linear, spec, smoothing).to(device)
    x = torch.randn(tokens, k, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        layer(x)

    @torch.no_grad()
    def timed(calls: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            layer(x)
        sync()
        return (time.perf_counter() - start) / calls

    calls = min(1000, max(1, math.ceil(min_seconds / max(timed(1), 1e-9))))
    return lambda: timed(calls)


class CostTable:
    """Measured seconds per (format, K, N, M, dtype) on one machine; measures what it lacks (`seconds`)."""

    def __init__(self, device="cpu", repeats: int = 5, warmup: int = 2):
        self.device = torch.device(device)
        self.repeats = integer(repeats, "CostTable: repeats", minimum=1, fix="e.g. repeats=5")
        self.warmup = integer(warmup, "CostTable: warmup", minimum=0, fix="e.g. warmup=2")
        self.machine = machine(self.device)
        self.entries: dict[str, dict] = {}
        self.measured = 0  # entries measured by this object (not loaded)

    def seconds(self, spec: LayerSpec, k: int, n: int, m: int, dtype: torch.dtype) -> float:
        """Seconds of one forward of a layer planned as `spec` at shape (k, n) on m rows (measured if missing)."""
        self.measure([(spec, k, n, m, dtype)])
        return self.entries[entry_key(format_label(at_shape(spec, k, n)), k, n, m, dtype)]["seconds"]

    def measure(self, wanted: list[tuple[LayerSpec, int, int, int, torch.dtype]]) -> None:
        """Measure the entries of `wanted` ((spec, K, N, M, dtype) each) that the table lacks, interleaved: each of
        `repeats` rounds times every layer once and an entry keeps its median. A machine whose speed drifts while
        it measures (clock boost, another process) then shifts every entry alike; measured one after another,
        two tables of the same machine differed by up to 50% on some entries and ranked options differently."""
        todo = {}
        for spec, k, n, m, dtype in wanted:
            spec = at_shape(spec, k, n)
            key = entry_key(format_label(spec), k, n, m, dtype)
            if key not in self.entries:
                todo[key] = (spec, k, n, m, dtype)
        timers = {key: layer_timer(spec, m, dtype, self.device, self.warmup)
                  for key, (spec, k, n, m, dtype) in todo.items()}
        samples = {key: [] for key in todo}
        for _ in range(self.repeats):
            for key, timer in timers.items():
                samples[key].append(timer())
        for key, (spec, k, n, m, dtype) in todo.items():
            self.entries[key] = {"format": format_label(spec), "K": k, "N": n, "M": m,
                                 "dtype": str(dtype).removeprefix("torch."), "seconds": statistics.median(samples[key])}
            self.measured += 1

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "machine": self.machine, "repeats": self.repeats,
                "warmup": self.warmup, "entries": self.entries}

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> "CostTable":
        """The table saved at `path`, checked against this machine (module docstring): another machine kind is
        refused; another torch or thread count warns and starts empty (its times are measured again)."""
        data = read_json(path)
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION \
                or not isinstance(data.get("entries"), dict) or not isinstance(data.get("machine"), dict):
            raise ValueError(f"{path} is not a viditq cost table (format {FORMAT!r}, version {VERSION}); pass a file "
                             f"written by `viditq search` (PLAN.costs.json) or delete it to measure again")
        table = cls(device, data.get("repeats", 5), data.get("warmup", 2))
        here, there = table.machine, data["machine"]
        kind = {k: (there.get(k), here[k]) for k in KIND_KEYS if there.get(k) != here[k]}
        if kind:
            raise ValueError(f"cost table {path} was measured on another kind of machine ("
                             + "; ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in kind.items())
                             + "): its times rank the precision options for that machine's kernel routes. Measure "
                               "here instead: pass another path, or delete this file")
        soft = {k: (there.get(k), here[k]) for k in SOFT_KEYS if there.get(k) != here[k]}
        if soft:
            warnings.warn(f"cost table {path} was measured with " + ", ".join(f"{k} {a!r} (here {b!r})" for k, (a, b)
                                                                               in soft.items())
                          + "; measuring its entries again on this setup", stacklevel=2)
            return table
        for key, entry in data["entries"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("seconds"), (int, float)) \
                    or isinstance(entry.get("seconds"), bool) or not entry["seconds"] >= 0:
                raise ValueError(f"cost table {path}: entry {key!r} has no valid 'seconds' (got {shown(entry)}); "
                                 f"delete the file to measure again")
        table.entries = dict(data["entries"])
        return table


def decided_specs(model: nn.Module, options: dict[str, dict], layers: list[str],
                  calibration=None) -> dict[str, dict[str, LayerSpec]]:
    """`{option: {layer: decided plan entry}}`: what each option's preset plans for each layer, its balancing
    recipe decided from the layer's weight, as quantizing would decide it."""
    if isinstance(calibration, (str, os.PathLike)):
        from ..calibration import CalibrationStats

        calibration = CalibrationStats.load(calibration)
    specs, decided = {}, {}
    for label, option in options.items():
        same = json.dumps(option, sort_keys=True, default=repr)  # an option listed twice is decided once
        if same not in decided:
            config = ViDiTQConfig(**option, calibration=calibration)
            plan = build_plan(model, config)
            decided[same] = {name: decide_layer(name, model.get_submodule(name).weight.detach(),
                                                plan["layers"][name], config)[0] for name in layers}
        specs[label] = decided[same]
    return specs


class _OneForward(Exception):
    """Raised by `layer_tokens`' hook: one denoiser forward has shown every layer its input."""


@torch.no_grad()
def layer_tokens(pipe, layers: list[str], prompts: list[str], seeds: list[int], **call) -> dict[str, int]:
    """The rows (tokens x batch) each layer's input has in one forward of the denoiser, in this pipeline call
    (the generation stops after that forward). Layers the forward does not reach are left out."""
    seen: dict[str, int] = {}
    model = pipe.transformer

    def record(name):
        def hook(module, args):  # returns None: the input goes on unchanged
            seen.setdefault(name, args[0].numel() // args[0].shape[-1])
        return hook

    hooks = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in layers]

    def stop(module, args, output):
        raise _OneForward

    hooks.append(model.register_forward_hook(stop))
    try:
        generate(pipe, prompts, seeds, **call)
    except _OneForward:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def check_shapes(shapes, layers: list[str]) -> dict[str, list[tuple[int, int, int]]]:
    """A shape map `{layer: (K, N, M) or [(K, N, M), ...]}` covering exactly `layers`, as lists of int triples."""
    if not isinstance(shapes, dict):
        raise TypeError(f"shapes must be a {{layer name: (K, N, M)}} dict, got {shown(shapes)}")
    missing, unknown = sorted(set(layers) - set(shapes)), sorted(set(shapes) - set(layers))
    if missing or unknown:
        raise ValueError(f"the shape map must name every quantized layer, and only those: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unknown {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}; map each layer of the searched model")
    checked = {}
    for name in layers:
        value = shapes[name]
        triples = [value] if isinstance(value, (tuple, list)) and len(value) == 3 and not isinstance(
            value[0], (tuple, list)) else value
        if not isinstance(triples, (tuple, list)) or not triples or not all(
                isinstance(t, (tuple, list)) and len(t) == 3 for t in triples):
            raise ValueError(f"shapes[{name!r}] must be (K, N, M) or a list of them, got {shown(value)}")
        checked[name] = [tuple(integer(v, f"shapes[{name!r}] {axis}", minimum=1) for v, axis in zip(t, "KNM"))
                         for t in triples]
    return checked


def layer_seconds(table: CostTable, specs: dict[str, LayerSpec], shapes: dict[str, list[tuple[int, int, int]]],
                  dtype: torch.dtype) -> dict[str, float]:
    """Each layer's seconds at its (mapped) shapes, planned as `specs` says."""
    for name, spec in specs.items():  # a shape the spec cannot take is named with its layer, before any timing
        try:
            for k, n, _ in shapes[name]:
                format_label(at_shape(spec, k, n))
        except ValueError as e:
            raise ValueError(f"layer {name!r} ({spec.label()}, {spec.recipe_label()}) cannot be costed at "
                             f"{shapes[name]}: {e}") from None
    table.measure([(spec, k, n, m, dtype) for name, spec in specs.items() for k, n, m in shapes[name]])  # interleaved
    return {name: sum(table.seconds(spec, k, n, m, dtype) for k, n, m in shapes[name]) for name, spec in specs.items()}


def model_shapes(model: nn.Module, layers: list[str], tokens: dict[str, int] | int) -> dict[str, list[tuple]]:
    """Each layer's own `(K, N)` with its token count (one for all, or per layer)."""
    out = {}
    for name in layers:
        linear = model.get_submodule(name)
        m = tokens if isinstance(tokens, int) else tokens.get(name)
        if m is None:
            raise ValueError(f"layer {name!r} saw no input in the denoiser forward, so its token count is unknown; "
                             f"pass tokens (viditq search --cost-tokens M)")
        out[name] = [(linear.in_features, linear.out_features, m)]
    return out


def seconds_limit(max_latency: float, w8a8_seconds: float) -> float:
    """The allocation's time limit for a latency budget of `max_latency` x all-W8A8: with a 1e-9 margin, so that
    sums in another order do not lock the all-W8A8 plan out at `max_latency=1.0`."""
    return max_latency * w8a8_seconds * (1 + 1e-9)


def group_seconds(pipe, groups: dict[str, list[str]], options: dict[str, dict], table: CostTable, prompts=None,
                  seeds=None, calibration=None, tokens: int | None = None, shapes: dict | None = None,
                  **call) -> tuple[dict[str, dict[str, float]], float]:
    """`({group: {option: seconds}}, all-W8A8 seconds)`: the allocation's latency input and its unit.

    Shapes: `shapes` (a shape map) if given, else each layer's own with `tokens` rows, else with the rows it sees
    in one denoiser forward of `pipe(prompts, **call)` (`layer_tokens`)."""
    model = pipe.transformer
    layers = [name for names in groups.values() for name in names]
    if shapes is not None:
        shaped = check_shapes(shapes, layers)
    else:
        if tokens is None:
            tokens = layer_tokens(pipe, layers, prompts, seeds, **call)
        else:
            tokens = integer(tokens, "tokens", minimum=1, fix="the rows (tokens x batch) one forward feeds a layer")
        shaped = model_shapes(model, layers, tokens)
    dtype = model.dtype
    specs = decided_specs(model, {**options, "W8A8 (latency unit)": W8A8_OPTION}, layers, calibration)
    per_layer = {label: layer_seconds(table, s, shaped, dtype) for label, s in specs.items()}
    seconds = {g: {o: sum(per_layer[o][n] for n in names) for o in options} for g, names in groups.items()}
    return seconds, sum(per_layer["W8A8 (latency unit)"].values())
