"""Benchmark the paged KV-cache ops against eager PyTorch and torch.compile of the native forms.

Llama-3-8B GQA: 8 KV heads of 128, block size 16, bf16 model dtype; fp8 = e4m3 codes in uint8
caches with float32 scales. One process, one table per section, written as
bench/results/cache_<device>_<section>.{json,md,png}:

- flash: reshape_and_cache_flash, kv auto (NHD and HND) and fp8 (NHD), tokens written to random
  slots of a 2 x 256 MiB cache. Native: index_copy_ of the rows into the flat cache (index_put_
  at (block, offset) for the strided HND view), fp8 rows quantized first. torch.compile of it
  mutates the cache input (Inductor may copy the whole cache: measured as it is).
  Bytes: key + value read, cache entries written, slot_mapping read.
- paged: reshape_and_cache (x-packed key cache), auto and fp8, vs eager advanced indexing; slots
  random (as flash's) or in runs (a prefill's write: consecutive slots filling pages taken in a
  random order). With random slots each token's value column lands in its own 32-byte sectors of
  the [head, d, page] rows (2 of their 32 bytes per token and sector), so no kernel gets near the
  copy rate there; runs are the case a kernel can coalesce.
- gather: gather_and_maybe_dequant_cache (auto; fp8 -> model dtype) and cp_gather_cache over
  min(8, tokens) sequences whose lengths sum to tokens, random block tables. Native: per-token
  sequence, block and offset computed on the device, src_cache[blk, off] (+ dequant).
  Bytes: entries read + written, plus the index arrays.
- swap: swap_blocks of 64..4096 32 KiB blocks between pinned host and device memory, scattered
  and consecutive ids, under each COMPILE_OPS_SWAP_MODE, vs the measured pinned copy rate of
  that direction (best 1 GiB copy_, bytes counted once); and device -> device, 4096 scattered
  blocks, vs the device copy bandwidth (read + write). Plain calls, no CUDA graph (the host-side
  work is part of the cost): CUDA events around N calls, best of several.
- convert: convert_fp8 model dtype <-> fp8 codes, 4096 and 16384 tokens x 8 x 128; and by
  blocks (quant_blocks): the key half of a [blocks, 2, 16, 8, 128] cache into an fp8
  [blocks, 8, 8, 16, 16] cache (vLLM's rule: same elements per block, flat order).

    python bench/bench_cache.py                         # every section, bf16
    python bench/bench_cache.py --section flash gather  # some sections (--quick: fewer sizes)
    python bench/bench_cache.py --cpu-check             # no GPU: every variant on the CPU, numerics
"""

import argparse
import contextlib
import itertools
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import compile_ops  # noqa: E402, F401  (registers torch.ops.compile_ops)
from compile_ops.testing import assert_close  # noqa: E402

ops = torch.ops.compile_ops
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
SWAP_ENV, SWAP_MODES = "COMPILE_OPS_SWAP_MODE", ("memcpy", "kernel", "auto")
SECTIONS = ("flash", "paged", "gather", "swap", "convert")
DECODE, PREFILL = [1, 2, 4, 8, 16, 32, 64, 128, 256], [1024, 4096, 16384]
FLASH_CASES = (("auto", "NHD"), ("fp8", "NHD"), ("auto", "HND"))


