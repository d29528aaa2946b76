"""Hugging Face transformers models decoding under backend="compile_ops" against
backend="inductor" and eager, on the models as transformers writes them (plain PyTorch:
module-math RMSNorm, rotate_half RoPE, ``StaticCache`` writes, ``repeat_kv`` + SDPA, ``silu(gate)
* up``). Random weights and prompts (nothing is downloaded). Two modes:

**One decode step** (default; issue 16): ``LlamaForCausalLM``, ``--layers`` decoder layers of
Llama 3 8B's shapes (hidden 4096, 32 query / 8 KV heads of 128, MLP 14336, vocabulary 128256,
untied lm_head), bf16. For each point of batch x max_cache_len a ``StaticCache`` is filled by an
eager prefill of ``max_cache_len / 2`` random tokens (``--context`` overrides), then each variant,
on a cache of its own filled the same way, runs ``--check-steps`` greedy decode steps (tokens
compared with eager's) and its next step is timed: the step (model forward at one position per
sequence, then argmax over the last logits) captured once in a CUDA graph and replayed, CUDA
events around the replays (``harness.time_calls``: the median of 20 samples of >= 20 ms). The
compiled variants are ``torch.compile(step, backend=..., fullgraph=True, dynamic=False)`` without
CUDA graphs of their own, so all three are timed the same way. Bytes (for % of the copy
bandwidth): every weight but the embedding table once, plus the K and V of the tokens so far
(context + 1) of every layer: what a decode step must read. Hugging Face's SDPA path reads the
whole ``max_cache_len`` (and ``repeat_kv`` copies it), so its figure can stay far below the copy
rate.

**generate()** (``--generate``; issue 24): transformers' own ``model.generate()`` with its
documented compiled-decode recipe, for the six families of ``compile_ops.hf`` (llama, qwen2,
mistral, gemma, phi3, qwen3; 4 decoder layers of the real shapes, bf16)::

    model.generate(ids, attention_mask=mask, cache=StaticCache(config=model.config,
                   max_cache_len=L),            # past_key_values= on transformers < 5.25
                   max_new_tokens=N, min_new_tokens=N, do_sample=False,
                   compile_config=CompileConfig(backend=B, mode="reduce-overhead",
                                                fullgraph=True, dynamic=False))

Variants: ``eager`` (``disable_compile=True``), ``inductor`` (B = "inductor"), ``compile_ops``
(B = "compile_ops"), ``compile_ops-attn`` (the model with attn_implementation="compile_ops",
B = "inductor": the attention-name route), ``compile_ops-<pass>[-<pass>]`` (B = "compile_ops"
without those passes). Grid: batch 1, 8, 32 x max_cache_len 512, 4096, 16384; the prompt is
max_cache_len / 2 random tokens (``--context``), ``--left-pad K`` pads every other row's first K
tokens (masked). generate() prefills eagerly and runs the compiled forward (CUDA graphs under
reduce-overhead) at every decode step, so

    decode tokens/s = batch * (N - 1) / (t(N) - t(1))

each t the best (``--stat median``) of ``--repeats`` generate() calls (synchronized), after a
warm-up (a short-prompt call that compiles and records the CUDA graphs, then one full-size call
whose greedy tokens are compared with eager's: the fraction equal is in the table; random bf16
weights have near ties, so this informs, it does not check). Reported: tokens/s per variant,
compile_ops x inductor, and the pass counters of the compile_ops compile (``lowerings.counters()``
after ``torch._dynamo.reset()``; Inductor's FX graph cache is off for backend compile_ops so a
cache hit cannot hide them). A decode step that compiles more than twice fails with a note
(Dynamo recompiling per token); mistral runs without its sliding window (transformers'
sliding-window StaticCache layers recompile at every token; ``--keep-sliding-window`` to see it).
Output in ``--out``: ``hf_generate_<GPU>.md`` (a table per family), ``.json`` (every point), a
PNG per family (tokens/s bars per batch x max_cache_len, one per variant, log scale), and the raw
points ``hf_generate_<GPU>.points/<family>.jsonl``, appended as they come (a crash or a timeout
keeps them; points of a later run into the same --out are merged in, the newest winning;
``--report-only`` rebuilds the report from them). Points that run out of GPU memory are skipped
with a note.

Device time is scarce: ``--workers K`` runs K families at once in worker processes, each on its
own CPU cores (TORCHINDUCTOR_COMPILE_THREADS = its share) so their compiles overlap, while the
timed calls (and every big GPU call) take an exclusive file lock (``--out``/<stem>.lock): one
worker times at a time and the GPU is otherwise idle then (the others' warm-ups are short-prompt
calls). ``--time-budget S`` starts no point after S seconds (workers still running 90 s later are
ended) and writes what was measured. ``--families``, ``--batch``, ``--cache-len``, ``--points
[FAMILY:]BxL``, ``--variants`` select.

On the CPU (``--generate --device cpu``; issue 24's "compile_ops >= 0.98x inductor on every
family"): float32, compile_ops.hf's tiny configs (``--layers 1``: one layer of the real shapes
instead), batch 1, 4 x max_cache_len 256, 2048, N = 16, mode "default" (no CUDA graphs;
transformers' ``compile_config._compile_all_devices`` set so that it compiles on the CPU),
variants eager, inductor, compile_ops under the default pass-device policy ("auto": on the CPU
the passes leave small graphs to Inductor; ``static_cache_attention`` rewrites from
``CPU_MIN_ELEMENTS`` of repeat_kv copy on). Timing made for a shared host: the tiny models run on
one thread (``--threads``) and are timed by that thread's CPU time from the first generated token
to the last (``--timing loop``: no prefill to subtract), the variants of a point warmed up side by
side and timed round-robin (``--interleave``), the best of 10 rounds.

    python bench/bench_hf.py                       # one step: batch 1, 8, 32 x 512, 4096
    python bench/bench_hf.py --batch 1 --cache-len 512 --layers 2
    python bench/bench_hf.py --generate --tiny --families llama --batch 1 --cache-len 512 \
        --new-tokens 16 --out /tmp/smoke            # GPU smoke test: seconds
    python bench/bench_hf.py --generate --workers 4 --time-budget 480 --out DIR   # full grid
    python bench/bench_hf.py --generate --families llama qwen3 --points 1x512 32x16384
    python bench/bench_hf.py --generate --device cpu              # CPU, tiny, six families
    python bench/bench_hf.py --generate --report-only --out DIR   # tables/plots from the points
                                                   # (any machine: no GPU needed)
    python bench/bench_hf.py --cpu-check   # no GPU: a tiny Llama, every variant, step and
                                           # generate(), passes forced on (pass_devices("all"))
"""

