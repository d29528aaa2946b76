"""Benchmark the FP8 activation-quantization ops (issue 26) against eager PyTorch and Inductor on
the native PyTorch formulation people write, in one process (copy bandwidth measured alongside).

Cases (bf16 by default), each with `eager_native`, `compiled_native` (torch.compile of the native
formulation: Inductor fuses it into its own kernels), `ops` (our fused op) and, for the fused
norm/activation + quant ops, `ops_unfused` (our unfused op, then our quant op):

    static_fp8            (x * (1/s)).clamp(-448, 448).to(fp8)   static_scaled_fp8_quant
    per_token_fp8         amax(-1) / 448 (>= 1/(448*512)), x / s  dynamic_per_token_scaled_fp8_quant
    group128_fp8          per 128 columns: max(amax, 1e-10) / 448  per_token_group_fp8_quant
    rms_norm+static       rms_norm, then static quant             rms_norm_static_fp8_quant
    add_rms_norm+static   add, rms_norm, static quant             fused_add_rms_norm_static_fp8_quant
    rms_norm+per_token    rms_norm, then per-token quant          rms_norm_dynamic_per_token_quant
    rms_norm+group128     rms_norm, then 128-group quant          rms_norm_per_block_quant
    silu_mul+static       silu(gate) * up, then static quant      silu_and_mul_quant
    silu_mul+group128     fp32 silu(gate) * up, 128-group quant   silu_and_mul_per_block_quant

Bytes: every input read once (weight once), every output written once (FP8: 1 byte per element,
scales 4 bytes each).

    python bench/bench_quant.py                      # tokens 1..16384 x hidden 4096, 8192
    python bench/bench_quant.py --cases static_fp8 rms_norm+static --tokens 1 4096
    python bench/bench_quant.py --cpu-check          # no GPU: every variant on the CPU, numerics
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import compile_ops  # noqa: E402,F401
from compile_ops.testing import assert_close  # noqa: E402

ops = torch.ops.compile_ops
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1.0 / (448.0 * 512.0)
EPS = 1e-6
GROUP = 128


# ---------------------------------------------------------------------------------------------
# Native formulations (what a PyTorch user writes; Inductor compiles these)
# ---------------------------------------------------------------------------------------------
def native_static(x, scale):
    return (x.float() * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def native_per_token(x):
    xf = x.float()
    s = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def native_group(x, group=GROUP, eps=1e-10):
    t, h = x.shape
    xg = x.float().reshape(t, h // group, group)
    s = xg.abs().amax(-1, keepdim=True).clamp(min=eps) / FP8_MAX
    q = (xg / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(t, h), s.reshape(t, h // group)


def native_rms_norm(x, w, eps=EPS):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def native_add_rms_norm(x, r, w, eps=EPS):
    z = (x + r)  # vLLM's static fused op rounds the sum before the statistics
    return native_rms_norm(z, w, eps), z


def native_silu_mul(x):
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def native_silu_mul_f32(x):
    d = x.shape[-1] // 2
    g, u = x[..., :d].float(), x[..., d:].float()
    return F.silu(g) * u


NATIVE = {
    "static_fp8": lambda x, w, r, s: native_static(x, s),
    "per_token_fp8": lambda x, w, r, s: native_per_token(x),
    "group128_fp8": lambda x, w, r, s: native_group(x),
    "rms_norm+static": lambda x, w, r, s: native_static(native_rms_norm(x, w), s),
    "add_rms_norm+static": lambda x, w, r, s: (lambda n, z: (native_static(n, s), z))(
        *native_add_rms_norm(x, r, w)),
    "rms_norm+per_token": lambda x, w, r, s: native_per_token(native_rms_norm(x, w)),
    "rms_norm+group128": lambda x, w, r, s: native_group(native_rms_norm(x, w)),
    "silu_mul+static": lambda x, w, r, s: native_static(native_silu_mul(x), s),
    "silu_mul+group128": lambda x, w, r, s: native_group(native_silu_mul_f32(x)),
}
COMPILED = {k: torch.compile(v, dynamic=False) for k, v in NATIVE.items()}
GATED = ("silu_mul+static", "silu_mul+group128")
NORM_CASES = ("rms_norm+static", "add_rms_norm+static", "rms_norm+per_token",
              "rms_norm+group128")  # bench_norm.py --quant
ACT_CASES = GATED  # bench_activation.py --quant


# ---------------------------------------------------------------------------------------------
# Ours: returns a callable over preallocated buffers (outputs first in the result)
# ---------------------------------------------------------------------------------------------
def _bufs(t, h, device):
    return (torch.empty(t, h, device=device, dtype=FP8),
            torch.empty(t, 1, device=device, dtype=torch.float32),
            torch.empty(t, h // GROUP, device=device, dtype=torch.float32))


def ours(case, x, w, r, s):
    t = x.shape[0]
    h = x.shape[1] // 2 if case in GATED else x.shape[1]
    q, tok_s, grp_s = _bufs(t, h, x.device)
    if case == "static_fp8":
        return lambda: (ops.static_scaled_fp8_quant(q, x, s, None), q)[1]
    if case == "per_token_fp8":
        return lambda: (ops.dynamic_per_token_scaled_fp8_quant(q, x, tok_s, None), (q, tok_s))[1]
    if case == "group128_fp8":
        return lambda: (ops.per_token_group_fp8_quant(x, q, grp_s, GROUP, 1e-10, -FP8_MAX, FP8_MAX,
                                                      False), (q, grp_s))[1]
    if case == "rms_norm+static":
        return lambda: (ops.rms_norm_static_fp8_quant(q, x, w, s, EPS), q)[1]
    if case == "add_rms_norm+static":
        return lambda: (ops.fused_add_rms_norm_static_fp8_quant(q, x, r, w, s, EPS), (q, r))[1]
    if case == "rms_norm+per_token":
        return lambda: (ops.rms_norm_dynamic_per_token_quant(q, x, w, tok_s, EPS, None, None),
                        (q, tok_s))[1]
    if case == "rms_norm+group128":
        return lambda: (ops.rms_norm_per_block_quant(q, x, w, grp_s, EPS, None, None, GROUP, False),
                        (q, grp_s))[1]
    if case == "silu_mul+static":
        return lambda: (ops.silu_and_mul_quant(q, x, s), q)[1]
    if case == "silu_mul+group128":
        return lambda: (ops.silu_and_mul_per_block_quant(q, x, grp_s, GROUP, None, False),
                        (q, grp_s))[1]
    raise KeyError(case)


def ours_unfused(case, x, w, r, s):
    """Our unfused ops: the norm / activation into a buffer of the model dtype, then our quant."""
    t, h = x.shape[0], (x.shape[1] // 2 if case in GATED else x.shape[1])
    q, tok_s, grp_s = _bufs(t, h, x.device)
    mid = torch.empty(t, h, device=x.device, dtype=x.dtype)
    if case == "rms_norm+static":
        return lambda: (ops.rms_norm(mid, x, w, EPS), ops.static_scaled_fp8_quant(q, mid, s, None),
                        q)[2]
    if case == "add_rms_norm+static":
        def call():
            torch.add(x, r, out=r)  # vLLM's rounded sum, then our rms_norm and quant
            ops.rms_norm(mid, r, w, EPS)
            ops.static_scaled_fp8_quant(q, mid, s, None)
            return q, r
        return call
    if case == "rms_norm+per_token":
        return lambda: (ops.rms_norm(mid, x, w, EPS),
                        ops.dynamic_per_token_scaled_fp8_quant(q, mid, tok_s, None), (q, tok_s))[2]
    if case == "rms_norm+group128":
        return lambda: (ops.rms_norm(mid, x, w, EPS),
                        ops.per_token_group_fp8_quant(mid, q, grp_s, GROUP, 1e-10, -FP8_MAX,
                                                      FP8_MAX, False), (q, grp_s))[2]
    if case == "silu_mul+static":
        return lambda: (ops.silu_and_mul(mid, x), ops.static_scaled_fp8_quant(q, mid, s, None),
                        q)[2]
    return None  # silu_mul+group128: vLLM's op keeps fp32 products; no unfused twin of ours


def nbytes(case, t, h, size):
    io = {"static_fp8": t * h * (size + 1),
          "per_token_fp8": t * h * (size + 1) + 4 * t,
          "group128_fp8": t * h * (size + 1) + 4 * t * h // GROUP,
          "rms_norm+static": t * h * (size + 1) + h * size,
          "add_rms_norm+static": t * h * (3 * size + 1) + h * size,
          "rms_norm+per_token": t * h * (size + 1) + h * size + 4 * t,
          "rms_norm+group128": t * h * (size + 1) + h * size + 4 * t * h // GROUP,
          "silu_mul+static": t * h * (2 * size + 1),
          "silu_mul+group128": t * h * (2 * size + 1) + 4 * t * h // GROUP}
    return io[case]


def make_inputs(case, t, h, dtype, device):
    x = torch.randn(t, 2 * h if case in GATED else h, device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(h, device=device)).to(dtype)
    r = torch.randn(t, h, device=device, dtype=dtype)
    s = torch.tensor([0.02], device=device)
    return x, w, r, s


def _first(v):
    return v[0] if isinstance(v, tuple) else v


def check(device, dtype, t=7, h=512):
    """Every variant computes the same function (FP8 values within one code: Inductor and the
    native formulation multiply or divide where vLLM's kernels do the other)."""
    for case in NATIVE:
        x, w, r, s = make_inputs(case, t, h, dtype, device)
        expected = _first(NATIVE[case](x, w, r.clone(), s)).float()
        got = {"compiled_native": _first(COMPILED[case](x, w, r.clone(), s)),
               "ops": _first(ours(case, x, w, r.clone(), s)())}
        unf = ours_unfused(case, x, w, r.clone(), s)
        if unf is not None:
            got["ops_unfused"] = _first(unf())
        for name, q in got.items():
            assert_close(q.float(), expected, dtype=FP8, msg=f"{case} {name}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(NATIVE), choices=list(NATIVE))
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 7, 32, 128, 512, 4096, 16384])
    p.add_argument("--hidden", type=int, nargs="+", default=[4096, 8192])
    harness.add_common_args(p)
    args = p.parse_args()
    dtype, copy_bw = harness.start(args)
    if args.cpu_check:
        check("cpu", torch.bfloat16)
        check("cpu", torch.float32)
        print(f"cpu check ok: {len(NATIVE)} quant cases, all variants match")
        return
    check("cuda", dtype)
    run_grid(args.cases, args.tokens, args.hidden, dtype, copy_bw, args.out,
             harness.device_stem("quant"))


