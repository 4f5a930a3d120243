"""The Hugging Face model families that convert to BSBR, and where a model of one keeps what BSBR needs.

A supported causal LM (GPT-2, LLaMA, Qwen2, Mistral) is described by its :class:`Family`: the dotted path to its
list of blocks and the attribute of a block holding the attention module.  :func:`family_of` names a loaded model's
family (or refuses it), :func:`head_counts` reads its query heads H, key/value heads Hk and head dim d, and
:func:`bsbr_modules` finds the :class:`~bsbr.convert.meta.BSBRMeta` a conversion attached to each attention module.
A converted model's config has model_type :data:`PREFIX` + the original's (``bsbr_llama``); :func:`base_model_type`
strips it.  Converting (:mod:`bsbr.convert.to_bsbr`) and loading (:mod:`bsbr.convert.loading`) both read this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .meta import BSBRMeta


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
PREFIX = "bsbr_"  # model_type of a converted model's config: PREFIX + the original's


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


def bsbr_modules(model: nn.Module) -> list[BSBRMeta]:
    """The BSBRMeta of every layer of a converted model."""
    mods = [attn.bsbr for attn in family_of(model).attention_modules(model) if isinstance(getattr(attn, "bsbr", None),
                                                                                           BSBRMeta)]
    if not mods:
        raise ValueError(f"{type(model).__name__} is not a converted model (no BSBR modules); use convert_to_bsbr")
    return mods
