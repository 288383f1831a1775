"""The one tokenizer reader: a `tokenizer.json` read by the `tokenizers` library (never the network, never
transformers), with any truncation or padding the file records switched off: phi_jax tokenizes whole prompts and
documents one at a time (a recorded truncation cut them silently; a recorded padding added pad tokens to every
prompt of a batch and trained on them)."""

from __future__ import annotations

import os


def read_tokenizer(path: str | os.PathLike, *, missing_hint: str = ""):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or a directory holding one.

    A directory without one is a FileNotFoundError ending in `missing_hint`; an unreadable file a ValueError
    naming it."""
    from tokenizers import Tokenizer
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path} has no tokenizer.json{missing_hint}")
    elif os.path.isfile(path):
        file = path
    else:
        raise FileNotFoundError(f"tokenizer not found: {path}")
    try:
        tokenizer = Tokenizer.from_file(file)
    except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception for unreadable files)
        raise ValueError(f"{file} is not a tokenizer.json the tokenizers library reads "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer
