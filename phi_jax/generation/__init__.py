"""Generation: KV cache, samplers, prefill + compiled decode loop. Imports phi_jax.modeling, never the reverse."""
