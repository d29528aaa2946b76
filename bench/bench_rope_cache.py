"""Benchmark the fused RoPE + KV-cache write against the two ops it replaces and torch.compile.

Llama-3-8B attention: 32 query and 8 KV heads of 128, bf16 model dtype, rotary over all 128 dims
(NeoX; GPT-J at 4096 tokens too), float32 cos/sin cache of 8192 positions. query, key and value
are column slices of one fused qkv tensor [tokens, (32 + 8 + 8) * 128], as after the qkv
projection; caches in the flash layout (NHD: [num_blocks, 16, 8, 128]) or vLLM's paged one
(--layout paged: x-packed keys [num_blocks, 8, 128 / x, 16, x], values [num_blocks, 8, 128, 16],
written by reshape_and_cache / fused_rope_and_cache); tokens go to random distinct slots. One
table per layout and kv cache dtype ("auto": bf16 cache; "fp8": e4m3 codes in uint8 with float32
k_scale / v_scale), written as bench/results/rope_cache_<device>[_paged]_<kv>.{json,md,png}:

- fused:               fused_rope_and_cache_flash / fused_rope_and_cache(..., write_key=False):
                       what the fusion pass emits when only the cache reads the rotated key.
- fused_write_key:     the same with write_key=True (the rotated key also written back to qkv).
- unfused:             rotary_embedding, then the cache write of the rotated key. The
                       baseline: the `xunfused` column is each variant's speedup over the pair.
- compiled_native:     torch.compile (inductor) of vLLM's forward_native RoPE (index_select of
                       the cos/sin rows, float32 math, rotated q and k as new tensors) and the
                       native cache write (index_copy_ of rows into the flat cache view; fp8:
                       quantized first). Whatever kernels Inductor generates for that, measured
                       as they are (the cache is a mutated graph input).
- compile_ops_backend: torch.compile(backend="compile_ops") of the same model written with our
                       two ops. Checked before timing to have fused them (lowerings.counters()).
                       qkv is an input of the compiled function here, so its caller must see the
                       rotated key: the pass emits write_key=True (compare with fused_write_key).
                       Inside a model, where qkv comes from the projection, it emits False.

Bytes, the same for every variant (so the columns compare time): the fused op's minimum traffic,
query read + written, key read, value read, key and value cache entries written, positions, slots
(int64) and the float32 cos/sin rows read. The unfused pair moves more (the rotation reads and
writes the key, then the cache write reads it again), as does write_key=True (key written back).
Acceptance (the issue): fused faster than unfused at every size, and >= 85% of the measured copy
bandwidth at 4096 tokens: the summary under each table (and printed at the end) says so.

    python bench/bench_rope_cache.py                   # tokens 1..16384, kv auto and fp8, bf16
    python bench/bench_rope_cache.py --kv fp8 --quick  # tokens 1, 16, 256, 4096
    python bench/bench_rope_cache.py --cpu-check       # no GPU: every variant on the CPU, numerics
"""

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_cache import (elem, expect_same, fill_random, native_flash_write,  # noqa: E402
                         native_paged_write, paged_caches)
from bench_rotary import make_cache, native_rope  # noqa: E402

import compile_ops  # noqa: E402, F401  (registers torch.ops.compile_ops)
import lowerings  # noqa: E402
from compile_ops.testing import assert_close  # noqa: E402

ops = torch.ops.compile_ops
DECODE, PREFILL = [1, 2, 4, 8, 16, 32, 64, 128, 256], [1024, 4096, 16384]
GPTJ_TOKENS = 4096
TARGET_TOKENS, TARGET_PCT = 4096, 85.0


# ---------------------------------------------------------------------------------------------
# The variants: the same arguments (qkv = [tokens, (nq + 2 nk) d]); each returns the rotated q
# ---------------------------------------------------------------------------------------------
def split_qkv(qkv, nq, nk, d):
    return qkv.split([nq * d, nk * d, nk * d], dim=-1)


def ops_model(positions, qkv, cos_sin, kc, vc, slots, ks, vs, nq, nk, d, is_neox, kv):
    """vLLM's attention front with our two ops: RoPE in place, then the rotated key and the
    value into the cache (the paged layout when the key cache has 5 dims)."""
    q, k, v = split_qkv(qkv, nq, nk, d)
    ops.rotary_embedding(positions, q, k, d, cos_sin, is_neox)
    write = ops.reshape_and_cache if kc.dim() == 5 else ops.reshape_and_cache_flash
    write(k.view(-1, nk, d), v.view(-1, nk, d), kc, vc, slots, kv, ks, vs)
    return q


