"""Benchmark the attention ops against eager PyTorch and torch.compile of the native formulations.

One process, one table per section, written as
bench/results/attention_<device>_<section>_<dtype>.{json,md,png} (one dtype per run: --dtype):

- merge: merge_attn_states of two partial attention results (prefix and suffix), outputs
  [tokens, heads, head_size] of 32 heads of 128 (and of 64 at 4096 tokens), LSEs float32
  [heads, tokens], finite. Variants:
    compile_ops:     the op (CUDA kernel), writing output and output_lse in place.
    triton:          triton_merge_attn_states (the op's kernel without the extension), directly.
    eager_native:    vLLM-style math in torch ops (an infinite LSE counts as -inf; max, exp,
                     weights, weighted sum in float32, one cast); new output and output_lse.
    compiled_native: torch.compile (inductor) of eager_native. The baseline of the x column.
  Bytes: prefix_output and suffix_output read, output written, two LSEs read and one written.
  Target (the issue): the op >= 85% of the measured copy bandwidth for large inputs (>= 4096
  tokens): the summary under the table (and printed at the end) says at which sizes it is met.
- paged: decode attention over a paged KV cache, one query token per sequence: 32 query heads
  and 8 KV heads of 128 (--heads, --kv-heads, --head-size), block size 16, query in --dtype,
  kv_cache_dtype "auto" (cache in --dtype) and "fp8" (uint8 e4m3 codes, float32 scales).
  batch (1, 8, 32, 64, 128) x context (512, 4096, 16384), every sequence of a batch at that
  context; cases whose K + V cache would exceed --max-cache-gib (24) are skipped. Caches hold
  random values (fp8: random finite codes), each sequence random distinct blocks. Variants:
    v1:               paged_attention_v1 (vLLM's layout: x-packed key cache).
    v2:               paged_attention_v2, exp_sums / max_logits / tmp_out preallocated for
                      ceil(context / 512) partitions.
    sdpa_dense:       torch scaled_dot_product_attention over K and V already gathered into dense
                      [batch, kv_heads, context, head_size] tensors of the query dtype (enable_gqa;
                      K/V repeated to all query heads where torch lacks it); fp8 dequantized once,
                      outside the timing. The baseline of the x column.
    sdpa_with_gather: the same plus, inside the timed call, the gather of the paged cache by the
                      block tables into dense K/V (and for fp8 the dequantization).
  Bytes (the same count for every variant of a case, so GB/s compare as inverse times): the KV
  cache read, batch * context * kv_heads * head_size * 2 (K and V) * cache element size, plus
  query, output, block tables and seq_lens. sdpa_dense of fp8 really reads twice the KV bytes
  (dense K/V in --dtype), sdpa_with_gather much more (gather, copies, dequantization).
  %copy compares this read-mostly stream with the copy bandwidth, which counts read + write:
  the issue's target is stated against that figure. Target (issue 13): v2 >= 80% of copy for
  batch >= 32 and context >= 4096; the summary (one line per kv dtype) says at which sizes v2
  meets it and gives v1's and v2's speedups over sdpa_dense and sdpa_with_gather. A variant that
  fails under CUDA-graph capture is timed as plain launches; one that fails anyway (or runs out of
  memory) is reported as not measured.

    python bench/bench_attention.py                                  # every section, bf16
    python bench/bench_attention.py --section merge --dtype fp16 --quick
    python bench/bench_attention.py --section paged --kv auto --batch 64 --context 4096
    python bench/bench_attention.py --cpu-check    # no GPU: every variant on the CPU, numerics
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import compile_ops  # noqa: E402, F401  (registers torch.ops.compile_ops)
from compile_ops.attention import PARTITION_SIZE, paged_attention_ref  # noqa: E402
from compile_ops.attention import triton_merge_attn_states  # noqa: E402
from compile_ops.testing import assert_close  # noqa: E402

ops = torch.ops.compile_ops
SECTIONS = ("merge", "paged")
TOKENS = [1, 16, 128, 512, 2048, 4096, 16384, 65536]
TARGET_MIN_TOKENS, TARGET_PCT = 4096, 85.0
NEG_INF = float("-inf")
BATCHES, CONTEXTS, KV_DTYPES = [1, 8, 32, 64, 128], [512, 4096, 16384], ["auto", "fp8"]
PAGED_TARGET_BATCH, PAGED_TARGET_CONTEXT, PAGED_TARGET_PCT = 32, 4096, 80.0
FP8_FORMATS = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
               "fp8_e5m2": torch.float8_e5m2}


# ---------------------------------------------------------------------------------------------
# merge_attn_states
# ---------------------------------------------------------------------------------------------
def native_merge(prefix_output, prefix_lse, suffix_output, suffix_lse):
    """vLLM-style merge in torch ops, out of place: returns (output, output_lse).

    An infinite LSE (+inf or -inf) marks an empty part and counts as -inf. Both parts empty:
    output = prefix_output and output_lse = -inf (vLLM's choice)."""
    p_lse = torch.where(torch.isinf(prefix_lse), NEG_INF, prefix_lse.float())
    s_lse = torch.where(torch.isinf(suffix_lse), NEG_INF, suffix_lse.float())
    max_lse = torch.maximum(p_lse, s_lse)
    empty = max_lse == NEG_INF  # [heads, tokens]
    max_lse = torch.where(empty, 0.0, max_lse)  # both empty: exp(-inf) = 0, not exp(nan)
    p_w, s_w = torch.exp(p_lse - max_lse), torch.exp(s_lse - max_lse)
    total = p_w + s_w
    p_scale = (p_w / total).t().unsqueeze(-1)  # [tokens, heads, 1]
    s_scale = (s_w / total).t().unsqueeze(-1)
    out = prefix_output.float() * p_scale + suffix_output.float() * s_scale
    out = torch.where(empty.t().unsqueeze(-1), prefix_output, out.to(prefix_output.dtype))
    return out, torch.where(empty, NEG_INF, torch.log(total) + max_lse)


compiled_merge = torch.compile(native_merge, backend="inductor", dynamic=False)


def merge_ours(p, p_lse, s, s_lse, out, out_lse):
    ops.merge_attn_states(out, p, p_lse, s, s_lse, out_lse)
    return out, out_lse


def merge_triton(p, p_lse, s, s_lse, out, out_lse):
    triton_merge_attn_states(out, p, p_lse, s, s_lse, out_lse)
    return out, out_lse


def merge_eager(p, p_lse, s, s_lse, out, out_lse):  # new outputs; out and out_lse unused
    return native_merge(p, p_lse, s, s_lse)


def merge_compiled(p, p_lse, s, s_lse, out, out_lse):
    return compiled_merge(p, p_lse, s, s_lse)


MERGE_VARIANTS = {"compile_ops": merge_ours, "triton": merge_triton,
                  "eager_native": merge_eager, "compiled_native": merge_compiled}


def merge_inputs(tokens, heads, head_size, dtype, device):
    """(prefix_output, prefix_lse, suffix_output, suffix_lse, output, output_lse); the outputs
    filled with NaN, so that an element left unwritten fails the checks."""
    p = torch.randn(tokens, heads, head_size, device=device, dtype=dtype)
    s = torch.randn(tokens, heads, head_size, device=device, dtype=dtype)
    p_lse = torch.randn(heads, tokens, device=device) * 3 + 5  # LSEs a few units apart
    s_lse = torch.randn(heads, tokens, device=device) * 3 + 5
    return (p, p_lse, s, s_lse, torch.full_like(p, float("nan")),
            torch.full_like(p_lse, float("nan")))


def assert_lse(actual, expected, msg):
    """Same infinities at the same places, finite values close (float32 tolerance); no NaN."""
    a, e = actual.detach().cpu(), expected.detach().cpu()
    inf = torch.isinf(e)
    if not (torch.equal(torch.isinf(a), inf) and torch.equal(a[inf], e[inf])):
        raise AssertionError(f"{msg}: infinities differ\nactual {a}\nexpected {e}")
    assert_close(a[~inf], e[~inf], msg=msg)


def check_merge(device, dtype, tokens=6, heads=4, head_size=16, triton=False):
    """Every variant computes the same output and output_lse, empty parts included."""
    *args, out, out_lse = merge_inputs(tokens, heads, head_size, dtype, device)
    p, p_lse, s, s_lse = args
    inf = float("inf")
    p_lse[0, 1], s_lse[1, 2], p_lse[1, 0], s_lse[0, tokens - 1] = inf, -inf, -inf, inf
    p_lse[2, 3], s_lse[2, 3] = -inf, -inf  # both empty
    p_lse[3, 4], s_lse[3, 4] = inf, -inf  # both empty, one of them as +inf
    expected, expected_lse = native_merge(*args)
    for h, t in ((2, 3), (3, 4)):  # vLLM's both-empty result, exactly
        assert torch.equal(expected[t, h], p[t, h]), f"native: ({h}, {t}) is not prefix_output"
        assert expected_lse[h, t].item() == -inf, f"native: lse ({h}, {t}) is not -inf"
    names = ["compiled_native", "compile_ops"] + (["triton"] if triton else [])
    for name in names:
        o, lse = MERGE_VARIANTS[name](*args, out.clone(), out_lse.clone())
        what = f"{name} {dtype} {tokens}x{heads}x{head_size}"
        assert_close(o, expected, msg=f"{what}: output")
        assert_lse(lse, expected_lse, f"{what}: output_lse")


class MergeReport(harness.Report):
    """The harness's table plus the target summary: the op's %copy at each size."""

    def summary(self) -> str:
        meets, below, large_ok = [], [], True
        for r in self.results:
            if r.variant != "compile_ops":
                continue
            pct = 100 * r.bytes / r.seconds / self.copy_bw
            size = f"{r.case['tokens']}x{r.case['heads']}x{r.case['head_size']} ({pct:.0f}%)"
            (meets if pct >= TARGET_PCT else below).append(size)
            if r.case["tokens"] >= TARGET_MIN_TOKENS:
                large_ok &= pct >= TARGET_PCT
        return (f"{self.name}: compile_ops >= {TARGET_PCT:.0f}% of copy at "
                f"{', '.join(meets) or 'no size'}; below at {', '.join(below) or 'no size'}; "
                f"large inputs (>= {TARGET_MIN_TOKENS} tokens): "
                f"{'target met' if large_ok else 'target NOT met'}")

    def markdown(self) -> str:
        return super().markdown() + f"\n## Target\n\n{self.summary()}\n"


def bench_merge(args, dtype, copy_bw):
    cases = [(t, args.head_size) for t in args.tokens]
    cases += [(t, args.alt_head_size) for t in args.alt_tokens]
    for hs in sorted({hs for _, hs in cases}):
        check_merge("cuda", dtype, tokens=300, heads=args.heads, head_size=hs, triton=True)
    rep = MergeReport(f"merge_attn_states ({args.dtype})", copy_bw, "compiled_native",
                      ["tokens", "heads", "head_size"])
    size = torch.finfo(dtype).bits // 8
    for tokens, hs in cases:
        nbytes = 3 * tokens * args.heads * hs * size + 3 * args.heads * tokens * 4
        case = {"tokens": tokens, "heads": args.heads, "head_size": hs}
        for name, fn in MERGE_VARIANTS.items():
            def make(fn=fn, tokens=tokens, hs=hs):
                x = merge_inputs(tokens, args.heads, hs, dtype, "cuda")
                return lambda: fn(*x)
            rep.add(harness.measure(case, name, make, nbytes))
    return rep, {"plot_x": "tokens", "plot_group": ["heads", "head_size"]}


# ---------------------------------------------------------------------------------------------
# paged_attention_v1 / v2 (decode) vs SDPA over dense and over gathered K/V
# ---------------------------------------------------------------------------------------------
def _sdpa_has_gqa() -> bool:
    """Whether this torch's scaled_dot_product_attention takes enable_gqa (torch >= 2.5)."""
    q, k = torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 2, 8)
    try:
        torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    except TypeError:
        return False
    return True


