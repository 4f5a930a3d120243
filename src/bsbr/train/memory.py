"""Deprecated name of :mod:`bsbr.train.peak_memory` (beside :mod:`bsbr.utils.memory`, which measures a model on
one input, it was easy to mistake); import ``PeakMemory`` from there."""

import warnings

from .peak_memory import PeakMemory

__all__ = ["PeakMemory"]

warnings.warn("bsbr.train.memory was renamed bsbr.train.peak_memory; import from there", DeprecationWarning,
              stacklevel=2)
