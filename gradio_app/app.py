"""The Gradio UI: FP / W8A8 / W4A8-MP side by side, calibrate, save and push. Logic lives in `variants.py`.

    python -m gradio_app [--host 127.0.0.1] [--port 7860] [--threads N] [--output-dir viditq-out]
                         [--quantize-text-encoder]                        (or: viditq demo --ui)

`--host` / `--port` default to Gradio's `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT` when those are set.

The page is served first; torch, the core and the default pipeline load right after, in the background
(`variants` is imported on first use), and a request that comes earlier waits for them.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from a local demo

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from . import inputs  # noqa: E402
from .choices import (BUNDLED, CALIBRATION_PROMPTS, CUSTOM, DEFAULT_SAVE_ROOT, DEFAULT_SOURCE,  # noqa: E402
                      ENCODER_CHECKBOX, ENCODER_PRESET, MAX_CALIBRATION_PROMPTS, MAX_CALIBRATION_STEPS, STEPS_RANGE,
                      VARIANTS)

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860  # unless --host / --port or GRADIO_SERVER_NAME / _PORT say otherwise
DISPLAY_PX = 256  # the bundled pipelines make 32x32 samples: shown enlarged, pixels kept sharp
OUTPUT_DIR = tempfile.mkdtemp(prefix="viditq-gradio-")  # the GIFs of video results
atexit.register(shutil.rmtree, OUTPUT_DIR, True)
OUTPUT_MAX_AGE_S = 3600  # Gradio copies what a handler returns into its own cache; an hour-old GIF is long served


TORCH_THREADS: int | None = None  # --threads


def logic():
    """The variants module (torch, the core, the model cache), imported on first use."""
    from . import variants

    if TORCH_THREADS and variants.torch.get_num_threads() != TORCH_THREADS:
        variants.torch.set_num_threads(TORCH_THREADS)
    return variants


def user_error(fn):
    """Run a handler; a ValueError / FileNotFoundError (bad input, explained by variants.py) becomes gr.Error."""
    @functools.wraps(fn)  # keeps the signature: Gradio finds gr.Progress parameters there
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as error:
            raise gr.Error(str(error), print_exception=False) from error
    return wrapped


def to_display(samples) -> Image.Image | str:
    """A PIL image for `[1, C, H, W]`; the path of a looping GIF for a video `[1, F, C, H, W]`."""
    pixels = samples[0].clamp(-1, 1).add(1).mul(127.5).round().byte()
    frames = pixels if pixels.ndim == 4 else pixels[None]
    images = []
    for frame in frames.permute(0, 2, 3, 1).numpy():
        image = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
        scale = max(1, DISPLAY_PX // max(image.size))
        images.append(image.resize((image.width * scale, image.height * scale), Image.NEAREST))
    if len(images) == 1 and pixels.ndim == 3:
        return images[0]
    prune_outputs()
    fd, path = tempfile.mkstemp(suffix=".gif", dir=OUTPUT_DIR)  # a fresh name nobody reads until we return it
    with os.fdopen(fd, "wb") as f:
        images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=150, loop=0)
    return path


def prune_outputs(max_age_s: float = OUTPUT_MAX_AGE_S) -> None:
    """Delete the GIFs older than `max_age_s` (a long-running demo would otherwise fill the temp folder)."""
    cutoff = time.time() - max_age_s
    for entry in os.scandir(OUTPUT_DIR):
        if entry.stat().st_mtime < cutoff:
            os.remove(entry.path)


def metrics_markdown(result, fp) -> str:
    """A variant's `variants.Result` as a table; `fp` is the FP result of the same request."""
    mib = 2**20
    parts = " · ".join(f"{name} {size / mib:.2f}" for name, size in  # the denoiser first
                       sorted(result.component_bytes.items(), key=lambda item: item[0] != "transformer"))
    rows = [("latency", f"{result.latency_s:.2f} s"),
            ("weights (whole pipeline)", f"{result.weight_bytes / mib:.2f} MiB"
             + ("" if result is fp else f" ({result.weight_bytes / fp.weight_bytes:.2f}x FP)")),
            ("weights by component", f"{parts} MiB"),
            ("peak memory", "n/a" if result.peak_bytes is None else
             f"{result.peak_bytes / mib:.0f} MiB ({logic().peak_memory_kind()})"),
            ("PSNR vs FP", "reference" if result.psnr is None else f"{result.psnr:.2f} dB"),
            ("SSIM vs FP", "reference" if result.ssim is None else f"{result.ssim:.4f}")]
    return f"**{result.label}**\n\n| metric | value |\n|---|---:|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


