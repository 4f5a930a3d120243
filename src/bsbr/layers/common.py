"""Deprecated name of :mod:`bsbr.layers.qkv` (QKVAttention, split_heads and the row-block helpers); import from
there.  This module re-exports them and warns once on import."""

import warnings

from .qkv import BLOCK_BYTES, QKVAttention, blocked, linear_into, merge_heads, no_graph, row_blocks, split_heads

__all__ = ["BLOCK_BYTES", "QKVAttention", "blocked", "linear_into", "merge_heads", "no_graph", "row_blocks",
           "split_heads"]

warnings.warn("bsbr.layers.common was renamed bsbr.layers.qkv; import from there", DeprecationWarning,
              stacklevel=2)
