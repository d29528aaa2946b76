"""Decode step of a Hugging Face ``LlamaForCausalLM`` (issue 16): backend="compile_ops" against
backend="inductor" and eager, on the model as Hugging Face writes it (plain PyTorch: module-math
RMSNorm, rotate_half RoPE, ``StaticCache`` writes, ``repeat_kv`` + SDPA, ``silu(gate) * up``).

Random weights (nothing is downloaded), ``--layers`` decoder layers of Llama 3 8B's shapes
(hidden 4096, 32 query / 8 KV heads of 128, MLP 14336, vocabulary 128256, untied lm_head), bf16.
For each point of batch x max_cache_len a ``StaticCache`` is filled by an eager prefill of
``max_cache_len / 2`` random tokens (``--context`` overrides), then each variant, on a cache of its
own filled the same way, runs ``--check-steps`` greedy decode steps (tokens compared with eager's)
and its next step is timed: the step (model forward at one position per sequence, then argmax
over the last logits) captured once in a CUDA graph and replayed, CUDA events around the replays
(``harness.time_calls``; at least ``--min-ms`` per sample, the median of 20 samples). The compiled
variants are ``torch.compile(step, backend=..., fullgraph=True, dynamic=False)`` without CUDA
graphs of their own, so all three are timed the same way.

Bytes (for % of the copy bandwidth): every weight but the embedding table once, plus the K and V
of the tokens so far (context + 1) of every layer: what a decode step must read. Hugging Face's
SDPA path reads the whole ``max_cache_len`` (and ``repeat_kv`` copies it), so its figure can stay
far below the copy rate.

    python bench/bench_hf.py                       # batch 1, 8, 32 x max_cache_len 512, 4096
    python bench/bench_hf.py --batch 1 --cache-len 512 --layers 2
    python bench/bench_hf.py --cpu-check           # no GPU: a tiny Llama, every variant on the CPU
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


def make_step(model, cache):
    """One greedy decode step at `pos` ([1]) for `token` ([batch, 1]): the next tokens and the
    last logits."""
    def step(token, pos):
        out = model(input_ids=token, past_key_values=cache, use_cache=True, cache_position=pos,
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
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True,
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
        with torch._inductor.config.patch(fx_graph_cache=False):
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
    print("cpu check ok: hf variants match")


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
    p.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--cache-len", type=int, nargs="+", default=list(CACHE_LENS))
    p.add_argument("--context", type=int, default=None,
                   help="tokens in the cache before the timed step (default max_cache_len / 2)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of Llama 3 8B's shapes")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), type=variant_ok,
                   help="eager, inductor, compile_ops, or compile_ops-<pass>[-<pass>]: "
                        "compile_ops without those passes")
    p.add_argument("--check-steps", type=int, default=4,
                   help="greedy steps compared with the first variant's before the timing")
    p.add_argument("--seed", type=int, default=0)
    harness.add_common_args(p)
    args = p.parse_args()
    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("bench_hf.py needs transformers (pip install transformers)")
    dtype, copy_bw = harness.start(args)
    if args.cpu_check:
        cpu_check()
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