SDPA_GQA = _sdpa_has_gqa()


def random_fp8_codes(shape, device):
    """uint8 codes of finite float8 values of either format (e4m3 and e5m2): magnitudes below
    0x70 (at most 120 / 16384 before the scale), either sign; never a NaN or inf code."""
    c = torch.randint(0, 0xE0, shape, dtype=torch.uint8, device=device)
    return c.add_((c >= 0x70).to(torch.uint8).mul_(0x10))  # 0x70.. -> 0x80..: the negatives


def paged_inputs(seq_lens, heads, kv_heads, head, bs, dtype, kv, device, k_scale=0.01,
                 v_scale=0.02):
    """A decode batch: query [seqs, heads, head], random caches in vLLM's paged layout
    (key [blocks, kv_heads, head // x, bs, x], value [blocks, kv_heads, head, bs]) holding
    exactly the blocks of the block tables, each sequence its own random distinct blocks."""
    seqs = len(seq_lens)
    max_blocks = max(1, -(-max(seq_lens) // bs))
    nb = seqs * max_blocks
    cdt = dtype if kv == "auto" else torch.uint8
    x = 16 // torch.empty((), dtype=cdt).element_size()
    kshape, vshape = (nb, kv_heads, head // x, bs, x), (nb, kv_heads, head, bs)
    if kv == "auto":
        kc = torch.randn(kshape, dtype=dtype, device=device)
        vc = torch.randn(vshape, dtype=dtype, device=device)
    else:
        kc, vc = random_fp8_codes(kshape, device), random_fp8_codes(vshape, device)
    table = torch.randperm(nb, device=device).view(seqs, max_blocks).int()
    return dict(query=torch.randn(seqs, heads, head, dtype=dtype, device=device),
                key_cache=kc, value_cache=vc, block_tables=table,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                max_seq_len=max(seq_lens), num_kv_heads=kv_heads, block_size=bs,
                scale=1.0 / math.sqrt(head), kv_cache_dtype=kv,
                k_scale=torch.tensor([k_scale], device=device),
                v_scale=torch.tensor([v_scale], device=device),
                k_scale_f=k_scale, v_scale_f=v_scale)


def gather_dense(c):
    """Dense K, V [seqs, kv_heads, max_seq_len, head] in the query dtype from the paged cache:
    index by the block tables, move the block dimension next to the token offset, dequantize
    (fp8 -> query dtype is exact; times the scale in float32, one rounding, as the reference)."""
    kc, vc, table = c["key_cache"], c["value_cache"], c["block_tables"]
    seqs, mb = table.shape
    _, h, dx, bs, x = kc.shape
    idx = table.reshape(-1)
    k = kc.index_select(0, idx).view(seqs, mb, h, dx, bs, x).permute(0, 2, 1, 4, 3, 5)
    k = k.reshape(seqs, h, mb * bs, dx * x)
    v = vc.index_select(0, idx).view(seqs, mb, h, dx * x, bs).permute(0, 2, 1, 4, 3)
    v = v.reshape(seqs, h, mb * bs, dx * x)
    fmt = FP8_FORMATS.get(c["kv_cache_dtype"])
    if fmt is not None:
        dtype = c["query"].dtype
        k = k.view(fmt).to(dtype) * c["k_scale_f"]
        v = v.view(fmt).to(dtype) * c["v_scale_f"]
    L = c["max_seq_len"]
    if L < mb * bs:
        k, v = k[:, :, :L], v[:, :, :L]
    if not SDPA_GQA:
        group = c["query"].shape[1] // h
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return k, v


def key_padding_mask(c):
    """None when every sequence has max_seq_len tokens (the GPU grid), else a boolean
    [seqs, 1, 1, max_seq_len] mask of the tokens each sequence has."""
    lens = c["seq_lens"]
    if bool((lens == c["max_seq_len"]).all()):
        return None
    pos = torch.arange(c["max_seq_len"], device=lens.device)
    return (pos[None, :] < lens[:, None].long())[:, None, None, :]


def sdpa_decode(q, k, v, mask, scale):
    kw = {"enable_gqa": True} if SDPA_GQA else {}
    o = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask,
                                                         scale=scale, **kw)
    return o.squeeze(2)


def paged_args(c):
    return (c["query"], c["key_cache"], c["value_cache"], c["num_kv_heads"], c["scale"],
            c["block_tables"], c["seq_lens"], c["block_size"], c["max_seq_len"], None,
            c["kv_cache_dtype"], c["k_scale"], c["v_scale"])


def make_v1(c):
    out, args = torch.full_like(c["query"], float("nan")), paged_args(c)

    def call():
        ops.paged_attention_v1(out, *args)
        return out
    return call


def make_v2(c):
    seqs, heads, head = c["query"].shape
    parts = max(1, -(-c["max_seq_len"] // PARTITION_SIZE))
    out, args = torch.full_like(c["query"], float("nan")), paged_args(c)
    exp_sums = torch.empty(seqs, heads, parts, dtype=torch.float32, device=out.device)
    max_logits = torch.empty_like(exp_sums)
    tmp_out = torch.empty(seqs, heads, parts, head, dtype=out.dtype, device=out.device)

    def call():
        ops.paged_attention_v2(out, exp_sums, max_logits, tmp_out, *args)
        return out
    return call


def make_sdpa_dense(c):
    """Gathered (and dequantized) once here; the paged cache is dropped from `c`."""
    k, v = gather_dense(c)
    q, mask, scale = c["query"], key_padding_mask(c), c["scale"]
    c.pop("key_cache"), c.pop("value_cache")
    return lambda: sdpa_decode(q, k, v, mask, scale)


def make_sdpa_with_gather(c):
    q, mask, scale = c["query"], key_padding_mask(c), c["scale"]
    return lambda: sdpa_decode(q, *gather_dense(c), mask, scale)


PAGED_VARIANTS = {"v1": make_v1, "v2": make_v2, "sdpa_dense": make_sdpa_dense,
                  "sdpa_with_gather": make_sdpa_with_gather}


def check_paged(device, dtype, kv, seq_lens, heads=4, kv_heads=2, head=64, bs=16):
    """Every variant computes paged_attention_ref's output (v2: over several partitions)."""
    c = paged_inputs(seq_lens, heads, kv_heads, head, bs, dtype, kv, device)
    want = paged_attention_ref(c["query"], c["key_cache"], c["value_cache"], kv_heads,
                               c["scale"], c["block_tables"], c["seq_lens"], None, kv,
                               c["k_scale"], c["v_scale"])
    for name, make in PAGED_VARIANTS.items():
        got = make(dict(c))()
        what = f"paged {name} {dtype} kv={kv} seq_lens={list(seq_lens)} {heads}/{kv_heads}x{head}"
        assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}"
        assert_close(got, want, msg=what)


def kv_bytes(batch, context, kv_heads, head, kv, dtype):
    return batch * context * kv_heads * head * 2 * (1 if kv != "auto" else dtype.itemsize)


def paged_bytes(batch, context, heads, kv_heads, head, bs, kv, dtype):
    """KV cache read + query read + output written + block tables and seq_lens read."""
    return (kv_bytes(batch, context, kv_heads, head, kv, dtype)
            + 2 * batch * heads * head * dtype.itemsize
            + 4 * batch * (-(-context // bs) + 1))


def _geo(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


class PagedReport(harness.Report):
    """The harness's table plus v2's target, the speedups over the SDPA variants and the
    variants that could not be measured."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.notes: list[str] = []  # capture fallbacks and failures, in order

    def pct(self, r):
        return 100 * r.bytes / r.seconds / self.copy_bw

    def speedups(self, kv, variant, over):
        """[(case label, time of `over` / time of `variant`)] over the sizes both have."""
        rows = []
        for key, vs in self._rows().items():
            if key[0] == kv and variant in vs and over in vs:
                rows.append((f"{key[1]}x{key[2]}", vs[over].seconds / vs[variant].seconds))
        return rows

    def summary_kv(self, kv) -> str:
        meets, below, target_ok, target_n = [], [], True, 0
        for r in self.results:
            if r.variant != "v2" or r.case["kv"] != kv:
                continue
            pct = self.pct(r)
            size = f"{r.case['batch']}x{r.case['context']} ({pct:.0f}%)"
            (meets if pct >= PAGED_TARGET_PCT else below).append(size)
            if r.case["batch"] >= PAGED_TARGET_BATCH and r.case["context"] >= PAGED_TARGET_CONTEXT:
                target_ok &= pct >= PAGED_TARGET_PCT
                target_n += 1
        target = ("not measured" if not target_n else "target met" if target_ok
                  else "target NOT met")
        parts = [f"{self.name} kv={kv}: v2 >= {PAGED_TARGET_PCT:.0f}% of copy at "
                 f"{', '.join(meets) or 'no size'}; below at {', '.join(below) or 'no size'}; "
                 f"batch >= {PAGED_TARGET_BATCH} and context >= {PAGED_TARGET_CONTEXT}: {target}"]
        for v in ("v1", "v2"):
            sp = []
            for over in ("sdpa_dense", "sdpa_with_gather"):
                rows = self.speedups(kv, v, over)
                if rows:
                    lo, hi = min(x for _, x in rows), max(x for _, x in rows)
                    sp.append(f"x{_geo([x for _, x in rows]):.2f} ({lo:.2f}-{hi:.2f}) over {over}")
            parts.append(f"{v} speedup (geomean, min-max): {', '.join(sp) or 'none measured'}")
        failed = [n.split(":")[0].split(" ", 1)[1] for n in self.notes
                  if n.startswith(f"kv={kv} ") and ": not measured" in n]
        if failed:
            parts.append(f"not measured (see the notes): {', '.join(failed)}")
        return "; ".join(parts)

    def summary(self) -> str:
        kvs = list(dict.fromkeys(r.case["kv"] for r in self.results))
        return "\n".join(self.summary_kv(kv) for kv in kvs) or f"{self.name}: nothing measured"

    def markdown(self) -> str:
        lines = [super().markdown(),
                 "GB/s count the KV cache bytes (plus query, output, block tables) for every "
                 "variant of a case: sdpa_dense of fp8 reads twice that (dense K/V in the query "
                 "dtype), sdpa_with_gather much more. `%copy` sets this read-only stream against "
                 "the copy bandwidth, which counts read + write (as the issue asks).", "",
                 "## Speedups (time of the column's variant / time of the row's)", "",
                 "| kv | batch | context | v1 / sdpa_dense | v2 / sdpa_dense | "
                 "v1 / sdpa_with_gather | v2 / sdpa_with_gather |", "|---|---|---|---|---|---|---|"]
        for key, vs in self._rows().items():
            cells = []
            for over in ("sdpa_dense", "sdpa_with_gather"):
                for v in ("v1", "v2"):
                    ok = v in vs and over in vs
                    cells.append(f"{vs[over].seconds / vs[v].seconds:.2f}" if ok else "-")
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
        lines += ["", "## Target", "", *(f"- {s}" for s in self.summary().splitlines())]
        if self.notes:
            lines += ["", "## Notes", "", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines) + "\n"


def measure_paged(rep, case, name, make, nbytes):
    """harness.measure; a failure under CUDA-graph capture is retried as plain launches, one
    that fails anyway (or runs out of memory) is noted and skipped."""
    label = f"kv={case['kv']} batch={case['batch']} context={case['context']} {name}"
    capture_err = None
    for use_graph in (None, False):
        try:
            rep.add(harness.measure(case, name, make, nbytes, use_graph=use_graph))
            if capture_err:
                rep.notes.append(f"{label}: timed as plain launches (CUDA-graph capture "
                                 f"failed: {capture_err})")
            return
        except Exception as exc:  # noqa: BLE001  (report, go on with the next variant)
            err = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
            oom = isinstance(exc, torch.cuda.OutOfMemoryError)
            graph = use_graph is None and nbytes < harness.GRAPH_BELOW_BYTES
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001  (a failed capture may poison the stream)
                pass
            torch.cuda.empty_cache()
            if graph and not oom:
                print(f"{label}: CUDA-graph capture failed ({err}); retrying as plain launches",
                      flush=True)
                capture_err = err
                continue
            rep.notes.append(f"{label}: not measured ({err})")
            print(f"{label}: not measured ({err})", flush=True)
            return


def bench_paged(args, dtype, copy_bw):
    head, kvh, bs, heads = args.head_size, args.kv_heads, args.block_size, args.heads
    for kv in args.kv:  # numerics on the device first (uneven lengths, two partitions)
        check_paged("cuda", dtype, kv, [1, 37, 530, 1024], heads=heads, kv_heads=kvh,
                    head=head, bs=bs)
    rep = PagedReport(f"paged_attention decode ({args.dtype} query, {heads}/{kvh} heads of "
                      f"{head}, block {bs})", copy_bw, "sdpa_dense", ["kv", "batch", "context"])
    limit = args.max_cache_gib * (1 << 30)
    for kv in args.kv:
        for batch in args.batch:
            for context in args.context:
                case = {"kv": kv, "batch": batch, "context": context}
                if kv_bytes(batch, context, kvh, head, kv, dtype) > limit:
                    note = (f"kv={kv} batch={batch} context={context}: skipped (KV cache > "
                            f"{args.max_cache_gib:g} GiB)")
                    rep.notes.append(note)
                    print(note, flush=True)
                    continue
                nbytes = paged_bytes(batch, context, heads, kvh, head, bs, kv, dtype)
                for name, make_fn in PAGED_VARIANTS.items():
                    def make(make_fn=make_fn, batch=batch, context=context, kv=kv):
                        return make_fn(paged_inputs([context] * batch, heads, kvh, head, bs,
                                                    dtype, kv, "cuda"))
                    measure_paged(rep, case, name, make, nbytes)
                    torch.cuda.empty_cache()
    return rep, {"plot_x": "context", "plot_group": ["kv", "batch"]}


BENCHES = {"merge": bench_merge, "paged": bench_paged}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--section", nargs="+", default=["all"], choices=[*SECTIONS, "all"])
    p.add_argument("--tokens", type=int, nargs="+", default=TOKENS,
                   help="merge: token counts at --head-size (CUDA graphs below 512 MiB moved "
                        "per call)")
    p.add_argument("--heads", type=int, default=32, help="merge: heads; paged: query heads")
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--alt-head-size", type=int, default=64, help="merge: a second head size")
    p.add_argument("--alt-tokens", type=int, nargs="*", default=[4096],
                   help="merge: token counts at --alt-head-size (none: --head-size only)")
    p.add_argument("--batch", type=int, nargs="+", default=BATCHES,
                   help="paged: sequences per batch (one query token each)")
    p.add_argument("--context", type=int, nargs="+", default=CONTEXTS,
                   help="paged: tokens of every sequence")
    p.add_argument("--kv", nargs="+", default=KV_DTYPES, choices=["auto", *FP8_FORMATS],
                   help="paged: kv_cache_dtype values")
    p.add_argument("--kv-heads", type=int, default=8, help="paged: KV heads")
    p.add_argument("--block-size", type=int, default=16, help="paged: tokens per cache block")
    p.add_argument("--max-cache-gib", type=float, default=24.0,
                   help="paged: skip cases whose K + V cache is larger")
    p.add_argument("--quick", action="store_true",
                   help="merge: tokens 1, 128, 4096, 65536; paged: batch 1, 64 x context 512, "
                        "4096")
    harness.add_common_args(p)
    args = p.parse_args()
    if args.quick:
        args.tokens = [1, 128, 4096, 65536]
        args.batch, args.context = [1, 64], [512, 4096]
    sections = SECTIONS if "all" in args.section else args.section
    dtype, copy_bw = harness.start(args)
    if args.cpu_check:
        check_merge("cpu", torch.float32)
        check_merge("cpu", torch.bfloat16)  # the GPU run's default dtype and tolerances
        for dtype in (torch.float32, torch.bfloat16):
            for kv in KV_DTYPES:
                check_paged("cpu", dtype, kv, [1, 37, 530])  # uneven, v2 over 2 partitions
                check_paged("cpu", dtype, kv, [40, 40], head=128)  # even: SDPA without a mask
        print("cpu check ok: attention variants match (merge_attn_states, paged_attention)")
        return
    stem, paths, reports = harness.device_stem("attention"), [], []
    for section in sections:
        rep, plot = BENCHES[section](args, dtype, copy_bw)
        paths += rep.write(args.out, f"{stem}_{section}_{args.dtype}", **plot)
        reports.append(rep)
    print("wrote", *paths)
    for rep in reports:
        print(rep.summary())


if __name__ == "__main__":
    main()
