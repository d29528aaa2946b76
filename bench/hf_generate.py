"""``bench_hf.py --generate``: transformers' own ``generate()`` with its documented compiled-decode
recipe, per model family (issue 24). See bench_hf.py's docstring for what is measured and the
commands; this module holds the generate mode (the points, the workers, the reports).

One point = (family, batch, max_cache_len). Its prompt (``context`` random tokens, by default
max_cache_len / 2; ``--left-pad K``: the first K tokens of every other row masked) and one
``StaticCache`` serve every variant; each variant runs

    model.generate(ids, attention_mask=mask, cache=<the StaticCache>,   # past_key_values= on 5.17
                   max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=...,
                   compile_config=CompileConfig(backend=..., mode="reduce-overhead",
                                                fullgraph=True, dynamic=False))

(``cache.reset()`` before each call; ``disable_compile=True`` for eager). generate() prefills
eagerly and runs the compiled forward for every decode step, so

    decode tokens/s = batch * (N - 1) / (t(N) - t(1))

with t(n) the best (``--stat median``: the median) of ``--repeats`` generate() calls of n new
tokens, synchronized. Before the timed calls a compiled variant is warmed up with a short prompt
(the decode graph does not depend on the prompt length: it compiles, records its CUDA graphs and
runs Triton's autotuning there, light GPU work), then one full-size call (its greedy tokens are
compared with eager's at the same point). On the CPU (defaults ``--timing loop --interleave``,
one thread for the tiny models) the decode time is instead the span from the first generated
token to the last inside each generate(N) (a logits processor notes the times: no noisy prefill
to subtract), on the thread's CPU clock, and the variants of a point (each its own module, the
weights shared) are warmed up side by side and timed round-robin, so that a shared host's load
falls on all of them alike. Every variant's decode step may compile at most ``MAX_GRAPHS`` graphs
(more fails the variant with a note: Dynamo recompiling per token).

Workers (``--workers K``): families run in K subprocesses at once, each pinned to its own share
of the CPU cores (``os.sched_setaffinity``, ``TORCHINDUCTOR_COMPILE_THREADS`` and
``OMP_NUM_THREADS`` set to the share), so their compiles overlap; whatever runs big GPU work
(the full-size calls, eager's, the timed calls) holds an exclusive ``fcntl.flock`` on
``<out>/<stem>.lock``, so one process times at a time while the others only compile. A point
whose weights + KV cache would hold more than the GPU's memory / K runs whole under the lock
(compile included: its cache would otherwise crowd the others').

Results are appended per variant to ``<out>/<stem>.points/<family>.jsonl`` as they come (a crash
or a timeout keeps them); the report (``<stem>.md``: a table per family; ``<stem>.json``: all
points; ``<stem>_<family>.png``) is rebuilt from every points file in ``<out>``, the last record
of a (family, point, variant) winning, so a later run with ``--points`` fills in or replaces
points of an earlier one (``--report-only`` rebuilds it without running anything).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import glob
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402  (puts the checkout on sys.path)

VARIANTS = ("eager", "inductor", "compile_ops", "compile_ops-attn")
CPU_VARIANTS = ("eager", "inductor", "compile_ops")
DEFAULTS = {  # device: batch, max_cache_len, new tokens, repeats
    "cuda": dict(batch=(1, 8, 32), cache_len=(512, 4096, 16384), new_tokens=64, repeats=2),
    "cpu": dict(batch=(1, 4), cache_len=(256, 2048), new_tokens=16, repeats=10),
}
WARMUP_PROMPT = 8  # tokens of the warm-up calls' prompt
WARMUP_NEW = 5  # new tokens of the warm-up calls: 4 decode steps (warm-up, record, replays)
KILL_GRACE_S = 90  # workers still running this long after --time-budget are ended
REPORT_EVERY_S = 30  # --workers: the report rewritten at most this often while points come in
MAX_GRAPHS = 2  # compiled graphs of the decode step per variant before it fails (no_recompiles)


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------
def variant_ok(v: str) -> str:
    """eager, inductor, compile_ops, compile_ops-attn (the model loaded with
    attn_implementation="compile_ops", compiled with backend "inductor"), or
    compile_ops-<pass>[-<pass>...]: backend compile_ops without those passes."""
    import argparse

    if v in VARIANTS:
        return v
    if v.startswith("compile_ops-"):
        import lowerings

        names = {p.name for p in lowerings.pass_manager().passes}
        for name in v[len("compile_ops-"):].split("-"):
            if name not in names:
                raise argparse.ArgumentTypeError(
                    f"{v}: no pass named {name!r} ({sorted(names)}; or compile_ops-attn)")
        return v
    raise argparse.ArgumentTypeError(f"unknown variant {v!r}")


def backend_of(variant: str):
    """(torch.compile backend or None for eager, attn_implementation or None for the model's)."""
    if variant == "eager":
        return None, None
    if variant == "compile_ops-attn":
        return "inductor", "compile_ops"
    if variant.startswith("compile_ops"):
        return "compile_ops", None
    return variant, None


class AblatedBackend:
    """Backend compile_ops without the passes `drop` (the variant compile_ops-<a>-<b>): a
    backend of its own, so Dynamo keeps its graphs apart from plain compile_ops' (a string
    backend would match theirs and reuse them)."""

    def __init__(self, drop):
        self.drop = frozenset(drop)
        self.__name__ = "compile_ops-" + "-".join(sorted(self.drop))

    def __call__(self, gm, example_inputs, mode=None, options=None):
        import lowerings
        from lowerings.backend import compile_ops_backend

        pm = lowerings.pass_manager()
        saved = list(pm.passes)
        pm.passes = [p for p in saved if p.name not in self.drop]
        try:
            return compile_ops_backend(gm, example_inputs, mode=mode, options=options)
        finally:
            pm.passes = saved


_ABLATED: dict = {}


def compile_backend(variant: str):
    """What CompileConfig(backend=...) gets for a compiled variant."""
    kind, _ = backend_of(variant)
    if variant.startswith("compile_ops-") and variant != "compile_ops-attn":
        drop = variant[len("compile_ops-"):].split("-")
        return _ABLATED.setdefault(variant, AblatedBackend(drop))
    return kind


@contextlib.contextmanager
def variant_context(variant: str, policy: str | None = None):
    """For backend compile_ops no FX graph / AOT autograd cache (a cache hit would compile without
    running the passes: no counters); the pass device policy `policy` (None: the default,
    "auto")."""
    import lowerings

    backend, _ = backend_of(variant)
    with contextlib.ExitStack() as stack:
        if backend == "compile_ops":
            stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
            import torch._functorch.config as fconfig

            if hasattr(fconfig, "enable_autograd_cache"):
                stack.enter_context(fconfig.patch(enable_autograd_cache=False))
        if policy is not None:
            stack.enter_context(lowerings.pass_devices(policy))
        yield


# ---------------------------------------------------------------------------------------------
# transformers differences (5.17 .. 5.25)
# ---------------------------------------------------------------------------------------------
def cache_kwarg(model) -> str:
    """generate()'s cache keyword: 5.25 deprecates ``past_key_values`` for ``cache``; 5.17 only
    knows ``past_key_values``. The model's forward signature tells which one it takes (the
    keyword goes through generate() to the forward)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def compile_config(backend: str, device: str, mode: str | None):
    from transformers import CompileConfig

    cc = CompileConfig(backend=backend, mode=mode, fullgraph=True, dynamic=False)
    if device != "cuda":
        cc._compile_all_devices = True  # transformers compiles only on accelerators otherwise
    return cc


def forget_compiled_call(model) -> None:
    """generate() keeps ``model._compiled_call`` while the CompileConfig compares equal (inductor
    and compile_ops-attn do): start each variant from none."""
    for attr in ("_compiled_call", "_last_compile_config"):
        model.__dict__.pop(attr, None)


def set_attention(model, name: str) -> None:
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)


# ---------------------------------------------------------------------------------------------
# One point
# ---------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_prompt(config, batch: int, context: int, left_pad: int, seed: int, device: str):
    """Random token ids [batch, context] (special ids avoided) and the attention mask: with
    `left_pad`, the first `left_pad` tokens of rows 1, 3, ... are padding."""
    g = torch.Generator().manual_seed(seed)
    low = 4 if config.vocab_size > 8 else 0
    ids = torch.randint(low, config.vocab_size, (batch, context), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        mask[1::2, :left_pad] = 0
        ids[1::2, :left_pad] = pad_id(config)
    return ids.to(device), mask.to(device)


def pad_id(config) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(config, name, None)
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def est_bytes(config, batch: int, cache_len: int, context: int, elem: int) -> tuple[int, int]:
    """Rough GPU memory of a point: (resident: weights and the KV cache, what a worker holds
    while it compiles; peak: plus the full-size prefill's activations, the hidden states, the
    MLP's three intermediates, SDPA's [batch, 1, context, max_cache_len] mask and its float
    form)."""
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * batch * cache_len * config.num_key_value_heads * head
    h, i, v, layers = (config.hidden_size, config.intermediate_size, config.vocab_size,
                       config.num_hidden_layers)
    weights = 2 * v * h + layers * (4 * h * h + 3 * h * i)
    tokens = batch * context
    resident = elem * (weights + kv)
    return resident, resident + elem * tokens * (4 * h + 3 * i) + 3 * tokens * cache_len


class GpuLock:
    """An exclusive flock on `path` (None: no lock) while big GPU work runs. Re-entrant."""

    def __init__(self, path: str | None):
        self.path, self.fd, self.depth, self.waited = path, None, 0, 0.0

    @contextlib.contextmanager
    def held(self):
        if self.path is None:
            yield
            return
        if self.depth == 0:
            t = time.perf_counter()
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            self.waited += time.perf_counter() - t
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
                self.fd = None


def dynamo_stats() -> dict:
    from torch._dynamo.utils import counters

    stats = {"graphs": counters["stats"].get("unique_graphs", 0),
             "graph_breaks": sum(counters["graph_break"].values())}
    for k, n in counters["inductor"].items():
        if "cudagraph" in k:
            stats[k] = n
    return stats


def no_recompiles(limit: int = MAX_GRAPHS):
    """A decode step compiles once (dynamic=False, one shape per point): a third graph of the same
    code raises instead of compiling on (e.g. a sliding-window StaticCache layer's Python int
    ``cumulative_length_int`` is guarded on and changes every step: one compile per token)."""
    cfg = torch._dynamo.config
    patch = {k: v for k, v in (("recompile_limit", limit),
                               ("fail_on_recompile_limit_hit", True)) if hasattr(cfg, k)}
    return cfg.patch(**patch)


def last_guard_failure() -> str:
    try:
        from torch._dynamo.utils import guard_failures

        reasons = [r for rs in guard_failures.values() for r in rs]
        return str(reasons[-1]).strip().splitlines()[0][:300] if reasons else "guard unknown"
    except Exception:  # noqa: BLE001  (a private table: best effort)
        return "guard unknown"


def pass_counters() -> dict:
    import lowerings

    return {k: dict(v) for k, v in lowerings.counters().items() if v}


def host_clock(device: str):
    """The clock of the timings: wall time; on the CPU with one thread, this thread's CPU time
    (every op then runs on the calling thread, so it counts all of the work and none of the time
    other processes take the core: stable on a shared host)."""
    if device == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time, "thread CPU time"
    return time.perf_counter, "wall time"


class StepClock:
    """A logits processor that notes the time at each generated token (it changes nothing):
    the span from the first note (after the prefill) to the last is the N - 1 decode steps,
    prefill excluded. Host time: the CPU's decode time; on the GPU only where each step
    synchronizes, so there it is recorded, not used."""

    def __init__(self, clock=time.perf_counter):
        self.stamps, self.clock = [], clock

    def __call__(self, input_ids, scores):
        self.stamps.append(self.clock())
        return scores

    def span(self):
        return self.stamps[-1] - self.stamps[0] if len(self.stamps) > 1 else None


class VariantRun:
    """One variant at one point: its model (with the variant's attention), generate()'s keyword
    arguments, and what its calls measured."""

    def __init__(self, model, variant, cache, new_tokens, *, device, mode):
        from transformers import LogitsProcessorList

        self.model, self.variant, self.cache, self.n = model, variant, cache, new_tokens
        self.device = device
        self.backend, attn = backend_of(variant)
        forget_compiled_call(model)
        set_attention(model, attn or model._bench_attn)
        self.kw = dict(do_sample=False, pad_token_id=pad_id(model.config),
                       **{cache_kwarg(model): cache})
        if self.backend is None:
            self.kw["disable_compile"] = True
        else:
            self.kw["compile_config"] = compile_config(compile_backend(variant), device, mode)
        self.now, _ = host_clock(device)
        self.processors = LogitsProcessorList
        self.t1, self.tn, self.spans = [], [], []
        self.rec = {"variant": variant}

    def generate(self, ids, mask, n):
        """Seconds of one generate() of n new tokens (synchronized), the new tokens."""
        self.cache.reset()
        clock = StepClock(self.now)
        sync(self.device)
        t = self.now()
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n,
                                      min_new_tokens=n,
                                      logits_processor=self.processors([clock]), **self.kw)
        sync(self.device)
        return self.now() - t, out[:, ids.shape[1]:], clock.span()

    def warm_up(self, prompt, mask, policy=None):
        """Compile and record the CUDA graphs (a short prompt: light GPU work); the compile's
        pass counters and Dynamo's."""
        import lowerings

        lowerings.reset_counters()
        before = dynamo_stats()
        t0 = time.perf_counter()
        with variant_context(self.variant, policy):
            if self.backend is not None:
                w = min(WARMUP_PROMPT, prompt.shape[1])
                self.generate(prompt[:, -w:], torch.ones_like(mask[:, -w:]), WARMUP_NEW)
        after = dynamo_stats()
        self.rec.update(warmup_s=time.perf_counter() - t0,
                        compile={k: after.get(k, 0) - before.get(k, 0) for k in after},
                        passes=pass_counters() if self.backend == "compile_ops" else None)

    def first_call(self, prompt, mask):
        """One full-size call (the last of the warm-up): its greedy tokens."""
        self.tokens = self.generate(prompt, mask, self.n)[1].cpu()

    def timed_round(self, prompt, mask):
        self.t1.append(self.generate(prompt, mask, 1)[0])
        t, _, span = self.generate(prompt, mask, self.n)
        self.tn.append(t)
        if span is not None:
            self.spans.append(span)

    def result(self, batch, stat, timing, recompiled) -> dict:
        pick = min if stat == "best" else statistics.median
        t1, tn, n = self.t1, self.tn, self.n
        diff = pick(tn) - pick(t1)
        loop = pick(self.spans) if len(self.spans) == len(tn) and self.spans else None
        dt = loop if timing == "loop" and loop is not None else diff
        rec = dict(self.rec, t1_s=t1, tn_s=tn, loop_s=self.spans, decode_diff_s=diff,
                   decode_loop_s=loop, timing="loop" if dt is loop else "diff", decode_s=dt,
                   tokens=self.tokens,
                   tokens_per_s=batch * (n - 1) / dt if dt > 0 and n > 1 else None,
                   ms_per_step=1e3 * dt / (n - 1) if n > 1 else None,
                   recompiles_timed=recompiled)
        notes = []
        if recompiled:
            notes.append(f"compiled again after the warm-up: {recompiled}")
        if rec["compile"].get("graph_breaks"):
            notes.append(f"{rec['compile']['graph_breaks']} graph breaks")
        if diff <= 0:
            notes.append(f"t(N) <= t(1): {pick(tn):.4f} <= {pick(t1):.4f} s")
        rec["note"] = "; ".join(notes)
        return rec


def _changed(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after
            if after.get(k, 0) != before.get(k, 0)}


def run_variant(model, variant, prompt, mask, cache, new_tokens, *, device, mode, repeats,
                stat="best", timing="diff", lock=None, whole_under_lock=False, policy=None,
                log=print):
    """Warm up, then time generate() of 1 and `new_tokens` new tokens, `repeats` times each.
    Returns a dict (the greedy tokens under "tokens", a CPU tensor). timing "diff": decode time
    t(N) - t(1); "loop": the decode steps' span inside the t(N) calls (StepClock)."""
    lock = lock or GpuLock(None)
    torch._dynamo.reset()
    run = VariantRun(model, variant, cache, new_tokens, device=device, mode=mode)
    with no_recompiles(), (lock.held() if whole_under_lock else contextlib.nullcontext()):
        run.warm_up(prompt, mask, policy)
        compiled = dynamo_stats()
        with lock.held():
            run.first_call(prompt, mask)
            for _ in range(repeats):
                run.timed_round(prompt, mask)
    return run.result(prompt.shape[0], stat, timing, _changed(compiled, dynamo_stats()))


def variant_model(model, variant):
    """A module of its own for `variant` sharing `model`'s parameters and buffers (so that
    several variants' compiled forwards live side by side: interleaved timing). Its
    ``__call__``, what generate() compiles (``torch.compile(self.__call__)``), is a plain
    function of its own code object: Dynamo keeps its compiled code per code object, and all the
    bound ``__call__`` methods share one (Dynamo's wrapper), where every step of an
    earlier-compiled variant would first fail the guards of the later ones (measured: 1-3% of
    the tiny models' step)."""
    import copy

    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    m = copy.deepcopy(model, memo)
    m._bench_attn = model._bench_attn
    ns = {"module": m}
    exec("def call(*args, **kwargs):\n"  # noqa: S102  (a fresh code object per variant)
         "    return module._wrapped_call_impl(*args, **kwargs)\n", ns)
    m.__dict__["__call__"] = ns["call"]
    return m


def run_interleaved(model, variants, prompt, mask, cache, new_tokens, *, device, mode, repeats,
                    stat="best", timing="diff", lock=None, policy=None, log=print):
    """Every variant warmed up (each on a module of its own, weights shared), then `repeats`
    rounds each timing every variant once, the order rotated: slow drifts of a shared host's load
    fall on all variants alike. Returns {variant: record or exception}."""
    lock = lock or GpuLock(None)
    torch._dynamo.reset()
    runs, out = {}, {}
    with no_recompiles(MAX_GRAPHS * len(variants)):
        for v in variants:
            try:
                run = VariantRun(variant_model(model, v), v, cache, new_tokens, device=device,
                                 mode=mode)
                run.warm_up(prompt, mask, policy)
                with lock.held():
                    run.first_call(prompt, mask)
                runs[v] = run
            except Exception as exc:  # noqa: BLE001  (the caller records it)
                out[v] = exc
        compiled = dynamo_stats()
        with lock.held():
            order = list(runs.values())
            for r in range(repeats):  # each round starts one variant later: no order bias
                for run in order[r % len(order):] + order[:r % len(order)]:
                    run.timed_round(prompt, mask)
    recompiled = _changed(compiled, dynamo_stats())
    for v, run in runs.items():
        out[v] = run.result(prompt.shape[0], stat, timing, recompiled)
        forget_compiled_call(run.model)
    return out


def compare_tokens(tokens, ref) -> tuple[float | None, int | None]:
    """Fraction of equal tokens, first step where any row differs (None: none)."""
    if ref is None or tokens.shape != ref.shape:
        return None, None
    eq = tokens == ref
    bad = (~eq).any(0).nonzero()
    return eq.float().mean().item(), (int(bad[0]) if len(bad) else None)


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_point(model, family, batch, cache_len, args, *, lock, emit, policy=None, log=print):
    """Every variant at one point; emit(record) for each."""
    from transformers import StaticCache

    cfg = model.config
    context = args.context if args.context is not None else cache_len // 2
    base = {"family": family, "batch": batch, "max_cache_len": cache_len, "context": context,
            "new_tokens": args.new_tokens, "left_pad": args.left_pad}
    if context + args.new_tokens > cache_len or args.left_pad >= context:
        for v in args.variants:
            emit(dict(base, variant=v, note=f"skipped: context {context} + {args.new_tokens} new "
                      f"tokens do not fit {cache_len} slots (or --left-pad >= context)"))
        return
    resident, peak = est_bytes(cfg, batch, cache_len, context,
                               next(model.parameters()).element_size())
    base["est_gb"] = {"resident": round(resident / 1e9, 1), "peak": round(peak / 1e9, 1)}
    # the full-size calls run under the lock anyway; a worker that would hold more than its share
    # of the GPU while it compiles does that under the lock too
    heavy = (args.device == "cuda" and args.workers_total > 1 and
             resident > torch.cuda.get_device_properties(0).total_memory / args.workers_total)
    prompt, mask = make_prompt(cfg, batch, context, args.left_pad, args.seed, args.device)
    cache = StaticCache(config=cfg, max_cache_len=cache_len)
    eager = None
    kw = dict(device=args.device, mode=args.mode, repeats=args.repeats, stat=args.stat,
              timing=args.timing, lock=lock, policy=policy, log=log)

    def finish(rec):
        nonlocal eager
        tokens = rec.pop("tokens", None)
        if tokens is not None:
            if rec["variant"] == "eager":
                eager = tokens
            rec["tokens_equal_eager"], rec["first_diff_step"] = compare_tokens(tokens, eager)
        if heavy:
            rec["note"] = "; ".join(x for x in (rec.get("note"), "whole under the lock") if x)
        emit(rec)

    try:
        if args.interleave:
            try:
                got = run_interleaved(model, args.variants, prompt, mask, cache,
                                      args.new_tokens, **kw)
            except Exception as exc:  # noqa: BLE001  (record it, go on)
                got = {v: exc for v in args.variants}
            for v in args.variants:
                r = got.get(v)
                finish(dict(base, variant=v, note=failure_note(r))
                       if isinstance(r, BaseException) else dict(base, **r))
            return
        for variant in args.variants:
            rec = dict(base, variant=variant)
            label = f"{family} batch {batch} x max_cache_len {cache_len}: {variant}"
            for attempt in (0, 1):
                oom = None
                try:
                    rec.update(run_variant(model, variant, prompt, mask, cache, args.new_tokens,
                                           whole_under_lock=heavy or attempt == 1, **kw))
                    break
                except torch.OutOfMemoryError as exc:
                    oom = str(exc).splitlines()[0][:200]
                except Exception as exc:  # noqa: BLE001  (record it, go on)
                    rec["note"] = failure_note(exc)
                    break
                # out of memory (the exception and its frames gone by now: their memory too)
                torch._dynamo.reset()
                free(args.device)
                if attempt == 0 and not heavy and lock.path is not None:
                    log(f"{label}: out of memory; again, whole under the lock")
                    continue
                rec["note"] = f"out of memory: {oom}"
            finish(rec)
            forget_compiled_call(model)
            torch._dynamo.reset()  # the variant's CUDA graphs and their memory pool too
            free(args.device)
    finally:
        del cache, prompt, mask
        torch._dynamo.reset()
        free(args.device)


def failure_note(exc) -> str:
    if type(exc).__name__ == "FailOnRecompileLimitHit":
        return (f"failed: the decode step compiled more than {MAX_GRAPHS} graphs (recompiles "
                f"per token?): {last_guard_failure()}")
    if isinstance(exc, torch.OutOfMemoryError):
        return f"out of memory: {str(exc).splitlines()[0][:200]}"
    traceback.print_exception(exc)
    return f"failed: {type(exc).__name__}: {str(exc)[:300]}"


def points_of(args, family):
    if args.points:
        out = []
        for p in args.points:
            fam, _, bl = p.rpartition(":")
            if fam and fam != family:
                continue
            b, l = bl.lower().split("x")
            out.append((int(b), int(l)))
        return out
    return [(b, l) for l in args.cache_len for b in args.batch]


def build(family, args, dtype):
    """compile_ops.hf.build's model; without a sliding window unless --keep-sliding-window:
    transformers' StaticCache makes sliding-window layers (Mistral-7B-v0.1's 4096 included, even
    where max_cache_len is within the window) whose Python-int length Dynamo guards on, so the
    compiled decode step recompiles at every token. Mistral-7B-v0.2 / v0.3 have no window."""
    import transformers

    import compile_ops.hf as hf

    cfg = hf.config(family, tiny=args.tiny, layers=args.layers)
    if getattr(cfg, "sliding_window", None) is not None and not args.keep_sliding_window:
        cfg.sliding_window = None
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model = model.to(dtype).eval()
    model._bench_attn = model.config._attn_implementation
    return model


def run_family(family, args, *, emit, deadline, lock, policy=None, log=print):
    dtype = torch.float32 if args.device == "cpu" else harness.DTYPES[args.dtype]
    pts = points_of(args, family)
    if not pts:
        return
    model = build(family, args, dtype)
    try:
        for batch, cache_len in pts:
            if deadline is not None and time.time() > deadline:
                for v in args.variants:
                    emit({"family": family, "batch": batch, "max_cache_len": cache_len,
                          "new_tokens": args.new_tokens, "left_pad": args.left_pad,
                          "variant": v, "note": "not run: --time-budget spent"})
                continue
            run_point(model, family, batch, cache_len, args, lock=lock, emit=emit, policy=policy,
                      log=log)
    finally:
        del model
        free(args.device)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def device_short(device: str) -> str:
    if device == "cuda":
        return harness.device_stem("x")[2:]
    return "cpu"


def stem_of(args) -> str:
    parts = ["hf_generate", device_short(args.device)]
    if args.tiny:
        parts.append("tiny")
    elif args.device == "cpu":
        parts.append(f"{args.layers}l")
    return "_".join(parts)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def run_info(args) -> dict:
    import transformers

    if args.device == "cuda":
        info = harness.device_info()
    else:
        info = {"device": f"{cpu_name()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} "
                          "threads)", "torch": torch.__version__, "triton": None}
    info["transformers"] = transformers.__version__
    info["python"] = platform.python_version()
    return info


class PointsFile:
    """Appends one JSON line per record (flushed and synced: a crash keeps what came before)."""

    def __init__(self, path: str, info: dict, setup: dict):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path, self.info, self.setup = path, info, setup

    def __call__(self, rec: dict) -> None:
        rec = dict(rec, info=self.info, setup=self.setup, time=time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())


def load_points(out: str, stem: str) -> list[dict]:
    recs = {}
    for path in sorted(glob.glob(os.path.join(out, f"{stem}.points", "*.jsonl"))):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                key = (r["family"], r["batch"], r["max_cache_len"], r.get("context"),
                       r.get("new_tokens"), r.get("left_pad"), r["variant"])
                if key in recs and "tokens_per_s" in recs[key] and "tokens_per_s" not in r \
                        and r.get("note", "").startswith("not run"):
                    continue  # a later run's skip does not hide an earlier measurement
                recs[key] = r
    fams = ("llama", "qwen2", "mistral", "gemma", "phi3", "qwen3")  # compile_ops.hf.FAMILIES
    return sorted(recs.values(), key=lambda r: (
        fams.index(r["family"]) if r["family"] in fams else len(fams), r["family"],
        r["max_cache_len"], r["batch"], r.get("context") or 0, r.get("left_pad") or 0))


def _fmt_rate(r):
    v = r.get("tokens_per_s") if r else None
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _short_passes(p: dict | None) -> str:
    if not p:
        return "-"
    matched = [f"{k} {v['matched']}" for k, v in p.items() if v.get("matched")]
    skipped = [k for k, v in p.items() if any(x.startswith("skipped") for x in v)]
    s = ", ".join(matched) or "none matched"
    return s + (f" ({len(skipped)} skipped by the device policy)" if skipped else "")


def markdown(recs: list[dict], stem: str) -> str:
    families = []
    for r in recs:
        if r["family"] not in families:
            families.append(r["family"])
    info = next((r["info"] for r in recs if r.get("info")), {})
    setup = next((r["setup"] for r in recs if r.get("setup")), {})
    variants = []
    for r in recs:
        if r["variant"] not in variants:
            variants.append(r["variant"])
    order = [v for v in VARIANTS if v in variants] + [v for v in variants if v not in VARIANTS]
    ratio_vs = [v for v in order if v.startswith("compile_ops")] if "inductor" in order else []
    lines = [f"# Hugging Face generate(), compiled decode, on {info.get('device', '?')}", "",
             f"torch {info.get('torch')}" + (f" (CUDA {info['cuda']})" if info.get("cuda") else "")
             + f", triton {info.get('triton')}, transformers {info.get('transformers')}. "
             f"{setup.get('model', '')}, {setup.get('dtype', '')}; random weights and prompt. "
             f"`model.generate(..., StaticCache(max_cache_len), max_new_tokens=N, "
             f"min_new_tokens=N, do_sample=False, compile_config=CompileConfig(backend, "
             f"mode={setup.get('mode')!r}, fullgraph=True, dynamic=False))`; eager: "
             f"`disable_compile=True`; compile_ops-attn: attn_implementation=\"compile_ops\", "
             f"backend inductor. "
             + (f"Decode tokens/s = batch * (N - 1) / T, T the {setup.get('stat', 'best')} of "
                f"{setup.get('repeats')} generate(N) calls (after warm-up) of the time from "
                f"the first generated token to the last (prefill excluded; "
                f"{setup.get('threads')} threads; clock: {setup.get('clock', 'wall time')}"
                + ("; variants interleaved: each round times every variant once" if
                   setup.get("interleave") else "") + "). "
                if setup.get("timing") == "loop" else
                f"Decode tokens/s = batch * (N - 1) / (t(N) - t(1)), t the "
                f"{setup.get('stat', 'best')} of {setup.get('repeats')} synchronized "
                f"generate() calls after warm-up. ") +
             f"`x inductor` > 1: faster than backend=\"inductor\". `= eager`: fraction of the "
             f"greedy tokens equal to eager's"
             + (" (random bf16 weights have near ties: informative, not a check)."
                if setup.get("dtype") != "float32" else ".")
             + " `passes`: matches of compile_ops' passes in the decode graph.", ""]
    for fam in families:
        rows: dict[tuple, dict] = {}
        for r in recs:
            if r["family"] == fam:
                key = (r["batch"], r["max_cache_len"], r.get("context"), r.get("new_tokens"),
                       r.get("left_pad"))
                rows.setdefault(key, {})[r["variant"]] = r
        lines += [f"## {fam}", "",
                  "| batch | max_cache_len | context | N | left pad | "
                  + " | ".join(f"{v} tok/s" for v in order) + " | "
                  + " | ".join(f"{v} x inductor" for v in ratio_vs)
                  + " | = eager | passes (compile_ops) |",
                  "|" + "---|" * (5 + len(order) + len(ratio_vs) + 2)]
        notes = []
        for key, by in rows.items():
            cells = [_fmt_rate(by.get(v)) for v in order]
            base = (by.get("inductor") or {}).get("tokens_per_s")
            ratios = []
            for v in ratio_vs:
                got = (by.get(v) or {}).get("tokens_per_s")
                ratios.append(f"**{got / base:.2f}**" if got and base else "-")
            eq = [f"{v} {by[v]['tokens_equal_eager']:.0%}" for v in order
                  if v != "eager" and v in by and by[v].get("tokens_equal_eager") is not None]
            cp = by.get("compile_ops") or next((by[v] for v in ratio_vs if v in by and
                                                by[v].get("passes")), None)
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | "
                         + " | ".join(cells) + " | " + " | ".join(ratios) + " | "
                         + (", ".join(eq) or "-") + " | "
                         + _short_passes(cp.get("passes") if cp else None) + " |")
            for v in order:
                r = by.get(v)
                if r and r.get("note"):
                    notes.append(f"batch {key[0]} x {key[1]}, {v}: {r['note']}")
        lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    return "\n".join(lines) + "\n"


def plot(recs: list[dict], family: str, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    rs = [r for r in recs if r["family"] == family and r.get("tokens_per_s")]
    if not rs:
        return None
    info = rs[0].get("info", {})
    groups = sorted({(r["max_cache_len"], r["batch"], r.get("context"), r.get("left_pad"))
                     for r in rs})
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rs)] + sorted(
        {r["variant"] for r in rs} - set(VARIANTS))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups) * max(1, len(variants) / 3)), 4.2))
    for i, v in enumerate(variants):
        xs, ys = [], []
        for gi, g in enumerate(groups):
            r = next((r for r in rs if r["variant"] == v and
                      (r["max_cache_len"], r["batch"], r.get("context"), r.get("left_pad")) == g),
                     None)
            if r:
                xs.append(gi + (i - (len(variants) - 1) / 2) * width)
                ys.append(r["tokens_per_s"])
                base = next((b for b in rs if b["variant"] == "inductor" and
                             (b["max_cache_len"], b["batch"], b.get("context"),
                              b.get("left_pad")) == g), None)
                if v.startswith("compile_ops") and base:
                    ax.text(xs[-1], ys[-1], f"x{ys[-1] / base['tokens_per_s']:.2f}",
                            ha="center", va="bottom", fontsize=6, rotation=90)
        ax.bar(xs, ys, width=width, label=v)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{g[1]} x {g[0]}" + (f"\npad {g[3]}" if g[3] else "") for g in groups],
                       fontsize=8)
    ax.set_xlabel("batch x max_cache_len")
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{family}: generate() decode on {info.get('device', '?')}\n(torch "
                 f"{info.get('torch')}, transformers {info.get('transformers')}; labels: "
                 f"x inductor)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: str, stem: str) -> list[str]:
    recs = load_points(out, stem)
    if not recs:
        return []
    paths = []
    p = os.path.join(out, f"{stem}.json")
    with open(p + ".tmp", "w") as f:
        json.dump({"stem": stem, "argv": sys.argv, "results": recs}, f, indent=1)
    os.replace(p + ".tmp", p)
    paths.append(p)
    p = os.path.join(out, f"{stem}.md")
    with open(p + ".tmp", "w") as f:
        f.write(markdown(recs, stem))
    os.replace(p + ".tmp", p)
    paths.append(p)
    for fam in dict.fromkeys(r["family"] for r in recs):
        try:
            got = plot(recs, fam, os.path.join(out, f"{stem}_{fam}.png"))
        except Exception as exc:  # noqa: BLE001  (the tables matter more)
            print(f"plot {fam}: {type(exc).__name__}: {exc}", file=sys.stderr)
            got = None
        if got:
            paths.append(got)
    return paths


def summary_line(rec: dict) -> str:
    s = (f"{rec['family']:<8} batch {rec['batch']:>3} x {rec['max_cache_len']:>6} "
         f"{rec['variant']:<18}")
    if rec.get("tokens_per_s"):
        s += f" {rec['tokens_per_s']:>10.1f} tok/s  {rec['ms_per_step']:8.3f} ms/step"
        if rec.get("warmup_s", 0) > 0.05:
            s += f"  (warm-up {rec['warmup_s']:.0f} s)"
        if rec.get("tokens_equal_eager") is not None:
            s += f"  = eager {rec['tokens_equal_eager']:.0%}"
        if rec.get("passes"):
            s += "  passes: " + _short_passes(rec["passes"])
    if rec.get("note"):
        s += f"  [{rec['note']}]"
    return s


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def setup_of(args) -> dict:
    model = "tiny configs (compile_ops.hf)" if args.tiny else \
        f"{args.layers} decoder layers of the real shapes (compile_ops.hf)"
    dtype = "float32" if args.device == "cpu" else args.dtype
    if not args.keep_sliding_window:
        model += " (no sliding window: mistral as Mistral-7B-v0.3)"
    return {"model": model, "dtype": dtype, "mode": args.mode, "repeats": args.repeats,
            "stat": args.stat, "device": args.device, "timing": args.timing,
            "threads": torch.get_num_threads(), "clock": host_clock(args.device)[1],
            "interleave": args.interleave}


def worker_argv(args, family: str, deadline: float | None) -> list[str]:
    a = [sys.executable, os.path.join(HERE, "bench_hf.py"), "--generate", "--_worker",
         "--device", args.device, "--families", family, "--variants", *args.variants,
         "--batch", *map(str, args.batch), "--cache-len", *map(str, args.cache_len),
         "--new-tokens", str(args.new_tokens), "--left-pad", str(args.left_pad),
         "--repeats", str(args.repeats), "--stat", args.stat, "--seed", str(args.seed),
         "--timing", args.timing, "--interleave" if args.interleave else "--no-interleave",
         "--dtype", args.dtype, "--out", args.out, "--_workers-total", str(args.workers_total),
         "--mode", str(args.mode)]
    if args.tiny:
        a.append("--tiny")
    if args.keep_sliding_window:
        a.append("--keep-sliding-window")
    if args.threads:
        a += ["--threads", str(args.threads)]
    if args.layers is not None:
        a += ["--layers", str(args.layers)]
    if args.context is not None:
        a += ["--context", str(args.context)]
    if args.points:
        a += ["--points", *args.points]
    if deadline is not None:
        a += ["--_deadline", repr(deadline)]
    return a


def cpu_shares(k: int) -> list[list[int]]:
    cpus = sorted(os.sched_getaffinity(0))
    n = max(1, len(cpus) // k)
    return [cpus[i * n:(i + 1) * n] if i < k - 1 else cpus[i * n:] for i in range(k)] \
        if len(cpus) >= k else [cpus] * k


def orchestrate(args, stem: str) -> None:
    """K worker processes, one family each at a time; progress from their points files."""
    deadline = time.time() + args.time_budget if args.time_budget else None
    pdir = os.path.join(args.out, f"{stem}.points")
    ldir = os.path.join(args.out, f"{stem}.logs")
    os.makedirs(pdir, exist_ok=True)
    os.makedirs(ldir, exist_ok=True)
    queue = [f for f in args.families if points_of(args, f)]
    free_shares = cpu_shares(args.workers)
    running = {}  # family: (Popen, share, log file)
    start = time.time()

    def read_lines(path):  # complete lines only (a worker may be writing the last one)
        with open(path) as f:
            return f.read().split("\n")[:-1]

    seen = {p: len(read_lines(p)) for p in glob.glob(os.path.join(pdir, "*.jsonl"))}

    last_report = [time.time()]

    def progress():  # what the workers recorded since the last look; the report now and then
        new = False
        for path in sorted(glob.glob(os.path.join(pdir, "*.jsonl"))):
            lines = read_lines(path)
            new = new or len(lines) > seen.get(path, 0)
            for line in lines[seen.get(path, 0):]:
                try:
                    print(f"[{time.time() - start:6.0f} s] " + summary_line(json.loads(line)),
                          flush=True)
                except (json.JSONDecodeError, KeyError):
                    pass
            seen[path] = len(lines)
        if new and time.time() - last_report[0] > REPORT_EVERY_S:
            write_report(args.out, stem)
            last_report[0] = time.time()

    while queue or running:
        while queue and free_shares and (deadline is None or time.time() < deadline):
            fam = queue.pop(0)
            share = free_shares.pop(0)
            env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS=str(len(share)),
                       OMP_NUM_THREADS=str(len(share)))
            log = open(os.path.join(ldir, f"{fam}.log"), "a")
            proc = subprocess.Popen(worker_argv(args, fam, deadline), stdout=log,
                                    stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=lambda s=share: os.sched_setaffinity(0, s))
            print(f"[{time.time() - start:6.0f} s] {fam}: worker {proc.pid} on CPUs "
                  f"{share[0]}-{share[-1]} (log {log.name})", flush=True)
            running[fam] = (proc, share, log)
        if queue and deadline is not None and time.time() >= deadline and not running:
            print(f"--time-budget spent: not started: {', '.join(queue)}", flush=True)
            queue.clear()
        time.sleep(2)
        progress()
        for fam, (proc, share, log) in list(running.items()):
            if proc.poll() is None:
                if deadline is not None and time.time() > deadline + KILL_GRACE_S:
                    print(f"{fam}: worker past the budget by {KILL_GRACE_S} s: ended",
                          flush=True)
                    proc.kill()
                    proc.wait()
                else:
                    continue
            log.close()
            del running[fam]
            free_shares.append(share)
            print(f"[{time.time() - start:6.0f} s] {fam}: worker exit {proc.returncode}"
                  + ("" if proc.returncode == 0 else f" (see {log.name})"), flush=True)
            write_report(args.out, stem)
    if queue:
        print(f"--time-budget spent: not started: {', '.join(queue)}", flush=True)
    progress()


def run_local(args, stem: str, *, deadline=None) -> None:
    """The families one after another in this process (a worker, or --workers 1)."""
    import lowerings  # noqa: F401  (the passes registered before any compile)

    harness.setup_compile()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = run_info(args)
    lock = GpuLock(os.path.join(args.out, f"{stem}.lock"))  # the timed parts one at a time
    for fam in args.families:
        emit_file = PointsFile(os.path.join(args.out, f"{stem}.points", f"{fam}.jsonl"), info,
                               setup_of(args))

        def emit(rec, emit_file=emit_file):
            emit_file(rec)
            print(summary_line(rec), flush=True)
            if not args._worker:
                write_report(args.out, stem)

        run_family(fam, args, emit=emit, deadline=deadline, lock=lock)
    if lock.path:
        print(f"waited {lock.waited:.0f} s for the timing lock", flush=True)


def main(args) -> None:
    """bench_hf.py --generate (args parsed there)."""
    import compile_ops.hf as hf

    if args.device == "cpu":
        args.tiny = args.tiny or args.layers is None
        if args.threads is None and args.tiny:
            # the tiny models gain nothing from more threads, and OpenMP's spinning threads slow
            # every op many times over where other work shares the cores
            args.threads = 1
    d = DEFAULTS[args.device]
    args.batch = args.batch or list(d["batch"])
    args.cache_len = args.cache_len or list(d["cache_len"])
    args.new_tokens = args.new_tokens or d["new_tokens"]
    args.repeats = args.repeats or d["repeats"]
    args.families = args.families or list(hf.FAMILIES)
    args.variants = args.variants or list(VARIANTS if args.device == "cuda" else CPU_VARIANTS)
    if args.layers is None and not args.tiny:
        args.layers = 4
    args.timing = args.timing or ("diff" if args.device == "cuda" else "loop")
    if args.interleave is None:
        args.interleave = args.device == "cpu"
    if args.mode is None or args.mode == "None":
        args.mode = "reduce-overhead" if args.device == "cuda" else "default"
    if args.workers_total is None:
        args.workers_total = args.workers
    if args.report_only:  # every run's points in --out (no GPU needed: e.g. fetched results)
        stems = sorted(os.path.basename(d)[:-len(".points")] for d in
                       glob.glob(os.path.join(args.out, "hf_generate_*.points")))
        if not stems:
            sys.exit(f"no hf_generate_*.points in {args.out}")
        for stem in stems:
            print("wrote", *write_report(args.out, stem))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--generate runs on the GPU (--device cpu for the CPU)")
    import compile_ops

    if args.device == "cuda" and not compile_ops.kernels_available():
        print(f"note: compile_ops' CUDA kernels not loaded "
              f"({compile_ops.kernels_unavailable_reason()}): its ops run their fallbacks",
              flush=True)
    if "eager" in args.variants:  # first: the others' tokens are compared with eager's
        args.variants = ["eager"] + [v for v in args.variants if v != "eager"]
    for fam in args.families:
        if fam not in hf.FAMILIES:
            sys.exit(f"unknown family {fam!r}; one of {hf.FAMILIES}")
    stem = stem_of(args)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    if args._worker:
        run_local(args, stem, deadline=args._deadline)
        return
    n = sum(len(points_of(args, f)) for f in args.families) * len(args.variants)
    print(f"{len(args.families)} families, {n} (point, variant) runs; stem {stem}; "
          f"{args.workers} worker(s)" + (f"; time budget {args.time_budget:.0f} s"
                                         if args.time_budget else ""), flush=True)
    if args.workers > 1:
        orchestrate(args, stem)
    else:
        run_local(args, stem, deadline=t0 + args.time_budget if args.time_budget else None)
    paths = write_report(args.out, stem)
    print(f"done in {time.time() - t0:.0f} s; wrote", *paths)


# ---------------------------------------------------------------------------------------------
# The CPU check (bench_hf.py --cpu-check)
# ---------------------------------------------------------------------------------------------
def cpu_check(families=("llama",), variants=VARIANTS) -> None:
    """A tiny generate() per family under each variant on the CPU, float32, every pass allowed
    to rewrite (pass_devices("all")): greedy tokens equal to eager's, static_cache_attention
    matched once per layer under backend compile_ops; one left-padded row, so the mask generate()
    builds is not all ones."""
    import types

    from transformers import StaticCache

    import compile_ops.hf as hf

    batch, cache_len, context, new = 2, 64, 12, 4
    args = types.SimpleNamespace(context=context, new_tokens=new, left_pad=3, variants=variants)
    for fam in families:
        model = hf.build(fam, tiny=True)
        model._bench_attn = model.config._attn_implementation
        prompt, mask = make_prompt(model.config, batch, context, args.left_pad, 1, "cpu")
        cache = StaticCache(config=model.config, max_cache_len=cache_len)
        want = None
        for variant in variants:
            rec = run_variant(model, variant, prompt, mask, cache, new, device="cpu",
                              mode="default", repeats=1, policy="all")
            if want is None:
                want = rec["tokens"]
            elif not torch.equal(rec["tokens"], want):
                raise AssertionError(f"{fam} generate {variant}: greedy tokens "
                                     f"{rec['tokens'].tolist()} != eager's {want.tolist()}")
            if rec["compile"].get("graph_breaks") or rec["recompiles_timed"]:
                raise AssertionError(f"{fam} generate {variant}: {rec['note']}")
            line = f"{fam} generate {variant}: tokens {rec['tokens'][:, :new].tolist()}"
            if backend_of(variant)[0] == "compile_ops":
                got = (rec["passes"] or {}).get("static_cache_attention", {}).get("matched", 0)
                layers = model.config.num_hidden_layers
                if got != layers:
                    raise AssertionError(f"{fam} generate {variant}: static_cache_attention "
                                         f"matched {got} times, want {layers}: {rec['passes']}")
                line += f"; passes: {_short_passes(rec['passes'])}"
            print(line, flush=True)
        del model, cache
        torch._dynamo.reset()
