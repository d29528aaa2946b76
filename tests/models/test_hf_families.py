"""The six Hugging Face families of ``compile_ops.hf.FAMILIES`` (issue 24), tiny random-weight
configs on the CPU, each against eager:

- transformers' compiled-decode recipe, ``generate(..., StaticCache, compile_config=CompileConfig(
  backend="compile_ops", fullgraph=True, dynamic=False))``, float32, a left-padded batch: tokens,
  per-step logits and the final cache equal the uncompiled ``generate()``'s; the counters of the
  passes per compiled graph (one graph per family, one per decode step for Mistral);
- the same in bfloat16: the first compiled step's logits within a bound derived from the dtype;
- the attention name (``attn_implementation="compile_ops"``), eager and compiled with
  ``backend="inductor"``: tokens equal the SDPA model's, the op called at every decode step;
- the default pass-device policy ("auto") on a CPU graph: nothing rewritten, tokens unchanged;
- near misses: a prefill chunk (4 query tokens) under the backend, dropout (training) and prefill
  under the attention name: SDPA, with the reason.

Cost: every compiled run is owned by one test (pytest-xdist hands consecutive tests to different
workers, so a compiled run shared through a fixture could be compiled twice); only the cheap
eager float32 runs are shared (``_eager_float32``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import NamedTuple

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: the Hugging Face family tests need it")

import compile_ops.hf as hf  # noqa: E402  (registers attn_implementation="compile_ops")
import compile_ops.static_cache as static_cache  # noqa: E402
import lowerings  # noqa: E402
from lowerings.passes import PassManager  # noqa: E402

FAMILIES = hf.FAMILIES
LAYERS = 2  # hf.build(tiny=True)
OP = "auto_functionalized(compile_ops.static_cache_attention.default)"
SDPA_CPU = "aten._scaled_dot_product_flash_attention_for_cpu.default"

PROMPT, PAD, CACHE_LEN = 7, 3, 64  # row 1 of the batch: 3 pad tokens, then 4 prompt tokens
# New tokens per generate(): the first comes from the (never compiled) prefill, each further one
# from a compiled decode step. Mistral compiles one graph per decode step (see
# test_compile_ops_generate_float32), so it takes fewer: prompt 7 + 3 new tokens feed positions
# 0..8 through its 8-slot window: the first decode step (position 7) fills the cache, the second
# (position 8) rolls it, slot 0 leaving the window.
NEW = {family: 8 for family in FAMILIES}
NEW["mistral"] = 3

# bfloat16: unit roundoff (relative error of one rounding) 2**-8.
BF16_U = 2.0 ** -8

SKIPPED_CPU = "skipped: cpu graph"
GEMMA_BF16_NORM = ("near_miss: the float32 normalized value goes to aten.mul.Tensor, not a convert "
                   "back to bfloat16 (a weight applied in float32, as Gemma's 1 + weight, rounds "
                   "differently)")
QK_NORM = ("near_miss: the normalized output feeds only pointwise math (a per-head q/k norm "
           "before RoPE, as Qwen3's): Inductor fuses the norm into that kernel")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
class Run(NamedTuple):
    tokens: torch.Tensor   # [batch, new] generated tokens
    logits: torch.Tensor   # [new, batch, vocab] raw logits of each step (float32)
    cache: list            # [(keys, values)] per layer, the StaticCache after the run


def _cache_kwarg(model) -> str:
    """The name generate() / forward() take the cache under: ``cache`` where the model's forward
    has it (transformers 5.25: ``past_key_values`` deprecated), else ``past_key_values`` (5.17)."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_tensors(cache) -> list:
    """A StaticCache's per-layer (keys, values), copied: ``cache.layers[i].keys`` in transformers
    5.x, ``key_cache`` / ``value_cache`` lists before the layered caches."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys.clone(), layer.values.clone()) for layer in layers]
    return [(k.clone(), v.clone()) for k, v in zip(cache.key_cache, cache.value_cache)]


def _prompts(batch: int = 2, vocab: int = 256):
    """[batch, PROMPT] ids and attention mask: row 1 left-padded (PAD leading zeros in its mask,
    pad_token_id 0 in its ids); ids drawn from 3.. (pad 0, bos 1, eos 2 left out)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :PAD] = 0
    ids[1, :PAD] = 0
    return ids, mask


