"""Convert a pretrained Hugging Face causal LM to BSBR, save it and load it back.

``convert_to_bsbr(model_or_path, chunk_size=128, compression_factor=None, **options)`` keeps the model's class,
weights and forward code; it attaches a :class:`~bsbr.convert.meta.BSBRMeta` to every attention module,
switches ``config._attn_implementation`` to ``"bsbr"`` and records the settings in ``config.bsbr``, so that
``save_pretrained`` writes one directory (safetensors + config) that :func:`from_pretrained` loads again.

Loading the standard way: a converted model's config is of a subclass of its own config class whose model_type is
``"bsbr_<model_type>"`` (e.g. ``bsbr_llama``), and this module registers those types with ``AutoConfig`` and
``AutoModelForCausalLM`` (importing ``bsbr.convert`` does it).  So ``AutoModelForCausalLM.from_pretrained(dir)``
returns the converted model once ``bsbr.convert`` is imported, and fails loudly (unknown model type) before; it
never hands back the original attention.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import _checks
from .backends import BSBR_IMPL, WINDOW_IMPL
from .cache import BSBRHFCache
from .meta import BLOCK_OPTIONS, BSBRMeta


@dataclass(frozen=True)
class Family:
    """Where a family keeps its attention modules and how many heads they have."""

    name: str
    layers: str  # dotted path from the CausalLM to the list of blocks
    attention: str  # attribute of a block holding the attention module

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        blocks = model
        for part in self.layers.split("."):
            blocks = getattr(blocks, part)
        return [getattr(block, self.attention) for block in blocks]


FAMILIES = {
    "gpt2": Family("GPT-2", "transformer.h", "attn"),
    "llama": Family("LLaMA", "model.layers", "self_attn"),
    "qwen2": Family("Qwen2", "model.layers", "self_attn"),
    "mistral": Family("Mistral", "model.layers", "self_attn"),
}
SUPPORTED_CLASSES = ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
STATE_OPTIONS = ("state_norm", "meta_key", "retrieval_window", "gate_init", "meta_init")
OPTION_NAMES = (*STATE_OPTIONS, "retrieval", "sink_tokens", *BLOCK_OPTIONS)
DEFAULT_RETRIEVAL = "blocks"
PREFIX = "bsbr_"  # model_type of a converted model's config: PREFIX + the original's
HOW_TO_LOAD = ("import bsbr.convert, then AutoModelForCausalLM.from_pretrained(dir) or "
               "bsbr.convert.from_pretrained(dir); without bsbr, transformers does not know model_type bsbr_*")


def base_model_type(model_type: str | None) -> str | None:
    """The original model_type of a (possibly converted, ``bsbr_``-prefixed) config's model_type."""
    if isinstance(model_type, str) and model_type.startswith(PREFIX):
        return model_type[len(PREFIX) :]
    return model_type


def family_of(model: nn.Module) -> Family:
    """The family of a loaded model, or a ValueError naming its class and the supported ones."""
    config = getattr(model, "config", None)
    model_type = base_model_type(getattr(config, "model_type", None))
    name = type(model).__name__
    if model_type not in FAMILIES or not name.endswith(("LMHeadModel", "ForCausalLM")):
        raise ValueError(f"cannot convert {name} (model_type {model_type!r}) to BSBR; supported classes: "
                         f"{', '.join(SUPPORTED_CLASSES)}")
    if model_type == "gpt2" and getattr(config, "add_cross_attention", False):
        raise ValueError("cannot convert a GPT-2 with cross-attention (add_cross_attention=True) to BSBR")
    return FAMILIES[model_type]


def head_counts(model) -> tuple[int, int, int]:
    """(query heads H, key/value heads Hk, head dim d) of a supported model (or of its config)."""
    c = getattr(model, "config", model)
    if base_model_type(c.model_type) == "gpt2":
        return c.n_head, c.n_head, c.n_embd // c.n_head
    H = c.num_attention_heads
    Hk = getattr(c, "num_key_value_heads", None) or H
    d = getattr(c, "head_dim", None) or c.hidden_size // H
    return H, Hk, d


_SUBCLASSES: dict[type, type] = {}
_CONFIGS: dict[type, type] = {}


def _config_subclass(cls: type) -> type:
    """The config class of converted models of ``cls``'s family (e.g. ``BSBRLlamaConfig``): the same fields, the
    model_type prefixed.  (Its own name and module: transformers' Auto mappings key configs by class name.)"""
    if getattr(cls, "_bsbr_converted", False):
        return cls
    if cls not in _CONFIGS:
        _CONFIGS[cls] = type("BSBR" + cls.__name__, (cls,), {"model_type": PREFIX + cls.model_type,
                                                             "_bsbr_converted": True, "__module__": __name__})
    return _CONFIGS[cls]


