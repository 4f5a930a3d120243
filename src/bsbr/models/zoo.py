"""The registered mechanisms and the named model classes researchers construct directly.

Each named class is a thin constructor over the generic :class:`~bsbr.models.lm.TransformerModel` (hidden
states) or :class:`~bsbr.models.lm.CausalLM` (logits, loss, cache, generate).
"""

from __future__ import annotations

from ..layers.bsbr import BSBRAttention
from ..layers.standard import StandardAttention
from .config import ModelConfig
from .lm import CausalLM, TransformerModel
from .registry import canonical_name, register_attention

register_attention("BSBR", {"chunk_size": 128})(BSBRAttention)
register_attention("Standard")(StandardAttention)

_MODEL_OPTIONS = ("norm", "tie_embeddings")


def make_config(name: str, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int,
                dropout: float = 0.1, **options) -> ModelConfig:
    """A :class:`ModelConfig` for mechanism ``name``; ``norm`` and ``tie_embeddings`` go to the model, every
    other keyword to the attention (unknown ones are rejected)."""
    model_opts = {k: options.pop(k) for k in _MODEL_OPTIONS if k in options}
    return ModelConfig(vocab_size=vocab_size, hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads,
                       ff_dim=ff_dim, attention=canonical_name(name), attention_kwargs=options, dropout=dropout,
                       **model_opts)


def build_model(name: str, *, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int,
                dropout: float = 0.1, causal_lm: bool = False, **options) -> TransformerModel | CausalLM:
    """Build the model called ``name`` (see :func:`list_models`): the backbone (hidden states) by default,
    the causal LM with ``causal_lm=True``.  Mechanism options (chunk_size, window_size, ...) are keywords."""
    config = make_config(name, vocab_size, hidden_dim, num_layers, num_heads, ff_dim, dropout, **options)
    return CausalLM(config) if causal_lm else TransformerModel(config)


class BSBRModel(TransformerModel):
    """BSBR backbone: input_ids [B, T] -> hidden states [B, T, hidden_dim]."""

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, chunk_size: int,
                 ff_dim: int, dropout: float = 0.1, compression_factor: int | None = None, **options):
        super().__init__(make_config("BSBR", vocab_size, hidden_dim, num_layers, num_heads, ff_dim, dropout,
                                     chunk_size=chunk_size, compression_factor=compression_factor, **options))


class BSBRForCausalLM(CausalLM):
    """BSBR language model: logits, loss, streaming cache and ``generate``.  Same arguments as BSBRModel."""

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, chunk_size: int,
                 ff_dim: int, dropout: float = 0.1, compression_factor: int | None = None, **options):
        super().__init__(make_config("BSBR", vocab_size, hidden_dim, num_layers, num_heads, ff_dim, dropout,
                                     chunk_size=chunk_size, compression_factor=compression_factor, **options))


class StandardTransformer(TransformerModel):
    """Softmax-attention backbone: input_ids [B, T] -> hidden states [B, T, hidden_dim]."""

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int,
                 dropout: float = 0.1, **options):
        super().__init__(make_config("Standard", vocab_size, hidden_dim, num_layers, num_heads, ff_dim, dropout,
                                     **options))


class StandardForCausalLM(CausalLM):
    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int,
                 dropout: float = 0.1, **options):
        super().__init__(make_config("Standard", vocab_size, hidden_dim, num_layers, num_heads, ff_dim, dropout,
                                     **options))
