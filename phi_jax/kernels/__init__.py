"""Attention kernels (Pallas Mosaic GPU, Mosaic TPU), each with its plain-JAX reference."""
