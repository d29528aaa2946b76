"""Benchmark the gated activations against eager PyTorch and torch.compile of the native form.

One table, one process (the copy bandwidth is measured alongside): for each op, eager native,
torch.compile(native) and our op, over tokens x d. Bytes: read 2*d, write d per token.

    python bench/bench_activation.py               # tokens 1..16384, d 4096 and 14336, bf16
    python bench/bench_activation.py --cpu-check   # no GPU: compile every variant, check numerics
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import compile_ops  # noqa: E402
from compile_ops.testing import assert_close  # noqa: E402

ops = torch.ops.compile_ops


def _halves(x):
    d = x.shape[-1] // 2
    return x[..., :d], x[..., d:]


def native_silu_and_mul(x):
    a, b = _halves(x)
    return F.silu(a) * b


def native_mul_and_silu(x):
    a, b = _halves(x)
    return a * F.silu(b)


def native_gelu_and_mul(x):
    a, b = _halves(x)
    return F.gelu(a) * b


def native_gelu_tanh_and_mul(x):
    a, b = _halves(x)
    return F.gelu(a, approximate="tanh") * b


def native_fatrelu_and_mul(x):
    a, b = _halves(x)
    return F.threshold(a, 0.0, 0.0) * b


def native_swigluoai_and_mul(x, alpha=1.702, limit=7.0):
    gate, up = x[..., ::2].float(), x[..., 1::2].float()
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return ((up + 1) * gate * torch.sigmoid(gate * alpha)).to(x.dtype)


NATIVE = {
    "silu_and_mul": native_silu_and_mul,
    "mul_and_silu": native_mul_and_silu,
    "gelu_and_mul": native_gelu_and_mul,
    "gelu_tanh_and_mul": native_gelu_tanh_and_mul,
    "fatrelu_and_mul": native_fatrelu_and_mul,
    "swigluoai_and_mul": native_swigluoai_and_mul,
}
COMPILED = {name: torch.compile(fn, dynamic=False) for name, fn in NATIVE.items()}


def ours(name, x, out):
    getattr(ops, name)(out, x)
    return out


def check(device, dtype, tokens=5, d=64):
    """Every variant computes the same function."""
    for name in NATIVE:
        x = torch.randn(tokens, 2 * d, device=device, dtype=dtype) * 3
        out = torch.empty(tokens, d, device=device, dtype=dtype)
        expected = NATIVE[name](x)
        assert_close(COMPILED[name](x), expected, msg=f"compiled {name}")
        assert_close(ours(name, x, out), expected, msg=f"compile_ops {name}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ops", nargs="+", default=list(NATIVE), choices=list(NATIVE))
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 7, 128, 512, 4096, 16384])
    p.add_argument("--d", type=int, nargs="+", default=[4096, 14336])
    p.add_argument("--quant", action="store_true",
                   help="instead: the SiLU-and-mul + FP8 quant cases of bench_quant.py (static "
                        "and 128-group) over --tokens x --d")
    harness.add_common_args(p)
    args = p.parse_args()
    dtype, copy_bw = harness.start(args)
    if args.quant and not args.cpu_check:
        import bench_quant
        bench_quant.check("cuda", dtype)
        bench_quant.run_grid(bench_quant.ACT_CASES, args.tokens, args.d, dtype, copy_bw, args.out,
                             harness.device_stem("activation_quant"),
                             title="SiLU-and-mul + FP8 quantization")
        return
    if args.cpu_check:
        check("cpu", torch.float32)
        print(f"cpu check ok: {len(NATIVE)} activations, all variants match")
        return
    check("cuda", dtype)
    rep = harness.Report("gated activations", copy_bw, "compiled_native", ["op", "tokens", "d"])
    size = torch.finfo(dtype).bits // 8
    for name in args.ops:
        for d in args.d:
            for tokens in args.tokens:
                nbytes = 3 * tokens * d * size
                case = {"op": name, "tokens": tokens, "d": d}

                def inputs():
                    x = torch.randn(tokens, 2 * d, device="cuda", dtype=dtype)
                    return x, torch.empty(tokens, d, device="cuda", dtype=dtype)

                def eager(name=name):
                    x, _ = inputs()
                    return lambda: NATIVE[name](x)

                def compiled(name=name):
                    x, _ = inputs()
                    return lambda: COMPILED[name](x)

                def op(name=name):
                    x, out = inputs()
                    return lambda: ours(name, x, out)

                for vname, make in [("eager_native", eager), ("compiled_native", compiled),
                                    ("compile_ops", op)]:
                    rep.add(harness.measure(case, vname, make, nbytes))
    print("wrote", *rep.write(args.out, harness.device_stem("activation"), plot_x="tokens",
                              plot_group=["op", "d"]))


if __name__ == "__main__":
    main()
