"""Tier 3: the pack in a real ComfyUI 0.30.0 server (`main.py --cpu --listen 127.0.0.1`), driven over HTTP.

Workflow A (shipped, with test stand-ins, see harness/comfyui/workflows.py): load -> calibrate -> quantize
W8A8 and W4A8 -> KSampler -> SaveImage / SaveLatent next to the FP branch, and ViDiT-Q Save.
Workflow B (shipped): ViDiT-Q Load of A's files -> KSampler. Plus bad input, after which the server
must keep serving. ComfyUI comes from the `comfyui_install` fixture (tests/apps/conftest.py).
"""

import json
from pathlib import Path

import pytest
import torch

from harness.comfyui import comfy_env, server_home, workflows
from harness.comfyui.outputs import latent, psnr, succeeded
from harness.comfyui.server import ComfyServer, execution_error

pytestmark = pytest.mark.comfyui
REPO = comfy_env.REPO


def write_diffusers_plan(path: Path) -> None:
    """A valid plan for the *diffusers* PixArt class: the wrong family for ComfyUI's PixArtMS."""
    from diffusers import PixArtTransformer2DModel

    from viditq_diffusers import ViDiTQConfig
    from viditq_diffusers.plan import build_plan, plan_to_json

    model = PixArtTransformer2DModel.from_pretrained(REPO / "reference_models" / "pixart_digits" / "transformer")
    path.write_text(json.dumps(plan_to_json(build_plan(model, ViDiTQConfig(preset="w8a8")))))


