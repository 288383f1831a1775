"""Review of the four model classes against transformers' PyTorch Phi on tiny random checkpoints (float32)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import phi_jax
from conftest import rel_err

TOL = 1e-5


def _ids(batch, seq, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(1, 96, (batch, seq)))


def _padded_mask(ids):
    """Left padding (row 0), right padding (row 1), a gap in the middle (row 2)."""
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, 5:] = 0
    mask[2, 3:5] = 0
    return mask


def test_padding_positions_match_transformers(make_checkpoint):
    """transformers' mask hides padding keys, never padding queries, and embeds whatever id sits there: every
    position of a padded batch (padding ones included) has its hidden state. phi_jax gave a padding query no key
    (zeros) and looked its id up as 0, so each position after a real token differed by several std."""
    d, ref_model = make_checkpoint(geometry="phi1", cls="PhiModel")
    ids = _ids(3, 8)
    mask = _padded_mask(ids)
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask).last_hidden_state.numpy()
    out = phi_jax.PhiModel.from_pretrained(d)(jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())).last_hidden_state
    assert rel_err(out, ref) <= TOL


def test_sequence_classification_scores_a_masked_last_token_as_transformers(make_checkpoint):
    """The pooled token is the last one != pad_token_id, whatever the mask says: padding written with another id
    (a tokenizer whose pad token is not the config's) is scored where transformers scores it."""
    d, ref_model = make_checkpoint(geometry="phi1", cls="PhiForSequenceClassification", pad_token_id=0,
                                   num_labels=3)
    ids = _ids(3, 8)
    mask = _padded_mask(ids)
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask).logits.numpy()
    model = phi_jax.PhiForSequenceClassification.from_pretrained(d)
    out = model(jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())).logits
    assert out.shape == (3, 3)
    assert rel_err(out, ref) <= TOL


def test_left_padded_causal_lm_loss_matches_transformers(make_checkpoint):
    """Labels -100 at padding: the last padding position still predicts the first real token, so its logits
    (the pad id's embedding there) enter transformers' loss; phi_jax read that id as 0."""
    d, ref_model = make_checkpoint(geometry="phi1", pad_token_id=50)
    ids = _ids(2, 8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 50
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask, labels=labels).loss.item()
    model = phi_jax.PhiForCausalLM.from_pretrained(d)
    out = float(model(jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()), labels=jnp.asarray(labels.numpy())).loss)
    assert abs(out - ref) <= TOL * abs(ref), (out, ref)


@pytest.mark.parametrize("rope", [dict(rope_type="default"), dict(rope_type="linear", factor=2.0)])
def test_no_rotary_channels_as_transformers(make_checkpoint, rope):
    """partial_rotary_factor=0 (no channel rotates, as transformers allows) was refused by the config check."""
    rope = dict(rope, rope_theta=10000.0, partial_rotary_factor=0.0)
    d, ref_model = make_checkpoint(geometry="phi1", rope_parameters=rope)
    ids = _ids(2, 8)
    with torch.no_grad():
        ref = ref_model(ids).logits.numpy()
    model = phi_jax.PhiForCausalLM.from_pretrained(d)
    assert model.config.rotary_ndims == 0
    assert rel_err(model(jnp.asarray(ids.numpy())).logits, ref) <= TOL
