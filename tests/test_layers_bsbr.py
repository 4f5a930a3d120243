"""BSBRAttention (bsbr.layers.bsbr): one chunk is causal softmax attention, the causality test is not vacuous,
attention maps reproduce the outputs, bad options are refused, the retrieval window (reference == parallel, chunks
outside it unseen), and non-finite hidden states or padding that change no other output (layer and LM)."""

from __future__ import annotations

import pytest
import torch

from bsbr import BSBRAttention, BSBRLayer, BSBRModel
from bsbr.layers.standard import StandardAttention
from bsbr.models import ModelConfig

from conftest import make_attention, make_lm
from helpers import NONFINITE, assert_close


def test_large_chunk_equals_causal_softmax_attention():
    """With chunk_size >= T there is one chunk: BSBR is causal softmax attention with the same q/k/v/out."""
    torch.manual_seed(0)
    bsbr = BSBRAttention(48, 4, chunk_size=64, dropout=0.0).double().eval()
    std = StandardAttention(48, 4, dropout=0.0).double().eval()
    missing = std.load_state_dict(bsbr.state_dict(), strict=False)
    assert not missing.missing_keys  # q_proj, k_proj, v_proj, out_proj map one to one
    x = torch.randn(3, 50, 48, dtype=torch.float64)
    assert_close("BSBR(chunk >= T) vs softmax", bsbr(x), std(x))
    bsbr.chunk_size = 10  # and with several chunks it is something else
    assert (bsbr(x) - std(x)).abs().max() > 1e-3


