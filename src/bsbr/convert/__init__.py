"""Hugging Face causal LMs converted to BSBR (needs the ``hf`` extra: transformers >= 5).

    from bsbr.convert import convert_to_bsbr, compare_outputs
    model = convert_to_bsbr("path/to/model", chunk_size=256)     # same class, BSBR attention, generate() works

The library: :mod:`~bsbr.convert.to_bsbr` (converting), :mod:`~bsbr.convert.loading` (saving and loading
converted models, the Auto classes), :mod:`~bsbr.convert.families` (the supported models and where their attention
is), :mod:`~bsbr.convert.meta` (the new weights), :mod:`~bsbr.convert.backends` (the attention functions),
:mod:`~bsbr.convert.masks` and :mod:`~bsbr.convert.padding` (their mask function and padded rows),
:mod:`~bsbr.convert.cache` (the streaming cache, :class:`BSBRHFCache`), :mod:`~bsbr.convert.healing` and
:mod:`~bsbr.convert.metrics`.  The conversion study that ``bsbr convert`` runs (demo checkpoints, token windows, the
resumable pipeline, its report) is :mod:`bsbr.convert.study`.

See docs/convert.md for what is exact, what is measured and how healing trains the new weights.  The names below
are imported on first use, so ``bsbr`` itself works without transformers installed.  Where transformers is
installed, importing ``bsbr.convert`` registers the converted model types (``bsbr_llama``, ...) with its Auto
classes, so that ``AutoModelForCausalLM.from_pretrained(saved_dir)`` returns the converted model.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import warnings

_EXPORTS = {
    "BSBR_IMPL": "backends", "WINDOW_IMPL": "backends", "bsbr_attention_forward": "backends",
    "BSBRHFCache": "cache", "BSBRMeta": "meta",
    "SUPPORTED_CLASSES": "families", "bsbr_modules": "families", "family_of": "families", "head_counts": "families",
    "check_model_dir": "loading", "from_pretrained": "loading",
    "convert_to_bsbr": "to_bsbr", "set_attention": "to_bsbr",
    "compare_outputs": "metrics", "perplexity": "metrics", "reference_outputs": "metrics",
    "HealConfig": "healing", "heal": "healing",
}
# old names: still importable from bsbr.convert, with a DeprecationWarning naming where they are now
_DEPRECATED = {
    "BSBRCache": ("cache", "BSBRHFCache"),  # renamed: bsbr.layers.BSBRCache is the native layers' cache
    "ConversionPlan": ("study.pipeline", "ConversionPlan"),  # the conversion study, apart from the library
    "run_conversion": ("study.pipeline", "run_conversion"),
    "write_report": ("study.report", "write_report"),
}
__all__ = sorted(_EXPORTS)


def _register() -> None:
    if importlib.util.find_spec("transformers") is None:
        return
    # a transformers too old for bsbr.convert: the names below say so when used
    with contextlib.suppress(ImportError):
        importlib.import_module(".to_bsbr", __name__)  # its import of .loading registers the Auto classes


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name], name
    elif name in _DEPRECATED:
        module, attr = _DEPRECATED[name]
        warnings.warn(f"bsbr.convert.{name} is deprecated; use bsbr.convert.{module}.{attr}", DeprecationWarning,
                      stacklevel=2)
    else:
        raise AttributeError(f"module 'bsbr.convert' has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{module}", __name__)
    except ImportError as err:
        raise ImportError(f"bsbr.convert needs transformers >= 5: pip install 'bsbr[hf]' ({err})") from err
    return getattr(module, attr)


_register()