@user_error
def run_generate(choice, custom, prompt, negative_prompt, seed, steps, guidance, quantize_encoder=False):
    prompt, steps, guidance, seed = inputs.generation(prompt, steps, guidance, seed)
    variants = logic()
    source = variants.resolve_source(choice, custom)
    start = time.perf_counter()
    negative_prompt = negative_prompt if isinstance(negative_prompt, str) else ""
    results = variants.CACHE.get(source).generate(prompt, negative_prompt, seed, steps, guidance,
                                                  quantize_encoder=bool(quantize_encoder))
    outputs = []
    for result in results:
        outputs += [gr.Image(value=to_display(result.samples), label=result.label),
                    metrics_markdown(result, results[0])]
    status = (f"Generated “{prompt}” (seed {seed}, {steps} steps, guidance {guidance:g}) with "
              f"{choice if choice in BUNDLED else source}: "
              f"three variants in {time.perf_counter() - start:.1f} s"
              + (f", the quantized ones with a {ENCODER_PRESET.upper()} text encoder." if quantize_encoder else "."))
    return [status] + outputs


@user_error
def run_calibrate(choice, custom, prompts, steps, guidance, progress=gr.Progress(track_tqdm=True)):
    prompts, steps, guidance = inputs.calibration(prompts, steps, guidance)  # before any pipeline loads
    variants = logic()
    progress(0, desc="loading the pipeline")
    return variants.CACHE.get(variants.resolve_source(choice, custom)).calibrate(prompts, steps, guidance)


@user_error
def run_save(choice, custom, variant, directory, quantize_encoder=False, output_dir=DEFAULT_SAVE_ROOT):
    """Save under `output_dir` only (build_app binds it from --output-dir)."""
    directory = inputs.save_directory(output_dir, directory)
    return logic().CACHE.get(logic().resolve_source(choice, custom)).save(variant, directory, bool(quantize_encoder))


@user_error
def run_push(choice, custom, variant, repo_id, token, quantize_encoder=False):
    return logic().CACHE.get(logic().resolve_source(choice, custom)).push(variant, repo_id, token,
                                                                          bool(quantize_encoder))


def build_app(concurrency: int = 1, output_dir: str = DEFAULT_SAVE_ROOT, quantize_encoder: bool = False) -> gr.Blocks:
    output_dir = os.path.realpath(output_dir)
    # delete_cache: Gradio's copies of the results go after an hour too, checked every ten minutes
    with gr.Blocks(title="ViDiT-Q: FP vs W8A8 vs W4A8-MP", delete_cache=(600, OUTPUT_MAX_AGE_S)) as demo:
        gr.Markdown("# ViDiT-Q quantization: FP vs W8A8 vs W4A8-MP\nThe same prompt and seed through the "
                    "floating-point pipeline and two with a quantized transformer (their text encoder too when the "
                    "box is checked; the VAE stays FP). Weights count the whole pipeline.")
        with gr.Row():
            with gr.Column(scale=1):
                choice = gr.Radio([*BUNDLED, CUSTOM], value=DEFAULT_SOURCE, label="Pipeline")
                custom = gr.Textbox(label="Local directory or Hub id", elem_id="custom-source",
                                    placeholder="path/to/pipeline or owner/name",
                                    info=f"used when the pipeline is “{CUSTOM}”")
                encoder = gr.Checkbox(value=quantize_encoder, label=ENCODER_CHECKBOX, elem_id="quantize-text-encoder",
                                      info="W8A8 and W4A8-MP load the text encoder(s) with int8 weights too; "
                                           "FP stays FP. Also what Save and Push write.")
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", value="a thick handwritten digit 7")
                negative = gr.Textbox(label="Negative prompt")
                with gr.Row():
                    # no precision: Gradio would round (2.5 -> 2) or fail on inf before inputs.py sees them
                    seed = gr.Number(label="Seed", value=0)
                    steps = gr.Number(label=f"Steps ({STEPS_RANGE[0]}-{STEPS_RANGE[1]})", value=20)
                    guidance = gr.Number(label="Guidance", value=4.5)
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown(elem_id="status")
        outputs = []
        with gr.Row():
            for name in VARIANTS:
                with gr.Column():
                    outputs += [gr.Image(label=name, elem_id=f"image-{name}", interactive=False, format="png"),
                                gr.Markdown(elem_id=f"metrics-{name}")]
        with gr.Accordion("Calibrate (pipelines without shipped statistics)", open=False):
            calib_prompts = gr.Textbox(label=f"Calibration prompts (one per line, at most {MAX_CALIBRATION_PROMPTS}; "
                                             f"prompts x steps at most {MAX_CALIBRATION_STEPS})",
                                       lines=5, value="\n".join(CALIBRATION_PROMPTS))
            calibrate = gr.Button("Calibrate", elem_id="calibrate")
            calib_status = gr.Markdown(elem_id="calibrate-status")
        with gr.Accordion("Save or push a quantized variant", open=False):
            variant = gr.Radio(list(VARIANTS[1:]), value=VARIANTS[1], label="Variant")
            with gr.Row():
                directory = gr.Textbox(label="Directory", placeholder="pixart-w8a8", elem_id="save-directory",
                                       info=f"a folder inside {output_dir} (the app saves nowhere else: --output-dir)")
                save = gr.Button("Save", elem_id="save")
            with gr.Row():
                repo_id = gr.Textbox(label="Hub repo id", placeholder="you/pixart-w8a8")
                token = gr.Textbox(label="Hub token", type="password", placeholder="hf_... (default: your login)")
                push = gr.Button("Push to Hub", elem_id="push")
            store_status = gr.Markdown(elem_id="store-status")
        # One queue for everything that runs models, so calibration never competes with a timed generation
        # (peak memory is per process on CPU) and shared models are built by one request at a time.
        queue = dict(concurrency_id="models", concurrency_limit=concurrency)
        generate.click(run_generate, [choice, custom, prompt, negative, seed, steps, guidance, encoder],
                       [status, *outputs], api_name="generate", **queue)
        calibrate.click(run_calibrate, [choice, custom, calib_prompts, steps, guidance], calib_status,
                        api_name="calibrate", **queue)
        save.click(functools.partial(run_save, output_dir=output_dir), [choice, custom, variant, directory, encoder],
                   store_status, api_name="save", **queue)
        push.click(run_push, [choice, custom, variant, repo_id, token, encoder], store_status, api_name="push",
                   **queue)
    return demo.queue()


