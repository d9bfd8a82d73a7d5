"""Model cache and the three variants the app compares: FP, W8A8 and W4A8-MP.

No Gradio here (the UI is `app.py`): errors are `ValueError` / `FileNotFoundError` with a message that names the
problem and the fix, and the app shows them as `gr.Error`. Everything quantization-related is the core's
(`viditq_diffusers`): this module only decides which config each variant gets, keeps the models, and times runs.

Sharing: a pipeline is loaded once per source and kept; its quantized transformers are built once (from a copy
of the FP transformer, never in place) and swapped in only when calibration makes a better W4A8-MP. With "quantize
the text encoder too" the quantized variants also swap in the pipeline's text encoders loaded W8A16, once per source
(through diffusers' `PipelineQuantizationConfig`, as a user loads them) and shared by both. Requests
never mutate them: each request builds its own pipeline object around the shared modules (with its own
scheduler and tokenizers, which hold per-call state) and its own seeded generator
(`viditq_diffusers.evaluation.generate`).
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import threading
import time
from dataclasses import dataclass

import diffusers
import torch
from diffusers import PipelineQuantizationConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import viditq_diffusers
from viditq_diffusers import CalibrationStats, ViDiTQConfig, ViDiTQLinear, weight_bytes
from viditq_diffusers.architectures import BLOCK_LISTS
from viditq_diffusers.evaluation import compare_samples, generate
from viditq_diffusers.jsonio import read_json
from viditq_diffusers.kernels import warmup as warmup_kernels  # noqa: F401 (app.py calls it at start)

from .choices import BUNDLED, CUSTOM, ENCODER_PRESET, VARIANTS

# The diffusers transformer classes the core's layer rule covers (architectures.BLOCK_LISTS also names
# ComfyUI's own classes, which never occur in a diffusers pipeline).
SUPPORTED = sorted(name for name in BLOCK_LISTS if name in dir(diffusers))
SHIPPED_PLAN = os.path.join("viditq_plans", "w4a8_mp_searched_5bits.json")  # issue 7's searched plan
SHIPPED_STATS = os.path.join("viditq_plans", "calibration.safetensors")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def device_and_dtype() -> tuple[str, torch.dtype]:
    """FP16 on a GPU, FP32 on CPU (the quantized variants keep their FP layers in the same dtype)."""
    return ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)


def fp_label() -> str:
    device, dtype = device_and_dtype()
    return f"FP{torch.finfo(dtype).bits} ({device.upper() if device == 'cpu' else 'GPU'})"


def resolve_source(choice: str, custom: str = "") -> str:
    """The pipeline to load: a bundled choice, or the custom local directory / Hub id (absolute path if local)."""
    if choice in BUNDLED:
        return BUNDLED[choice]
    if choice not in (CUSTOM, None, ""):
        raise ValueError(f"Unknown pipeline choice {choice!r}: pick {', '.join(BUNDLED)} or {CUSTOM!r}.")
    custom = (custom or "").strip()
    if not custom:
        raise ValueError("No pipeline given: type a local diffusers pipeline directory or a Hub id (owner/name) "
                         "in the pipeline field, or pick a bundled pipeline.")
    path = os.path.abspath(os.path.expanduser(custom))
    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ValueError(f"{custom!r} is not a diffusers pipeline directory (it has no model_index.json). "
                             f"Give the folder that holds model_index.json, e.g. reference_models/pixart_digits.")
        return path
    if not HUB_ID.match(custom):
        raise ValueError(f"{custom!r} is neither an existing directory nor a Hub id (owner/name). Check the path, "
                         f"or give a Hub repo id such as PixArt-alpha/PixArt-XL-2-512x512.")
    return custom


def check_supported(source: str, denoisers: dict[str, str]) -> None:
    """`denoisers`: {component: class name} of the pipeline's `transformer` / `unet` components."""
    if denoisers.get("transformer") not in SUPPORTED:
        found = ", ".join(f"{cls} (component {name!r})" for name, cls in denoisers.items()) or "not a transformer"
        raise ValueError(f"{source} is not supported: its denoiser is {found}, and ViDiT-Q quantizes diffusion "
                         f"transformers. Pick a pipeline whose transformer is one of: {', '.join(SUPPORTED)}.")


def precheck_local(path: str) -> None:
    """Refuse an unsupported local pipeline from its model_index.json, before any weights load."""
    index = read_json(os.path.join(path, "model_index.json"))
    denoisers = {name: index[name][1] for name in ("transformer", "unet")
                 if isinstance(index.get(name), list) and len(index[name]) == 2}
    check_supported(f"{path} ({index.get('_class_name')})", denoisers)


def peak_memory_kind() -> str:
    return "GPU allocator" if device_and_dtype()[0] == "cuda" else "process RSS"


