"""Check and tune the split-KV decode attention kernels (compile_ops/decode_attention.py) in one
device call: numerics against the reference over odd cases, then the time of each tiling /
pipelining / split choice at the issue's sizes, against the default plan and SDPA over a dense
cache (same process, same copy-bandwidth figure). Triton kernels are compiled ahead in parallel
worker processes (--jobs), so the sweep spends its time timing, not compiling.

    python bench/tune_decode_attention.py --check --sweep --out $OUT
    python bench/tune_decode_attention.py --cpu-check     # TRITON_INTERPRET=1, fp32/fp16 only
"""

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_attention import gather_dense, kv_bytes, paged_inputs, sdpa_decode  # noqa: E402

from compile_ops import decode_attention as da  # noqa: E402
from compile_ops.attention import PARTITION_SIZE, paged_attention_ref  # noqa: E402
from compile_ops.testing import assert_close  # noqa: E402

# (dtype, kv, heads, kv_heads, head, bs, seq_lens, alibi, split): odd cases for --check
CHECKS = [
    (torch.bfloat16, "auto", 32, 8, 128, 16, [1, 37, 530, 1100, 0], False, None),
    (torch.bfloat16, "auto", 32, 8, 128, 16, [513, 64, 4096], False, 64),
    (torch.float16, "auto", 8, 8, 64, 8, [5, 300, 17], True, None),
    (torch.bfloat16, "fp8", 32, 8, 128, 16, [1, 700, 2049], False, None),
    (torch.bfloat16, "fp8_e5m2", 16, 1, 256, 32, [33, 1000], True, None),
    (torch.float16, "fp8", 64, 8, 96, 16, [130, 1], False, 128),
    (torch.bfloat16, "auto", 4, 4, 80, 8, [77, 0, 600], False, None),
    (torch.bfloat16, "auto", 12, 4, 192, 32, [40, 900], False, None),
    (torch.bfloat16, "auto", 8, 2, 32, 16, [1, 2000], False, None),
    (torch.float32, "auto", 8, 2, 120, 16, [50, 513], True, None),
    (torch.bfloat16, "auto", 128, 1, 112, 16, [90, 3], False, None),
]