def parse_args(argv: list[str] | None = None, environ: Mapping[str, str] = os.environ) -> argparse.Namespace:
    """The command line. Without `--host` / `--port`, Gradio's own `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT`
    (set by Hugging Face Spaces and container images) decide, then 127.0.0.1:7860."""
    host = environ.get("GRADIO_SERVER_NAME") or DEFAULT_HOST
    port = environ.get("GRADIO_SERVER_PORT") or str(DEFAULT_PORT)
    if not port.isdigit():
        raise SystemExit(f"GRADIO_SERVER_PORT={port!r} is not a port number; set a number (e.g. 7860) or pass --port.")
    parser = argparse.ArgumentParser(prog="python -m gradio_app", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=host, help=f"default: $GRADIO_SERVER_NAME, else {DEFAULT_HOST}")
    parser.add_argument("--port", type=int, default=int(port),
                        help=f"default: $GRADIO_SERVER_PORT, else {DEFAULT_PORT}")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests that run models at the same time "
                        "(more than 1 mixes the peak memory readings on CPU)")
    parser.add_argument("--no-preload", action="store_true", help="load the default pipeline on first request")
    parser.add_argument("--quantize-text-encoder", action="store_true", help="check “" + ENCODER_CHECKBOX + "” "
                        "at start: the quantized variants load their text encoders W8A16 too (preloaded)")
    parser.add_argument("--output-dir", default=DEFAULT_SAVE_ROOT, help="the one folder Save writes into (default: "
                        f"./{DEFAULT_SAVE_ROOT}, created on the first save); paths typed in the app stay inside it")
    args = parser.parse_args(argv)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output-dir {args.output_dir} is a file; give a folder (it is created if missing)")
    if args.concurrency < 1:
        parser.error(f"--concurrency must be at least 1, got {args.concurrency}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    global TORCH_THREADS
    TORCH_THREADS = args.threads
    demo = build_app(args.concurrency, args.output_dir, args.quantize_text_encoder)
    demo.launch(server_name=args.host, server_port=args.port, show_error=True, prevent_thread_lock=True,
                allowed_paths=[OUTPUT_DIR])
    print(f"serving on http://{args.host}:{args.port}", flush=True)
    def preload():  # while the page is already up: the C++ CPU kernels, then the default pipeline and its variants
        logic().warmup_kernels()  # built once per machine (about a minute, with a message), then loaded
        if args.no_preload:
            return
        loaded = logic().CACHE.get(BUNDLED[DEFAULT_SOURCE])
        for name in VARIANTS:
            loaded.modules(name, args.quantize_text_encoder)
        print("models ready", flush=True)
    threading.Thread(target=preload, name="preload", daemon=True).start()
    demo.block_thread()
