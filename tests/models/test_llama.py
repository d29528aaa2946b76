"""The paged-KV Llama-style model (compile_ops/models/llama.py): the cache bookkeeping, eager vs
the plain-PyTorch reference, the model compiled with the compile_ops backend vs eager with the
fusion counters, the main-job command end to end, the same on CUDA in bfloat16, and a Hugging Face
Llama under the backend."""

import os
import subprocess
import sys

import pytest
import torch

import lowerings
from compile_ops.models.llama import (
    Llama,
    LlamaConfig,
    LlamaReference,
    PagedKVCache,
    compare_generations,
    compile_steps,
    generate,
    logits_tolerance,
    use_v1,
)
from compile_ops.testing import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Odd batch and prompt length; blocks of 8 tokens: the prompts span two blocks and the decode
# steps cross into a third (11 + 6 = 17 tokens).
B, T, N = 3, 11, 6


def make(dtype=torch.float32, device="cpu", **model_kw):
    cfg = LlamaConfig.tiny(dtype=dtype)
    model = Llama(cfg, seed=0, device=device, **model_kw)
    prompt = torch.randint(0, cfg.vocab, (B, T), generator=torch.Generator().manual_seed(1))
    return cfg, model, prompt.to(device)


# ---------------------------------------------------------------------------------------------
# KV-cache manager
# ---------------------------------------------------------------------------------------------
def test_cache_layout_blocks_and_slots():
    cfg = LlamaConfig.tiny()
    cache = PagedKVCache(cfg, num_blocks=12, seed=3)
    kc, vc = cache.kv_caches[0]
    assert len(cache.kv_caches) == cfg.layers
    assert kc.shape == (12, cfg.kv_heads, cfg.head_dim // 4, cfg.block_size, 4)  # x = 16 / 4
    assert vc.shape == (12, cfg.kv_heads, cfg.head_dim, cfg.block_size)

    seqs = cache.add_sequences(B)
    positions, slots = cache.prefill(seqs, T)
    assert positions.dtype == slots.dtype == torch.int64
    assert positions.tolist() == list(range(T)) * B
    assert len(set(slots.tolist())) == B * T and 0 <= min(slots.tolist())
    assert max(slots.tolist()) < 12 * cfg.block_size
    for i, s in enumerate(seqs):
        table = cache.block_table[s]
        assert len(table) == 2  # 11 tokens in blocks of 8
        want = [table[p // 8] * 8 + p % 8 for p in range(T)]
        assert slots[i * T:(i + 1) * T].tolist() == want
    all_blocks = sum((cache.block_table[s] for s in seqs), [])
    assert sorted(all_blocks) != list(range(len(all_blocks)))  # scattered, not in order

    for step in range(N - 1):
        pos, slot, tables, lens = cache.decode(seqs)
        assert pos.tolist() == [T + step] * B and pos.dtype == torch.int64
        assert lens.tolist() == [T + step + 1] * B and lens.dtype == torch.int32
        assert tables.dtype == torch.int32 and tables.shape == (B, cfg.max_blocks)
        for i, s in enumerate(seqs):
            assert slot[i] == cache.slot(s, T + step)
            assert tables[i, :len(cache.block_table[s])].tolist() == cache.block_table[s]
    assert [len(cache.block_table[s]) for s in seqs] == [2] * B  # 16 tokens: still two blocks
    cache.decode(seqs)  # token 17: a third block each
    assert [len(cache.block_table[s]) for s in seqs] == [3] * B
    with pytest.raises(RuntimeError, match="out of KV-cache blocks"):
        cache.prefill(cache.add_sequences(1), 3 * 8 + 1)
    cache.free(seqs)
    assert len(cache._free) == 12 - 3  # the last sequence's three blocks are still taken
    with pytest.raises(ValueError, match="max_seq_len"):
        cache.prefill(cache.add_sequences(1), cfg.max_seq_len + 1)


def test_attention_version_rule_is_vllms():
    # vLLM's PagedAttention.forward_decode: v1 when max_seq_len <= 8192 and (one 512-token
    # partition or num_seqs * num_heads > 512)
    assert use_v1("auto", 512, 1, 32)            # one partition
    assert not use_v1("auto", 528, 1, 32)        # two partitions, 32 heads: v2
    assert not use_v1("auto", 4112, 16, 32)      # 16 x 32 = 512 is not > 512
    assert use_v1("auto", 4112, 17, 32)
    assert use_v1("auto", 8192, 128, 32)
    assert not use_v1("auto", 8208, 128, 32)     # past 8192: v2 whatever the batch
    assert use_v1("v1", 100000, 1, 1) and not use_v1("v2", 16, 128, 32)
    with pytest.raises(ValueError, match="attn_version"):
        Llama(LlamaConfig.tiny(), attn_version="v3")


# ---------------------------------------------------------------------------------------------
# Eager vs the plain-PyTorch reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn_version", ["auto", "v1", "v2"])
@pytest.mark.parametrize("fused_add_norm", [False, True], ids=["add+rms_norm", "fused_add"])
def test_eager_matches_reference(attn_version, fused_add_norm):
    cfg, model, prompt = make(attn_version=attn_version, fused_add_norm=fused_add_norm)
    ref = generate(LlamaReference(model), prompt, N)
    got = generate(model, prompt, N)
    assert got.tokens.shape == (B, N) and got.logits.shape == (N, B, cfg.vocab)
    assert torch.equal(got.tokens, ref.tokens)
    torch.testing.assert_close(got.logits, ref.logits,
                               **logits_tolerance(torch.float32, cfg.layers))
    cmp = compare_generations(ref, got, cfg.dtype, cfg.layers)
    assert cmp.ok and cmp.tokens_equal, cmp.message
    assert len(set(ref.tokens.flatten().tolist())) > 3  # not a degenerate model


def test_paged_cache_holds_the_reference_keys_and_values():
    """After prefill + decode, every token's rotated key and value sits at its slot of the paged
    layout (key x-packed), equal to the reference's dense cache."""
    cfg, model, prompt = make()
    ref_model = LlamaReference(model)
    dense = ref_model.new_cache(B)
    generate(ref_model, prompt, N, kv_cache=dense)
    paged = PagedKVCache(cfg)
    gen = generate(model, prompt, N, kv_cache=paged)
    length = T + N - 1  # the last generated token is not written
    for (kc, vc), (dk, dv) in zip(paged.kv_caches, dense):
        for i, s in enumerate(gen.session.seqs):
            assert paged.seq_len[s] == length
            slots = torch.tensor([paged.slot(s, p) for p in range(length)])
            blk, off = slots // cfg.block_size, slots % cfg.block_size
            keys = kc[blk, :, :, off, :].reshape(length, cfg.kv_heads, cfg.head_dim)
            values = vc[blk, :, :, off]
            assert_close(keys, dk[i, :, :length].transpose(0, 1))
            assert_close(values, dv[i, :, :length].transpose(0, 1))


def test_comparison_flags_wrong_logits_and_accepts_only_near_ties():
    cfg, model, prompt = make()
    ref = generate(LlamaReference(model), prompt, 3)
    bad = generate(model, prompt, 3)
    bad.logits[1, 0, 5] += 1.0
    cmp = compare_generations(ref, bad, cfg.dtype, cfg.layers)
    assert not cmp.ok and "step 1, sequence 0, token 5" in cmp.message
    flipped = generate(model, prompt, 3)
    flipped.tokens[2, 1] = (flipped.tokens[2, 1] + 1) % cfg.vocab  # no tie: a real mismatch
    cmp = compare_generations(ref, flipped, cfg.dtype, cfg.layers)
    assert not cmp.ok and "is no tie" in cmp.message


# ---------------------------------------------------------------------------------------------
# Compiled with the compile_ops backend
# ---------------------------------------------------------------------------------------------
def test_compile_ops_backend_matches_eager_and_fuses(fresh_compile):
    cfg, model, prompt = make()
    eager = generate(model, prompt, N)
    prefill_fn, decode_fn = compile_steps(model, "compile_ops", fullgraph=True)
    got = generate(model, prompt, 2, prefill_fn=prefill_fn, decode_fn=decode_fn)  # compiles
    pm = lowerings.pass_manager()
    decode_after = list(pm.ops_after)  # the last graph compiled: the decode step
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph per step kind
        got = generate(model, prompt, N, prefill_fn=prefill_fn, decode_fn=decode_fn)
    assert torch.equal(got.tokens, eager.tokens)
    assert_close(got.logits, eager.logits)

    c = lowerings.counters()
    layers = cfg.layers
    # per graph: layer 0's post-attention norm, 2 per later layer, the final norm = 2 * layers;
    # the first layer's input norm reads the embedding (no add): a near miss. Two graphs.
    assert c["add_rms_norm"] == {
        "matched": 2 * 2 * layers,
        "near_miss: norm input is aten.embedding.default, not aten.add.Tensor": 2}, c
    # rotary_embedding + the paged reshape_and_cache: one fused_rope_and_cache per layer and
    # graph, no near miss
    assert c["rope_cache"] == {"matched": 2 * layers}, c
    # GEMM -> silu_and_mul -> GEMM: the activation kernel is kept
    assert c["lower_activation"] == {
        "near_miss: kept the CUDA kernel: no pointwise neighbour to fuse with": 2 * layers}, c

    def count(ops, name):
        return sum(1 for o in ops if o == f"auto_functionalized(compile_ops.{name}.default)")

    assert count(decode_after, "fused_add_rms_norm") == 2 * layers
    assert count(decode_after, "fused_rope_and_cache") == layers
    assert count(decode_after, "rotary_embedding") == 0
    assert count(decode_after, "reshape_and_cache") == 0
    assert count(decode_after, "rms_norm") == 1
    version = "v1" if use_v1(model.attn_version, cfg.max_seq_len, B, cfg.heads) else "v2"
    assert count(decode_after, f"paged_attention_{version}") == layers
    # greedy sampling: the argmax pass leaves CPU graphs to Inductor (auto policy)
    assert c["argmax"] == {"near_miss: not a CUDA tensor": 2}, c
    assert "aten.add.Tensor" not in decode_after


def test_inductor_backend_matches_eager_without_fusing(fresh_compile):
    cfg, model, prompt = make(attn_version="v1")
    eager = generate(model, prompt, 3)
    prefill_fn, decode_fn = compile_steps(model, "inductor")
    got = generate(model, prompt, 3, prefill_fn=prefill_fn, decode_fn=decode_fn)
    assert torch.equal(got.tokens, eager.tokens)
    assert_close(got.logits, eager.logits)
    assert lowerings.counters() == {}  # the passes belong to the compile_ops backend only


# ---------------------------------------------------------------------------------------------
# FP8 (W8A8) projections: the norm + quant and SiLU + quant fusions (issue 26)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fp8", ["dynamic", "static"])
def test_fp8_model_fuses_norm_and_activation_quant(fp8, fresh_compile):
    cfg = LlamaConfig.tiny(fp8=fp8)
    model = Llama(cfg, seed=0)
    prompt = torch.randint(0, cfg.vocab, (B, T), generator=torch.Generator().manual_seed(1))
    eager = generate(model, prompt, 3)
    ref = generate(LlamaReference(model), prompt, 3)
    # paged vs dense attention differ in float32 rounding; an FP8 code that flips on it moves a
    # logit by up to ~0.1 here: the tokens must agree, the logits only roughly
    assert torch.equal(ref.tokens, eager.tokens)
    assert float((ref.logits - eager.logits).abs().max()) < 0.3
    prefill_fn, decode_fn = compile_steps(model, "compile_ops", fullgraph=True)
    got = generate(model, prompt, 3, prefill_fn=prefill_fn, decode_fn=decode_fn)
    # The fused ops quantize exactly as the native formulas (float32, same ops): same tokens,
    # logits within the float32 tolerance (reduction order of the norms).
    assert torch.equal(got.tokens, eager.tokens)
    assert_close(got.logits, eager.logits)
    c = lowerings.counters()
    layers = cfg.layers
    # Two graphs (prefill, decode); per graph each layer's two norms feed an FP8 projection
    # (the final norm feeds the bf16 lm_head: not an FP8 model's norm, nothing said).
    assert c["norm_quant"] == {"matched": 2 * 2 * layers}, c
    if fp8 == "static":
        assert c["act_quant"] == {"matched": 2 * layers}, c
    else:  # vLLM has no fused SiLU + per-token quant op
        assert c["act_quant"] == {
            "near_miss: dynamic per-token quantization of the activation (no fused op)":
                2 * layers}, c
    after = lowerings.pass_manager().ops_after  # the decode graph

    def count(name):
        return sum(1 for o in after if o == f"auto_functionalized(compile_ops.{name}.default)")

    if fp8 == "static":
        assert count("rms_norm_static_fp8_quant") == 1       # layer 0's input norm
        assert count("fused_add_rms_norm_static_fp8_quant") == 2 * layers - 1
        assert count("silu_and_mul_quant") == layers
    else:
        assert count("rms_norm_dynamic_per_token_quant") == 2 * layers
    assert count("fused_add_rms_norm") == 1  # the final norm (lm_head in the model dtype)


# ---------------------------------------------------------------------------------------------
# The main-job command
# ---------------------------------------------------------------------------------------------
def test_main_command_runs_on_cpu():
    proc = subprocess.run(
        [sys.executable, "-m", "compile_ops.models.llama", "--config", "tiny", "--batch", "3",
         "--prompt-len", "7", "--new-tokens", "4", "--device", "cpu", "--timing-steps", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "batch 3, prompt 7, 4 new tokens (max_seq_len 16), cpu (reference kernels)" in out
    for line in ("eager: vs reference (plain PyTorch, dense KV): tokens equal",
                 "inductor: vs eager: tokens equal", "compile_ops: vs eager: tokens equal",
                 "inductor: compiling the prefill step ...",
                 "compile_ops: compiling the decode step ...",
                 "compile_ops: timing the decode step ...",
                 "fusion report (backend=compile_ops",
                 "  prefill graph:", "  decode graph:",
                 "compile_ops ops in the generated code:",
                 "decode step, median of 2 (cpu, float32, batch 3):",
                 "tokens agree: reference, eager, inductor, compile_ops (3 x 4 tokens)"):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert out.count("add_rms_norm: matched 4 (expected 4") == 2, out
    assert out.count("rope_cache: matched 2 (expected 2: rotary_embedding + reshape_and_cache "
                     "-> fused_rope_and_cache per layer") == 2, out
    # attn_version "auto": 3 sequences x 4 heads, one 512-token partition -> v1 (vLLM's rule)
    assert "compile_ops ops after the passes:  fused_add_rms_norm x4, fused_rope_and_cache x2, " \
           "paged_attention_v1 x2" in out
    assert "compile_ops decode:  fused_add_rms_norm x4, fused_rope_and_cache x2, " \
           "paged_attention_v1 x2" in out
    assert "inductor decode:     paged_attention_v1 x2, reshape_and_cache x2, rms_norm x5" in out
    for name in ("eager", "inductor", "compile_ops"):
        assert any(ln.split()[:1] == [name] and ln.rstrip().endswith(" ms")
                   for ln in out.splitlines()), out


# ---------------------------------------------------------------------------------------------
# CUDA (bfloat16): the kernels, CUDA graphs for the decode step
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("attn_version", ["v1", "v2"])
def test_cuda_bf16_matches_reference_and_compiles(attn_version, fresh_compile):
    cfg, model, prompt = make(torch.bfloat16, "cuda", attn_version=attn_version)
    ref = generate(LlamaReference(model), prompt, N)
    eager = generate(model, prompt, N)
    cmp = compare_generations(ref, eager, cfg.dtype, cfg.layers)
    assert cmp.ok, cmp.message
    cache = PagedKVCache(cfg, "cuda")
    cache.mark_static()  # the CUDA graphs of the decode step write into the caches
    prefill_fn, decode_fn = compile_steps(model, "compile_ops", cuda_graphs=True)
    for _ in range(2):  # compile + record, then replay
        got = generate(model, prompt, N, prefill_fn=prefill_fn, decode_fn=decode_fn,
                       kv_cache=cache)
        cmp = compare_generations(eager, got, cfg.dtype, cfg.layers)
        assert cmp.ok, cmp.message
    assert lowerings.counters()["add_rms_norm"]["matched"] == 2 * 2 * cfg.layers


@pytest.mark.cuda
@pytest.mark.parametrize("fp8", ["dynamic", "static"])
def test_cuda_fp8_model_fuses_and_compiles(fp8, fresh_compile):
    """The FP8 W8A8 model in bf16 on the GPU: eager (native quant + torch._scaled_mm) against
    the compile_ops backend with CUDA graphs (the fused norm / SiLU + quant kernels): the tokens
    agree (an FP8 code flipped by float32 reduction order may move a logit by ~0.1, so the
    logits are compared loosely), and the passes fire as on the CPU."""
    cfg = LlamaConfig.tiny(dtype=torch.bfloat16, fp8=fp8)
    model = Llama(cfg, seed=0, device="cuda")
    prompt = torch.randint(0, cfg.vocab, (B, T), generator=torch.Generator().manual_seed(1))
    prompt = prompt.cuda()
    eager = generate(model, prompt, N)
    cache = PagedKVCache(cfg, "cuda")
    cache.mark_static()
    prefill_fn, decode_fn = compile_steps(model, "compile_ops", cuda_graphs=True)
    for _ in range(2):  # compile + record, then replay
        got = generate(model, prompt, N, prefill_fn=prefill_fn, decode_fn=decode_fn,
                       kv_cache=cache)
        cmp = compare_generations(eager, got, cfg.dtype, cfg.layers)
        assert cmp.tokens_equal or cmp.ok, cmp.message
        assert float((got.logits - eager.logits).abs().max()) < 0.5
    c = lowerings.counters()
    assert c["norm_quant"]["matched"] == 2 * 2 * cfg.layers, c
    if fp8 == "static":
        assert c["act_quant"]["matched"] == 2 * cfg.layers, c


# ---------------------------------------------------------------------------------------------
# A Hugging Face Llama under the compile_ops backend
# ---------------------------------------------------------------------------------------------
def test_hugging_face_llama_under_the_backend(fresh_compile):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed: the Hugging Face Llama check "
                               "needs it (pip install transformers)")
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.2)  # larger than the default 0.02: logits of O(1), not ~0
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()  # random weights, nothing downloaded
    ids = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(model, backend="compile_ops")
        got = compiled(input_ids=ids, use_cache=False).logits
    assert got.shape == (B, T, 256)
    torch.testing.assert_close(got, eager, **logits_tolerance(torch.float32, 2))
    assert torch.equal(got.argmax(-1), eager.argmax(-1))
    # Hugging Face's Llama calls no compile_ops op: its module-math RMSNorms (two per layer and
    # the final one) become rms_norm, and each one reading a residual sum (all but the first,
    # which reads the embedding) fused_add_rms_norm; the other passes find nothing to rewrite
    c = lowerings.counters()
    assert c["rms_norm_math"] == {"matched": 5}, c
    assert c["add_rms_norm"] == {
        "matched": 4, "near_miss: norm input is aten.embedding.default, not aten.add.Tensor": 1}, c
    assert all("matched" not in v for k, v in c.items()
               if k not in ("rms_norm_math", "add_rms_norm")), c
