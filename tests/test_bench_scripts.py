"""The benchmark scripts stay runnable: their CPU checks run here (timing needs a GPU)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_backend_cpu_check():
    proc = subprocess.run([sys.executable, "bench/bench_backend.py", "--cpu-check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cpu check ok: 4 layers fused, all variants match" in proc.stdout


def test_bench_activation_cpu_check():
    proc = subprocess.run([sys.executable, "bench/bench_activation.py", "--cpu-check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cpu check ok: 6 activations, all variants match" in proc.stdout


def test_bench_rotary_cpu_check():
    proc = subprocess.run([sys.executable, "bench/bench_rotary.py", "--cpu-check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cpu check ok: rotary_embedding variants match" in proc.stdout


def test_bench_cache_cpu_check():
    proc = subprocess.run([sys.executable, "bench/bench_cache.py", "--cpu-check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cpu check ok: kv-cache variants match" in proc.stdout


def test_bench_rope_cache_cpu_check():
    proc = subprocess.run([sys.executable, "bench/bench_rope_cache.py", "--cpu-check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cpu check ok: rope + cache variants match" in proc.stdout


def test_bench_attention_cpu_check():
    proc = subprocess.run([sys.executable, "bench/bench_attention.py", "--cpu-check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cpu check ok: attention variants match (merge_attn_states, paged_attention)" \
        in proc.stdout
