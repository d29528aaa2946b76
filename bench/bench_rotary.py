"""Benchmark rotary_embedding against eager PyTorch and torch.compile of the native formulation.

Query 32 heads and key 8 heads of 128 (Llama-3-8B), NeoX and GPT-J, cos/sin cache in float32.
Bytes: query and key read once and written once, plus positions and the cache rows used.

    python bench/bench_rotary.py                  # tokens 1..16384, bf16
    python bench/bench_rotary.py --cpu-check      # no GPU: compile every variant, check numerics
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import compile_ops  # noqa: E402
from compile_ops.testing import assert_close, rope_cos_sin_cache  # noqa: E402

ops = torch.ops.compile_ops


def native_rope(positions, q, k, head_size, cache, is_neox):
    """vLLM-style forward_native, out of place: returns the rotated (q, k)."""
    cs = cache.index_select(0, positions)
    half = cs.shape[-1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rot(x):
        v = x.view(x.shape[0], -1, head_size).float()
        if is_neox:
            x1, x2 = v[..., :half], v[..., half:]
            y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = v[..., 0::2], v[..., 1::2]
            y = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return y.to(x.dtype).view_as(x)

    return rot(q), rot(k)


compiled_rope = torch.compile(native_rope, dynamic=False)


def make_cache(max_pos, rot_dim, device):
    return rope_cos_sin_cache(max_pos, rot_dim, device=device)


def check(device, dtype, tokens=6, nq=4, nk=2, head_size=32):
    cache = make_cache(64, head_size, device)
    for is_neox in (True, False):
        pos = torch.randint(0, 64, (tokens,), device=device)
        q = torch.randn(tokens, nq * head_size, device=device, dtype=dtype)
        k = torch.randn(tokens, nk * head_size, device=device, dtype=dtype)
        eq, ek = native_rope(pos, q, k, head_size, cache, is_neox)
        cq, ck = compiled_rope(pos, q, k, head_size, cache, is_neox)
        oq, ok = q.clone(), k.clone()
        ops.rotary_embedding(pos, oq, ok, head_size, cache, is_neox)
        for a, b in ((cq, eq), (ck, ek), (oq, eq), (ok, ek)):
            assert_close(a, b)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 7, 128, 512, 4096, 16384])
    p.add_argument("--nq", type=int, default=32)
    p.add_argument("--nk", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    harness.add_common_args(p)
    args = p.parse_args()
    dtype, copy_bw = harness.start(args)
    if args.cpu_check:
        check("cpu", torch.float32)
        print("cpu check ok: rotary_embedding variants match (NeoX and GPT-J)")
        return
    check("cuda", dtype)
    hs, size = args.head_size, torch.finfo(dtype).bits // 8
    cache = make_cache(1 << 16, hs, "cuda")
    rep = harness.Report("rotary_embedding", copy_bw, "compiled_native",
                         ["style", "tokens", "heads"])
    for is_neox in (True, False):
        for tokens in args.tokens:
            nbytes = 2 * tokens * (args.nq + args.nk) * hs * size + tokens * (8 + hs * 4)
            case = {"style": "neox" if is_neox else "gptj", "tokens": tokens,
                    "heads": f"{args.nq}/{args.nk}x{hs}"}

            def inputs():
                pos = torch.randint(0, 1 << 16, (tokens,), device="cuda")
                q = torch.randn(tokens, args.nq * hs, device="cuda", dtype=dtype)
                k = torch.randn(tokens, args.nk * hs, device="cuda", dtype=dtype)
                return pos, q, k

            def eager(is_neox=is_neox):
                pos, q, k = inputs()
                return lambda: native_rope(pos, q, k, hs, cache, is_neox)

            def compiled(is_neox=is_neox):
                pos, q, k = inputs()
                return lambda: compiled_rope(pos, q, k, hs, cache, is_neox)

            def ours(is_neox=is_neox):
                pos, q, k = inputs()
                return lambda: ops.rotary_embedding(pos, q, k, hs, cache, is_neox)

            for name, make in [("eager_native", eager), ("compiled_native", compiled),
                               ("compile_ops", ours)]:
                rep.add(harness.measure(case, name, make, nbytes))
    print("wrote", *rep.write(args.out, harness.device_stem("rotary"), plot_x="tokens", plot_group=["style"]))


if __name__ == "__main__":
    main()
