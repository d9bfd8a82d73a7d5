"""Real ComfyUI 0.30.0 for the tests and benchmarks/comfyui.py: its install, its venv, its server."""
