"""phi_jax's Orbax checkpoint directory: `config.json`, tokenizer files and `params/`.

`params/` is one Orbax checkpoint of the model's `nnx.Param` state, keyed by the NNX paths with string
keys (`{'model': {'layers': {'0': {'mlp': {'fc1': {'kernel': [in, out]}}}}}}`), in our layout (Linear
kernels `[in, out]`). It is written in chunks with Orbax's partial save (`OrbaxWriter`), so a conversion
never holds more than one chunk, and read either whole onto an abstract model (`load_model`, used by
`from_pretrained`) or one tensor at a time (`OrbaxReader`).
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phi_jax.config import PhiConfig

PARAMS = "params"
_STATE = "state"  # the pytree's sub-directory in Orbax's v1 layout
log = logging.getLogger(__name__)


def is_orbax_dir(path) -> bool:
    path = os.fspath(path)
    return os.path.isdir(os.path.join(path, PARAMS, _STATE)) and os.path.exists(os.path.join(path, "config.json"))


def nest(items) -> dict:
    """[(path tuple, value)] -> nested dict with string keys."""
    out = {}
    for path, value in items:
        d = out
        for k in path[:-1]:
            d = d.setdefault(str(k), {})
        d[str(path[-1])] = value
    return out


def _flatten(tree, prefix=()) -> dict[tuple, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _str_path(path) -> tuple[str, ...]:
    return tuple(map(str, path))


class OrbaxWriter:
    """Adds tensors to a new Orbax checkpoint at `path`, saving a chunk whenever `chunk_bytes` accumulate."""

    def __init__(self, path: str, chunk_bytes: int = 256 << 20):
        from orbax.checkpoint.experimental import v1 as ocp
        self._partial = ocp.partial
        self.path, self.chunk_bytes = path, chunk_bytes
        self.storage_chunk_bytes, self.compress = 16 << 20, False
        self._chunk, self._size, self._saved = [], 0, False

    def _context(self):
        # No defensive copy of our host arrays (nothing modifies them); arrays stored in chunks of at most
        # `storage_chunk_bytes`, so tensorstore encodes piece by piece.
        from orbax.checkpoint.experimental import v1 as ocp
        ctx = ocp.Context()
        ctx.memory.deepcopy_host_arrays = False
        ctx.array.saving.storage_options.chunk_byte_size = self.storage_chunk_bytes
        ctx.array.saving.use_compression = self.compress
        return ctx

    def put(self, path: tuple, arr: np.ndarray) -> None:
        self._chunk.append((path, arr))
        self._size += arr.nbytes
        if self._size >= self.chunk_bytes:
            self.flush()

    def flush(self) -> None:
        if self._chunk:
            with self._context():
                self._partial.save(self.path, nest(self._chunk))
            self._chunk, self._size, self._saved = [], 0, True

    def close(self) -> None:
        self.flush()
        if self._saved:
            self._partial.finalize(self.path)


class OrbaxReader:
    """Shapes and dtypes of every tensor of `DIR/params`, and each tensor on demand as numpy (our layout)."""

    def __init__(self, directory: str):
        import orbax.checkpoint as ocp
        self.directory = os.fspath(directory)
        self.state_dir = os.path.join(self.directory, PARAMS, _STATE)
        if not os.path.isdir(self.state_dir):
            raise FileNotFoundError(f"{self.directory} is not a phi_jax Orbax checkpoint (no {PARAMS}/{_STATE})")
        self._ckpt = ocp.PyTreeCheckpointer()
        self._ocp = ocp
        try:
            from orbax.checkpoint.experimental import v1
            meta = v1.metadata(os.path.join(self.directory, PARAMS)).metadata
        except Exception as e:  # Orbax raises several types for unreadable metadata
            raise ValueError(f"cannot read Orbax metadata in {self.state_dir} (incomplete or corrupt?): {e}") from None
        self.shapes, self.dtypes = {}, {}
        for path, m in _flatten(meta).items():
            self.shapes[path], self.dtypes[path] = tuple(m.shape), np.dtype(m.dtype)

    def get(self, path: tuple) -> np.ndarray:
        path = _str_path(path)
        item = nest([(path, 0)])
        args = nest([(path, self._ocp.RestoreArgs(restore_type=np.ndarray))])
        try:
            out = self._ckpt.restore(self.state_dir, args=self._ocp.args.PyTreeRestore(
                item=item, restore_args=args, partial_restore=True))
        except Exception as e:
            raise ValueError(f"cannot read tensor {'/'.join(path)} from {self.state_dir}: {e}") from None
        for k in path:
            out = out[k]
        return np.asarray(out)


def load_model(cls, path, *, dtype=jnp.float32, param_dtype=None, attn_implementation="xla",
               config: PhiConfig | None = None, **unused):
    """Restores `cls` from a phi_jax Orbax directory onto its abstract state (shapes checked first)."""
    from orbax.checkpoint.experimental import v1 as ocp

    from phi_jax.loading import _build_abstract
    if unused.get("allow_new_head"):
        raise ValueError("allow_new_head is only supported for Hugging Face directories")
    path = os.fspath(path)
    config = config or PhiConfig.from_pretrained(path)
    param_dtype = param_dtype or dtype
    graphdef, params, rest = _build_abstract(cls, config, dtype=dtype, param_dtype=param_dtype,
                                             attn_implementation=attn_implementation)
    flat = nnx.to_flat_state(params)
    stored = OrbaxReader(path).shapes
    wanted = {_str_path(p): tuple(var.get_value().shape) for p, var in flat}
    missing = sorted("/".join(p) for p in wanted if p not in stored)
    unexpected = sorted("/".join(p) for p in stored if p not in wanted)
    mismatched = [f"{'/'.join(p)}: checkpoint has {list(stored[p])}, model expects {list(s)}"
                  for p, s in wanted.items() if p in stored and stored[p] != s]
    problems = [f"{name}: {v}" for name, v in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                                ("shape mismatches", mismatched)) if v]
    if problems:
        raise ValueError(f"Orbax checkpoint {path} does not fit {cls.__name__} with its config: " + " | ".join(problems))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = nest([(p, jax.ShapeDtypeStruct(var.get_value().shape, param_dtype, sharding=sharding)) for p, var in flat])
    restored = ocp.load(os.path.join(path, PARAMS), abstract)
    for p, var in flat:
        value = restored
        for k in _str_path(p):
            value = value[k]
        var.set_value(jnp.asarray(value, dtype=param_dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)
