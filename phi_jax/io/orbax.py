"""phi_jax's Orbax checkpoint directory: `config.json`, tokenizer files and `params/`.

`params/` is one Orbax checkpoint of the model's `nnx.Param` state, keyed by the NNX paths with string
keys (`{'model': {'layers': {'0': {'mlp': {'fc1': {'kernel': [in, out]}}}}}}`), in our layout (Linear
kernels `[in, out]`). It is written in chunks with Orbax's partial save (`OrbaxWriter`), so a conversion
never holds more than one chunk, and read one tensor at a time (`OrbaxReader`, behind
`phi_jax.io.sources.OrbaxSource`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping

import numpy as np
from flax import traverse_util

PARAMS = "params"
_STATE = "state"  # the pytree's sub-directory in Orbax's v1 layout


def is_orbax_dir(path) -> bool:
    path = os.fspath(path)
    return os.path.isdir(os.path.join(path, PARAMS, _STATE)) and os.path.exists(os.path.join(path, "config.json"))


def nest(items) -> dict:
    """[(path tuple, value)] -> nested dict with string keys (Orbax's tree of our NNX paths)."""
    return traverse_util.unflatten_dict({_str_path(path): value for path, value in items})


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


@contextlib.contextmanager
def _orbax_warnings():
    """Collects (instead of printing) the warnings Orbax logs through absl while reading metadata: for a corrupt
    checkpoint it logs one and returns None, and the caller's error then says what it said, in one line."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger, handler = logging.getLogger("absl"), Collect(logging.WARNING)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


class OrbaxReader:
    """Shapes and dtypes of every tensor of `DIR/params`, and each tensor on demand as numpy (our layout)."""

    def __init__(self, directory: str):
        import orbax.checkpoint as ocp
        self.directory = os.path.abspath(os.fspath(directory))  # Orbax wants absolute paths
        self.state_dir = os.path.join(self.directory, PARAMS, _STATE)
        if not os.path.isdir(self.state_dir):
            raise FileNotFoundError(f"{self.directory} is not a phi_jax Orbax checkpoint (no {PARAMS}/{_STATE})")
        self._ckpt = ocp.PyTreeCheckpointer()
        self._ocp = ocp
        from orbax.checkpoint.experimental import v1
        with _orbax_warnings() as warned:
            try:
                meta = v1.metadata(os.path.join(self.directory, PARAMS)).metadata
            except Exception as e:  # Orbax raises several types for unreadable metadata
                raise ValueError(f"cannot read Orbax metadata in {self.state_dir} (incomplete or corrupt?): "
                                 f"{_short(e)}") from None
        if not isinstance(meta, Mapping) or not meta:  # Orbax logs some unreadable metadata and returns None
            details = [ln.split(":", 1)[1].strip() for w in warned for ln in w.splitlines()
                       if ln.startswith("Error details:")]
            raise ValueError(f"cannot read Orbax metadata in {self.state_dir} (incomplete or corrupt?)"
                             + (f": {details[0]}" if details else ""))
        for message in warned:  # metadata read after all: what Orbax had to say goes out as it would have
            logging.getLogger("absl").warning(message)
        self.shapes, self.dtypes = {}, {}
        for path, m in traverse_util.flatten_dict(meta).items():
            self.shapes[path], self.dtypes[path] = tuple(m.shape), np.dtype(m.dtype)

    def get(self, path: tuple) -> np.ndarray:
        return self.get_many([path])[_str_path(path)]

    def get_many(self, paths) -> dict[tuple[str, ...], np.ndarray]:
        """Several tensors in one partial restore (each call costs a few ms of Orbax overhead)."""
        paths = [_str_path(p) for p in paths]
        item = nest([(p, 0) for p in paths])
        args = nest([(p, self._ocp.RestoreArgs(restore_type=np.ndarray)) for p in paths])
        try:
            out = self._ckpt.restore(self.state_dir, args=self._ocp.args.PyTreeRestore(
                item=item, restore_args=args, partial_restore=True))
        except Exception as e:
            if len(paths) > 1:  # find the culprit: the error names the one tensor, not the whole chunk
                for p in paths:
                    self.get_many([p])
            raise ValueError(f"cannot read {'tensor ' + '/'.join(paths[0]) if len(paths) == 1 else 'tensors'} from "
                             f"{self.state_dir} (incomplete or corrupt?): {_short(e)}") from None
        flat = traverse_util.flatten_dict(out)
        return {p: np.asarray(flat[p]) for p in paths}


def _short(e: BaseException) -> str:
    """Orbax's / tensorstore's message without the JSON spec it appends (thousands of characters): one line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    for tail in (" [tensorstore_spec=", " [source locations="):
        text = text.split(tail)[0]
    return text
