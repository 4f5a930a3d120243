"""How a converted model's outputs differ from the original's: hidden states, next-token distributions,
predictions, perplexity and bits per byte, overall and by position."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm


def _as_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """A batch is input_ids [B, T] or a dict with input_ids, optional attention_mask and n_bytes (the bytes of
    text its scored tokens cover, for bits per byte)."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, dict) and "input_ids" in batch:
        return batch["input_ids"], batch.get("attention_mask"), batch.get("n_bytes")
    raise TypeError(f"a batch must be an input_ids tensor [B, T] or a dict with 'input_ids', got {type(batch)}")


def _forward(model, ids, kwargs):
    out = model(ids, output_hidden_states=True, **kwargs)
    return out.logits, out.hidden_states


@torch.no_grad()
def reference_outputs(original: torch.nn.Module, batches: Iterable, progress: bool = False) -> list:
    """The original model's (logits, hidden states) on each batch, to compare several converted variants
    against without running the original again (pass the list as ``original`` to :func:`compare_outputs`)."""
    out = []
    for batch in tqdm(list(batches), desc="original", disable=not progress, leave=False):
        ids, mask, _ = _as_batch(batch)
        out.append(_forward(original, ids, _kwargs(mask)))
    return out


def _kwargs(mask):
    if mask is None:
        return {}
    return {"attention_mask": mask, "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)}


@torch.no_grad()
def compare_outputs(original, converted: torch.nn.Module, batches: Iterable, *,
                    bucket: int | None = None, top_k: int = 5, progress: bool = True) -> dict:
    """Compare two causal LMs on the same batches (held-out text).

    ``original``: a model, or the list :func:`reference_outputs` made for the same batches.
    ``batches``: input_ids [B, T] tensors, or dicts with ``input_ids``, ``attention_mask`` and ``n_bytes``.
    ``bucket``: positions are grouped in buckets of this many tokens (e.g. the chunk size) for the by-position
    metrics; default T (one bucket).

    Returns a dict of floats and lists:
      ``cosine`` / ``mse`` [layers + 1]: per hidden-state layer (embeddings first), the mean over tokens of the
      cosine similarity and the mean squared error between the two models' hidden states;
      ``kl``: mean KL(original || converted) of next-token distributions, in nats;
      ``top1``: fraction of positions where both predict the same token; ``top{k}``: mean overlap of the two
      top-k sets / k;
      ``ppl_original`` / ``ppl_converted`` / ``ppl_ratio``, ``bpb_original`` / ``bpb_converted`` (if the batches
      carry n_bytes), ``tokens``;
      ``by_position``: per bucket {start, kl, top1, ppl_original, ppl_converted};
      ``first_bucket_max_kl``: the largest KL at any position of the first bucket.
    """
    sums: dict[str, float] = {"kl": 0.0, "top1": 0.0, "topk": 0.0, "nll_o": 0.0, "nll_c": 0.0, "n": 0.0,
                              "bytes": 0.0}
    layer_cos: list[float] = []
    layer_mse: list[float] = []
    layer_n = 0.0
    buckets: dict[int, dict[str, float]] = {}
    first_max_kl = 0.0
    have_bytes = True
    batches = list(batches)
    if isinstance(original, list) and len(original) != len(batches):
        raise ValueError(f"original holds outputs for {len(original)} batches, got {len(batches)} batches")
    for i, batch in enumerate(tqdm(batches, desc="compare", disable=not progress, leave=False)):
        ids, mask, n_bytes = _as_batch(batch)
        kwargs = _kwargs(mask)
        logits_o, hidden_o = original[i] if isinstance(original, list) else _forward(original, ids, kwargs)
        logits_c, hidden_c = _forward(converted, ids, kwargs)
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        # hidden states, every layer
        w = valid.float()
        for layer, (ho, hc) in enumerate(zip(hidden_o, hidden_c, strict=True)):
            cos = torch.nn.functional.cosine_similarity(ho.float(), hc.float(), dim=-1)
            mse = (ho.float() - hc.float()).pow(2).mean(-1)
            if layer == len(layer_cos):
                layer_cos.append(0.0)
                layer_mse.append(0.0)
            layer_cos[layer] += (cos * w).sum().item()
            layer_mse[layer] += (mse * w).sum().item()
        layer_n += w.sum().item()
        # next-token distributions at positions that predict a real next token
        lo, lc = logits_o[:, :-1].float().log_softmax(-1), logits_c[:, :-1].float().log_softmax(-1)
        target = ids[:, 1:]
        scored = valid[:, 1:] & valid[:, :-1]
        kl = (lo.exp() * (lo - lc)).sum(-1)  # [B, T-1]
        top1 = (lo.argmax(-1) == lc.argmax(-1)).float()
        k = min(top_k, lo.shape[-1])
        to, tc = lo.topk(k, dim=-1).indices, lc.topk(k, dim=-1).indices
        topk = (to[..., :, None] == tc[..., None, :]).any(-1).float().mean(-1)
        nll_o = -lo.gather(-1, target[..., None])[..., 0]
        nll_c = -lc.gather(-1, target[..., None])[..., 0]
        s = scored.float()
        for name, val in (("kl", kl), ("top1", top1), ("topk", topk), ("nll_o", nll_o), ("nll_c", nll_c)):
            sums[name] += (val * s).sum().item()
        sums["n"] += s.sum().item()
        if n_bytes is None:
            have_bytes = False
        else:
            sums["bytes"] += float(n_bytes)
        # by position: a row's positions count from its first token
        pos = (valid.long().cumsum(-1) - 1)[:, :-1]
        size = bucket or ids.shape[1]
        for b in torch.unique(pos[scored] // size).tolist():
            sel = scored & (pos // size == b)
            acc = buckets.setdefault(int(b), {"kl": 0.0, "top1": 0.0, "nll_o": 0.0, "nll_c": 0.0, "n": 0.0})
            for name, val in (("kl", kl), ("top1", top1), ("nll_o", nll_o), ("nll_c", nll_c)):
                acc[name] += val[sel].sum().item()
            acc["n"] += sel.sum().item()
            if b == 0:
                first_max_kl = max(first_max_kl, kl[sel].max().item())
    n = max(sums["n"], 1.0)
    result = {
        "tokens": int(sums["n"]),
        "cosine": [c / layer_n for c in layer_cos],
        "mse": [m / layer_n for m in layer_mse],
        "kl": sums["kl"] / n,
        "top1": sums["top1"] / n,
        f"top{top_k}": sums["topk"] / n,
        "ppl_original": math.exp(sums["nll_o"] / n),
        "ppl_converted": math.exp(sums["nll_c"] / n),
        "first_bucket_max_kl": first_max_kl,
        "by_position": [{"start": b * (bucket or 0), "tokens": int(a["n"]), "kl": a["kl"] / a["n"],
                         "top1": a["top1"] / a["n"], "ppl_original": math.exp(a["nll_o"] / a["n"]),
                         "ppl_converted": math.exp(a["nll_c"] / a["n"])} for b, a in sorted(buckets.items())],
    }
    result["ppl_ratio"] = result["ppl_converted"] / result["ppl_original"]
    if have_bytes and sums["bytes"]:
        result["bpb_original"] = sums["nll_o"] / math.log(2) / sums["bytes"]
        result["bpb_converted"] = sums["nll_c"] / math.log(2) / sums["bytes"]
    return result


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: Iterable, progress: bool = False) -> dict:
    """Perplexity (and bits per byte where batches carry n_bytes) of one model: {"ppl", "bpb", "tokens"}."""
    nll = n = nbytes = 0.0
    have_bytes = True
    for batch in tqdm(list(batches), desc="perplexity", disable=not progress, leave=False):
        ids, mask, n_bytes = _as_batch(batch)
        logits = model(ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:]
        scored = torch.ones_like(target, dtype=torch.bool) if mask is None else (mask[:, 1:] & mask[:, :-1]).bool()
        lp = -logits.log_softmax(-1).gather(-1, target[..., None])[..., 0]
        nll += lp[scored].sum().item()
        n += scored.sum().item()
        if n_bytes is None:
            have_bytes = False
        else:
            nbytes += float(n_bytes)
    out = {"ppl": math.exp(nll / max(n, 1)), "tokens": int(n)}
    if have_bytes and nbytes:
        out["bpb"] = nll / math.log(2) / nbytes
    return out
