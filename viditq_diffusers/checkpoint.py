"""Reading checkpoints from disk: load a model or pipeline directory, summarize a quantized one.

The summary is computed from `config.json` and the safetensors headers only, so
`viditq info` is instant even for large models and never materializes a tensor.

Both first finish a save that was killed between the two renames of the fallback swap (`atomic.recover_folder`
moves the old checkpoint back); the temporaries of killed saves are siblings of the folder, or hidden names
inside it, and neither diffusers nor the `*.safetensors` glob below reads them.
"""

from __future__ import annotations

import glob
import json
import os

import diffusers
from safetensors import SafetensorError, safe_open

from .atomic import recover_folder
from .plan import PLAN_VERSION, average_weight_bits, plan_from_json, summarize, summarize_recipes

FP16_BYTES = 2
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_any(src: str, **kwargs):
    """Load a diffusers pipeline directory (model_index.json) or model directory (config.json)."""
    recover_folder(src)
    if os.path.isfile(os.path.join(src, "model_index.json")):
        return diffusers.DiffusionPipeline.from_pretrained(src, **kwargs)
    config_path = os.path.join(src, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{src!r} is not a diffusers model or pipeline directory (no config.json or model_index.json there)."
        )
    class_name = read_json(config_path).get("_class_name")
    model_cls = getattr(diffusers, str(class_name), None)
    if model_cls is None:
        raise ValueError(f"{config_path} names model class {class_name!r}, which this diffusers does not have.")
    return model_cls.from_pretrained(src, **kwargs)


def tensor_headers(path: str) -> dict[str, tuple[str, list[int]]]:
    """{name: (dtype, shape)} from a safetensors header; a clear error for truncated/corrupt files."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path} is not a valid safetensors file ({error}); it is truncated or corrupt. "
            f"Re-download it or save the model again."
        ) from error


def component_summary(directory: str) -> dict | None:
    """Plan summary and weight bytes of one quantized model directory, or None if not ViDiT-Q."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        return None
    config = read_json(config_path)
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") != "viditq":
        return None
    plan_json = qconfig.get("plan") or {"version": PLAN_VERSION, "layers": {}}
    plan = plan_from_json(plan_json)
    stored = fp16 = 0
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        for key, (dtype, shape) in tensor_headers(path).items():
            numel = 1
            for dim in shape:
                numel *= dim
            stored += numel * DTYPE_BYTES.get(dtype, 4)
            layer, _, leaf = key.rpartition(".")
            if layer in plan["layers"]:
                spec = plan["layers"][layer]
                fp16 += spec.in_features * spec.out_features * FP16_BYTES if leaf == "qweight" else 0
                fp16 += numel * FP16_BYTES if leaf == "bias" else 0
            else:
                fp16 += numel * (FP16_BYTES if dtype.startswith(("F", "BF")) else DTYPE_BYTES.get(dtype, 4))
    return {
        "model_class": config.get("_class_name"),
        "num_quantized": len(plan["layers"]),
        "formats": summarize(plan),
        "average_weight_bits": average_weight_bits(plan),
        "recipes": summarize_recipes(plan),
        "weight_bytes": stored,
        "fp16_bytes": fp16,
        "layers": plan_json["layers"],
        "dtype": plan.get("dtype"),
    }


def checkpoint_summary(directory: str) -> dict[str, dict]:
    """{component: summary} for a quantized model or pipeline directory."""
    recover_folder(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a directory.")
    if os.path.isfile(os.path.join(directory, "model_index.json")):
        names = [n for n in read_json(os.path.join(directory, "model_index.json")) if not n.startswith("_")]
        found = {n: component_summary(os.path.join(directory, n)) for n in names}
    else:
        found = {"model": component_summary(directory)}
    found = {n: s for n, s in found.items() if s is not None}
    if not found:
        raise ValueError(
            f"{directory!r} holds no ViDiT-Q quantized model (no quantization_config with quant_method 'viditq' "
            f"in its config.json). Quantize it first: viditq quantize {directory} --preset w8a8 --out DST"
        )
    return found
