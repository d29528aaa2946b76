"""Tensor parallelism of the paged-KV Llama (compile_ops/models/llama.py, issue 27): the
divisibility errors, one pair of gloo processes running the tiny model at tp=2 (eager and
under the compile_ops backend) checked against the one-process model and the plain-PyTorch
reference, and on two GPUs the main job under torchrun."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from compile_ops.models.llama import (
    FP8_TP_LOGITS_TOLERANCE,
    Llama,
    LlamaConfig,
    LlamaReference,
    PagedKVCache,
    allreduce_norm_expected,
    compare_generations,
    generate,
    logits_tolerance,
    main,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# As tests/models/test_llama.py: odd batch and prompt, blocks of 8, decode crosses into a
# third block (11 + 6 = 17 tokens).
B, T, N = 3, 11, 6
TP = 2


def _prompt(cfg):
    return torch.randint(0, cfg.vocab, (B, T), generator=torch.Generator().manual_seed(1))


def _has_allreduce_norm() -> bool:
    import lowerings

    return hasattr(torch.ops.compile_ops, "fused_allreduce_add_rms_norm") and any(
        p.name == "allreduce_norm" for p in lowerings.pass_manager().passes)


# ---------------------------------------------------------------------------------------------
# Sizes that do not split
# ---------------------------------------------------------------------------------------------
def test_divisibility_errors():
    with pytest.raises(ValueError, match=r"heads \(4\) must be divisible by tp \(3\)"):
        LlamaConfig.tiny(tp=3)
    with pytest.raises(ValueError, match=r"kv_heads \(2\) must be divisible by tp \(4\)"):
        LlamaConfig.tiny(heads=8, tp=4)
    with pytest.raises(ValueError, match=r"intermediate \(511\) must be divisible by tp \(2\)"):
        LlamaConfig.tiny(intermediate=511, tp=2)
    with pytest.raises(ValueError, match="tp must be a positive int"):
        LlamaConfig.tiny(tp=0)
    cfg = LlamaConfig.tiny(tp=2)
    assert (cfg.local_heads, cfg.local_kv_heads, cfg.local_intermediate) == (2, 1, 256)
    assert (cfg.local_q_size, cfg.local_kv_size) == (128, 64)
    assert cfg.describe().endswith(", tensor parallel 2")
    assert "tensor parallel" not in LlamaConfig.tiny().describe()
    # a rank's paged cache holds its KV heads
    assert PagedKVCache(cfg, num_blocks=4).kv_caches[0][1].shape == (4, 1, 64, 8)


def test_tp_model_needs_a_process_group_and_the_main_job_torchrun(capsys):
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node 2"):
        Llama(LlamaConfig.tiny(tp=2))
    with pytest.raises(ValueError, match="cfg.tp is 1"):
        Llama(LlamaConfig.tiny(), tp_group=object())
    with pytest.raises(SystemExit):
        main(["--tp", "2", "--device", "cpu"])
    assert "run under torchrun --nproc-per-node 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--tp", "3", "--device", "cpu"])  # said before looking for torchrun's processes
    assert "heads (4) must be divisible by tp (3)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# tp=2 on the CPU: one pair of gloo processes
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: the tiny tp=2 model eager (add + rms_norm, the model's own fused_add_rms_norm,
    FP8 static and dynamic) and the add + rms_norm model compiled with the compile_ops backend
    (every pass on the CPU, no cache hits); the generations and counters go to a file the test
    checks against the one-process model."""
    import torch.distributed as dist

    import lowerings
    from compile_ops.models.llama import compile_steps

    torch.set_num_threads(1)  # two processes on the test machine's cores
    torch._inductor.config.compile_threads = 1  # no pool of compile workers per rank
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=TP)
    try:
        out = {}
        for name, kw in (("eager", {}), ("eager_fused_add", {"fused_add_norm": True}),
                         ("eager_fp8_static", {"fp8": "static"}),
                         ("eager_fp8_dynamic", {"fp8": "dynamic"})):
            fused = kw.pop("fused_add_norm", False)
            cfg = LlamaConfig.tiny(tp=TP, **kw)
            model = Llama(cfg, seed=0, fused_add_norm=fused)
            gen = generate(model, _prompt(cfg), N)
            out[name] = (gen.tokens, gen.logits)
        try:
            LlamaReference(model)
        except ValueError as exc:
            out["reference_error"] = str(exc)

        cfg = LlamaConfig.tiny(tp=TP)
        model = Llama(cfg, seed=0)
        torch._dynamo.reset()
        lowerings.reset_counters()
        with lowerings.pass_devices("all"), \
                torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            prefill_fn, decode_fn = compile_steps(model, "compile_ops", fullgraph=True)
            gen = generate(model, _prompt(cfg), N, prefill_fn=prefill_fn, decode_fn=decode_fn)
        out["compile_ops"] = (gen.tokens, gen.logits)
        out["counters"] = lowerings.counters()
        out["decode_ops_after"] = list(lowerings.pass_manager().ops_after)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _gen(pair):
    from compile_ops.models.llama import Generation

    return Generation(pair[0], pair[1], None)


