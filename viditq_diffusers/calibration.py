"""Calibration: activation statistics recorded through forward hooks while the pipeline runs.

DiT activations vary along four axes at once (docs/method.md, section 1): token-wise, CFG-wise
(unconditional vs conditional half of the batch), timestep-wise, and channel-wise. Per-token
dynamic quantization handles the first two at run time; the static channel balancing of
section 3 needs, per quantized linear layer, the input statistics below. `calibrate` drives a
real diffusers pipeline and records them, reduced as they stream (no activation is stored):

- `channel_absmax[name]` `[in]`: `a_j = max |x_j|` over everything (the smoothing statistic);
- `bucket_absmax[name]` `[buckets, in]`: the same per timestep bucket (equal-width bins over
  `[0, num_train_timesteps)`), to see how the channel imbalance drifts over the trajectory;
- `cfg_absmax[name]` `[2, in]`: per CFG half (row 0 unconditional, row 1 conditional); only when
  `guidance_scale > 1`, else empty;
- `token_absmax_range[name]` `[2]`: (min, max) over tokens of the per-token absmax (how much the
  per-token scales spread);
- `sample_tokens[name]` `[n, in]` with `sample_bucket[name]` `[n]`: a uniform random sample of
  input rows, at most `sample_rows` (64) per bucket, for a later per-layer alpha search.

Memory: the model plus `layers x buckets x sample_rows x in_features x 4` bytes of samples (CPU)
and `layers x (buckets + 2) x in_features x 4` bytes of maxima (model device); e.g. PixArt-alpha,
4 buckets: 28 blocks x (9 x 1152 + 4608) input features x 4 x 64 x 4 B ~ 0.43 GB of samples. Each
hook call adds a few activation-sized temporaries, freed when it returns.

Distributed: under `accelerate launch --num_processes N` the prompts are split between the
processes and the statistics max-reduced (min for the token-range min) with `accelerate.utils.gather`;
the row samples merge exactly (see `_LayerStats`), so N processes give bit-identical statistics to
one process on the same prompts, seeds and thread count. For gloo CPU processes, launch with
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...` (accelerate's `--cpu` starts several
processes only through mpirun).

Text encoders: `calibrate(pipe, prompts, component="text_encoder")` records a pipeline's transformers text
encoder instead (its default layers, `text_encoders.py`), driving it through the pipeline's own
`encode_prompt(prompt=[p], **call_kwargs)`, so the tokens are the ones generation feeds it (padding and negative
prompt included); a bare encoder takes `run(prompt, generator)`. An encoder runs once per prompt, with no timestep
and no CFG halves: one bucket, no `cfg_absmax`. The statistics, keyed by the encoder's layer names, serve
`ViDiTQConfig("w8a8", calibration=stats)` on that encoder (`<Encoder>.from_pretrained` or a pipeline's
`quant_mapping`).

`input_absmax(model, run)` is the older, simpler per-tensor statistic used by the naive baseline.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from .architectures import default_layers
from .atomic import atomic_path
from .checks import GENERATOR_SEEDS, integer, name_list, real, shown
from .text_encoders import is_text_encoder

SAMPLE_ROWS = 64
FORMAT_VERSION = 1
METADATA_KEY = "viditq_calibration"
KINDS = ("channel_absmax", "bucket_absmax", "cfg_absmax", "token_absmax_range", "sample_tokens", "sample_bucket")
# Seed offset of the row-sampling priorities, so they are not the pipeline's noise stream.
SAMPLE_SEED = 0x5EED_0000


@torch.no_grad()
def input_absmax(model: nn.Module, run: Callable[[], object]) -> dict[str, float]:
    """`{linear layer name: max |input|}` over everything `run()` makes the model compute.

    `run` drives the model (e.g. `lambda: pipe(prompts, num_inference_steps=20)`); the hooks
    are removed afterwards, also when `run` fails.
    """
    absmax: dict[str, float] = {}

    def observe(name):
        def hook(module, args):
            value = args[0].detach().abs().amax().item()
            absmax[name] = max(absmax.get(name, 0.0), value)
        return hook

    handles = [m.register_forward_pre_hook(observe(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    if not absmax:
        raise ValueError("the calibration run never called a linear layer of this model; check that `run` uses it.")
    return absmax


def _prompt_list(prompts) -> list[str]:
    """One prompt (a string) or a non-empty list of prompts, as a list; anything else a TypeError naming it."""
    if isinstance(prompts, str):
        return [prompts]
    if prompts is None or isinstance(prompts, (bytes, dict)) or not hasattr(prompts, "__iter__"):
        raise TypeError(f"calibrate: prompts must be a list of prompt strings, got {shown(prompts)}; pass e.g. "
                        f"prompts=['a photo of a cat'] (64-256 prompts like your real ones).")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("calibrate got no prompts; pass a non-empty list (e.g. 64-256 prompts like your real ones).")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"calibrate: prompts must be strings, got {shown(bad[0])}; pass e.g. prompts=['a cat'].")
    return prompts


# ----------------------------------------------------------------------------------------------- statistics


@dataclass
class CalibrationStats:
    """Per-layer activation statistics from `calibrate` (see the module docstring for each field).

    `settings` holds the JSON-safe run description: prompts_sha256, num_prompts, seeds,
    num_inference_steps, guidance_scale, timestep_buckets, num_train_timesteps, sample_rows, call_kwargs.
    """

    model_class: str
    in_features: dict[str, int]
    channel_absmax: dict[str, torch.Tensor]
    bucket_absmax: dict[str, torch.Tensor]
    cfg_absmax: dict[str, torch.Tensor]
    token_absmax_range: dict[str, torch.Tensor]
    sample_tokens: dict[str, torch.Tensor]
    sample_bucket: dict[str, torch.Tensor]
    settings: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.in_features)

    def layer_absmax(self) -> dict[str, float]:
        """`{layer: max |input|}`, the per-tensor statistic of `input_absmax` (e.g. for `naive_w8a8`)."""
        return {name: float(a.max()) for name, a in self.channel_absmax.items()}

    def outlier_ratio(self) -> dict[str, float]:
        """`{layer: max_j a_j / median_j a_j}`: how far the largest input channel sticks out."""
        return {name: float(a.max() / a.median().clamp_min(1e-12)) for name, a in self.channel_absmax.items()}

    def without_samples(self) -> "CalibrationStats":
        """A copy without the sampled input rows: what a plan whose recipes are decided (fixed alpha and rotation
        per layer) needs to quantize, in kilobytes instead of megabytes. `balance="search"` and `alpha="auto"`
        need the full statistics."""
        return replace(self, sample_tokens={}, sample_bucket={})

    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (tensors under `<kind>/<layer>`, settings as JSON metadata), atomically."""
        from safetensors.torch import save

        tensors = {f"{kind}/{name}": t.contiguous() for kind in KINDS for name, t in getattr(self, kind).items()}
        meta = {"version": FORMAT_VERSION, "model_class": self.model_class, "in_features": self.in_features,
                "settings": self.settings}
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # written by Python: the usual permissions (umask)
            f.write(save(tensors, metadata={METADATA_KEY: json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationStats":
        """Read a file written by `save` (safetensors + JSON only; nothing is unpickled)."""
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no calibration statistics at {path!r}; create them with `viditq calibrate`.")
        try:
            with safe_open(path, framework="pt") as f:
                raw = (f.metadata() or {}).get(METADATA_KEY)
                if raw is None:
                    raise ValueError(f"{path!r} is a safetensors file but not ViDiT-Q calibration statistics "
                                     f"(no {METADATA_KEY!r} metadata); create them with `viditq calibrate`.")
                meta = _read_metadata(path, raw)
                tensors = {kind: {} for kind in KINDS}
                for key in f.keys():
                    kind, _, name = key.partition("/")
                    if kind not in KINDS or name not in meta["in_features"]:
                        raise ValueError(f"{path!r}: tensor {key!r} is not '<kind>/<layer>' with a kind of {KINDS} "
                                         f"and a layer of its 'in_features'; {_REDO}.")
                    tensors[kind][name] = f.get_tensor(key)
        except SafetensorError as e:
            raise ValueError(f"{path!r} is not a valid safetensors file ({e}); it is truncated or corrupt. "
                             f"{_REDO[0].upper()}{_REDO[1:]}") from None
        _check_tensors(path, meta["in_features"], tensors)
        return cls(model_class=meta["model_class"], in_features=meta["in_features"], settings=meta["settings"],
                   **tensors)

    def check_matches(self, model, layers: list[str] | None = None) -> None:
        """Raise a ValueError unless these statistics fit `model` (a denoiser, a pipeline's `.transformer`, or a
        text encoder for statistics recorded with `component=`).

        `layers`: the layers the caller needs (default: all recorded ones); each must be recorded and
        present in `model` with the same in_features.
        """
        model = getattr(model, "transformer", model)
        fix = ("recalibrate on this model: viditq_diffusers.calibrate(pipe, prompts, component='text_encoder')"
               if is_text_encoder(type(model).__name__) else
               "recalibrate with `viditq calibrate PIPE --prompts FILE --out STATS.safetensors` on this model")
        if type(model).__name__ != self.model_class:
            raise ValueError(f"calibration statistics were recorded on {self.model_class}, this model is "
                             f"{type(model).__name__}; {fix}.")
        modules = dict(model.named_modules())
        problems = []
        for name in self.layers if layers is None else layers:
            module = modules.get(name)
            if name not in self.in_features:
                problems.append(f"{name}: not in the calibration statistics")
            elif module is None or not hasattr(module, "in_features"):
                problems.append(f"{name}: no such linear layer in this {type(model).__name__}")
            elif module.in_features != self.in_features[name]:
                problems.append(f"{name}: recorded with {self.in_features[name]} input features, "
                                f"this model has {module.in_features}")
        if problems:
            shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
            raise ValueError(f"calibration statistics were recorded on another {self.model_class} "
                             f"({len(problems)} mismatch(es)):\n  {shown}\n{fix}.")


_REDO = "recalibrate with `viditq calibrate PIPE --prompts FILE --out STATS.safetensors`"
# per kind: (dtype, shape as a function of the layer's in_features; None = any size there)
_LAYOUT = {"channel_absmax": (torch.float32, lambda n: (n,)), "bucket_absmax": (torch.float32, lambda n: (None, n)),
           "cfg_absmax": (torch.float32, lambda n: (2, n)), "token_absmax_range": (torch.float32, lambda n: (2,)),
           "sample_tokens": (torch.float32, lambda n: (None, n)), "sample_bucket": (torch.int64, lambda n: (None,))}
_REQUIRED = ("channel_absmax", "bucket_absmax", "token_absmax_range")  # calibrate writes these for every layer


def _read_metadata(path: str, raw: str) -> dict:
    """The JSON metadata of a statistics file, checked: a ValueError names the file and the key."""
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r}: its {METADATA_KEY!r} metadata is not valid JSON ({e}); {_REDO}.") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path!r}: its {METADATA_KEY!r} metadata is not a JSON object; {_REDO}.")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"calibration file version {meta.get('version')!r} is not supported (this "
                         f"viditq_diffusers reads version {FORMAT_VERSION}); recalibrate with `viditq calibrate`.")
    for key, kind in (("model_class", str), ("in_features", dict), ("settings", dict)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{path!r}: metadata key {key!r} must be a {kind.__name__}, got "
                             f"{type(meta.get(key)).__name__}{' (missing)' if key not in meta else ''}; {_REDO}.")
    for name, n in meta["in_features"].items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{path!r}: in_features[{name!r}] must be a positive integer, got {n!r}; {_REDO}.")
    return meta