import argparse
import contextlib
import gc
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import compile_ops  # noqa: E402, F401  (registers the ops and the backend)

BATCHES, CACHE_LENS = (1, 8, 32), (512, 4096)
VARIANTS = ("eager", "inductor", "compile_ops")
CHECK_FAMILIES = ("llama",)  # --cpu-check's generate() smoke test


def llama_config(layers: int, tiny: bool = False):
    import transformers

    if tiny:
        return transformers.LlamaConfig(
            vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.2)  # logits of O(1), so greedy tokens are well separated
    return transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def build_model(config, device, dtype):
    import transformers

    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    return model.to(dtype).eval()


def cache_kwarg(model) -> str:
    """The forward's cache keyword: ``cache`` from transformers 5.25 on (``past_key_values``
    deprecated there), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def make_step(model, cache):
    """One greedy decode step at `pos` ([1]) for `token` ([batch, 1]): the next tokens and the
    last logits."""
    kw = cache_kwarg(model)

    def step(token, pos):
        out = model(input_ids=token, **{kw: cache}, use_cache=True, cache_position=pos,
                    position_ids=pos.expand(token.shape[0], 1))
        logits = out.logits[:, -1]
        return logits.argmax(-1, keepdim=True), logits
    return step


def prefill(model, config, batch, cache_len, context, device, seed):
    """A StaticCache holding `context` random tokens per sequence; the first decode token."""
    from transformers import StaticCache

    cache = StaticCache(config=config, max_cache_len=cache_len)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, config.vocab_size, (batch, context), generator=g).to(device)
    with torch.no_grad():
        out = model(input_ids=prompt, **{cache_kwarg(model): cache}, use_cache=True,
                    cache_position=torch.arange(context, device=device))
    return cache, out.logits[:, -1].argmax(-1, keepdim=True)


def compiled(step, variant):
    if variant == "eager":
        return step
    backend = "compile_ops" if variant.startswith("compile_ops-") else variant
    return torch.compile(step, backend=backend, fullgraph=True, dynamic=False)


def variant_ok(v: str) -> str:
    """eager, inductor, compile_ops, or compile_ops-<pass>[-<pass>...]: compile_ops without
    those passes (an ablation: what each pass is worth end to end)."""
    if v in VARIANTS:
        return v
    if v.startswith("compile_ops-"):
        import lowerings

        names = {p.name for p in lowerings.pass_manager().passes}
        for name in v[len("compile_ops-"):].split("-"):
            if name not in names:
                raise argparse.ArgumentTypeError(f"{v}: no pass named {name!r} ({sorted(names)})")
        return v
    raise argparse.ArgumentTypeError(f"unknown variant {v!r}")


@contextlib.contextmanager
def passes_for(variant: str):
    """compile_ops-<a>-<b>: the pass manager without passes a and b while the variant runs."""
    import lowerings

    pm = lowerings.pass_manager()
    saved = list(pm.passes)
    if variant.startswith("compile_ops-"):
        drop = set(variant[len("compile_ops-"):].split("-"))
        pm.passes = [p for p in saved if p.name not in drop]
    try:
        yield
    finally:
        pm.passes = saved


def decode(fn, token, context, steps, device):
    """`steps` greedy steps from position `context`: the tokens [batch, steps] and the logits
    of each step."""
    tokens, logits = [], []
    with torch.no_grad():
        for i in range(steps):
            token, lg = fn(token, torch.tensor([context + i], device=device))
            tokens.append(token)
            logits.append(lg.float())
    return torch.cat(tokens, 1), logits


def cache_rewinder(cache, position: int):
    """A callable that sets every layer's write position back to `position`: transformers'
    StaticCache layers keep their own counter (``cumulative_length``, a device tensor that each
    step advances in place, and which places the write and the mask), so a replayed step would
    otherwise move one slot on per replay and run off the cache. One ``_foreach_copy_`` (one
    small kernel for all layers, in every variant's timing alike)."""
    counters = [layer.cumulative_length for layer in getattr(cache, "layers", [])
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]
    if not counters:
        return lambda: None
    src = [torch.full_like(c, position) for c in counters]

    def rewind():
        torch._foreach_copy_(counters, src)
    return rewind


def step_bytes(model, config, batch, context) -> int:
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if "embed_tokens" not in n)
    kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    elem = next(model.parameters()).element_size()
    return weights + 2 * config.num_hidden_layers * batch * (context + 1) * kv * elem


