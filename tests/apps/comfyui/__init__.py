"""The ComfyUI tests' own helpers: the in-venv test runner and the tiny models of the other families (the code
that installs and starts ComfyUI is in harness/comfyui/)."""
