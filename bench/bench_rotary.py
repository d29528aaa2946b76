"""Benchmark rotary_embedding against eager PyTorch and torch.compile of the native formulation.

Query 32 heads and key 8 heads of 128 (Llama-3-8B), NeoX and GPT-J, cos/sin cache in float32.
Bytes: query and key read once and written once, plus positions and the cache rows used.
Two layouts (``heads`` column): packed heads ``[tokens, heads * 128]`` (``32/8x128``) and strided
heads, the ``[tokens, heads, 128]`` views of padded ``[tokens, heads, 128 + pad]`` buffers
(``32/8x128 pad 8``: head stride 136, still 16-byte aligned; the padding is neither read nor
written nor counted).

    python bench/bench_rotary.py                  # tokens 1..16384, bf16, pad 0 and 8
    python bench/bench_rotary.py --head-pads 0    # packed heads only
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
        v = x.reshape(x.shape[0], -1, head_size).float()
        if is_neox:
            x1, x2 = v[..., :half], v[..., half:]
            y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = v[..., 0::2], v[..., 1::2]
            y = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return y.to(x.dtype).reshape(x.shape)

    return rot(q), rot(k)


compiled_rope = torch.compile(native_rope, dynamic=False)


def make_cache(max_pos, rot_dim, device):
    return rope_cos_sin_cache(max_pos, rot_dim, device=device)


def qk(tokens, nq, nk, head_size, pad, device, dtype):
    """query, key: packed [tokens, heads * head_size] (pad 0), or the [tokens, heads, head_size]
    views of padded [tokens, heads, head_size + pad] buffers (heads at stride head_size + pad)."""
    if pad == 0:
        return tuple(torch.randn(tokens, n * head_size, device=device, dtype=dtype)
                     for n in (nq, nk))
    return tuple(torch.randn(tokens, n, head_size + pad, device=device,
                             dtype=dtype)[..., :head_size] for n in (nq, nk))


def check(device, dtype, tokens=6, nq=4, nk=2, head_size=32):
    cache = make_cache(64, head_size, device)
    for is_neox in (True, False):
        for pad in (0, 8):
            pos = torch.randint(0, 64, (tokens,), device=device)
            q, k = qk(tokens, nq, nk, head_size, pad, device, dtype)
            eq, ek = native_rope(pos, q, k, head_size, cache, is_neox)
            cq, ck = compiled_rope(pos, q, k, head_size, cache, is_neox)
            oq, ok = q.clone(), k.clone()
            ops.rotary_embedding(pos, q, k, head_size, cache, is_neox)  # in place, strided
            ops.rotary_embedding(pos, oq, ok, head_size, cache, is_neox)
            for a, b in ((cq, eq), (ck, ek), (oq, eq), (ok, ek), (q, eq), (k, ek)):
                assert_close(a, b)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 7, 128, 512, 4096, 16384])
    p.add_argument("--nq", type=int, default=32)
    p.add_argument("--nk", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--head-pads", type=int, nargs="+", default=[0, 8],
                   help="0: packed heads; > 0: heads at stride head_size + pad (padded buffers)")
    harness.add_common_args(p)
    args = p.parse_args()
    dtype, copy_bw = harness.start(args)
    if args.cpu_check:
        check("cpu", torch.float32)
        print("cpu check ok: rotary_embedding variants match (NeoX and GPT-J, packed and strided "
              "heads)")
        return
    check("cuda", dtype)
    hs, size = args.head_size, torch.finfo(dtype).bits // 8
    cache = make_cache(1 << 16, hs, "cuda")
    rep = harness.Report("rotary_embedding", copy_bw, "compiled_native",
                         ["style", "tokens", "heads"])
    for pad in args.head_pads:
        for is_neox in (True, False):
            for tokens in args.tokens:
                nbytes = 2 * tokens * (args.nq + args.nk) * hs * size + tokens * (8 + hs * 4)
                heads = f"{args.nq}/{args.nk}x{hs}" + (f" pad {pad}" if pad else "")
                case = {"style": "neox" if is_neox else "gptj", "tokens": tokens,
                        "heads": heads}

                def inputs(tokens=tokens, pad=pad):
                    pos = torch.randint(0, 1 << 16, (tokens,), device="cuda")
                    q, k = qk(tokens, args.nq, args.nk, hs, pad, "cuda", dtype)
                    return pos, q, k

                def eager(is_neox=is_neox, inputs=inputs):
                    pos, q, k = inputs()
                    return lambda: native_rope(pos, q, k, hs, cache, is_neox)

                def compiled(is_neox=is_neox, inputs=inputs):
                    pos, q, k = inputs()
                    return lambda: compiled_rope(pos, q, k, hs, cache, is_neox)

                def ours(is_neox=is_neox, inputs=inputs):
                    pos, q, k = inputs()
                    return lambda: ops.rotary_embedding(pos, q, k, hs, cache, is_neox)

                for name, make in [("eager_native", eager), ("compiled_native", compiled),
                                   ("compile_ops", ours)]:
                    rep.add(harness.measure(case, name, make, nbytes))
    print("wrote", *rep.write(args.out, harness.device_stem("rotary"), plot_x="tokens",
                                 plot_group=["style", "heads"]))


if __name__ == "__main__":
    main()
