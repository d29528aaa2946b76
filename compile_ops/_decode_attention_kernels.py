"""Triton kernels of the split-KV decode attention (see compile_ops/decode_attention.py, which
chooses the plan and launches them). Imported lazily: the CPU-only package never needs Triton."""

import triton
import triton.language as tl


@triton.jit
def tile(q, m_i, l_i, acc, t0, blk, end, length, num_blocks, KC, VC, k_off,
         v_off, kc_b, kc_p, vc_b, vc_p, qk_scale, slope, dmask,
         X: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ALIBI: tl.constexpr,
         KV: tl.constexpr, DENSE: tl.constexpr, DPAD: tl.constexpr, IEEE: tl.constexpr,
         PSPLIT: tl.constexpr, HEAD: tl.constexpr, BLOCK_D: tl.constexpr, TAIL: tl.constexpr):
    """One tile of BLOCK_N tokens from t0 (blk: each token's block-table entry, -1 past the
    table): logits, online softmax, P V. Tokens of a page share its block id, so the page
    validity is constant over runs of BS tokens; only the TAIL tile (the one holding the
    sequence's end) masks single tokens."""
    tok = t0 + tl.arange(0, BLOCK_N)
    page_ok = (blk >= 0) & (blk < num_blocks)
    blk = tl.where(page_ok, blk, 0).to(tl.int64)  # block 0 is inside the cache: never out
    off = tok % BS
    if DENSE:  # inner strides as constants, runs of BS tokens: 16-byte value loads
        # Keys as [head / X, tokens, X]: Triton then puts a warp's lanes along the tokens of one
        # 16-byte chunk, i.e. along a page's contiguous bytes (full 128-byte lines per request;
        # a [head, tokens] pointer tensor spreads a warp over 16 lines, one sector each, which
        # saturated the L2 at 56% of DRAM bandwidth). Permuted to [head, tokens] for the dot.
        c3 = tl.arange(0, BLOCK_D // X)[:, None, None]
        k3_ptr = KC + k_off + c3 * (BS * X) + (blk * kc_b + off * X)[None, :, None] + \
            tl.arange(0, X)[None, None, :]
        v_idx = v_off + (blk * vc_b + off)[:, None]
        v_idx = tl.max_contiguous(tl.multiple_of(v_idx, [BS, 1]), [BS, 1])
    else:
        k_ptr = KC + k_off + (blk * kc_b + off * kc_p)[None, :]
        v_idx = v_off + (blk * vc_b + off * vc_p)[:, None]
    v_mask = tl.max_constancy(page_ok[:, None], [BS, 1])  # bad pages read as zeros
    if DENSE:
        if DPAD:
            k3 = tl.load(k3_ptr, mask=c3 < HEAD // X, other=0)
        else:
            k3 = tl.load(k3_ptr)
        k = tl.reshape(tl.permute(k3, (0, 2, 1)), (BLOCK_D, BLOCK_N))
    elif DPAD:
        k = tl.load(k_ptr, mask=dmask[:, None], other=0)
    else:
        k = tl.load(k_ptr)
    if DPAD:  # head size not a power of two: the padding dimensions are not read
        v = tl.load(VC + v_idx, mask=v_mask & dmask[None, :], other=0)
    else:
        v = tl.load(VC + v_idx, mask=v_mask, other=0)
    if KV == 1:
        k = k.to(tl.float8e4nv, bitcast=True).to(q.dtype)
        v = v.to(tl.float8e4nv, bitcast=True).to(q.dtype)
    elif KV == 2:
        k = k.to(tl.float8e5, bitcast=True).to(q.dtype)
        v = v.to(tl.float8e5, bitcast=True).to(q.dtype)
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * qk_scale
    if HAS_ALIBI:
        s += slope[:, None] * (tok - length + 1).to(tl.float32)[None, :]
    valid = page_ok
    if TAIL:
        valid = valid & (tok < end)
        v = tl.where((tok < end)[:, None], v, 0.0)  # stale values past the end may be NaN
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    elif not PSPLIT:
        acc = tl.dot(p.to(v.dtype), v, acc)
    else:
        # P in two 16-bit parts (hi + lo): P V as exact as with float32 weights (one part alone
        # loses ~2**-9 of each weight, which values with cancelling signs turn into visible
        # output error); the second tensor-core dot costs nothing at decode's arithmetic load.
        p_hi = p.to(v.dtype)
        acc = tl.dot(p_hi, v, acc)
        acc = tl.dot((p - p_hi.to(tl.float32)).to(v.dtype), v, acc)
    return m_new, l_i, acc


@triton.jit
def _tile_blocks(pblk, rows, i, PAGES: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row i of the preloaded [TILES, PAGES] block ids, one entry per token: [BLOCK_N]."""
    page = tl.sum(tl.where(rows == i, pblk, 0), axis=0)
    return tl.reshape(tl.broadcast_to(page[:, None], (PAGES, BS)), (BLOCK_N,))


@triton.jit(do_not_specialize=["nsplit", "bt_cols", "num_blocks", "q_s", "o_s", "bt_s",
                               "ml_s", "ml_h", "tmp_s", "tmp_h"])
def split_kernel(Q, KC, VC, BT, LENS, ALIBI, KS, VS, OUT, PO, PM, PL, ML, ES, TMP,
                 scale, nsplit, bt_cols, num_blocks,
                 q_s, q_h, o_s, o_h, kc_b, kc_h, kc_c, kc_p, vc_b, vc_h, vc_d, vc_p, bt_s,
                 ml_s, ml_h, tmp_s, tmp_h, tmp_p,
                 GROUP: tl.constexpr, BLOCK_G: tl.constexpr, SLICES: tl.constexpr,
                 HEADS: tl.constexpr, HEAD: tl.constexpr, BLOCK_D: tl.constexpr,
                 X: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                 SPLIT: tl.constexpr, KV: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 DIRECT: tl.constexpr, V2: tl.constexpr, DENSE: tl.constexpr,
                 DPAD: tl.constexpr, IEEE: tl.constexpr, PSPLIT: tl.constexpr):
    TILES: tl.constexpr = SPLIT // BLOCK_N
    PAGES: tl.constexpr = BLOCK_N // BS
    pid = tl.program_id(0)
    kvh = pid // SLICES
    g0 = (pid % SLICES) * BLOCK_G
    seq = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    length = tl.maximum(tl.load(LENS + seq), 0)
    start = split * SPLIT
    if DIRECT:
        end = length  # one split: the whole sequence, however long
    else:
        end = tl.where(split == nsplit - 1, length, tl.minimum(length, start + SPLIT))
    # Programs past the sequence have nothing to do (DIRECT: the output is still written,
    # zeros for an empty sequence).
    if start < length + (1 if DIRECT else 0):
        g = tl.arange(0, BLOCK_G)
        gmask = (g0 + g) < GROUP
        head_idx = kvh * GROUP + g0 + g
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD
        q = tl.load(Q + seq * q_s + head_idx[:, None] * q_h + d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)
        qk_scale = scale * 1.4426950408889634  # exp2 of log2(e) * x = exp(x)
        if KV != 0:
            qk_scale = qk_scale * tl.load(KS)
        slope = tl.zeros([BLOCK_G], tl.float32)
        if HAS_ALIBI:
            slope = tl.load(ALIBI + head_idx, mask=gmask, other=0.0) * 1.4426950408889634
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        if DENSE:
            k_off = kvh.to(tl.int64) * kc_h
            v_off = kvh.to(tl.int64) * vc_h + d[None, :] * BS
        else:
            k_off = kvh.to(tl.int64) * kc_h + (d // X)[:, None] * kc_c + (d % X)[:, None]
            v_off = kvh.to(tl.int64) * vc_h + d[None, :] * vc_d
        bt_row = BT + seq * bt_s
        # The block ids of this split's pages, loaded once: [TILES, PAGES]. Each tile takes its
        # row in registers, so no table load sits between one tile and the next tile's K/V
        # loads, and Triton's pipeline can issue those loads stages ahead.
        pcol = start // BS + tl.arange(0, TILES)[:, None] * PAGES + tl.arange(0, PAGES)[None, :]
        pblk = tl.load(bt_row + pcol, mask=(pcol < bt_cols) & (pcol * BS < end), other=-1)
        rows = tl.arange(0, TILES)[:, None]
        in_split = tl.minimum(end, start + SPLIT)
        n_full = (in_split - start) // BLOCK_N
        for i in range(0, n_full):
            t0 = tl.multiple_of(start + i * BLOCK_N, BLOCK_N)
            blk = _tile_blocks(pblk, rows, i, PAGES, BS, BLOCK_N)
            m_i, l_i, acc = tile(q, m_i, l_i, acc, t0, blk, end, length, num_blocks, KC, VC,
                                 k_off, v_off, kc_b, kc_p, vc_b, vc_p, qk_scale, slope, dmask,
                                 X, BS, BLOCK_N, HAS_ALIBI, KV, DENSE, DPAD, IEEE, PSPLIT,
                                 HEAD, BLOCK_D, False)
        if start + n_full * BLOCK_N < in_split:  # the tile holding the sequence's end
            t0 = tl.multiple_of(start + n_full * BLOCK_N, BLOCK_N)
            blk = _tile_blocks(pblk, rows, n_full, PAGES, BS, BLOCK_N)
            m_i, l_i, acc = tile(q, m_i, l_i, acc, t0, blk, end, length, num_blocks, KC, VC,
                                 k_off, v_off, kc_b, kc_p, vc_b, vc_p, qk_scale, slope, dmask,
                                 X, BS, BLOCK_N, HAS_ALIBI, KV, DENSE, DPAD, IEEE, PSPLIT,
                                 HEAD, BLOCK_D, True)
        # Only a seq_len above max_seq_len runs past the split (attended in full, the table read
        # tile by tile).
        for t0 in tl.range(start + SPLIT, end, BLOCK_N, num_stages=1):
            t0 = tl.multiple_of(t0, BLOCK_N)
            col = (t0 + tl.arange(0, BLOCK_N)) // BS
            blk = tl.load(bt_row + col, mask=col < bt_cols, other=-1)
            m_i, l_i, acc = tile(q, m_i, l_i, acc, t0, blk, end, length, num_blocks, KC, VC,
                                 k_off, v_off, kc_b, kc_p, vc_b, vc_p, qk_scale, slope, dmask,
                                 X, BS, BLOCK_N, HAS_ALIBI, KV, DENSE, DPAD, IEEE, PSPLIT,
                                 HEAD, BLOCK_D, True)
        if KV != 0:
            acc = acc * tl.load(VS)
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        m_nat = m_i * 0.6931471805599453  # back to natural-log units (the reference's)
        omask = gmask[:, None] & dmask[None, :]
        if DIRECT:
            tl.store(OUT + seq * o_s + head_idx[:, None] * o_h + d[None, :],
                     o.to(OUT.dtype.element_ty), mask=omask)
            if V2:  # partition 0 of v2's buffers, when the sequence has tokens
                has = gmask & (length > 0)
                sm = seq * ml_s + head_idx * ml_h
                tl.store(ML + sm, tl.where(m_i == float("-inf"), 0.0, m_nat), mask=has)
                tl.store(ES + sm, l_i, mask=has)
                tl.store(TMP + seq * tmp_s + head_idx[:, None] * tmp_h + d[None, :],
                         o.to(TMP.dtype.element_ty), mask=omask & (length > 0))
        else:
            row = (seq * HEADS + head_idx) * nsplit + split  # [seqs, heads, nsplit]
            tl.store(PM + row, m_i, mask=gmask)  # base 2: the logits as computed
            tl.store(PL + row, l_i, mask=gmask)
            tl.store(PO + row[:, None] * HEAD + d[None, :], o, mask=omask)

@triton.jit(do_not_specialize=["nsplit", "o_s", "ml_s", "ml_h", "tmp_s", "tmp_h"])
def merge_kernel(OUT, PO, PM, PL, LENS, ML, ES, TMP, nsplit,
                 o_s, o_h, ml_s, ml_h, tmp_s, tmp_h, tmp_p,
                 HEADS: tl.constexpr, HEAD: tl.constexpr, BLOCK_D: tl.constexpr,
                 SPLIT: tl.constexpr, PCH: tl.constexpr, FINE: tl.constexpr,
                 V2: tl.constexpr):
    """Merges a head's split partials: PM holds each split's max logit in base 2 (the logits as
    the split kernels computed them, so max differences need no rounded ln 2 conversion: with
    |logits| ~ 300 (ALiBi) that conversion alone moved float32 outputs by ~2e-5), PL its exp
    sum, PO its normalized output; v2's max_logits come out in natural-log units."""
    h = tl.program_id(0).to(tl.int64)
    seq = tl.program_id(1).to(tl.int64)
    length = tl.maximum(tl.load(LENS + seq), 0)
    # Partials written for this sequence: min(cdiv(length, SPLIT), nsplit), with the length
    # capped first (an int32 seq_len near 2**31 would overflow length + SPLIT - 1).
    n = tl.cdiv(tl.minimum(length, nsplit * SPLIT), SPLIT)
    base = (seq * HEADS + h) * nsplit
    pp = tl.arange(0, PCH)
    ff = tl.arange(0, FINE)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD
    big_m = tl.max(tl.full([PCH], float("-inf"), tl.float32), 0)  # a float32 scalar
    big_l = tl.sum(tl.zeros([PCH], tl.float32), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, n, PCH * FINE):
        idx = c0 + pp[:, None] * FINE + ff[None, :]  # [PCH, FINE]: PCH partitions of FINE
        mask = idx < n
        m = tl.load(PM + base + idx, mask=mask, other=float("-inf"))
        lv = tl.load(PL + base + idx, mask=mask, other=0.0)
        o = tl.load(PO + (base + idx)[:, :, None] * HEAD + d[None, None, :],
                    mask=mask[:, :, None] & dmask[None, None, :], other=0.0)
        if V2:  # each 512-token partition's own statistics, the way the reference has them
            mp = tl.max(m, 1)
            mp0 = tl.where(mp == float("-inf"), 0.0, mp)
            wp = lv * tl.math.exp2(m - mp0[:, None])
            lp = tl.sum(wp, 1)
            op = tl.sum(wp[:, :, None] * o, 1) / tl.where(lp > 0.0, lp, 1.0)[:, None]
            part = c0 // FINE + pp
            has = part * FINE < n
            sm = seq * ml_s + h * ml_h + part
            tl.store(ML + sm, mp0 * 0.6931471805599453, mask=has)  # natural-log units
            tl.store(ES + sm, lp, mask=has)
            tl.store(TMP + seq * tmp_s + h * tmp_h + part[:, None] * tmp_p + d[None, :],
                     op.to(TMP.dtype.element_ty), mask=has[:, None] & dmask[None, :])
        m_new = tl.maximum(big_m, tl.max(tl.max(m, 1), 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(big_m - m_use)
        w = lv * tl.math.exp2(m - m_use)
        big_l = big_l * alpha + tl.sum(tl.sum(w, 1), 0)
        acc = acc * alpha + tl.sum(tl.sum(w[:, :, None] * o, 1), 0)
        big_m = m_new
    o = acc / tl.where(big_l > 0.0, big_l, 1.0)
    tl.store(OUT + seq * o_s + h * o_h + d, o.to(OUT.dtype.element_ty), mask=dmask)


# ---------------------------------------------------------------------------------------------
# Static (dense) caches: [batch, kv_heads, max_cache_len, head] keys and values (issue 16).


@triton.jit
def _static_tile(q, m_i, l_i, acc, tok, k_base, v_base, kc_p, vc_p, end, qk_scale, d, dmask,
                 m_base, m_h, m_l, g_idx, gmask,
                 DPAD: tl.constexpr, IEEE: tl.constexpr, PSPLIT: tl.constexpr,
                 TAIL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                 MASK_HEADS: tl.constexpr):
    """One tile of BLOCK_N tokens `tok` of one sequence and KV head: logits, online softmax,
    P V. Full tiles load without a token mask; the TAIL tile (the one holding the range's end)
    masks the loads, so no slot at or past `end` is read (stale ones may be NaN, and past
    max_cache_len there is no memory). HAS_MASK: the caller's attention mask for these slots
    (bool: keep where nonzero; float: added to the logits), one row for every head of the group
    unless MASK_HEADS (a mask that differs between heads)."""
    k_ptr = k_base + d[:, None] + tok[None, :].to(tl.int64) * kc_p  # [BLOCK_D, BLOCK_N]
    v_ptr = v_base + tok[:, None].to(tl.int64) * vc_p + d[None, :]  # [BLOCK_N, BLOCK_D]
    tmask = tok < end
    if TAIL:
        k = tl.load(k_ptr, mask=tmask[None, :] & dmask[:, None], other=0.0)
        v = tl.load(v_ptr, mask=tmask[:, None] & dmask[None, :], other=0.0)
    elif DPAD:
        k = tl.load(k_ptr, mask=dmask[:, None], other=0.0)
        v = tl.load(v_ptr, mask=dmask[None, :], other=0.0)
    else:
        k = tl.load(k_ptr)
        v = tl.load(v_ptr)
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * qk_scale
    if HAS_MASK:
        if MASK_HEADS:
            mp = m_base + g_idx[:, None] * m_h + tok[None, :].to(tl.int64) * m_l
            if TAIL:
                mk = tl.load(mp, mask=gmask[:, None] & tmask[None, :], other=0)
            else:
                mk = tl.load(mp, mask=gmask[:, None], other=0)
        else:
            mp = m_base + tok.to(tl.int64) * m_l
            if TAIL:
                mk = tl.load(mp, mask=tmask, other=0)[None, :]
            else:
                mk = tl.load(mp)[None, :]
        if MASK_BOOL:
            s = tl.where(mk != 0, s, float("-inf"))
        else:  # natural-log units added before the base-2 softmax; clamped at -1e38 so that
            # a finite minimum (float32's -3.4e38) times log2(e) stays finite: a row masked
            # everywhere by it averages V, as SDPA does, instead of giving zeros
            mf = mk.to(tl.float32)  # -inf stays -inf (a head masked everywhere gives zeros)
            s = s + tl.where(mf == float("-inf"), mf, tl.maximum(mf, -1e38)) * \
                1.4426950408889634
    if TAIL:
        s = tl.where(tmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    elif not PSPLIT:
        acc = tl.dot(p.to(v.dtype), v, acc)
    else:  # P as two 16-bit parts, as in `tile`
        p_hi = p.to(v.dtype)
        acc = tl.dot(p_hi, v, acc)
        acc = tl.dot((p - p_hi.to(tl.float32)).to(v.dtype), v, acc)
    return m_new, l_i, acc


@triton.jit
def _static_range(q, m_i, l_i, acc, lo, hi, k_base, v_base, kc_p, vc_p, qk_scale, d, dmask,
                  m_base, m_h, m_l, head_idx, gmask, BLOCK_N: tl.constexpr, DPAD: tl.constexpr,
                  IEEE: tl.constexpr, PSPLIT: tl.constexpr, HAS_MASK: tl.constexpr,
                  MASK_BOOL: tl.constexpr, MASK_HEADS: tl.constexpr):
    """Tokens [lo, hi) of one sequence and KV head, tile by tile (the last one masked)."""
    n_full = (hi - lo) // BLOCK_N
    for i in range(0, n_full):
        tok = lo + i * BLOCK_N + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _static_tile(q, m_i, l_i, acc, tok, k_base, v_base, kc_p, vc_p, hi,
                                     qk_scale, d, dmask, m_base, m_h, m_l, head_idx, gmask,
                                     DPAD, IEEE, PSPLIT, False, HAS_MASK, MASK_BOOL, MASK_HEADS)
    if lo + n_full * BLOCK_N < hi:
        tok = lo + n_full * BLOCK_N + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _static_tile(q, m_i, l_i, acc, tok, k_base, v_base, kc_p, vc_p, hi,
                                     qk_scale, d, dmask, m_base, m_h, m_l, head_idx, gmask,
                                     DPAD, IEEE, PSPLIT, True, HAS_MASK, MASK_BOOL, MASK_HEADS)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["nsplit", "q_s", "q_h", "o_s", "o_h", "m_b", "m_h"])
def static_split_kernel(Q, KC, VC, LENS, STARTS, MASK, DENSE, OUT, PO, PM, PL, CNT, scale,
                        nsplit,
                        max_len, q_s, q_h, o_s, o_h, kc_b, kc_h, kc_p, vc_b, vc_h, vc_p, m_b, m_h,
                        m_l,
                        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, SLICES: tl.constexpr,
                        HEADS: tl.constexpr, HEAD: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DIRECT: tl.constexpr,
                        DPAD: tl.constexpr, IEEE: tl.constexpr, PSPLIT: tl.constexpr,
                        HAS_START: tl.constexpr, HAS_MASK: tl.constexpr,
                        MASK_BOOL: tl.constexpr, MASK_HEADS: tl.constexpr,
                        HAS_DENSE: tl.constexpr, FUSED_MERGE: tl.constexpr):
    """Program (KV head x slice, sequence, split): the split's tokens of one sequence for every
    query head of the slice. The sequence reads slots [start, length): length = seq_lens clamped
    into [0, max_len], start = seq_starts clamped into [0, length] (0 without seq_starts). A
    split before the start writes an empty partial (the merge reads every split below the
    length). HAS_DENSE: DENSE[seq] nonzero says the mask lets every slot of the range through
    for every head, and the sequence is computed without reading it. FUSED_MERGE: no merge kernel; the split programs of a (sequence, KV head slice)
    count themselves in CNT (int32, zero between calls) and the last to finish merges their
    partials into the output and sets the count back to zero."""
    pid = tl.program_id(0)
    kvh = pid // SLICES
    g0 = (pid % SLICES) * BLOCK_G
    seq = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    length = tl.minimum(tl.maximum(tl.load(LENS + seq), 0), max_len).to(tl.int32)
    start = split * SPLIT
    end = tl.minimum(length, start + SPLIT)
    lo = start
    if HAS_START:
        first = tl.minimum(tl.maximum(tl.load(STARTS + seq), 0), length).to(tl.int32)
        lo = tl.maximum(start, first)
    hi = tl.maximum(end, lo)
    if start < length + (1 if DIRECT else 0):  # DIRECT writes zeros for an empty sequence
        g = tl.arange(0, BLOCK_G)
        gmask = (g0 + g) < GROUP
        head_idx = kvh * GROUP + g0 + g
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD
        q = tl.load(Q + seq * q_s + head_idx[:, None] * q_h + d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)
        qk_scale = scale * 1.4426950408889634  # exp2 of log2(e) * x = exp(x)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        k_base = KC + seq * kc_b + kvh.to(tl.int64) * kc_h
        v_base = VC + seq * vc_b + kvh.to(tl.int64) * vc_h
        m_base = MASK + seq * m_b  # without MASK_HEADS the mask is one row for every head
        if HAS_DENSE:  # a sequence whose mask lets its whole range through: not read
            if tl.load(DENSE + seq) != 0:
                m_i, l_i, acc = _static_range(q, m_i, l_i, acc, lo, hi, k_base, v_base, kc_p,
                                              vc_p, qk_scale, d, dmask, m_base, m_h, m_l,
                                              head_idx, gmask, BLOCK_N, DPAD, IEEE, PSPLIT,
                                              False, MASK_BOOL, MASK_HEADS)
            else:
                m_i, l_i, acc = _static_range(q, m_i, l_i, acc, lo, hi, k_base, v_base, kc_p,
                                              vc_p, qk_scale, d, dmask, m_base, m_h, m_l,
                                              head_idx, gmask, BLOCK_N, DPAD, IEEE, PSPLIT,
                                              HAS_MASK, MASK_BOOL, MASK_HEADS)
        else:
            m_i, l_i, acc = _static_range(q, m_i, l_i, acc, lo, hi, k_base, v_base, kc_p, vc_p,
                                          qk_scale, d, dmask, m_base, m_h, m_l, head_idx, gmask,
                                          BLOCK_N, DPAD, IEEE, PSPLIT, HAS_MASK, MASK_BOOL,
                                          MASK_HEADS)
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        omask = gmask[:, None] & dmask[None, :]
        if DIRECT:
            tl.store(OUT + seq * o_s + head_idx[:, None] * o_h + d[None, :],
                     o.to(OUT.dtype.element_ty), mask=omask)
        else:
            row = (seq * HEADS + head_idx) * nsplit + split  # [seqs, heads, nsplit]
            tl.store(PM + row, m_i, mask=gmask)  # base 2, as merge_kernel takes them
            tl.store(PL + row, l_i, mask=gmask)
            tl.store(PO + row[:, None] * HEAD + d[None, :], o, mask=omask)
            if FUSED_MERGE:
                # Splits with work: those starting below the length (the others return early).
                n_act = tl.cdiv(length, SPLIT)
                cnt = CNT + seq * tl.num_programs(0) + pid
                tl.debug_barrier()  # every thread's partial stores before the release below
                done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
                if done == n_act - 1:  # the last split of this (sequence, slice): merge
                    base = (seq * HEADS + head_idx) * nsplit
                    big_m = tl.full([BLOCK_G], float("-inf"), tl.float32)
                    big_l = tl.zeros([BLOCK_G], tl.float32)
                    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
                    for j in range(0, n_act):
                        pm = tl.load(PM + base + j, mask=gmask, other=float("-inf"),
                                     cache_modifier=".cg")
                        pl = tl.load(PL + base + j, mask=gmask, other=0.0, cache_modifier=".cg")
                        po = tl.load(PO + (base + j)[:, None] * HEAD + d[None, :], mask=omask,
                                     other=0.0, cache_modifier=".cg")
                        m_new = tl.maximum(big_m, pm)
                        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                        alpha = tl.math.exp2(big_m - m_use)
                        w = pl * tl.math.exp2(pm - m_use)
                        big_l = big_l * alpha + w
                        acc = acc * alpha[:, None] + w[:, None] * po
                        big_m = m_new
                    o = acc / tl.where(big_l > 0.0, big_l, 1.0)[:, None]
                    tl.store(OUT + seq * o_s + head_idx[:, None] * o_h + d[None, :],
                             o.to(OUT.dtype.element_ty), mask=omask)
                    tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")  # ready for the next call
    elif FUSED_MERGE and split == 0:  # an empty sequence: no split has work, zeros
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        head_idx = kvh * GROUP + g0 + g
        omask = ((g0 + g) < GROUP)[:, None] & (d < HEAD)[None, :]
        tl.store(OUT + seq * o_s + head_idx[:, None] * o_h + d[None, :],
                 tl.zeros([BLOCK_G, BLOCK_D], tl.float32).to(OUT.dtype.element_ty), mask=omask)
