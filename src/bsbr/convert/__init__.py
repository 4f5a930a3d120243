"""Hugging Face causal LMs converted to BSBR (needs the ``hf`` extra: transformers >= 5).

    from bsbr.convert import convert_to_bsbr, compare_outputs
    model = convert_to_bsbr("path/to/model", chunk_size=256)     # same class, BSBR attention, generate() works

See docs/convert.md for what is exact, what is measured and how healing trains the new weights.
"""

from .attention import BSBR_IMPL, WINDOW_IMPL, BSBRCache, BSBRMeta, bsbr_attention_forward
from .convert import (
    SUPPORTED_CLASSES,
    bsbr_modules,
    check_model_dir,
    convert_to_bsbr,
    family_of,
    from_pretrained,
    head_counts,
    set_attention,
)

__all__ = ["BSBR_IMPL", "WINDOW_IMPL", "BSBRCache", "BSBRMeta", "SUPPORTED_CLASSES", "bsbr_attention_forward",
           "bsbr_modules", "check_model_dir", "convert_to_bsbr", "family_of", "from_pretrained", "head_counts",
           "set_attention"]
