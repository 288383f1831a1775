"""Text generation with a preallocated KV cache: one prefill pass, then one compiled step per token.

`generate` runs prefill and the whole decode loop (`lax.while_loop`, stopping early once every
row has produced an end-of-sequence token) in one compiled program; `generate_stream` runs the
same prefill and step functions from Python, one compiled step per token, and yields each token
as it is produced. Both match transformers' `generate`: a row that has produced `eos_token_id`
is padded with `pad_token_id` from there on.

Prompts are left-padded (or carry any 0/1 `attention_mask`): slot s of the cache holds prompt
column s; positions are `cumsum(mask) - 1`, and masked slots are masked as keys in every step.
The columns added to reach the prompt's bucket hold token 0 under mask False, whatever the pad id:
an id outside the vocabulary never enters the model. Special ids (`eos_token_id`, `pad_token_id`, from
the arguments or the config) are checked against `[0, vocab_size)` before anything runs.

Host cost per call: the model's split is cached (`phi_jax.compilation.split_cached`: the Variables'
current arrays are read, the graph's attributes compared by identity), so a call adds well under a
millisecond of Python to the compiled program whatever the depth, and still sees weight updates and
`train()`/`eval()`. A model on a mesh of several devices is traced under `phi_jax.sharding.layout_of` (rows split
over the batch axes where they divide, fused attention per shard).

What compiles: the model weights and the sampler's float settings (temperature, top_p), the
seed, `max_new_tokens`, `eos_token_id` and `pad_token_id` are traced. A compilation happens on
the first call for each combination of
  - batch size and prompt bucket: prompts are left-padded to the next of 16, 32, 48, 64, 96,
    128, 192, 256, ... (powers of two and 1.5x powers of two), so prompt lengths 65..96 share one;
  - cache length: `cache_length` if given, else prompt bucket + `max_new_tokens` (pass a fixed
    `cache_length` to vary `max_new_tokens` without compiling again);
  - sampler kind (greedy / sampling, with or without top_p) and `top_k`; the number of eos ids;
  - the model's structure and dtypes.
`generate` and `generate_stream` compile separately (the stream compiles prefill and one step).
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from phi_jax.generation.cache import KVCache
from phi_jax.compilation import Compilations, StaticGraph, count_compilations, split_cached  # noqa: F401
from phi_jax.modeling.inputs import check_input_ids
from phi_jax.generation.sampling import Greedy, Sampling, make_sampler
from phi_jax.sharding import layout_of, traced_under

Sampler = Greedy | Sampling


def bucket_length(n: int, minimum: int = 16) -> int:
    """Smallest of 16, 32, 48, 64, 96, 128, 192, 256, ... (2^k, and 3 * 2^(k-1) from 48 on) that is >= n."""
    size = minimum
    while size < n:
        if size >= 32 and size * 3 // 2 >= n:
            return size * 3 // 2
        size *= 2
    return size


# ---- model steps (traced) ----------------------------------------------------------------------

def forward_step(model, ids: jax.Array, cache: KVCache, ids_mask: jax.Array) -> tuple[jax.Array, KVCache]:
    """Runs `ids` through the model at the cache's next slots and returns the last column's logits.

    Args:
      model: a PhiForCausalLM.
      ids: `[B, T]` int; written at slots `[cache.index, cache.index + T)`.
      ids_mask: `[B, T]` bool, True for real tokens (False for left padding).
    Returns:
      (logits of column T-1 `[B, V]` float32, the updated cache).
    """
    b, t = ids.shape
    cache.check_room(t)
    mask = jax.lax.dynamic_update_slice(cache.mask, ids_mask, (0, cache.index))  # [B, S]
    offsets = jnp.cumsum(ids_mask.astype(jnp.int32), axis=1) - 1  # [B, T]
    positions = jnp.maximum(cache.positions[:, None] + offsets, 0)  # [B, T]; pads take position 0
    out = model.model(ids, mask, positions, cache=cache.layers, cache_index=cache.index)
    logits = model.logits(out.last_hidden_state[:, -1:])[:, 0].astype(jnp.float32)  # [B, V]
    cache = KVCache(layers=out.cache, mask=mask, index=cache.index + t,
                    positions=cache.positions + ids_mask.sum(axis=1, dtype=jnp.int32))
    return logits, cache


@struct.dataclass
class DecodeState:
    """cache; tokens: `[B, N]` new tokens (pad past `step`); step: int32, tokens produced so far;
    done: `[B]` bool, rows that have produced an eos; rng: the key (or `[B]` keys, one per row) that each step
    folds its index into."""

    cache: KVCache
    tokens: jax.Array
    step: jax.Array
    done: jax.Array
    rng: jax.Array


def _keys(seed: jax.Array) -> jax.Array:
    """One key for the batch (`seed` a scalar) or one per row (`seed: [B]`)."""
    return jax.random.key(seed) if seed.ndim == 0 else jax.vmap(jax.random.key)(seed)


def _draw(sampler: Sampler, logits: jax.Array, rng: jax.Array, step) -> jax.Array:
    """`[B]` tokens from `logits: [B, V]` with `rng` folded with `step`. Per-row keys draw each row exactly as a
    batch of that row alone with that key would (`vmap` over rows), so a row's tokens do not depend on its
    batch mates."""
    if rng.ndim == 0:
        return sampler.next_tokens(logits, jax.random.fold_in(rng, step))
    keys = jax.vmap(jax.random.fold_in, (0, None))(rng, step)  # [B]
    return jax.vmap(lambda row, key: sampler.next_tokens(row[None], key)[0])(logits, keys)


def _is_eos(tokens: jax.Array, eos: jax.Array) -> jax.Array:
    return jnp.any(tokens[:, None] == eos[None, :], axis=-1)  # [B]; False for an empty eos list


def prefill(model, ids, mask, sampler: Sampler, seed, eos, *, cache_length: int, out_length: int) -> DecodeState:
    """Fills the cache with the prompt `ids: [B, T]` and samples the first new token."""
    b = ids.shape[0]
    cache = KVCache.init(model.config, b, cache_length, model.model.dtype)
    logits, cache = forward_step(model, ids, cache, mask)
    rng = _keys(seed)
    tok = _draw(sampler, logits, rng, 0)  # [B]
    tokens = jnp.zeros((b, out_length), jnp.int32).at[:, 0].set(tok)  # [B, N]
    return DecodeState(cache=cache, tokens=tokens, step=jnp.int32(1), done=_is_eos(tok, eos), rng=rng)


def decode_step(model, s: DecodeState, sampler: Sampler, eos, pad) -> DecodeState:
    """Feeds the last token, samples the next; rows already done get `pad`."""
    last = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)  # [B, 1]
    logits, cache = forward_step(model, last, s.cache, jnp.ones(last.shape, bool))
    tok = _draw(sampler, logits, s.rng, s.step)  # [B]
    tok = jnp.where(s.done, pad, tok)
    tokens = jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step))
    return DecodeState(cache=cache, tokens=tokens, step=s.step + 1, done=s.done | _is_eos(tok, eos), rng=s.rng)


# ---- compiled programs (split state in, so the HLO holds no Python objects) ---------------------

@functools.partial(jax.jit, static_argnames=("static", "cache_length", "out_length", "layout"))
def _generate_program(static: StaticGraph, params, ids, mask, max_new_tokens, sampler, seed, eos, pad, *,
                      cache_length, out_length, layout=None):
    """Prefill + the whole decode loop; returns (new tokens `[B, N]`, tokens produced)."""
    with traced_under(layout):
        return _generate_loop(static, params, ids, mask, max_new_tokens, sampler, seed, eos, pad,
                              cache_length=cache_length, out_length=out_length)


def _generate_loop(static, params, ids, mask, max_new_tokens, sampler, seed, eos, pad, *, cache_length, out_length):
    s = prefill(static.merge(params), ids, mask, sampler, seed, eos,
                cache_length=cache_length, out_length=out_length)

    def cond(s):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s):
        return decode_step(static.merge(params), s, sampler, eos, pad)

    s = jax.lax.while_loop(cond, body, s)
    tokens = jnp.where(jnp.arange(out_length)[None, :] < s.step, s.tokens, pad)  # pad past the stop
    return tokens, s.step


@functools.partial(jax.jit, static_argnames=("static", "cache_length", "out_length", "layout"))
def _prefill_program(static: StaticGraph, params, ids, mask, sampler, seed, eos, *, cache_length, out_length,
                     layout=None):
    with traced_under(layout):
        s = prefill(static.merge(params), ids, mask, sampler, seed, eos,
                    cache_length=cache_length, out_length=out_length)
    return s, s.tokens[:, 0], jnp.all(s.done)


@functools.partial(jax.jit, static_argnames=("static", "layout"), donate_argnames=("s",))
def _step_program(static: StaticGraph, params, s, sampler, eos, pad, layout=None):
    with traced_under(layout):
        new = decode_step(static.merge(params), s, sampler, eos, pad)
    return new, jax.lax.dynamic_index_in_dim(new.tokens, s.step, axis=1, keepdims=False), jnp.all(new.done)


def _to_host(x: jax.Array) -> np.ndarray:
    """`x` as a numpy array in every process: a model on a mesh spanning several processes (multi-host) leaves the
    tokens' rows on other processes' devices, which `np.asarray` cannot read; they are all-gathered."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ---- public API -----------------------------------------------------------------------------------

