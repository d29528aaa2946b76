"""Split-KV decode attention over vLLM's paged cache: the CUDA path of ``paged_attention_v1`` and
``paged_attention_v2`` (``compile_ops/attention.py`` holds the schemas, checks and the reference).

Two implementations, one contract (the output, v2's partition statistics, the bounds rules below):

- CUDA C++ (``csrc/include/compile_ops/decode_attention.cuh``, planned by ``plan_cuda``) for
  float16 / bfloat16 queries, head sizes that are multiples of 16 in [32, 256], pages laid out as a
  fresh cache lays them out and value rows of at least 16 bytes: one CTA of 4 warps per (sequence,
  KV head, split); each warp streams 16-token chunks through its own cp.async pipeline and
  computes them with mma.sync (for GQA groups up to 8 the query heads are the MMAs' N: S^T = K Q^T
  and O^T = V^T P^T). Splits are merged by the Triton merge kernel below, except v2's warp
  partials (one CTA per sequence and KV head, each warp writing whole partitions), which the CTA
  merges itself. On an H200 it reads bf16 K/V at 98-103% of the copy bandwidth at batch >= 32
  (bench/NOTES.md, sessions 5-6). ``COMPILE_OPS_DECODE_ATTENTION=triton`` turns it off.
- Triton (``compile_ops/_decode_attention_kernels.py``, planned by ``plan``) for everything else
  (float32 queries, head size 120, FP8 caches with blocks of 8 tokens, strided pages), as below.

The Triton kernels (issue 13, session 4):

- One program per (sequence, KV head, slice of up to 64 of its query heads, split of the
  sequence). It computes every query head of its GQA slice, so each K/V byte is read once per
  sequence, with tensor-core dots: ``S = Q K^T`` with the group as the M dimension (padded to 16),
  then ``O += P V``; softmax online (running max and sum, base 2).
- Keys come straight from the x-packed layout ``[blocks, kv_heads, head / x, block, x]``, loaded
  as ``[head / x, tokens, x]`` so that a warp's lanes run along a page's contiguous bytes (full
  128-byte lines; a ``[head, tokens]`` view put each lane on another line and saturated the L2),
  then viewed as ``[head, tokens]`` for the dot. Values ``[blocks, kv_heads, head, block]`` give
  ``[tokens, head]`` tiles, tokens contiguous within a page. A split's block ids are loaded once
  at the start; a bad page (block id outside the cache, or past the table) is read as block 0
  (inside the cache) and masked, so no table load sits between tiles and Triton's software
  pipeline (cp.async, ``num_stages``) keeps the next tiles' K/V in flight. Only the tile holding
  the sequence's end masks single tokens.
- ``P V`` uses P as two 16-bit parts (hi + lo): as exact as float32 weights, for a second
  tensor-core dot that decode's arithmetic load does not notice.
- FP8 caches (e4m3 / e5m2 codes) are converted to the query dtype in registers (exact); the
  key scale goes into the logit scale and the value scale into the output.
- The split: each program covers ``SPLIT`` tokens (a power of two, a multiple of ``BLOCK_N``,
  at most 512 so that 512-token partitions, vLLM's v2 contract, are whole numbers of splits),
  chosen on the host from batch x KV heads x max_seq_len to fill the GPU. A second program
  merges the splits (float32 partials) by their log-sum-exp, as ``merge_attn_states`` does, and
  for v2 also writes each 512-token partition's max logit, exp sum and partial output into the
  caller's ``max_logits`` / ``exp_sums`` / ``tmp_out``. When one split covers every sequence the
  first kernel writes the output itself (no merge).
- Bounds: pages past the block table or with a block id outside ``[0, num_blocks)`` are left
  out of the attention (nothing outside the cache is read); a ``seq_len`` above ``max_seq_len``
  is attended in full (the last split runs to the end of the sequence; v2's last partition then
  covers the tail).
  ``COMPILE_OPS_VALIDATE=1`` checks all three on the host and raises instead.
"""

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from compile_ops.attention import PARTITION_SIZE as PARTITION  # vLLM's v2 partition: 512