def pass_counters():
    import lowerings

    return {k: dict(v) for k, v in lowerings.counters().items() if v}


def cpu_check() -> None:
    """A tiny Llama in float32 on the CPU: each compiled variant's greedy tokens equal eager's
    and its logits match within float32 rounding, four steps from a 16-token prefill."""
    import lowerings

    config = llama_config(2, tiny=True)
    model = build_model(config, "cpu", torch.float32)
    batch, cache_len, context, steps = 2, 64, 16, 4
    want = None
    for variant in VARIANTS:
        torch._dynamo.reset()
        lowerings.reset_counters()
        cache, first = prefill(model, config, batch, cache_len, context, "cpu", seed=1)
        # pass_devices("all"): the passes rewrite CPU graphs too (by default they leave them to
        # Inductor), so the check covers the rewrites
        with torch._inductor.config.patch(fx_graph_cache=False), lowerings.pass_devices("all"):
            tokens, logits = decode(compiled(make_step(model, cache), variant), first, context,
                                    steps, "cpu")
        if want is None:
            want = (tokens, logits)
            continue
        if not torch.equal(tokens, want[0]):
            raise AssertionError(f"{variant}: greedy tokens {tokens.tolist()} != eager's "
                                 f"{want[0].tolist()}")
        for i, (got, ref) in enumerate(zip(logits, want[1])):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4,
                                       msg=lambda m, i=i: f"{variant} step {i}: {m}")
        print(f"{variant}: tokens {tokens.tolist()}; passes: {pass_counters() or 'none ran'}")
        if variant == "compile_ops":
            got = pass_counters().get("static_cache_attention", {}).get("matched", 0)
            if got != config.num_hidden_layers:
                raise AssertionError(f"static_cache_attention matched {got} times, want one per "
                                     f"layer ({config.num_hidden_layers}): {pass_counters()}")
        rewind = cache_rewinder(cache, context)
        rewind()
        if any(int(layer.cumulative_length) != context for layer in cache.layers):
            raise AssertionError("cache_rewinder did not set every layer's position")


