"""A Gradio demo of ViDiT-Q: FP, W8A8 and W4A8-MP side by side (`python -m gradio_app`, `viditq demo --ui`).

Install with `pip install -e ".[gradio]"`. `variants.py` holds the model cache and variant logic (no Gradio),
`app.py` the UI. The core package (`viditq_diffusers`) never imports this one.
"""