def test_causality_catches_a_leaky_meta_query(monkeypatch):
    """The causality test is not vacuous: taking r_i from the chunk's last token (the naive reading) leaks."""
    attn = make_attention("BSBR")
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    base = attn(x)

    def leaky(self, x, first, open_query):
        T, ch = x.shape[1], self.chunk_size
        C = -(-T // ch)
        ends = (torch.arange(C) * ch + ch - 1).clamp(max=T - 1)
        meta = self._meta(self.meta_q_proj, x[:, ends]), self._meta(self.meta_k_proj, x[:, ends])
        return meta

    monkeypatch.setattr(BSBRAttention, "_chunk_meta", leaky)
    x2 = x.clone()
    x2[:, 23] += 1.0  # last token of chunk 2 (chunk_size 8)
    assert not torch.equal(attn(x2)[:, 16:23], base[:, 16:23])


def test_attention_weights_reproduce_outputs():
    attn = make_attention("BSBR")
    x = torch.randn(2, 29, 32, dtype=torch.float64)
    maps = attn.attention_weights(x, parts=True)
    assert_close("local + retrieval", maps["local"] + maps["retrieval"], maps["total"])
    q, k, v = attn.qkv(x, torch.arange(29))
    y = attn.out(maps["total"] @ v)
    assert_close("sum_s w[t,s] v_s", y, attn(x))
    # local weights are zero outside the chunk, retrieval weights are zero inside it and after it
    t = torch.arange(29)
    same_chunk = (t[:, None] // 8) == (t[None, :] // 8)
    assert torch.all(maps["local"][..., ~same_chunk] == 0)
    assert torch.all(maps["retrieval"][..., same_chunk | (t[None, :] > t[:, None])] == 0)


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        BSBRAttention(32, 2, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        BSBRAttention(32, 2, chunk_size=2.5)
    with pytest.raises(ValueError, match="compression_factor must divide head_dim\\*head_dim=256, got 3"):
        BSBRAttention(32, 2, chunk_size=8, compression_factor=3)
    with pytest.raises(ValueError, match="hidden_dim must be divisible by num_heads"):
        BSBRLayer(30, 4, 8, 64)
    with pytest.raises(ValueError, match="state_norm"):
        BSBRAttention(32, 2, 8, state_norm="sum")
    with pytest.raises(ValueError, match="meta_query"):
        BSBRAttention(32, 2, 8, meta_query="last")
    with pytest.raises(ValueError, match="retrieval_window must be a positive integer, got 0"):
        BSBRAttention(32, 2, 8, retrieval_window=0)
    with pytest.raises(ValueError, match="unknown option"):
        BSBRModel(50, 32, 1, 2, 8, 64, window_size=3)
    with pytest.raises(ValueError, match="unknown ModelConfig key"):
        ModelConfig.from_dict({**BSBRModel(50, 32, 1, 2, 8, 64).config.to_dict(), "lr": 1})
    with pytest.raises(ValueError, match="unknown model"):
        ModelConfig(50, 32, 1, 2, 64, attention="Transformer-XL")


def test_retrieval_window_reference_parallel_and_limits():
    """A window of W chunks: reference == parallel (fp64, with gradients), W >= number of chunks is exactly the
    unwindowed layer, and W = 1 differs from it (the option is not ignored)."""
    x = torch.randn(2, 63, 32, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 63, 32, dtype=torch.float64)
    for options in ({"retrieval_window": 2}, {"retrieval_window": 3, "meta_query": "prev_last"},
                    {"retrieval_window": 2, "compression_factor": 4}):
        attn = make_attention("BSBR", **options)
        got = {}
        for impl in ("reference", "parallel"):
            attn.impl = impl
            x.grad = None
            y = attn(x)
            (y * g).sum().backward()
            got[impl] = (y.detach(), x.grad.clone())
        assert_close(f"window {options} output", got["parallel"][0], got["reference"][0])
        assert_close(f"window {options} d/dx", got["parallel"][1], got["reference"][1])
    with torch.no_grad():
        plain = make_attention("BSBR")(x)
        assert torch.equal(make_attention("BSBR", retrieval_window=8)(x), plain)  # 63 tokens = 8 chunks
        assert not torch.allclose(make_attention("BSBR", retrieval_window=1)(x), plain)


def test_retrieval_window_output_ignores_chunks_outside_the_window():
    """With W = 2 and chunk 8, outputs at positions >= 32 (chunk 4 on) do not depend on tokens 0..15 (chunks
    0 and 1) through retrieval; the local part never reaches them either, and layer 1 sees layer 0's outputs,
    so a one-layer check is exact."""
    attn = make_attention("BSBR", retrieval_window=2)
    x = torch.randn(1, 48, 32, dtype=torch.float64)
    y = torch.randn(1, 48, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, :16] = y[:, :16]
    with torch.no_grad():
        a, b = attn(x), attn(x2)
    assert torch.equal(a[:, 32:], b[:, 32:])
    assert not torch.allclose(a[:, 16:32], b[:, 16:32])  # chunks 2 and 3 still retrieve chunk 0 / 1


def _stream(module, x, split, mask=None, **kwargs):
    """Outputs of ``module`` fed x [B, T, D] piece by piece through a fresh cache."""
    cache, start, pieces = module.new_cache(x.shape[0]), 0, []
    for n in split:
        part = None if mask is None else mask[:, start : start + n]
        pieces.append(module(x[:, start : start + n], attention_mask=part, cache=cache, **kwargs))
        start += n
    return torch.cat(pieces, dim=1)


LAYER_FORMS = {"reference": None, "parallel": None, "pieces": [5, 1, 1, 13, 3, 17], "tokens": [1] * 40}


@pytest.mark.parametrize("options", [{}, {"retrieval_window": 2, "compression_factor": 4}, {"meta_query": "prev_last"}],
                         ids=str)
def test_layer_nonfinite_hidden_state_changes_no_earlier_output(options):
    """BSBRAttention: NaN or inf hidden states at position p change no earlier output, in the reference and parallel
    forms and streamed in pieces or token by token; with a retrieval window W they also leave alone every chunk that
    can no longer retrieve p's chunk (chunk 0 here: positions >= 8 (W + 1) on)."""
    attn = make_attention("BSBR", **options)
    x = torch.randn(2, 40, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for form, split in LAYER_FORMS.items():
        attn.impl = "reference" if form == "reference" else "parallel"
        run = attn if split is None else (lambda x, split=split: _stream(attn, x, split))  # noqa: E731
        with torch.no_grad():
            base = run(x)
            for p in (0, 7, 8, 20, 39):
                for value in NONFINITE:
                    x2 = x.clone()
                    x2[:, p] = value
                    y = run(x2)
                    assert torch.equal(y[:, :p], base[:, :p]), f"{form}: {value} at {p} leaked backwards"
                    assert not torch.isfinite(y[:, p]).all(), f"{form}: {value} at {p} vanished"
                    W = options.get("retrieval_window")
                    if W and p < 8:
                        beyond = 8 * (W + 1)
                        assert torch.equal(y[:, beyond:], base[:, beyond:]), f"{form}: {value} at {p} left its window"


def test_layer_and_lm_padding_with_nonfinite_hidden_states_gives_the_clean_outputs():
    """Rows padded on the right and on the left whose padding positions hold NaN give their real positions exactly the
    outputs they give with finite padding (layer: reference, parallel, streamed; LM: a NaN embedding at the padding
    positions, parallel and streamed), and their padding positions zero (layer)."""
    attn = make_attention("BSBR")
    mask = torch.ones(3, 30, dtype=torch.long)
    mask[1, 19:] = 0
    mask[2, :11] = 0
    x = torch.randn(3, 30, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    garbage = x.masked_fill(mask[..., None] == 0, float("nan"))
    with torch.no_grad():
        for form, split in (("reference", None), ("parallel", None), ("pieces", [7, 1, 1, 21]), ("tokens", [1] * 30)):
            attn.impl = "reference" if form == "reference" else "parallel"
            if split is None:
                clean, dirty = attn(x, attention_mask=mask), attn(garbage, attention_mask=mask)
            else:
                clean, dirty = _stream(attn, x, split, mask), _stream(attn, garbage, split, mask)
            assert torch.equal(dirty, clean), f"{form}: NaN padding changed the row's outputs"
            assert torch.all(dirty[mask == 0] == 0)
    lm = make_lm("BSBR")
    lm.model.embed.register_forward_hook(lambda m, args, out: out.masked_fill((args[0] == 0)[..., None], float("nan")))
    ids = torch.randint(1, 50, (3, 30), generator=torch.Generator().manual_seed(10))

    def logits(ids, split):
        if split is None:
            return lm(ids, attention_mask=mask).logits
        cache, start, pieces = lm.new_cache(3), 0, []
        for n in split:
            part = slice(start, start + n)
            pieces.append(lm(ids[:, part], attention_mask=mask[:, part], cache=cache, use_cache=True).logits)
            start += n
        return torch.cat(pieces, dim=1)

    with torch.no_grad():
        for split in (None, [7, 1, 1, 21]):
            clean, dirty = logits(ids, split), logits(ids.masked_fill(mask == 0, 0), split)  # token 0: NaN embedding
            assert torch.equal(dirty[mask.bool()], clean[mask.bool()]), f"LM {split}: NaN padding leaked"