def _generate(model, new: int, backend: str | None = None, batch: int = 2) -> Run:
    """Greedy generate() over a fresh StaticCache of CACHE_LEN slots: uncompiled
    (``disable_compile``) or transformers' compiled decode with `backend` (fullgraph, static
    shapes, on the CPU through ``_compile_all_devices``). Exactly `new` tokens (min_new_tokens:
    EOS cannot end it early)."""
    from transformers import CompileConfig, StaticCache

    ids, mask = _prompts(batch, model.config.vocab_size)
    cache = StaticCache(config=model.config, max_cache_len=CACHE_LEN)
    kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
              output_logits=True, return_dict_in_generate=True)
    kw[_cache_kwarg(model)] = cache
    if backend is None:
        kw["disable_compile"] = True
    else:
        torch._dynamo.reset()  # Dynamo's recompile limit counts per code object, and the
        lowerings.reset_counters()  # families share transformers' decorator wrappers
        config = CompileConfig(backend=backend, fullgraph=True, dynamic=False)
        config._compile_all_devices = True  # compile on the CPU too
        kw["compile_config"] = config
    out = model.generate(ids, **kw)
    assert out.sequences.shape == (batch, PROMPT + new), out.sequences.shape
    return Run(out.sequences[:, PROMPT:], torch.stack(out.logits), _cache_tensors(cache))


@functools.lru_cache(maxsize=None)
def _eager_float32(family: str) -> Run:
    """The reference: the SDPA model's uncompiled generate() in float32 (shared, cheap)."""
    return _generate(hf.build(family, tiny=True), NEW[family])


class Record(NamedTuple):
    op_calls: list  # one entry per call of the op's CPU kernel (eager or compiled code)
    graphs: list    # per graph the pass manager ran on: its static_cache_attention ops after


@contextlib.contextmanager
def _recording():
    """Counts the executions of static_cache_attention's CPU kernel (its reference body, called
    at run time by the op, whoever called the op: the attention function eagerly, Inductor's
    generated code, the pass's rewrite) and the graphs our pass manager ran on."""
    rec = Record([], [])
    ref = static_cache.static_cache_attention_ref
    run = PassManager.__call__

    def counting_ref(*args, **kwargs):
        rec.op_calls.append(args[0].shape)
        return ref(*args, **kwargs)

    def recording_call(self, graph):
        run(self, graph)
        rec.graphs.append(self.ops_after.count(OP))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(static_cache, "static_cache_attention_ref", counting_ref)
        mp.setattr(PassManager, "__call__", recording_call)
        yield rec


