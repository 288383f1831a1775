"""Fine-tuning: data (JSON lines -> packed rows), step (loss, optimizer, jitted sharded step), checkpoint (Orbax),
lora (adapters merged on export), loop (the run behind `phi-jax finetune`)."""
