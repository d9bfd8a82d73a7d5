"""The Gradio app as a process, for its tests and benchmarks/gradio_app.py (named gradio_ui so that it never
shadows the gradio package)."""
