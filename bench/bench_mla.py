"""Benchmark the MLA and sparse-indexer cache ops against eager PyTorch and torch.compile.

DeepSeek-V3 shapes: kv_lora_rank 512 + pe_dim 64 per MLA cache entry, bf16 model dtype, block
size 64 (vLLM's MLA default), 128 query heads for q_pe, indexer keys of 128 values quantized in
groups of 128. Token counts: decode 1, 16, 256 and prefill 1024, 4096, 16384. Each cache is about
--cache-mib (256 MiB) unless --num-blocks fixes the block count; tokens go to random distinct
slots. One process, one table per section, written as
bench/results/mla_<device>_<section>.{json,md,png}:

- mla_write: concat_and_cache_mla, kv "auto" (bf16 cache [nb, 64, 576]), "fp8" (uint8 e4m3
  codes, float32 scale 0.1) and "fp8_ds_mla" (uint8 [nb, 64, 656]: four tiles of 128 e4m3 codes,
  their four float32 scales, the 64 k_pe values bit for bit). Native: torch.cat((kv_c, k_pe), 1)
  (quantized for fp8; ds_mla: per-tile amax, scales, codes and a byte concat), then
  index_copy_ into the flat cache view. torch.compile of it mutates the cache input: Inductor
  copies the whole cache (~360 us per call for 256 MiB on an H100, at every size; the same in
  rope_fused and the indexer write, as in bench_cache.py): measured as it is.
  Bytes: kv_c + k_pe read, cache entries written, slots read.
- rope_fused: concat_and_cache_mla_rope_fused (kv auto and fp8; --style, NeoX by default) vs
  unfused = rotary_embedding(q_pe [T, 128, 64] as query, k_pe [T, 64] as key, head_size 64)
  then concat_and_cache_mla, and vs the native rotation (vLLM's forward_native: float32 math,
  rotated q and k as new tensors) + the native cache write, eager and compiled. float32 cos/sin
  cache of real cos / sin of position x inv_freq, so repeated in-place rotations stay bounded.
  Bytes (the fused op's traffic, the same for every row, so the columns compare time): q_pe read
  + written, k_pe read + written, kv_c read, entries written, the float32 cos/sin rows,
  positions and slots (int64). The unfused pair moves more (k_pe read again by the write).
- upconvert: cp_gather_and_upconvert_fp8_kv_cache over min(8, tokens) requests whose lengths sum
  to tokens, random block tables over an fp8_ds_mla cache filled by concat_and_cache_mla; dst
  bf16 [tokens, 576], workspace_starts = exclusive cumsum of the lengths. Native: each row's
  request, block and offset computed on the device, entries gathered, e4m3 codes x tile scales
  -> bf16, rope bytes viewed as bf16. Bytes: 656 read + 1152 written per row, plus the block
  table and workspace_starts.
- indexer: indexer_k_quant_and_cache (k bf16 [T, 128], cache uint8 [nb, 64, 132] block-major,
  "ue8m0" power-of-two scales) and cp_gather_indexer_k_quant_cache (dst_k uint8 [T, 128],
  dst_scale uint8 [T, 4]) over min(8, tokens) requests. Native: per-group amax, scale, codes,
  then index_put_ into the codes and scales byte views of the blocks; the gather indexes the
  same views. Bytes: k read + codes and scales written + slots; gather: codes and scales read
  and written + block table and cu_seq_lens.

Every case also has a `copy_same_bytes` row: dst.copy_(src) of a uint8 buffer whose read +
write bytes equal the op's bytes at that size, i.e. the bandwidth a plain copy reaches at that
size (small sizes cannot reach the >= 1 GiB copy bandwidth the %copy column divides by).
Before timing, every variant is checked on the GPU against the ops (fp8 codes within one code,
float32 scales within a few ulps: ATen divides by a host scalar as a multiply by its reciprocal,
Triton's division is not IEEE-rounded; bf16 values within the dtype tolerance).
Acceptance (the issue): >= 80% of the measured copy bandwidth at 4096 tokens, and the fused RoPE
variant faster than rotary_embedding + concat_and_cache_mla: the summary under each table (and
printed at the end) says so.

    python bench/bench_mla.py                                 # every section, bf16
    python bench/bench_mla.py --section rope_fused --quick    # tokens 1, 256, 4096
    python bench/bench_mla.py --cpu-check                     # no GPU: every variant, numerics
"""

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_cache import (  # noqa: E402
    FP8,
    FP8_MAX,
    elem,
    expect_same,
    fill_random,
    measure_variants,
    native_quant,
    seq_lengths,
)
from bench_rotary import make_cache, native_rope  # noqa: E402