def check_case(dtype, kv, heads, kvh, head, bs, lens, alibi, split, device, backend="triton",
               cuda_kw=None):
    c = paged_inputs(lens, heads, kvh, head, bs, dtype, kv, device)
    c["alibi_slopes"] = (torch.rand(heads, device=device) * 0.5 + 0.01) if alibi else None
    seqs = len(lens)
    max_len = max(lens)
    want, parts = paged_attention_ref(c["query"], c["key_cache"], c["value_cache"], kvh,
                                      c["scale"], c["block_tables"], c["seq_lens"],
                                      c["alibi_slopes"], kv, c["k_scale"], c["v_scale"],
                                      partition_size=PARTITION_SIZE)
    sms = da._sm_count(0) if device == "cuda" else 132
    for v2 in (False, True):
        if backend == "cuda":
            kw = dict(cuda_kw or {})
            kw.setdefault("f16_mma", dtype == torch.float16 or kv != "auto")
            if v2 and (kw.get("split") or 0) > PARTITION_SIZE:
                kw.pop("split")
            p = da.plan_cuda(seqs, heads, kvh, max_len, sms, v2, **kw)
        else:
            p = da.plan(seqs, heads, kvh, head, max_len, c["key_cache"].element_size(), sms,
                        split=split)
        out = torch.full_like(c["query"], float("nan"))
        bufs = None
        if v2:
            n = max(1, -(-max_len // PARTITION_SIZE))
            bufs = (torch.full((seqs, heads, n), float("nan"), device=device),
                    torch.full((seqs, heads, n), float("nan"), device=device),
                    torch.full((seqs, heads, n, head), float("nan"), dtype=dtype,
                               device=device))
        da.paged_decode(out, c["query"], c["key_cache"], c["value_cache"], kvh, c["scale"],
                        c["block_tables"], c["seq_lens"], max_len, c["alibi_slopes"], kv,
                        c["k_scale"], c["v_scale"], v2=bufs, the_plan=p)
        what = f"{dtype} kv={kv} {heads}/{kvh}x{head} bs={bs} lens={lens} v2={v2} {p}"
        assert_close(out, want, msg=what)
        if v2:
            es, ml, tmp = bufs
            for i, (o, m, s) in enumerate(parts):
                has = torch.tensor([n > i * PARTITION_SIZE for n in lens], device=device)
                assert_close(ml[has, :, i], m[has], dtype=torch.float32, msg=what + " max")
                torch.testing.assert_close(es[has, :, i], s[has], rtol=1e-4, atol=1e-5,
                                           msg=what + " exp sums")
                assert_close(tmp[has, :, i], o[has].to(dtype), msg=what + " tmp_out")
                assert torch.isnan(ml[~has, :, i]).all(), what + " wrote past the sequence"
    return f"ok {dtype} kv={kv} {heads}/{kvh}x{head} bs={bs} lens={lens} splits={p.nsplit}"


def configs():
    """Tile / pipeline / split variants of the sweep (the default plan is timed as well)."""
    out = []
    for bn, st, w in itertools.product((32, 64, 128), (2, 3, 4), (4, 8)):
        out.append(dict(block_n=bn, num_stages=st, num_warps=w))
    return out


SWEEP_POINTS = [(1, 512), (1, 4096), (8, 4096), (64, 4096), (32, 16384)]
GRID = [(b, c) for b in (1, 8, 32, 64, 128) for c in (512, 4096, 16384)]


def plan_for(batch, context, kv, dtype, heads, kvh, head, **over):
    eb = 1 if kv != "auto" else dtype.itemsize
    return da.plan(batch, heads, kvh, head, context, eb, da._sm_count(0), **over)


def cuda_plan_for(batch, context, kv, dtype, heads, kvh, head, v2=True, **over):
    over.setdefault("f16_mma", dtype == torch.float16 or kv != "auto")
    return da.plan_cuda(batch, heads, kvh, context, da._sm_count(0), v2, **over)


def cuda_checks():
    """CHECKS with the CUDA kernel (where it applies) at its default plan and at every split."""
    for case in CHECKS:
        dtype, kv, heads, kvh, head, bs, lens, alibi, split = case
        if dtype == torch.float32 or head % 16 or (kv != "auto" and bs == 8):
            continue
        kws = [dict(split=split)] + [dict(split=sp) for sp in (32, 64, 128, 256, 512, 4096)]
        kws += [dict(sub=sb) for sb in (128, 256, 512)]
        kws += [dict(split=sp, p_split=False) for sp in (64, 4096)] + [dict(p_split=False)]
        for kw in kws:
            try:
                print(check_case(dtype, kv, heads, kvh, head, bs, lens, alibi, None, "cuda",
                                 backend="cuda", cuda_kw=kw), kw, flush=True)
            except AssertionError as e:
                print("FAIL cuda", kw, str(e)[:800], flush=True)


def cuda_grid(args, copy_bw, rows, dtype, heads, kvh, head, bs):
    """Per grid point: the CUDA kernel's default plan (v1 and v2), other splits, the Triton
    kernel's default plan (v2) and SDPA over a dense cache."""
    for kv in args.kv:
        for b, ctx in GRID:
            nb = kv_bytes(b, ctx, kvh, head, kv, dtype)
            sets = input_sets(b, ctx, kv, dtype, heads, kvh, head, bs)
            p1 = cuda_plan_for(b, ctx, kv, dtype, heads, kvh, head, v2=False)
            p2 = cuda_plan_for(b, ctx, kv, dtype, heads, kvh, head, v2=True)
            s1 = time_plan(sets, p1, v2=False)
            s2 = time_plan(sets, p2)
            alts = ""
            variants = [(f"s{sp}", False, dict(split=sp)) for sp in args.splits]
            variants += [("v1-2p", False, dict(p_split=True))]
            if ctx > PARTITION_SIZE:
                variants += [("v2-s512", True, dict(split=PARTITION_SIZE)),
                             ("v2-sub512", True, dict(sub=PARTITION_SIZE))]
            for name, v2, kw in variants:
                pa = cuda_plan_for(b, ctx, kv, dtype, heads, kvh, head, v2=v2, **kw)
                if pa == (p2 if v2 else p1):
                    continue
                sa = time_plan(sets, pa, v2=v2)
                alts += f" {name}({pa.split}x{pa.nsplit}{'w' if pa.sub else ''}):{sa * 1e6:.1f}"
                rows.append(dict(kind="cuda_variant", name=name, kv=kv, batch=b, context=ctx,
                                 split=pa.split, nsplit=pa.nsplit, sub=pa.sub, us=sa * 1e6))
            st = time_plan(sets, plan_for(b, ctx, kv, dtype, heads, kvh, head))
            sd = time_sdpa(sets) if kv == "auto" else 0
            del sets
            torch.cuda.empty_cache()
            rows.append(dict(kind="cuda_grid", kv=kv, batch=b, context=ctx, v1_us=s1 * 1e6,
                             v2_us=s2 * 1e6, triton_us=st * 1e6, sdpa_us=sd * 1e6,
                             split1=p1.split, nsplit1=p1.nsplit, split2=p2.split,
                             nsplit2=p2.nsplit, pct1=100 * nb / s1 / copy_bw,
                             pct2=100 * nb / s2 / copy_bw))
            print(f"cuda kv={kv} {b}x{ctx}: v1 {s1 * 1e6:8.2f} ({100 * nb / s1 / copy_bw:5.1f}%)"
                  f" v2 {s2 * 1e6:8.2f} ({100 * nb / s2 / copy_bw:5.1f}%) triton {st * 1e6:8.2f}"
                  f" sdpa {sd * 1e6:8.2f} x{(sd / s1) if sd else 0:.2f}"
                  f" plan {p1.split}x{p1.nsplit}/{p2.split}x{p2.nsplit}{'w' if p2.sub else ''}"
                  f"{alts}", flush=True)


def breakdown(b, ctx, kvs, dtype, heads, kvh, head, bs):
    """GPU time per kernel of v1 and v2 (default CUDA plans) over 20 calls."""
    from torch.profiler import ProfilerActivity, profile

    for kv in kvs:
        c = input_sets(b, ctx, kv, dtype, heads, kvh, head, bs)[0]
        for v2 in (False, True):
            p = cuda_plan_for(b, ctx, kv, dtype, heads, kvh, head, v2=v2)

            def call():
                da.paged_decode(c["out"], c["query"], c["key_cache"], c["value_cache"], kvh,
                                c["scale"], c["block_tables"], c["seq_lens"], ctx, None, kv,
                                c["k_scale"], c["v_scale"], v2=c["v2"] if v2 else None,
                                the_plan=p)
            for _ in range(3):
                call()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    call()
                torch.cuda.synchronize()
            per = {}
            for e in prof.events():
                if e.device_type.name == "CUDA":
                    per[e.name[:60]] = per.get(e.name[:60], 0.0) + e.device_time / 20
            print(f"breakdown kv={kv} {b}x{ctx} v2={v2} {p.split}x{p.nsplit}"
                  f"{'w' if p.sub else ''}: " +
                  ", ".join(f"{k} {v:.1f} us" for k, v in sorted(per.items(),
                                                                  key=lambda kv_: -kv_[1])),
                  flush=True)
        c = None
        torch.cuda.empty_cache()


def input_sets(batch, context, kv, dtype, heads, kvh, head, bs):
    """Enough input sets (each with its outputs and v2 buffers) to spill L2 when rotated."""
    n = harness.num_sets(kv_bytes(batch, context, kvh, head, kv, dtype))
    sets = []
    for _ in range(n):
        c = paged_inputs([context] * batch, heads, kvh, head, bs, dtype, kv, "cuda")
        parts = max(1, -(-context // PARTITION_SIZE))
        c["out"] = torch.empty_like(c["query"])
        c["v2"] = (torch.empty(batch, heads, parts, device="cuda"),
                   torch.empty(batch, heads, parts, device="cuda"),
                   torch.empty(batch, heads, parts, head, dtype=dtype, device="cuda"))
        sets.append(c)
    return sets


def time_plan(sets, p, v2=True):
    def make(c):
        def call():
            da.paged_decode(c["out"], c["query"], c["key_cache"], c["value_cache"],
                            c["num_kv_heads"], c["scale"], c["block_tables"], c["seq_lens"],
                            c["max_seq_len"], None, c["kv_cache_dtype"], c["k_scale"],
                            c["v_scale"], v2=c["v2"] if v2 else None, the_plan=p)
        return call
    c = sets[0]
    nbytes = kv_bytes(*c["query"].shape[:1], c["max_seq_len"], c["num_kv_heads"],
                      c["query"].shape[2], c["kv_cache_dtype"], c["query"].dtype)
    return harness.time_calls([make(c) for c in sets], nbytes)["seconds"]


def time_sdpa(sets):
    calls = []
    for c in sets:
        k, v = gather_dense(c)
        calls.append(lambda q=c["query"], k=k, v=v, s=c["scale"]: sdpa_decode(q, k, v, None, s))
    c = sets[0]
    nbytes = kv_bytes(*c["query"].shape[:1], c["max_seq_len"], c["num_kv_heads"],
                      c["query"].shape[2], "auto", c["query"].dtype)
    t = harness.time_calls(calls, nbytes)["seconds"]
    del calls
    torch.cuda.empty_cache()
    return t


def _precompile_worker(jobs):
    """Compile (and run once, on tiny inputs) each (kv, dtype, plan) so that the Triton disk
    cache holds every kernel of the sweep."""
    heads, kvh, head, bs = 32, 8, 128, 16
    for kv, dt, pd in jobs:
        dtype = getattr(torch, dt)
        p = da.Plan(**pd)
        c = paged_inputs([min(64, p.split)] * 2, heads, kvh, head, bs, dtype, kv, "cuda")
        out = torch.empty_like(c["query"])
        bufs = (torch.empty(2, heads, 3, device="cuda"), torch.empty(2, heads, 3, device="cuda"),
                torch.empty(2, heads, 3, head, dtype=dtype, device="cuda"))
        for v2 in (bufs, None):
            da.paged_decode(out, c["query"], c["key_cache"], c["value_cache"], kvh, c["scale"],
                            c["block_tables"], c["seq_lens"], 64, None, kv, c["k_scale"],
                            c["v_scale"], v2=v2, the_plan=p)
    torch.cuda.synchronize()
    return len(jobs)


def precompile(plans, jobs):
    import multiprocessing as mp
    todo = sorted({(kv, str(dt).split(".")[1], tuple(sorted(p.__dict__.items())))
                   for kv, dt, p in plans})
    todo = [(kv, dt, dict(pd)) for kv, dt, pd in todo]
    t = time.time()
    with mp.get_context("spawn").Pool(jobs) as pool:
        n = sum(pool.map(_precompile_worker, [todo[i::jobs] for i in range(jobs)]))
    print(f"precompiled {n} kernel variants in {time.time() - t:.0f} s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--cpu-check", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="tile/pipeline variants")
    ap.add_argument("--grid", action="store_true", help="default plan + SDPA over the grid")
    ap.add_argument("--waves", type=float, nargs="*", default=[],
                    help="also time the default tile with these waves targets")
    ap.add_argument("--kv", nargs="+", default=["auto", "fp8"])
    ap.add_argument("--profile", type=int, nargs=2, metavar=("BATCH", "CONTEXT"),
                    help="run the default plan twice at this size (under ncu), nothing else")
    ap.add_argument("--mini", action="store_true",
                    help="tile x stages x warps x P-split at 64 x 4096, bf16 and fp8 caches")
    ap.add_argument("--cuda", action="store_true",
                    help="the CUDA kernel: --check cases at every split, then the grid vs "
                         "the Triton kernel and SDPA")
    ap.add_argument("--splits", type=int, nargs="*", default=[],
                    help="with --cuda: also time these splits (v1) at each grid point")
    ap.add_argument("--points", default=None,
                    help="with --cuda: BxC,BxC,... instead of the whole grid")
    ap.add_argument("--breakdown", type=int, nargs=2, metavar=("BATCH", "CONTEXT"),
                    help="with --cuda: the kernels of v1 and v2 at this size (torch.profiler)")
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.cpu_check:
        for case in CHECKS:
            if case[0] == torch.bfloat16:  # the interpreter's bf16 dot is wrong (triton 3.8)
                case = (torch.float16,) + case[1:]
            print(check_case(*case, device="cpu"), flush=True)
        return
    dtype, heads, kvh, head, bs = torch.bfloat16, 32, 8, 128, 16
    if args.profile:
        b, ctx = args.profile
        for kv in args.kv:
            sets = input_sets(b, ctx, kv, dtype, heads, kvh, head, bs)[:1]
            p = (cuda_plan_for(b, ctx, kv, dtype, heads, kvh, head, v2=False) if args.cuda
                 else plan_for(b, ctx, kv, dtype, heads, kvh, head))
            c = sets[0]
            for _ in range(2):
                da.paged_decode(c["out"], c["query"], c["key_cache"], c["value_cache"], kvh,
                                c["scale"], c["block_tables"], c["seq_lens"], ctx, None, kv,
                                c["k_scale"], c["v_scale"], the_plan=p)
            torch.cuda.synchronize()
            print("profiled", kv, p, flush=True)
        return
    copy_bw = harness.copy_bandwidth()
    print(f"{harness.device_info()} copy {copy_bw / 1e12:.3f} TB/s", flush=True)
    rows = []
    plans = []
    if args.cuda:
        global GRID
        if args.points:
            GRID = [tuple(int(v) for v in pt.split("x")) for pt in args.points.split(",")]
        if args.check:
            cuda_checks()
        if args.breakdown:
            breakdown(*args.breakdown, args.kv, dtype, heads, kvh, head, bs)
        precompile([(kv, dtype, plan_for(b, ctx, kv, dtype, heads, kvh, head))
                    for kv in args.kv for b, ctx in GRID], args.jobs)
        cuda_grid(args, copy_bw, rows, dtype, heads, kvh, head, bs)
        if args.out and rows:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "tune_cuda.json"), "w") as f:
                json.dump(dict(info=harness.device_info(), copy_bw=copy_bw, rows=rows), f,
                          indent=1)
        return
    mini = [dict(block_n=bn, num_stages=st, num_warps=w, p_split=ps) for bn, st, w, ps in
            itertools.product((32, 64), (2, 3, 4), (2, 4), (True,))]
    if args.mini:
        for kv, cfg in itertools.product(("auto", "fp8"), mini):
            plans.append((kv, dtype, plan_for(64, 4096, kv, dtype, heads, kvh, head, **cfg)))
    if args.sweep:
        for (b, ctx), cfg, kv in itertools.product(SWEEP_POINTS, configs(), ["auto"]):
            plans.append((kv, dtype, plan_for(b, ctx, kv, dtype, heads, kvh, head, **cfg)))
    for kv in args.kv:
        for b, ctx in GRID if args.grid else []:
            plans.append((kv, dtype, plan_for(b, ctx, kv, dtype, heads, kvh, head)))
            for w in args.waves:
                plans.append((kv, dtype, plan_for(b, ctx, kv, dtype, heads, kvh, head,
                                                  waves=w)))
    if plans:
        precompile(plans, args.jobs)
    if args.check:
        for case in CHECKS:
            try:
                print(check_case(*case, device="cuda"), flush=True)
            except AssertionError as e:  # report and go on to the timings
                print("FAIL", str(e)[:600], flush=True)
    if args.sweep:
        for b, ctx in SWEEP_POINTS:
            floor = kv_bytes(b, ctx, kvh, head, "auto", dtype) / copy_bw
            res = []
            sets = input_sets(b, ctx, "auto", dtype, heads, kvh, head, bs)
            for cfg in configs():
                p = plan_for(b, ctx, "auto", dtype, heads, kvh, head, **cfg)
                s = time_plan(sets, p)
                res.append((s, cfg, p))
                rows.append(dict(kind="sweep", batch=b, context=ctx, us=s * 1e6, **cfg,
                                 split=p.split, nsplit=p.nsplit, pct=100 * floor / s))
            del sets
            torch.cuda.empty_cache()
            res.sort(key=lambda r: r[0])
            for s, cfg, p in res[:4]:
                print(f"sweep {b}x{ctx}: {s * 1e6:8.2f} us {100 * floor / s:5.1f}% {cfg} "
                      f"split={p.split} nsplit={p.nsplit}", flush=True)
    if args.mini:
        for kv in ("auto", "fp8"):
            floor = kv_bytes(64, 4096, kvh, head, kv, dtype) / copy_bw
            sets = input_sets(64, 4096, kv, dtype, heads, kvh, head, bs)
            res = []
            for cfg in mini:
                p = plan_for(64, 4096, kv, dtype, heads, kvh, head, **cfg)
                t = time_plan(sets, p)
                res.append((t, cfg))
                rows.append(dict(kind="mini", kv=kv, us=t * 1e6, pct=100 * floor / t, **cfg))
            del sets
            torch.cuda.empty_cache()
            for t, cfg in sorted(res, key=lambda r: r[0]):
                print(f"mini kv={kv} 64x4096: {t * 1e6:8.2f} us {100 * floor / t:5.1f}% {cfg}",
                      flush=True)
    if args.grid:
        for kv in args.kv:
            for b, ctx in GRID:
                nb = kv_bytes(b, ctx, kvh, head, kv, dtype)
                p = plan_for(b, ctx, kv, dtype, heads, kvh, head)
                sets = input_sets(b, ctx, kv, dtype, heads, kvh, head, bs)
                s1 = time_plan(sets, p, v2=False)
                s2 = time_plan(sets, p)
                extra = ""
                for w in args.waves:
                    pw = plan_for(b, ctx, kv, dtype, heads, kvh, head, waves=w)
                    if pw != p:
                        sw = time_plan(sets, pw)
                        extra += f" waves{w}:{sw * 1e6:.1f}us(split {pw.split})"
                        rows.append(dict(kind="waves", kv=kv, batch=b, context=ctx, waves=w,
                                         us=sw * 1e6, split=pw.split))
                sd = time_sdpa(sets) if kv == "auto" else 0
                del sets
                torch.cuda.empty_cache()
                rows.append(dict(kind="grid", kv=kv, batch=b, context=ctx, v1_us=s1 * 1e6,
                                 v2_us=s2 * 1e6, sdpa_us=sd * 1e6, split=p.split,
                                 nsplit=p.nsplit, pct=100 * nb / s2 / copy_bw))
                print(f"grid kv={kv} {b}x{ctx}: v1 {s1 * 1e6:8.2f} us v2 {s2 * 1e6:8.2f} us "
                      f"({100 * nb / s2 / copy_bw:5.1f}% of copy) sdpa {sd * 1e6:8.2f} us "
                      f"x{(sd / s2) if sd else 0:.2f} split={p.split}x{p.nsplit}{extra}",
                      flush=True)
    if args.out and rows:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tune_decode_attention.json"), "w") as f:
            json.dump(dict(info=harness.device_info(), copy_bw=copy_bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
