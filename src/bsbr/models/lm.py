"""One generic causal language model for every mechanism: embeddings -> blocks -> norm (-> LM head).

Two models built from configs that differ only in ``attention`` differ only in their attention layers:
same embeddings, positions (rotary, inside attention, computed — no table, no maximum length), norms and
feed-forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import _checks
from ..layers.base import IMPLS, gather_tokens, left_align, scatter_tokens, zero_padding
from ..layers.block import Block, make_norm
from ..layers.cache import LayerCache
from .config import ModelConfig
from .registry import attention_class


@dataclass
class ModelCache:
    """Streaming state of a whole model: one cache per layer.  Feed it back with ``cache=``."""

    layers: list[LayerCache]

    @property
    def lengths(self) -> torch.Tensor:
        """[B] real tokens absorbed per row."""
        return self.layers[0].lengths

    def nbytes(self) -> int:
        """Bytes held, spare capacity of growable buffers included."""
        return sum(c.nbytes() for c in self.layers)

    def state_nbytes(self) -> int:
        """Bytes of live contents only: the size this context needs."""
        return sum(c.state_nbytes() for c in self.layers)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # [B, T, vocab]; None when forward(..., return_logits=False)
    loss: torch.Tensor | None = None  # mean next-token cross-entropy over labelled positions
    cache: ModelCache | None = None
    extras: dict = field(default_factory=dict)


SEGMENT_BYTES = 4 * 2**20
"""Long inference forwards of sub-quadratic models run in segments of about this many bytes of hidden states
(see :meth:`TransformerModel.forward`)."""


class TransformerModel(nn.Module):
    """The backbone: token ids [B, T] -> hidden states [B, T, hidden_dim].

    Inference on CPU: when no autograd graph is recorded and every layer's mechanism has ``segmented_prefill``
    (all but Standard and Hopfield), an input longer than one segment (:data:`SEGMENT_BYTES` of hidden states,
    a power of two >= 1,024 tokens) runs segment by segment through a streaming cache — the prefill path, tested
    equal to one parallel forward — so that every temporary of the forward is bounded by the segment, not by T;
    only the result is [B, T, hidden_dim].  With glibc's default malloc, T-sized temporaries go back to the system
    when freed and are faulted in again by the next call, a cost that grows faster than T (docs/benchmarks.md,
    "In the user's own process").
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        cls = attention_class(config.attention)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(cls(config.hidden_dim, config.num_heads, dropout=config.dropout, **config.attention_kwargs),
                  config.ff_dim, config.dropout, config.norm)
            for _ in range(config.num_layers)
        )
        self.norm = make_norm(config.norm, config.hidden_dim)
        self.gradient_checkpointing = False
        nn.init.normal_(self.embed.weight, std=0.02)

    # ------------------------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: ModelCache | None = None) -> torch.Tensor:
        """input_ids: [B, T] long; attention_mask: [B, T] (1 real, 0 padding).  Returns [B, T, hidden_dim],
        zero at padded positions.  With ``cache`` (from :meth:`new_cache`) the tokens continue the cached
        sequence and the cache is updated in place."""
        ids = _checks.input_ids(input_ids, self.config.vocab_size)
        mask = _checks.attention_mask(attention_mask, tuple(ids.shape))
        if cache is not None:
            if not isinstance(cache, ModelCache) or len(cache.layers) != len(self.blocks):
                raise ValueError("cache must be a ModelCache from this model's new_cache()")
            if cache.lengths.shape[0] != ids.shape[0]:
                raise ValueError(f"cache was made for batch {cache.lengths.shape[0]}, got input batch {ids.shape[0]}")
        # move each row's real tokens to the front once; every layer then sees a prefix mask
        perm, num_valid = left_align(mask, ids.shape[1])
        ids = gather_tokens(ids, perm)
        prefix = None
        if num_valid is not None:
            prefix = torch.arange(ids.shape[1], device=ids.device) < num_valid[:, None]
        segment = self.segment_length(ids) if cache is None else 0
        if segment:
            x = self._forward_segments(ids, segment)
        else:
            # padding's hidden states stay finite whatever the embedding gave them (see layers.base)
            x = zero_padding(self.dropout(self.embed(ids)), num_valid, in_place=True)
            for i, block in enumerate(self.blocks):
                layer_cache = None if cache is None else cache.layers[i]
                if self.gradient_checkpointing and self.training and layer_cache is None and torch.is_grad_enabled():
                    x = checkpoint(block, x, prefix, None, use_reentrant=False)
                else:
                    x = block(x, prefix, layer_cache)
            x = self.norm(x)
        if prefix is not None:
            x = x.masked_fill(~prefix[..., None], 0.0)
        return scatter_tokens(x, perm)

    def segment_length(self, ids: torch.Tensor) -> int:
        """Tokens per segment of a segmented inference forward of ``ids`` [B, T], or 0 for one parallel pass (see
        the class docstring): with autograd, off CPU, with active dropout, with a mechanism that keeps every key,
        or when T fits in one segment."""
        if ids.device.type != "cpu" or (self.training and self.config.dropout > 0):
            return 0
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return 0
        if not all(getattr(block.attn, "segmented_prefill", False) for block in self.blocks):
            return 0
        rows = SEGMENT_BYTES // (self.config.hidden_dim * self.embed.weight.element_size())
        # a power of two, so a multiple of the default chunk, window and group sizes (other sizes work as well: the
        # open chunk or group is carried across segments by the cache, as in streaming)
        segment = 1 << max(10, rows.bit_length() - 1)
        return segment if ids.shape[1] > segment else 0

    def _forward_segments(self, ids: torch.Tensor, segment: int) -> torch.Tensor:
        """norm(blocks(embed(ids))) for left-aligned ids [B, T], ``segment`` tokens at a time through a fresh
        cache.  Padding after a row's real tokens is fed as if real: causality keeps it from reaching them, and
        the caller zeroes its outputs, as the parallel form does."""
        B, T = ids.shape
        cache = self.new_cache(B)
        out = None
        for s0 in range(0, T, segment):
            x = self.dropout(self.embed(ids[:, s0 : s0 + segment]))
            for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
                x = block(x, None, layer_cache)
            x = self.norm(x)
            if out is None:
                out = x.new_empty(B, T, x.shape[-1])
            out[:, s0 : s0 + segment] = x
        return out

    # ------------------------------------------------------------------------------------ helpers
    def new_cache(self, batch_size: int) -> ModelCache:
        """An empty streaming cache for ``batch_size`` rows."""
        return ModelCache([block.attn.new_cache(batch_size) for block in self.blocks])

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block's activations in backward instead of storing them (training only)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def set_attention_impl(self, impl: str) -> None:
        """Use the "parallel" (default) or "reference" form of every attention layer."""
        _checks.one_of("impl", impl, IMPLS)
        for block in self.blocks:
            block.attn.impl = impl

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def get_attention_weights(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                              parts: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """Effective token-to-token weights of every layer: [num_layers, B, H, T, T].

        Head h of layer l outputs, at t, exactly sum_s w[l, b, h, t, s] v_s (before the output projection),
        so ``(w == 0).float().mean()`` is the attention sparsity.  With ``parts=True`` returns a dict of
        such tensors: "total" and the mechanism's parts (BSBR: "local" and "retrieval").  Builds T x T maps:
        meant for short inputs.
        """
        ids = _checks.input_ids(input_ids, self.config.vocab_size)
        mask = _checks.attention_mask(attention_mask, tuple(ids.shape))
        x = self.embed(ids)
        maps: dict[str, list[torch.Tensor]] = {}
        for block in self.blocks:
            w = block.attn.attention_weights(block.norm1(x), mask, parts=True)
            for key, value in w.items():
                maps.setdefault(key, []).append(value)
            x = block(x, mask)
        out = {key: torch.stack(per_layer) for key, per_layer in maps.items()}  # each [L, B, H, T, T]
        return out if parts else out["total"]


class CausalLM(nn.Module):
    """Backbone + LM head (tied to the embeddings by default)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.model = TransformerModel(config)
        self.config = config
        self.lm_head = nn.Linear(config.hidden_dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: ModelCache | None = None,
                use_cache: bool = False, return_logits: bool = True) -> CausalLMOutput:
        """Logits [B, T, vocab]; ``loss`` when ``labels`` ([B, T], -100 = ignore; shifted inside, as in Hugging
        Face: position t predicts labels[t + 1]); ``cache`` when ``use_cache`` (a new one if none given).

        ``return_logits=False`` (needs ``labels``) runs the LM head only at the positions that predict a label
        and returns ``logits=None``: the same loss and gradients, without the [B, T, vocab] tensor; on a sparse
        task (MQAR scores a few positions per row) with a large vocabulary this is most of a training step."""
        if use_cache and cache is None:
            cache = self.new_cache(input_ids.shape[0] if isinstance(input_ids, torch.Tensor) else 1)
        if not return_logits and labels is None:
            raise ValueError("return_logits=False needs labels (the loss is then all that is computed)")
        hidden = self.model(input_ids, attention_mask, cache)
        logits = self.lm_head(hidden) if return_logits else None
        loss = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
                raise ValueError(f"labels must be a tensor of shape {list(input_ids.shape)}, got "
                                 f"{list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)}")
            labels = labels.long()
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, -100)
            if logits is not None:
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=-100)
            else:
                target = labels[:, 1:]
                keep = target != -100  # [B, T-1]: the positions whose next token is scored
                if bool(keep.all()):  # language modelling: every position, no gather needed
                    loss = F.cross_entropy(self.lm_head(hidden[:, :-1]).flatten(0, 1).float(), target.flatten())
                else:
                    loss = F.cross_entropy(self.lm_head(hidden[:, :-1][keep]).float(), target[keep])
        return CausalLMOutput(logits=logits, loss=loss, cache=cache if use_cache else None)

    def new_cache(self, batch_size: int) -> ModelCache:
        return self.model.new_cache(batch_size)

    def gradient_checkpointing_enable(self) -> None:
        self.model.gradient_checkpointing_enable()

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing_disable()

    def set_attention_impl(self, impl: str) -> None:
        self.model.set_attention_impl(impl)

    def get_attention_weights(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                              parts: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """See :meth:`TransformerModel.get_attention_weights`."""
        return self.model.get_attention_weights(input_ids, attention_mask, parts)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, attention_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue each row by ``max_new_tokens`` tokens through the streaming cache.

        temperature 0 is greedy (argmax); otherwise sample from softmax(logits / temperature), restricted to
        the ``top_k`` most likely tokens if given.  Each row continues after its last real token.  Returns
        [B, T + max_new_tokens]: the prompt as given, then the new tokens.
        """
        ids = _checks.input_ids(input_ids, self.config.vocab_size)
        _checks.non_negative_int("max_new_tokens", max_new_tokens)
        if not isinstance(temperature, int | float) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if top_k is not None:
            _checks.positive_int("top_k", top_k)
        mask = _checks.attention_mask(attention_mask, tuple(ids.shape))
        if mask is not None and not bool(mask.any(dim=1).all()):
            raise ValueError("attention_mask has a row with no real token; generate needs at least one per row")
        if max_new_tokens == 0:
            return ids
        was_training = self.training
        self.eval()
        try:
            cache = self.new_cache(ids.shape[0])
            out = self(ids, mask, cache=cache, use_cache=True)
            if mask is None:
                last = out.logits[:, -1]
            else:
                pos = torch.arange(ids.shape[1], device=ids.device)
                last_idx = torch.where(mask, pos, -1).max(dim=1).values
                last = out.logits[torch.arange(ids.shape[0]), last_idx]
            new = []
            for i in range(max_new_tokens):
                token = self._pick(last, temperature, top_k, generator)
                new.append(token)
                if i + 1 < max_new_tokens:
                    last = self(token[:, None], cache=cache, use_cache=True).logits[:, -1]
            return torch.cat([ids, torch.stack(new, dim=1)], dim=1)
        finally:
            self.train(was_training)

    @staticmethod
    def _pick(logits, temperature, top_k, generator):
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
