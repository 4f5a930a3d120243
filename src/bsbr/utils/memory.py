"""Memory of a model on one input: peak and current bytes (CUDA allocator) or activation bytes (CPU)."""

from __future__ import annotations

import torch

from ..evals.measure import activation_bytes


def analyze_memory_usage(model: torch.nn.Module, input_ids: torch.Tensor, backward: bool = True) -> dict:
    """Measure what one forward (+ backward when ``backward``) of ``model(input_ids)`` needs.

    CUDA: ``peak_memory`` = ``max_memory_allocated`` after a reset and ``current_memory`` = ``memory_allocated``
    afterwards (kind "cuda_allocator").  CPU: ``peak_memory`` = bytes of the tensors saved for backward,
    parameters excluded (kind "saved_for_backward"; with ``backward=False`` a forward under no_grad saves
    nothing, so the bytes of the output are reported, kind "output"), ``current_memory`` = parameter bytes.
    All values in bytes; ``*_mb`` keys give MiB.
    """
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(input_ids.device)
        if backward:
            activation_bytes(model, input_ids)
        else:
            with torch.no_grad():
                model(input_ids)
        peak, current, kind = (torch.cuda.max_memory_allocated(input_ids.device),
                               torch.cuda.memory_allocated(input_ids.device), "cuda_allocator")
    elif backward:
        peak, current, kind = activation_bytes(model, input_ids)["bytes"], params, "saved_for_backward"
    else:
        with torch.no_grad():
            out = model(input_ids)
        out = out.logits if hasattr(out, "logits") else out
        peak, current, kind = out.numel() * out.element_size(), params, "output"
    return {"peak_memory": int(peak), "current_memory": int(current), "parameter_bytes": int(params), "kind": kind,
            "peak_memory_mb": peak / 2**20, "current_memory_mb": current / 2**20}
