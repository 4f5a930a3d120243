"""Saving and loading converted models: the converted model and config types, their Auto registration, and
:func:`from_pretrained`; also the checks of any model directory that a conversion or a load opens.

:func:`~bsbr.convert.to_bsbr.convert_to_bsbr` gives the model a subclass of its own class and its config a subclass
of its config class (:func:`_subclass`, :func:`_config_subclass`), so that ``save_pretrained`` writes one directory
(safetensors + config, the BSBR settings in ``config.bsbr``) that :func:`from_pretrained` loads again.

Loading the standard way: a converted model's config is of a subclass of its own config class whose model_type is
``"bsbr_<model_type>"`` (e.g. ``bsbr_llama``), and this module registers those types with ``AutoConfig`` and
``AutoModelForCausalLM`` (importing ``bsbr.convert`` does it).  So ``AutoModelForCausalLM.from_pretrained(dir)``
returns the converted model once ``bsbr.convert`` is imported, and fails loudly (unknown model type) before; it
never hands back the original attention.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .backends import BSBR_IMPL
from .cache import BSBRHFCache
from .families import FAMILIES, PREFIX, SUPPORTED_CLASSES, base_model_type, bsbr_modules, family_of, head_counts
from .meta import OPTION_NAMES, BSBRMeta

HOW_TO_LOAD = ("import bsbr.convert, then AutoModelForCausalLM.from_pretrained(dir) or "
               "bsbr.convert.from_pretrained(dir); without bsbr, transformers does not know model_type bsbr_*")

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


def _saved_options(settings: dict, where: str = "config") -> dict:
    """The BSBR options in saved ``settings`` (config.bsbr).  A null where a converted model always saves a value
    (every option but ``retrieval_window``) is a ValueError naming it: None means "the default" to
    ``convert_to_bsbr``, so it would load another model than the one saved."""
    options = {k: settings[k] for k in OPTION_NAMES if k in settings and k not in ("gate_init", "meta_init")}
    nulls = sorted(k for k, v in options.items() if v is None and k != "retrieval_window")
    if nulls:
        raise ValueError(f"{where}: 'bsbr' settings {nulls} are null; a converted model saves a value for each (null "
                         "would load the defaults, another model than the one saved)")
    return options


def _attach(model: nn.Module, settings: dict) -> None:
    """Give every attention module of ``model`` a BSBRMeta built from saved ``settings`` (config.bsbr)."""
    options = _saved_options(settings)
    try:
        chunk, factor = settings["chunk_size"], settings.get("compression_factor")
    except (KeyError, TypeError) as err:
        raise ValueError(f"config 'bsbr' settings lack {err}") from None
    H, Hk, d = head_counts(model)
    ref = next(model.parameters())
    for attn in family_of(model).attention_modules(model):
        attn.bsbr = BSBRMeta(H, Hk, d, chunk, compression_factor=factor, **options).to(device=ref.device,
                                                                                       dtype=ref.dtype)


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
        options = _saved_options(settings, str(path / "config.json"))
        options.setdefault("retrieval", "states")  # the only mode before block retrieval
        from .to_bsbr import convert_to_bsbr  # here, not above: converting imports this module

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
