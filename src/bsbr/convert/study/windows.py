"""Token windows from the offline corpora (bsbr.tasks.corpora), for healing and for held-out comparisons.

Healing reads only the ``train`` split; comparisons read ``valid`` + ``test`` (documents are assigned to splits by a
hash of their name, so held-out text is never seen in healing).
"""

from __future__ import annotations

import torch

from ... import _checks
from ...tasks.corpora import load_corpus

HELD_OUT = ("valid", "test")


def token_stream(tokenizer, corpora: tuple[str, ...], splits: tuple[str, ...]) -> list[tuple[str, torch.Tensor]]:
    """[(corpus name, token ids [N])] for each corpus, its splits' documents joined (0 bytes become newlines)."""
    out = []
    for name in corpora:
        parts = load_corpus(name)
        text = b"\n".join(parts[s] for s in splits).replace(b"\x00", b"\n\n").decode("utf-8", errors="replace")
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        out.append((name, torch.tensor(ids, dtype=torch.long)))
    return out


def windows(tokenizer, seq_len: int, count: int, corpora: tuple[str, ...] = ("prose", "python"),
            splits: tuple[str, ...] = HELD_OUT, offset: int = 0) -> list[dict]:
    """``count`` windows of ``seq_len`` tokens, taken in turn from each corpus (non-overlapping, in order, from
    window ``offset`` on).  Each is {"input_ids": [1, seq_len], "n_bytes": bytes of its scored tokens (all but the
    first), "source": corpus}."""
    _checks.positive_int("seq_len", seq_len)
    _checks.positive_int("count", count)
    streams = token_stream(tokenizer, corpora, splits)
    out: list[dict] = []
    i = offset
    while len(out) < count:
        progressed = False
        for name, ids in streams:
            lo = i * seq_len
            if lo + seq_len <= len(ids) and len(out) < count:
                w = ids[lo : lo + seq_len]
                n_bytes = len(tokenizer.decode(w[1:].tolist()).encode("utf-8"))
                out.append({"input_ids": w[None], "n_bytes": n_bytes, "source": name})
                progressed = True
        if not progressed:
            sizes = {name: len(ids) for name, ids in streams}
            raise ValueError(f"the {splits} splits of {corpora} hold {sizes} tokens: not enough for {count} windows "
                             f"of {seq_len} tokens (got {len(out)})")
        i += 1
    return out
