"""Decode attention over a static KV cache (issue 16): ``static_cache_attention`` against what a
Hugging Face Llama runs for it, side by side (bf16, 32 query / 8 KV heads of 128, one query token
per sequence, ``context`` tokens in a ``[batch, 8, max_cache_len, 128]`` cache; CUDA-graph timing):

- ``hf_eager``: ``repeat_kv`` (expand + reshape: a copy of the whole cache) then SDPA with the
  float mask ``where(arange(L) <= pos, 0, -inf)`` over all ``max_cache_len`` slots (HF's
  ``sdpa_attention_forward``);
- ``hf_inductor``: the same function under ``torch.compile`` (backend inductor);
- ``sdpa_gqa_dense``: SDPA with ``enable_gqa=True`` over only the first ``context`` slots (a
  contiguous copy made outside the timing): the strongest dense peer, which needs the length on
  the host;
- ``compile_ops``: ``static_cache_attention`` (lengths on the device);
- ``hf_inductor_mask``: HF's formulation under Inductor with the mask a boolean input
  ``[batch, 1, 1, max_cache_len]`` (what transformers' generate() hands its compiled forward);
- ``compile_ops_mask``: what the pass makes of that: ``mask_bounds`` (the live range, from the
  mask) + ``static_cache_attention`` reading the mask per tile, the two under ``torch.compile``
  (in a model the bounds are computed once per step for all layers: this charges them to one);
- ``compile_ops_mask_op``: the op alone with the mask and precomputed bounds (its per-layer cost).

Bytes: query + output + the K and V of the ``context`` tokens (what a decode step must read).
A CPU check (``--cpu-check``) compares the op with the HF formulation.

    python bench/bench_static_cache.py
    python bench/bench_static_cache.py --batch 1 32 --cache-len 4096
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import compile_ops  # noqa: E402, F401

HEADS, KV_HEADS, HEAD = 32, 8, 128
VARIANTS = ("hf_eager", "hf_inductor", "sdpa_gqa_dense", "compile_ops", "hf_inductor_mask",
            "compile_ops_mask", "compile_ops_mask_op")
# Diagnostics (not in the default list): the op with only the starts of the bounds, or only
# the mask and the lengths, to tell which of the two costs the masked op its time.
DIAGNOSTICS = ("compile_ops_starts_only", "compile_ops_mask_no_starts")


def hf_attention_mask(q, kc, vc, mask):
    """HF's decode attention with the mask generate() builds: a boolean graph input."""
    b, hkv, length, d = kc.shape
    g = q.shape[1] // hkv
    k = kc[:, :, None].expand(b, hkv, g, length, d).reshape(b, hkv * g, length, d)
    v = vc[:, :, None].expand(b, hkv, g, length, d).reshape(b, hkv * g, length, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d ** -0.5)


def ours_mask(q, kc, vc, mask, bounds=None):
    from compile_ops.static_cache import masked_decode_attention

    b, h, _, d = q.shape
    return masked_decode_attention(q.view(b, h, d), kc, vc, mask, d ** -0.5,
                                   bounds=bounds).view(b, h, 1, d)


def hf_attention(q, kc, vc, pos):
    """HF Llama's decode attention over a static cache: repeat_kv, mask, SDPA."""
    b, hkv, length, d = kc.shape
    g = q.shape[1] // hkv
    k = kc[:, :, None].expand(b, hkv, g, length, d).reshape(b, hkv * g, length, d)
    v = vc[:, :, None].expand(b, hkv, g, length, d).reshape(b, hkv * g, length, d)
    kv_idx = torch.arange(length, device=q.device)
    mask = torch.where(kv_idx[None, None, None, :] <= pos[None, None, :, None], 0.0,
                       float("-inf")).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d ** -0.5)


def ours(q, kc, vc, pos):
    b, h, _, d = q.shape
    out = torch.empty(b, h, d, dtype=q.dtype, device=q.device)
    lens = (pos + 1).expand(b).contiguous()
    torch.ops.compile_ops.static_cache_attention(out, q.view(b, h, d), kc, vc, lens, d ** -0.5)
    return out.view(b, h, 1, d)


