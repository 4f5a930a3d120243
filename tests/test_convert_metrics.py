"""Comparing a converted model with the original (bsbr.convert.metrics): compare_outputs of a model with itself is
exact, and against local attention the first chunk is the original exactly while later positions differ."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from bsbr.convert import convert_to_bsbr  # noqa: E402

from hf_models import VOCAB, tiny  # noqa: E402


def test_compare_outputs_of_a_model_with_itself_and_with_local_attention():
    from bsbr.convert import compare_outputs

    model = tiny("llama")
    batches = [torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    same = compare_outputs(model, model, batches, bucket=8, progress=False)
    assert same["kl"] < 1e-12 and same["top1"] == 1.0 and same["top5"] == 1.0 and abs(same["ppl_ratio"] - 1) < 1e-9
    assert all(abs(c - 1) < 1e-9 for c in same["cosine"]) and max(same["mse"]) < 1e-20
    local = convert_to_bsbr(copy.deepcopy(model), chunk_size=8, retrieval=False)
    res = compare_outputs(model, local, batches, bucket=8, progress=False)
    assert res["first_bucket_max_kl"] < 1e-12  # the first chunk is the original exactly
    assert res["by_position"][0]["top1"] == 1.0 and res["kl"] > 1e-6 and len(res["by_position"]) == 5
    assert res["cosine"][0] == pytest.approx(1.0)  # embeddings are untouched
