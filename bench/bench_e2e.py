"""Decode-step latency of a Llama-style model: our ops eager / under Inductor / under the
compile_ops backend, against plain PyTorch under Inductor.

The model is compile_ops.models.llama at Llama 3 8B's shapes with --layers layers (default 4:
hidden 4096, 32 query / 8 KV heads of 128, intermediate 14336, vocab 128256), bf16, paged KV
cache in blocks of 16. Variants, side by side in one process, at every (batch, context):

- eager:           `Llama.decode` (our ops, paged KV cache, paged attention v1 or v2), eager.
- inductor:        the same under torch.compile(backend="inductor").
- compile_ops:     the same under torch.compile(backend="compile_ops") (its fusion passes; the
                   add_rms_norm matches of the decode graph are recorded in the report).
- inductor_native: `LlamaReference` (plain PyTorch, dense [batch, 8, context + 1, 128] K/V per
                   layer, SDPA with a position mask) under torch.compile(backend="inductor"): the
                   baseline. The same parameters as the model.

A decode step is one new token per sequence with `context` tokens already in the cache: the
token's K/V are written at position `context` and it attends over context + 1 tokens. Every
variant computes the next token and the logits of every sequence (lm_head included).

How the context gets into the caches: no prefill (batch 128 x 4096 context would be a 512k-token
prefill through 4 layers). For each layer, random K/V of the context (seeded, normal, the model
dtype) are written into the paged cache through the model's cache API (`PagedKVCache.prefill`
reserves the blocks and gives the slots, `reshape_and_cache`, the op the model writes with, puts
them there) and the same values into the reference's dense cache. So every variant sees the same
weights, the same context values and lengths. The caches are sized to the step: paged attention's
max_seq_len (and the model's block-table width) covers context + 1 tokens, as does the dense
cache. The step's inputs (tokens, positions, slots, block tables, lengths) are fixed, so replaying
it rewrites the same cache slot with the same values: the cache never runs past its size.

Timing: each variant's step is compiled (and checked: next tokens and logits against the first
variant run, eager unless --variants leaves it out, with compare_generations of the model module;
a mismatch is noted in the report, not fatal) with a first call, then
captured in a torch.cuda.CUDAGraph and replayed (bench/harness.py time_calls: warm-up on a side
stream, median of 20 samples of >= 20 ms). Compiled variants are compiled without
mode="reduce-overhead" and captured by the harness like the eager one, so all four are timed the
same way (no cudagraph-tree input copies, no silent fallback to launches). One compilation per
(variant, batch, context) (dynamic=False, as compile_steps compiles): the full grid compiles 24
decode graphs of 4 layers; where one command may not run that long, split the grid (--context,
--batch, --variants) and give each part its own --stem.

Bytes (for GB/s and %copy): the step's minimum traffic: the layers' and lm_head's weights, the
batch's embedding rows, the K/V of context + 1 tokens read and of the new token written, the
logits written (activations not counted). A GB/s next to the copy bandwidth says how far a step
is from reading its weights and cache at the device's rate.

Out of memory at a grid point (caches, compilation or timing) is recorded as skipped with the
reason, and the run goes on; other failures are recorded too, and make the exit code 1. The
report is rewritten after every grid point, so a run cut short keeps what it measured.
Acceptance (issue 14): compile_ops faster than inductor and than inductor_native at every point
of the grid: the summary (end of the table, and printed last) says so for each. --ablate adds
compile_ops with one pass left out at a time (compile_ops_no_add_rms_norm, _no_rope_cache,
_no_argmax): the summary gives the time each pass's rewrite saves per step.

    python bench/bench_e2e.py                 # batch 1, 8, 32, 128 x context 512, 4096
    python bench/bench_e2e.py --quick         # batch 1, 32 x context 512
    python bench/bench_e2e.py --context 4096 --stem e2e_H100_4096   # part of the grid
    python bench/bench_e2e.py --batch 1 --context 512 --ablate      # what each pass saves
    python bench/bench_e2e.py --cpu-check     # no GPU: tiny model in float32, batch 2, context
                                              # 16, every variant (compiled ones too) for 2
                                              # decode steps: tokens and logits vs eager

Tensor parallelism (--tp N, under torchrun --nproc-per-node N; one GPU per rank, NCCL): the
model split Megatron-style over the ranks (compile_ops.models.llama: column-parallel qkv /
gate_up, row-parallel o_proj / down_proj whose outputs are all-reduced; embedding, norms and
lm_head replicated; each rank's paged cache holds its KV heads). Variants eager, inductor and
compile_ops on the same TP model (no inductor_native: the plain-PyTorch reference is the
one-process model); --ablate adds compile_ops_no_allreduce_norm. Every rank runs the same grid
in lockstep (each step's all-reduces pair them up): the context fill is checked against a dense
copy of the rank's own KV heads, and the timing is the harness's (warm-up, one step captured in a
CUDA graph, median of 20 samples of >= 20 ms) with the replays per sample agreed over the ranks,
reported as the slowest rank's median. Bytes are one rank's: its slices of the projections and
of the KV, the replicated embedding rows, norms and lm_head (the all-reduces not counted).
Rank 0 prints and writes bench/results/e2e_tp<N>_<device>.* (e2e_fp8_<mode>_tp<N>_<device>
with --fp8).

    torchrun --nproc-per-node 2 bench/bench_e2e.py --tp 2 --quick
    COMPILE_OPS_PASS_DEVICES=all torchrun --nproc-per-node 2 bench/bench_e2e.py --tp 2 --cpu-check

Writes bench/results/e2e_<device>.{json,md,png} (--out, --stem).
"""

