"""Speed in the user's own process (issue 15): the module around the op, short inputs against the previous commit,
and the generic LM's forward exponents under glibc's default allocator.

Everything here runs as a new user would run it: a plain Python process — glibc's default malloc, 4 KiB pages
(no ``THP_MEM_ALLOC_ENABLE``), torch's default threads, none of benchmarks/_process.py's settings (the script
re-executes itself without them if they are set).  Sections (each printed as it finishes; JSON and Markdown to
benchmarks/results/bench_module.{json,md}):

1. ``module`` — ``BSBRAttention(512, 8, chunk 128)`` forward at T = 32,768, batch 1, fp32, inference mode, timed in
   interleaved rounds beside its parts on the same input: the four [T, 512] x [512, 512] projections (``q_proj``,
   ``k_proj``, ``v_proj``, ``out_proj`` called as they are), the op alone (``bsbr_parallel`` on contiguous
   q, k, v), one fused [512, 1536] q/k/v product in place of three (for the record: the layer uses it only where
   it is faster), and ``StandardAttention(512, 8)`` (the same projections around
   ``scaled_dot_product_attention(is_causal=True)``).  Ratios: module / (projections + op) and SDPA module / BSBR
   module.  With ``--module-old`` the ``--old`` commit's module and op run in the same rounds ("module_old",
   "op_old"): before and after side by side, each with its own ratios.  Then a profile (``torch.profiler``,
   record_shapes) of one forward of each, with the module's share outside its projections and op.
2. ``short`` — T <= 1,024: this commit against ``--old`` (default commit 8ae08a3, checked out with ``git worktree``
   and imported as a second package) side by side in one process, interleaved: the same module at D 512 and the
   generic LM of bench_baselines.py (hidden 256, 2 layers, 4 heads, ff 1024) for every model; same seeds, so the
   outputs are compared too (a speedup of a different computation would be no speedup).
3. ``exponents`` — the generic LM's forward at T = 4,096 and 16,384 for the sub-quadratic models, fastest of 5
   interleaved rounds, log-log slope; in two fresh processes: plain (the user's) and tuned
   (benchmarks/_process.py: huge pages and fixed malloc thresholds), this commit and the old one in each.

Run:  flock /tmp/bsbr-cpu.lock env PYTHONPATH=src python benchmarks/bench_module.py      (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _process  # noqa: E402  (no torch import)

PLAIN_DROP = ("THP_MEM_ALLOC_ENABLE", *_process.MALLOC)

if __name__ == "__main__" and "--tuned" not in sys.argv and any(k in os.environ for k in PLAIN_DROP):
    # a plain process: none of the harness settings (glibc reads its thresholds at start-up, torch THP at import)
    os.execve(sys.executable, [sys.executable, *sys.argv], {k: v for k, v in os.environ.items() if k not in PLAIN_DROP})
if __name__ == "__main__" and "--tuned" in sys.argv:
    _process.configure()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bsbr.layers.bsbr import BSBRAttention  # noqa: E402
from bsbr.layers.standard import StandardAttention  # noqa: E402
from bsbr.models import list_models  # noqa: E402
from bsbr.ops.bsbr import bsbr_parallel  # noqa: E402
from common import environment, header, interleaved, loglog_fit, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODULE = {"hidden_dim": 512, "num_heads": 8, "chunk_size": 128}
LM = {"hidden_dim": 256, "num_heads": 4, "num_layers": 2, "ff_dim": 1024}
SUBQUADRATIC = ("BSBR", "Linear", "SlidingWindow", "DeltaNet", "GAU")
TARGETS = {"module_over_parts": 1.3, "bsbr_vs_sdpa_module": 10.0, "exponent": 1.12, "bsbr_exponent": 1.08}


# ----------------------------------------------------------------------------------------------- helpers
def load_old(commit: str):
    """The package as of ``commit``, imported under the name ``bsbr_old`` from a detached git worktree (once per
    process: the module and short sections share it)."""
    if "bsbr_old" in sys.modules:
        return sys.modules["bsbr_old"]
    path = Path(f"/tmp/bsbr-old-{commit}")
    if not (path / "src" / "bsbr" / "__init__.py").exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=ROOT, check=True,
                       capture_output=True)
    init = path / "src" / "bsbr" / "__init__.py"
    spec = importlib.util.spec_from_file_location("bsbr_old", init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bsbr_old"] = mod
    spec.loader.exec_module(mod)
    return mod


def lm(pkg, name: str):
    torch.manual_seed(0)
    return pkg.models.build_model(name, vocab_size=256, dropout=0.0, **LM).eval()


# ------------------------------------------------------------------------------------------------ module
def module_section(T: int, rounds: int, old=None) -> dict:
    """``old``: the package of the commit to compare against (``--old``); its module and op are timed in the same
    rounds ("module_old", "op_old"), so its ratios come from the same sitting as this commit's."""
    D, H, chunk = MODULE["hidden_dim"], MODULE["num_heads"], MODULE["chunk_size"]
    print(f"\nmodule: BSBRAttention(hidden {D}, {H} heads, chunk {chunk}) at T = {T:,}, batch 1, fp32, inference mode; "
          f"{rounds} interleaved rounds" + ("" if old is None else f", beside {old.__name__}'s module and op"))
    torch.manual_seed(0)
    attn = BSBRAttention(D, H, chunk, dropout=0.0).eval()
    torch.manual_seed(0)
    std = StandardAttention(D, H, dropout=0.0).eval()
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        q, k, v = attn.qkv(x, 0)
        r, h = attn._chunk_meta(x, 0, None)
        w_qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        fns = {
            "module": lambda: attn(x),
            "projections": lambda: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.out_proj(x)),
            "op": lambda: bsbr_parallel(q, k, v, r, h, chunk),
            "fused_projections": lambda: (F.linear(x, w_qkv), attn.out_proj(x)),
            "sdpa_module": lambda: std(x),
        }
        if old is not None:  # the same weights (same seed), the old code
            torch.manual_seed(0)
            attn_old = old.layers.BSBRAttention(D, H, chunk, dropout=0.0).eval()
            r_old, h_old = attn_old._chunk_meta(x, 0, None)
            fns["module_old"] = lambda: attn_old(x)
            fns["op_old"] = lambda: old.ops.bsbr.bsbr_parallel(q, k, v, r_old, h_old, chunk)
            y, y_old = attn(x), attn_old(x)
            old_rel_diff = ((y - y_old).norm() / y_old.norm()).item()
        for fn in fns.values():  # warm-up
            fn()
        timed = dict(zip(fns, interleaved(list(fns.values()), rounds), strict=True))
        # three profiles of each, interleaved; the one with the least total time is kept (noise only adds time)
        profiles: dict = {}
        for _ in range(3):
            for name in ("module", "projections", "op"):
                p = profile(fns[name])
                if name not in profiles or p["total_s"] < profiles[name]["total_s"]:
                    profiles[name] = p
        # the same choice at the generic LM's width: three q/k/v products or one fused (hidden 256, T = 16,384)
        x256 = torch.randn(1, 16384, 256, generator=torch.Generator().manual_seed(2))
        w256 = [torch.randn(256, 256, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        w256_fused = torch.cat(w256)
        three = lambda: [F.linear(x256, w) for w in w256]  # noqa: E731
        fused = lambda: F.linear(x256, w256_fused)  # noqa: E731
        three(), fused()
        t3, t1 = interleaved([three, fused], 3 * rounds)
        timed["qkv_three_h256_T16384"], timed["qkv_fused_h256_T16384"] = t3, t1
    best = {k: v["min"] for k, v in timed.items()}
    parts = best["projections"] + best["op"]
    out = {"T": T, "shape": MODULE, "rounds": rounds, "times": timed,
           "module_over_parts": best["module"] / parts, "outside_share_timed": 1 - parts / best["module"],
           "sdpa_module_over_bsbr_module": best["sdpa_module"] / best["module"],
           "fused_over_separate_projections": best["fused_projections"] / best["projections"],
           "fused_over_three_qkv_h256": best["qkv_fused_h256_T16384"] / best["qkv_three_h256_T16384"],
           "profile": profiles}
    if old is not None:
        out["old"] = {"module_over_parts": best["module_old"] / (best["projections"] + best["op_old"]),
                      "sdpa_module_over_bsbr_module": best["sdpa_module"] / best["module_old"],
                      "old_module_over_new": best["module_old"] / best["module"],
                      "old_op_over_new": best["op_old"] / best["op"], "outputs_rel_diff": old_rel_diff}
    prof_parts = profiles["projections"]["total_s"] + profiles["op"]["total_s"]
    out["outside_share_profiled"] = 1 - prof_parts / profiles["module"]["total_s"]
    for name, t in timed.items():
        print(f"  {name:18s} {1e3 * t['min']:9.1f} ms (median {1e3 * t['median']:9.1f})")
    print(f"  module / (projections + op) = {out['module_over_parts']:.3f} (fastest rounds); the module's time outside "
          f"its projections and op: {100 * out['outside_share_timed']:.0f}% timed, "
          f"{100 * out['outside_share_profiled']:.0f}% in the profiles")
    print(f"  SDPA module / BSBR module = {out['sdpa_module_over_bsbr_module']:.1f}x; one fused q/k/v product / three: "
          f"{out['fused_over_separate_projections']:.3f} "
          f"(hidden 256, T = 16,384: {out['fused_over_three_qkv_h256']:.3f})")
    if old is not None:
        o = out["old"]
        print(f"  old commit in the same rounds: module / (projections + op) = {o['module_over_parts']:.3f}, "
              f"SDPA module / BSBR module = {o['sdpa_module_over_bsbr_module']:.1f}x; old / new: module "
              f"{o['old_module_over_new']:.3f}, op {o['old_op_over_new']:.3f}; outputs differ by "
              f"{o['outputs_rel_diff']:.1e}")
    print("\n  profile of one module forward (self CPU time, top ops):")
    for row in profiles["module"]["top"]:
        print(f"    {row['name']:48s} {row['self_ms']:8.1f} ms  x{row['calls']:<4d} {row['shapes'][:60]}")
    return out


def profile(fn, top: int = 12) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
    return {"total_s": total,
            "top": [{"name": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
                     "shapes": str(e.input_shapes)} for e in rows[:top]]}


# ------------------------------------------------------------------------------------------------- short
def short_section(old, lengths: list[int], rounds: int) -> dict:
    import bsbr

    print(f"\nshort inputs: this commit against the old one ({old.__name__} from {Path(old.__file__).parents[2]}), "
          f"interleaved, {rounds} rounds, fastest (median)")
    out: dict = {}
    cases = []
    for T in lengths:
        x = torch.randn(1, T, MODULE["hidden_dim"], generator=torch.Generator().manual_seed(T))
        ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(T))
        mods = []
        for pkg in (bsbr, old, old):  # the second old copy is the control: identical code, separate tensors
            torch.manual_seed(0)
            mods.append(pkg.layers.BSBRAttention(MODULE["hidden_dim"], MODULE["num_heads"], MODULE["chunk_size"],
                                                 dropout=0.0).eval())
        cases.append((f"BSBRAttention D{MODULE['hidden_dim']}", T, mods, x))
        for name in list_models():
            cases.append((f"LM {name}", T, [lm(bsbr, name), lm(old, name), lm(old, name)], ids))
    with torch.inference_mode():
        for label, T, (new_m, old_m, control_m), inp in cases:
            a, b = new_m(inp), old_m(inp)
            a = a if isinstance(a, torch.Tensor) else a
            err = ((a - b).norm() / b.norm()).item()
            control_m(inp)
            t_new, t_old, t_ctl = interleaved([lambda m=m, i=inp: m(i) for m in (new_m, old_m, control_m)], rounds)
            row = {"new_ms": {k: 1e3 * t_new[k] for k in ("min", "median")},
                   "old_ms": {k: 1e3 * t_old[k] for k in ("min", "median")},
                   "old_over_new": t_old["min"] / t_new["min"],
                   "old_over_new_median": t_old["median"] / t_new["median"],
                   # A/A: the old commit against a second copy of itself, the noise of this cell's comparison
                   "old_over_control": t_old["min"] / t_ctl["min"],
                   "rel_diff": err}
            out.setdefault(label, {})[str(T)] = row
            print(f"  {label:22s} T {T:5d}: new {row['new_ms']['min']:7.2f} ms ({row['new_ms']['median']:7.2f}), "
                  f"old {row['old_ms']['min']:7.2f} ({row['old_ms']['median']:7.2f}), "
                  f"old/new {row['old_over_new']:.2f} "
                  f"(medians {row['old_over_new_median']:.2f}; A/A control {row['old_over_control']:.2f}); "
                  f"outputs differ by {err:.1e}", flush=True)
    return out


def short_sections(old, lengths: list[int], rounds: int, threads: list[int]) -> dict:
    """:func:`short_section` once per thread setting (0 = torch's default), keyed "threads=N"."""
    default = torch.get_num_threads()
    out = {}
    try:
        for n in threads:
            torch.set_num_threads(n or default)
            print(f"\n  torch threads: {torch.get_num_threads()}")
            out[f"threads={torch.get_num_threads()}"] = short_section(old, lengths, rounds)
    finally:
        torch.set_num_threads(default)
    return out


# --------------------------------------------------------------------------------------------- exponents
def exponents_child(old_commit: str, lengths: list[int], rounds: int) -> dict:
    import bsbr

    pkgs = {"new": bsbr, "old": load_old(old_commit)}
    out = {"environment": {**environment(), **_process.describe()}, "forward_ms": {}}
    for version, pkg in pkgs.items():
        for name in SUBQUADRATIC:
            m = lm(pkg, name)
            ids = {T: torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(T)) for T in lengths}
            with torch.inference_mode():
                for T in lengths:
                    m(ids[T])
                timed = interleaved([lambda m=m, x=ids[T]: m(x) for T in lengths], rounds)
            row = {str(T): {"min": 1e3 * r["min"], "median": 1e3 * r["median"]} for T, r in zip(lengths, timed,
                                                                                                   strict=True)}
            a, b = lengths[-2], lengths[-1]
            row["exponent"] = loglog_fit([a, b], [row[str(a)]["min"], row[str(b)]["min"]])["k"]
            row["exponent_median"] = loglog_fit([a, b], [row[str(a)]["median"], row[str(b)]["median"]])["k"]
            out["forward_ms"].setdefault(version, {})[name] = row
    return out