@struct.dataclass
class _Prepared:
    ids: np.ndarray  # [B, T_bucket] left-padded
    mask: np.ndarray  # [B, T_bucket] bool
    eos: np.ndarray  # [E] int32
    pad: int
    cache_length: int = struct.field(pytree_node=False)
    out_length: int = struct.field(pytree_node=False)


def _as_id_list(value, name: str, vocab_size: int, source: str) -> list[int]:
    """The special id(s) `value` as a list, each checked to be an int in [0, vocab_size)."""
    if value is None:
        return []
    values = [value] if np.ndim(value) == 0 else list(np.asarray(value).reshape(-1))
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not np.issubdtype(np.asarray(v).dtype, np.integer):
            raise ValueError(f"{name} must be an int or a list of ints, got {value!r} ({source})")
        if not 0 <= v < vocab_size:
            raise ValueError(f"{name} {int(v)} ({source}) is outside [0, {vocab_size}) (vocab_size)")
    return [int(v) for v in values]


def _batch_size(input_ids) -> int:
    """The rows of `input_ids`, for the per-row seed check (`_prepare` checks its shape and values)."""
    try:
        shape = np.shape(input_ids)
    except ValueError:  # numpy's "inhomogeneous shape": a list of prompts of different lengths
        raise ValueError("input_ids must be [batch, seq]: its rows have different lengths (left-pad them to one "
                         "length and pass an attention_mask)") from None
    return shape[0] if shape else 0


