"""The contract every attention mechanism in bsbr implements.

A mechanism subclasses :class:`CausalAttention` and writes four methods, all on *left-aligned* input —
each row's real tokens first, padding (if any) after them:

``_reference(x)``
    The obviously correct form (dense masks or a loop over tokens).  x: [B, T, D] -> [B, T, D].
``_parallel(x)``
    The fast form for training and prefill, same signature and same result.
``_extend(x, cache)``
    Continue every row of ``cache`` (all rows equally long) by the T tokens of x, all real; returns
    their outputs and updates the cache's tensors (not ``cache.lengths``: the base class does that).
``_step(x, valid, cache)``
    One token per row, x: [B, D]; rows where ``valid`` ([B] bool) is False leave the cache untouched
    and may return anything finite.  Rows of the cache may differ in length.

Because every mechanism is causal, right padding cannot change a real token's output, so the parallel
and reference forms need no padding logic: :meth:`CausalAttention.forward` moves each row's real tokens
to the front (a stable gather), runs the form, moves the outputs back and zeroes padded positions.
Left padding therefore shifts nothing: positions and chunk boundaries count from a row's first real token.
The hidden states at padded positions are zeroed before any form sees them, so garbage there (NaN or infinity, as in
uninitialised memory) cannot reach a real token through a product that multiplies it by a zero weight (0 * NaN =
NaN); a form must still keep a non-finite value at a real token from earlier tokens (:mod:`bsbr.ops.nonfinite`).
Outputs need no padding logic, but a loss a form adds in training does (a padded row's query is a real vector of
zeros): during ``_reference`` and ``_parallel`` the layer's ``_num_valid`` holds each row's real tokens ([B] long,
or None when every token is real), as BSBR's selection distillation reads it.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from .cache import LayerCache

IMPLS = ("parallel", "reference")


def left_align(mask: torch.Tensor | None, seq_len: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """For mask [B, T] (bool), return (perm, num_valid).

    ``perm`` [B, T] gathers each row's real tokens to the front in order (None when they already are);
    ``num_valid`` [B] counts them (None when mask is None: every token is real).
    """
    if mask is None:
        return None, None
    num_valid = mask.sum(dim=1)
    prefix = torch.arange(seq_len, device=mask.device) < num_valid[:, None]
    if torch.equal(mask, prefix):
        return None, num_valid
    perm = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    return perm, num_valid


def gather_tokens(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """x: [B, T, ...] -> x with row b reordered by perm[b]."""
    if perm is None:
        return x
    index = perm.reshape(*perm.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


def zero_padding(x: torch.Tensor, num_valid: torch.Tensor | None, in_place: bool = False) -> torch.Tensor:
    """x: [B, T, ...] left-aligned -> x with the positions after each row's ``num_valid`` real tokens set to zero
    (x itself when no row is padded).  Padding's contents are then finite whatever the caller put there.
    ``in_place``: x is the caller's own new tensor (a gather's or an embedding's result), overwritten instead of
    copied (autograd allows it: neither op keeps its output for backward)."""
    if num_valid is None:
        return x
    keep = torch.arange(x.shape[1], device=x.device) < num_valid[:, None]
    if bool(keep.all()):
        return x
    pad = ~keep.reshape(*keep.shape, *([1] * (x.dim() - 2)))
    return x.masked_fill_(pad, 0.0) if in_place else x.masked_fill(pad, 0.0)


def scatter_tokens(y: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`gather_tokens`."""
    if perm is None:
        return y
    index = perm.reshape(*perm.shape, *([1] * (y.dim() - 2))).expand_as(y)
    return torch.empty_like(y).scatter(1, index, y)