def run_grid(cases, tokens, hidden, dtype, copy_bw, out, stem, title="FP8 activation quantization"):
    """Time every case x hidden x tokens point (eager_native, compiled_native, ops, ops_unfused)
    and write the report (also called by bench_norm.py --quant and bench_activation.py --quant)."""
    rep = harness.Report(title, copy_bw, "compiled_native", ["case", "tokens", "hidden"])
    size = torch.finfo(dtype).bits // 8
    for case in cases:
        for h in hidden:
            for t in tokens:
                key = {"case": case, "tokens": t, "hidden": h}
                n = nbytes(case, t, h, size)
                variants = [
                    ("eager_native", lambda c=case: (lambda a: lambda: NATIVE[c](*a))(
                        make_inputs(c, t, h, dtype, "cuda"))),
                    ("compiled_native", lambda c=case: (lambda a: lambda: COMPILED[c](*a))(
                        make_inputs(c, t, h, dtype, "cuda"))),
                    ("ops", lambda c=case: ours(c, *make_inputs(c, t, h, dtype, "cuda"))),
                ]
                if ours_unfused(case, *make_inputs(case, 1, h, dtype, "cuda")) is not None:
                    variants.append(("ops_unfused", lambda c=case: ours_unfused(
                        c, *make_inputs(c, t, h, dtype, "cuda"))))
                for name, make in variants:
                    rep.add(harness.measure(key, name, make, n))
    paths = rep.write(out, stem, plot_x="tokens", plot_group=["case", "hidden"])
    print("wrote", *paths)
    return rep


if __name__ == "__main__":
    main()