def write_lora(path: Path) -> None:
    """A rank-4 LoRA in ComfyUI's generic `lora_unet_*` naming, on one quantized layer (blocks.0.mlp.fc2)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_blocks_0_mlp_fc2.lora_up.weight": torch.randn(128, 4, generator=gen) * 0.3,
               "lora_unet_blocks_0_mlp_fc2.lora_down.weight": torch.randn(4, 512, generator=gen) * 0.3,
               "lora_unet_blocks_0_mlp_fc2.alpha": torch.tensor(4.0)}, str(path))


@pytest.fixture(scope="module")
def server(comfyui_install, tmp_path_factory):
    base = server_home.prepare(tmp_path_factory.mktemp("comfyui_server"))
    corrupt = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" * 8
    (base / "models" / "diffusion_models" / "corrupt.safetensors").write_bytes(corrupt)
    write_diffusers_plan(base / "diffusers_plan.json")
    write_lora(base / "models" / "loras" / "tiny_lora.safetensors")
    srv = ComfyServer(base).start()
    try:
        yield srv
    finally:
        srv.stop()
        print(srv.log(3000))


@pytest.fixture(scope="module")
def workflow_a(server):
    return succeeded(server.run(workflows.with_stand_ins(workflows.shipped("pixart_calibrate_quantize_save_api.json"))))


def small_fp_workflow(model_name, seed, extra=None) -> dict:
    """Load -> (extra nodes) -> KSampler -> SaveLatent, on the FP reference; `extra` may rewire the model."""
    flow = workflows.with_stand_ins(workflows.shipped("pixart_load_quantized_api.json"), steps=3)
    flow["1"]["inputs"]["model_name"] = model_name
    flow["9"]["inputs"]["seed"] = seed
    for node_id in ("13", "14"):  # no image needed here
        del flow[node_id]
    flow.update(extra or {})
    return flow


def test_workflow_a_images_and_w8a8_psnr(server, workflow_a):
    for save_image in ("14", "17", "20"):
        assert workflow_a["outputs"][save_image]["images"], f"SaveImage {save_image} wrote no image"
    fp, w8, w4 = (latent(server, workflow_a, n) for n in ("15", "18", "21"))
    print(f"PSNR vs FP latent: W8A8 {psnr(fp, w8):.2f} dB, W4A8 {psnr(fp, w4):.2f} dB")
    assert psnr(fp, w8) >= 40
    assert psnr(fp, w4) >= 25
    assert not torch.equal(fp, w8)  # the quantized branch really ran quantized layers
    for name in ("pixart_w8a8_viditq", "pixart_w4a8_viditq"):
        assert (server.base_dir / "models" / "diffusion_models" / f"{name}.safetensors").is_file()


def test_fp_branch_is_untouched_by_quantize(server, workflow_a):
    """The FP branch of A equals the same FP model sampled alone (a copy of the file, so nothing is cached)."""
    alone = workflows.with_stand_ins(workflows.shipped("pixart_load_quantized_api.json"))
    alone["1"]["inputs"]["model_name"] = workflows.FP_COPY_FILE
    entry = succeeded(server.run(alone))
    assert torch.equal(latent(server, entry, "15"), latent(server, workflow_a, "15"))


@pytest.mark.parametrize("preset, a_latent", [("w8a8", "18"), ("w4a8", "21")])
def test_workflow_b_reload_is_bit_identical(server, workflow_a, preset, a_latent):
    flow = workflows.with_stand_ins(workflows.shipped("pixart_load_quantized_api.json"))
    flow["1"]["inputs"]["model_name"] = f"pixart_{preset}_viditq.safetensors"
    entry = succeeded(server.run(flow))
    assert entry["outputs"]["14"]["images"]
    assert torch.equal(latent(server, entry, "15"), latent(server, workflow_a, a_latent))


def quantize_node(**inputs) -> dict:
    return {"100": {"class_type": "ViDiTQQuantize", "inputs": {"model": ["1", 0], "preset": "w8a8", **inputs}}}


@pytest.mark.parametrize("case, message", [
    ("wrong_family_plan", "the plan was made for PixArtTransformer2DModel"),
    ("corrupt_file", "corrupt.safetensors is not a readable safetensors file"),
    ("missing_calibration", "connect a ViDiT-Q Calibrate node"),
])
def test_bad_input_is_named_and_server_keeps_serving(server, case, message, request):
    seed = request.node.callspec.indices["case"] + 1
    if case == "corrupt_file":
        bad = small_fp_workflow("corrupt.safetensors", seed)
    else:
        extra = quantize_node(plan_file=str(server.base_dir / "diffusers_plan.json")) if case == "wrong_family_plan" \
            else quantize_node(preset="smooth_w4a8")
        bad = small_fp_workflow(workflows.FP_FILE, seed, extra)
        bad["9"]["inputs"]["model"] = ["100", 0]
    error = execution_error(server.run(bad))
    assert error is not None and message in error["exception_message"], error
    succeeded(server.run(small_fp_workflow(workflows.FP_FILE, 100 + seed)))  # the next prompt is served


def test_shipped_ui_workflows_match_api_workflows(server):
    """The UI-format files are generated from the API-format ones (`python -m harness.comfyui.workflow_ui`)."""
    from harness.comfyui.workflow_ui import to_ui

    object_info = server.get("/object_info")
    for api in sorted(workflows.WORKFLOWS.glob("*_api.json")):
        ui = api.with_name(api.name.replace("_api.json", "_ui.json"))
        assert json.loads(ui.read_text()) == to_ui(json.loads(api.read_text()), object_info), f"regenerate {ui.name}"


def lora_node(model_input) -> dict:
    return {"101": {"class_type": "LoraLoaderModelOnly",
                    "inputs": {"model": model_input, "lora_name": "tiny_lora.safetensors", "strength_model": 1.0}}}


def test_stock_lora_loader_on_quantized_model_is_never_silently_dropped(server, workflow_a):
    """LoraLoader after ViDiT-Q Load: a clear error. LoraLoader before ViDiT-Q Quantize: the LoRA is quantized in."""
    after = small_fp_workflow("pixart_w8a8_viditq.safetensors", 7, lora_node(["1", 0]))
    after["9"]["inputs"]["model"] = ["101", 0]
    error = execution_error(server.run(after))
    assert error is not None and "Apply the LoRA to the floating-point MODEL" in error["exception_message"], error

    before = small_fp_workflow(workflows.FP_FILE, 7, {**lora_node(["1", 0]), **quantize_node(model=["101", 0])})
    before["9"]["inputs"]["model"] = ["100", 0]
    without = small_fp_workflow(workflows.FP_FILE, 7, quantize_node())
    without["9"]["inputs"]["model"] = ["100", 0]
    with_lora, without_lora = (latent(server, succeeded(server.run(flow)), "15") for flow in (before, without))
    assert not torch.equal(with_lora, without_lora)


@pytest.fixture(scope="module")
def lora_workflow(server):
    return succeeded(server.run(workflows.with_stand_ins(workflows.shipped("pixart_quantized_lora_api.json"))))


def test_viditq_lora_on_w8a8_follows_fp_with_stock_lora(server, lora_workflow):
    """Shipped LoRA workflow with the reference LoRA (mirrors the digit): calibrate -> W8A8 -> ViDiT-Q LoRA,
    next to FP -> stock LoraLoaderModelOnly and W8A8 without LoRA, on the same seed."""
    for save_image in ("15", "18", "21"):
        assert lora_workflow["outputs"][save_image]["images"], f"SaveImage {save_image} wrote no image"
    fp_lora, w8, w8_lora = (latent(server, lora_workflow, n) for n in ("16", "19", "22"))
    print(f"W8A8+LoRA vs FP+LoRA {psnr(fp_lora, w8_lora):.2f} dB; W8A8+LoRA vs W8A8 {psnr(w8, w8_lora):.2f} dB; "
          f"W8A8 vs FP+LoRA {psnr(fp_lora, w8):.2f} dB")
    assert psnr(w8, w8_lora) < 30  # the LoRA moves the latent far more than W8A8 does (measured 22.9 vs 54 dB)
    assert psnr(fp_lora, w8_lora) >= 40