def _check_tensors(path: str, in_features: dict[str, int], tensors: dict[str, dict]) -> None:
    """Every statistic of a loaded file has its layer's shape and dtype and finite, non-negative maxima."""
    for name, n in in_features.items():
        for kind in _REQUIRED:
            if name not in tensors[kind]:
                raise ValueError(f"{path!r}: no '{kind}/{name}' tensor (every layer has one); {_REDO}.")
        if (name in tensors["sample_tokens"]) != (name in tensors["sample_bucket"]):
            raise ValueError(f"{path!r}: layer {name!r} has one of 'sample_tokens' / 'sample_bucket' without the "
                             f"other; {_REDO}.")
    for kind, layers in tensors.items():
        dtype, shape_of = _LAYOUT[kind]
        for name, t in layers.items():
            shape = shape_of(in_features[name])
            if t.dtype != dtype or t.dim() != len(shape) or any(s is not None and s != d for s, d in
                                                                 zip(shape, t.shape)):
                want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
                raise ValueError(f"{path!r}: tensor '{kind}/{name}' must be {str(dtype).removeprefix('torch.')} "
                                 f"{want}, got {str(t.dtype).removeprefix('torch.')} {list(t.shape)}; {_REDO}.")
            if dtype.is_floating_point and not torch.isfinite(t).all():
                raise ValueError(f"{path!r}: tensor '{kind}/{name}' holds NaN or Inf; {_REDO}.")
            if kind.endswith(("absmax", "absmax_range")) and (t < 0).any():
                raise ValueError(f"{path!r}: tensor '{kind}/{name}' holds negative maxima of |x|; {_REDO}.")
    for name, rows in tensors["sample_tokens"].items():
        buckets, picked = tensors["bucket_absmax"][name].shape[0], tensors["sample_bucket"][name]
        if len(picked) != len(rows) or len(picked) and not (0 <= int(picked.min()) and int(picked.max()) < buckets):
            raise ValueError(f"{path!r}: 'sample_bucket/{name}' must give each of the {len(rows)} sampled rows a "
                             f"bucket in [0, {buckets}); {_REDO}.")


