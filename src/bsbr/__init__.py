"""bsbr — Block Sparse attention with Block Retrieval, six faithful baselines, and an honest harness."""

from .layers.bsbr import BSBRAttention, BSBRLayer
from .models import BSBRForCausalLM, BSBRModel, build_model, list_models

__version__ = "0.2.0"

__all__ = ["BSBRAttention", "BSBRForCausalLM", "BSBRLayer", "BSBRModel", "__version__", "build_model", "list_models"]
