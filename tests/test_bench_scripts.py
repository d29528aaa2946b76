"""The benchmark scripts stay runnable: their CPU checks run here (timing needs a GPU)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SCRIPTS = [
    ("bench/bench_backend.py", "add + rms_norm left unfused (graph inputs), all variants match"),
    ("bench/bench_activation.py", "cpu check ok: 6 activations, all variants match"),
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
]


@pytest.mark.parametrize("script,ok_line", SCRIPTS, ids=[s for s, _ in SCRIPTS])
def test_bench_cpu_check(script, ok_line):
    proc = subprocess.run([sys.executable, script, "--cpu-check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ok_line in proc.stdout
