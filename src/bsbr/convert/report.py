"""Deprecated name of :mod:`bsbr.convert.study.report` (the conversion study's report); import from there.  This
module re-exports its names and warns once on import."""

import warnings

from .study.report import VARIANT_NAMES, write_report

__all__ = ["VARIANT_NAMES", "write_report"]

warnings.warn("bsbr.convert.report was moved to bsbr.convert.study.report; import from there", DeprecationWarning,
              stacklevel=2)