def _check_seed(seed, batch: int) -> np.ndarray:
    """`seed` as uint32: a scalar (one key for the batch) or `[batch]` (one key per row)."""
    if isinstance(seed, (np.ndarray, jax.Array)) and seed.ndim == 0:
        seed = np.asarray(seed)[()]  # a 0-d array is a scalar seed
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)):
        if not 0 <= seed < 2 ** 32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
        return np.uint32(seed)
    values = np.asarray(seed) if isinstance(seed, (list, tuple, np.ndarray, jax.Array)) else None
    if values is None or values.dtype == bool or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"seed must be an int or a list of {batch} ints (one per row), got {seed!r}")
    if values.shape != (batch,):
        raise ValueError(f"seed has shape {values.shape}; per-row seeds need one per row: ({batch},)")
    bad = np.flatnonzero((values < 0) | (values >= 2 ** 32))
    if bad.size:
        raise ValueError(f"seed[{int(bad[0])}] = {int(values[bad[0]])} is outside [0, 2**32)")
    return values.astype(np.uint32)


def _prepare(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, cache_length):
    """Checks every input on the host and left-pads the prompt to its bucket."""
    if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer))
            or not 1 <= max_new_tokens < 2 ** 31):
        raise ValueError(f"max_new_tokens must be an int in [1, 2**31), got {max_new_tokens!r}")
    if cache_length is not None and (isinstance(cache_length, bool) or not isinstance(cache_length, (int, np.integer))
                                     or not 1 <= cache_length < 2 ** 31):
        raise ValueError(f"cache_length must be an int in [1, 2**31) or None, got {cache_length!r}")
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    b, t = ids.shape
    if t < 1 or b < 1:
        raise ValueError(f"input_ids has shape {ids.shape}; generate needs at least one prompt token per row")
    if attention_mask is None:
        mask = np.ones((b, t), bool)
    else:
        mask = np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape} but input_ids has shape {ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0/1 (or False/True)")
        mask = mask.astype(bool)
        empty = np.flatnonzero(~mask.any(axis=1))
        if empty.size:
            raise ValueError(f"attention_mask row {int(empty[0])} has no real token")
        right = np.flatnonzero(~mask[:, -1])
        if right.size:  # its first new token would be predicted from a padding column
            raise ValueError(f"attention_mask row {int(right[0])} ends in padding: generate continues each row "
                             f"from its last column; left-pad the prompts")
    check_input_ids(ids, model.config.vocab_size, mask)  # ids at masked positions never reach the model
    need = t + int(max_new_tokens)
    if cache_length is None:
        bucket = bucket_length(t)
        cache_length = bucket + int(max_new_tokens)
    else:
        if need > cache_length:
            raise ValueError(f"the prompt ({t} tokens) plus max_new_tokens ({max_new_tokens}) needs {need} cache "
                             f"slots; cache_length is {cache_length}")
        bucket = min(bucket_length(t), cache_length - int(max_new_tokens))
    vocab = model.config.vocab_size
    if eos_token_id is None:
        eos = _as_id_list(model.config.eos_token_id, "eos_token_id", vocab, "from the model config")
    else:
        eos = _as_id_list(eos_token_id, "eos_token_id", vocab, "argument")
    if pad_token_id is not None:
        pad = _as_id_list(pad_token_id, "pad_token_id", vocab, "argument")
    else:
        pad = _as_id_list(model.config.pad_token_id, "pad_token_id", vocab, "from the model config")
    if len(pad) > 1:
        raise ValueError(f"pad_token_id must be one int, got {pad_token_id!r}")
    # transformers pads finished rows with the (first) eos id when there is no pad id; with neither, no row
    # ever finishes and the pad value is never written out (0 is only a placeholder).
    pad = pad[0] if pad else (eos[0] if eos else 0)
    lead = bucket - t  # bucket columns: token 0 (always a valid id) under mask False, never the pad id
    ids = np.pad(ids.astype(np.int32), ((0, 0), (lead, 0)), constant_values=0)
    mask = np.pad(mask, ((0, 0), (lead, 0)), constant_values=False)
    return _Prepared(ids=ids, mask=mask, eos=np.asarray(eos, np.int32), pad=pad, cache_length=cache_length,
                     out_length=cache_length - bucket)


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int = 20, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             seed: int | list[int] = 0, cache_length: int | None = None) -> np.ndarray:
    """Generates `max_new_tokens` tokens after each prompt, as transformers' `generate` does.

    Args:
      model: a PhiForCausalLM.
      input_ids: `[B, T]` int prompts, left-padded when their lengths differ.
      attention_mask: `[B, T]`, 1/True for real tokens; default all real.
      max_new_tokens: >= 1.
      do_sample, temperature, top_k, top_p: see `phi_jax.generation.sampling`; greedy by default.
      eos_token_id: an id or a list of ids that end a row; default the config's. Each in [0, vocab_size).
      pad_token_id: what follows a row's eos; default the config's, else the first eos id. In [0, vocab_size).
      seed: an int: the batch's sampling key is `jax.random.key(seed)`; the same seed gives the same tokens. A
        list of B ints: one key per row, `jax.random.key(seed[b])`, and row b's tokens are those of row b
        generated alone with `seed=seed[b]`, whatever its batch mates (up to rounding differences between batch
        shapes in the logits, which can flip a draw at a near tie, as they can flip a greedy argmax).
      cache_length: cache slots to allocate (>= T + max_new_tokens); default the prompt bucket + max_new_tokens.
    Returns:
      `[B, T + max_new_tokens]` int32 numpy array: the prompt, then the new tokens; after a row's eos
      (and after the loop stops because every row is done) only `pad_token_id`.
    """
    sampler = make_sampler(do_sample, temperature, top_k, top_p)
    seed = _check_seed(seed, _batch_size(input_ids))
    p = _prepare(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, cache_length)
    static, params = split_cached(model)
    tokens, _ = _generate_program(static, params, p.ids, p.mask, np.int32(max_new_tokens), sampler,
                                  seed, p.eos, np.int32(p.pad), cache_length=p.cache_length,
                                  out_length=p.out_length, layout=layout_of(params))
    prompt = np.asarray(input_ids).astype(np.int32)
    new = _to_host(tokens)[:, :max_new_tokens]
    return np.concatenate([prompt, new], axis=1)