def native_model(positions, qkv, cos_sin, kc, vc, slots, ks, vs, nq, nk, d, is_neox, kv):
    """The same in plain PyTorch: forward_native RoPE (out of place), then the native write."""
    q, k, v = split_qkv(qkv, nq, nk, d)
    q, k = native_rope(positions, q, k, d, cos_sin, is_neox)
    write = native_paged_write if kc.dim() == 5 else native_flash_write
    write(k.view(-1, nk, d), v.view(-1, nk, d), kc, vc, slots, ks, vs, kv == "fp8")
    return q


def fused_model(positions, qkv, cos_sin, kc, vc, slots, ks, vs, nq, nk, d, is_neox, kv,
                write_key):
    q, k, v = split_qkv(qkv, nq, nk, d)
    op = ops.fused_rope_and_cache if kc.dim() == 5 else ops.fused_rope_and_cache_flash
    op(positions, q, k, v.view(-1, nk, d), d, cos_sin, is_neox, kc, vc, slots, kv, ks, vs,
       write_key)
    return q


compiled_native = torch.compile(native_model, backend="inductor", dynamic=False)
backend_model = torch.compile(ops_model, backend="compile_ops", dynamic=False)


def variant_fns():
    """{variant: f(positions, qkv, cos_sin, kc, vc, slots, ks, vs, nq, nk, d, is_neox, kv)}"""
    return {"fused": lambda *a: fused_model(*a, write_key=False),
            "fused_write_key": lambda *a: fused_model(*a, write_key=True),
            "unfused": ops_model,
            "compiled_native": compiled_native,
            "compile_ops_backend": backend_model}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
SLOTS = {"mode": "random", "block_size": 16}  # --slots, --block-size


