"""Comparison helpers: one place that reports max-abs and relative error and names the tensor that failed; the
non-finite values the tests plant; seeded inputs for the block-retrieval op tests."""

from __future__ import annotations

import torch

# relative RMS error allowed between two forms of the same computation, by dtype
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}
# the values the non-finite tests plant in inputs
NONFINITE = [float("nan"), float("inf")]



def errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max abs error, relative RMS error) computed in fp64."""
    a, e = actual.detach().double(), expected.detach().double()
    diff = a - e
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    rms_e = e.pow(2).mean().sqrt().item() if e.numel() else 0.0
    rel = diff.pow(2).mean().sqrt().item() / max(rms_e, 1e-30) if diff.numel() else 0.0
    return max_abs, rel


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rel_tol: float | None = None,
                 atol: float = 0.0) -> None:
    """Pass when the relative RMS error <= rel_tol (default by dtype) or the max abs error <= atol."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    tol = REL_TOL[actual.dtype] if rel_tol is None else rel_tol
    max_abs, rel = errors(actual, expected)
    assert rel <= tol or max_abs <= atol, (
        f"{name}: max abs err {max_abs:.3e}, relative RMS err {rel:.3e} > tolerance {tol:.1e}"
    )


def blocks_qkv(B, H, Hk, T, d, dtype=torch.float64, seed=0, grad=False):
    """Seeded q [B, H, T, d], k and v [B, Hk, T, d] for the block-retrieval op tests."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, d, generator=g, dtype=dtype).requires_grad_(grad) for h in (H, Hk, Hk)]