class CausalAttention(nn.Module):
    """Base class: validation, padding, streaming dispatch and output dropout.

    Args:
        hidden_dim: model width D.
        num_heads: H; must divide D.  Head dim d = D / H.
        dropout: dropout on the attention output (training only).
    """

    #: Registry name, set by :func:`bsbr.models.registry.register_attention`.
    name: str = "?"

    #: True when feeding a sequence through ``_extend`` segment after segment costs what one ``_parallel`` call
    #: costs (the streaming state is a fixed-size summary, or grows by a small state per chunk), so that a long
    #: inference forward of a model may run segment by segment (:class:`bsbr.models.lm.TransformerModel`).
    #: False for mechanisms whose cache holds every key (Standard, Hopfield).
    segmented_prefill: bool = False

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        self.head_dim = _checks.heads_divide(hidden_dim, num_heads)
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.dropout = nn.Dropout(_checks.probability("dropout", dropout))
        self.impl = "parallel"

    # ----------------------------------------------------------------------------------------- public
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """hidden_states: [B, T, D]; attention_mask: [B, T] with 1 for real tokens, 0 for padding.

        Without ``cache`` the whole sequence is processed at once (``self.impl`` picks the parallel or
        reference form).  With ``cache`` (from :meth:`new_cache`) the tokens continue what the cache has
        seen and the cache is updated in place.  Returns [B, T, D], zero at padded positions.
        """
        x = _checks.hidden_states(hidden_states, self.hidden_dim)
        mask = _checks.attention_mask(attention_mask, tuple(x.shape[:2]))
        perm, num_valid = left_align(mask, x.shape[1])
        x = zero_padding(gather_tokens(x, perm), num_valid, in_place=perm is not None)
        if cache is None:
            if self.impl not in IMPLS:
                raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
            self._num_valid = num_valid  # for a training loss that must not count padded rows (see the module doc)
            try:
                y = self._reference(x) if self.impl == "reference" else self._parallel(x)
            finally:
                self._num_valid = None
        else:
            if not isinstance(cache, LayerCache) or cache.batch_size != x.shape[0]:
                raise ValueError(
                    f"cache must be a LayerCache from new_cache(batch_size={x.shape[0]}), got {type(cache).__name__}"
                    + (f" for batch {cache.batch_size}" if isinstance(cache, LayerCache) else "")
                )
            y = self._cached(x, num_valid, cache)
        y = self.dropout(y)
        if num_valid is not None:
            keep = torch.arange(x.shape[1], device=x.device) < num_valid[:, None]
            y = y.masked_fill(~keep[..., None], 0.0)
        return scatter_tokens(y, perm)

    def new_cache(self, batch_size: int) -> LayerCache:
        """An empty cache for ``batch_size`` rows.  Subclasses extend it with their own fields."""
        _checks.positive_int("batch_size", batch_size)
        return self._new_cache(torch.zeros(batch_size, dtype=torch.long, device=self._device()))

    def attention_weights(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          parts: bool = False):
        """Effective token-to-token weights [B, H, T, T]: head output at t = sum_s w[t, s] v_s (v before the
        output projection).  Zero for padded queries and keys.  With ``parts=True`` a dict with "total" and
        the mechanism's parts (BSBR: "local", "retrieval").  Mechanisms without such weights raise
        ``NotImplementedError``.
        """
        x = _checks.hidden_states(hidden_states, self.hidden_dim)
        mask = _checks.attention_mask(attention_mask, tuple(x.shape[:2]))
        perm, num_valid = left_align(mask, x.shape[1])
        x = zero_padding(gather_tokens(x, perm), num_valid, in_place=perm is not None)
        maps = self._attention_weights(x)  # aligned token order
        if not isinstance(maps, dict):
            maps = {"total": maps}
        for key, w in maps.items():
            if num_valid is not None:
                keep = torch.arange(x.shape[1], device=x.device) < num_valid[:, None]
                w = w.masked_fill(~(keep[:, None, :, None] & keep[:, None, None, :]), 0.0)
            if perm is not None:  # back to the caller's token order on both axes
                w = scatter_tokens(w.transpose(1, 2), perm).transpose(1, 2)
                w = scatter_tokens(w.permute(0, 3, 1, 2), perm).permute(0, 2, 3, 1)
            maps[key] = w
        return maps if parts else maps["total"]

    # --------------------------------------------------------------------------- to be implemented
    def _new_cache(self, lengths: torch.Tensor) -> LayerCache:
        raise NotImplementedError

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _parallel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _extend(self, x: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        raise NotImplementedError

    def _step(self, x: torch.Tensor, valid: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        raise NotImplementedError

    def _attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no token-to-token attention weights to show")

    # ------------------------------------------------------------------------------------- helpers
    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def _cached(self, x: torch.Tensor, num_valid: torch.Tensor | None, cache: LayerCache) -> torch.Tensor:
        """Streaming dispatch: a chunked ``_extend`` over the tokens every row has, then ``_step``s."""
        B, T, _ = x.shape
        lengths = cache.lengths
        if num_valid is None:
            num_valid = torch.full((B,), T, dtype=torch.long, device=x.device)
        uniform = bool((lengths == lengths[0]).all())
        common = int(num_valid.min()) if uniform else 0
        outs = []
        if common > 1:
            outs.append(self._extend(x[:, :common], cache))
            cache.lengths = lengths + common
        else:
            common = 0
        last = int(num_valid.max())
        for i in range(common, last):
            valid = i < num_valid
            outs.append(self._step(x[:, i], valid, cache).unsqueeze(1))
            cache.lengths = cache.lengths + valid.long()
        if last < T:
            outs.append(x.new_zeros(B, T - last, self.hidden_dim))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"
