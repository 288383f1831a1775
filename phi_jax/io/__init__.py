"""Checkpoint I/O; imports no model, no loading, no command.

sources.py      open_source(dir): any supported directory as named tensors (HF names and layout) + its config
plan.py         check_config (config vs tensors, before any model is built) and plan (keys, shapes, heads)
atomic.py       atomic_output_dir: build beside, swap in; the one scheme for conversion and save_pretrained
hf.py           Hugging Face weight files (single, sharded, .bin), read as transformers picks them
safetensors.py  streaming safetensors reader and sharded writer
legacy.py       Microsoft's original layouts and config keys
orbax.py        phi_jax's Orbax directory (chunked writer, tensor reader)
names.py        the one name table to transformers' keys; buffers skipped by name
tokenizer.py    read_tokenizer: tokenizer.json (tokenizers library), truncation and padding off
"""
