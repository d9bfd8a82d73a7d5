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
from .text_encoders import is_text_encoder

FP16_BYTES = 2
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_any(src: str, **kwargs):
    """Load a diffusers pipeline directory (model_index.json) or model directory (config.json).

    Before diffusers reads anything, the files are checked (`check_model_directory`), so a truncated file or a
    quantized checkpoint without its quantization_config fails with a message that names the file."""
    recover_folder(src)
    config = kwargs.get("quantization_config")
    if os.path.isfile(os.path.join(src, "model_index.json")):
        components = check_components(src, config)
        for name in components:
            if os.path.isfile(os.path.join(src, name, "config.json")):
                check_model_directory(os.path.join(src, name), quantizing=config is not None and name in
                                      getattr(config, "components", ()))
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
    check_model_directory(src, quantizing=config is not None)
    return model_cls.from_pretrained(src, **kwargs)


def check_components(src: str, config) -> list[str]:
    """The component names of the pipeline at `src`; a ValueError when a ViDiT-Q config's `components` names one
    that is not among its diffusers models (diffusers itself only logs that and loads nothing quantized)."""
    index = read_json(os.path.join(src, "model_index.json"))
    problem = unknown_components(index, config, f"the pipeline at {src!r}")
    if problem:
        raise ValueError(problem)
    return [n for n in index if not n.startswith("_")]


def unknown_components(index: dict, config, where: str) -> str | None:
    """The error message when a ViDiT-Q config's `components` names something that is not a diffusers model of a
    pipeline whose model_index (name -> [library, class]) is `index`; None when all are, or for other configs."""
    wanted = getattr(config, "components", None)
    if wanted is None or getattr(config, "quant_method", None) != "viditq":
        return None
    names = [n for n in index if not n.startswith("_")]
    models = [n for n in names if is_diffusers_model(index[n]) or is_supported_text_encoder(index[n])]
    unknown = [c for c in wanted if c not in models]
    if not unknown:
        return None
    return (f"components={wanted} names {unknown}, which {'is' if len(unknown) == 1 else 'are'} not a diffusers "
            f"model or a supported text encoder of {where} (the ones it has: {', '.join(models)}; all components: "
            f"{', '.join(names)}). Pass e.g. components=['transformer'].")


def is_supported_text_encoder(entry) -> bool:
    """Whether a model_index.json entry is a transformers text encoder ViDiT-Q quantizes (`text_encoders.py`)."""
    return (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] == "transformers"
            and is_text_encoder(str(entry[1])))


def is_diffusers_model(entry) -> bool:
    """Whether a model_index.json entry (`["diffusers", "PixArtTransformer2DModel"]`) is a diffusers model."""
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] == "diffusers"):
        return False
    cls = getattr(diffusers, str(entry[1]), None)
    return isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)


def check_model_directory(directory: str, quantizing: bool = False) -> None:
    """Read every safetensors header of a model directory (a truncated or corrupt file is named with our message,
    not diffusers' generic one) and refuse ViDiT-Q quantized weights whose config.json lost its
    quantization_config (diffusers would advise `ignore_mismatched_sizes=True`, which loads garbage)."""
    qconfig = read_json(os.path.join(directory, "config.json")).get("quantization_config")
    quantized = quantized_weight_file(directory)
    if quantized and not (isinstance(qconfig, dict) and qconfig.get("quant_method") == "viditq"):
        raise ValueError(missing_config_message(directory, *quantized, quantizing))


def quantized_weight_file(directory: str) -> tuple[str, str] | None:
    """`(file, reason)` for the first safetensors file in `directory` that holds ViDiT-Q quantized weights (by its
    metadata or its `.qweight` tensors), else None. Every header is read, so a truncated file fails here."""
    found = None
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        headers, metadata = tensor_headers(path), safetensors_metadata(path)
        codes = [k for k in headers if k.endswith(".qweight")]
        if found is None and ("viditq_format" in metadata or codes):
            found = (path, f"tensor {codes[0]!r}" if codes else "viditq_format metadata")
    return found


def missing_config_message(directory: str, path: str, reason: str, quantizing: bool = False) -> str:
    also = " (quantizing it again with a ViDiTQConfig would re-round integer codes)" if quantizing else ""
    return (f"{directory!r} holds ViDiT-Q quantized weights ({os.path.basename(path)}: {reason}), but its "
            f"config.json has no 'quantization_config' with quant_method 'viditq', so the quantized layers cannot be "
            f"rebuilt{also}. Restore the config.json saved with these weights. Do not load it with "
            f"ignore_mismatched_sizes=True: the quantized layers would keep uninitialized weights and the model "
            f"would output garbage (NaN).")


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


def safetensors_metadata(path: str) -> dict[str, str]:
    """The string metadata of a safetensors file's header (a clear error for truncated/corrupt files)."""
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
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
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "viditq":
        quantized = quantized_weight_file(directory)
        if quantized:
            raise ValueError(missing_config_message(directory, *quantized))
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
