"""Deprecated name of :mod:`bsbr.convert.study.pipeline` (the conversion study's run); import from there.  This
module re-exports its names and warns once on import."""

import warnings

from .study.pipeline import ConversionPlan, _stage, evaluate_variants, run_conversion, summary_rows  # noqa: F401

__all__ = ["ConversionPlan", "evaluate_variants", "run_conversion", "summary_rows"]

warnings.warn("bsbr.convert.pipeline was moved to bsbr.convert.study.pipeline; import from there",
              DeprecationWarning, stacklevel=2)