def bench_point(rep, model, config, batch, cache_len, context, variants, check_steps, seed):
    case = {"batch": batch, "max_cache_len": cache_len, "context": context}
    nbytes = step_bytes(model, config, batch, context)
    want = []  # (variant, tokens) of the first variant that ran
    for variant in variants:
        label = f"batch {batch} x max_cache_len {cache_len}: {variant}"
        try:
            with passes_for(variant):
                bench_variant(rep, model, config, batch, cache_len, context, variant,
                              check_steps, seed, case, nbytes, label, want)
        except Exception as exc:  # noqa: BLE001  (record it, go on with the next variant)
            traceback.print_exc()
            rep.notes.append(f"{label}: failed: {type(exc).__name__}: {str(exc)[:300]}")
        finally:
            gc.collect()
            torch.cuda.empty_cache()


def bench_variant(rep, model, config, batch, cache_len, context, variant, check_steps, seed,
                  case, nbytes, label, want):
    import lowerings

    torch._dynamo.reset()
    lowerings.reset_counters()
    cache, first = prefill(model, config, batch, cache_len, context, "cuda", seed)
    fn = compiled(make_step(model, cache), variant)
    tokens, _ = decode(fn, first, context, check_steps, "cuda")
    note = ""
    if not want:
        want.extend((variant, tokens))
    elif not torch.equal(tokens, want[1]):
        same = (tokens == want[1]).float().mean().item()
        note = f"greedy tokens differ from {want[0]}'s ({same:.0%} equal)"
        rep.notes.append(f"{label}: {note}")
    if variant.startswith("compile_ops"):
        rep.notes.append(f"{label}: passes {pass_counters() or 'none ran'}")
    pos = torch.tensor([context + check_steps], device="cuda")
    token = tokens[:, -1:].clone()
    rewind = cache_rewinder(cache, context + check_steps)

    def call(fn=fn, token=token, pos=pos, rewind=rewind):
        with torch.no_grad():
            res = fn(token, pos)
            rewind()  # every replay writes and attends at the same position
            return res

    t = harness.time_calls([call], nbytes, use_graph=True)
    rep.add(harness.Result(case, variant, t["seconds"], nbytes, t["graph"], t["sets"],
                           t["spread"], l2_resident=False,
                           extra={"check": note or "tokens equal"}))