def _subclass(cls: type) -> type:
    """The model's own class with three changes: ``generate()`` makes a :class:`~bsbr.convert.cache.BSBRHFCache`
    when given no cache, a forward given no cache makes none, and building it from a config with BSBR settings
    (``from_pretrained`` of a saved converted model, through the Auto classes) attaches the BSBR modules and selects
    the BSBR attention."""
    if getattr(cls, "_bsbr_converted", False):
        return cls
    if cls in _SUBCLASSES:
        return _SUBCLASSES[cls]

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        settings = getattr(config, "bsbr", None)
        if isinstance(settings, dict) and not any(isinstance(m, BSBRMeta) for m in self.modules()):
            _attach(self, settings)
            self.config._attn_implementation = BSBR_IMPL

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if (model_kwargs.get("cache") is None and model_kwargs.get("past_key_values") is None
                and generation_config.use_cache is not False and self.config._attn_implementation == BSBR_IMPL):
            model_kwargs["cache"] = BSBRHFCache()
        return cls._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)

    def forward(self, *args, **kwargs):
        # a forward without a cache keeps none (a KV cache would hold every key and value, which BSBR does not
        # need); pass cache=BSBRHFCache() to continue a stream
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            kwargs.setdefault("use_cache", False)
        return cls.forward(self, *args, **kwargs)

    sub = type(cls.__name__, (cls,), {"_bsbr_converted": True, "__module__": cls.__module__, "forward": forward,
                                      "__init__": __init__, "config_class": _config_subclass(cls.config_class),
                                      "_prepare_cache_for_generation": _prepare_cache_for_generation})
    sub.__qualname__ = cls.__qualname__
    _SUBCLASSES[cls] = sub
    return sub


