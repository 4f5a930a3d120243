"""Convert a pretrained Hugging Face causal LM to BSBR.

``convert_to_bsbr(model_or_path, chunk_size=128, compression_factor=None, **options)`` keeps the model's class,
weights and forward code; it attaches a :class:`~bsbr.convert.meta.BSBRMeta` to every attention module,
switches ``config._attn_implementation`` to ``"bsbr"`` and records the settings in ``config.bsbr``, so that
``save_pretrained`` writes one directory (safetensors + config) that :func:`~bsbr.convert.loading.from_pretrained`
loads again.  :func:`set_attention` switches a converted model between BSBR and the attention forms it is compared
with.

Saving and loading (``from_pretrained``, the Auto classes, the checks of a model directory) are
:mod:`bsbr.convert.loading`; the supported families and where their attention modules are,
:mod:`bsbr.convert.families`.  Their public names still import from here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .. import _checks
from .backends import BSBR_IMPL, WINDOW_IMPL
from .families import (
    FAMILIES,
    PREFIX,
    SUPPORTED_CLASSES,
    Family,
    base_model_type,
    bsbr_modules,
    family_of,
    head_counts,
)
from .loading import (
    HOW_TO_LOAD,
    _config_subclass,
    _load,
    _subclass,
    check_model_dir,
    from_pretrained,
    load_config,
    register_auto_classes,
)
from .meta import OPTION_NAMES, STATE_OPTIONS, BSBRMeta

__all__ = ["DEFAULT_RETRIEVAL", "FAMILIES", "HOW_TO_LOAD", "OPTION_NAMES", "PREFIX", "STATE_OPTIONS",
           "SUPPORTED_CLASSES", "Family", "base_model_type", "bsbr_modules", "check_model_dir", "check_options",
           "convert_to_bsbr", "family_of", "from_pretrained", "head_counts", "load_config", "register_auto_classes",
           "set_attention"]

DEFAULT_RETRIEVAL = "blocks"


def check_options(chunk_size, compression_factor, options: dict) -> None:
    """Validate the arguments of :func:`convert_to_bsbr` before any work."""
    _checks.positive_int("chunk_size", chunk_size)
    unknown = set(options) - set(OPTION_NAMES)
    if unknown:
        raise ValueError(f"unknown BSBR option(s) {sorted(unknown)}; expected some of {list(OPTION_NAMES)}")
    if compression_factor is not None:
        _checks.positive_int("compression_factor", compression_factor)
    mode = options.get("retrieval", DEFAULT_RETRIEVAL)
    if not isinstance(mode, bool):
        _checks.one_of("retrieval", mode, ("blocks", "states", "none"))
    if mode == "blocks":
        wrong = [k for k in STATE_OPTIONS if k in options]
        if compression_factor is not None:
            wrong.insert(0, "compression_factor")
        if wrong:
            raise ValueError(f"{wrong} belong to the state readout (retrieval='states'); retrieval='blocks' has no "
                             "meta weights, states or gate")


def _normalised(chunk_size: int, options: dict) -> dict:
    """The options with the retrieval mode spelled out and block retrieval's defaults filled in."""
    options = dict(options)
    mode = options.get("retrieval", DEFAULT_RETRIEVAL)
    mode = ("states" if mode else "none") if isinstance(mode, bool) else mode
    options["retrieval"] = mode
    if mode == "blocks":
        options.setdefault("sink_tokens", chunk_size)  # the whole first chunk always in view
    return options


def convert_to_bsbr(model_or_path, chunk_size: int = 128, compression_factor: int | None = None, *,
                    dtype: torch.dtype | None = None, load_kwargs: dict | None = None, **bsbr_options) -> nn.Module:
    """Turn a pretrained causal LM into BSBR.

    ``model_or_path``: a loaded GPT-2 / LLaMA / Qwen2 / Mistral causal LM (converted in place and returned), a
    local directory (``from_pretrained``; a directory written by a converted model's ``save_pretrained`` loads
    with its BSBR weights), or a hub name where a hub is reachable.

    ``retrieval`` (default "blocks"): "blocks" is block retrieval of tokens, training-free and without new weights:
    ``top_k`` (2) earlier chunks per query and key/value group, scored by ``block_summary`` ("mean" key or
    "minmax" bound) with ``block_select`` "token" (per query) or "chunk" (per chunk), plus the stream's first
    ``sink_tokens`` (default ``chunk_size``: the whole first chunk) and, with ``prev_chunk``, the previous chunk.
    "states" is the state readout, with ``state_norm`` ("mean"), ``meta_key`` ("last" or "mean"),
    ``retrieval_window`` (None), ``gate_init`` (1.0), ``meta_init`` ("identity" or "zero"), ``compression_factor``
    and ``sink_tokens`` (0); "none" (or False) is local attention only.  ``load_kwargs`` go to ``from_pretrained``
    (e.g. ``gguf_file``).  Returns the model, of its own class, with ``config.bsbr`` holding the settings.
    """
    check_options(chunk_size, compression_factor, bsbr_options)
    bsbr_options = _normalised(chunk_size, bsbr_options)
    load_kwargs = dict(load_kwargs or {})
    if isinstance(model_or_path, str | os.PathLike) and Path(model_or_path).is_dir() and "gguf_file" not in load_kwargs:
        check_model_dir(Path(model_or_path))
        if "bsbr" in json.loads((Path(model_or_path) / "config.json").read_text()):
            return from_pretrained(model_or_path, **load_kwargs)
    model = _load(model_or_path, **load_kwargs)
    family = family_of(model)
    if dtype is not None:
        model = model.to(dtype)
    H, Hk, d = head_counts(model)
    if compression_factor is not None and (d * d) % compression_factor:
        raise ValueError(f"compression_factor must divide head_dim*head_dim={d * d}, got {compression_factor}")
    ref = next(model.parameters())
    for attn in family.attention_modules(model):
        meta = BSBRMeta(H, Hk, d, chunk_size, compression_factor=compression_factor, **bsbr_options)
        attn.bsbr = meta.to(device=ref.device, dtype=ref.dtype)
    model.__class__ = _subclass(type(model))
    model.config.__class__ = _config_subclass(type(model.config))
    init = {k: bsbr_options[k] for k in ("gate_init", "meta_init") if k in bsbr_options}
    model.config.bsbr = {**_settings(model), "family": family.name, "init": init, "how_to_load": HOW_TO_LOAD}
    model.set_attn_implementation(BSBR_IMPL)
    return model


def _settings(model: nn.Module) -> dict:
    meta = family_of(model).attention_modules(model)[0].bsbr
    return {**meta.settings(), "version": 1}


def set_attention(model: nn.Module, mode: str, window: int | None = None, sink: int = 0) -> None:
    """Switch a converted (or any supported) model between its attention forms: "bsbr", "original" (sdpa) or
    "sliding_window" (softmax over the ``window`` latest keys and, with ``sink`` > 0, each row's first ``sink``
    tokens).  Used by the comparisons."""
    _checks.one_of("mode", mode, ("bsbr", "original", "sliding_window"))
    if mode == "sliding_window":
        w = _checks.positive_int("window", window)
        s = _checks.non_negative_int("sink", sink)
        for attn in family_of(model).attention_modules(model):
            attn.bsbr_window, attn.bsbr_window_sink = w, s
        model.set_attn_implementation(WINDOW_IMPL)
    elif mode == "original":
        model.set_attn_implementation("sdpa")
    else:
        bsbr_modules(model)
        model.set_attn_implementation(BSBR_IMPL)
