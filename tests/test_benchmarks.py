"""The benchmark's analytic FLOP counts agree with torch's own FlopCounterMode on the op they describe.

FlopCounterMode sees the batched matmuls (states, mixture, readout) but not the fused CPU flash-attention
kernel of the local part, so the local count is checked against the SDPA formula separately."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bsbr.ops.bsbr import bsbr_parallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_bsbr  # noqa: E402


@pytest.mark.parametrize("T", [1024, 9000])  # one row group; four row groups of the triangular mixture (C >= 64)
def test_dense_flop_count_matches_flop_counter(T):
    g = torch.Generator().manual_seed(0)
    H, d, chunk = bench_bsbr.H, bench_bsbr.D, bench_bsbr.CHUNK
    C = math.ceil(T / chunk)
    q, k, v = (torch.randn(1, H, T, d, generator=g, requires_grad=True) for _ in range(3))
    r, h = (torch.randn(1, H, C, d, generator=g) for _ in range(2))
    with FlopCounterMode(display=False) as counter:  # the autograd path: every matmul is out of place
        bsbr_parallel(q, k, v, r, h, chunk)
    counts = bench_bsbr.bsbr_flops(T)
    parts = counts["dense_parts"]
    assert counter.get_total_flops() == parts["states"] + parts["mixing"] + parts["readout"]
    assert parts["local"] == 4 * H * C * chunk * chunk * d  # q k^T and p v over every chunk block
    assert sum(parts.values()) == counts["dense"]
    assert counts["causal"] < counts["dense"]


@pytest.mark.parametrize("T", [1, 63, 200])
def test_deltanet_core_variants_equal_the_recurrence(T):
    """bench_deltanet_core's correct variants (one solve per chunk, stacked loop, both) compute the same as the
    token recurrence, odd chunk counts, a padded last chunk and chunks split for the UT transform included; fp64."""
    import torch.nn.functional as F

    import bench_deltanet_core as bench
    from bsbr.ops.deltanet import delta_chunkwise, delta_recurrent

    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 8, generator=g, dtype=torch.float64) for _ in range(3))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    beta = torch.rand(2, 3, T, generator=g, dtype=torch.float64)
    ref, _ = delta_recurrent(q, k, v, beta)
    for chunk in (4, 16, 64):
        for out in (bench.chunkwise(q, k, v, beta, chunk, ut_leaf=chunk),
                    bench.chunkwise(q, k, v, beta, chunk, in_place=False),
                    bench.chunkwise(q, k, v, beta, chunk, ut_leaf=chunk, in_place=False),
                    delta_chunkwise(q, k, v, beta, chunk)[0]):
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_bench_module_smoke():
    """bench_module.py's module section runs at a small length and its report renders (no old commit needed)."""
    import bench_module

    res = {"environment": {"date": "-", "cpu": "-", "threads": 1, "torch": "-", "commit": "-",
                           "THP_MEM_ALLOC_ENABLE": "0", "malloc": "-"}, "command": "-",
           "module": bench_module.module_section(512, rounds=1)}
    res["targets"] = bench_module.targets(res)
    text = bench_module.markdown(res)
    assert "module / (projections + op)" in text and "SDPA module / BSBR module" in text
    assert {"module", "projections", "op", "fused_projections", "sdpa_module"} <= set(res["module"]["times"])


def test_bench_gau_tiles_padded_and_tiled_agree():
    """bench_gau_tiles.py's two forms (one T x T tile; zero padding to g, what gau_mixed computed before
    2026-12-04) give the same output, checked inside ``measure`` before timing, for T below, at and above g."""
    import bench_gau_tiles

    for T in (5, 16, 21):
        row = bench_gau_tiles.measure(T, group=16, batch=2, s=4, e=6, rounds=1)
        assert row["T"] == T and row["tiled_min_s"] > 0 and row["padded_min_s"] > 0


def test_bench_blocks_rows_smoke(tmp_path):
    """bench_blocks_rows.py times both selections on the same inputs, gets the same output from them, and leaves
    the op's row-group selection in place afterwards."""
    import bench_blocks_rows
    from bsbr.ops import bsbr_blocks
    from bsbr.ops.bsbr_blocks_select import select_in_row_groups

    out = tmp_path / "rows.json"
    assert bench_blocks_rows.main(["--lengths", "2048", "--rounds", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["T"] == 2048 and row["max_abs_difference"] == 0.0
    assert set(row["fastest"]) == {"every chunk", "row groups"}
    assert bsbr_blocks.select_in_row_groups is select_in_row_groups


def test_profile_blocks_op_smoke(tmp_path):
    """profile_blocks_op.py finds the op's flash calls and top-k in the profile and writes its JSON."""
    import profile_blocks_op

    out = tmp_path / "profile.json"
    assert profile_blocks_op.main(["--T", "2048", "--threads", "1", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["row"]
    assert row["T"] == 2048 and 0 < row["flash_seconds"] < row["op_profiled_seconds"]
    assert row["topk_seconds"] > 0 and row["ratio_if_only_flash_calls"] > 0
