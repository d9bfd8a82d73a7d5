"""Save, model card and push to the Hugging Face Hub (through huggingface_hub).

Saving goes through diffusers' own `save_pretrained` (safetensors, sharding,
`config.json` with the plan); this module only makes it all-or-nothing (`atomic.atomic_folder`):
the whole checkpoint is written into a temporary sibling of the target folder and then swapped
with it in one step, so after a crash at any point the folder loads as the old checkpoint or
the new one, never a mix, and never with a stale shard of an older save.
"""

from __future__ import annotations

import functools
import inspect
import os
import tempfile

from huggingface_hub import HfApi, ModelCard, ModelCardData

from .atomic import atomic_folder
from .config import ViDiTQConfig
from .footprint import fp16_weight_bytes, weight_bytes
from .plan import summarize


def atomic_save(save, directory: str | os.PathLike, *, overwrite: bool = False, **kwargs) -> None:
    """Run `save(tmp_dir, **kwargs)` into a fresh temporary folder, then swap it with `directory` in one step.
    A non-empty `directory` that is not a diffusers checkpoint is refused (FileExistsError) unless `overwrite`;
    see `atomic` for what happens to extra files in a replaced checkpoint folder."""
    with atomic_folder(directory, overwrite=overwrite) as tmp:
        save(tmp, **kwargs)


def save_pretrained(obj, directory: str | os.PathLike, *, overwrite: bool = False, **kwargs) -> None:
    """Save a quantized model or pipeline all-or-nothing (diffusers layout, safetensors); `kwargs` go to its
    `save_pretrained` (`max_shard_size`, `variant`, ...)."""
    kwargs.setdefault("safe_serialization", True)
    atomic_save(obj.save_pretrained, directory, overwrite=overwrite, **kwargs)


def _with_overwrite(signature: inspect.Signature) -> inspect.Signature:
    """`signature` plus a keyword-only `overwrite=False` (before any **kwargs)."""
    parameters = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
    parameters.append(inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool))
    parameters += [p for p in signature.parameters.values() if p.kind == p.VAR_KEYWORD]
    return signature.replace(parameters=parameters)


def attach(model) -> None:
    """Give a quantized model an all-or-nothing `save_pretrained(directory, *, overwrite=False, **kwargs)` and a
    model-card `push_to_hub`."""
    save = functools.partial(atomic_save, functools.partial(type(model).save_pretrained, model))
    save.__signature__ = _with_overwrite(inspect.signature(model.save_pretrained))  # diffusers inspects it
    model.save_pretrained = save
    model.push_to_hub = functools.partial(push_to_hub, model)


def detach(model) -> None:
    """Undo `attach` (after `model.dequantize()`)."""
    for name in ("save_pretrained", "push_to_hub"):
        model.__dict__.pop(name, None)


def quantized_components(obj) -> dict:
    """{component name: model} for every ViDiT-Q model in a pipeline, or {"model": obj} for a model: those whose
    diffusers quantizer holds a `ViDiTQConfig`."""
    models = getattr(obj, "components", None) or {"model": obj}
    return {n: m for n, m in models.items()
            if isinstance(getattr(getattr(m, "hf_quantizer", None), "quantization_config", None), ViDiTQConfig)}


def model_card(obj, repo_id: str) -> ModelCard:
    """A model card: base model, method, bits per layer, weight memory before/after, how to load."""
    components = quantized_components(obj)
    if not components:
        raise ValueError("Nothing to describe: the object holds no ViDiT-Q quantized model. Quantize it first.")
    is_pipeline = hasattr(obj, "components")
    base = getattr(obj, "name_or_path", None) or next(iter(components.values())).config.get("_name_or_path", "")
    rows = []
    for name, model in components.items():
        plan = model.hf_quantizer.quantization_config.plan
        formats = ", ".join(f"{label}: {n}" for label, n in sorted(summarize(plan).items()))
        before, after = fp16_weight_bytes(model), weight_bytes(model)
        rows.append(
            f"| {name} | {type(model).__name__} | {len(plan['layers'])} ({formats}) | "
            f"{before / 2**20:.1f} MiB | {after / 2**20:.1f} MiB | {after / before:.3f}x |"
        )
    loader = "DiffusionPipeline" if is_pipeline else type(next(iter(components.values()))).__name__
    text = f"""---
{ModelCardData(library_name="diffusers", tags=["viditq", "quantized", "diffusion-transformer"]).to_yaml()}
---

# {repo_id}

A [ViDiT-Q](https://arxiv.org/abs/2406.02540) quantized checkpoint made with `viditq-diffusers`.

- Base model: `{base or "unknown"}`
- Method: ViDiT-Q W/A integer quantization: static per-output-channel (or per-group) min-max weights,
  dynamic per-token activations, integer GEMM; layers outside the transformer blocks stay in floating point.

| component | class | quantized layers (formats) | weights in FP16 | weights quantized | ratio |
|---|---|---|---|---|---|
{chr(10).join(rows)}

## How to load

```python
import viditq_diffusers  # registers the "viditq" quantizer with diffusers
from diffusers import {loader}

model = {loader}.from_pretrained("{repo_id}")
```
"""
    return ModelCard(text)


def push_to_hub(obj, repo_id: str, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload ViDiT-Q quantized checkpoint", endpoint: str | None = None) -> str:
    """Upload a quantized model or pipeline with its model card; returns the commit URL."""
    card = model_card(obj, repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, exist_ok=True, private=private)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(obj, folder)
        card.save(os.path.join(folder, "README.md"))
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return info.commit_url
