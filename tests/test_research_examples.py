"""The snippets of the user's research-examples.md, run on CPU at small sizes, plus the utilities they call:
plots are written and not blank, the ExperimentRunner resumes an interrupted sweep and records failures."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from bsbr import BSBRModel  # noqa: E402
from bsbr.evals import analyze_results, compare_models, scaling_analysis  # noqa: E402
from bsbr.evals.report import write_report  # noqa: E402
from bsbr.models import LinearTransformer, StandardTransformer  # noqa: E402
from bsbr.utils.memory import analyze_memory_usage  # noqa: E402
from bsbr.utils.research import ExperimentRunner  # noqa: E402
from bsbr.utils.visualization import visualize_attention  # noqa: E402

SMALL = {"vocab_size": 100, "hidden_dim": 32, "num_layers": 2, "num_heads": 2, "ff_dim": 64, "dropout": 0.0}


def _pixel_variance(path) -> float:
    return float(np.asarray(plt.imread(path), dtype=float).var())


def test_model_comparison_snippet(tmp_path):
    results = compare_models(seq_lengths=[64, 128, 256], models=["BSBR", "Linear", "DeltaNet", "SlidingWindow",
                                                                  "Standard"],
                             metrics=["inference_time", "memory_usage", "accuracy"], hidden_dim=32, num_heads=2,
                             repeats=2, accuracy_steps=3, accuracy_task_options={"vocab_size": 64, "num_kv_pairs": 2},
                             progress=False)
    analysis = analyze_results(results)
    assert set(analysis["fits"]) == {"BSBR", "Linear", "DeltaNet", "SlidingWindow", "Standard"}
    plt.figure(figsize=(10, 6))
    plt.plot(results["seq_lengths"], results["BSBR"]["inference_time"], label="BSBR")
    plt.plot(results["seq_lengths"], results["Standard"]["inference_time"], label="Standard")
    plt.legend()
    plt.savefig(tmp_path / "cmp.png")
    plt.close("all")
    assert _pixel_variance(tmp_path / "cmp.png") > 0
    assert all(0.0 <= a <= 1.0 for a in results["BSBR"]["accuracy"])
    report = write_report(results, tmp_path / "report")
    assert report.is_file() and (tmp_path / "report" / "report.html").is_file()
    for png in (tmp_path / "report").glob("*.png"):
        assert _pixel_variance(png) > 0, png


def test_memory_analysis_snippet():
    memory_results = {}
    for chunk_size in [8, 16]:
        model = BSBRModel(chunk_size=chunk_size, **SMALL)
        memory_results[chunk_size] = analyze_memory_usage(model, torch.randint(0, 100, (1, 128)))
    for r in memory_results.values():
        assert r["peak_memory"] > 0 and r["kind"] == "saved_for_backward" and r["current_memory"] > 0


def test_attention_visualization_snippet(tmp_path):
    input_ids = torch.randint(0, 100, (1, 48))
    models = {"BSBR": BSBRModel(chunk_size=16, **SMALL), "Linear": LinearTransformer(**SMALL),
              "Standard": StandardTransformer(**SMALL)}
    for name, model in models.items():
        weights = model.get_attention_weights(input_ids)
        plt.figure(figsize=(12, 8))
        visualize_attention(weights)
        plt.title("Attention Patterns")
        plt.savefig(tmp_path / f"{name}.png")
        plt.close("all")
        assert _pixel_variance(tmp_path / f"{name}.png") > 0
        sparsity = (weights == 0).float().mean()
        assert 0 <= sparsity < 1
    assert (models["BSBR"].get_attention_weights(input_ids) == 0).float().mean() > 0  # causal zeros at least


def test_scaling_analysis_snippet():
    models = ["BSBR", "Linear", "Standard"]
    results = scaling_analysis(seq_lengths=[64, 128, 256], models=models, metrics=["time", "memory", "flops"],
                               hidden_dim=32, num_heads=2, repeats=2, progress=False)
    for m in models:
        assert len(results[m]["time"]) == len(results[m]["memory"]) == len(results[m]["flops"]) == 3
        assert results[m]["flops"][2] > results[m]["flops"][0] > 0


class CustomExperiment(ExperimentRunner):
    fail_at: int | None = None

    def setup(self):
        self.models = {"BSBR": BSBRModel(chunk_size=16, **SMALL), "Standard": StandardTransformer(**SMALL)}
        self.seq_lengths = [32, 64]
        self.metrics = ["time", "memory", "accuracy"]

    def run_experiment(self, model, seq_length):
        if seq_length == self.fail_at:
            raise RuntimeError("simulated out of memory")
        input_ids = torch.randint(0, 100, (1, seq_length))
        outputs = model(input_ids)
        return {"norm": float(outputs.detach().norm()), "T": seq_length}


def test_experiment_runner_resumes_and_records_failures(tmp_path):
    first = CustomExperiment(out_dir=tmp_path, progress=False)
    first.fail_at = 64
    r1 = first.run()
    assert "error" in r1["BSBR"][64] and r1["BSBR"][32]["T"] == 32
    # a rerun reads finished cells from disk instead of recomputing them
    cell = tmp_path / "cells" / "BSBR__32.json"
    cell.write_text(json.dumps({"T": 32, "norm": -1.0}))
    r2 = CustomExperiment(out_dir=tmp_path, progress=False).run()
    assert r2["BSBR"][32]["norm"] == -1.0
    assert r2 == CustomExperiment(out_dir=tmp_path, progress=False).analyze_results(r2)


def test_calculate_accuracy():
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    assert ExperimentRunner.calculate_accuracy(logits, torch.tensor([[1, 1, -100]])) == 0.5
    with pytest.warns(UserWarning):
        assert ExperimentRunner.calculate_accuracy(logits) is None
    with pytest.raises(ValueError, match="labels"):
        ExperimentRunner.calculate_accuracy(logits, torch.tensor([[1, 1]]))
