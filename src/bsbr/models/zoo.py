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
    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int,
                 dropout: float = 0.1, **options):
        super().__init__(make_config("Standard", vocab_size, hidden_dim, num_layers, num_heads, ff_dim, dropout,
                                     **options))


def _named(mechanism: str, class_name: str, base: type, doc: str) -> type:
    """A named model class: ``class_name(vocab_size, hidden_dim, num_layers, num_heads, ff_dim, dropout=0.1,
    **options)`` building ``base`` (TransformerModel or CausalLM) with attention ``mechanism``."""

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, ff_dim: int,
                 dropout: float = 0.1, **options):
        base.__init__(self, make_config(mechanism, vocab_size, hidden_dim, num_layers, num_heads, ff_dim, dropout,
                                        **options))

    return type(class_name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


_HIDDEN = "backbone: input_ids [B, T] -> hidden states [B, T, hidden_dim]."
_LM = "language model: logits, loss, streaming cache and ``generate``."
LinearTransformer = _named("Linear", "LinearTransformer", TransformerModel, f"Linear-attention {_HIDDEN}")
LinearForCausalLM = _named("Linear", "LinearForCausalLM", CausalLM, f"Linear-attention {_LM}")
SlidingWindowTransformer = _named("SlidingWindow", "SlidingWindowTransformer", TransformerModel,
                                  f"Sliding-window {_HIDDEN} Option: window_size.")
SlidingWindowForCausalLM = _named("SlidingWindow", "SlidingWindowForCausalLM", CausalLM,
                                  f"Sliding-window {_LM} Option: window_size.")
DeltaNet = _named("DeltaNet", "DeltaNet", TransformerModel, f"DeltaNet {_HIDDEN}")
DeltaNetForCausalLM = _named("DeltaNet", "DeltaNetForCausalLM", CausalLM, f"DeltaNet {_LM}")
HopfieldNetwork = _named("Hopfield", "HopfieldNetwork", TransformerModel, f"Hopfield-layer {_HIDDEN}")
HopfieldForCausalLM = _named("Hopfield", "HopfieldForCausalLM", CausalLM, f"Hopfield-layer {_LM}")
GAU = _named("GAU", "GAU", TransformerModel, f"Gated-attention-unit (FLASH) {_HIDDEN} ff_dim is unused.")
GAUForCausalLM = _named("GAU", "GAUForCausalLM", CausalLM, f"Gated-attention-unit (FLASH) {_LM} ff_dim is unused.")
