"""The generic causal LM, the name registry and the named model classes."""

from .config import ModelConfig
from .lm import CausalLM, CausalLMOutput, ModelCache, TransformerModel
from .registry import list_models, register_attention
from .zoo import (
    GAU,
    BSBRForCausalLM,
    BSBRModel,
    DeltaNet,
    DeltaNetForCausalLM,
    GAUForCausalLM,
    HopfieldForCausalLM,
    HopfieldNetwork,
    LinearForCausalLM,
    LinearTransformer,
    SlidingWindowForCausalLM,
    SlidingWindowTransformer,
    StandardForCausalLM,
    StandardTransformer,
    build_model,
    make_config,
)

__all__ = [
    "GAU", "BSBRForCausalLM", "BSBRModel", "CausalLM", "CausalLMOutput", "DeltaNet", "DeltaNetForCausalLM",
    "GAUForCausalLM", "HopfieldForCausalLM", "HopfieldNetwork", "LinearForCausalLM", "LinearTransformer",
    "ModelCache", "ModelConfig", "SlidingWindowForCausalLM", "SlidingWindowTransformer",
    "StandardForCausalLM", "StandardTransformer", "TransformerModel", "build_model", "list_models",
    "make_config", "register_attention",
]