def exponents_section(old_commit: str, lengths: list[int], rounds: int) -> dict:
    print(f"\nexponents: generic LM (hidden {LM['hidden_dim']}, {LM['num_layers']} layers, {LM['num_heads']} heads, "
          f"ff {LM['ff_dim']}) forward, batch 1, fp32, inference mode, T = {', '.join(map(str, lengths))}; fastest of "
          f"{rounds} interleaved rounds; a fresh process per setting")
    out = {}
    for setting in ("plain", "tuned"):
        env = {k: v for k, v in os.environ.items() if k not in PLAIN_DROP}
        flags = ["--tuned"] if setting == "tuned" else []
        proc = subprocess.run([sys.executable, __file__, "--exponents-child", "--old", old_commit, "--rounds",
                               str(rounds), "--lengths", *map(str, lengths), *flags], env=env, capture_output=True,
                              text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"exponents child ({setting}) failed:\n{proc.stderr}")
        out[setting] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {'model':14s} " + " ".join(f"{s + ' ' + v:>13s}" for s in out for v in ("new", "old"))
          + "   (exponent 4096->16384 of the fastest rounds)")
    for name in SUBQUADRATIC:
        cells = [out[s]["forward_ms"][v][name]["exponent"] for s in out for v in ("new", "old")]
        print(f"  {name:14s} " + " ".join(f"{c:13.3f}" for c in cells))
    return out


