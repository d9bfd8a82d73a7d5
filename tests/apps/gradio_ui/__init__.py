"""Helpers for the Gradio app's tests (named gradio_ui so that it never shadows the gradio package)."""
