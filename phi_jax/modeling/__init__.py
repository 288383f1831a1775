"""The model: config in, logits out. Imports only phi_jax.config and phi_jax.kernels (and the entry-point mixins)."""