class HFReport(harness.Report):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.notes: list[str] = []

    def markdown(self) -> str:
        md = super().markdown()
        lines = ["", "| batch | max_cache_len | " + " | ".join(f"{v} µs" for v in self.variants)
                 + " | x inductor |", "|---|---|" + "---|" * (len(self.variants) + 1)]
        for key, by in self._rows().items():
            cells = [f"{by[v].seconds * 1e6:.1f}" if v in by else "-" for v in self.variants]
            x = (f"{by['inductor'].seconds / by['compile_ops'].seconds:.2f}"
                 if "inductor" in by and "compile_ops" in by else "-")
            lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {x} |")
        notes = [""] + [f"- {n}" for n in self.notes] if self.notes else []
        return md + "\n".join(lines + notes) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch sizes (default 1 8 32; --generate --device cpu: 1 4)")
    p.add_argument("--cache-len", type=int, nargs="+", default=None,
                   help="max_cache_len values (default 512 4096; --generate: 512 4096 16384; "
                        "--generate --device cpu: 256 2048)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens in the cache before the timed step / the prompt length "
                        "(default max_cache_len / 2)")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers of the real shapes (default 4; --generate --device cpu: "
                        "tiny configs unless this is given)")
    p.add_argument("--variants", nargs="+", default=None,
                   help="eager, inductor, compile_ops, or compile_ops-<pass>[-<pass>]: "
                        "compile_ops without those passes; --generate also: compile_ops-attn "
                        "(attn_implementation=\"compile_ops\", backend inductor)")
    p.add_argument("--check-steps", type=int, default=4,
                   help="greedy steps compared with the first variant's before the timing")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("--generate (transformers' generate(), see the docstring)")
    g.add_argument("--generate", action="store_true",
                   help="time model.generate() with its compiled decode instead of one step")
    g.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: float32, tiny configs unless --layers, mode 'default'")
    g.add_argument("--families", nargs="+", default=None,
                   help="of compile_ops.hf.FAMILIES (default all six)")
    g.add_argument("--points", nargs="+", default=None, metavar="[FAMILY:]BxL",
                   help="explicit points instead of --batch x --cache-len, e.g. 8x4096 "
                        "llama:32x16384")
    g.add_argument("--new-tokens", type=int, default=None,
                   help="N new tokens per generate() (default 64; cpu 16)")
    g.add_argument("--left-pad", type=int, default=0, metavar="K",
                   help="the first K prompt tokens of every other row are padding (masked)")
    g.add_argument("--tiny", action="store_true", help="compile_ops.hf's tiny configs")
    g.add_argument("--keep-sliding-window", action="store_true",
                   help="keep mistral's sliding window (transformers' StaticCache then "
                        "recompiles the decode step at every token: the compiled variants fail)")
    g.add_argument("--repeats", type=int, default=None,
                   help="timed generate() calls of 1 and of N tokens each (default 2; cpu 10)")
    g.add_argument("--stat", choices=["best", "median"], default="best")
    g.add_argument("--timing", choices=["diff", "loop"], default=None,
                   help="diff: decode time = t(N) - t(1) (default on the GPU); loop: the span "
                        "of the decode steps inside generate(N), host clock (default on the CPU, "
                        "where a noisy prefill would swamp the difference)")
    g.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="warm every variant of a point up first (a module each, weights shared), "
                        "then time them round-robin, so slow drifts of the host's load fall on "
                        "all alike (default on the CPU; off on the GPU, where each variant "
                        "frees its CUDA graphs before the next)")
    g.add_argument("--mode", default=None,
                   help="CompileConfig mode (default reduce-overhead; cpu: default)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default torch's; --device cpu --tiny: 1)")
    g.add_argument("--workers", type=int, default=1,
                   help="families in this many worker processes at once (own CPU cores each; "
                        "the timed parts one at a time under a file lock)")
    g.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no point (no worker) after this; what was measured is written")
    g.add_argument("--report-only", action="store_true",
                   help="rebuild the report from the points files in --out; run nothing")
    g.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--_deadline", type=float, default=None, help=argparse.SUPPRESS)
    g.add_argument("--_workers-total", dest="workers_total", type=int, default=None,
                   help=argparse.SUPPRESS)
    harness.add_common_args(p)
    args = p.parse_args()
    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("bench_hf.py needs transformers (pip install transformers)")
    if args.generate:
        import hf_generate

        try:
            args.variants = [hf_generate.variant_ok(v) for v in args.variants or []] or None
        except argparse.ArgumentTypeError as e:
            p.error(str(e))
        if args.cpu_check:
            sys.exit("--cpu-check runs the generate() smoke test too: drop --generate")
        hf_generate.main(args)
        return
    args.batch = args.batch or list(BATCHES)
    args.cache_len = args.cache_len or list(CACHE_LENS)
    args.layers = args.layers or 4
    try:
        args.variants = [variant_ok(v) for v in args.variants or VARIANTS]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    dtype, copy_bw = harness.start(args)
    if args.cpu_check:
        # One thread: the tiny models gain nothing from more, and OpenMP's spinning threads slow
        # every op many times over on a host whose cores other work shares (CI).
        torch.set_num_threads(1)
        cpu_check()
        import hf_generate

        hf_generate.cpu_check(families=CHECK_FAMILIES)
        print("cpu check ok: hf variants match")
        return
    config = llama_config(args.layers)
    model = build_model(config, "cuda", dtype)
    rep = HFReport("Hugging Face LlamaForCausalLM decode step", copy_bw, "inductor",
                   ["batch", "max_cache_len", "context"])
    rep.variants = args.variants
    for cache_len in args.cache_len:
        for batch in args.batch:
            context = args.context if args.context is not None else cache_len // 2
            if context + args.check_steps + 1 > cache_len:
                sys.exit(f"--context {context} leaves no room for the steps in {cache_len}")
            bench_point(rep, model, config, batch, cache_len, context, args.variants,
                        args.check_steps, args.seed)
    paths = rep.write(args.out, harness.device_stem("hf"), plot_x="batch",
                      plot_group=["max_cache_len"])
    for n in rep.notes:
        print("note:", n)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
