"""ModelConfig: everything needed to rebuild a model, small enough to write next to a checkpoint as JSON."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, fields

from .. import _checks
from .registry import attention_class, attention_defaults, canonical_name

NORMS = ("layernorm", "rmsnorm")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_dim: int
    num_layers: int
    num_heads: int
    ff_dim: int
    attention: str = "BSBR"  # registry name: see bsbr.models.list_models()
    attention_kwargs: dict = field(default_factory=dict)  # mechanism options, e.g. chunk_size, window_size
    dropout: float = 0.1  # on embeddings, attention output and feed-forward output
    norm: str = "layernorm"  # pre-norm before attention and feed-forward, and after the last block
    tie_embeddings: bool = True  # LM head shares the token embedding matrix

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_dim", "num_layers", "num_heads", "ff_dim"):
            _checks.positive_int(name, getattr(self, name))
        _checks.heads_divide(self.hidden_dim, self.num_heads)
        _checks.probability("dropout", self.dropout)
        _checks.one_of("norm", self.norm, NORMS)
        self.attention = canonical_name(self.attention)
        if not isinstance(self.attention_kwargs, dict):
            raise TypeError(f"attention_kwargs must be a dict, got {type(self.attention_kwargs).__name__}")
        cls = attention_class(self.attention)
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "hidden_dim", "num_heads", "dropout"}
        unknown = set(self.attention_kwargs) - accepted
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)} for attention {self.attention!r}; it accepts {sorted(accepted)}"
            )
        self.attention_kwargs = {**attention_defaults(self.attention), **self.attention_kwargs}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Rebuild from :meth:`to_dict`; unknown keys are rejected, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig key(s) {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**data)
