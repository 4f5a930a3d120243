"""nn.Modules that own the weights of each attention mechanism and pick its form."""

from .base import CausalAttention
from .block import Block, FeedForward
from .bsbr import BSBRAttention, BSBRCache, BSBRLayer
from .cache import GrowableBuffer, LayerCache
from .deltanet import DeltaNetAttention
from .gau import GAUAttention
from .hopfield import HopfieldAttention
from .linear import LinearAttention
from .sliding_window import SlidingWindowAttention
from .standard import KVCache, StandardAttention

__all__ = [
    "BSBRAttention", "BSBRCache", "BSBRLayer", "Block", "CausalAttention", "DeltaNetAttention", "FeedForward",
    "GAUAttention", "GrowableBuffer", "HopfieldAttention", "KVCache", "LayerCache", "LinearAttention",
    "SlidingWindowAttention", "StandardAttention",
]