MAX_BLOCK_G = 64  # query heads per program; larger groups are sliced


@dataclass(frozen=True)
class Plan:
    """How one call is cut: tokens per program (split), splits per sequence, tile and launch."""
    block_n: int
    split: int
    nsplit: int
    block_g: int
    slices: int
    num_warps: int
    num_stages: int
    p_split: bool = True  # P V with P as two 16-bit parts (see the kernel)
    backend: str = "triton"  # or "cuda": csrc/include/compile_ops/decode_attention.cuh
    sub: int = 0  # CUDA: warp partials of `split` tokens, one CTA per sequence (Args::sub)

    @property
    def direct(self) -> bool:
        return self.nsplit == 1 and not self.sub


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan(seqs: int, heads: int, kv_heads: int, head_size: int, max_seq_len: int,
         elem_bytes: int, sms: int, *, block_n: Optional[int] = None,
         split: Optional[int] = None, waves: float = 1.0, num_warps: Optional[int] = None,
         num_stages: Optional[int] = None, p_split: bool = True) -> Plan:
    """Choose the split: the largest power-of-two split (<= 512 tokens) that still gives
    ``waves`` x SMs programs; shorter splits only when the batch is too small to fill the GPU.
    Tiles of 32 tokens, 2 warps (4 above head size 128), 2 pipeline stages (3 for FP8 caches):
    the best of bench/tune_decode_attention.py's sweep on an H200 (bench/NOTES.md). The keyword
    arguments override the choice."""
    group = heads // kv_heads
    block_g = min(max(16, triton_next_pow2(group)), MAX_BLOCK_G)
    slices = -(-group // block_g)
    d = triton_next_pow2(head_size)
    block_n = block_n or 32
    if split is None:
        split = PARTITION
        base = seqs * kv_heads * slices
        while split > block_n and base * -(-max(max_seq_len, 1) // split) < waves * sms:
            split //= 2
    split = max(split, block_n)
    nsplit = max(1, -(-max_seq_len // split))
    return Plan(block_n=block_n, split=split, nsplit=nsplit, block_g=block_g, slices=slices,
                num_warps=num_warps or (2 if d <= 128 else 4),
                num_stages=num_stages or (3 if elem_bytes == 1 else 2), p_split=p_split)


def plan_cuda(seqs: int, heads: int, kv_heads: int, max_seq_len: int, sms: int, v2: bool, *,
              split: Optional[int] = None, sub: Optional[int] = None,
              p_split: Optional[bool] = None, f16_mma: bool = False, fill: float = 0.9,
              min_ctas: int = 32) -> Plan:
    """How the CUDA kernel cuts a call (CTAs of 4 warps and 16 query heads; H200 measurements in
    bench/NOTES.md). When the (sequence, KV head, slice) pairs spread evenly over the SMs
    (``fill`` of the SMs' CTA slots busy in the last round), one CTA per pair over the whole
    sequence: no merge for v1; for v2 longer than one 512-token partition each warp writes the
    partials of its own sub-splits (``sub``: 512, 256 or 128 tokens, enough for every warp), which
    the CTA then merges itself into v2's partitions and the output, no merge kernel (GQA groups up
    to 8; larger ones take 512-token splits). Otherwise splits of
    512 tokens, halved while that leaves fewer than
    ``min_ctas`` CTAs (down to 64: a chunk of 16 tokens per warp). ``split`` / ``sub`` force a
    plan (v2 needs splits that divide 512 tokens). ``f16_mma`` (float16 queries, FP8 caches):
    P V with P as one float16 part (11 bits; bfloat16's 8 bits need the hi + lo pair)."""
    group = heads // kv_heads
    slices = -(-group // 16)
    pairs = seqs * kv_heads * slices
    length = max(max_seq_len, 1)
    if split is None and sub is None:
        per_sm = pairs / sms
        even = per_sm >= fill and per_sm / -(-pairs // sms) >= fill
        if even and v2 and length > PARTITION and group <= 8:
            sub = PARTITION if length >= 8 * PARTITION else \
                (PARTITION // 2 if length >= 4 * PARTITION else PARTITION // 4)
        elif even and (not v2 or length <= PARTITION):
            split = -(-length // 32) * 32
        else:
            split = PARTITION
            while split > 64 and pairs * -(-length // split) < min_ctas:
                split //= 2
    if sub:
        split = sub
        if group > 8:  # warp partials are the narrow kernel's: plain splits of that length
            sub = 0
    nsplit = max(1, -(-max_seq_len // split))
    if p_split is None:
        p_split = not f16_mma
    return Plan(block_n=16, split=split, nsplit=nsplit, block_g=16, slices=slices, num_warps=4,
                num_stages=0, p_split=p_split, backend="cuda",
                sub=sub if (sub and nsplit > 1) else 0)


def _cuda_ok(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
    """Whether the CUDA kernel takes this call: float16 / bfloat16 queries, head sizes that are
    multiples of 16 in [32, 256], pages as a fresh cache lays them out, 16-byte aligned, value
    rows of at least 16 bytes (FP8 with blocks of 8 tokens: Triton). COMPILE_OPS_DECODE_ATTENTION
    = triton forces the Triton kernels (cuda: the CUDA kernel wherever it applies)."""
    import os

    from compile_ops._extension import _C

    choice = os.environ.get("COMPILE_OPS_DECODE_ATTENTION", "")
    if _C is None or choice == "triton" or not query.is_cuda:
        return False
    head = query.shape[2]
    eb = key_cache.element_size()
    bs = key_cache.shape[3]
    return (query.dtype in (torch.float16, torch.bfloat16) and head % 16 == 0 and
            32 <= head <= 256 and bs * eb >= 16 and _dense_pages(key_cache, value_cache) and
            key_cache.data_ptr() % 16 == 0 and
            all((t.stride(0) * eb) % 16 == 0 and (t.stride(1) * eb) % 16 == 0
                for t in (key_cache, value_cache)))


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _kernels():
    from compile_ops import _decode_attention_kernels as k

    return k.split_kernel, k.merge_kernel


def _dense_pages(key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
    """Whether every page (a block of one KV head) is laid out as in a fresh cache, 16-byte
    aligned: then the kernel takes the inner strides as constants and tells Triton that the
    values of a page are one aligned run (its hints are trusted, so this must hold)."""
    _, _, _, bs, x = key_cache.shape
    return (key_cache.stride(3) == x and key_cache.stride(2) == bs * x and
            value_cache.stride(3) == 1 and value_cache.stride(2) == bs and
            value_cache.stride(0) % bs == 0 and value_cache.stride(1) % bs == 0 and
            value_cache.data_ptr() % 16 == 0)


_KV_CODE = {"auto": 0, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 2}


def paged_decode(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                 value_cache: torch.Tensor, num_kv_heads: int, scale: float,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
                 alibi_slopes: Optional[torch.Tensor], kv_cache_dtype: str,
                 k_scale: torch.Tensor, v_scale: torch.Tensor,
                 v2: Optional[tuple] = None, the_plan: Optional[Plan] = None) -> Plan:
    """Run the kernels (the op's checks have run). ``v2`` = (exp_sums, max_logits, tmp_out)."""
    seqs, heads, head = query.shape
    if seqs == 0:
        return None
    nb = key_cache.shape[0]
    if nb == 0:  # no cache: every token is left out
        out.zero_()
        return None
    x = key_cache.shape[4]
    bs = key_cache.shape[3]
    if out.stride(2) != 1:  # the kernels write head_size-contiguous rows
        res = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        p = paged_decode(res, query, key_cache, value_cache, num_kv_heads, scale, block_tables,
                         seq_lens, max_seq_len, alibi_slopes, kv_cache_dtype, k_scale, v_scale,
                         v2, the_plan)
        out.copy_(res)
        return p
    if v2 is not None:
        es, ml, tmp = v2
        if not (ml.stride() == es.stride() and ml.stride(2) == 1 and tmp.stride(3) == 1):
            # Work on contiguous copies (entries the kernels do not write keep their values).
            bufs = tuple(t.contiguous() for t in v2)
            p = paged_decode(out, query, key_cache, value_cache, num_kv_heads, scale,
                             block_tables, seq_lens, max_seq_len, alibi_slopes, kv_cache_dtype,
                             k_scale, v_scale, bufs, the_plan)
            for t, b in zip(v2, bufs):
                t.copy_(b)
            return p
    if block_tables.shape[1] > 1 and block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    kv = _KV_CODE[kv_cache_dtype]
    use_cuda = (the_plan.backend == "cuda") if the_plan is not None else \
        _cuda_ok(query, key_cache, value_cache)
    if use_cuda:
        p = the_plan or plan_cuda(seqs, heads, num_kv_heads, max_seq_len,
                                  _sm_count(query.device.index or 0), v2 is not None,
                                  f16_mma=query.dtype == torch.float16 or kv != 0)
    else:
        sms = _sm_count(query.device.index or 0) if query.is_cuda else 132  # interpreter: nominal
        p = the_plan or plan(seqs, heads, num_kv_heads, head, max_seq_len,
                             key_cache.element_size(), sms)
    split_kernel, merge_kernel = _kernels()
    group = heads // num_kv_heads
    block_d = triton_next_pow2(max(head, 16))
    seq_lens = seq_lens.contiguous()
    dev = query.device
    if p.direct:
        po = pm = pl = out  # unused
    else:  # float32 partials (warp partials: a scratch the CUDA kernel merges itself)
        po = torch.empty(seqs, heads, p.nsplit, head, dtype=torch.float32, device=dev)
        pm = torch.empty(seqs, heads, p.nsplit, dtype=torch.float32, device=dev)
        pl = torch.empty_like(pm)
    if v2 is not None:
        es, ml, tmp = v2
        ml_s, ml_h, tmp_s, tmp_h, tmp_p = ml.stride(0), ml.stride(1), *tmp.stride()[:3]
    else:
        es = ml = tmp = out
        ml_s = ml_h = tmp_s = tmp_h = tmp_p = 0
    alibi = alibi_slopes if alibi_slopes is not None else k_scale
    grid = (num_kv_heads * p.slices, seqs, p.nsplit)
    if use_cuda:
        assert v2 is None or p.direct or PARTITION % p.split == 0, "v2: splits must divide 512"
        from compile_ops._extension import _C

        _C.paged_decode_attention(
            out, query, key_cache, value_cache, block_tables, seq_lens, alibi_slopes,
            k_scale, v_scale, None if p.direct else po, None if p.direct else pm,
            None if p.direct else pl, *((ml, es, tmp) if v2 is not None and (p.direct or p.sub)
                                        else (None, None, None)),
            float(scale), kv, p.split, p.nsplit, num_kv_heads, p.sub, p.p_split)
    else:
        _split_triton(split_kernel, grid, query, key_cache, value_cache, block_tables, seq_lens,
                      alibi, k_scale, v_scale, out, po, pm, pl, ml, es, tmp, scale, p, nb,
                      ml_s, ml_h, tmp_s, tmp_h, tmp_p, group, heads, head, block_d, x, bs, kv,
                      alibi_slopes is not None, v2 is not None)
    if not p.direct and not (use_cuda and p.sub):  # warp partials: merged in the kernel
        assert v2 is None or PARTITION % p.split == 0, "v2 needs splits that tile 512 tokens"
        fine = PARTITION // p.split if v2 is not None else 1
        pch = max(1, min(triton_next_pow2(p.nsplit), 16) // fine)
        merge_kernel[(heads, seqs)](
            out, po, pm, pl, seq_lens, ml, es, tmp, p.nsplit,
            out.stride(0), out.stride(1), ml_s, ml_h, tmp_s, tmp_h, tmp_p,
            HEADS=heads, HEAD=head, BLOCK_D=block_d, SPLIT=p.split, PCH=pch, FINE=fine,
            V2=v2 is not None, num_warps=4)
    return p


def _split_triton(split_kernel, grid, query, key_cache, value_cache, block_tables, seq_lens,
                  alibi, k_scale, v_scale, out, po, pm, pl, ml, es, tmp, scale, p, nb,
                  ml_s, ml_h, tmp_s, tmp_h, tmp_p, group, heads, head, block_d, x, bs, kv,
                  has_alibi, is_v2):
    split_kernel[grid](
        query, key_cache, value_cache, block_tables, seq_lens, alibi, k_scale, v_scale,
        out, po, pm, pl, ml, es, tmp,
        float(scale), p.nsplit, block_tables.shape[1], nb,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        *key_cache.stride()[:4], *value_cache.stride(), block_tables.stride(0),
        ml_s, ml_h, tmp_s, tmp_h, tmp_p,
        GROUP=group, BLOCK_G=p.block_g, SLICES=p.slices, HEADS=heads, HEAD=head,
        BLOCK_D=block_d, X=x, BS=bs, BLOCK_N=p.block_n, SPLIT=p.split, KV=kv,
        HAS_ALIBI=has_alibi, DIRECT=p.direct, V2=is_v2,
        DENSE=_dense_pages(key_cache, value_cache), DPAD=block_d != head,
        IEEE=query.dtype == torch.float32, PSPLIT=p.p_split,
        num_warps=p.num_warps, num_stages=p.num_stages)


def validate(op: str, block_tables: torch.Tensor, seq_lens: torch.Tensor,
             max_seq_len: Optional[int], num_blocks: int, block_size: int) -> None:
    """The host-side index checks (the reference always runs them; the CUDA path under
    COMPILE_OPS_VALIDATE=1): every seq_len <= max_seq_len (unless None), every sequence within
    its block-table row, every block id it uses inside the cache. Raises before anything is
    written."""
    from compile_ops import _checks as C

    lens = seq_lens.long().clamp(min=0)
    if lens.numel() == 0:
        return
    longest = int(lens.max())
    if max_seq_len is not None and longest > max_seq_len:
        s = int(torch.argmax((lens > max_seq_len).int()))
        C.fail(op, f"seq_lens[{s}] = {int(lens[s])} is above max_seq_len = {max_seq_len}")
    cols_needed = -(-longest // block_size)
    if cols_needed > block_tables.shape[1]:
        C.fail(op, f"a sequence of {longest} tokens needs {cols_needed} block-table columns, "
                   f"block_tables has {block_tables.shape[1]}", IndexError)
    if cols_needed == 0:
        return
    used = torch.arange(cols_needed, device=lens.device)[None, :] < \
        ((lens + block_size - 1) // block_size)[:, None]
    blk = block_tables[:, :cols_needed].long()
    bad = used & ((blk < 0) | (blk >= num_blocks))
    if bool(bad.any()):
        b = int(blk[bad][0])
        C.fail(op, f"block_tables holds block {b}, outside the cache's {num_blocks} blocks",
               IndexError)


def static_plan(batch: int, heads: int, kv_heads: int, head: int, max_len: int,
                elem_bytes: int, sms: int, **kw) -> Plan:
    """``static_decode``'s plan: splits up to the whole cache (no 512-token cap: there is no v2
    contract here; one split per sequence needs no merge), halved while that gives fewer
    programs than SMs over max_cache_len (only the slots below seq_lens have work, and the graph
    does not know how many there are), but not below 512 tokens once the batch alone fills a
    quarter of the SMs; 16-bit caches with heads up to 128: tiles of 64 tokens, 4 warps, 3
    stages. From ``bench_static_cache.py --tune`` on the H200 (bench/NOTES.md,
    session 9): at 4096 slots, 2048 used, bf16, 32/8 heads of 128, this picks the best or
    within 6% of the best of 24 plans at batch 1, 8 and 32. Keywords go to ``plan``."""
    if "split" not in kw:
        base = batch * kv_heads * -(-(heads // kv_heads) // MAX_BLOCK_G)
        split = max(triton_next_pow2(max_len), 64)
        # Splits of at least 512 tokens once the (sequence, KV head) pairs alone fill a quarter
        # of the SMs: shorter ones cost more in partials and merging than they gain (H100,
        # session 10: 8 x 512 slots, split 128 -> 512: 10.0 -> 8.1 us)
        floor = 512 if base * 4 >= sms else 64
        while split > floor and base * -(-max_len // split) < sms:
            split //= 2
        kw["split"] = split
    if elem_bytes == 2 and head <= 128:
        kw.setdefault("block_n", 64)
        kw.setdefault("num_warps", 4)
        kw.setdefault("num_stages", 3)
    return plan(batch, heads, kv_heads, head, max_len, elem_bytes, sms, **kw)


# Splits up to which the last split program of a sequence merges the partials itself (one
# launch, no merge kernel); more splits go to merge_kernel, whose wide loads merge them faster.
# COMPILE_OPS_STATIC_MERGE=kernel / fused forces either.
FUSED_MERGE_MAX_SPLITS = 16
_COUNTERS: dict = {}


def _fused_merge_ok(p: Plan) -> bool:
    import os

    choice = os.environ.get("COMPILE_OPS_STATIC_MERGE", "")
    if choice == "kernel":
        return False
    return choice == "fused" or p.nsplit <= FUSED_MERGE_MAX_SPLITS


def _merge_counters(device: torch.device, n: int) -> Optional[torch.Tensor]:
    """Zeroed int32 counters for the fused merge, one per (sequence, KV head slice), kept per
    device and stream (the kernels leave them zero; two streams never share one). None when
    a larger buffer would have to be allocated while a CUDA graph is being captured (the merge
    kernel then runs instead)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if device.type != "cuda":
            buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        elif torch.cuda.is_current_stream_capturing():
            return None
        else:
            buf = _zeros_outside_graph_pools(max(n, 4096), device)
        _COUNTERS[key] = buf
    return buf


def _zeros_outside_graph_pools(n: int, device: torch.device) -> torch.Tensor:
    """torch.zeros made on another thread, then synchronized: Inductor's CUDA-graph trees
    send every allocation of the warming-up thread to the graph's private pool, where a buffer
    that outlives the step is refused ("tensors in the cudagraph pool not tracked as
    outputs"). The counters are kept for the process, so they come from the ordinary pool."""
    import threading

    box = []

    def make():
        with torch.cuda.device(device):
            box.append(torch.zeros(n, dtype=torch.int32, device=device))
            torch.cuda.synchronize(device)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    if not box:
        raise RuntimeError("compile_ops: could not allocate the static decode merge counters")
    return box[0]


def static_decode(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                  value_cache: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                  the_plan: Optional[Plan] = None, *, attn_mask: Optional[torch.Tensor] = None,
                  seq_starts: Optional[torch.Tensor] = None,
                  mask_dense: Optional[torch.Tensor] = None) -> Optional[Plan]:
    """``static_cache_attention``'s CUDA path (its checks have run): ``static_split_kernel`` over
    [batch, kv_heads, max_cache_len, head] caches, cut by ``plan`` as a paged cache of
    max_cache_len tokens per sequence would be. When a sequence has more than one split, the last
    split program to finish merges the partials (up to FUSED_MERGE_MAX_SPLITS splits: one
    launch), or ``merge_kernel`` does. The plan depends only on shapes (the lengths, starts and mask stay on the
    device). ``attn_mask`` (broadcastable to [batch, heads, 1, max_cache_len], bool or float) is
    read through its broadcast strides; ``seq_starts`` moves each sequence's first slot."""
    from compile_ops import _decode_attention_kernels as k

    batch, heads, head = query.shape
    kv_heads, max_len = key_cache.shape[1], key_cache.shape[2]
    if batch == 0:
        return None
    if max_len == 0:
        out.zero_()
        return None
    if out.stride(2) != 1 and head > 1:  # the kernels write head_size-contiguous rows
        res = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        p = static_decode(res, query, key_cache, value_cache, seq_lens, scale, the_plan,
                          attn_mask=attn_mask, seq_starts=seq_starts, mask_dense=mask_dense)
        out.copy_(res)
        return p
    if query.stride(2) != 1 and head > 1:
        query = query.contiguous()
    seq_lens = seq_lens.contiguous()  # the kernels read element b at offset b
    if seq_starts is not None:
        seq_starts = seq_starts.contiguous()
    if attn_mask is None:
        mask_dense = None  # nothing to skip
    if mask_dense is not None:
        mask_dense = mask_dense.contiguous().view(torch.uint8)
    sms = _sm_count(query.device.index or 0) if query.is_cuda else 132  # interpreter: nominal
    p = the_plan or static_plan(batch, heads, kv_heads, head, max_len,
                                key_cache.element_size(), sms)
    block_d = triton_next_pow2(max(head, 16))
    dev = query.device
    if p.direct:
        po = pm = pl = out  # unused
    else:
        po = torch.empty(batch, heads, p.nsplit, head, dtype=torch.float32, device=dev)
        pm = torch.empty(batch, heads, p.nsplit, dtype=torch.float32, device=dev)
        pl = torch.empty_like(pm)
    if attn_mask is not None:
        m4 = attn_mask
        while m4.dim() < 4:
            m4 = m4.unsqueeze(0)
        m4 = m4.expand(batch, heads, 1, max_len)
        if m4.dtype == torch.bool:
            m4 = m4.view(torch.uint8)  # the kernel reads bytes (nonzero: attend)
        m_b, m_h, m_l = m4.stride(0), m4.stride(1), m4.stride(3)
        mask_heads = m_h != 0 and heads > 1
    else:
        m4, m_b, m_h, m_l, mask_heads = seq_lens, 0, 0, 0, False
    starts = seq_starts if seq_starts is not None else seq_lens
    cnt = None
    if not p.direct and _fused_merge_ok(p):
        cnt = _merge_counters(dev, batch * kv_heads * p.slices)
    k.static_split_kernel[(kv_heads * p.slices, batch, p.nsplit)](
        query, key_cache, value_cache, seq_lens, starts, m4,
        mask_dense if mask_dense is not None else seq_lens, out, po, pm, pl,
        cnt if cnt is not None else seq_lens, float(scale), p.nsplit, max_len, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), m_b, m_h, m_l,
        GROUP=heads // kv_heads, BLOCK_G=p.block_g, SLICES=p.slices, HEADS=heads, HEAD=head,
        BLOCK_D=block_d, BLOCK_N=p.block_n, SPLIT=p.split, DIRECT=p.direct,
        DPAD=block_d != head, IEEE=query.dtype == torch.float32, PSPLIT=p.p_split,
        HAS_START=seq_starts is not None, HAS_MASK=attn_mask is not None,
        MASK_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool,
        MASK_HEADS=mask_heads, HAS_DENSE=mask_dense is not None, FUSED_MERGE=cnt is not None,
        num_warps=p.num_warps,
        num_stages=p.num_stages)
    if not p.direct and cnt is None:
        pch = max(1, min(triton_next_pow2(p.nsplit), 16))
        k.merge_kernel[(heads, batch)](
            out, po, pm, pl, seq_lens, out, out, out, p.nsplit,
            out.stride(0), out.stride(1), 0, 0, 0, 0, 0,
            HEADS=heads, HEAD=head, BLOCK_D=block_d, SPLIT=p.split, PCH=pch, FINE=1,
            V2=False, num_warps=4)
    return p