def register_auto_classes() -> None:
    """Register every supported family's converted config and model classes (model_type ``bsbr_<type>``) with
    ``AutoConfig`` and ``AutoModelForCausalLM``, so that the standard loading path returns a converted model.
    Idempotent; run on import of this module."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    for model_type in FAMILIES:
        if PREFIX + model_type in CONFIG_MAPPING:
            continue
        config_cls = CONFIG_MAPPING[model_type]
        model_cls = _subclass(MODEL_FOR_CAUSAL_LM_MAPPING[config_cls])
        AutoConfig.register(PREFIX + model_type, model_cls.config_class)
        AutoModelForCausalLM.register(model_cls.config_class, model_cls)


def load_config(model_or_path, gguf_file: str | None = None, trust_remote_code: bool = False):
    """The config of a model directory or hub name, without its weights, with a clear error for a missing or bad
    directory (no config, unreadable config, no weights) and for an architecture that cannot be converted."""
    from transformers import AutoConfig

    path = Path(model_or_path)
    if path.exists():
        check_model_dir(path, gguf_file=gguf_file)
    elif path.is_absolute() or str(model_or_path).startswith((".", "~")) or str(model_or_path).count("/") > 1:
        raise FileNotFoundError(f"no such directory: {str(model_or_path)!r}")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(str(model_or_path), trust_remote_code=trust_remote_code, **kwargs)
    except OSError as err:  # neither a local directory nor a reachable hub model
        if path.exists():
            raise ValueError(f"{path}: transformers could not read its config ({str(err).splitlines()[0]})") from None
        raise FileNotFoundError(f"{model_or_path!r} is not a local model directory and could not be loaded from a "
                                f"hub: {str(err).splitlines()[0]}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # a config transformers cannot build
        raise ValueError(f"{model_or_path}: its config could not be read ({type(err).__name__}: {err})") from None
    if base_model_type(getattr(config, "model_type", None)) not in FAMILIES:
        name = (getattr(config, "architectures", None) or [config.model_type])[0]
        raise ValueError(f"{model_or_path}: cannot convert {name} (model_type {config.model_type!r}) to BSBR; "
                         f"supported classes: {', '.join(SUPPORTED_CLASSES)}")
    return config


def _load(model_or_path, **load_kwargs) -> nn.Module:
    if isinstance(model_or_path, nn.Module):
        return model_or_path
    if not isinstance(model_or_path, str | os.PathLike):
        raise TypeError(f"model_or_path must be a transformers model or a path/hub name, got {type(model_or_path)}")
    from transformers import AutoModelForCausalLM

    load_config(model_or_path, load_kwargs.get("gguf_file"), load_kwargs.get("trust_remote_code", False))
    load_kwargs.setdefault("attn_implementation", "sdpa")
    return _from_pretrained(AutoModelForCausalLM, str(model_or_path), **load_kwargs)


def _from_pretrained(cls, path: str, **kwargs):
    """``cls.from_pretrained`` with anything transformers or safetensors raise on a bad directory (a truncated
    weights file, weights of other shapes, a config it cannot build) turned into a ValueError naming the path."""
    try:
        return cls.from_pretrained(path, **kwargs)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - foreign libraries raise many types; the user needs the file named
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"{path}: the model could not be loaded ({type(err).__name__}: {first})") from None


def check_model_dir(path: Path, gguf_file: str | None = None) -> None:
    """A clear error for a model directory without a config, with an unreadable one, or without weights."""
    if not path.is_dir():
        raise ValueError(f"{path}: expected a model directory (config.json and weights), got a file")
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"{path}: gguf_file {gguf_file!r} not found in the directory")
        return
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ValueError(f"{path}: no config.json; expected a directory written by save_pretrained")
    try:
        data = json.loads(cfg.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{cfg}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{cfg}: expected a JSON object with a 'model_type' field")
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")]
    if not weights:
        raise ValueError(f"{path}: no weights (model.safetensors, pytorch_model.bin or a shard index) in the directory")


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


def _attach(model: nn.Module, settings: dict) -> None:
    """Give every attention module of ``model`` a BSBRMeta built from saved ``settings`` (config.bsbr)."""
    options = {k: settings[k] for k in OPTION_NAMES if k in settings and k not in ("gate_init", "meta_init")}
    try:
        chunk, factor = settings["chunk_size"], settings.get("compression_factor")
    except (KeyError, TypeError) as err:
        raise ValueError(f"config 'bsbr' settings lack {err}") from None
    H, Hk, d = head_counts(model)
    ref = next(model.parameters())
    for attn in family_of(model).attention_modules(model):
        attn.bsbr = BSBRMeta(H, Hk, d, chunk, compression_factor=factor, **options).to(device=ref.device,
                                                                                       dtype=ref.dtype)


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


def bsbr_modules(model: nn.Module) -> list[BSBRMeta]:
    """The BSBRMeta of every layer of a converted model."""
    mods = [attn.bsbr for attn in family_of(model).attention_modules(model) if isinstance(getattr(attn, "bsbr", None),
                                                                                           BSBRMeta)]
    if not mods:
        raise ValueError(f"{type(model).__name__} is not a converted model (no BSBR modules); use convert_to_bsbr")
    return mods


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


def from_pretrained(path, **load_kwargs) -> nn.Module:
    """Load a converted model written by ``save_pretrained``, with its BSBR settings and weights.

    ``AutoModelForCausalLM.from_pretrained(path)`` does the same once ``bsbr.convert`` is imported; this function
    also loads directories saved before the converted model types existed (model_type of the original, BSBR
    settings in ``config.json["bsbr"]``), which the Auto classes would load as the original model.
    """
    path = Path(path)
    check_model_dir(path)
    config = json.loads((path / "config.json").read_text())
    settings = config.get("bsbr")
    if not isinstance(settings, dict):
        raise ValueError(f"{path / 'config.json'}: no 'bsbr' settings; this is not a converted model "
                         "(convert it with convert_to_bsbr)")
    if "chunk_size" not in settings:
        raise ValueError(f"{path / 'config.json'}: 'bsbr' settings lack 'chunk_size'")
    import logging

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    register_auto_classes()
    if str(config.get("model_type", "")).startswith(PREFIX):
        model = _from_pretrained(AutoModelForCausalLM, str(path), **load_kwargs)
        bsbr_modules(model)
        if model.config._attn_implementation != BSBR_IMPL:  # an explicit attn_implementation was asked for
            model.set_attn_implementation(model.config._attn_implementation)
    else:
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity(logging.ERROR)  # the BSBR weights are "unexpected" to the original class
        try:
            model = _from_pretrained(AutoModelForCausalLM, str(path), attn_implementation="sdpa", **load_kwargs)
        finally:
            hf_logging.set_verbosity(level)
        chunk, factor = settings["chunk_size"], settings.get("compression_factor")
        options = {k: settings[k] for k in OPTION_NAMES if k in settings and k not in ("gate_init", "meta_init")}
        options.setdefault("retrieval", "states")  # the only mode before block retrieval
        model = convert_to_bsbr(model, chunk, factor, **options)
    _load_bsbr_weights(model, path)
    return model


def _load_bsbr_weights(model: nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    wanted = {name: p for name, p in model.named_parameters() if ".bsbr." in name}
    files = sorted(path.glob("*.safetensors"))
    found = {}
    for file in files:
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file}: not a readable safetensors file ({err})") from None
        found.update({k: v for k, v in tensors.items() if ".bsbr." in k})
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ValueError(f"{path}: the BSBR weights {missing[:3]}{'...' if len(missing) > 3 else ''} are missing "
                         f"from {[f.name for f in files]}")
    with torch.no_grad():
        for name, p in wanted.items():
            if found[name].shape != p.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(found[name].shape)}, expected {tuple(p.shape)}")
            p.copy_(found[name])


register_auto_classes()
