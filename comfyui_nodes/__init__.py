"""ViDiT-Q nodes for ComfyUI: calibrate, quantize, save and load W8A8 / W4A8 diffusion transformers.

The import guard keeps this package importable outside ComfyUI (tests, linters, the registry's
scanner): the nodes and ComfyUI's `comfy_entrypoint` exist only when ComfyUI's `comfy_api` does.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("comfy") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401  (ComfyUI looks this name up on the package)