class _LayerStats:
    """Running reductions of one layer's inputs (device tensors, except the CPU row sample)."""

    def __init__(self, in_features: int, buckets: int, cfg: bool, sample_rows: int, device):
        self.bucket = torch.zeros(buckets, in_features, device=device)
        self.cfg = torch.zeros(2, in_features, device=device) if cfg else None
        self.token = torch.tensor([math.inf, 0.0], device=device)  # (min, max) of per-token absmax
        # Row sample = the `sample_rows` rows with the smallest random priority ("bottom-k" reservoir):
        # uniform, and the union of two such samples reduces to the sample of the union, so the
        # distributed merge gives exactly the single-process sample. inf = empty slot.
        self.priority = torch.full((buckets, sample_rows), math.inf, dtype=torch.float64)
        self.samples = torch.zeros(buckets, sample_rows, in_features)
        self.calls = 0

    def update(self, x: torch.Tensor, bucket: int, priority: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        absx = rows.abs()
        self.bucket[bucket] = torch.maximum(self.bucket[bucket], absx.amax(0))
        if self.cfg is not None:
            # diffusers batches [uncond, cond] along dim 0 (Latte folds frames / patches in batch-major),
            # so the first half of the flattened rows is the unconditional half
            half = rows.shape[0] // 2
            self.cfg[0] = torch.maximum(self.cfg[0], absx[:half].amax(0))
            self.cfg[1] = torch.maximum(self.cfg[1], absx[half:].amax(0))
        per_token = absx.amax(1)
        self.token[0] = torch.minimum(self.token[0], per_token.min())
        self.token[1] = torch.maximum(self.token[1], per_token.max())
        keep = self.priority.shape[1]
        pick = priority.topk(min(keep, len(priority)), largest=False).indices
        pri = torch.cat([self.priority[bucket], priority[pick]])
        cand = torch.cat([self.samples[bucket], rows[pick.to(rows.device)].cpu()])
        order = pri.sort(stable=True).indices[:keep]
        self.priority[bucket], self.samples[bucket] = pri[order], cand[order]
        self.calls += 1


def _timestep_of(denoiser: nn.Module, args: tuple, kwargs: dict) -> float:
    t = kwargs.get("timestep")
    if t is None:
        bound = inspect.signature(denoiser.forward).bind_partial(*args, **kwargs).arguments
        t = bound.get("timestep", bound.get("timesteps"))  # ComfyUI's denoisers name it `timesteps`
    if t is None:
        raise ValueError(f"{type(denoiser).__name__} was called without a `timestep`; calibrate needs it to bucket "
                         f"the statistics by timestep.")
    return float(torch.as_tensor(t).flatten()[0])


def _denoiser(pipe_or_model, run):
    """(denoiser, scheduler or None, is_pipeline)."""
    transformer = getattr(pipe_or_model, "transformer", None)
    if isinstance(transformer, nn.Module) and callable(pipe_or_model):
        return transformer, getattr(pipe_or_model, "scheduler", None), True
    if isinstance(pipe_or_model, nn.Module) and run is not None:
        return pipe_or_model, None, False
    raise ValueError(
        f"calibrate drives a diffusers pipeline with a `.transformer` (e.g. PixArtAlphaPipeline, LattePipeline), "
        f"got {type(pipe_or_model).__name__}. Pass the pipeline, or for a bare model pass "
        f"run=lambda prompt, generator: ... that calls the model (with `timestep`) for one prompt."
    )


def _text_encoder(pipe_or_model, component: str, run):
    """The pipeline's transformers text encoder called `component`, checked; or a ValueError naming the ones it
    has."""
    if not isinstance(component, str):
        raise TypeError(f"calibrate: component must be a pipeline component's name, got {shown(component)}; e.g. "
                        f"component='text_encoder'.")
    components = getattr(pipe_or_model, "components", None)
    if isinstance(pipe_or_model, nn.Module) or not isinstance(components, dict):
        raise ValueError(f"calibrate: component={component!r} names a component of a diffusers pipeline, got "
                         f"{type(pipe_or_model).__name__}. Pass the pipeline, or calibrate a bare text encoder "
                         f"without component, with run=lambda prompt, generator: ... that encodes one prompt.")
    encoders = [name for name, module in components.items()
                if isinstance(module, nn.Module) and is_text_encoder(type(module).__name__)]
    module = components.get(component)
    if not (isinstance(module, nn.Module) and is_text_encoder(type(module).__name__)):
        what = "not a component of" if component not in components else f"a {type(module).__name__} in"
        raise ValueError(f"calibrate: component={component!r} is {what} this {type(pipe_or_model).__name__}; "
                         f"calibrate records the denoiser (component='transformer', the default) or a supported "
                         f"transformers text encoder: {', '.join(map(repr, encoders)) or 'this pipeline has none'}.")
    if run is None and not callable(getattr(pipe_or_model, "encode_prompt", None)):
        raise ValueError(f"calibrate: {type(pipe_or_model).__name__} has no encode_prompt to drive its "
                         f"{component}; pass run=lambda prompt, generator: ... that encodes one prompt.")
    return module


def _reduce(state, stats: dict[str, _LayerStats]) -> None:
    """Max-reduce (min for the token-range min) every statistic across processes; merge row samples."""
    from accelerate.utils import gather

    def everyone(tensor):  # [processes, *tensor.shape]; accelerate's gather concatenates along dim 0
        return gather(tensor[None].contiguous().to(state.device)).cpu()

    for s in stats.values():
        s.bucket = everyone(s.bucket).amax(0)
        if s.cfg is not None:
            s.cfg = everyone(s.cfg).amax(0)
        token = everyone(s.token)
        s.token = torch.stack([token[:, 0].amin(), token[:, 1].amax()])
        s.calls = int(everyone(torch.tensor(s.calls)).sum())
        # per bucket: the smallest priorities among all processes' samples (see _LayerStats)
        pri, rows = everyone(s.priority), everyone(s.samples)  # [P, B, R], [P, B, R, in]
        procs, buckets, keep = pri.shape
        pri = pri.transpose(0, 1).reshape(buckets, procs * keep)
        rows = rows.transpose(0, 1).reshape(buckets, procs * keep, -1)
        order = pri.sort(dim=1, stable=True).indices[:, :keep]
        s.priority = pri.gather(1, order)
        s.samples = rows.gather(1, order[..., None].expand(-1, -1, rows.shape[-1]))


@torch.no_grad()
def calibrate(
    pipe_or_model,
    prompts: list[str],
    num_inference_steps: int = 20,
    guidance_scale: float = 4.5,
    seeds: list[int] | None = None,
    timestep_buckets: int = 4,
    layers: list[str] | None = None,
    run: Callable[[str, torch.Generator], object] | None = None,
    sample_rows: int = SAMPLE_ROWS,
    timestep_range: float | None = None,
    component: str = "transformer",
    **call_kwargs,
) -> CalibrationStats:
    """Run the pipeline on `prompts` and record per-layer activation statistics (module docstring).

    Each prompt is generated on its own (batch 1) with `torch.Generator().manual_seed(seed)`
    (`seeds` default `0..n-1`) and `output_type="latent"`: `pipe(prompt=[p], num_inference_steps=...,
    guidance_scale=..., generator=[g], output_type="latent", **call_kwargs)`. One prompt per call
    keeps each prompt's activations independent of its batch mates (LattePipeline needs it anyway).
    `layers` defaults to the layers ViDiT-Q quantizes by default (`architectures.default_layers`).
    `guidance_scale > 1` means the batch holds [uncond, cond] halves, as in diffusers' pipelines.

    A bare denoiser needs `run(prompt, generator)` that calls it for one prompt (with `timestep`);
    timestep buckets then span [0, timestep_range) (default 1000; e.g. 1.0 for a denoiser fed sigmas).

    Under `accelerate launch --num_processes N` the (prompt, seed) pairs are split between the
    processes and the statistics are reduced across them, so every process gets the same result
    as a single process would (row samples included: see `_LayerStats`).

    `component="text_encoder"` (or "text_encoder_2", ...) records the pipeline's transformers text encoder
    instead: each prompt goes through `pipe.encode_prompt(prompt=[prompt], **call_kwargs)` (or `run`), the
    layers default to the encoder's quantized ones, and `num_inference_steps`, `guidance_scale`,
    `timestep_buckets` and `timestep_range` do not apply (one bucket, no CFG halves). A bare text encoder (a
    class of `text_encoders.TEXT_ENCODER_BLOCKS`) is recorded the same way with `run(prompt, generator)`.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    prompts = _prompt_list(prompts)
    num_inference_steps = integer(num_inference_steps, "calibrate: num_inference_steps", minimum=1,
                                  fix="pass a positive number of denoising steps, e.g. num_inference_steps=20")
    guidance_scale = real(guidance_scale, "calibrate: guidance_scale",
                          fix="pass the guidance scale you generate with, e.g. 4.5 (1 or below: no CFG)")
    timestep_buckets = integer(timestep_buckets, "calibrate: timestep_buckets", minimum=1, fix="e.g. 4")
    sample_rows = integer(sample_rows, "calibrate: sample_rows", minimum=1, fix=f"e.g. {SAMPLE_ROWS}")
    if timestep_range is not None:
        timestep_range = real(timestep_range, "calibrate: timestep_range", fix="e.g. 1000, or 1.0 for sigmas")
        if timestep_range <= 0:
            raise ValueError(f"calibrate: timestep_range must be > 0, got {timestep_range}; e.g. 1000.")
    if seeds is not None and (isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__")):
        raise TypeError(f"calibrate: seeds must be a list of integers (one per prompt) or None, got {shown(seeds)}.")
    low, high = GENERATOR_SEEDS
    seeds = list(range(len(prompts))) if seeds is None else [
        integer(s, f"calibrate: seeds[{i}]", minimum=low, maximum=high) for i, s in enumerate(seeds)]
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per prompt (or none).")
    if layers is not None:
        layers = name_list(layers, "calibrate: layers", "transformer_blocks.0.attn1.to_q")
    reserved = {"prompt", "generator", "num_inference_steps", "guidance_scale", "output_type"} & set(call_kwargs)
    if reserved:
        raise ValueError(f"calibrate sets {sorted(reserved)} itself; pass them as calibrate's own arguments.")

    if component == "transformer":
        denoiser, scheduler, is_pipeline = _denoiser(pipe_or_model, run)
        encoder = not is_pipeline and is_text_encoder(type(denoiser).__name__)
    else:
        denoiser, scheduler, is_pipeline, encoder = _text_encoder(pipe_or_model, component, run), None, True, True
    if encoder:  # runs once per prompt: no timestep to bucket by, no [uncond, cond] halves to split
        timestep_buckets, guidance_scale, timestep_range = 1, 1.0, 1.0
    num_train = int(scheduler.config.num_train_timesteps) if scheduler is not None else (timestep_range or 1000)
    names = default_layers(denoiser) if layers is None else list(layers)
    if layers is None and not names:
        raise ValueError(
            f"{type(denoiser).__name__} has no quantizable layers: ViDiT-Q quantizes the nn.Linear layers inside "
            f"transformer blocks, and none were found. Pass a model with transformer blocks, or `layers`."
        )
    modules = dict(denoiser.named_modules())
    missing = [n for n in names if not isinstance(getattr(modules.get(n), "in_features", None), int)]
    if missing or not names:
        raise ValueError(f"layers {missing or names} are not linear layers of {type(denoiser).__name__}; "
                         f"pass names from model.named_modules() (or layers=None for the default).")

    # CPU processes (gloo) need cpu=True; `accelerate launch` says so only through this variable
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    cfg = guidance_scale > 1
    device = next(denoiser.parameters()).device
    stats = {n: _LayerStats(modules[n].in_features, timestep_buckets, cfg, sample_rows, device) for n in names}
    now = {"t": None, "bucket": 0, "priority_gen": None}

    def on_denoiser(module, args, kwargs):
        now["t"] = _timestep_of(module, args, kwargs)
        now["bucket"] = min(max(int(now["t"] * timestep_buckets // num_train), 0), timestep_buckets - 1)

    def on_layer(name):
        def hook(module, args):
            x = args[0].detach()
            if now["t"] is None:
                raise ValueError(f"layer '{name}' ran before {type(denoiser).__name__} was called; calibrate buckets "
                                 f"by the denoiser's timestep, so the layer must belong to it.")
            if cfg and x.shape[0] % 2:
                raise ValueError(f"layer '{name}' got a batch of {x.shape[0]} with guidance_scale={guidance_scale}; "
                                 f"expected [uncond, cond] halves. Pass guidance_scale=1 if the run does no CFG.")
            if not torch.isfinite(x).all():
                raise ValueError(f"layer '{name}' got a NaN/Inf input at timestep {now['t']:g}; the model overflows "
                                 f"at these settings (e.g. float16): calibrate in float32 / bfloat16.")
            rows = x.numel() // x.shape[-1]
            priority = torch.rand(rows, generator=now["priority_gen"], dtype=torch.float64)
            stats[name].update(x, now["bucket"], priority)
        return hook

    # shard (index, prompt, seed) triples so each prompt keeps its seed and its priority stream
    items = list(enumerate(zip(prompts, seeds)))
    with state.split_between_processes(items) as mine:
        mine = list(mine)
    handles = [] if encoder else [denoiser.register_forward_pre_hook(on_denoiser, with_kwargs=True)]
    handles += [modules[n].register_forward_pre_hook(on_layer(n)) for n in names]
    progress = getattr(pipe_or_model, "_progress_bar_config", None) if is_pipeline else None
    if is_pipeline:
        pipe_or_model.set_progress_bar_config(disable=True)  # ours counts prompts instead
    error = None
    try:
        for index, (prompt, seed) in tqdm(mine, desc="viditq calibrate", unit="prompt",
                                           disable=not state.is_main_process):
            now["t"], now["priority_gen"] = 0.0 if encoder else None, torch.Generator().manual_seed(SAMPLE_SEED + index)
            generator = torch.Generator().manual_seed(seed)
            if encoder and run is None:
                pipe_or_model.encode_prompt(prompt=[prompt], **call_kwargs)
            elif is_pipeline and not encoder:
                pipe_or_model(prompt=[prompt], num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              generator=[generator], output_type="latent", **call_kwargs)
            else:
                run(prompt, generator)
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the other processes learn of it
        error = exc
    finally:
        for handle in handles:
            handle.remove()
        if is_pipeline:
            if progress is None:
                pipe_or_model.__dict__.pop("_progress_bar_config", None)
            else:
                pipe_or_model._progress_bar_config = progress

    if state.num_processes > 1:
        from accelerate.utils import gather

        # a failing process must not leave the others waiting in the reduction
        failed = gather(torch.tensor([int(error is not None)], device=state.device)).cpu()
        if error is None and failed.any():
            raise RuntimeError(f"calibration failed on process(es) {failed.nonzero().flatten().tolist()}; "
                               f"see their error above.")
    if isinstance(error, (IndexError, TypeError, KeyError)) and is_pipeline and not encoder and \
            num_inference_steps == 1:
        # e.g. diffusers' PixArt pipelines take a one-step path meant for one-step (distilled) schedulers
        raise ValueError(f"{type(pipe_or_model).__name__} with its {type(scheduler).__name__} failed at "
                         f"num_inference_steps=1 ({type(error).__name__}: {error}); this pipeline and scheduler do "
                         f"not support a single step. Calibrate with num_inference_steps >= 2 (e.g. the number of "
                         f"steps you generate with).") from error
    if error is not None:
        raise error
    if state.num_processes > 1:
        _reduce(state, stats)

    silent = [n for n, s in stats.items() if s.calls == 0]
    if silent:
        listed = ", ".join(silent[:8]) + (", ..." if len(silent) > 8 else "")
        raise ValueError(f"{len(silent)} layer(s) never ran during calibration: {listed}. Is it unused at these "
                         f"settings (e.g. Latte's temporal blocks with enable_temporal_attentions=False)? Change "
                         f"the settings or leave it out with layers=[...].")

    result = {kind: {} for kind in KINDS}
    for name, s in stats.items():
        result["bucket_absmax"][name] = s.bucket.cpu()
        result["channel_absmax"][name] = s.bucket.amax(0).cpu()
        if s.cfg is not None:
            result["cfg_absmax"][name] = s.cfg.cpu()
        result["token_absmax_range"][name] = s.token.cpu()
        filled = torch.isfinite(s.priority)
        result["sample_tokens"][name] = s.samples.cpu()[filled]  # bucket-major, by priority within a bucket
        result["sample_bucket"][name] = filled.nonzero()[:, 0]
    settings = {
        "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "num_prompts": len(prompts), "seeds": seeds, "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale, "timestep_buckets": timestep_buckets, "num_train_timesteps": num_train,
        "sample_rows": sample_rows, "call_kwargs": json.loads(json.dumps(call_kwargs, default=repr)),
    }
    if encoder:  # no denoising steps, buckets or CFG: say so rather than record the unused arguments
        settings.update(num_inference_steps=None, guidance_scale=None, timestep_buckets=1, num_train_timesteps=None,
                        component=component if is_pipeline else None)
    return CalibrationStats(model_class=type(denoiser).__name__, in_features={n: modules[n].in_features for n in names},
                            settings=settings, **result)
