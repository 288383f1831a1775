"""JSON-lines input files (prompts for `phi-jax generate --input`, training data): one reader, clear errors."""

from __future__ import annotations

import codecs
import json
from typing import Callable, Iterator


def read_jsonl(path: str, where: Callable[[int], str]) -> Iterator[tuple[int, str, object]]:
    """Yields `(line number, line, parsed value)` for every non-blank line of `path`.

    A line that is not UTF-8, not valid JSON (Python's NaN and Infinity included: other readers refuse them, and
    they would be copied into an output file), or holds a string that is not text (a lone UTF-16 surrogate
    escape, "\\ud800") is a ValueError starting with `where(line number)`. A UTF-8 byte-order mark (which some
    editors write) is skipped, like the carriage return of a CRLF line end.
    """
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where(n)}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line, parse_constant=_not_json)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where(n)}: not valid JSON ({e.msg} at column {e.colno})") from None
            except ValueError as e:  # NaN / Infinity, or an integer of more than sys.get_int_max_str_digits() digits
                raise ValueError(f"{where(n)}: cannot read its JSON ({str(e).split(';')[0]})") from None
            if "\\u" in line:
                try:
                    json.dumps(value, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(f"{where(n)}: a \\u escape encodes {e.object[e.start]!r}, half of a UTF-16 "
                                     f"surrogate pair, not a character") from None
            yield n, line, value



def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON value")
