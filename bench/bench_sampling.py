"""Benchmark greedy sampling (argmax over the vocabulary) against eager PyTorch and Inductor.

One table, one process (the copy bandwidth is measured alongside): for rows x vocabulary,
eager ``torch.argmax(x, -1)``, ``torch.compile`` of it (Inductor: one CTA reduces each row) and
``compile_ops.argmax`` (rows split over CTAs). Bytes: the logits read plus the int64 indices
written. Small sizes are timed as CUDA-graph replays (the harness's rule), so launch overhead
counts as it does inside a compiled decode step.

    python bench/bench_sampling.py               # rows 1..512, vocab 4096..128256, bf16
    python bench/bench_sampling.py --cpu-check   # no GPU: every variant, results equal
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import compile_ops  # noqa: E402, F401

ops = torch.ops.compile_ops


def native(x):
    return torch.argmax(x, dim=-1)


COMPILED = torch.compile(native, dynamic=False)


def check(device, dtype):
    """Every variant gives the same indices (logits of small integers: many ties)."""
    for rows, n in [(3, 5000), (1, 130), (4, 1)]:
        x = torch.randint(-5, 6, (rows, n), device=device).to(dtype)
        want = native(x)
        for name, got in (("compiled_native", COMPILED(x)), ("compile_ops", ops.argmax(x))):
            if not torch.equal(got, want):
                raise AssertionError(f"{name} argmax differs at rows {rows}, n {n}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    p.add_argument("--vocab", type=int, nargs="+", default=[4096, 32000, 128256])
    harness.add_common_args(p)
    args = p.parse_args()
    dtype, copy_bw = harness.start(args)
    if args.cpu_check:
        check("cpu", torch.float32)
        print("cpu check ok: argmax variants match")
        return
    check("cuda", dtype)
    rep = harness.Report(f"argmax over the vocabulary ({args.dtype})", copy_bw, "compiled_native",
                         ["vocab", "rows"])
    size = torch.finfo(dtype).bits // 8
    for n in args.vocab:
        for rows in args.rows:
            nbytes = rows * n * size + rows * 8
            case = {"vocab": n, "rows": rows}

            def logits(rows=rows, n=n):
                return torch.randn(rows, n, device="cuda", dtype=dtype)

            variants = [("eager_native", lambda: (lambda x=logits(): native(x))),
                        ("compiled_native", lambda: (lambda x=logits(): COMPILED(x))),
                        ("compile_ops", lambda: (lambda x=logits(): ops.argmax(x)))]
            for vname, make in variants:
                rep.add(harness.measure(case, vname, make, nbytes))
    print("wrote", *rep.write(args.out, harness.device_stem("sampling"), plot_x="rows",
                              plot_group=["vocab"]))


if __name__ == "__main__":
    main()
