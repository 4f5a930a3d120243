"""Evaluation harness: measure registered models side by side and analyse the measurements."""

from .analysis import analyze_results, complexity_class, crossovers, fit_power_law
from .compare import COMPARE_METRICS, SCALING_METRICS, compare_models, scaling_analysis
from .flops import analytic_flops, attention_flops
from .measure import activation_bytes, count_flops, time_callable, time_interleaved
from .noise import NoisyTimingWarning, noise_warning
from .results import RESULTS_SCHEMA, load_results, validate_results

__all__ = ["COMPARE_METRICS", "RESULTS_SCHEMA", "SCALING_METRICS", "NoisyTimingWarning", "activation_bytes",
           "analytic_flops", "analyze_results", "attention_flops", "compare_models", "complexity_class", "count_flops",
           "crossovers", "fit_power_law", "load_results", "noise_warning", "scaling_analysis", "time_callable",
           "time_interleaved", "validate_results"]
