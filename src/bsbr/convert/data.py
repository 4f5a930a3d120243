"""Deprecated name of :mod:`bsbr.convert.study.windows` (token windows of the conversion study); import from there.
This module re-exports its names and warns once on import."""

import warnings

from .study.windows import HELD_OUT, token_stream, windows

__all__ = ["HELD_OUT", "token_stream", "windows"]

warnings.warn("bsbr.convert.data was renamed bsbr.convert.study.windows; import from there", DeprecationWarning,
              stacklevel=2)
