"""Rematerialisation policies for the decoder layers: JAX's `jax.checkpoint_policies` by name, plus one of ours.

`dots_and_attention_saveable` saves what `dots_with_no_batch_dims_saveable` saves (every projection's output) and
the fused attention's residuals (its output and softmax statistics, and the inputs it keeps), named
`ATTENTION_RESIDUALS` by the attention module for the `cudnn`, `pallas` and `auto` implementations. The backward pass
then reruns no attention forward kernel. JAX's dot-saving policies keep no fused attention (it is no dot), so under
them the backward runs the attention forward again (the forward is about 1/3.5 of the attention's forward+backward
work; `everything_saveable` keeps it, and every other activation with it). A policy keyed
on primitive names does not reach it reliably either: the Mosaic GPU kernel sits inside a `custom_vmap_call`, and
saving that call's outputs did not stop the recomputation (tried 2026-11-27), so the residuals carry a name.
The `xla` implementation's residuals are its score-sized probabilities: not named, so recomputed as before (but
`auto` on the CPU is the xla path inside the named wrapper: there the policy keeps them too).
"""

from __future__ import annotations

import jax

ATTENTION_RESIDUALS = "phi_jax_attention_residuals"

POLICIES = {
    "dots_and_attention_saveable": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(ATTENTION_RESIDUALS)),
}


def remat_policy(name: str):
    """The policy called `name`: one of `POLICIES` or a `jax.checkpoint_policies` member; else a ValueError."""
    if name in POLICIES:
        return POLICIES[name]
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None or name.startswith("_"):
        raise ValueError(f"remat policy {name!r} is neither one of phi_jax's ({', '.join(POLICIES)}) nor a "
                         f"jax.checkpoint_policies member")
    return policy
