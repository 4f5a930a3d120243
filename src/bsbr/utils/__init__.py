"""Utilities for researchers: memory profiling, plots, experiment runner."""
