"""nn.Modules that own the weights of each attention mechanism and pick its form."""

from .base import CausalAttention
from .block import Block, FeedForward
from .bsbr import BSBRAttention, BSBRCache, BSBRLayer
from .cache import GrowableBuffer, LayerCache
from .standard import KVCache, StandardAttention

__all__ = [
    "BSBRAttention", "BSBRCache", "BSBRLayer", "Block", "CausalAttention", "FeedForward", "GrowableBuffer",
    "KVCache", "LayerCache", "StandardAttention",
]
