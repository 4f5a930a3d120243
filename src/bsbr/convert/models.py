"""Deprecated name of :mod:`bsbr.convert.study.checkpoints` (the demo checkpoints of the conversion study; the name
collided with :mod:`bsbr.models`); import from there.  This module re-exports its names and warns once on import."""

import warnings

from .study.checkpoints import INSTALL, SMOLLM2_GGUF, pretrain_gpt2, smollm2, smollm2_gguf, train_tokenizer

__all__ = ["INSTALL", "SMOLLM2_GGUF", "pretrain_gpt2", "smollm2", "smollm2_gguf", "train_tokenizer"]

warnings.warn("bsbr.convert.models was renamed bsbr.convert.study.checkpoints; import from there",
              DeprecationWarning, stacklevel=2)
