"""Where things are named: the named model classes are ``class`` statements (grep and IDEs find them), and the
modules renamed for clarity still import from their old paths, warning with the new one."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

import bsbr.models
from bsbr.models import zoo

ZOO = Path(zoo.__file__).read_text()


@pytest.mark.parametrize("name", [n for n in bsbr.models.__all__ if inspect.isclass(getattr(bsbr.models, n))
                                  and getattr(bsbr.models, n).__module__ == zoo.__name__])
def test_named_model_class_is_a_class_statement(name):
    assert re.search(rf"^class {name}\(", ZOO, re.MULTILINE), f"{name} is not defined by a class statement"
    cls = getattr(bsbr.models, name)
    model = cls(vocab_size=16, hidden_dim=16, num_layers=1, num_heads=2, ff_dim=32, **(
        {"chunk_size": 4} if name.startswith("BSBR") else {}))
    assert type(model) is cls and isinstance(model, bsbr.models.TransformerModel | bsbr.models.CausalLM)


@pytest.mark.parametrize("old,new,name", [("bsbr.layers.common", "bsbr.layers.qkv", "QKVAttention"),
                                          ("bsbr.tasks.lm", "bsbr.tasks.language_modeling", "LanguageModeling"),
                                          ("bsbr.train.memory", "bsbr.train.peak_memory", "PeakMemory")])
def test_renamed_module_still_imports_and_names_its_new_place(old, new, name, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=re.escape(new)):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