def generate_stream(model, input_ids, attention_mask=None, *, max_new_tokens: int = 20, do_sample: bool = False,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                    seed: int | list[int] = 0, cache_length: int | None = None) -> Iterator[np.ndarray]:
    """Yields the new tokens, `[B]` int32 per step, as they are produced; the same tokens as `generate`.

    Stops after `max_new_tokens` steps or once every row has produced an eos. Each step is dispatched
    before the previous step's token is read back, so the host never stalls the device. Arguments as
    for `generate`; they are checked here, when the stream is created (a bad one raises at this call, not at
    the first `next`), and the prefill runs at the first `next`.
    """
    sampler = make_sampler(do_sample, temperature, top_k, top_p)
    seed = _check_seed(seed, _batch_size(input_ids))
    p = _prepare(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, cache_length)
    return _stream(model, p, sampler, seed, int(max_new_tokens))


def _stream(model, p: _Prepared, sampler: Sampler, seed, max_new_tokens: int) -> Iterator[np.ndarray]:
    static, params = split_cached(model)
    eos, pad = p.eos, np.int32(p.pad)
    layout = layout_of(params)
    s, tok, all_done = _prefill_program(static, params, p.ids, p.mask, sampler, seed, eos,
                                        cache_length=p.cache_length, out_length=p.out_length, layout=layout)
    for step in range(1, max_new_tokens + 1):
        if step < max_new_tokens:
            s, next_tok, next_done = _step_program(static, params, s, sampler, eos, pad, layout)  # not awaited
        yield _to_host(tok)
        if step == max_new_tokens or bool(_to_host(all_done)):
            return
        tok, all_done = next_tok, next_done
