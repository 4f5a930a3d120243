"""Where per-token block retrieval's inference op spends its time: torch.profiler over one ``blocks_parallel`` call
in bench_blocks.py's setting (H 8, d 64, chunk 128, top_k 4, the first chunk in view, batch 1, fp32, inference
mode, random q, k, v), self CPU time summed by operator.

    PYTHONPATH=src python benchmarks/profile_blocks_op.py              # T = 32,768, torch's default threads
    PYTHONPATH=src python benchmarks/profile_blocks_op.py --T 65536 --threads 1

Prints the share of the fused flash-attention calls (the attention itself), of top-k and of everything else, and
the op/SDPA ratio the op would reach if only its flash calls were left; writes
benchmarks/results/profile_blocks_op.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bsbr.ops.bsbr_blocks import BlockSpec, blocks_parallel  # noqa: E402
from common import write_with_command  # noqa: E402

FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=32768)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profile_blocks_op.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, args.T, 64, generator=g) for _ in range(3))
    spec = BlockSpec(chunk=128, top_k=4, sink=128)
    with torch.inference_mode():
        blocks_parallel(q, k, v, spec)  # warm-up
        t0 = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        sdpa = time.perf_counter() - t0
        with profile() as prof:
            blocks_parallel(q, k, v, spec)
    self_us = defaultdict(float)
    for e in prof.key_averages():
        self_us[e.key] += e.self_cpu_time_total
    total = sum(self_us.values()) / 1e6
    flash, topk = self_us[FLASH] / 1e6, self_us["aten::topk"] / 1e6
    row = {"T": args.T, "op_profiled_seconds": total, "flash_seconds": flash, "topk_seconds": topk,
           "other_seconds": total - flash - topk, "sdpa_causal_seconds": sdpa,
           "ratio_if_only_flash_calls": sdpa / flash,
           "top_operators": sorted(((k, us / 1e6) for k, us in self_us.items()), key=lambda x: -x[1])[:12]}
    print(f"T {args.T:,d}: op {total:.3f} s under the profiler: flash calls {flash:.3f} s ({flash / total:.0%}), "
          f"top-k {topk:.3f} s, the rest {total - flash - topk:.3f} s; SDPA causal {sdpa:.3f} s, so the op with only "
          f"its flash calls left would be {sdpa / flash:.1f}x SDPA")
    write_with_command(args.out, "profile_blocks_op.py", argv, row=row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
