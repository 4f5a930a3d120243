"""Deprecated name of :mod:`bsbr.tasks.language_modeling` (beside :mod:`bsbr.models.lm`, it read as the model);
import ``LanguageModeling`` from there or from :mod:`bsbr.tasks`."""

import warnings

from .language_modeling import LanguageModeling

__all__ = ["LanguageModeling"]

warnings.warn("bsbr.tasks.lm was renamed bsbr.tasks.language_modeling; import from there", DeprecationWarning,
              stacklevel=2)
