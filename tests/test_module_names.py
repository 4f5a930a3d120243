"""Where things are named: the named model classes are ``class`` statements (grep and IDEs find them), and the
modules renamed for clarity still import from their old paths, warning with the new one."""

from __future__ import annotations

import importlib
import inspect
import os
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


# bsbr.convert: the library apart from the conversion study (bsbr.convert.study), attention.py split by job.
# Old module -> {name it exported: the module that holds it now}; its warning names each of those modules.
CONVERT_MOVES = {
    "bsbr.convert.attention": {"BSBRMeta": "meta", "bsbr_mask": "masks", "_padded_rows": "padding",
                               "bsbr_attention_forward": "backends", "BSBR_IMPL": "backends",
                               "BSBRCacheLayer": "cache", "BSBRHFCache": "cache"},
    "bsbr.convert.convert": {"convert_to_bsbr": "to_bsbr", "from_pretrained": "to_bsbr", "load_config": "to_bsbr"},
    "bsbr.convert.models": {"smollm2": "study.checkpoints", "pretrain_gpt2": "study.checkpoints"},
    "bsbr.convert.data": {"windows": "study.windows", "token_stream": "study.windows"},
    "bsbr.convert.pipeline": {"ConversionPlan": "study.pipeline", "run_conversion": "study.pipeline"},
    "bsbr.convert.report": {"write_report": "study.report"},
}


@pytest.mark.parametrize("old", sorted(CONVERT_MOVES))
def test_moved_convert_module_still_imports_and_names_its_new_place(old, monkeypatch):
    pytest.importorskip("transformers", minversion="5.0")
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning) as caught:
        module = importlib.import_module(old)
    message = " ".join(str(w.message) for w in caught if issubclass(w.category, DeprecationWarning))
    for name, new in CONVERT_MOVES[old].items():
        assert f"bsbr.convert.{new}" in message, f"{old}'s warning does not name bsbr.convert.{new}"
        assert getattr(module, name) is getattr(importlib.import_module(f"bsbr.convert.{new}"), name), name


# to_bsbr.py split by job: saving and loading in loading.py, the supported families in families.py, the option names
# beside BSBRMeta in meta.py.  Name -> the module that holds it now; bsbr.convert.to_bsbr re-exports each, unwarned.
TO_BSBR_MOVES = {
    "from_pretrained": "loading", "load_config": "loading", "check_model_dir": "loading",
    "register_auto_classes": "loading", "HOW_TO_LOAD": "loading",
    "Family": "families", "FAMILIES": "families", "SUPPORTED_CLASSES": "families", "PREFIX": "families",
    "base_model_type": "families", "family_of": "families", "head_counts": "families", "bsbr_modules": "families",
    "STATE_OPTIONS": "meta", "OPTION_NAMES": "meta",
}


@pytest.mark.parametrize("name", sorted(TO_BSBR_MOVES))
def test_names_moved_out_of_to_bsbr_still_import_from_it(name):
    pytest.importorskip("transformers", minversion="5.0")
    import bsbr.convert
    from bsbr.convert import to_bsbr

    moved = getattr(importlib.import_module(f"bsbr.convert.{TO_BSBR_MOVES[name]}"), name)
    assert getattr(to_bsbr, name) is moved and name in to_bsbr.__all__
    if name in bsbr.convert.__all__:
        assert getattr(bsbr.convert, name) is moved


def test_old_convert_names_warn_with_the_new_one():
    """bsbr.convert.BSBRCache (the transformers cache, renamed so that bsbr.layers.BSBRCache is the only one) and the
    study's entry points, which moved to bsbr.convert.study, still import from bsbr.convert, warning."""
    pytest.importorskip("transformers", minversion="5.0")
    import bsbr.convert
    import bsbr.layers
    from bsbr.convert import cache
    from bsbr.convert.study import pipeline, report

    for old, new, obj in [("BSBRCache", "bsbr.convert.cache.BSBRHFCache", cache.BSBRHFCache),
                          ("ConversionPlan", "bsbr.convert.study.pipeline.ConversionPlan", pipeline.ConversionPlan),
                          ("run_conversion", "bsbr.convert.study.pipeline.run_conversion", pipeline.run_conversion),
                          ("write_report", "bsbr.convert.study.report.write_report", report.write_report)]:
        with pytest.warns(DeprecationWarning, match=re.escape(new)):
            assert getattr(bsbr.convert, old) is obj
    assert bsbr.convert.BSBRHFCache is not bsbr.layers.BSBRCache


def test_new_convert_paths_import_without_warnings():
    """A fresh interpreter imports every new module and every name of bsbr.convert.__all__ without a deprecation
    warning from bsbr (the shims and the old names are the only things that warn)."""
    pytest.importorskip("transformers", minversion="5.0")
    import subprocess

    modules = ["bsbr.convert." + m for m in ("meta", "masks", "padding", "backends", "cache", "families", "loading",
                                            "to_bsbr", "healing", "metrics", "cli", "study", "study.checkpoints",
                                            "study.windows", "study.pipeline", "study.report")]
    code = ("import warnings\nwith warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            f"    import {', '.join(modules)}\n"
            "    from bsbr.convert import *\n"
            "print([str(w.message) for w in caught if 'bsbr' in str(w.message)])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