import compile_ops  # noqa: E402, F401  (registers torch.ops.compile_ops)
from compile_ops.testing import assert_close  # noqa: E402

ops = torch.ops.compile_ops
SECTIONS = ("mla_write", "rope_fused", "upconvert", "indexer")
DECODE, PREFILL, QUICK = [1, 16, 256], [1024, 4096, 16384], [1, 256, 4096]
TARGET_TOKENS, TARGET_PCT = 4096, 80.0
RANK, PE, TILE = 512, 64, 128          # kv_lora_rank, pe_dim, fp8_ds_mla tile
ENTRY, DS_ENTRY = RANK + PE, 656       # values per "auto"/"fp8" entry; bytes per ds_mla entry
FLT_MIN = torch.finfo(torch.float32).tiny
INDEXER_EPS = 1e-4
WRITE_KV, ROPE_KV = ("auto", "fp8", "fp8_ds_mla"), ("auto", "fp8")
INDEXER_FMTS = ("ue8m0", "fp8")        # checked; timed: ue8m0 (DeepSeek-V3.2)


# ---------------------------------------------------------------------------------------------
# Native formulations
# ---------------------------------------------------------------------------------------------
def float_bytes(x):
    """The bytes of float32 x [n, g] as uint8 [n, 4 g] (through a 1-D view: Inductor refuses a
    dtype view of a [n, 1] buffer whose last dim it does not lay out with stride 1)."""
    return x.reshape(-1).view(torch.uint8).reshape(x.shape[0], -1)