import argparse
import gc
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import compile_ops  # noqa: E402, F401  (registers torch.ops.compile_ops and the backend)
import lowerings  # noqa: E402
from compile_ops.models.llama import (  # noqa: E402
    Generation,
    Llama,
    LlamaConfig,
    LlamaReference,
    PagedKVCache,
    FP8_LOGITS_TOLERANCE,
    allreduce_norm_expected,
    compare_generations,
    compile_steps,
)

ops = torch.ops.compile_ops
VARIANTS = ("eager", "inductor", "compile_ops", "inductor_native")
# --ablate: compile_ops with one pass left out each; the difference to compile_ops is the time
# that pass's rewrite saves per step.
ABLATIONS = {"compile_ops_no_add_rms_norm": "add_rms_norm",
             "compile_ops_no_rope_cache": "rope_cache", "compile_ops_no_argmax": "argmax"}
# --tp: the variants on the TP model, and the ablation of the TP-only pass
TP_VARIANTS = ("eager", "inductor", "compile_ops")
TP_ABLATIONS = {"compile_ops_no_allreduce_norm": "allreduce_norm"}
ALL_VARIANTS = VARIANTS + tuple(ABLATIONS) + tuple(TP_ABLATIONS)
BATCHES, CONTEXTS = [1, 8, 32, 128], [512, 4096]
QUICK_BATCHES, QUICK_CONTEXTS = [1, 32], [512]
FILL_CHUNK_TOKENS = 1 << 17  # random K/V generated per chunk while filling (256 MiB each, bf16)