def _assert_same_float32(got: Run, want: Run, what: str) -> None:
    """Tokens equal, logits to float32 rounding, the caches written alike (as
    tests/lowerings/test_static_cache_attention.py's _assert_hf_same)."""
    assert torch.equal(got.tokens, want.tokens), (what, got.tokens.tolist(), want.tokens.tolist())
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4,
                               msg=lambda m: f"{what}: logits\n{m}")
    assert len(got.cache) == len(want.cache) == LAYERS
    for i, ((gk, gv), (wk, wv)) in enumerate(zip(got.cache, want.cache)):
        torch.testing.assert_close(gk, wk, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{what}: layer {i} keys\n{m}")
        torch.testing.assert_close(gv, wv, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{what}: layer {i} values\n{m}")


def _graphs(family: str) -> int:
    """Graphs transformers' compiled decode makes of `new` tokens: one, or one per decode step
    with a sliding-window cache layer (Mistral; see test_compile_ops_generate_float32)."""
    if getattr(hf.config(family, tiny=True), "sliding_window", None):
        return NEW[family] - 1
    return 1


def _norm_counts(family: str, g: int, dtype=torch.float32) -> dict:
    """rms_norm_math's counters for `g` graphs. Per graph 5 norms (input + post-attention per
    layer, the final one), all rewritten, Gemma's ``x * (1 + weight)`` too in float32 (the weight
    multiply is the norm's there). In bfloat16 Gemma's ``(1 + weight)`` multiply runs in float32
    on the float32 normalized value and rounds once after it, which compile_ops.rms_norm
    (rounding before the weight multiply) would change: a near miss each. Qwen3 also normalizes q
    and k per head in every layer (4 more): left to Inductor, which fuses them into the RoPE
    math they feed, a near miss each."""
    norms = 2 * LAYERS + 1
    if family == "gemma" and dtype == torch.bfloat16:
        return {GEMMA_BF16_NORM: norms * g}
    c = {"matched": norms * g}
    if family == "qwen3":
        c[QK_NORM] = 2 * LAYERS * g
    return c


def _assert_add_rms_norm(c: dict, family: str, g: int) -> None:
    """The residual add feeding each layer's two norms fuses (4 per graph); the first norm's
    input is the embedding (Gemma: the embedding times sqrt(hidden), a mul): a near miss."""
    first = "aten.mul.Tensor" if family == "gemma" else "aten.embedding.default"
    assert c == {"matched": 2 * LAYERS * g,
                 f"near_miss: norm input is {first}, not aten.add.Tensor": g}, c


# ---------------------------------------------------------------------------------------------
# 1 + 2: transformers' compiled decode under backend="compile_ops", float32
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_compile_ops_generate_float32(family, fresh_compile):
    """generate() with a StaticCache and CompileConfig(backend="compile_ops") against the same
    generate() uncompiled, float32, a left-padded batch of 2: tokens equal, every step's logits
    and the final cache to float32 rounding. Then the passes' counters.

    Graphs: one decode graph per family, except Mistral: StaticCache gives its layers (config
    sliding_window 8) StaticSlidingWindowLayer, 8 slots, whose update() branches on a Python int
    (``cumulative_length_int``: cache full or not, and the mask's kv offset); with
    ``dynamic=False`` Dynamo specializes that int and guards on its value, so every decode step
    compiles its own graph: NEW - 1 graphs (the first token comes from the uncompiled prefill),
    here 2: one while the window still has room (index_copy write), one once it is full (roll).
    (More steps than Dynamo's recompile_limit, 8, would fail under fullgraph=True: that is
    transformers' recipe, not the backend.) Every graph is rewritten alike.

    Counters per graph: static_cache_attention matched once per attention layer (generate()'s
    prebuilt mask is a graph input: the op reads it within the bounds traced from it; Mistral's
    sliding-window mask included); rms_norm_math as _norm_counts says (Qwen3's per-head q/k
    norms are not rewritten: near misses), add_rms_norm as _assert_add_rms_norm says. The op's
    CPU kernel runs once per layer per decode step."""
    model = hf.build(family, tiny=True)
    want = _eager_float32(family)
    with _recording() as rec:
        got = _generate(model, NEW[family], "compile_ops")
    _assert_same_float32(got, want, f"{family}: compile_ops generate vs eager")

    window = getattr(model.config, "sliding_window", None)
    slots = want.cache[0][0].shape[2]
    if window:  # the cache is the window, and the last decode step's position is past it
        assert slots == window <= PROMPT + NEW[family] - 2, (slots, window)
    else:
        assert slots == CACHE_LEN, slots

    g = _graphs(family)
    assert rec.graphs == [LAYERS] * g, rec.graphs  # per graph: one op per layer after the passes
    assert len(rec.op_calls) == LAYERS * (NEW[family] - 1), len(rec.op_calls)
    c = lowerings.counters()
    assert c.get("static_cache_attention") == {"matched": LAYERS * g}, c
    assert c.get("rms_norm_math") == _norm_counts(family, g), c
    _assert_add_rms_norm(c.get("add_rms_norm"), family, g)


# ---------------------------------------------------------------------------------------------
# 3: bfloat16
# ---------------------------------------------------------------------------------------------
# The bound on |compiled - eager| for a bf16 logit. Each bf16 rounding changes a value by at most
# u = 2**-8 of its size. On the path to a logit a run rounds at ~16 places (per decoder layer:
# the input norm's normalize and weight multiply, q/k/v, rotary, attention, o_proj + residual,
# the post-attention norm's two, gate/up, activation, activation * up, down + residual; the
# final norm and lm_head once), and Inductor's fused kernels skip many of the roundings eager
# makes, so the two runs round differently at up to ~16 places each. Taking each as u of the
# largest value summed into a logit (the step's max |logit|) gives at most 16 u max|logit| per
# run from the exact value, 32 u max|logit| between the two runs: TOL = 32 u max|logit| (about
# 0.9 at max|logit| 7-8; measured over 12 prompts: 2-18 u max|logit|, the eager bf16 run itself
# up to 14 u max|logit| from the float32 evaluation of the same bf16 weights). A wrong attention
# (a masked slot read, a slot missed) moves logits by about their spread, ~2-3 here.
# Tokens: a different greedy token needs the top-2 margin to close; each run is within 16 u max
# of the exact logits, so the runs agree wherever eager's top-2 gap exceeds 4 * 16 u max = 2 TOL.
BF16_TOL_ULPS = 32
BF16_BATCH = 8  # more rows than the float32 batch: more greedy tokens with a clear margin


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_ops_generate_bfloat16(family, fresh_compile):
    """generate() in bfloat16, compiled with backend="compile_ops" vs uncompiled, 2 new tokens:
    step 0 is the prefill, never compiled (logits identical); step 1, the first compiled decode
    step, within TOL = 32 u max|logit| (u = 2**-8: see the comment above), its tokens equal
    where eager's top-2 gap exceeds 2 TOL. Counters: the attention rewritten per layer; the
    norms as in float32, except Gemma's (_norm_counts: a near miss each, nothing for
    add_rms_norm to fuse)."""
    model = hf.build(family, tiny=True, dtype=torch.bfloat16)
    eager = _generate(model, 2, batch=BF16_BATCH)
    with _recording() as rec:
        got = _generate(model, 2, "compile_ops", batch=BF16_BATCH)
    assert torch.equal(got.logits[0], eager.logits[0])
    assert torch.equal(got.tokens[:, 0], eager.tokens[:, 0])
    el, gl = eager.logits[1], got.logits[1]
    tol = BF16_TOL_ULPS * BF16_U * float(el.abs().max())
    diff = float((gl - el).abs().max())
    assert diff <= tol, f"{family}: bf16 logits differ by {diff:.4g} > {tol:.4g}"
    top = el.topk(2, dim=-1).values
    clear = (top[:, 0] - top[:, 1]) > 2 * tol
    assert torch.equal(got.tokens[clear, 1], eager.tokens[clear, 1]), (
        clear.tolist(), got.tokens[:, 1].tolist(), eager.tokens[:, 1].tolist())

    assert rec.graphs == [LAYERS], rec.graphs
    assert len(rec.op_calls) == LAYERS, len(rec.op_calls)
    c = lowerings.counters()
    assert c.get("static_cache_attention") == {"matched": LAYERS}, c
    assert c.get("rms_norm_math") == _norm_counts(family, 1, torch.bfloat16), c
    if family == "gemma":  # no compile_ops.rms_norm for add_rms_norm to fuse
        assert "add_rms_norm" not in c, c
    else:
        _assert_add_rms_norm(c.get("add_rms_norm"), family, 1)


# ---------------------------------------------------------------------------------------------
# 4: the attention name
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_name(family, fresh_compile):
    """The model built with attn_implementation="compile_ops" (compile_ops.hf's registered
    attention function), float32: generate() uncompiled and compiled with backend="inductor"
    (none of our passes) both give the SDPA model's eager tokens, logits and cache. Proof the op
    ran: its CPU kernel executes once per layer per decode step in both runs (prefill, 7 query
    tokens, goes to SDPA), and no pass of ours ran."""
    want = _eager_float32(family)
    model = hf.build(family, tiny=True, attn_implementation="compile_ops")
    assert model.config._attn_implementation == "compile_ops"
    steps = NEW[family] - 1
    with _recording() as rec:
        eager = _generate(model, NEW[family])
    assert len(rec.op_calls) == LAYERS * steps, len(rec.op_calls)
    _assert_same_float32(eager, want, f"{family}: attention name, eager, vs SDPA eager")
    with _recording() as rec:
        got = _generate(model, NEW[family], "inductor")
    assert len(rec.op_calls) == LAYERS * steps, len(rec.op_calls)
    assert rec.graphs == [] and lowerings.counters() == {}, (rec.graphs, lowerings.counters())
    _assert_same_float32(got, want, f"{family}: attention name, inductor, vs SDPA eager")


# ---------------------------------------------------------------------------------------------
# 5: the default pass-device policy
# ---------------------------------------------------------------------------------------------
def test_default_policy_leaves_cpu_graphs_to_inductor(fresh_compile):
    """Under the default policy ("auto"; the suite sets "all") backend="compile_ops" rewrites
    nothing on this CPU graph: the passes for the GPU only count it as skipped; the one that
    also runs on the CPU, static_cache_attention, only from CPU_MIN_ELEMENTS of repeat_kv copy,
    counts a near miss per layer (the tiny cache is far below); nothing matched, SDPA stays,
    the op never runs; generate()'s tokens, logits and cache are still eager's."""
    from lowerings.static_cache_attention import CPU_MIN_ELEMENTS

    family = "llama"
    want = _eager_float32(family)
    model = hf.build(family, tiny=True)
    with lowerings.pass_devices("auto"), _recording() as rec:
        assert lowerings.pass_device_policy() == "auto"
        got = _generate(model, NEW[family], "compile_ops")
    _assert_same_float32(got, want, f"{family}: compile_ops generate (auto policy) vs eager")
    assert rec.graphs == [0] and rec.op_calls == [], (rec.graphs, len(rec.op_calls))
    assert lowerings.pass_manager().ops_after.count(SDPA_CPU) == LAYERS
    c = lowerings.counters()
    passes = lowerings.pass_manager().passes
    assert set(c) == {p.name for p in passes}, c
    for p in passes:
        assert "matched" not in c[p.name], c
        if "cpu" not in p.devices:
            (key, n), = c[p.name].items()
            assert key.startswith(SKIPPED_CPU) and n == 1, (p.name, c[p.name])
    cfg = model.config
    copied = 2 * cfg.num_attention_heads * CACHE_LEN * (cfg.hidden_size // cfg.num_attention_heads)
    assert copied < CPU_MIN_ELEMENTS
    assert c["static_cache_attention"] == {
        f"near_miss: CPU: repeat_kv copies {copied} elements, below {CPU_MIN_ELEMENTS}: "
        "Inductor's own code is faster there": LAYERS}, c


# ---------------------------------------------------------------------------------------------
# 6: near misses
# ---------------------------------------------------------------------------------------------
def _prefill_then(model, cache, ids, start: int, forward=None):
    """Runs ids[:, :start] eagerly into `cache`, then ids[:, start:] through `forward` (default
    the model), both at their cache positions; returns the second call's logits."""
    kw = {_cache_kwarg(model): cache, "use_cache": True}
    with torch.no_grad():
        model(input_ids=ids[:, :start], cache_position=torch.arange(start), **kw)
        run = model if forward is None else forward
        out = run(input_ids=ids[:, start:], cache_position=torch.arange(start, ids.shape[1]),
                  **kw)
    return out.logits


def test_prefill_chunk_is_a_near_miss(fresh_compile):
    """A chunk of 4 query tokens into a StaticCache (positions 3..6 after an eager 3-token
    prefill), the forward compiled with backend="compile_ops": not a decode step, so each
    layer's SDPA stays, counted as a near miss with its reason; logits and cache are eager's."""
    from transformers import StaticCache

    model = hf.build("llama", tiny=True)
    ids = _prompts()[0].clamp(min=3)  # no padding: no attention_mask
    caches = [StaticCache(config=model.config, max_cache_len=CACHE_LEN) for _ in range(2)]
    want = _prefill_then(model, caches[0], ids, 3)
    compiled = torch.compile(model, backend="compile_ops", fullgraph=True)
    with _recording() as rec:
        got = _prefill_then(model, caches[1], ids, 3, compiled)
    c = lowerings.counters()
    assert c.get("static_cache_attention") == {
        "near_miss: 4 query tokens (prefill), not one": LAYERS}, c
    after = lowerings.pass_manager().ops_after
    assert after.count(SDPA_CPU) == LAYERS and OP not in after, after
    assert rec.op_calls == [], len(rec.op_calls)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for (gk, gv), (wk, wv) in zip(_cache_tensors(caches[1]), _cache_tensors(caches[0])):
        torch.testing.assert_close(gk, wk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gv, wv, atol=1e-5, rtol=1e-5)


def test_attention_name_leaves_dropout_and_prefill_to_sdpa(monkeypatch):
    """attn_implementation="compile_ops", eager: in training mode with attention dropout, a
    decode step (one query token) is not the op's (dropout): transformers' SDPA runs it, as it
    runs the prefill (7 query tokens); back in eval mode the next decode step is the op's. The
    reasons are compile_ops.hf._why_not's, recorded per call."""
    from transformers import StaticCache
    from transformers.integrations import sdpa_attention

    model = hf.build("llama", tiny=True, attn_implementation="compile_ops")
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    reasons, sdpa_calls = [], []
    why_not, sdpa = hf._why_not, sdpa_attention.sdpa_attention_forward

    def recording_why_not(*args, **kwargs):
        reasons.append(why_not(*args, **kwargs))
        return reasons[-1]

    def counting_sdpa(*args, **kwargs):
        sdpa_calls.append(kwargs.get("dropout"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(hf, "_why_not", recording_why_not)
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", counting_sdpa)
    ids = _prompts()[0].clamp(min=3)
    cache = StaticCache(config=model.config, max_cache_len=CACHE_LEN)
    kw = {_cache_kwarg(model): cache, "use_cache": True}
    with _recording() as rec, torch.no_grad():
        model.train()
        model(input_ids=ids, cache_position=torch.arange(PROMPT), **kw)
        model(input_ids=ids[:, -1:], cache_position=torch.tensor([PROMPT]), **kw)
        assert reasons == [f"{PROMPT} query tokens"] * LAYERS + ["dropout"] * LAYERS, reasons
        assert sdpa_calls == [0.5] * (2 * LAYERS) and rec.op_calls == [], (sdpa_calls,
                                                                          rec.op_calls)
        model.eval()
        out = model(input_ids=ids[:, -1:], cache_position=torch.tensor([PROMPT + 1]), **kw)
    assert reasons[2 * LAYERS:] == [None] * LAYERS, reasons
    assert len(sdpa_calls) == 2 * LAYERS and len(rec.op_calls) == LAYERS
    assert torch.isfinite(out.logits).all()
