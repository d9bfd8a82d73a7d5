"""The ViDiT-Q nodes (ComfyUI V3 schema, `comfy_api.latest`). Thin: the work is in the other modules."""

from __future__ import annotations

import json
import os

import comfy.samplers
import folder_paths
from comfy_api.latest import ComfyExtension, io

from viditq_diffusers.config import PRESETS, ViDiTQConfig

from . import file_format
from .calibration_run import calibrate_model
from .loader import build_model
from .patching import apply_lora, loaded_tree, plan_of, quantize_model

Calibration = io.Custom("VIDITQ_CALIBRATION")
CATEGORY = "ViDiT-Q"


class Calibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ViDiTQCalibrate", display_name="ViDiT-Q Calibrate", category=CATEGORY,
            description="Runs ComfyUI's sampler on the floating-point MODEL with observers on the linear "
                        "inputs and records per-timestep activation statistics for ViDiT-Q.",
            is_input_list=True,  # several positive / negative conditionings = several calibration samples
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS),
            ],
            outputs=[Calibration.Output(display_name="calibration")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler):
        stats = calibrate_model(model[0], positive, negative, latent_image[0], seed[0], steps[0], cfg[0],
                                sampler_name[0], scheduler[0])
        return io.NodeOutput(stats)


class Quantize(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ViDiTQQuantize", display_name="ViDiT-Q Quantize", category=CATEGORY,
            description="Returns a ViDiT-Q quantized copy of MODEL (the input MODEL is left as it was). "
                        "With calibration, each layer's channel balancing is searched on the statistics.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("preset", options=list(PRESETS), default="w8a8"),
                Calibration.Input("calibration", optional=True),
                io.String.Input("plan_file", default="", optional=True,
                                tooltip="A plan JSON (e.g. from `viditq search`); when set it decides every layer."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, preset, calibration=None, plan_file=""):
        plan = None
        if plan_file:
            if not os.path.isfile(plan_file):
                raise ValueError(f"plan_file {plan_file!r} does not exist.")
            with open(plan_file) as f:
                plan = json.load(f)
        try:
            config = ViDiTQConfig(preset=preset, calibration=calibration, plan=plan)
        except ValueError as e:
            raise ValueError(f"{e} In ComfyUI: connect a ViDiT-Q Calibrate node to 'calibration'.") from None
        return io.NodeOutput(quantize_model(model, config))


class Save(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ViDiTQSave", display_name="ViDiT-Q Save", category=CATEGORY, is_output_node=True,
            description="Saves a ViDiT-Q quantized MODEL to models/diffusion_models as one safetensors file "
                        "(plan, model class and unet_config in its metadata).",
            inputs=[io.Model.Input("model"), io.String.Input("filename", default="viditq_model")],
            outputs=[],
        )

    @classmethod
    def execute(cls, model, filename):
        plan = plan_of(model)
        if plan is None:
            raise ValueError("ViDiT-Q Save takes a quantized MODEL (from ViDiT-Q Quantize or ViDiT-Q Load).")
        name = os.path.basename(filename).removesuffix(".safetensors") + ".safetensors"
        # [models/unet (legacy), models/diffusion_models, ...]
        folders = folder_paths.get_folder_paths("diffusion_models")
        folder = next((f for f in folders if os.path.basename(f) == "diffusion_models"), folders[0])
        os.makedirs(folder, exist_ok=True)
        tensors = loaded_tree(model).state_dict()
        file_format.save(os.path.join(folder, name), tensors, file_format.describe(model.model, plan))
        return io.NodeOutput(ui={"text": [name]})


class Load(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ViDiTQLoad", display_name="ViDiT-Q Load", category=CATEGORY,
            description="Loads a file written by ViDiT-Q Save; the quantized layers are built from their "
                        "integer weights, with no floating-point copy.",
            inputs=[io.Combo.Input("model_name", options=folder_paths.get_filename_list("diffusion_models"))],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model_name):
        path = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        meta, tensors = file_format.read(path)  # its errors name the file
        try:
            return io.NodeOutput(build_model(meta, tensors))
        except ValueError as e:
            raise ValueError(f"{model_name}: {e}") from None


class Lora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ViDiTQLora", display_name="ViDiT-Q LoRA", category=CATEGORY,
            description="Applies a LoRA to a ViDiT-Q quantized MODEL: each quantized layer it targets gets a "
                        "floating-point low-rank branch added to its integer output (other layers: an ordinary "
                        "weight patch). Returns a copy; the input MODEL is left as it was.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras")),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, lora_name, strength_model):
        if strength_model == 0:
            return io.NodeOutput(model)
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        return io.NodeOutput(apply_lora(model, path, strength_model))


class ViDiTQExtension(ComfyExtension):
    async def get_node_list(self):
        return [Calibrate, Quantize, Save, Load, Lora]


async def comfy_entrypoint() -> ViDiTQExtension:
    return ViDiTQExtension()
