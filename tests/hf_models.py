"""Tiny Hugging Face causal LMs (GPT-2 and LLaMA with grouped-query attention, float64) and what the conversion
tests measure them with; import after ``pytest.importorskip("transformers")``."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from bsbr.convert import bsbr_modules

VOCAB = 97


def tiny(family: str, seed: int = 0, vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=48, n_layer=2, n_head=4, n_positions=256, bos_token_id=0,
                         eos_token_id=0, attn_implementation="sdpa")
        model = GPT2LMHeadModel(cfg)
    else:  # LLaMA with grouped-query attention: 6 query heads share 2 key/value heads
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, attn_implementation="sdpa")
        model = LlamaForCausalLM(cfg)
    return model.double().eval()


def randomise_meta(model, seed: int = 0) -> None:
    """Move the new weights away from their initialisation (identity maps, gate 1 would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for meta in bsbr_modules(model):
            for p in meta.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def kl(p_logits, q_logits) -> float:
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).max().item()


FAMILIES = ["gpt2", "llama"]

# the retrieval modes the backend and cache tests run: the state readout and block retrieval's variants
MODES = [{"retrieval": "states"}, {"retrieval": "blocks", "top_k": 1},
         {"retrieval": "blocks", "top_k": 2, "block_summary": "minmax", "sink_tokens": 3, "prev_chunk": True},
         {"retrieval": "blocks", "top_k": 1, "block_select": "chunk", "sink_tokens": 0},
         {"retrieval": "blocks", "top_k": 1, "block_heads": "query"}]