# ---------------------------------------------------------------------------------------------
# The model, the caches and the step
# ---------------------------------------------------------------------------------------------
def sized_config(cfg: LlamaConfig, context: int, steps: int) -> LlamaConfig:
    """The config with block tables (hence the RoPE table and paged attention's max_seq_len)
    just wide enough for context + steps tokens."""
    return cfg.replace(max_blocks=-(-(context + steps) // cfg.block_size))


class Point:
    """One (batch, context): the model's paged cache and the reference's dense cache holding the
    same random K/V for the first `context` positions of every sequence, and the inputs of
    `steps` decode steps (step s writes position context + s)."""

    def __init__(self, model: Llama, ref: LlamaReference, batch: int, context: int, steps: int,
                 seed: int = 0):
        cfg, dev = model.cfg, model.device
        self.batch, self.context, self.steps = batch, context, steps
        self.cache = PagedKVCache(cfg, dev, num_blocks=batch * cfg.max_blocks, seed=seed)
        self.seqs = self.cache.add_sequences(batch)
        _, slots = self.cache.prefill(self.seqs, context)  # reserves the blocks, no compute
        if ref is not None:
            self.dense = ref.new_cache(batch, max_len=context + steps)
        else:  # TP (no reference): a dense copy of the rank's KV heads to check the fill with
            shape = (batch, cfg.local_kv_heads, context + steps, cfg.head_dim)
            self.dense = [tuple(torch.zeros(shape, dtype=cfg.dtype, device=dev)
                                for _ in range(2)) for _ in range(cfg.layers)]
        fill_context(model, self.cache.kv_caches, slots, self.dense, batch, context, seed)
        del slots
        self.paged_args = [self.cache.decode(self.seqs) for _ in range(steps)]
        self.dense_positions = [torch.tensor([context + s], device=dev) for s in range(steps)]
        g = torch.Generator().manual_seed(seed + 1)
        self.first_tokens = torch.randint(0, cfg.vocab, (batch,), generator=g).to(dev)

    def paged_step(self, fn, s: int, tokens):
        positions, slots, block_tables, seq_lens = self.paged_args[s]
        return fn(tokens, positions, slots, block_tables, seq_lens, self.cache.kv_caches)

    def dense_step(self, fn, s: int, tokens):
        return fn(tokens[:, None], self.dense_positions[s], self.dense)


@torch.no_grad()
def fill_context(model: Llama, paged, slots, dense, batch: int, context: int, seed: int) -> None:
    """Random K/V [batch * context, kv_heads, head_dim] per layer, written into the paged caches
    with reshape_and_cache at `slots` (sequence-major, as PagedKVCache.prefill returns them)
    and into the dense caches at positions 0..context-1, a chunk of sequences at a time. A rank
    of a TP model keeps its KV heads of the same draws (the one-process model's context)."""
    cfg, dev = model.cfg, model.device
    nkv, hd = cfg.local_kv_heads, cfg.head_dim
    heads = slice(model.tp.rank * nkv, (model.tp.rank + 1) * nkv) if model.tp else slice(None)
    gen = torch.Generator(device=dev).manual_seed(seed + 2)
    per = max(1, FILL_CHUNK_TOKENS // context)  # sequences per chunk
    for (kc, vc), (dk, dv) in zip(paged, dense):
        for s0 in range(0, batch, per):
            n = min(per, batch - s0)
            k, v = (torch.randn(n * context, cfg.kv_heads, hd, generator=gen, device=dev,
                                dtype=cfg.dtype)[:, heads].contiguous() for _ in range(2))
            ops.reshape_and_cache(k, v, kc, vc, slots[s0 * context:(s0 + n) * context], "auto",
                                  model.k_scale, model.v_scale)
            dk[s0:s0 + n, :, :context].copy_(k.view(n, context, nkv, hd).transpose(1, 2))
            dv[s0:s0 + n, :, :context].copy_(v.view(n, context, nkv, hd).transpose(1, 2))
            del k, v


def check_fill(point: Point, cfg: LlamaConfig, seqs=None) -> None:
    """The paged caches hold the dense caches' K/V at every context position of the sequences
    `seqs` (indices, default all; read back through the block tables, in reshape_and_cache's
    layout), and the context is not all zeros."""
    bs, nkv, hd, n = cfg.block_size, cfg.local_kv_heads, cfg.head_dim, point.context
    pos = torch.arange(n, device=point.dense[0][0].device)
    for layer, ((kc, vc), (dk, dv)) in enumerate(zip(point.cache.kv_caches, point.dense)):
        for b in (range(point.batch) if seqs is None else seqs):
            table = torch.tensor(point.cache.block_table[point.seqs[b]], device=pos.device)
            blk, off = table[pos // bs], pos % bs
            key = kc[blk, :, :, off, :].reshape(n, nkv, hd).transpose(0, 1)
            val = vc[blk, :, :, off].transpose(0, 1)
            if not (torch.equal(key, dk[b, :, :n]) and torch.equal(val, dv[b, :, :n])):
                raise AssertionError(f"layer {layer}, sequence {b}: the paged and dense caches "
                                     f"differ over the context")
            if not bool(dk[b, :, :n].abs().sum() > 0):
                raise AssertionError(f"layer {layer}, sequence {b}: empty context")


def without_pass(name: str):
    """The compile_ops backend with the pass `name` left out of the pass manager while it
    compiles (a backend object of its own, so Dynamo does not reuse compile_ops' graphs)."""
    from lowerings.backend import compile_ops_backend

    def backend(gm, example_inputs):
        pm = lowerings.pass_manager()
        saved = pm.passes
        pm.passes = [p for p in saved if p.name != name]
        try:
            return compile_ops_backend(gm, example_inputs)
        finally:
            pm.passes = saved
    return backend


def step_fns(model: Llama, ref: LlamaReference) -> dict:
    """{variant: step function}: eager or compiled (dynamic=False, no CUDA graphs of their own:
    the timing captures each step in a CUDA graph the same way). ``ref`` None (TP): no
    inductor_native."""
    fns = {"eager": model.decode,
           "inductor": compile_steps(model, "inductor", cuda_graphs=False)[1],
           "compile_ops": compile_steps(model, "compile_ops", cuda_graphs=False)[1]}
    if ref is not None:
        fns["inductor_native"] = compile_steps(ref, "inductor", cuda_graphs=False)[1]
    for variant, pass_name in {**ABLATIONS, **TP_ABLATIONS}.items():
        fns[variant] = torch.compile(model.decode, backend=without_pass(pass_name),
                                     fullgraph=True, dynamic=False)
    return fns


def run_step(point: Point, name: str, fn, s: int, tokens):
    if name == "inductor_native":
        return point.dense_step(fn, s, tokens)
    return point.paged_step(fn, s, tokens)


def first_call(point: Point, name: str, fn, steps: int):
    """`steps` decode steps (step 0 from the point's tokens, then each from the last step's next
    tokens): (Generation with tokens [B, steps] and float32 logits [steps, B, vocab] on the CPU,
    the pass counters of a compile_ops decode graph or None). The compile_ops variants are
    compiled without FX graph / AOT cache hits, so that their passes run and the counters count."""
    tokens, logits, counters = [], [], None
    tok = point.first_tokens
    with torch.no_grad():
        if name.startswith("compile_ops"):
            lowerings.reset_counters()
            with torch._inductor.config.patch(fx_graph_cache=False), \
                    torch._functorch.config.patch(enable_autograd_cache=False):
                tok, lg = run_step(point, name, fn, 0, tok)
            counters = lowerings.counters()
        else:
            tok, lg = run_step(point, name, fn, 0, tok)
        for s in range(steps):
            if s:
                tok, lg = run_step(point, name, fn, s, tok)
            tok = tok.clone()
            tokens.append(tok.cpu())
            logits.append(lg.float().cpu())
    return Generation(torch.stack(tokens, dim=1), torch.stack(logits), None), counters


def step_bytes(cfg: LlamaConfig, batch: int, context: int) -> int:
    """Minimum traffic of one decode step (see the module docstring); under TP of one rank."""
    h, q, kv, i = cfg.hidden, cfg.local_q_size, cfg.local_kv_size, cfg.local_intermediate
    proj = h * (q + 2 * kv) + q * h + h * 2 * i + i * h         # the four projections
    size = torch.empty((), dtype=cfg.dtype).element_size()
    proj_bytes = proj * (1 if cfg.fp8 else size)                # FP8 weights: one byte each
    elems = (cfg.layers * 2 * h + h + cfg.vocab * h            # norms, final norm, lm_head
             + batch * h                                        # embedding rows
             + cfg.layers * 2 * kv * batch * (context + 1)      # K/V read (new token included)
             + cfg.layers * 2 * kv * batch                      # K/V of the new token written
             + batch * cfg.vocab)                               # logits written
    return elems * size + cfg.layers * proj_bytes


# ---------------------------------------------------------------------------------------------
# --cpu-check
# ---------------------------------------------------------------------------------------------
def cpu_check() -> None:
    """The tiny config in float32, batch 2, context 16 (random K/V, as on the GPU), every variant
    for 2 decode steps on the CPU; next tokens equal and logits close to eager, the compile_ops
    decode graph fused (2 add_rms_norm and 1 rope_cache matches per layer), and one ablation
    (compile_ops without rope_cache) left that pass out."""
    t0 = time.perf_counter()
    batch, context, steps = 2, 16, 2
    cfg = sized_config(LlamaConfig.tiny(dtype=torch.float32), context, steps)
    model = Llama(cfg, seed=0, device="cpu")
    ref = LlamaReference(model)
    point = Point(model, ref, batch, context, steps)
    check_fill(point, cfg)
    gens, counters = {}, {}
    fns = step_fns(model, ref)
    for name in VARIANTS + ("compile_ops_no_rope_cache",):  # one ablation: the mechanism
        t1 = time.perf_counter()
        gens[name], counters[name] = first_call(point, name, fns[name], steps)
        print(f"{name}: {steps} decode steps in {time.perf_counter() - t1:.1f} s "
              f"(compilation included)", flush=True)
    for name, gen in gens.items():
        if name == "eager":
            continue
        cmp = compare_generations(gens["eager"], gen, cfg.dtype, cfg.layers)
        print(f"{name} vs eager: {cmp.message}")
        if not (cmp.ok and cmp.tokens_equal):
            raise AssertionError(f"{name} vs eager: {cmp.message}")
    c = counters["compile_ops"]
    matched = {k: c.get(k, {}).get("matched", 0) for k in ("add_rms_norm", "rope_cache")}
    if matched != {"add_rms_norm": 2 * cfg.layers, "rope_cache": cfg.layers}:
        raise AssertionError(f"compile_ops decode graph: matched {matched}, expected "
                             f"add_rms_norm {2 * cfg.layers}, rope_cache {cfg.layers} ({c})")
    a = counters["compile_ops_no_rope_cache"]
    if "rope_cache" in a or a.get("add_rms_norm", {}).get("matched") != 2 * cfg.layers:
        raise AssertionError(f"compile_ops_no_rope_cache: the pass ran or others did not ({a})")
    print(f"compile_ops decode graph: matched {matched}; without rope_cache: "
          f"{a.get('add_rms_norm', {}).get('matched', 0)} add_rms_norm, no rope_cache; "
          f"{time.perf_counter() - t0:.1f} s in all")
    print("cpu check ok: e2e variants match")


def cpu_check_tp(tp: int) -> None:
    """--cpu-check --tp N (under torchrun, gloo; the passes forced onto CPU graphs with
    COMPILE_OPS_PASS_DEVICES=all, as for --cpu-check): the tiny config split over the ranks,
    batch 2, context 16, eager / inductor / compile_ops (+ compile_ops without allreduce_norm)
    for 2 decode steps; tokens equal and logits close to eager's, TP eager to the one-process
    model's (the same weights and context), the compile_ops decode graph fused (2 add_rms_norm,
    1 rope_cache and, where the pass exists, 2 allreduce_norm matches per layer)."""
    t0 = time.perf_counter()
    batch, context, steps = 2, 16, 2
    cfg = sized_config(LlamaConfig.tiny(dtype=torch.float32, tp=tp), context, steps)
    model = Llama(cfg, seed=0, device="cpu")
    point = Point(model, None, batch, context, steps)
    check_fill(point, cfg)
    point.dense = None
    has_ar = _has_pass("allreduce_norm")
    names = TP_VARIANTS + (tuple(TP_ABLATIONS) if has_ar else ())
    gens, counters = {}, {}
    fns = step_fns(model, None)
    for name in names:
        t1 = time.perf_counter()
        gens[name], counters[name] = first_call(point, name, fns[name], steps)
        print(f"{name}: {steps} decode steps in {time.perf_counter() - t1:.1f} s "
              f"(compilation included)", flush=True)
    one = Llama(cfg.replace(tp=1), seed=0, device="cpu")
    one_point = Point(one, LlamaReference(one), batch, context, steps)
    one_gen, _ = first_call(one_point, "eager", one.decode, steps)
    checks = [("eager vs the one-process model", one_gen, gens["eager"])]
    checks += [(f"{name} vs eager", gens["eager"], gen) for name, gen in gens.items()
               if name != "eager"]
    for what, expected, gen in checks:
        cmp = compare_generations(expected, gen, cfg.dtype, cfg.layers)
        print(f"{what}: {cmp.message}")
        if not (cmp.ok and cmp.tokens_equal):
            raise AssertionError(f"{what}: {cmp.message}")
    want = {"add_rms_norm": 2 * cfg.layers, "rope_cache": cfg.layers}
    if has_ar:
        want["allreduce_norm"] = 2 * cfg.layers
    c = counters["compile_ops"]
    matched = {k: c.get(k, {}).get("matched", 0) for k in want}
    if matched != want:
        raise AssertionError(f"compile_ops decode graph: matched {matched}, expected {want} "
                             f"({c})")
    if has_ar:
        a = counters["compile_ops_no_allreduce_norm"]
        if "allreduce_norm" in a or a.get("add_rms_norm", {}).get("matched") != 2 * cfg.layers:
            raise AssertionError(f"compile_ops_no_allreduce_norm: the pass ran or others did "
                                 f"not ({a})")
    print(f"compile_ops decode graph (rank 0 of {tp}): matched {matched}"
          + ("" if has_ar else "; no allreduce_norm pass in this build")
          + f"; {time.perf_counter() - t0:.1f} s in all")
    print(f"cpu check ok: e2e tp{tp} variants match")


def _has_pass(name: str) -> bool:
    return any(getattr(p, "name", "") == name for p in lowerings.pass_manager().passes)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
class E2EReport(harness.Report):
    """The harness's table (baseline: inductor) plus compile_ops' speedups, the acceptance
    summary, skipped points and notes; the plot shows µs per step and the speedups."""

    def __init__(self, *a, grid=(), context_fill="", variants=VARIANTS,
                 baselines=("inductor", "inductor_native"), **kw):
        super().__init__(*a, **kw)
        self.grid = list(grid)            # [(batch, context)] asked for
        self.context_fill = context_fill
        self.variants = tuple(variants)   # the table's columns
        self.baselines = tuple(baselines)  # what compile_ops' speedups are over
        self.skipped: list[dict] = []     # {batch, context, variant, reason}
        self.notes: list[str] = []
        self.failed = False               # a failure other than out of memory

    def skip(self, case: dict, variant: str, reason: str, failure: bool = False) -> None:
        self.skipped.append(dict(case, variant=variant, reason=reason))
        self.failed |= failure
        print(f"batch={case['batch']} context={case['context']} {variant}: skipped ({reason})",
              flush=True)

    def speedup(self, variants: dict, over: str):
        c, o = variants.get("compile_ops"), variants.get(over)
        return o.seconds / c.seconds if c and o else None

    def verdict(self, over: str) -> str:
        rows, slower, missing = self._rows(), [], []
        for key in self.grid:
            x = self.speedup(rows.get(key, {}), over)
            if x is None:
                missing.append(f"{key[0]}x{key[1]}")
            elif x <= 1:
                slower.append(f"{key[0]}x{key[1]} (x{x:.2f})")
        if slower:
            return f"NO (not faster at batch x context {', '.join(slower)})"
        if missing:
            return (f"not established: compile_ops or {over} not measured at "
                    f"{', '.join(missing)}")
        return "yes"

    def savings(self, variants: dict) -> list[str]:
        """What each pass saves per step: its ablation's time minus compile_ops'."""
        c = variants.get("compile_ops")
        out = []
        for variant, pass_name in {**ABLATIONS, **TP_ABLATIONS}.items():
            a = variants.get(variant)
            if c and a:
                out.append(f"{pass_name} saves {(a.seconds - c.seconds) * 1e6:.1f} us")
        return out

    def summary(self) -> list[str]:
        rows, lines = self._rows(), []
        for (batch, context), vs in rows.items():
            parts = []
            for over in self.baselines:
                x = self.speedup(vs, over)
                parts.append(f"x{x:.2f} vs {over}" if x else f"- vs {over}")
            c = vs.get("compile_ops")
            us = f"{c.seconds * 1e6:.1f} us" if c else "not measured"
            lines.append(f"batch {batch}, context {context}: compile_ops {us}, "
                         + ", ".join(parts + self.savings(vs)))
        for over in self.baselines:
            lines.append(f"compile_ops faster than {over} at every point of the grid "
                         f"({len(self.grid)} points): {self.verdict(over)}")
        return lines

    def markdown(self) -> str:
        cols, overs = self.variants, self.baselines
        lines = [super().markdown(), self.context_fill, "",
                 "## compile_ops speedups (time of the column's variant / time of compile_ops)",
                 "", "| batch | context | " + " | ".join(f"{v} µs" for v in cols)
                 + " | " + " | ".join(f"x {o}" for o in overs) + " |",
                 "|---" * (len(cols) + len(overs) + 2) + "|"]
        for (batch, context), vs in self._rows().items():
            cells = [f"{vs[v].seconds * 1e6:.1f}" if v in vs else "-" for v in cols]
            for over in overs:
                x = self.speedup(vs, over)
                cells.append(f"{x:.2f}" if x else "-")
            lines.append(f"| {batch} | {context} | " + " | ".join(cells) + " |")
        lines += ["", "## Summary", "", *(f"- {s}" for s in self.summary())]
        if self.skipped:
            lines += ["", "## Skipped", ""]
            lines += [f"- batch {s['batch']}, context {s['context']}, {s['variant']}: "
                      f"{s['reason']}" for s in self.skipped]
        if self.notes:
            lines += ["", "## Notes", "", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines) + "\n"

    def write(self, out_dir, stem, plot_x=None, plot_group=None):
        paths = super().write(out_dir, stem, plot_x, plot_group)
        with open(paths[0]) as f:  # the JSON: add what the harness's does not hold
            data = json.load(f)
        data.update(grid=self.grid, skipped=self.skipped, notes=self.notes,
                    summary=self.summary(), context_fill=self.context_fill)
        with open(paths[0], "w") as f:
            json.dump(data, f, indent=1)
        return paths

    def plot(self, path, x_key, group_keys):
        """Left: µs per step against batch, one line per variant and context. Right: compile_ops'
        speedup over inductor and inductor_native, one line per context."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot", file=sys.stderr)
            return None
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.6))
        contexts = sorted({r.case["context"] for r in self.results})
        styles = ["-", "--", ":", "-."]
        colors = dict(zip(VARIANTS, ["tab:gray", "tab:blue", "tab:red", "tab:green"]))
        for v in self.variants:
            for i, c in enumerate(contexts):
                pts = sorted((r.case[x_key], r.seconds * 1e6) for r in self.results
                             if r.variant == v and r.case["context"] == c)
                if pts:
                    ax.plot(*zip(*pts), marker="o", linestyle=styles[i % 4], color=colors[v],
                            label=f"{v}, context {c}")
        ax.set_ylabel("µs per decode step")
        ax.set_yscale("log")
        rows = self._rows()
        for j, over in enumerate(self.baselines):
            for i, c in enumerate(contexts):
                pts = sorted((b, self.speedup(vs, over)) for (b, ctx), vs in rows.items()
                             if ctx == c and self.speedup(vs, over))
                if pts:
                    ax2.plot(*zip(*pts), marker="os"[j], linestyle=styles[i % 4],
                             color=colors[over], label=f"over {over}, context {c}")
        ax2.axhline(1.0, color="black", linewidth=0.8)
        ax2.set_ylabel("compile_ops speedup (x)")
        for a in (ax, ax2):
            a.set_xscale("log", base=2)
            a.set_xlabel(x_key)
            a.grid(True, alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
        fig.suptitle(f"{self.name} on {self.info['device']} (torch {self.info['torch']})",
                     fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


# ---------------------------------------------------------------------------------------------
# The GPU run
# ---------------------------------------------------------------------------------------------
def _reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:240]}"


def _is_oom(exc: BaseException) -> bool:
    """Out of memory, also when compilation wraps it (BackendCompilerFailed and the like)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free() -> None:
    gc.collect()
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001  (a failed capture can leave an error behind)
        pass
    torch.cuda.empty_cache()


def bench_point(rep: E2EReport, model, ref, fns, variants, batch, context, seed) -> None:
    """Caches, then per variant: compile + first call (checked against the first variant that
    ran), CUDA-graph timing. Out of memory skips what it hits; so does any other failure."""
    cfg = model.cfg
    case = {"batch": batch, "context": context}
    label = f"batch {batch}, context {context}"
    print(f"{label}: filling the caches with random K/V ({cfg.layers} layers, "
          f"{batch * context} tokens per layer) ...", flush=True)
    t0 = time.perf_counter()
    try:
        point = Point(model, ref, batch, context, steps=1, seed=seed)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        if not _is_oom(exc):
            raise
        point = None
        reason = f"out of memory allocating / filling the KV caches ({_reason(exc)})"
    if point is None:
        _free()
        for name in variants:
            rep.skip(case, name, reason)
        return
    checked = sorted({0, batch - 1})
    check_fill(point, cfg, seqs=checked)  # the CUDA write, read back
    if ref is None:  # TP: the dense copy only served the check
        point.dense = None
    print(f"  filled in {time.perf_counter() - t0:.1f} s (paged == dense checked for sequence(s) "
          f"{', '.join(map(str, checked))})", flush=True)
    nbytes = step_bytes(cfg, batch, context)
    expected, expected_name = None, None
    for name in variants:
        fn = fns[name]
        try:
            what = "compiling + first call" if name != "eager" else "first call"
            print(f"{label}: {name}: {what} ...", flush=True)
            t0 = time.perf_counter()
            gen, counters = first_call(point, name, fn, 1)
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            extra = {"first_call_s": round(first_s, 2)}
            msg = ""
            if counters is not None:
                extra["passes"] = counters
                msg += "; matched " + ", ".join(f"{k} {v.get('matched', 0)}"
                                                for k, v in sorted(counters.items()))
                want = {"add_rms_norm": 2 * cfg.layers, "rope_cache": cfg.layers, "argmax": 1}
                if cfg.tp > 1 and _has_pass("allreduce_norm") and \
                        name != "compile_ops_no_add_rms_norm":  # it fuses add_rms_norm's output
                    want["allreduce_norm"] = allreduce_norm_expected(cfg)
                for pass_name, n in want.items():
                    got = counters.get(pass_name, {}).get("matched", 0)
                    if {**ABLATIONS, **TP_ABLATIONS}.get(name) != pass_name and got != n:
                        rep.notes.append(f"{label}: {name} decode graph: {pass_name} matched "
                                         f"{got}, expected {n} ({counters.get(pass_name)})")
            if expected is None:
                expected, expected_name = gen, name
            else:
                cmp = compare_generations(expected, gen, cfg.dtype, cfg.layers,
                                          tol=FP8_LOGITS_TOLERANCE if cfg.fp8 else None)
                extra["check"] = f"vs {expected_name}: {cmp.message}"
                msg += f"; vs {expected_name}: {cmp.message}"
                if not cmp.ok:
                    rep.notes.append(f"{label}: {name} MISMATCH vs {expected_name}: "
                                     f"{cmp.message}")
            print(f"  {first_s:.1f} s{msg}", flush=True)
            del gen

            def call(fn=fn, name=name, point=point):
                with torch.no_grad():
                    return run_step(point, name, fn, 0, point.first_tokens)

            timer = time_calls_lockstep if cfg.tp > 1 else harness.time_calls
            t = timer([call], nbytes, use_graph=True)
            rep.add(harness.Result(case, name, t["seconds"], nbytes, t["graph"], t["sets"],
                                   t["spread"], l2_resident=False, extra=extra))
            if PROFILE.get("path") and name in PROFILE["variants"]:
                try:
                    profile_step(call, f"{label}, {name}", PROFILE["path"])
                except Exception as exc:  # noqa: BLE001  (the timing stands without it)
                    print(f"  profile of {name} failed: {_reason(exc)}", flush=True)
        except Exception as exc:  # noqa: BLE001  (record it, go on with the next variant)
            if _is_oom(exc):
                rep.skip(case, name, f"out of memory ({_reason(exc)})")
            else:
                traceback.print_exc()
                rep.skip(case, name, f"failed: {_reason(exc)}", failure=True)
        finally:
            _free()
    del point
    _free()


def time_calls_lockstep(calls: list, bytes_per_call: int, *, use_graph: bool = True,
                        repeats: int = 20, min_ms: float = 20.0) -> dict:
    """harness.time_calls (CUDA graph) for the ranks of a TP model. Every replay holds
    all-reduces that pair the ranks up, so every rank must replay as often as the others: the
    replays per sample are agreed over the ranks (the most any rank asks for), and the result is
    the slowest rank's median (the step ends when the last rank's does)."""
    import torch.distributed as dist

    if not use_graph:
        raise ValueError("time_calls_lockstep times CUDA-graph replays only")

    def agree(value, dtype):
        t = torch.tensor([value], dtype=dtype, device="cuda")
        dist.all_reduce(t, dist.ReduceOp.MAX)
        return t.item()

    # thread_local: NCCL's watchdog thread queries events while this thread captures
    return harness.time_calls(calls, bytes_per_call, use_graph=True, repeats=repeats,
                              min_ms=min_ms, agree=agree, capture_error_mode="thread_local")


PROFILE = {}  # --profile: {"path": kernel-list file, "variants": [...]}


def profile_step(call, label: str, path: str, steps: int = 10) -> None:
    """The GPU kernels of one decode step (torch.profiler over `steps` plain calls after the
    timing): per kernel, launches and device time per step, appended to `path`."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            call()
        torch.cuda.synchronize()
    per = {}
    for e in prof.events():
        if e.device_type.name == "CUDA" and e.device_time > 0:
            n, t = per.get(e.name, (0, 0.0))
            per[e.name] = (n + 1, t + e.device_time)
    total = sum(t for _, t in per.values()) / steps
    with open(path, "a") as f:
        f.write(f"## {label}: {len(per)} kernels, {sum(n for n, _ in per.values()) / steps:.0f} "
                f"launches and {total:.1f} us of kernel time per step\n")
        for name, (n, t) in sorted(per.items(), key=lambda kv: -kv[1][1]):
            f.write(f"{t / steps:9.1f} us  x{n / steps:4.1f}  {name[:150]}\n")
        f.write("\n")


CONTEXT_FILL_TP = (
    "Context: random K/V (seeded normal, the model dtype) drawn per layer for all KV heads, each "
    "rank writing its own heads into its paged cache with reshape_and_cache at the slots "
    "PagedKVCache.prefill reserves (checked against a dense copy, then dropped). Tensor parallel "
    "{tp}: Megatron-style split (column-parallel qkv / gate_up, row-parallel o_proj / down_proj "
    "all-reduced; embedding, norms, lm_head replicated); every variant on the same TP model, "
    "timed in lockstep as CUDA-graph replays of one step (the replays per sample agreed over the "
    "ranks), the slowest rank's median reported; bytes and GB/s are one rank's (all-reduces not "
    "counted).")
CONTEXT_FILL = (
    "Context: random K/V (seeded normal, the model dtype) written per layer into the paged cache "
    "with reshape_and_cache at the slots PagedKVCache.prefill reserves, and the same values into "
    "the reference's dense cache (no prefill). Caches sized to context + 1 tokens; the timed step "
    "writes position `context` and attends over context + 1 tokens; every variant is timed as "
    "replays of a torch.cuda.CUDAGraph holding one step (compiled variants without "
    "reduce-overhead, captured like eager).")


def run_grid(rep, base, batches, contexts, variants, seed, out, stem, device="cuda",
             write: bool = True) -> list:
    """Per context: the model (caches and tables sized to it) and its compiled steps; per batch:
    bench_point, then the report is rewritten (``write``: TP ranks other than 0 do not).
    Returns the written paths."""
    paths = []
    for context in contexts:
        cfg = sized_config(base, context, 1)
        print(f"context {context}: building the model (random weights, max_seq_len "
              f"{cfg.max_seq_len}) ...", flush=True)
        torch._dynamo.reset()  # drop the previous context's compiled steps
        model = Llama(cfg, seed=seed, device=device)
        ref = LlamaReference(model) if cfg.tp == 1 else None
        fns = step_fns(model, ref)
        for batch in batches:
            bench_point(rep, model, ref, fns, variants, batch, context, seed)
            if write:
                paths = rep.write(out, stem, plot_x="batch", plot_group=["context"])
        del model, ref, fns
        _free()
    return paths


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=BATCHES,
                   help="sequences per step (one new token each)")
    p.add_argument("--context", type=int, nargs="+", default=CONTEXTS,
                   help="tokens already in each sequence's cache")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of Llama 3 8B's shapes")
    p.add_argument("--fp8", choices=("dynamic", "static"), default=None,
                   help="FP8 (W8A8) projections: per-channel FP8 weights, activations quantized "
                        "per token at run time (dynamic) or with one static scale per input "
                        "(static): the 8b-<n>layers-fp8(-static) configs of the main job")
    p.add_argument("--variants", nargs="+", default=None, choices=ALL_VARIANTS,
                   help="default: " + " ".join(VARIANTS) + " (--tp: " + " ".join(TP_VARIANTS)
                   + ")")
    p.add_argument("--ablate", action="store_true",
                   help="also time compile_ops without each of its passes (" +
                        ", ".join(ABLATIONS) + "): the time each rewrite saves per step")
    p.add_argument("--quick", action="store_true", help="batch 1, 32 and context 512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stem", default=None, help="output file stem (default e2e_<device>)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks: run under torchrun --nproc-per-node N (one GPU "
                        "per rank; with --cpu-check gloo on the CPU); variants " +
                        ", ".join(TP_VARIANTS) + " (--ablate: + " + ", ".join(TP_ABLATIONS) +
                        "); rank 0 writes e2e_tp<N>_<device>.*")
    p.add_argument("--profile", nargs="*", default=None, metavar="VARIANT",
                   help="also write the kernel list of one step (torch.profiler) of these "
                        "variants (none named: compile_ops and inductor_native) to "
                        "<out>/<stem>_kernels.md")
    harness.add_common_args(p)
    args = p.parse_args()
    if args.quick:
        args.batch, args.context = QUICK_BATCHES, QUICK_CONTEXTS
    if min(args.batch) < 1 or min(args.context) < 1 or args.layers < 1:
        p.error("--batch, --context and --layers must be >= 1")
    if args.tp < 1:
        p.error("--tp must be >= 1")
    if args.tp == 1:
        if args.variants and set(args.variants) & set(TP_ABLATIONS):
            p.error(f"{', '.join(TP_ABLATIONS)}: only with --tp > 1")
        args.variants = args.variants or list(VARIANTS)
        return run(args)
    return run_tp(p, args)


def run(args, rank: int = 0) -> int:
    dtype, copy_bw = harness.start(args)
    if args.cpu_check:
        if args.tp > 1:
            cpu_check_tp(args.tp)
        else:
            cpu_check()
        return 0

    ablations = {**ABLATIONS, **TP_ABLATIONS} if args.tp > 1 else ABLATIONS
    variants = [v for v in ALL_VARIANTS if v in args.variants or (args.ablate and v in ablations)]
    base = LlamaConfig.llama3_8b_layers(args.layers, dtype=dtype, fp8=args.fp8 or "",
                                        **({"tp": args.tp} if args.tp > 1 else {}))
    grid = [(b, c) for c in args.context for b in args.batch]
    fp8 = f", FP8 {args.fp8}" if args.fp8 else ""
    if args.tp == 1:
        rep = E2EReport(f"decode step, {args.layers} layers of Llama 3 8B ({args.dtype}{fp8})",
                        copy_bw, "inductor", ["batch", "context"], grid=grid,
                        context_fill=CONTEXT_FILL)
    else:
        rep = E2EReport(f"decode step, {args.layers} layers of Llama 3 8B ({args.dtype}{fp8}), "
                        f"tensor parallel {args.tp}", copy_bw, "inductor", ["batch", "context"],
                        grid=grid, context_fill=CONTEXT_FILL_TP.format(tp=args.tp),
                        variants=TP_VARIANTS, baselines=("inductor",))
    prefix = f"e2e_fp8_{args.fp8}" if args.fp8 else "e2e"
    stem = args.stem or harness.device_stem(prefix + (f"_tp{args.tp}" if args.tp > 1 else ""))
    if args.profile is not None:
        PROFILE["variants"] = args.profile or (["compile_ops", "inductor_native"]
                                               if args.tp == 1 else ["compile_ops", "inductor"])
        if rank:  # the profiled steps run on every rank (their all-reduces); rank 0 writes
            PROFILE["path"] = os.devnull
        else:
            os.makedirs(args.out, exist_ok=True)
            PROFILE["path"] = os.path.join(args.out, f"{stem}_kernels.md")
            with open(PROFILE["path"], "w") as f:
                f.write(f"# Kernels of one decode step ({base.describe()}), torch.profiler over "
                        f"10 plain calls (not graph replays), {torch.cuda.get_device_name()}, "
                        f"torch {torch.__version__}\n\n")
    print(f"model: {base.describe()}; variants: {', '.join(variants)}; grid (batch x context): "
          f"{', '.join(f'{b}x{c}' for b, c in grid)}", flush=True)
    device = f"cuda:{torch.cuda.current_device()}" if args.tp > 1 else "cuda"
    paths = run_grid(rep, base, args.batch, args.context, variants, args.seed, args.out, stem,
                     device=device, write=rank == 0)
    print("wrote", *paths)
    print(f"{rep.name}:", *rep.summary(), sep="\n  ")
    if rep.failed:
        print("some variants failed (see the skipped list)")
        return 1
    return 0


def run_tp(p, args) -> int:
    """--tp N under torchrun: every rank runs the grid in lockstep, rank 0 prints and writes;
    the exit code is the worst rank's."""
    import torch.distributed as dist

    from compile_ops.models.llama import init_tp

    try:  # sizes that do not split: said before anything starts
        if args.cpu_check:
            LlamaConfig.tiny(tp=args.tp)
        else:
            LlamaConfig.llama3_8b_layers(args.layers, tp=args.tp)
    except ValueError as exc:
        p.error(str(exc))
    args.variants = args.variants or list(TP_VARIANTS)
    if "inductor_native" in args.variants:
        p.error("--tp: inductor_native is the one-process plain-PyTorch model, not split "
                f"(variants: {', '.join(TP_VARIANTS + tuple(ABLATIONS) + tuple(TP_ABLATIONS))})")
    rank, device = init_tp(args.tp, "cpu" if args.cpu_check else "cuda", p.error)
    if rank:
        sys.stdout = open(os.devnull, "w")
    try:
        rc = run(args, rank)
        worst = torch.tensor([rc], device=device)
        dist.all_reduce(worst, dist.ReduceOp.MAX)
        return int(worst.item())
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
