"""The ComfyUI pack on a real ComfyUI 0.30.0 server (CPU): fidelity, reload and time of the shipped workflows.

Starts `main.py --cpu --listen 127.0.0.1 --cache-none` (every prompt re-runs every node) with the pack in
`custom_nodes`, in a temporary base directory filled like the tier-3 tests' (harness/comfyui/server_home.py:
the trained reference PixArt in ComfyUI's layout, the reference LoRA), and posts the shipped API
workflows with the tests' stand-ins for the text encoder and VAE (harness/comfyui/workflows.py):
- workflow A (`pixart_calibrate_quantize_save_api.json`): calibrate -> quantize W8A8 and W4A8 -> KSampler,
  next to the FP branch; ViDiT-Q Save of both;
- the LoRA workflow (`pixart_quantized_lora_api.json`): W8A8 + ViDiT-Q LoRA next to FP + stock
  LoraLoaderModelOnly, with the reference LoRA (reference_models/pixart_digits_lora);
- workflow B (`pixart_load_quantized_api.json`): load one file -> KSampler, once per row of the table
  (the LoRA rows with the LoRA node between load and sampler).
PSNR is of the latents against the FP branch of the same graph (same seed); "bit-identical reload": B's
latent equals the in-graph latent of A (or of the LoRA workflow). Seconds: ComfyUI's own start-to-success
time of that row's B prompt (load, sample, decode, save). ComfyUI is not installed by this script:

    python harness/comfyui/install_comfyui.py      # once
    OMP_NUM_THREADS=1 python -m benchmarks.comfyui [--steps 12] [--calibration-steps 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from harness.comfyui import install_comfyui, server_home, workflows
from harness.comfyui.outputs import latent, psnr, succeeded
from harness.comfyui.server import ComfyServer


def seconds(entry: dict) -> float:
    """Start-to-success time of a prompt, from the timestamps ComfyUI puts in its history messages."""
    stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000


def reload_flow(model_name: str, lora_node: str | None, steps: int) -> dict:
    """Workflow B on `model_name`, optionally with a LoRA node (the reference LoRA) before the KSampler."""
    flow = workflows.with_stand_ins(workflows.shipped("pixart_load_quantized_api.json"), steps=steps)
    flow["1"]["inputs"]["model_name"] = model_name
    if lora_node:
        flow["100"] = {"class_type": lora_node,
                       "inputs": {"model": ["1", 0], "lora_name": workflows.LORA_FILE, "strength_model": 1.0}}
        flow["9"]["inputs"]["model"] = ["100", 0]
    return flow


def run(server: ComfyServer, steps: int, calibration_steps: int) -> tuple[list[tuple], str]:
    """The table's rows, and a line on the two whole graphs."""
    def graph(name):
        flow = workflows.with_stand_ins(workflows.shipped(name), steps=steps, calibration_steps=calibration_steps)
        return succeeded(server.run(flow))

    a, lora = graph("pixart_calibrate_quantize_save_api.json"), graph("pixart_quantized_lora_api.json")
    fp, fp_lora = latent(server, a, "15"), latent(server, lora, "16")
    rows = []
    for variant, file, lora_node, ref, in_graph in [
        ("FP32", workflows.FP_COPY_FILE, None, fp, None),
        ("W8A8 (calibrated)", "pixart_w8a8_viditq.safetensors", None, fp, latent(server, a, "18")),
        ("W4A8 (calibrated)", "pixart_w4a8_viditq.safetensors", None, fp, latent(server, a, "21")),
        ("FP32 + LoRA (stock LoraLoaderModelOnly)", workflows.FP_COPY_FILE, "LoraLoaderModelOnly", fp_lora, None),
        ("W8A8 + LoRA (ViDiT-Q LoRA), vs FP32 + LoRA", "pixart_w8a8_viditq.safetensors", "ViDiTQLora", fp_lora,
         latent(server, lora, "22")),
    ]:
        entry = succeeded(server.run(reload_flow(file, lora_node, steps)))
        out = latent(server, entry, "15")
        identical = "-" if in_graph is None else ("yes" if torch.equal(out, in_graph) else "NO")
        rows.append((variant, "-" if in_graph is None else f"{psnr(ref, in_graph):.2f}", identical,
                     f"{seconds(entry):.1f}"))
    effect = psnr(latent(server, lora, "19"), latent(server, lora, "22"))
    return rows, (f"Whole graphs: workflow A {seconds(a):.1f} s, LoRA workflow {seconds(lora):.1f} s. The LoRA's "
                  f"effect: W8A8 + LoRA vs W8A8 {effect:.2f} dB.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="KSampler steps (the tests' 12)")
    parser.add_argument("--calibration-steps", type=int, default=6, help="ViDiT-Q Calibrate steps (the tests' 6)")
    args = parser.parse_args()
    if not install_comfyui.is_installed():
        sys.exit(f"real ComfyUI 0.30.0 is not installed at {install_comfyui.home()}: run "
                 f"`python harness/comfyui/install_comfyui.py` first (this benchmark installs nothing).")
    with tempfile.TemporaryDirectory(prefix="viditq-comfyui-bench-") as tmp:
        server = ComfyServer(server_home.prepare(Path(tmp)), extra_args=("--cache-none",)).start()
        try:
            rows, summary = run(server, args.steps, args.calibration_steps)
        finally:
            server.stop()
    print(f"\nComfyUI 0.30.0, `main.py --cpu --cache-none`, reference PixArt ({workflows.LATENT_PX} px, "
          f"{args.steps} steps, calibration {args.calibration_steps} steps)\n")
    print("| variant | latent PSNR vs FP (dB) | bit-identical reload | seconds |")
    print("|---|---:|---|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{summary}")


if __name__ == "__main__":
    main()
