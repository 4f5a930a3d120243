"""The user's docs/research-examples.md, run as written: every python block, in order, in one namespace.

Only these mechanical changes are made (each listed in SUBSTITUTIONS / PRELUDE, nothing else is touched):
- the document's calls with elided arguments, ``BSBRModel(...)``, ``LinearTransformer(...)`` and
  ``StandardTransformer(...)``, get the sizes the document's own memory snippet uses, chunk 128 for BSBR (a
  literal ``...`` argument is not a model size);
- on a machine without CUDA, ``torch.cuda.<memory call>`` becomes ``bsbr_memory.<same call>`` — the CPU path of
  bsbr.utils.memory with the same three functions (process RSS on CPU);
- names the snippets use without importing them are imported first, and matplotlib draws off-screen (Agg), so
  ``plt.show()`` returns at once;
- ``analyze_scaling_behavior``, which the document defines but never calls, is called.

The first block trains a model per (model, length) cell for its ``accuracy`` metric at the library's default
budget, so the whole document takes minutes: it is in the slow set (``python -m pytest -m slow``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "research-examples.md"
SEED = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "research-examples.md"

SIZE = "vocab_size=10000, hidden_dim=512, num_layers=4, num_heads=8, ff_dim=2048, dropout=0.1"
SUBSTITUTIONS = [("BSBRModel(...)", f"BSBRModel({SIZE}, chunk_size=128)"),
                 *((f"{cls}(...)", f"{cls}({SIZE})") for cls in ("LinearTransformer", "StandardTransformer"))]
if not torch.cuda.is_available():
    SUBSTITUTIONS.append(("torch.cuda.", "bsbr_memory."))
PRELUDE = """
import time
import matplotlib
matplotlib.use("Agg")
import torch
from bsbr import BSBRModel
from bsbr.models import LinearTransformer, StandardTransformer
import bsbr.utils.memory as bsbr_memory
"""


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def adapted(code: str) -> str:
    for old, new in SUBSTITUTIONS:
        code = code.replace(old, new)
    return code


def test_document_is_the_users():
    """docs/research-examples.md is the user's seed document, unedited (checked where the seed is present)."""
    if not SEED.is_file():
        pytest.skip("the seed documents are not beside this checkout")
    assert DOC.read_text() == SEED.read_text()


def test_substitutions_are_only_the_listed_ones():
    """Each substitution applies somewhere, and after them no elided-argument call ``(...)`` and (without CUDA) no
    torch.cuda call is left: what runs is the document plus the listed edits."""
    text = "\n".join(blocks())
    assert len(blocks()) == 5
    for old, _ in SUBSTITUTIONS:
        assert old in text, old
    done = adapted(text)
    assert "(...)" not in done
    if not torch.cuda.is_available():
        assert "torch.cuda" not in done


@pytest.mark.slow
def test_research_examples_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "research_examples"}
    exec(compile(PRELUDE, "prelude", "exec"), namespace)
    for i, code in enumerate(blocks()):
        exec(compile(adapted(code), f"{DOC.name} block {i + 1}", "exec"), namespace)
        if "def analyze_scaling_behavior" in code:
            namespace["analyze_scaling_behavior"]()
    # what the blocks computed is real: results per model and length, memory per chunk size, experiment cells
    results = namespace["results"]  # the last block's ExperimentRunner results
    assert set(results) == {"BSBR", "Linear", "Standard"}
    assert all(set(cells) == {64, 128, 256, 512, 1024} for cells in results.values())
    assert all(c["time"] > 0 and c["memory"] > 0 for cells in results.values() for c in cells.values())
    memory = namespace["memory_results"]
    assert set(memory) == {32, 64, 128, 256} and all(m["peak_memory"] > 0 for m in memory.values())
    assert "Attention sparsity" in capsys.readouterr().out
