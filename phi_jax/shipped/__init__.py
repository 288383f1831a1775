"""The small code model that ships with phi_jax (trained by recipes/tiny_code.py); see `phi_jax.shipped.paths`."""
