"""Checkpoint I/O: safetensors, the Hugging Face layout, Microsoft layouts, Orbax. Imports no model."""
