"""Reading the files a user hands the library: results, configs, checkpoints, corpora.

Every failure is a ``ValueError`` (or ``FileNotFoundError`` for a path that does not exist) whose message
starts with the file and says what was found and what was expected, e.g.

    runs/a/results.json: field 'seq_lengths'[1] is 'x'; expected a positive integer
    runs/a/checkpoint/model.safetensors: truncated: its header describes 81,920 bytes of data, it holds 4,096

so that ``bsbr`` prints one line (exit status 2) instead of a traceback from inside json, safetensors or torch.
The checks run before anything is written, so a failed call leaves files already on disk as they were.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import NoReturn

# --- reading ---------------------------------------------------------------------------------------------------


def read_bytes(path: str | Path, what: str) -> bytes:
    """The bytes of file ``path`` (``what`` says what it should be, for the messages)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: does not exist; expected {what}")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; expected {what}")
    try:
        return path.read_bytes()
    except OSError as err:  # permission denied, I/O error, ...
        raise ValueError(f"{path}: cannot be read ({err.strerror or type(err).__name__}); expected {what}") from None


def decode_text(data: bytes, path: str | Path, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         f"expected {what}") from None


def parse_json(text: str, path: str | Path, what: str, line: int | None = None) -> object:
    where = f"{path}" if line is None else f"{path}: line {line}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                         f"expected {what}") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to read; expected {what}") from None


def read_json(path: str | Path, what: str) -> object:
    """Parse the JSON file ``path``; any failure is a ValueError naming the file and ``what`` was expected."""
    return parse_json(decode_text(read_bytes(path, what), path, what), path, what)


# --- checking values -------------------------------------------------------------------------------------------


def show(value: object) -> str:
    """A short rendering of a value found in a file."""
    if isinstance(value, dict):
        return f"an object with {len(value)} key(s)" if value else "an empty object {}"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)" if value else "an empty list []"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def field_name(*keys: str | int) -> str:
    """``('BSBR', 'time', 2)`` -> ``'BSBR'.'time'[2]``."""
    out = ""
    for k in keys:
        out += f"[{k}]" if isinstance(k, int) else (("." if out else "") + repr(k))
    return out or "(top level)"


def fail(path: str | Path, keys: tuple, value: object, expected: str) -> NoReturn:
    raise ValueError(f"{path}: field {field_name(*keys)} is {show(value)}; expected {expected}")


def missing(path: str | Path, keys: tuple, expected: str) -> NoReturn:
    raise ValueError(f"{path}: field {field_name(*keys)} is missing; expected {expected}")


def is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite real number (bools are not numbers here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def get(path, obj: dict, key: str, keys: tuple, expected: str) -> object:
    if key not in obj:
        missing(path, (*keys, key), expected)
    return obj[key]


def mapping(path, value: object, keys: tuple, expected: str = "an object {...}") -> dict:
    if not isinstance(value, dict):
        fail(path, keys, value, expected)
    return value


def int_at_least(path, value: object, keys: tuple, low: int = 1, none: bool = False) -> int | None:
    if none and value is None:
        return None
    if not is_int(value) or value < low:
        what = {1: "a positive integer", 0: "a non-negative integer"}.get(low, f"an integer >= {low}")
        fail(path, keys, value, what + (" or null" if none else ""))
    return int(value)


def number_at_least(path, value: object, keys: tuple, low: float = 0.0, none: bool = False) -> float | None:
    if none and value is None:
        return None
    if not is_number(value) or value < low:
        fail(path, keys, value, f"a finite number >= {low:g}" + (" or null" if none else ""))
    return value


def string(path, value: object, keys: tuple, none: bool = False) -> str | None:
    if none and value is None:
        return None
    if not isinstance(value, str) or not value:
        fail(path, keys, value, "a non-empty string" + (" or null" if none else ""))
    return value


def list_of(path, value: object, keys: tuple, length: int | None = None, expected: str = "a list") -> list:
    if not isinstance(value, list):
        fail(path, keys, value, expected if length is None else f"{expected} of {length} item(s)")
    if length is not None and len(value) != length:
        fail(path, keys, value, f"{expected} of {length} item(s), one per entry of 'seq_lengths'")
    return value
