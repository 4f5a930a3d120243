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


_ABSENT = object()


def json_differences(old: object, new: object, path: str = "") -> list[str]:
    """Where two JSON values differ, as "dotted.path: old -> new" strings; objects are compared key by key, so
    an option only one side has reads e.g. "task.answers_in_input: (absent) -> False"."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += json_differences(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{path}.{k}" if path else str(k))
        return out
    if old == new:
        return []
    return [f"{path or '(top level)'}: " + " -> ".join("(absent)" if v is _ABSENT else repr(v) for v in (old, new))]


def field_name(*keys: str | int) -> str:
    """``('BSBR', 'time', 2)`` -> ``'BSBR'.'time'[2]``."""
    out = ""
    for k in keys:
        out += f"[{k}]" if isinstance(k, int) else (("." if out else "") + repr(k))
    return out or "(top level)"


def fail(path: str | Path, keys: tuple, value: object, expected: str) -> NoReturn:
    where = f"field {field_name(*keys)} is" if keys else "holds"
    raise ValueError(f"{path}: {where} {show(value)}; expected {expected}")


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


def list_of(path, value: object, keys: tuple, length: int | None = None, expected: str = "a list",
            per: str = "one per entry of 'seq_lengths'") -> list:
    if not isinstance(value, list):
        fail(path, keys, value, expected if length is None else f"{expected} of {length} item(s)")
    if length is not None and len(value) != length:
        fail(path, keys, value, f"{expected} of {length} item(s), {per}")
    return value


# --- safetensors -----------------------------------------------------------------------------------------------

_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
ST_DTYPE = {"torch.bool": "BOOL", "torch.uint8": "U8", "torch.int8": "I8", "torch.int16": "I16", "torch.float16": "F16",
            "torch.bfloat16": "BF16", "torch.int32": "I32", "torch.float32": "F32", "torch.int64": "I64",
            "torch.float64": "F64"}  # str(torch dtype) -> the name safetensors writes


def safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a safetensors file, after checking that the file is whole: a header of
    well-formed entries whose data regions tile the rest of the file exactly (so a truncated or padded file,
    or one that is not safetensors at all, is a ValueError naming the file)."""
    path = Path(path)
    what = "a safetensors file"
    if not path.is_file():
        if path.exists():
            raise ValueError(f"{path}: is not a file; expected {what}")
        raise FileNotFoundError(f"{path}: does not exist; expected {what}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = f.read(n) if 0 < n <= min(size - 8, 100 * 2**20) else b""
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror or type(err).__name__}); expected {what}") from None
    if n < 2 or len(raw) != n:
        raise ValueError(f"{path}: is not a whole safetensors file ({size:,} bytes; its first 8 bytes announce a "
                         f"{max(n, 0):,}-byte header); truncated, or not written by safetensors")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"{path}: its safetensors header is not JSON; the file is damaged or not safetensors") \
            from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: its safetensors header is {show(header)}; expected an object of tensors")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    regions = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(entry, dict) and entry.get("dtype") in _ST_ITEMSIZE \
            and isinstance(entry.get("shape"), list) and all(is_int(d) and d >= 0 for d in entry["shape"]) \
            and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2 \
            and all(is_int(o) and o >= 0 for o in entry["data_offsets"])
        if not ok:
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {show(entry)}; the file is "
                             "damaged or not safetensors")
        start, end = entry["data_offsets"]
        numel = math.prod(entry["shape"])
        if end - start != numel * _ST_ITEMSIZE[entry["dtype"]]:
            raise ValueError(f"{path}: tensor {name!r} ({entry['dtype']} {entry['shape']}) is given {end - start} "
                             f"bytes of data; the file is damaged")
        regions.append((start, end))
        out[name] = (entry["dtype"], tuple(entry["shape"]))
    data = size - 8 - n
    described = max((e for _, e in regions), default=0)
    if described != data:
        state = "truncated" if described > data else "longer than its header says"
        raise ValueError(f"{path}: {state}: its header describes {described:,} bytes of tensor data, the file holds "
                         f"{data:,}")
    return out


def check_tensors(path: str | Path, found: dict[str, tuple[str, tuple[int, ...]]],
                  expected: dict[str, tuple[str, tuple[int, ...]]], what: str,
                  optional: frozenset[str] = frozenset()) -> None:
    """Raise a ValueError naming ``path`` and the first tensor whose name, dtype or shape differ from ``expected``
    ({name: (safetensors dtype, shape)}; names in ``optional`` may be absent)."""
    for name, (dtype, shape) in expected.items():
        if name not in found:
            if name in optional:
                continue
            extra = sorted(set(found) - set(expected))
            hint = f"; it holds {extra[0]!r} and {len(extra) - 1} other(s) this model lacks" if extra else ""
            raise ValueError(f"{path}: tensor {name!r} is missing{hint}; expected {what}")
        if found[name] != (dtype, shape):
            raise ValueError(f"{path}: tensor {name!r} is {found[name][0]} {list(found[name][1])}; expected {dtype} "
                             f"{list(shape)} for {what}")
    for name in found:
        if name not in expected:
            raise ValueError(f"{path}: holds tensor {name!r}, which {what} does not have")
