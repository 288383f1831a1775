"""Errors shared across layers (imports nothing from phi_jax, so any module may raise them)."""

from __future__ import annotations


class MissingExtraError(ImportError):
    """An optional dependency (torch / transformers) is not installed; the message names the extra to install.
    The command line maps it to exit status 6."""