def native_ds_mla_entries(kv_c, k_pe):
    """fp8_ds_mla entries, uint8 [n, 656]: kv_c's e4m3 codes in tiles of 128 (scale = tile amax
    / 448, at least FLT_MIN), the four float32 scales' bytes, k_pe's bytes."""
    n = kv_c.shape[0]
    tiles = kv_c.float().reshape(n, RANK // TILE, TILE)
    sc = (tiles.abs().amax(-1) / FP8_MAX).clamp_min(FLT_MIN)
    codes = native_quant(tiles, sc[..., None]).reshape(n, RANK)
    return torch.cat((codes, float_bytes(sc), k_pe.view(torch.uint8)), 1)


def native_entries(kv_c, k_pe, scale, kv):
    if kv == "fp8_ds_mla":
        return native_ds_mla_entries(kv_c, k_pe)
    rows = torch.cat((kv_c, k_pe), 1)
    return rows if kv == "auto" else native_quant(rows, scale)


def native_mla_write(kv_c, k_pe, kv_cache, slots, scale, kv):
    """The tokens' entries into the (contiguous) cache at their slots, in place."""
    entries = native_entries(kv_c, k_pe, scale, kv)
    kv_cache.view(-1, kv_cache.shape[-1]).index_copy_(0, slots, entries)


def native_rope_write(positions, q_pe, k_pe, kv_c, cos_sin, is_neox, slots, kv_cache, scale,
                      kv):
    """forward_native RoPE (rotated q_pe and k_pe as new tensors), then the native write of the
    rotated k_pe; returns the rotated q_pe."""
    q, k = native_rope(positions, q_pe, k_pe, PE, cos_sin, is_neox)
    native_mla_write(kv_c, k, kv_cache, slots, scale, kv)
    return q


def fused_rope_write(positions, q_pe, k_pe, kv_c, cos_sin, is_neox, slots, kv_cache, scale,
                     kv):
    ops.concat_and_cache_mla_rope_fused(positions, q_pe, k_pe, kv_c, cos_sin, is_neox, slots,
                                        kv_cache, kv, scale)
    return q_pe


def unfused_rope_write(positions, q_pe, k_pe, kv_c, cos_sin, is_neox, slots, kv_cache, scale,
                       kv):
    ops.rotary_embedding(positions, q_pe, k_pe, PE, cos_sin, is_neox)
    ops.concat_and_cache_mla(kv_c, k_pe, kv_cache, slots, kv, scale)
    return q_pe


def packed_rows(starts, block_table, tokens, bs):
    """(block, offset) of rows 0..tokens-1 packed request after request: a row belongs to the
    last request whose start is <= the row (starts: int32, ascending)."""
    r = torch.arange(tokens, device=starts.device, dtype=torch.int32)
    req = torch.searchsorted(starts, r, right=True) - 1
    pos = (r - starts[req]).long()
    return block_table.long()[req, pos // bs], pos % bs


def native_upconvert(src_cache, block_table, workspace_starts, tokens):
    """bf16 [tokens, 576]: each row's fp8_ds_mla entry decoded (codes x tile scales | k_pe)."""
    blk, off = packed_rows(workspace_starts, block_table, tokens, src_cache.shape[1])
    e = src_cache[blk, off]  # [tokens, 656] bytes
    codes = e[:, :RANK].view(FP8).float().reshape(tokens, RANK // TILE, TILE)
    scales = e[:, RANK:RANK + 16].contiguous().view(torch.float32)  # [tokens, 4]
    vals = (codes * scales[..., None]).reshape(tokens, RANK).to(torch.bfloat16)
    rope = e[:, RANK + 16:].contiguous().view(torch.bfloat16)
    return torch.cat((vals, rope), 1)


def indexer_views(kv_cache, head_dim):
    """Byte views (codes [nb, bs, head_dim], scales [nb, bs, scale bytes]) of a block-major
    indexer cache: a block holds all its tokens' codes, then all their scales."""
    nb, bs, width = kv_cache.shape
    flat = kv_cache.view(nb, bs * width)
    return (flat[:, :bs * head_dim].view(nb, bs, head_dim),
            flat[:, bs * head_dim:].view(nb, bs, width - head_dim))


def pow2_ceil(s):
    """2 ** ceil(log2(s)) for positive normal float32 s, exactly: the exponent goes up by one
    unless the mantissa bits are all zero."""
    bits = s.view(torch.int32)
    exp = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exp << 23).view(torch.float32)


def native_indexer_write(k, kv_cache, slots, quant_block, ue8m0):
    n, d = k.shape
    x = k.float().reshape(n, d // quant_block, quant_block)
    sc = x.abs().amax(-1).clamp_min(INDEXER_EPS) / FP8_MAX
    if ue8m0:
        sc = pow2_ceil(sc)
    codes = native_quant(x, sc[..., None]).reshape(n, d)
    bs = kv_cache.shape[1]
    code_view, scale_view = indexer_views(kv_cache, d)
    blk, off = slots // bs, slots % bs
    code_view[blk, off] = codes
    scale_view[blk, off] = float_bytes(sc)


def native_indexer_gather(kv_cache, block_table, cu_seq_lens, tokens, head_dim):
    """(codes uint8 [tokens, head_dim], scale bytes uint8 [tokens, head_dim / Q * 4])."""
    blk, off = packed_rows(cu_seq_lens, block_table, tokens, kv_cache.shape[1])
    code_view, scale_view = indexer_views(kv_cache, head_dim)
    return code_view[blk, off], scale_view[blk, off]


compiled_mla_write = torch.compile(native_mla_write, dynamic=False)
compiled_rope_write = torch.compile(native_rope_write, dynamic=False)
compiled_upconvert = torch.compile(native_upconvert, dynamic=False)
compiled_indexer_write = torch.compile(native_indexer_write, dynamic=False)
compiled_indexer_gather = torch.compile(native_indexer_gather, dynamic=False)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def entry_bytes(kv, dtype):
    return DS_ENTRY if kv == "fp8_ds_mla" else ENTRY * (elem(dtype) if kv == "auto" else 1)


def mla_cache(nb, bs, kv, dtype, device):
    width = DS_ENTRY if kv == "fp8_ds_mla" else ENTRY
    return torch.zeros(nb, bs, width, dtype=dtype if kv == "auto" else torch.uint8,
                       device=device)


def indexer_cache(nb, bs, head_dim, quant_block, device):
    return torch.zeros(nb, bs, head_dim + head_dim // quant_block * 4, dtype=torch.uint8,
                       device=device)


def blocks_for(cache_mib, bs, entry):
    return max(1, (cache_mib << 20) // (bs * entry))


def write_inputs(tokens, dtype, num_slots, device):
    """kv_c [T, 512], k_pe [T, 64] (x 3: a few values saturate the fp8 scale of the checks),
    distinct random slots."""
    kv_c = torch.randn(tokens, RANK, dtype=dtype, device=device) * 3
    k_pe = torch.randn(tokens, PE, dtype=dtype, device=device) * 3
    return kv_c, k_pe, torch.randperm(num_slots, device=device)[:tokens]


def rope_inputs(tokens, heads, dtype, max_pos, num_slots, device):
    """positions, q_pe [T, heads, 64], k_pe [T, 64], kv_c [T, 512], slots."""
    positions = torch.randint(0, max_pos, (tokens,), device=device)
    q_pe = torch.randn(tokens, heads, PE, dtype=dtype, device=device)
    kv_c, k_pe, slots = write_inputs(tokens, dtype, num_slots, device)
    return positions, q_pe, k_pe, kv_c, slots


def batch_tables(tokens, batch, nb, bs, device):
    """block_table [batch, max_blocks] of random distinct blocks, int32 starts [batch + 1]
    (exclusive cumsum of lengths summing to tokens, then the total)."""
    lengths = seq_lengths(tokens, batch)
    max_blocks = -(-max(lengths) // bs)
    table = torch.randperm(nb, device=device)[: batch * max_blocks].view(batch, max_blocks).int()
    starts = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    return table, starts


def index_bytes(tokens, batch, bs, extra):
    """Bytes of the block table plus `extra` int32 offsets."""
    return 4 * (batch * -(-max(seq_lengths(tokens, batch)) // bs) + extra)


def indexer_keys(tokens, head_dim, dtype, device):
    """k [T, head_dim], x 3. Values whose magnitude is 7 x 2^j are nudged off it: a group amax
    of exactly that makes amax / 448 a power of two, where a division one ulp off (Triton's)
    moves ue8m0's rounding up by a whole factor of two."""
    k = torch.randn(tokens, head_dim, device=device) * 3
    k = k.to(dtype).float()
    mant, _ = torch.frexp(k.abs())
    return torch.where(mant == 0.875, k * 1.02, k).to(dtype)


def fill_ds_mla(cache, dtype, chunk=1 << 16):
    """Every entry of an fp8_ds_mla cache written by concat_and_cache_mla (random kv_c, k_pe)."""
    n, scale = cache.shape[0] * cache.shape[1], torch.ones(1, device=cache.device)
    for s in range(0, n, chunk):
        slots = torch.arange(s, min(n, s + chunk), device=cache.device)
        kv_c, k_pe, _ = write_inputs(len(slots), dtype, 1, cache.device)
        ops.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8_ds_mla", scale)


def fill_indexer(cache, dtype, head_dim, quant_block, chunk=1 << 16):
    """Every entry of an indexer cache written by indexer_k_quant_and_cache (random keys)."""
    n = cache.shape[0] * cache.shape[1]
    for s in range(0, n, chunk):
        slots = torch.arange(s, min(n, s + chunk), device=cache.device)
        k = torch.randn(len(slots), head_dim, dtype=dtype, device=cache.device)
        ops.indexer_k_quant_and_cache(k, cache, slots, quant_block, "ue8m0")


# ---------------------------------------------------------------------------------------------
# Numerics: every variant writes / reads the same entries
# ---------------------------------------------------------------------------------------------
def same_scales(got, want, what, exact):
    """float32 scales: equal, or (not exact) within a few ulps (Triton's float32 division and
    ATen's CUDA division by a host scalar, a multiply by its reciprocal, are not IEEE-rounded)."""
    if exact:
        expect_same(got.view(torch.uint8), want.view(torch.uint8), what)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0, equal_nan=True,
                                   msg=lambda m: f"{what}\n{m}")


def same_values(got, want, what, exact):
    """16-bit / float values: bit for bit, or within the dtype's tolerance."""
    if exact:
        expect_same(got, want, what)
    else:
        assert_close(got, want, msg=what)


def same_cache(got, want, what, exact, layout="plain", head_dim=None):
    """Exact, or: fp8 codes within one code, float32 scales within a few ulps, 16-bit values
    within the dtype's tolerance, k_pe bits exact. layout: "plain" (an auto or fp8 cache),
    "ds_mla" (fp8_ds_mla entries) or "indexer" (block-major codes then scales)."""
    if exact:
        expect_same(got, want, what)
    elif layout == "ds_mla":
        g, w = got.view(-1, DS_ENTRY), want.view(-1, DS_ENTRY)
        expect_same(g[:, :RANK], w[:, :RANK], f"{what} (codes)", slack=1)
        same_scales(*(x[:, RANK:RANK + 16].contiguous().view(torch.float32) for x in (g, w)),
                    f"{what} (scales)", exact)
        expect_same(g[:, RANK + 16:], w[:, RANK + 16:], f"{what} (k_pe bytes)")
    elif layout == "indexer":
        (gc, gs), (wc, ws) = indexer_views(got, head_dim), indexer_views(want, head_dim)
        expect_same(gc, wc, f"{what} (codes)", slack=1)
        same_scales(gs.contiguous().view(torch.float32), ws.contiguous().view(torch.float32),
                    f"{what} (scales)", exact)
    elif got.dtype == torch.uint8:
        expect_same(got, want, what, slack=1)
    else:
        assert_close(got, want, msg=what)


def check(device, dtype, tokens, heads, bs, nb, max_pos, quant_block, head_dim, exact,
          compiled=True):
    """Every variant on its own copies of random caches / destinations (so untouched entries are
    compared too). `exact`: the ops and the eager natives agree bit for bit (the CPU, where the
    ops run their references); otherwise within the tolerances of same_cache. Compiled natives
    are always compared with those tolerances."""
    layouts = {"auto": "plain", "fp8": "plain", "fp8_ds_mla": "ds_mla"}
    scale = torch.tensor([0.1], device=device)

    # concat_and_cache_mla
    kv_c, k_pe, slots = write_inputs(tokens, dtype, nb * bs, device)
    for kv in WRITE_KV:
        base = fill_random(mla_cache(nb, bs, kv, dtype, device))
        ours, eager, comp = (base.clone() for _ in range(3))
        ops.concat_and_cache_mla(kv_c, k_pe, ours, slots, kv, scale)
        native_mla_write(kv_c, k_pe, eager, slots, scale, kv)
        assert not torch.equal(eager, base), f"mla_write {kv}: native wrote nothing"
        same_cache(ours, eager, f"mla_write {kv}: compile_ops vs eager_native", exact,
                   layouts[kv])
        if compiled:
            compiled_mla_write(kv_c, k_pe, comp, slots, scale, kv)
            same_cache(comp, eager, f"mla_write {kv}: compiled vs eager", False, layouts[kv])

    # concat_and_cache_mla_rope_fused: every variant against the unfused pair
    cos_sin = make_cache(max_pos, PE, device)
    variants = {"fused": fused_rope_write, "eager_native": native_rope_write}
    if compiled:
        variants["compiled_native"] = compiled_rope_write
    for kv, is_neox in itertools.product(ROPE_KV, (True, False)):
        what = f"rope_fused {kv} {'neox' if is_neox else 'gptj'}"
        positions, q_pe, k_pe, kv_c, slots = rope_inputs(tokens, heads, dtype, max_pos, nb * bs,
                                                         device)
        base = fill_random(mla_cache(nb, bs, kv, dtype, device))
        ref_q, ref_k, ref_cache = q_pe.clone(), k_pe.clone(), base.clone()
        unfused_rope_write(positions, ref_q, ref_k, kv_c, cos_sin, is_neox, slots, ref_cache,
                           scale, kv)
        assert not torch.equal(ref_q, q_pe), f"{what}: q_pe not rotated"
        for name, fn in variants.items():
            q, k, cache = q_pe.clone(), k_pe.clone(), base.clone()
            q_out = fn(positions, q, k, kv_c, cos_sin, is_neox, slots, cache, scale, kv)
            ex = exact and name != "compiled_native"
            tag = f"{what}: {name} vs unfused"
            same_values(q_out, ref_q, f"{tag} (rotated q_pe)", ex)
            same_cache(cache, ref_cache, f"{tag} (kv_cache)", ex)
            if name == "fused":  # both ops rotate q_pe and k_pe in place
                same_values(k, ref_k, f"{tag} (k_pe after the call)", ex)

    # cp_gather_and_upconvert_fp8_kv_cache
    src = mla_cache(nb, bs, "fp8_ds_mla", dtype, device)
    fill_ds_mla(src, torch.bfloat16)
    for batch in (1, 3):
        table, starts = batch_tables(tokens, batch, nb, bs, device)
        ws = starts[:batch].contiguous()
        dst = fill_random(torch.empty(tokens, ENTRY, dtype=torch.bfloat16, device=device))
        ops.cp_gather_and_upconvert_fp8_kv_cache(src, dst, table, ws, batch, None)
        want = native_upconvert(src, table, ws, tokens)
        what = f"upconvert batch {batch}"
        same_values(dst, want, f"{what}: compile_ops vs eager", exact)
        if compiled:
            assert_close(compiled_upconvert(src, table, ws, tokens), want,
                         msg=f"{what}: compiled vs eager")

    # indexer_k_quant_and_cache, cp_gather_indexer_k_quant_cache
    k = indexer_keys(tokens, head_dim, dtype, device)
    slots = torch.randperm(nb * bs, device=device)[:tokens]
    for fmt in INDEXER_FMTS:
        base = fill_random(indexer_cache(nb, bs, head_dim, quant_block, device))
        ours, eager, comp = (base.clone() for _ in range(3))
        ops.indexer_k_quant_and_cache(k, ours, slots, quant_block, fmt)
        native_indexer_write(k, eager, slots, quant_block, fmt == "ue8m0")
        assert not torch.equal(eager, base), f"indexer write {fmt}: native wrote nothing"
        what = f"indexer write {fmt}"
        same_cache(ours, eager, f"{what}: compile_ops vs eager", exact, "indexer", head_dim)
        if compiled:
            compiled_indexer_write(k, comp, slots, quant_block, fmt == "ue8m0")
            same_cache(comp, eager, f"{what}: compiled vs eager", False, "indexer", head_dim)
    cache = fill_random(indexer_cache(nb, bs, head_dim, quant_block, device))
    for batch in (1, 3):
        table, cu = batch_tables(tokens, batch, nb, bs, device)
        dst_k = fill_random(torch.empty(tokens, head_dim, dtype=torch.uint8, device=device))
        dst_s = fill_random(torch.empty(tokens, head_dim // quant_block * 4, dtype=torch.uint8,
                                        device=device))
        ops.cp_gather_indexer_k_quant_cache(cache, dst_k, dst_s, table, cu)
        want = native_indexer_gather(cache, table, cu, tokens, head_dim)
        got = [("compile_ops", (dst_k, dst_s))]
        if compiled:
            got.append(("compiled", compiled_indexer_gather(cache, table, cu, tokens, head_dim)))
        for name, (gk, gs) in got:
            expect_same(gk, want[0], f"indexer gather batch {batch}: {name} dst_k vs eager")
            expect_same(gs, want[1], f"indexer gather batch {batch}: {name} dst_scale vs eager")


# ---------------------------------------------------------------------------------------------
# Timing and reports
# ---------------------------------------------------------------------------------------------
class MlaReport(harness.Report):
    """The harness's table plus the acceptance summary: `ours` at TARGET_TOKENS against the
    target and the copy_same_bytes row of that size; fused vs unfused where both ran."""

    def __init__(self, name, copy_bw, baseline, case_keys, ours="compile_ops"):
        super().__init__(name, copy_bw, baseline, case_keys)
        self.ours = ours

    def pct(self, r):
        return 100 * r.bytes / r.seconds / self.copy_bw

    def summary(self) -> list[str]:
        lines, fused_cmp, faster = [], [], True
        for key, v in self._rows().items():
            case = " ".join(f"{k}={c}" for k, c in zip(self.case_keys, key))
            r, c = v.get(self.ours), v.get("copy_same_bytes")
            if r and r.case["tokens"] == TARGET_TOKENS:
                met = "meets" if self.pct(r) >= TARGET_PCT else "BELOW"
                ref = f"; copy_same_bytes {self.pct(c):.1f}%" if c else ""
                lines.append(f"{case}: {self.ours} {self.pct(r):.1f}% of copy ({met} the "
                             f"{TARGET_PCT:.0f}% target){ref}")
            f, u = v.get("fused"), v.get("unfused")
            if f and u:
                x = u.seconds / f.seconds
                faster &= x > 1
                fused_cmp.append(f"{case}: fused x{x:.3f} vs unfused "
                                 f"({'faster' if x > 1 else 'NOT faster'})")
        if not lines:
            lines.append(f"no {TARGET_TOKENS}-token case ran: no bandwidth target check")
        if fused_cmp:
            lines += fused_cmp
            lines.append(f"fused faster than unfused at every size: {'yes' if faster else 'NO'}")
        return lines

    def markdown(self) -> str:
        notes = "\n".join(f"- {s}" for s in self.summary())
        return (super().markdown() + f"\n## Summary\n\n`copy_same_bytes`: one `dst.copy_(src)` "
                f"moving the row's bytes (read + write), the copy rate reachable at that size.\n\n"
                f"{notes}\n")


def measure_copy(rep, case, nbytes):
    """The copy_same_bytes row: dst.copy_(src) of nbytes / 2 bytes (read + write = nbytes)."""
    half = max(1, nbytes // 2)

    def make():
        src = torch.ones(half, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    rep.add(harness.measure(case, "copy_same_bytes", make, 2 * half))


def bench_write(args, dtype, copy_bw):
    bs = args.block_size
    rep = MlaReport("concat_and_cache_mla", copy_bw, "compiled_native", ["kv", "tokens"])
    scale = torch.tensor([0.1], device="cuda")
    for kv in WRITE_KV:
        nb = args.num_blocks or blocks_for(args.cache_mib, bs, entry_bytes(kv, dtype))
        cache = mla_cache(nb, bs, kv, dtype, "cuda")
        fns = {"eager_native": lambda c, p, s: native_mla_write(c, p, cache, s, scale, kv),
               "compiled_native": lambda c, p, s: compiled_mla_write(c, p, cache, s, scale, kv),
               "compile_ops": lambda c, p, s: ops.concat_and_cache_mla(c, p, cache, s, kv,
                                                                       scale)}
        for tokens in args.tokens:
            nbytes = tokens * (ENTRY * elem(dtype) + entry_bytes(kv, dtype) + 8)
            case = {"kv": kv, "tokens": tokens}
            measure_variants(rep, case, nbytes,
                             lambda: write_inputs(tokens, dtype, nb * bs, "cuda"), fns)
            measure_copy(rep, case, nbytes)
    return rep, dict(plot_x="tokens", plot_group=["kv"])


def bench_rope(args, dtype, copy_bw):
    bs, h, is_neox = args.block_size, args.heads, args.style == "neox"
    rep = MlaReport(f"concat_and_cache_mla_rope_fused ({args.style}, {h} q_pe heads)", copy_bw,
                    "unfused", ["kv", "tokens"], ours="fused")
    scale = torch.tensor([0.1], device="cuda")
    cos_sin = make_cache(args.max_position, PE, "cuda")
    for kv in ROPE_KV:
        nb = args.num_blocks or blocks_for(args.cache_mib, bs, entry_bytes(kv, dtype))
        cache = mla_cache(nb, bs, kv, dtype, "cuda")
        fns = {name: (lambda fn: lambda p, q, k, c, s: fn(p, q, k, c, cos_sin, is_neox, s, cache,
                                                          scale, kv))(fn)
               for name, fn in (("fused", fused_rope_write), ("unfused", unfused_rope_write),
                                ("eager_native", native_rope_write),
                                ("compiled_native", compiled_rope_write))}
        for tokens in args.tokens:
            nbytes = (2 * tokens * h * PE * elem(dtype)      # q_pe read + written
                      + 2 * tokens * PE * elem(dtype)        # k_pe read + written
                      + tokens * RANK * elem(dtype)          # kv_c read
                      + tokens * entry_bytes(kv, dtype)      # entries written
                      + tokens * PE * cos_sin.element_size()  # cos/sin rows
                      + tokens * (8 + 8))                    # positions, slots
            case = {"kv": kv, "tokens": tokens}
            measure_variants(rep, case, nbytes, lambda: rope_inputs(
                tokens, h, dtype, args.max_position, nb * bs, "cuda"), fns)
            measure_copy(rep, case, nbytes)
    for variants in rep._rows().values():  # the speedup over the pair, in the JSON too
        for r in variants.values():
            r.extra["x_unfused"] = variants["unfused"].seconds / r.seconds
    return rep, dict(plot_x="tokens", plot_group=["kv"])


def bench_upconvert(args, dtype, copy_bw):
    bs = args.block_size
    nb = args.num_blocks or blocks_for(args.cache_mib, bs, DS_ENTRY)
    rep = MlaReport("cp_gather_and_upconvert_fp8_kv_cache", copy_bw, "compiled_native",
                    ["kv", "tokens"])
    src = mla_cache(nb, bs, "fp8_ds_mla", dtype, "cuda")
    fill_ds_mla(src, torch.bfloat16)
    for tokens in args.tokens:
        batch = min(8, tokens)
        nbytes = tokens * (DS_ENTRY + ENTRY * 2) + index_bytes(tokens, batch, bs, batch)

        def inputs():  # block_table, workspace_starts, dst
            table, starts = batch_tables(tokens, batch, nb, bs, "cuda")
            return (table, starts[:batch].contiguous(),
                    torch.empty(tokens, ENTRY, dtype=torch.bfloat16, device="cuda"))

        case = {"kv": "fp8_ds_mla", "tokens": tokens}
        measure_variants(rep, case, nbytes, inputs, {
            "eager_native": lambda t, w, o: native_upconvert(src, t, w, tokens),
            "compiled_native": lambda t, w, o: compiled_upconvert(src, t, w, tokens),
            "compile_ops": lambda t, w, o: ops.cp_gather_and_upconvert_fp8_kv_cache(
                src, o, t, w, batch, None)})
        measure_copy(rep, case, nbytes)
    return rep, dict(plot_x="tokens", plot_group=["kv"])


def bench_indexer(args, dtype, copy_bw):
    bs, d, qb = args.block_size, args.index_head_dim, args.quant_block_size
    width = d + d // qb * 4
    nb = args.num_blocks or blocks_for(args.cache_mib, bs, width)
    rep = MlaReport(f"indexer cache ops (head_dim {d}, quant block {qb}, ue8m0)", copy_bw,
                    "compiled_native", ["op", "tokens"])
    cache = indexer_cache(nb, bs, d, qb, "cuda")
    for tokens in args.tokens:
        nbytes = tokens * (d * elem(dtype) + width + 8)
        case = {"op": "k_quant_and_cache", "tokens": tokens}
        measure_variants(rep, case, nbytes, lambda: (
            indexer_keys(tokens, d, dtype, "cuda"),
            torch.randperm(nb * bs, device="cuda")[:tokens]), {
            "eager_native": lambda k, s: native_indexer_write(k, cache, s, qb, True),
            "compiled_native": lambda k, s: compiled_indexer_write(k, cache, s, qb, True),
            "compile_ops": lambda k, s: ops.indexer_k_quant_and_cache(k, cache, s, qb,
                                                                      "ue8m0")})
        measure_copy(rep, case, nbytes)
    fill_indexer(cache, dtype, d, qb)
    for tokens in args.tokens:
        batch = min(8, tokens)
        nbytes = 2 * tokens * width + index_bytes(tokens, batch, bs, batch + 1)

        def inputs():  # block_table, cu_seq_lens, dst_k, dst_scale
            return (*batch_tables(tokens, batch, nb, bs, "cuda"),
                    torch.empty(tokens, d, dtype=torch.uint8, device="cuda"),
                    torch.empty(tokens, width - d, dtype=torch.uint8, device="cuda"))

        case = {"op": "gather", "tokens": tokens}
        measure_variants(rep, case, nbytes, inputs, {
            "eager_native": lambda t, c, k, s: native_indexer_gather(cache, t, c, tokens, d),
            "compiled_native": lambda t, c, k, s: compiled_indexer_gather(cache, t, c, tokens, d),
            "compile_ops": lambda t, c, k, s: ops.cp_gather_indexer_k_quant_cache(
                cache, k, s, t, c)})
        measure_copy(rep, case, nbytes)
    return rep, dict(plot_x="tokens", plot_group=["op"])


BENCHES = {"mla_write": bench_write, "rope_fused": bench_rope, "upconvert": bench_upconvert,
           "indexer": bench_indexer}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--section", nargs="+", default=["all"], choices=[*SECTIONS, "all"])
    p.add_argument("--tokens", type=int, nargs="+", default=DECODE + PREFILL)
    p.add_argument("--quick", action="store_true", help=f"tokens {', '.join(map(str, QUICK))}")
    p.add_argument("--heads", type=int, default=128, help="query heads of q_pe (rope_fused)")
    p.add_argument("--style", default="neox", choices=["neox", "gptj"],
                   help="rope_fused rotation (DeepSeek checkpoints use GPT-J-style pairs)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--cache-mib", type=int, default=256,
                   help="size of each cache (its block count follows from the entry size)")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="blocks of every cache (overrides --cache-mib)")
    p.add_argument("--max-position", type=int, default=8192, help="cos/sin cache rows")
    p.add_argument("--index-head-dim", type=int, default=128)
    p.add_argument("--quant-block-size", type=int, default=128)
    harness.add_common_args(p)
    args = p.parse_args()
    if args.quick:
        args.tokens = QUICK
    if args.dtype == "fp32":
        p.error("fp8_ds_mla and the upconvert take 16-bit inputs: --dtype bf16 or fp16")
    if args.index_head_dim % args.quant_block_size:
        p.error("--index-head-dim must be a multiple of --quant-block-size")
    sections = SECTIONS if "all" in args.section else args.section
    dtype, copy_bw = harness.start(args)
    if args.cpu_check:
        check("cpu", torch.bfloat16, tokens=9, heads=4, bs=4, nb=8, max_pos=64, quant_block=64,
              head_dim=128, exact=True)
        print("cpu check ok: mla variants match")
        return
    bs, most = args.block_size, 2 * max(args.tokens)
    widths = {kv: entry_bytes(kv, dtype) for kv in WRITE_KV}
    widths["indexer"] = args.index_head_dim + args.index_head_dim // args.quant_block_size * 4
    for name, width in widths.items():
        nb = args.num_blocks or blocks_for(args.cache_mib, bs, width)
        if nb * bs < most:
            p.error(f"the {name} cache ({nb} blocks of {bs}) must hold at least twice the largest "
                    f"--tokens: raise --cache-mib or --num-blocks")
    check("cuda", dtype, tokens=300, heads=args.heads, bs=bs, nb=max(8, -(-600 // bs)),
          max_pos=args.max_position, quant_block=args.quant_block_size,
          head_dim=args.index_head_dim, exact=False)
    stem, paths, reports = harness.device_stem("mla"), [], []
    for section in sections:
        rep, plot = BENCHES[section](args, dtype, copy_bw)
        paths += rep.write(args.out, f"{stem}_{section}", **plot)
        reports.append(rep)
    print("wrote", *paths)
    for rep in reports:
        print(f"{rep.name}:", *rep.summary(), sep="\n  ")


if __name__ == "__main__":
    main()
