"""The generic causal LM, the name registry and the named model classes."""

from .config import ModelConfig
from .lm import CausalLM, CausalLMOutput, ModelCache, TransformerModel
from .registry import list_models, register_attention
from .zoo import (
    BSBRForCausalLM,
    BSBRModel,
    StandardForCausalLM,
    StandardTransformer,
    build_model,
    make_config,
)

__all__ = [
    "BSBRForCausalLM", "BSBRModel", "CausalLM", "CausalLMOutput", "ModelCache", "ModelConfig",
    "StandardForCausalLM", "StandardTransformer", "TransformerModel", "build_model", "list_models",
    "make_config", "register_attention",
]