# ------------------------------------------------------------------------------------------------ report
def targets(res: dict) -> dict:
    checks = {}
    m = res.get("module")
    if m:
        ratio = m["module_over_parts"]
        checks["module <= 1.3 x (four projections + op), T=32768"] = (ratio, ratio <= TARGETS["module_over_parts"])
        checks["BSBR module >= 10x the SDPA module, T=32768"] = (
            m["sdpa_module_over_bsbr_module"], m["sdpa_module_over_bsbr_module"] >= TARGETS["bsbr_vs_sdpa_module"])
    e = res.get("exponents")
    if e:
        for name in SUBQUADRATIC:
            k = e["plain"]["forward_ms"]["new"][name]["exponent"]
            limit = TARGETS["bsbr_exponent"] if name == "BSBR" else TARGETS["exponent"]
            checks[f"{name} exponent 4096->16384 <= {limit} (plain process)"] = (k, k <= limit)
    for threads, s in res.get("short", {}).items():
        worst = min(row["old_over_new"] for per_t in s.values() for row in per_t.values())
        checks[f"nothing slower at T <= 1024, {threads} (min over cells of old/new, fastest rounds)"] = (worst,
                                                                                                      worst >= 1.0)
        ctl = [row["old_over_control"] for per_t in s.values() for row in per_t.values() if "old_over_control" in row]
        if ctl:  # the same minimum for the old commit against a copy of itself: how low noise alone takes it
            floor = min(min(ctl), 1 / max(ctl))
            checks[f"nothing slower at T <= 1024, {threads}, beyond the A/A noise floor {floor:.3f} (min old/new)"] = (
                worst, worst >= floor)
    return {k: {"value": v, "met": ok} for k, (v, ok) in checks.items()}


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"Measured {env['date']} on {env['cpu']}, {env['threads']} threads, torch {env['torch']}, commit "
             f"{env['commit']}; plain process (THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}, malloc: "
             f"{env['malloc']}); command: `{res['command']}`.", ""]
    if res.get("load_average"):
        lines += ["Host load (1-minute load average before / after each section; the host has 2 cores and is shared): "
                  + ", ".join(f"{k} {v['before']:.1f} / {v['after']:.1f}" for k, v in res["load_average"].items())
                  + ".", ""]
    m = res.get("module")
    if m:
        lines += [f"Module at T = {m['T']:,} (D {MODULE['hidden_dim']}, H {MODULE['num_heads']}, chunk "
                  f"{MODULE['chunk_size']}, fp32, inference), {m['rounds']} interleaved rounds:", "",
                  "| timed | fastest (ms) | median (ms) |", "|---|---:|---:|"]
        for name, t in m["times"].items():
            lines.append(f"| {name} | {1e3 * t['min']:.1f} | {1e3 * t['median']:.1f} |")
        lines += ["", f"module / (projections + op) = **{m['module_over_parts']:.3f}**; share of the module's time "
                  f"outside its projections and op: {100 * m['outside_share_timed']:.0f}% (timed), "
                  f"{100 * m['outside_share_profiled']:.0f}% (profiled); SDPA module / BSBR module = "
                  f"**{m['sdpa_module_over_bsbr_module']:.1f}x**; fused q/k/v product (+ out_proj) / the four "
                  f"products = {m['fused_over_separate_projections']:.3f}; at hidden 256, T = 16,384 one fused q/k/v "
                  f"product / three = {m['fused_over_three_qkv_h256']:.3f}.", ""]
        if m.get("old"):
            o = m["old"]
            lines += [f"The old commit ({res['old_commit']}) in the same rounds: module / (projections + op_old) = "
                      f"**{o['module_over_parts']:.3f}**, SDPA module / its module = "
                      f"**{o['sdpa_module_over_bsbr_module']:.1f}x**; old / new = {o['old_module_over_new']:.3f} "
                      f"(module), {o['old_op_over_new']:.3f} (op); outputs differ by {o['outputs_rel_diff']:.1e}.", ""]
        lines += ["Profile of one module forward (self CPU time):", "", "| op | ms | calls | input shapes |",
                  "|---|---:|---:|---|"]
        for row in m["profile"]["module"]["top"]:
            lines.append(f"| {row['name']} | {row['self_ms']:.1f} | {row['calls']} | `{row['shapes'][:90]}` |")
        lines.append("")
    for threads, s in res.get("short", {}).items():
        lines += [f"Short inputs, {threads}, this commit vs {res['old_commit']} (fastest of {res['rounds_short']} "
                  "interleaved rounds, median in brackets):", "",
                  "| case | T | new (ms) | old (ms) | old / new | A/A: old / old copy | outputs rel. diff |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for label, per_t in s.items():
            for T, r in per_t.items():
                ctl = f"{r['old_over_control']:.2f}" if "old_over_control" in r else "—"
                lines.append(f"| {label} | {int(T):,} | {r['new_ms']['min']:.2f} ({r['new_ms']['median']:.2f}) | "
                             f"{r['old_ms']['min']:.2f} ({r['old_ms']['median']:.2f}) | {r['old_over_new']:.2f} | "
                             f"{ctl} | {r['rel_diff']:.1e} |")
        lines.append("")
    e = res.get("exponents")
    if e:
        lens = res["lengths_exponents"]
        lines += ["Forward exponents 4,096 -> 16,384 of the generic LM (hidden 256, 2 layers, 4 heads, ff 1024), "
                  "fastest of 5 interleaved rounds (median-based in brackets); times in ms (fastest):", "",
                  "| model | plain: new | plain: old | tuned: new | tuned: old | "
                  + " | ".join(f"plain new T={t}" for t in lens) + " |", "|---" * (5 + len(lens)) + "|"]
        for name in SUBQUADRATIC:
            cells = []
            for setting in ("plain", "tuned"):
                for v in ("new", "old"):
                    r = e[setting]["forward_ms"][v][name]
                    cells.append(f"{r['exponent']:.3f} ({r['exponent_median']:.3f})")
            cells += [f"{e['plain']['forward_ms']['new'][name][str(t)]['min']:.1f}" for t in lens]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for setting in ("plain", "tuned"):
            env_s = e[setting]["environment"]
            lines.append(f"\n{setting}: THP_MEM_ALLOC_ENABLE={env_s['THP_MEM_ALLOC_ENABLE']}, "
                         f"malloc: {env_s['malloc']}, {env_s['threads']} threads")
        lines.append("")
    if res.get("targets"):
        lines += ["| target (issue 15) | measured | met |", "|---|---:|---|"]
        for name, t in res["targets"].items():
            lines.append(f"| {name} | {t['value']:.3f} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="module,short,exponents")
    p.add_argument("--T", type=int, default=32768, help="length of the module section")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--old", default="8ae08a3", help="commit to compare against (short and exponents sections)")
    p.add_argument("--short-lengths", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--short-threads", type=int, nargs="+", default=[0, 1],
                   help="torch threads for the short section, one pass each (0: torch's default); one thread is the "
                        "reading that survives a busy shared host (no thread waits for a descheduled other)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--module-old", action="store_true",
                   help="also time --old's module and op in the module section's rounds (before / after side by side)")
    p.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--exponents-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench_module.json")
    args = p.parse_args()
    if args.exponents_child:
        print(json.dumps(exponents_child(args.old, args.lengths, args.rounds)))
        return 0
    env = {**environment(), **_process.describe()}
    print("bench_module |", header(env),
          f"| THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']} | malloc: {env['malloc']}")
    res = {"environment": env, "command": " ".join(["benchmarks/bench_module.py", *sys.argv[1:]]),
           "old_commit": args.old, "rounds_short": 3 * args.rounds, "lengths_exponents": args.lengths}
    sections = args.sections.split(",")
    runs = {"module": lambda: module_section(args.T, args.rounds, load_old(args.old) if args.module_old else None),
            "short": lambda: short_sections(load_old(args.old), args.short_lengths, 3 * args.rounds,
                                            args.short_threads),
            "exponents": lambda: exponents_section(args.old, args.lengths, args.rounds)}
    res["load_average"] = {}
    for name, run in runs.items():
        if name in sections:
            before = os.getloadavg()
            res[name] = run()
            # the host is shared: its 1-minute load average around each section, beside the numbers
            res["load_average"][name] = {"before": before[0], "after": os.getloadavg()[0]}
            print(f"  (load average, 1 min: {before[0]:.2f} before, {os.getloadavg()[0]:.2f} after)")
    res["targets"] = targets(res)
    print("\ntargets (issue 15):")
    for name, t in res["targets"].items():
        print(f"  {'PASS' if t['met'] else 'MISS'}  {name}: {t['value']:.3f}")
    path = write_json(args.out, res)
    path.with_suffix(".md").write_text(markdown(res))
    print(f"\nresults written to {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
