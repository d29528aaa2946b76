"""Benchmark the RMSNorm family against eager PyTorch and torch.compile of the native formulation.

Two tables, one run, one process (so the copy-bandwidth reference is measured alongside):
- add + rms_norm: eager native, torch.compile(native), our ops unfused (torch add then
  compile_ops.rms_norm), our fused_add_rms_norm.
- rms_norm alone: eager native, torch.compile(native), compile_ops.rms_norm.

Bytes counted: each input read once, each output written once, plus the weight once.

    python bench/bench_norm.py                 # full bf16 grid + a float16/float32 subset
    python bench/bench_norm.py --quick         # a few sizes
    python bench/bench_norm.py --out bench/results --stem norm_H100
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import compile_ops  # noqa: E402

ops = torch.ops.compile_ops
EPS = 1e-6
DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def native_rms_norm(x, w, eps: float):
    xf = x.float()
    inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * inv).to(x.dtype) * w


def native_add_rms_norm(x, r, w, eps: float):
    z = x.float() + r.float()
    inv = torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)
    return (z * inv).to(x.dtype) * w, z.to(x.dtype)


compiled_rms_norm = torch.compile(native_rms_norm, dynamic=False)
compiled_add_rms_norm = torch.compile(native_add_rms_norm, dynamic=False)


def _inputs(tokens, hidden, dtype, with_residual):
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    r = torch.randn(tokens, hidden, device="cuda", dtype=dtype) if with_residual else None
    return x, r


def bench_add_norm(report, tokens, hidden, dtype, w):
    size = torch.finfo(dtype).bits // 8
    nbytes = 4 * tokens * hidden * size + hidden * size
    case = {"op": "add+rms_norm", "dtype": str(dtype).split(".")[-1], "tokens": tokens,
            "hidden": hidden}

    def eager():
        x, r = _inputs(tokens, hidden, dtype, True)
        return lambda: native_add_rms_norm(x, r, w, EPS)

    def compiled():
        x, r = _inputs(tokens, hidden, dtype, True)
        return lambda: compiled_add_rms_norm(x, r, w, EPS)

    def unfused():
        x, r = _inputs(tokens, hidden, dtype, True)
        out = torch.empty_like(x)

        def call():
            h = x + r
            ops.rms_norm(out, h, w, EPS)
            return h
        return call

    def fused():
        x, r = _inputs(tokens, hidden, dtype, True)
        return lambda: ops.fused_add_rms_norm(x, r, w, EPS)

    for name, make in [("eager_native", eager), ("compiled_native", compiled),
                       ("ops_unfused", unfused), ("ops_fused", fused)]:
        report.add(harness.measure(case, name, make, nbytes))


def bench_norm(report, tokens, hidden, dtype, w):
    size = torch.finfo(dtype).bits // 8
    nbytes = 2 * tokens * hidden * size + hidden * size
    case = {"op": "rms_norm", "dtype": str(dtype).split(".")[-1], "tokens": tokens,
            "hidden": hidden}

    def eager():
        x, _ = _inputs(tokens, hidden, dtype, False)
        return lambda: native_rms_norm(x, w, EPS)

    def compiled():
        x, _ = _inputs(tokens, hidden, dtype, False)
        return lambda: compiled_rms_norm(x, w, EPS)

    def ours():
        x, _ = _inputs(tokens, hidden, dtype, False)
        out = torch.empty_like(x)
        return lambda: ops.rms_norm(out, x, w, EPS)

    for name, make in [("eager_native", eager), ("compiled_native", compiled), ("ops", ours)]:
        report.add(harness.measure(case, name, make, nbytes))


def check_numerics(tokens, hidden, dtype):
    """Each variant computes the same function: a bench of wrong kernels is worthless."""
    from compile_ops.testing import assert_close

    x, r = _inputs(tokens, hidden, dtype, True)
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    exp_out, exp_res = native_add_rms_norm(x, r, w, EPS)
    c_out, c_res = compiled_add_rms_norm(x, r, w, EPS)
    xf, rf = x.clone(), r.clone()
    ops.fused_add_rms_norm(xf, rf, w, EPS)
    for got in ((c_out, c_res), (xf, rf)):
        assert_close(got[0], exp_out)
        assert_close(got[1], exp_res)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 7, 128, 512, 4096, 4099, 16384])
    p.add_argument("--hidden", type=int, nargs="+", default=[768, 769, 4096, 5120, 8192])
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPE_NAMES))
    p.add_argument("--subset-dtypes", nargs="*", default=["fp16", "fp32"], choices=list(DTYPE_NAMES),
                   help="dtypes run on the subset grid --subset-tokens x --subset-hidden")
    p.add_argument("--subset-tokens", type=int, nargs="+", default=[128, 4096])
    p.add_argument("--subset-hidden", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--skip-rms-norm", action="store_true", help="only the add + rms_norm table")
    p.add_argument("--quick", action="store_true", help="tokens 1, 4096; hidden 4096, 8192; bf16")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--stem", default=None, help="file name stem (default: norm_<device>)")
    p.add_argument("--quant", action="store_true",
                   help="instead: the RMSNorm + FP8 quant cases of bench_quant.py (fused op, "
                        "unfused ops, eager and Inductor on the native formulation) over "
                        "--tokens x --hidden, first of --dtypes")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.hidden, args.subset_dtypes = [1, 4096], [4096, 8192], []

    if not torch.cuda.is_available() or not compile_ops.kernels_available():
        sys.exit(f"needs a GPU and the built kernels ({compile_ops.kernels_unavailable_reason()})")
    harness.setup_compile()
    torch.manual_seed(0)
    copy_bw = harness.copy_bandwidth()
    print(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
    if args.quant:
        import bench_quant
        dtype = DTYPE_NAMES[args.dtypes[0]]
        bench_quant.check("cuda", dtype)
        dev = torch.cuda.get_device_name(0).replace("NVIDIA ", "").split()[0]
        bench_quant.run_grid(bench_quant.NORM_CASES, args.tokens, args.hidden, dtype, copy_bw,
                             args.out, args.stem or f"norm_quant_{dev}",
                             title="RMSNorm + FP8 quantization")
        return

    grid = [(d, t, h) for d in args.dtypes for t in args.tokens for h in args.hidden]
    grid += [(d, t, h) for d in args.subset_dtypes if d not in args.dtypes
             for t in args.subset_tokens for h in args.subset_hidden]
    check_numerics(7, 769, torch.bfloat16)
    check_numerics(128, 4096, torch.bfloat16)

    fused_rep = harness.Report("add + rms_norm", copy_bw, "compiled_native",
                               ["dtype", "tokens", "hidden"])
    norm_rep = harness.Report("rms_norm", copy_bw, "compiled_native", ["dtype", "tokens", "hidden"])
    for dname, tokens, hidden in grid:
        dtype = DTYPE_NAMES[dname]
        w = torch.randn(hidden, device="cuda", dtype=dtype)
        bench_add_norm(fused_rep, tokens, hidden, dtype, w)
        if not args.skip_rms_norm:
            bench_norm(norm_rep, tokens, hidden, dtype, w)

    dev = torch.cuda.get_device_name(0).replace("NVIDIA ", "").split()[0]
    stem = args.stem or f"norm_{dev}"
    paths = fused_rep.write(args.out, f"{stem}_fused", plot_x="tokens",
                            plot_group=["dtype", "hidden"])
    if not args.skip_rms_norm:
        paths += norm_rep.write(args.out, f"{stem}_rms", plot_x="tokens",
                                plot_group=["dtype", "hidden"])
    print("wrote", *paths)
    summarize(fused_rep, copy_bw)


def summarize(rep, copy_bw):
    """The acceptance lines: fused vs copy bandwidth at large sizes, and vs compiled native."""
    rows = rep._rows()
    worst = None
    for key, v in rows.items():
        if "ops_fused" in v and "compiled_native" in v:
            ratio = v["compiled_native"].seconds / v["ops_fused"].seconds
            if worst is None or ratio < worst[0]:
                worst = (ratio, key)
    if worst:
        print(f"slowest fused vs compiled_native: x{worst[0]:.2f} at {worst[1]}")
    for key, v in rows.items():
        dtype, tokens, hidden = key
        if dtype == "bfloat16" and tokens >= 4096 and hidden in (4096, 8192) and "ops_fused" in v:
            r = v["ops_fused"]
            print(f"fused bf16 {tokens}x{hidden}: {100 * r.bytes / r.seconds / copy_bw:.1f}% of copy "
                  "bandwidth")


if __name__ == "__main__":
    main()