def test_tp2_on_two_gloo_processes_matches_the_one_process_model(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=TP, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(TP)]
    r0 = ranks[0]
    # Embedding, norms and lm_head are replicated and the all-reduce gives every rank the same
    # sums: both ranks compute the same tokens and logits.
    for key in ("eager", "eager_fused_add", "eager_fp8_static", "eager_fp8_dynamic",
                "compile_ops"):
        assert torch.equal(ranks[1][key][0], r0[key][0]), key
        assert torch.equal(ranks[1][key][1], r0[key][1]), key
    assert "LlamaReference takes the one-process model" in r0["reference_error"]

    # The one-process model from the same seed (the weights the ranks sliced) and the
    # plain-PyTorch reference of it.
    cfg = LlamaConfig.tiny()
    one = Llama(cfg, seed=0)
    want = generate(one, _prompt(cfg), N)
    ref = generate(LlamaReference(one), _prompt(cfg), N)
    tol = logits_tolerance(torch.float32, cfg.layers)
    for key in ("eager", "eager_fused_add", "compile_ops"):
        got = _gen(r0[key])
        assert got.tokens.shape == (B, N) and got.logits.shape == (N, B, cfg.vocab)
        assert torch.equal(got.tokens, want.tokens), key
        # prefill (step 0) and decode steps: only the order of the sums differs
        torch.testing.assert_close(got.logits, want.logits, **tol, msg=key)
        for against in (want, ref):
            cmp = compare_generations(against, got, cfg.dtype, cfg.layers)
            assert cmp.ok and cmp.tokens_equal, f"{key}: {cmp.message}"
    assert len(set(want.tokens.flatten().tolist())) > 3  # not a degenerate model

    # FP8: each rank quantizes its slice of a row-parallel input (per-token scales of the
    # slice), so the TP model is within FP8's own error of the one-process FP8 model
    for fp8 in ("static", "dynamic"):
        cfg8 = LlamaConfig.tiny(fp8=fp8)
        want8 = generate(Llama(cfg8, seed=0), _prompt(cfg8), N)
        got8 = _gen(r0[f"eager_fp8_{fp8}"])
        cmp = compare_generations(want8, got8, cfg8.dtype, cfg8.layers, FP8_TP_LOGITS_TOLERANCE)
        assert cmp.ok, f"fp8 {fp8}: {cmp.message}"
        assert float((got8.logits[0] - want8.logits[0]).abs().max()) < 0.3  # prefill

    # The compile_ops backend's passes on the TP graphs (two graphs: prefill, decode).
    c, after = r0["counters"], r0["decode_ops_after"]
    layers = cfg.layers
    assert c["add_rms_norm"] == {
        "matched": 2 * 2 * layers,
        "near_miss: norm input is aten.embedding.default, not aten.add.Tensor": 2}, c
    assert c["rope_cache"] == {"matched": 2 * layers}, c

    def count(name):
        return sum(1 for o in after if o == name)

    if _has_allreduce_norm():
        # 2 per layer and graph: of the 2 * layers + 1 norms, all but the first layer's input
        # norm (it reads the embedding) follow an all-reduce (o_proj's, down_proj's)
        assert allreduce_norm_expected(LlamaConfig.tiny(tp=TP)) == 2 * layers
        assert c["allreduce_norm"] == {"matched": 2 * 2 * layers}, c
        fused = "auto_functionalized(compile_ops.fused_allreduce_add_rms_norm.default)"
        assert count(fused) == 2 * layers, after
        assert count("_c10d_functional.all_reduce.default") == 0, after
        assert count("auto_functionalized(compile_ops.fused_add_rms_norm.default)") == 0, after
    else:  # the pass is not there yet: the all-reduces stay in front of the fused add + norm
        assert count("_c10d_functional.all_reduce.default") == 2 * layers, after
        assert count("auto_functionalized(compile_ops.fused_add_rms_norm.default)") == \
            2 * layers, after


# ---------------------------------------------------------------------------------------------
# Two GPUs: the main job under torchrun
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_main_job_tp2_under_torchrun_on_two_gpus():
    if torch.cuda.device_count() < TP:
        pytest.skip(f"needs {TP} GPUs, {torch.cuda.device_count()} visible")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(TP),
           "-m", "compile_ops", "--config", "tiny", "--tp", str(TP), "--device", "cuda",
           "--batch", "3", "--prompt-len", "7", "--new-tokens", "4", "--timing-steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for line in ("tensor parallel: 2 ranks (nccl), each holds 2 of 4 heads, 1 of 2 KV heads",
                 "eager: vs the one-process model (tp=1, eager): ",
                 "eager: vs reference (plain PyTorch, dense KV): ",
                 "compile_ops: vs eager: ", "fusion report (backend=compile_ops",
                 "decode step, median of 2 (cuda, bfloat16, batch 3, tp 2, rank 0):",
                 "tokens agree: reference, eager, inductor, compile_ops (3 x 4 tokens)"):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert out.count("llama tiny:") == 1, out  # rank 0 prints, rank 1 does not
    assert out.count("add_rms_norm: matched 4 (expected 4") == 2, out
    if _has_allreduce_norm():
        assert out.count("allreduce_norm: matched 4 (expected 4") == 2, out
