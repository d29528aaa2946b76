"""The benchmark scripts stay runnable: their CPU checks run here (timing needs a GPU)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SCRIPTS = [
    ("bench/bench_backend.py",
     "add + rms_norm fused out of place (graph inputs), all variants match"),
    ("bench/bench_activation.py", "cpu check ok: 6 activations, all variants match"),
    ("bench/bench_quant.py", "cpu check ok: 9 quant cases, all variants match"),
    ("bench/bench_rotary.py", "cpu check ok: rotary_embedding variants match"),
    ("bench/bench_cache.py", "cpu check ok: kv-cache variants match"),
    ("bench/bench_rope_cache.py", "cpu check ok: rope + cache variants match"),
    ("bench/bench_attention.py",
     "cpu check ok: attention variants match (merge_attn_states, paged_attention)"),
    ("bench/bench_mla.py", "cpu check ok: mla variants match"),
    ("bench/bench_e2e.py", "cpu check ok: e2e variants match"),
    ("bench/bench_sampling.py", "cpu check ok: argmax variants match"),
    ("bench/bench_hf.py", "cpu check ok: hf variants match"),
    ("bench/bench_static_cache.py",
     "cpu check ok: static_cache_attention matches HF's repeat_kv + masked SDPA"),
    ("bench/bench_hf_pieces.py",
     "cpu check ok: rotary_embedding / silu_and_mul / gelu_tanh_and_mul match HF's math"),
]


@pytest.mark.parametrize("script,ok_line", SCRIPTS, ids=[s for s, _ in SCRIPTS])
def test_bench_cpu_check(script, ok_line):
    proc = subprocess.run([sys.executable, script, "--cpu-check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ok_line in proc.stdout


def test_bench_hf_generate_cpu_workers(tmp_path):
    """bench_hf.py --generate on the CPU through the worker processes (two families at once, the
    timed parts under the file lock): every (point, variant) measured, the report written (a
    table per family, the JSON, a plot per family), --report-only rebuilds it."""
    import json

    out = str(tmp_path)
    cmd = [sys.executable, "bench/bench_hf.py", "--generate", "--device", "cpu",
           "--families", "llama", "qwen3", "--points", "2x64", "--new-tokens", "4",
           "--repeats", "1", "--variants", "eager", "compile_ops", "--left-pad", "3",
           "--workers", "2", "--out", out]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stem = os.path.join(out, "hf_generate_cpu_tiny")
    with open(stem + ".json") as f:
        recs = json.load(f)["results"]
    got = {(r["family"], r["variant"]) for r in recs if r.get("tokens_per_s")}
    assert got == {(f, v) for f in ("llama", "qwen3") for v in ("eager", "compile_ops")}, recs
    for r in recs:
        assert r["batch"] == 2 and r["max_cache_len"] == 64 and r["left_pad"] == 3, r
        assert r["tokens_equal_eager"] == 1.0, r  # float32: compile_ops' tokens are eager's
    with open(stem + ".md") as f:
        md = f.read()
    assert "## llama" in md and "## qwen3" in md and "compile_ops x inductor" not in md, md
    assert os.path.exists(stem + "_llama.png") and os.path.exists(stem + "_qwen3.png")
    os.remove(stem + ".md")
    proc = subprocess.run(cmd[:5] + ["--report-only", "--out", out], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and os.path.exists(stem + ".md"), proc.stdout + proc.stderr
