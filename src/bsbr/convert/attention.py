"""Deprecated: :mod:`bsbr.convert.attention` was split by job into :mod:`bsbr.convert.meta` (BSBRMeta, the new
weights), :mod:`bsbr.convert.masks` (the mask function), :mod:`bsbr.convert.padding` (padded rows),
:mod:`bsbr.convert.backends` (the attention functions) and :mod:`bsbr.convert.cache` (the streaming cache, whose
``BSBRCache`` is now ``BSBRHFCache``); import from there.  This module re-exports them and warns once on import."""

import warnings

from .backends import BSBR_IMPL, WINDOW_IMPL, bsbr_attention_forward, sliding_window_attention_forward
from .cache import _CACHE_KEY, BlocksRow, BSBRCacheLayer, BSBRHFCache, StreamRow  # noqa: F401 (_CACHE_KEY)
from .masks import _key_validity, bsbr_mask  # noqa: F401 (_key_validity: healing imported it from here)
from .meta import BLOCK_HEADS, BLOCK_OPTIONS, META_INITS, META_KEYS, RETRIEVALS, BSBRMeta, _cast  # noqa: F401
from .padding import _padded_rows, _rolled  # noqa: F401 (private helpers that lived here)

BSBRCache = BSBRHFCache

__all__ = ["BLOCK_HEADS", "BLOCK_OPTIONS", "BSBR_IMPL", "META_INITS", "META_KEYS", "RETRIEVALS", "WINDOW_IMPL",
           "BSBRCache", "BSBRCacheLayer", "BSBRHFCache", "BSBRMeta", "BlocksRow", "StreamRow",
           "bsbr_attention_forward", "bsbr_mask", "sliding_window_attention_forward"]

warnings.warn("bsbr.convert.attention was split into bsbr.convert.meta, bsbr.convert.masks, bsbr.convert.padding, "
              "bsbr.convert.backends and bsbr.convert.cache (BSBRCache is bsbr.convert.cache.BSBRHFCache); "
              "import from there", DeprecationWarning, stacklevel=2)
