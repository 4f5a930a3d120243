"""Deprecated name of :mod:`bsbr.convert.to_bsbr` (``convert_to_bsbr``, ``from_pretrained``, ``set_attention``,
...; "convert.convert" said nothing); import from there or from :mod:`bsbr.convert`.  This module re-exports its
names and warns once on import."""

import warnings

from .backends import BSBR_IMPL, WINDOW_IMPL
from .cache import BSBRHFCache
from .loading import _from_pretrained  # noqa: F401 (the CLI imported it from here)
from .meta import BLOCK_OPTIONS, BSBRMeta
from .to_bsbr import (
    DEFAULT_RETRIEVAL,
    FAMILIES,
    HOW_TO_LOAD,
    OPTION_NAMES,
    PREFIX,
    STATE_OPTIONS,
    SUPPORTED_CLASSES,
    Family,
    base_model_type,
    bsbr_modules,
    check_model_dir,
    check_options,
    convert_to_bsbr,
    family_of,
    from_pretrained,
    head_counts,
    load_config,
    register_auto_classes,
    set_attention,
)

BSBRCache = BSBRHFCache

__all__ = ["BLOCK_OPTIONS", "BSBR_IMPL", "DEFAULT_RETRIEVAL", "FAMILIES", "HOW_TO_LOAD", "OPTION_NAMES", "PREFIX",
           "STATE_OPTIONS", "SUPPORTED_CLASSES", "WINDOW_IMPL", "BSBRCache", "BSBRHFCache", "BSBRMeta", "Family",
           "base_model_type", "bsbr_modules", "check_model_dir", "check_options", "convert_to_bsbr", "family_of",
           "from_pretrained", "head_counts", "load_config", "register_auto_classes", "set_attention"]

warnings.warn("bsbr.convert.convert was renamed bsbr.convert.to_bsbr; import from there (or from bsbr.convert)",
              DeprecationWarning, stacklevel=2)