def make_inputs(tokens, nq, nk, d, dtype, max_pos, num_slots, device):
    """positions, qkv [tokens, (nq + 2 nk) d] (a few values saturate fp8 at the scales used),
    distinct slots: random, or (--slots runs) whole pages of consecutive slots in shuffled page
    order (a prefill's write)."""
    positions = torch.randint(0, max_pos, (tokens,), device=device)
    qkv = torch.randn(tokens, (nq + 2 * nk) * d, dtype=dtype, device=device) * 3
    if SLOTS["mode"] == "runs":
        bs = SLOTS["block_size"]
        pages = torch.randperm(num_slots // bs, device=device)
        slots = (pages[:, None] * bs + torch.arange(bs, device=device)).flatten()[:tokens]
        return positions, qkv, slots.contiguous()
    return positions, qkv, torch.randperm(num_slots, device=device)[:tokens]


def make_caches(nb, bs, nk, d, dtype, kv, device, layout="flash"):
    cdtype = torch.uint8 if kv == "fp8" else dtype
    if layout == "paged":
        return paged_caches(nb, bs, nk, d, cdtype, device)
    return [torch.zeros(nb, bs, nk, d, dtype=cdtype, device=device) for _ in range(2)]


def scales(device):
    return torch.tensor([0.0173], device=device), torch.tensor([0.031], device=device)


def traffic(tokens, nq, nk, d, dtype, cache_dtype, rot_dim):
    """The fused op's minimum bytes (see the module docstring)."""
    return (2 * tokens * nq * d * elem(dtype)          # query read + written
            + 2 * tokens * nk * d * elem(dtype)        # key read, value read
            + 2 * tokens * nk * d * elem(cache_dtype)  # key and value cache entries written
            + tokens * (8 + 8 + rot_dim * 4))          # positions, slots, cos/sin rows


# ---------------------------------------------------------------------------------------------
# Numerics: every variant rotates the same query and writes the same cache entries
# ---------------------------------------------------------------------------------------------
def same_cache(got, want, what, exact):
    """Exact, or fp8 codes within one code and model-dtype entries within the dtype's tolerance:
    Inductor quantizes the float32 rotated key without rounding it to bf16 / fp16 first
    (emulate_precision_casts is off), and Triton's float32 math is not our kernels'."""
    if exact or got.dtype == torch.uint8:
        expect_same(got, want, what, slack=0 if exact else 1)
    else:
        assert_close(got, want, msg=what)


def fused_code_write_key(code: str):
    """write_key of the fused call in Inductor's generated code (None: no fused call)."""
    for line in code.splitlines():
        if re.search(r"fused_rope_and_cache(_flash)?\.default\(", line):
            m = re.search(r"(True|False)\)\s*$", line)
            return m and m.group(1) == "True"
    return None


def check(device, dtype, tokens, nq, nk, d, bs, nb, max_pos, styles, exact, layout="flash"):
    """Every variant on its own copies of qkv and the caches (random contents, so untouched
    entries are compared too). Returns {(kv, style): (rope_cache matches, write_key)} of the
    compile_ops backend; raises on a mismatch or a missed fusion."""
    from torch._inductor.utils import run_and_get_code

    cos_sin, (ks, vs), fusion = make_cache(max_pos, d, device), scales(device), {}
    for kv in ("auto", "fp8"):
        for is_neox in styles:
            style = "neox" if is_neox else "gptj"
            positions, qkv, slots = make_inputs(tokens, nq, nk, d, dtype, max_pos, nb * bs, device)
            base = [fill_random(c) for c in make_caches(nb, bs, nk, d, dtype, kv, device,
                                                        layout)]
            torch._dynamo.reset()
            lowerings.reset_counters()
            got, write_key = {}, None
            # No cache hits: the pass must run for the match count to mean anything.
            with torch._inductor.config.patch(fx_graph_cache=False), \
                    torch._functorch.config.patch(enable_autograd_cache=False):
                for name, fn in variant_fns().items():
                    x, caches = qkv.clone(), [c.clone() for c in base]
                    args = (positions, x, cos_sin, *caches, slots, ks, vs, nq, nk, d, is_neox, kv)
                    if name == "compile_ops_backend":
                        q, codes = run_and_get_code(fn, *args)
                        write_key = fused_code_write_key("\n".join(codes))
                    else:
                        q = fn(*args)
                    got[name] = (q.clone(), x, caches)
            matched = lowerings.counters().get("rope_cache", {}).get("matched", 0)
            if matched < 1 or write_key is None:
                raise AssertionError(f"{kv} {style}: the compile_ops backend did not fuse "
                                     f"(counters {lowerings.counters()})")
            fusion[(kv, style)] = (matched, write_key)
            ref_q, ref_x, ref_caches = got["unfused"]
            qcols = nq * d
            for name, (q, x, caches) in got.items():
                what = f"{kv} {style} {name} vs unfused"
                assert_close(q, ref_q, msg=f"{what}: rotated query")
                for cname, c, rc, before in zip(("key", "value"), caches, ref_caches, base):
                    assert not torch.equal(c, before), f"{what}: nothing written to {cname}_cache"
                    same_cache(c, rc, f"{what}: {cname}_cache", exact)
                if name == "fused":  # write_key=False: key (and value) columns only read
                    assert torch.equal(x[:, qcols:], qkv[:, qcols:]), f"{what}: key written"
                elif name != "compiled_native":  # qkv rotated in place, key included
                    assert_close(x, ref_x, msg=f"{what}: qkv after the call")
    return fusion


# ---------------------------------------------------------------------------------------------
# Timing and reports
# ---------------------------------------------------------------------------------------------
class RopeCacheReport(harness.Report):
    """The harness's table plus the acceptance summary (fused vs unfused, %copy at 4096)."""

    def summary(self) -> list[str]:
        lines, faster = [], True
        for key, v in self._rows().items():
            f, u = v.get("fused"), v.get("unfused")
            if not (f and u):
                continue
            x = u.seconds / f.seconds
            faster &= x > 1
            pct = 100 * f.bytes / f.seconds / self.copy_bw
            case = " ".join(f"{k}={c}" for k, c in zip(self.case_keys, key))
            flag = ""
            if f.case["tokens"] == TARGET_TOKENS:
                met = "meets" if pct >= TARGET_PCT else "BELOW"
                flag = f" ({met} the {TARGET_PCT:.0f}% target)"
            lines.append(f"{case}: fused x{x:.2f} vs unfused, {pct:.1f}% of copy{flag}")
        lines.append(f"fused faster than unfused at every size: {'yes' if faster else 'NO'}")
        return lines

    def markdown(self) -> str:
        notes = [f"- {s}" for s in self.summary()]
        fusion = {r.case["style"]: r.extra for r in self.results
                  if r.variant == "compile_ops_backend"}
        for style, e in fusion.items():
            notes.append(f"- compile_ops_backend ({style}): rope_cache fusion matched "
                         f"{e['rope_cache_matched']} time(s) in the check, fused call with "
                         f"write_key={e['write_key']}")
        return super().markdown() + "\n## Fused vs unfused\n\n" + "\n".join(notes) + "\n"


def bench_kv(args, kv, dtype, copy_bw, fusion):
    nq, nk, d, bs, nb = args.nq, args.nk, args.head_size, args.block_size, args.num_blocks
    cos_sin, (ks, vs) = make_cache(args.max_position, d, "cuda"), scales("cuda")
    kc, vc = make_caches(nb, bs, nk, d, dtype, kv, "cuda", args.layout)
    rep = RopeCacheReport(f"RoPE + KV-cache write ({args.layout} layout, {kv} cache)", copy_bw,
                          "unfused", ["kv", "style", "tokens"])
    cases = [(True, t) for t in args.tokens]
    cases += [(False, t) for t in args.gptj_tokens]
    for is_neox, tokens in cases:
        style = "neox" if is_neox else "gptj"
        case = {"kv": kv, "style": style, "tokens": tokens}
        nbytes = traffic(tokens, nq, nk, d, dtype, kc.dtype, d)
        for name, fn in variant_fns().items():
            def make(fn=fn):
                positions, qkv, slots = make_inputs(tokens, nq, nk, d, dtype, args.max_position,
                                                    nb * bs, "cuda")
                return lambda: fn(positions, qkv, cos_sin, kc, vc, slots, ks, vs, nq, nk, d,
                                  is_neox, kv)
            r = harness.measure(case, name, make, nbytes)
            if name == "compile_ops_backend":
                matched, write_key = fusion[(kv, style)]
                r.extra.update(rope_cache_matched=matched, write_key=write_key)
            rep.add(r)
    for variants in rep._rows().values():  # the speedup column, in the JSON too
        for r in variants.values():
            r.extra["x_unfused"] = variants["unfused"].seconds / r.seconds
    return rep


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kv", nargs="+", default=["auto", "fp8"], choices=["auto", "fp8"])
    p.add_argument("--tokens", type=int, nargs="+", default=DECODE + PREFILL,
                   help="NeoX token counts (CUDA graphs below 512 MiB moved per call)")
    p.add_argument("--gptj-tokens", type=int, nargs="*", default=[GPTJ_TOKENS],
                   help="GPT-J token counts (none: NeoX only)")
    p.add_argument("--nq", type=int, default=32)
    p.add_argument("--nk", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=8192,
                   help="cache blocks (8192: 256 MiB per bf16 cache)")
    p.add_argument("--max-position", type=int, default=8192, help="cos/sin cache rows")
    p.add_argument("--quick", action="store_true", help="tokens 1, 16, 256, 4096")
    p.add_argument("--slots", default="random", choices=["random", "runs"],
                   help="random distinct slots, or runs of consecutive slots in whole pages")
    p.add_argument("--layout", default="flash", choices=["flash", "paged"],
                   help="the cache layout (paged: vLLM's reshape_and_cache layout)")
    harness.add_common_args(p)
    args = p.parse_args()
    if args.quick:
        args.tokens = [1, 16, 256, 4096]
    SLOTS.update(mode=args.slots, block_size=args.block_size)
    if args.num_blocks * args.block_size < max(args.tokens + args.gptj_tokens):
        p.error("--num-blocks x --block-size must hold the largest token count")
    dtype, copy_bw = harness.start(args)
    if args.cpu_check:
        for layout in ("flash", "paged"):
            check("cpu", torch.float32, tokens=5, nq=4, nk=2, d=16, bs=4, nb=8, max_pos=64,
                  styles=(True, False), exact=True, layout=layout)
            check("cpu", torch.bfloat16, tokens=5, nq=4, nk=2, d=16, bs=4, nb=8, max_pos=64,
                  styles=(True,), exact=False, layout=layout)  # the GPU run's dtype, tolerances
        print("cpu check ok: rope + cache variants match")
        return
    styles = (True, False) if args.gptj_tokens else (True,)
    fusion = check("cuda", dtype, tokens=37, nq=args.nq, nk=args.nk, d=args.head_size,
                   bs=args.block_size, nb=64, max_pos=args.max_position, styles=styles,
                   exact=False, layout=args.layout)
    for (kv, style), (matched, write_key) in fusion.items():
        print(f"compile_ops backend, {kv} {style}: rope_cache matched {matched}, "
              f"write_key={write_key}", flush=True)
    stem, paths, reports = harness.device_stem("rope_cache"), [], []
    for kv in args.kv:
        rep = bench_kv(args, kv, dtype, copy_bw, fusion)
        tag = "_paged" if args.layout == "paged" else ""
        tag += "_runs" if args.slots == "runs" else ""
        paths += rep.write(args.out, f"{stem}{tag}_{kv}", plot_x="tokens", plot_group=["style"])
        reports.append(rep)
    print("wrote", *paths)
    for rep in reports:
        print(f"{rep.name}:", *rep.summary(), sep="\n  ")


if __name__ == "__main__":
    main()
