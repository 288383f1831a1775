"""JSON-lines input files (prompts for `phi-jax generate --input`, training data): one reader, clear errors."""

from __future__ import annotations

import json
from typing import Callable, Iterator


def read_jsonl(path: str, where: Callable[[int], str]) -> Iterator[tuple[int, str, object]]:
    """Yields `(line number, line, parsed value)` for every non-blank line of `path`.

    A line that is not UTF-8 or not valid JSON is a ValueError starting with `where(line number)`.
    """
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where(n)}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            try:
                yield n, line, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where(n)}: not valid JSON ({e.msg} at column {e.colno})") from None