def peak_tracker(device: str):
    """(reset, read) for the peak memory of a run: the CUDA allocator's peak on GPU; on CPU the process's
    resident-set high-water mark (Linux VmHWM, reset through /proc/self/clear_refs)."""
    if device == "cuda":
        return torch.cuda.reset_peak_memory_stats, torch.cuda.max_memory_allocated

    def read() -> int | None:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
        except (OSError, AttributeError):
            return None

    def reset() -> None:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
        except OSError:
            pass

    return reset, read


def component_bytes(pipe) -> dict[str, int]:
    """{component: bytes of its weights as stored} for every model of a pipeline (denoiser, text encoders, VAE):
    quantized layers count their integer codes and scales (the core's `weight_bytes`)."""
    return {name: weight_bytes(module) for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module)}


@dataclass
class Result:
    """One variant's output for one request. `samples` is in [-1, 1]: `[1, C, H, W]` or `[1, F, C, H, W]`."""

    name: str
    label: str
    samples: torch.Tensor
    latency_s: float
    component_bytes: dict[str, int]  # the weights of the whole pipeline that ran, per component
    peak_bytes: int | None
    psnr: float | None = None
    ssim: float | None = None

    @property
    def weight_bytes(self) -> int:
        """The whole pipeline's weights."""
        return sum(self.component_bytes.values())


class LoadedPipeline:
    """One FP pipeline, loaded once, and its quantized transformers, built once and shared read-only."""

    def __init__(self, source: str):
        from diffusers import DiffusionPipeline

        self.source = source
        self.device, self.dtype = device_and_dtype()
        local = os.path.isdir(source)
        if local:
            precheck_local(source)
        try:
            pipe = DiffusionPipeline.from_pretrained(source, dtype=self.dtype)
        except Exception as error:  # a Hub id that does not resolve, a broken folder: say which and why
            raise ValueError(f"Could not load a diffusers pipeline from {source!r}: {error}. Give a local pipeline "
                             f"directory (with model_index.json) or a Hub id you can access.") from error
        denoisers = {name: type(getattr(pipe, name)).__name__ for name in ("transformer", "unet")
                     if getattr(pipe, name, None) is not None}
        check_supported(f"{source} ({type(pipe).__name__})", denoisers)
        transformer = pipe.transformer
        if any(isinstance(m, ViDiTQLinear) for m in transformer.modules()):
            raise ValueError(f"{source} is already ViDiT-Q quantized, so it cannot serve as the FP reference. "
                             f"Load its floating-point original instead.")
        self.fp = pipe.to(self.device)
        self.fp.set_progress_bar_config(disable=True)
        plan, stats = (os.path.join(source, SHIPPED_PLAN), os.path.join(source, SHIPPED_STATS)) if local else ("", "")
        self.shipped = (plan, CalibrationStats.load(stats)) if os.path.isfile(plan) and os.path.isfile(stats) else None
        self.calibration: CalibrationStats | None = None
        self.transformers: dict[str, tuple[str, torch.nn.Module]] = {"FP": (fp_label(), self.fp.transformer)}
        self.encoder_names = [name for name, component in self.fp.components.items()
                              if isinstance(component, PreTrainedModel)]  # text_encoder, text_encoder_2, ...
        self.quantized_encoders: dict[str, torch.nn.Module] | None = None  # loaded on first use (the checkbox)
        self.lock = threading.Lock()  # builds and swaps variants; generation reads without it
        # A fast tokenizer sets its padding and truncation on its one Rust object at every call, then encodes: two
        # requests sharing it encode with each other's padding (another image, or a crash). So each thread gets its
        # own copies, made from these pristine ones that nothing calls; a thread serves one request at a time.
        self.tokenizer_originals = {name: copy.deepcopy(component) for name, component in self.fp.components.items()
                                    if isinstance(component, PreTrainedTokenizerBase)}
        self.per_thread = threading.local()

    @property
    def accepted(self) -> set[str]:
        return set(inspect.signature(self.fp.__call__).parameters)

    def config(self, name: str) -> tuple[str, ViDiTQConfig]:
        """(UI label, config) of a quantized variant, given what this pipeline has (shipped plan, calibration)."""
        if name == "W8A8":  # channel balancing needs statistics: the shipped ones, else those of Calibrate
            if self.shipped:  # shipped statistics hold maxima only, no sampled tokens: a fixed recipe, not the search
                return ("W8A8 (paper recipe, alpha 0.75, shipped calibration)",
                        ViDiTQConfig(preset="paper_w8a8", alpha=0.75, calibration=self.shipped[1]))
            if self.calibration is not None:
                return "W8A8 (preset w8a8, calibrated)", ViDiTQConfig(preset="w8a8", calibration=self.calibration)
            return "W8A8 (preset w8a8, not calibrated: press Calibrate)", ViDiTQConfig(preset="w8a8")
        if self.shipped:
            plan, stats = self.shipped
            return "W4A8-MP (shipped searched plan, <= 5 avg. weight bits)", ViDiTQConfig(plan=plan, calibration=stats)
        if self.calibration is not None:
            return "W4A8-MP (preset w4a8_mp, calibrated)", ViDiTQConfig(preset="w4a8_mp", calibration=self.calibration)
        return "W4A8-MP (preset w4a8_mp, not calibrated: press Calibrate)", ViDiTQConfig(preset="w4a8_mp")

    def variant(self, name: str) -> tuple[str, torch.nn.Module]:
        """(label, transformer) of a variant; quantized ones are built on first use from a copy of the FP model."""
        with self.lock:
            if name not in self.transformers:
                label, config = self.config(name)
                model = viditq_diffusers.quantize(copy.deepcopy(self.fp.transformer), config)
                self.transformers[name] = (label, model.eval())
            return self.transformers[name]

    def encoders(self) -> dict[str, torch.nn.Module]:
        """The pipeline's text encoders loaded W8A16, once: through diffusers' `PipelineQuantizationConfig`, the
        pipeline's other components passed in so that nothing else loads twice. Both quantized variants share them
        (weight-only W8A16 needs no calibration, so calibrating never rebuilds them)."""
        with self.lock:
            if self.quantized_encoders is None:
                self.quantized_encoders = self.load_quantized_encoders()
            return self.quantized_encoders

    def load_quantized_encoders(self) -> dict[str, torch.nn.Module]:
        from diffusers import DiffusionPipeline

        if not self.encoder_names:
            raise ValueError(f"{self.source} has no text encoder (no transformers model among its components), so "
                             f"there is none to quantize. Uncheck “Quantize the text encoder too”.")
        mapping = {name: ViDiTQConfig(ENCODER_PRESET) for name in self.encoder_names}
        others = {name: component for name, component in self.fp.components.items() if name not in mapping}
        try:
            pipe = DiffusionPipeline.from_pretrained(
                self.source, dtype=self.dtype, quantization_config=PipelineQuantizationConfig(quant_mapping=mapping),
                **others)
        except Exception as error:  # an encoder class the core does not know: the core's message says which
            raise ValueError(f"Could not load the text encoder(s) of {self.source} quantized "
                             f"{ENCODER_PRESET.upper()}: {error} Uncheck “Quantize the text encoder too” to keep "
                             f"them in floating point.") from error
        return {name: getattr(pipe, name).to(self.device).eval() for name in mapping}

    def modules(self, name: str, quantize_encoder: bool) -> tuple[str, dict[str, torch.nn.Module]]:
        """(label, the components that replace the FP pipeline's) of a variant: its transformer, and for a quantized
        variant with `quantize_encoder` the W8A16 text encoders too. FP stays FP."""
        label, transformer = self.variant(name)
        if not quantize_encoder or name == VARIANTS[0]:
            return label, {"transformer": transformer}
        encoders = self.encoders()
        what = "text encoder" if len(encoders) == 1 else "text encoders"
        return f"{label} + {what} {ENCODER_PRESET.upper()}", {"transformer": transformer, **encoders}

    def tokenizers(self) -> dict:
        """This thread's own copies of the pipeline's tokenizers (made on its first request)."""
        if not hasattr(self.per_thread, "tokenizers"):
            self.per_thread.tokenizers = copy.deepcopy(self.tokenizer_originals)
        return self.per_thread.tokenizers

    def pipeline(self, modules: dict[str, torch.nn.Module]):
        """A fresh pipeline object for one request: shared modules (the FP pipeline's, with `modules` in place of
        theirs), its own scheduler and tokenizers."""
        components = {**self.fp.components, **self.tokenizers(), **modules,
                      "scheduler": copy.deepcopy(self.fp.scheduler)}
        pipe = type(self.fp)(**components)
        pipe.register_to_config(_name_or_path=self.source)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def call_kwargs(self, steps: int, guidance: float, negative_prompt: str) -> dict:
        accepted, config = self.accepted, self.fp.transformer.config
        call = {"num_inference_steps": steps, "guidance_scale": guidance}
        if negative_prompt.strip() and "negative_prompt" in accepted:
            call["negative_prompt"] = negative_prompt.strip()
        size = config.get("sample_size")
        if isinstance(size, int) and {"height", "width"} <= accepted:  # the model's native size
            call["height"] = call["width"] = size * self.fp.vae_scale_factor
        for key, value in (("use_resolution_binning", False), ("clean_caption", False),
                           ("video_length", config.get("video_length"))):
            if key in accepted and value is not None:
                call[key] = value
        return call

    def generate(self, prompt: str, negative_prompt: str, seed: int, steps: int, guidance: float,
                 quantize_encoder: bool = False) -> list[Result]:
        """FP, W8A8 and W4A8-MP from the same seed, each timed; fidelity of the quantized ones vs FP. With
        `quantize_encoder` the quantized ones run W8A16 text encoders too."""
        call = self.call_kwargs(steps, guidance, negative_prompt)
        reset_peak, read_peak = peak_tracker(self.device)
        results = []
        for name in VARIANTS:
            label, modules = self.modules(name, quantize_encoder)
            pipe = self.pipeline(modules)
            reset_peak()
            start = time.perf_counter()
            samples = generate(pipe, [prompt], [seed], **call)
            if self.device == "cuda":
                torch.cuda.synchronize()
            results.append(Result(name, label, samples.cpu(), time.perf_counter() - start, component_bytes(pipe),
                                  read_peak()))
        for result in results[1:]:
            scores = compare_samples(result.samples, results[0].samples)
            result.psnr, result.ssim = scores["psnr"], scores["ssim"]
        return results

    def calibrate(self, prompts: list[str], steps: int, guidance: float) -> str:
        """Record statistics once (cached on this pipeline) and rebuild W8A8 and W4A8-MP with them.

        Returns a message."""
        if self.shipped:
            return (f"{self.source} ships calibration statistics with its searched plan "
                    f"({os.path.dirname(self.shipped[0])}); W8A8 and W4A8-MP use them, nothing to calibrate.")
        if self.calibration is not None:
            return f"Already calibrated (cached for {self.source}); W8A8 and W4A8-MP use these statistics."
        call = self.call_kwargs(steps, guidance, "")
        call.pop("num_inference_steps"), call.pop("guidance_scale")
        # on a copy: calibration hooks every layer it observes, and the shared FP model must stay untouched
        stats = viditq_diffusers.calibrate(self.pipeline({"transformer": copy.deepcopy(self.fp.transformer)}), prompts,
                                           num_inference_steps=steps, guidance_scale=guidance,
                                           seeds=list(range(len(prompts))), **call)
        with self.lock:
            self.calibration = stats
            for name in VARIANTS[1:]:
                self.transformers.pop(name, None)  # rebuilt with the statistics on next use
        return (f"Calibrated {len(stats.layers)} layers of {stats.model_class} on {len(prompts)} prompts x {steps} "
                f"steps; cached for this pipeline. W8A8 and W4A8-MP now use channel balancing.")

    def quantized_pipeline(self, name: str, quantize_encoder: bool = False):
        """A quantized variant's pipeline (its text encoders W8A16 too with `quantize_encoder`), for save / push."""
        if name not in VARIANTS[1:]:
            raise ValueError(f"Pick a quantized variant to save or push ({' or '.join(VARIANTS[1:])}), got {name!r}.")
        return self.pipeline(self.modules(name, quantize_encoder)[1])

    def save(self, name: str, directory: str, quantize_encoder: bool = False) -> str:
        """Save a quantized variant's pipeline to `directory` (checked by `inputs.save_directory`)."""
        pipe = self.quantized_pipeline(name, quantize_encoder)
        try:
            viditq_diffusers.save_pretrained(pipe, directory)
        except OSError as error:  # a full disk, no permission: the user's to fix, so said on the page
            raise ValueError(f"Could not save to {directory}: {error}. Free space or pick another folder.") from error
        return (f"Saved the {name} pipeline{encoder_note(quantize_encoder)} to {directory} "
                f"(reload: DiffusionPipeline.from_pretrained({directory!r})).")

    def push(self, name: str, repo_id: str, token: str, quantize_encoder: bool = False) -> str:
        repo_id = (repo_id or "").strip()
        if not HUB_ID.match(repo_id):
            raise ValueError(f"Repo id {repo_id!r} is not of the form owner/name; type e.g. you/pixart-w8a8.")
        url = viditq_diffusers.push_to_hub(self.quantized_pipeline(name, quantize_encoder), repo_id,
                                           token=(token or "").strip() or None)
        return f"Pushed the {name} pipeline{encoder_note(quantize_encoder)} with its model card to {repo_id}: {url}"


def encoder_note(quantize_encoder: bool) -> str:
    return f" (text encoder {ENCODER_PRESET.upper()})" if quantize_encoder else ""


class ModelCache:
    """Pipelines by source, each loaded once (concurrent first requests wait for the same load)."""

    def __init__(self):
        self.pipelines: dict[str, LoadedPipeline] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.lock = threading.Lock()

    def get(self, source: str) -> LoadedPipeline:
        with self.lock:
            lock = self.locks.setdefault(source, threading.Lock())
        with lock:
            if source not in self.pipelines:
                self.pipelines[source] = LoadedPipeline(source)
            return self.pipelines[source]


CACHE = ModelCache()  # the app's one cache: every session shares these models
