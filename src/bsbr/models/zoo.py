"""The registered mechanisms and the named model classes researchers construct directly.

Each named class is a thin constructor over the generic :class:`~bsbr.models.lm.TransformerModel` (hidden
states) or :class:`~bsbr.models.lm.CausalLM` (logits, loss, cache, generate).
"""

from __future__ import annotations

from ..layers.bsbr import BSBRAttention, BSBRBlocksAttention
from ..layers.deltanet import DeltaNetAttention
from ..layers.gau import GAUAttention
from ..layers.hopfield import HopfieldAttention
from ..layers.linear import LinearAttention
from ..layers.sliding_window import SlidingWindowAttention
from ..layers.standard import StandardAttention
from .config import ModelConfig
from .lm import CausalLM, TransformerModel
from .registry import canonical_name, register_attention

register_attention("BSBR", {"chunk_size": 128})(BSBRAttention)
register_attention("Standard")(StandardAttention)
register_attention("Linear", {"chunk_size": 64})(LinearAttention)
register_attention("SlidingWindow", {"window_size": 128})(SlidingWindowAttention)
register_attention("DeltaNet", {"chunk_size": 64})(DeltaNetAttention)
register_attention("Hopfield", {"update_steps": 1})(HopfieldAttention)
register_attention("GAU", {"group_size": 256, "qk_dim": 128})(GAUAttention)
register_attention("BSBRBlocks", {"chunk_size": 128, "top_k": 4})(BSBRBlocksAttention)

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
    """Softmax-attention language model: logits, loss, streaming cache and ``generate``."""

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int,
                 dropout: float = 0.1, **options):
        super().__init__(make_config("Standard", vocab_size, hidden_dim, num_layers, num_heads, ff_dim, dropout,
                                     **options))


class _NamedModel:
    """A named model class: ``Class(vocab_size, hidden_dim, num_layers, num_heads, ff_dim, dropout=0.1, **options)``
    builds its base (TransformerModel or CausalLM) with the registered attention ``mechanism``."""

    mechanism: str

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int,
                 dropout: float = 0.1, **options):
        super().__init__(make_config(self.mechanism, vocab_size, hidden_dim, num_layers, num_heads, ff_dim, dropout,
                                     **options))


class LinearTransformer(_NamedModel, TransformerModel):
    """Linear-attention backbone: input_ids [B, T] -> hidden states [B, T, hidden_dim]."""

    mechanism = "Linear"


class LinearForCausalLM(_NamedModel, CausalLM):
    """Linear-attention language model: logits, loss, streaming cache and ``generate``."""

    mechanism = "Linear"


class SlidingWindowTransformer(_NamedModel, TransformerModel):
    """Sliding-window backbone: input_ids [B, T] -> hidden states [B, T, hidden_dim]. Option: window_size."""

    mechanism = "SlidingWindow"


class SlidingWindowForCausalLM(_NamedModel, CausalLM):
    """Sliding-window language model: logits, loss, streaming cache and ``generate``. Option: window_size."""

    mechanism = "SlidingWindow"


class DeltaNet(_NamedModel, TransformerModel):
    """DeltaNet backbone: input_ids [B, T] -> hidden states [B, T, hidden_dim]."""

    mechanism = "DeltaNet"


class DeltaNetForCausalLM(_NamedModel, CausalLM):
    """DeltaNet language model: logits, loss, streaming cache and ``generate``."""

    mechanism = "DeltaNet"


class HopfieldNetwork(_NamedModel, TransformerModel):
    """Hopfield-layer backbone: input_ids [B, T] -> hidden states [B, T, hidden_dim]."""

    mechanism = "Hopfield"


class HopfieldForCausalLM(_NamedModel, CausalLM):
    """Hopfield-layer language model: logits, loss, streaming cache and ``generate``."""

    mechanism = "Hopfield"


class GAU(_NamedModel, TransformerModel):
    """Gated-attention-unit (FLASH) backbone: input_ids [B, T] -> hidden states [B, T, hidden_dim]. ff_dim is
    unused."""

    mechanism = "GAU"


class GAUForCausalLM(_NamedModel, CausalLM):
    """Gated-attention-unit (FLASH) language model: logits, loss, streaming cache and ``generate``. ff_dim is
    unused."""

    mechanism = "GAU"