# ---------------------------------------------------------------------------------------------
# Native formulations
# ---------------------------------------------------------------------------------------------
def native_quant(x, scale):
    """fp8 e4m3 codes (as uint8) of x / scale, saturated."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)


def native_dequant(q, scale, dtype):
    return (q.view(FP8).float() * scale).to(dtype)


def native_flash_write(key, value, key_cache, value_cache, slots, k_scale, v_scale, fp8: bool):
    """Rows into the cache at their slots, in place (NHD: rows of the flat cache)."""
    if fp8:
        key, value = native_quant(key, k_scale), native_quant(value, v_scale)
    for rows, cache in ((key, key_cache), (value, value_cache)):
        if cache.is_contiguous():
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, rows)
        else:  # HND passed as a permuted view
            bs = cache.shape[1]
            cache[slots // bs, slots % bs] = rows


def native_paged_write(key, value, key_cache, value_cache, slots, k_scale, v_scale, fp8: bool):
    """key_cache [blocks, H, D // x, bs, x], value_cache [blocks, H, D, bs], in place."""
    if fp8:
        key, value = native_quant(key, k_scale), native_quant(value, v_scale)
    n, h, d = key.shape
    bs, x = key_cache.shape[3], key_cache.shape[4]
    blk, off = slots // bs, slots % bs
    key_cache[blk, :, :, off, :] = key.reshape(n, h, d // x, x)
    value_cache[blk, :, :, off] = value


def native_gather(src_cache, block_table, cu_seq_lens, token_to_seq, tokens: int, scale, dtype):
    """The rows both gathers produce. token_to_seq None: derived from cu_seq_lens (the inputs of
    cp_gather_cache); scale None: no dequantization."""
    t = torch.arange(tokens, device=src_cache.device, dtype=torch.int32)
    if token_to_seq is None:
        token_to_seq = torch.searchsorted(cu_seq_lens, t, right=True) - 1
    seq = token_to_seq.long()
    pos = t.long() - cu_seq_lens.long()[seq]
    bs = src_cache.shape[1]
    rows = src_cache[block_table.long()[seq, pos // bs], pos % bs]
    return rows if scale is None else native_dequant(rows, scale, dtype)


compiled_flash_write = torch.compile(native_flash_write, dynamic=False)
compiled_gather = torch.compile(native_gather, dynamic=False)
compiled_quant = torch.compile(native_quant, dynamic=False)
compiled_dequant = torch.compile(native_dequant, dynamic=False)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def elem(dtype):
    return torch.empty((), dtype=dtype).element_size()


def flash_caches(nb, bs, h, d, dtype, layout, device):
    if layout == "HND":
        return [torch.zeros(nb, h, bs, d, dtype=dtype, device=device).permute(0, 2, 1, 3)
                for _ in range(2)]
    return [torch.zeros(nb, bs, h, d, dtype=dtype, device=device) for _ in range(2)]


def paged_caches(nb, bs, h, d, dtype, device):
    x = 16 // elem(dtype)
    return [torch.zeros(nb, h, d // x, bs, x, dtype=dtype, device=device),
            torch.zeros(nb, h, d, bs, dtype=dtype, device=device)]


def write_inputs(tokens, h, d, dtype, num_slots, device, runs_of=0):
    """key, value (a few values saturate fp8 at the scales used) and distinct random slots, or
    (runs_of = block size) consecutive slots filling pages taken in a random order."""
    key = torch.randn(tokens, h, d, dtype=dtype, device=device) * 3
    value = torch.randn(tokens, h, d, dtype=dtype, device=device) * 3
    if runs_of:
        pages = torch.randperm(num_slots // runs_of, device=device)[:-(-tokens // runs_of)]
        slots = (pages[:, None] * runs_of + torch.arange(runs_of, device=device)).flatten()
        return key, value, slots[:tokens].contiguous()
    return key, value, torch.randperm(num_slots, device=device)[:tokens]


def seq_lengths(tokens, batch):
    return [tokens // batch + (i < tokens % batch) for i in range(batch)]


def gather_inputs(tokens, batch, nb, bs, device):
    """block_table [batch, max_blocks] (random distinct blocks), cu_seq_lens, token_to_seq."""
    lengths = seq_lengths(tokens, batch)
    max_blocks = -(-max(lengths) // bs)
    table = torch.randperm(nb, device=device)[: batch * max_blocks].view(batch, max_blocks).int()
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    seq = torch.repeat_interleave(torch.arange(batch, dtype=torch.int32), torch.tensor(lengths))
    return table, cu, seq.to(device)


def block_mapping(n, nb, pattern):
    """CPU int64 [n, 2] (src block, dst block): random ids, or two consecutive runs."""
    if pattern == "scattered":
        src, dst = torch.randperm(nb)[:n], torch.randperm(nb)[:n]
    else:
        src, dst = torch.arange(n), torch.arange(nb - n, nb)
    return torch.stack((src, dst), dim=1).contiguous()


@contextlib.contextmanager
def swap_mode(mode):
    """swap_blocks reads COMPILE_OPS_SWAP_MODE on every call."""
    with env_set({SWAP_ENV: mode}):
        yield


@contextlib.contextmanager
def env_set(env: dict):
    """os.environ updated for the block (the launchers read their COMPILE_OPS_* switches per
    call; under a CUDA graph the kernel chosen at capture is replayed)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# Numerics: every variant writes / reads the same entries
# ---------------------------------------------------------------------------------------------
def expect_same(got, want, what, slack=0):
    """Exact equality; fp8 codes (uint8) may differ by `slack` codes."""
    if slack and got.dtype == torch.uint8:
        diff = (got.int() - want.int()).abs()
        ok = int(diff.max()) <= slack if diff.numel() else True
    else:
        ok = torch.equal(got, want)
    if not ok:
        bad = int((got != want).sum())
        raise AssertionError(f"{what}: {bad} of {got.numel()} entries differ")


def fill_random(t):
    return t.random_(0, 256) if t.dtype == torch.uint8 else t.normal_()


def check(device, dtype, tokens, h, d, bs, nb, slack):
    """`slack`: fp8 codes of the compiled native may differ by this many codes (Triton's float32
    division and Inductor's division by a constant are not IEEE-rounded); everything else exact."""
    k_scale = torch.tensor([0.0173], device=device)
    v_scale = torch.tensor([0.031], device=device)
    key, value, slots = write_inputs(tokens, h, d, dtype, nb * bs, device)
    for kv, layout in FLASH_CASES:
        fp8 = kv == "fp8"
        base = [fill_random(c) for c in
                flash_caches(nb, bs, h, d, torch.uint8 if fp8 else dtype, layout, device)]
        ours, eager, comp = ([c.clone() for c in base] for _ in range(3))
        ops.reshape_and_cache_flash(key, value, *ours, slots, kv, k_scale, v_scale)
        native_flash_write(key, value, *eager, slots, k_scale, v_scale, fp8)
        compiled_flash_write(key, value, *comp, slots, k_scale, v_scale, fp8)
        for name, a, b, c, before in zip(("key", "value"), ours, eager, comp, base):
            assert not torch.equal(b, before), f"flash {kv} {layout}: native wrote nothing"
            expect_same(a, b, f"flash {kv} {layout} {name}_cache: compile_ops vs eager_native")
            expect_same(c, b, f"flash {kv} {layout} {name}_cache: compiled vs eager", slack)
    runs = write_inputs(tokens, h, d, dtype, nb * bs, device, runs_of=bs)[2]
    for kv in ("auto", "fp8"):
        for sl, sl_name in ((slots, "random"), (runs, "runs")):
            base = [fill_random(c) for c in
                    paged_caches(nb, bs, h, d, torch.uint8 if kv == "fp8" else dtype, device)]
            ours, eager = ([c.clone() for c in base] for _ in range(2))
            ops.reshape_and_cache(key, value, *ours, sl, kv, k_scale, v_scale)
            native_paged_write(key, value, *eager, sl, k_scale, v_scale, kv == "fp8")
            for name, a, b in zip(("key", "value"), ours, eager):
                expect_same(a, b, f"paged {kv} {sl_name} {name}_cache: compile_ops vs eager")

    src = torch.randn(nb, bs, h, d, dtype=dtype, device=device)
    src8 = native_quant(src * 3, k_scale)
    one = torch.ones(1, device=device)
    table, cu, seq = gather_inputs(tokens, 2, nb, bs, device)
    for kv, cache, scale in (("auto", src, None), ("fp8", src8, k_scale)):
        dst = torch.zeros(tokens, h, d, dtype=dtype, device=device)
        ops.gather_and_maybe_dequant_cache(cache, dst, table, cu, seq, tokens, kv,
                                           one if scale is None else scale, None)
        want = native_gather(cache, table, cu, seq, tokens, scale, dtype)
        got = compiled_gather(cache, table, cu, seq, tokens, scale, dtype)
        if scale is None:
            expect_same(dst, want, "gather auto: compile_ops vs eager_native")
            expect_same(got, want, "gather auto: compiled vs eager")
        else:
            assert_close(dst, want, msg="gather fp8: compile_ops vs eager_native")
            assert_close(got, want, msg="gather fp8: compiled vs eager")
    dst = torch.zeros(tokens, h, d, dtype=dtype, device=device)
    ops.cp_gather_cache(src, dst, table, cu, 2, None)
    want = native_gather(src, table, cu, None, tokens, None, dtype)
    expect_same(dst, want, "cp_gather: compile_ops vs eager_native")
    expect_same(compiled_gather(src, table, cu, None, tokens, None, dtype), want,
                "cp_gather: compiled vs eager")

    scale = 0.0173
    q = torch.empty(tokens, h, d, dtype=torch.uint8, device=device)
    ops.convert_fp8(q, key, scale, "fp8")
    want = native_quant(key, scale)
    expect_same(q, want, "convert_fp8 quant: compile_ops vs eager_native")
    expect_same(compiled_quant(key, scale), want, "convert_fp8 quant: compiled vs eager", slack)
    back = torch.empty(tokens, h, d, dtype=dtype, device=device)
    ops.convert_fp8(back, q, scale, "fp8")
    want = native_dequant(q, scale, dtype)
    assert_close(back, want, msg="convert_fp8 dequant: compile_ops vs eager_native")
    assert_close(compiled_dequant(q, scale, dtype), want, msg="convert_fp8 dequant: compiled")
    # By blocks (vLLM's rule): the key half of a [blocks, 2, ...] model-dtype cache (a padded
    # block stride) into an fp8 cache of another shape, element i of each block in flat order.
    src, q8 = blocks_inputs(tokens, h, d, bs, dtype, device)
    ops.convert_fp8(q8, src, scale, "fp8")
    expect_same(q8, native_quant(src.reshape(q8.shape), scale),
                "convert_fp8 by blocks: compile_ops vs eager_native")


def check_swap(pairs, modes, shape=(8, 4, 2, 16)):
    """swap_blocks vs a manual copy of the blocks, for (src device, dst device) pairs."""
    def alloc(dev, pinned):
        t = torch.randn(shape)
        return t.cuda() if dev == "cuda" else t.pin_memory() if pinned else t

    block_bytes = torch.Size(shape[1:]).numel() * 4
    for pair, mode, pattern in itertools.product(pairs, modes, ("scattered", "consecutive")):
        pinned = "cuda" in pair
        src, dst = alloc(pair[0], pinned), alloc(pair[1], pinned)
        m = block_mapping(5, shape[0], pattern)
        want = dst.cpu().clone()
        want[m[:, 1]] = src.cpu()[m[:, 0]]
        with swap_mode(mode):
            ops.swap_blocks(src, dst, block_bytes, m)
        if pinned:
            torch.cuda.synchronize()  # a copy into pinned memory is asynchronous
        expect_same(dst.cpu(), want, f"swap_blocks {pair[0]}->{pair[1]} {pattern} ({mode})")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def measure_variants(rep, case, nbytes, make_inputs, fns):
    """fns: {variant: f(*inputs)}; harness.measure rotates input sets from make_inputs()."""
    for name, fn in fns.items():
        def make(fn=fn):
            inputs = make_inputs()
            return lambda: fn(*inputs)
        rep.add(harness.measure(case, name, make, nbytes))


def time_host(call, min_ms=20.0, reps=5):
    """(best seconds per call, spread) of plain calls, host work included: CUDA events around
    enough calls to last min_ms, best of reps."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    call()
    torch.cuda.synchronize()
    start.record()
    call()
    end.record()
    end.synchronize()
    inner = max(1, int(min_ms / max(start.elapsed_time(end), 1e-3)))
    samples = []
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            call()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / inner)
    best = min(samples)
    return best, (max(samples) - best) / best


def pinned_bandwidth(nbytes=1 << 30, reps=10):
    """Best host->device and device->host rate (bytes/s, counted once) of one pinned copy_."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    dev = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    bw = {}
    for direction, dst, src in (("h2d", dev, host), ("d2h", host, dev)):
        sec, _ = time_host(lambda: dst.copy_(src, non_blocking=True), min_ms=0.0, reps=reps)
        bw[direction] = nbytes / sec
    del host, dev
    torch.cuda.empty_cache()
    return bw


class SwapReport(harness.Report):
    """swap_blocks tables: plain calls, not graphs; `ref` names a reference other than the
    device copy bandwidth (the pinned copy rate of one direction)."""

    def __init__(self, name, bw, case_keys, ref=None):
        super().__init__(name, bw, "memcpy", case_keys)
        self.ref = ref

    def markdown(self):
        md = super().markdown()
        if self.ref:
            md = re.sub(r"Measured copy bandwidth \(.*?\): \*\*\d+ GB/s\*\*\.",
                        f"{self.ref}: **{self.copy_bw / 1e9:.1f} GB/s**.", md, count=1)
        return md.replace("`graph`: timed as CUDA-graph replays.", "Timed as plain calls "
                          "(host-side work included): CUDA events around N calls, best of 5.", 1)


def bench_write(args, dtype, copy_bw, section):
    """flash: reshape_and_cache_flash (+ torch.compile of the native write); paged:
    reshape_and_cache."""
    h, d, bs, nb = args.heads, args.head_size, args.block_size, args.num_blocks
    flash = section == "flash"
    rep = harness.Report("reshape_and_cache_flash" if flash else "reshape_and_cache", copy_bw,
                         "compiled_native" if flash else "eager_native",
                         ["kv", "layout", "slots", "tokens"])
    ks, vs = torch.tensor([0.05], device="cuda"), torch.tensor([0.07], device="cuda")
    native = native_flash_write if flash else native_paged_write
    op = ops.reshape_and_cache_flash if flash else ops.reshape_and_cache
    cases = [(kv, layout, "random") for kv, layout in FLASH_CASES] if flash else \
        [(kv, "paged", sl) for kv in ("auto", "fp8") for sl in ("random", "runs")]
    for kv, layout, slot_kind in cases:
        fp8, cdtype = kv == "fp8", torch.uint8 if kv == "fp8" else dtype
        kc, vc = (flash_caches(nb, bs, h, d, cdtype, layout, "cuda") if flash
                  else paged_caches(nb, bs, h, d, cdtype, "cuda"))
        fns = {"eager_native": lambda k, v, s: native(k, v, kc, vc, s, ks, vs, fp8),
               "compiled_native": lambda k, v, s: compiled_flash_write(k, v, kc, vc, s, ks, vs,
                                                                       fp8),
               "compile_ops": lambda k, v, s: op(k, v, kc, vc, s, kv, ks, vs)}
        if not flash:
            del fns["compiled_native"]
            for name, env in args.kernel_variants:
                fns[f"compile_ops_{name}"] = (
                    lambda k, v, s, env=env: with_env(env, lambda: op(k, v, kc, vc, s, kv, ks, vs)))
        for tokens in args.tokens:
            nbytes = 2 * tokens * h * d * (elem(dtype) + elem(cdtype)) + 8 * tokens
            runs = bs if slot_kind == "runs" else 0
            case = {"kv": kv, "layout": layout, "slots": slot_kind, "tokens": tokens}
            measure_variants(rep, case, nbytes,
                             lambda: write_inputs(tokens, h, d, dtype, nb * bs, "cuda", runs), fns)
            if args.copy_ceiling and not flash:
                # the same bytes moved by one device copy (half read, half written): the most a
                # write of this size can reach, launch and ramp included
                def copy_inputs(n=nbytes // 2):
                    return (torch.empty(n, dtype=torch.uint8, device="cuda"),
                            torch.empty(n, dtype=torch.uint8, device="cuda"))
                measure_variants(rep, case, nbytes, copy_inputs,
                                 {"copy_same_bytes": lambda dst, src: dst.copy_(src)})
    return rep, dict(plot_x="tokens", plot_group=["kv", "layout", "slots"])


def with_env(env: dict, call):
    """call() under env_set(env)."""
    with env_set(env):
        return call()


def kernel_variant(spec: str):
    """NAME:VAR=VALUE[,VAR=VALUE] -> (NAME, {VAR: VALUE})."""
    name, _, assigns = spec.partition(":")
    env = dict(a.split("=", 1) for a in assigns.split(",") if a)
    if not name or not env:
        raise argparse.ArgumentTypeError(f"expected NAME:VAR=VALUE[,...], got {spec!r}")
    return name, env


def bench_gather(args, dtype, copy_bw):
    h, d, bs, nb = args.heads, args.head_size, args.block_size, args.num_blocks
    rep = harness.Report("KV-cache gathers", copy_bw, "compiled_native", ["op", "kv", "tokens"])
    src = torch.randn(nb, bs, h, d, dtype=dtype, device="cuda")
    scale, one = torch.tensor([0.05], device="cuda"), torch.ones(1, device="cuda")
    src8 = native_quant(src, scale)
    for op, kv in (("gather", "auto"), ("gather", "fp8"), ("cp_gather", "auto")):
        cache, sc = (src8, scale) if kv == "fp8" else (src, None)
        for tokens in args.tokens:
            batch = min(8, tokens)
            index_bytes = 4 * (batch * -(-max(seq_lengths(tokens, batch)) // bs) + batch + 1)
            index_bytes += 4 * tokens if op == "gather" else 0
            nbytes = tokens * h * d * (cache.element_size() + elem(dtype)) + index_bytes

            def inputs():  # block_table, cu_seq_lens, token_to_seq, dst
                return (*gather_inputs(tokens, batch, nb, bs, "cuda"),
                        torch.empty(tokens, h, d, dtype=dtype, device="cuda"))

            if op == "gather":
                fns = {"eager_native": lambda t, c, s, o: native_gather(
                           cache, t, c, s, tokens, sc, dtype),
                       "compiled_native": lambda t, c, s, o: compiled_gather(
                           cache, t, c, s, tokens, sc, dtype),
                       "compile_ops": lambda t, c, s, o: ops.gather_and_maybe_dequant_cache(
                           cache, o, t, c, s, tokens, kv, one if sc is None else sc, None)}
            else:  # cp_gather_cache: no token_to_seq, the native derives it from cu_seq_lens
                fns = {"eager_native": lambda t, c, s, o: native_gather(
                           cache, t, c, None, tokens, None, dtype),
                       "compiled_native": lambda t, c, s, o: compiled_gather(
                           cache, t, c, None, tokens, None, dtype),
                       "compile_ops": lambda t, c, s, o: ops.cp_gather_cache(
                           cache, o, t, c, batch, None)}
            measure_variants(rep, {"op": op, "kv": kv, "tokens": tokens}, nbytes, inputs, fns)
    del src, src8
    torch.cuda.empty_cache()
    return rep, dict(plot_x="tokens", plot_group=["op", "kv"])


def blocks_inputs(tokens, h, d, bs, dtype, device):
    """convert_fp8 by blocks: the key half of a [blocks, 2, bs, h, d] cache (block stride twice
    a block) and an fp8 cache [blocks, h, d / 16, bs, 16] (another shape, same block size)."""
    blocks = max(1, tokens // bs)
    kv = torch.randn(blocks, 2, bs, h, d, dtype=dtype, device=device)
    return kv[:, 0], torch.empty(blocks, h, d // 16, bs, 16, dtype=torch.uint8, device=device)


def bench_convert(args, dtype, copy_bw):
    h, d, scale = args.heads, args.head_size, 0.05
    rep = harness.Report("convert_fp8", copy_bw, "compiled_native", ["direction", "tokens"])
    for tokens in args.convert_tokens:
        nbytes = tokens * h * d * (elem(dtype) + 1)

        def quant_inputs(tokens=tokens):
            x = torch.randn(tokens, h, d, dtype=dtype, device="cuda")
            return x, torch.empty(tokens, h, d, dtype=torch.uint8, device="cuda")

        def dequant_inputs(tokens=tokens):
            q = native_quant(torch.randn(tokens, h, d, dtype=dtype, device="cuda"), scale)
            return q, torch.empty(tokens, h, d, dtype=dtype, device="cuda")

        measure_variants(rep, {"direction": "quant", "tokens": tokens}, nbytes, quant_inputs, {
            "eager_native": lambda x, o: native_quant(x, scale),
            "compiled_native": lambda x, o: compiled_quant(x, scale),
            "compile_ops": lambda x, o: ops.convert_fp8(o, x, scale, "fp8")})
        measure_variants(rep, {"direction": "dequant", "tokens": tokens}, nbytes, dequant_inputs, {
            "eager_native": lambda q, o: native_dequant(q, scale, dtype),
            "compiled_native": lambda q, o: compiled_dequant(q, scale, dtype),
            "compile_ops": lambda q, o: ops.convert_fp8(o, q, scale, "fp8")})
        # by blocks: a padded block stride in, another shape out (the block kernel)
        measure_variants(rep, {"direction": "quant_blocks", "tokens": tokens}, nbytes,
                         lambda tokens=tokens: blocks_inputs(tokens, h, d, 16, dtype, "cuda"), {
            "eager_native": lambda x, o: native_quant(x.reshape(o.shape), scale),
            "compiled_native": lambda x, o: compiled_quant(x.reshape(o.shape), scale),
            "compile_ops": lambda x, o: ops.convert_fp8(o, x, scale, "fp8")})
    return rep, dict(plot_x="tokens", plot_group=["direction"])


def bench_swap(args, dtype, copy_bw, stem):
    bw = pinned_bandwidth()
    print(f"pinned copy: host->device {bw['h2d'] / 1e9:.1f} GB/s, device->host "
          f"{bw['d2h'] / 1e9:.1f} GB/s", flush=True)
    nb, shape = args.swap_blocks, (args.swap_blocks, args.block_size, args.heads, args.head_size)
    block_bytes = torch.Size(shape[1:]).numel() * elem(dtype)
    host = torch.empty(shape, dtype=dtype, pin_memory=True).fill_(1)
    dev, dev2 = (torch.randn(shape, dtype=dtype, device="cuda") for _ in range(2))
    keys = ["dir", "ids", "blocks"]
    paths = []

    def run(rep, case, src, dst, m, nbytes, ref):
        for mode in SWAP_MODES:
            with swap_mode(mode):
                sec, spread = time_host(lambda: ops.swap_blocks(src, dst, block_bytes, m))
            rep.add(harness.Result(case, mode, sec, nbytes, graph=False, sets=1, spread=spread,
                                   l2_resident=False, extra={"reference": ref}))

    for direction, src, dst in (("h2d", host, dev), ("d2h", dev, host)):
        ref = (f"Reference: best of ten 1 GiB pinned {direction} `copy_(non_blocking=True)` "
               f"(bytes counted once)")
        rep = SwapReport(f"swap_blocks {direction}", bw[direction], keys, ref)
        for ids, n in itertools.product(("scattered", "consecutive"), args.swap_pairs):
            run(rep, {"dir": direction, "ids": ids, "blocks": n}, src, dst,
                block_mapping(n, nb, ids), n * block_bytes, f"pinned {direction} copy")
        paths += rep.write(args.out, f"{stem}_swap_{direction}", plot_x="blocks",
                           plot_group=["ids"])
    rep = SwapReport("swap_blocks d2d", copy_bw, keys)
    n = min(4096, nb)
    case, m = {"dir": "d2d", "ids": "scattered", "blocks": n}, block_mapping(n, nb, "scattered")
    run(rep, case, dev, dev2, m, 2 * n * block_bytes, "device copy (read + write)")
    s_ids, d_ids = m[:, 0].cuda(), m[:, 1].cuda()
    sec, spread = time_host(lambda: dev2.index_copy_(0, d_ids, dev.index_select(0, s_ids)))
    rep.add(harness.Result(case, "eager_native", sec, 2 * n * block_bytes, graph=False, sets=1,
                           spread=spread, l2_resident=False))
    return paths + rep.write(args.out, f"{stem}_swap_d2d")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--section", nargs="+", default=["all"], choices=[*SECTIONS, "all"])
    p.add_argument("--tokens", type=int, nargs="+", default=DECODE + PREFILL)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=8192,
                   help="blocks of the write / gather caches (8192: 256 MiB per bf16 cache)")
    p.add_argument("--swap-blocks", type=int, default=16384, help="blocks of each swap cache")
    p.add_argument("--swap-pairs", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--convert-tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--kernel-variants", type=kernel_variant, nargs="*", default=[],
                   metavar="NAME:VAR=VALUE",
                   help="paged: also time reshape_and_cache under these environment settings, "
                        "e.g. register:COMPILE_OPS_CACHE_STAGED=0 (row compile_ops_NAME)")
    p.add_argument("--copy-ceiling", action="store_true",
                   help="paged: also time one device copy of each case's bytes (copy_same_bytes)")
    p.add_argument("--quick", action="store_true",
                   help="tokens 1, 16, 256, 4096; swap 64 and 4096 blocks; convert 4096 tokens")
    harness.add_common_args(p)
    args = p.parse_args()
    if args.quick:
        args.tokens, args.swap_pairs, args.convert_tokens = [1, 16, 256, 4096], [64, 4096], [4096]
    if args.num_blocks * args.block_size < 2 * max(args.tokens):
        p.error("--num-blocks x --block-size must hold at least twice the largest --tokens")
    if args.swap_blocks < max(args.swap_pairs):
        p.error("--swap-blocks must be at least the largest --swap-pairs")
    sections = SECTIONS if "all" in args.section else args.section
    dtype, copy_bw = harness.start(args)
    if args.cpu_check:
        check("cpu", torch.float32, tokens=9, h=2, d=16, bs=4, nb=8, slack=0)
        check_swap([("cpu", "cpu")], ["auto"])
        print("cpu check ok: kv-cache variants match")
        return
    check("cuda", dtype, tokens=300, h=args.heads, d=args.head_size, bs=args.block_size, nb=64,
          slack=1)
    check_swap([("cpu", "cuda"), ("cuda", "cpu"), ("cuda", "cuda")], SWAP_MODES)
    stem, paths = harness.device_stem("cache"), []
    for section in sections:
        if section == "swap":
            paths += bench_swap(args, dtype, copy_bw, stem)
            continue
        if section in ("flash", "paged"):
            rep, plot = bench_write(args, dtype, copy_bw, section)
        else:
            rep, plot = (bench_gather if section == "gather" else bench_convert)(args, dtype,
                                                                                  copy_bw)
        paths += rep.write(args.out, f"{stem}_{section}", **plot)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