def make_case(batch, cache_len, context, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, HEADS, 1, HEAD, generator=g, device=device, dtype=dtype)
    kc = torch.randn(batch, KV_HEADS, cache_len, HEAD, generator=g, device=device, dtype=dtype)
    vc = torch.randn(batch, KV_HEADS, cache_len, HEAD, generator=g, device=device, dtype=dtype)
    kc[:, :, context:] = 0  # slots not yet written
    vc[:, :, context:] = 0
    pos = torch.tensor([context - 1], device=device)
    return q, kc, vc, pos


def cpu_check():
    for batch, cache_len, context in ((2, 64, 17), (1, 40, 40), (3, 32, 1)):
        q, kc, vc, pos = make_case(batch, cache_len, context, torch.float32, "cpu")
        want = hf_attention(q, kc, vc, pos)
        got = ours(q, kc, vc, pos)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        comp = torch.compile(hf_attention, backend="compile_ops", fullgraph=True)
        torch.testing.assert_close(comp(q, kc, vc, pos), want, atol=2e-5, rtol=2e-5)
        mask = (torch.arange(cache_len) < context)[None, None, None].expand(batch, 1, 1, cache_len)
        torch.testing.assert_close(hf_attention_mask(q, kc, vc, mask), want, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(ours_mask(q, kc, vc, mask), want, atol=2e-5, rtol=2e-5)
    print("cpu check ok: static_cache_attention matches HF's repeat_kv + masked SDPA")


def tune(rep, case, nbytes, dtype, want):
    """static_decode under forced plans (split: the default's x 1/2, x 1, x 2)."""
    from compile_ops import decode_attention as da

    batch, cache_len, context = case["batch"], case["max_cache_len"], case["context"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    base = da.static_plan(batch, HEADS, KV_HEADS, HEAD, cache_len, 2, sms)
    quick = rep.tune_quick
    for bn in ((64,) if quick else (32, 64)):
        for w in ((4,) if quick else (2, 4)):
            for st in ((3,) if quick else (2, 3)):
                for f in ((0.5, 1, 2, 4, 8, 0) if quick else (0.5, 1, 2)):
                    # f = 0: one split over the whole cache (no merge kernel)
                    split = max(bn, int(base.split * f)) if f else \
                        max(bn, da.triton_next_pow2(cache_len))
                    if f and split > max(cache_len, bn) * 2:
                        continue
                    p = da.static_plan(batch, HEADS, KV_HEADS, HEAD, cache_len, 2, sms,
                                       block_n=bn, num_warps=w, num_stages=st, split=split)

                    def make(p=p):
                        q, kc, vc, pos = make_case(batch, cache_len, context, dtype, "cuda")
                        lens = (pos + 1).expand(batch).contiguous()
                        out = torch.empty(batch, HEADS, HEAD, dtype=dtype, device="cuda")

                        def call():
                            da.static_decode(out, q.view(batch, HEADS, HEAD), kc, vc, lens,
                                             HEAD ** -0.5, p)
                            return out
                        return call
                    try:
                        got = make()().float().view_as(want)
                        err = (got - want).abs().max().item()
                        if err > 2e-2:
                            print(f"{case} bn{bn}/w{w}/st{st}/split{split}: error {err}")
                            continue
                        rep.add(harness.measure(case, f"bn{bn}/w{w}/st{st}/split{split}", make,
                                                nbytes, use_graph=True))
                    except Exception as exc:  # noqa: BLE001  (a plan Triton cannot build)
                        print(f"{case} bn{bn}/w{w}/st{st}/split{split}: {type(exc).__name__}: "
                              f"{str(exc)[:200]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--cache-len", type=int, nargs="+", default=[512, 4096, 16384])
    p.add_argument("--context", type=int, default=None, help="default max_cache_len / 2")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS),
                   choices=VARIANTS + DIAGNOSTICS)
    p.add_argument("--tune", action="store_true",
                   help="also time static_cache_attention under other plans: tile (block_n) x "
                        "warps x stages x split scale, as variants named bn/w/st/split")
    p.add_argument("--tune-quick", action="store_true",
                   help="with --tune: 64-token tiles, 4 warps, 3 stages only; splits x 0.5 .. 8 "
                        "of the default and one split over the whole cache")
    harness.add_common_args(p)
    args = p.parse_args()
    dtype, copy_bw = harness.start(args)
    if args.cpu_check:
        cpu_check()
        return
    rep = harness.Report("Decode attention over a static cache (32/8 heads of 128)", copy_bw,
                         "hf_inductor", ["batch", "max_cache_len", "context"])
    rep.tune_quick = args.tune_quick
    compiled = torch.compile(hf_attention, backend="inductor", fullgraph=True, dynamic=False)
    compiled_mask = torch.compile(hf_attention_mask, backend="inductor", fullgraph=True,
                                  dynamic=False)
    compiled_ours_mask = torch.compile(ours_mask, backend="inductor", fullgraph=True,
                                       dynamic=False)
    for cache_len in args.cache_len:
        for batch in args.batch:
            context = args.context or cache_len // 2
            case = {"batch": batch, "max_cache_len": cache_len, "context": context}
            es = torch.empty(0, dtype=dtype).element_size()
            nbytes = 2 * batch * HEADS * HEAD * es + 2 * batch * KV_HEADS * context * HEAD * es
            want = None
            for variant in args.variants:
                def make(variant=variant):
                    q, kc, vc, pos = make_case(batch, cache_len, context, dtype, "cuda")
                    mask = (torch.arange(cache_len, device="cuda") < context)[None, None, None]
                    mask = mask.expand(batch, 1, 1, cache_len).contiguous()
                    if variant == "hf_inductor_mask":
                        return lambda: compiled_mask(q, kc, vc, mask)
                    if variant == "compile_ops_mask":
                        return lambda: compiled_ours_mask(q, kc, vc, mask)
                    if variant == "compile_ops_mask_op":
                        from compile_ops.static_cache import mask_bounds

                        bounds = mask_bounds(mask, batch, cache_len)
                        return lambda: ours_mask(q, kc, vc, mask, bounds)
                    if variant in DIAGNOSTICS:
                        from compile_ops.static_cache import mask_bounds

                        starts, lens = mask_bounds(mask, batch, cache_len)
                        out = torch.empty(batch, HEADS, HEAD, dtype=dtype, device="cuda")
                        qv = q.view(batch, HEADS, HEAD)
                        m, st = (None, starts) if variant == DIAGNOSTICS[0] else (mask, None)
                        return lambda: torch.ops.compile_ops.static_cache_attention(
                            out, qv, kc, vc, lens, HEAD ** -0.5, m, st) or out.view_as(q)
                    if variant == "hf_eager":
                        return lambda: hf_attention(q, kc, vc, pos)
                    if variant == "hf_inductor":
                        return lambda: compiled(q, kc, vc, pos)
                    if variant == "sdpa_gqa_dense":
                        k, v = kc[:, :, :context].contiguous(), vc[:, :, :context].contiguous()
                        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True,
                                                                      scale=HEAD ** -0.5)
                    return lambda: ours(q, kc, vc, pos)
                call = make()
                got = call().float()
                if want is None:
                    want = got
                else:
                    err = (got - want).abs().max().item()
                    if err > 2e-2:
                        raise AssertionError(f"{case} {variant}: max error {err} vs "
                                             f"{args.variants[0]}")
                rep.add(harness.measure(case, variant, make, nbytes, use_graph=True))
            if args.tune:
                tune(rep, case, nbytes, dtype, want)
    paths = rep.write(args.out, harness.device_stem("static_cache"), plot_x="batch",
                      plot_group=["max_cache_len"])
    print("wrote", *paths)


if __name__ == "__main__":
    main()
