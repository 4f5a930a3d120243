"""One registry maps a mechanism name to its attention class; one generic LM takes the attention by name."""

from __future__ import annotations

from collections.abc import Callable

from ..layers.base import CausalAttention

_ATTENTIONS: dict[str, type[CausalAttention]] = {}
_DEFAULTS: dict[str, dict] = {}


def register_attention(name: str, defaults: dict | None = None) -> Callable[[type], type]:
    """Class decorator: make an attention class available to :func:`build_model` under ``name``.

    ``defaults`` are the mechanism's keyword arguments used when a caller gives none (e.g. chunk_size).
    """

    def wrap(cls: type[CausalAttention]) -> type[CausalAttention]:
        if name in _ATTENTIONS and _ATTENTIONS[name] is not cls:
            raise ValueError(f"attention name {name!r} is already registered to {_ATTENTIONS[name].__name__}")
        _ATTENTIONS[name] = cls
        _DEFAULTS[name] = dict(defaults or {})
        cls.name = name
        return cls

    return wrap


def canonical_name(name: str) -> str:
    """Resolve ``name`` case-insensitively (``"bsbr"`` -> ``"BSBR"``), or raise naming the known models."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, one of {list_models()}, got {name!r}")
    for known in _ATTENTIONS:
        if known.lower() == name.lower().replace("-", "").replace("_", ""):
            return known
    raise ValueError(f"unknown model {name!r}; known models are {list_models()}")


def attention_class(name: str) -> type[CausalAttention]:
    return _ATTENTIONS[canonical_name(name)]


def attention_defaults(name: str) -> dict:
    return dict(_DEFAULTS[canonical_name(name)])


def list_models() -> list[str]:
    """Names of the registered mechanisms, BSBR first."""
    return sorted(_ATTENTIONS, key=lambda n: (n != "BSBR", list(_ATTENTIONS).index(n)))
