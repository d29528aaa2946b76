"""A/B on the GPU: another commit's rotary_embedding kernel against the current build's, same
inputs, same process, interleaved; packed heads (the path that must not slow down) and, for the
current build only, padded (strided) heads. GPU only (no CPU check).

    git archive <base-commit> csrc | tar -x -C /tmp/base      # the old launcher and kernels
    python bench/rotary_ab.py /tmp/base rotary_ab.json

The base's csrc/pos_encoding_kernels.cu is JIT-built as a separate op library (rope_base) with its
namespace renamed (-Dcompile_ops=compile_ops_base), bound by bench/rotary_ab_bind.cpp.
"""
import json, os, sys
import torch
import torch.utils.cpp_extension as cpp
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import compile_ops  # noqa: E402
from compile_ops.testing import rope_cos_sin_cache  # noqa: E402

base = sys.argv[1]  # a directory holding the base commit's csrc/
out = sys.argv[2]
cpp.load(name="rope_base", sources=[os.path.join(base, "csrc/pos_encoding_kernels.cu"),
                                    os.path.join(os.path.dirname(os.path.abspath(__file__)), "rotary_ab_bind.cpp")],
         extra_include_paths=[os.path.join(base, "csrc/include"), os.path.join(base, "csrc")],
         extra_cflags=["-O3", "-Dcompile_ops=compile_ops_base", "-std=c++20"],
         extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-Dcompile_ops=compile_ops_base",
                            "-std=c++20"],
         is_python_module=False, verbose=False)
old, new = torch.ops.rope_base.rotary_embedding, torch.ops.compile_ops.rotary_embedding
copy = harness.copy_bandwidth()
rows = []
nq, nk, hs = 32, 8, 128
for neox in (True, False):
    for T in (1, 128, 4096, 16384):
        cache = rope_cos_sin_cache(8192, hs, device="cuda")
        nbytes = 2 * T * (nq + nk) * hs * 2 + T * 8 + T * hs * 4
        sets = harness.num_sets(nbytes)
        pos = [torch.randint(0, 8192, (T,), device="cuda") for _ in range(sets)]
        qs = [torch.randn(T, nq * hs, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        ks = [torch.randn(T, nk * hs, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        qp = [torch.randn(T, nq, hs + 8, device="cuda", dtype=torch.bfloat16)[..., :hs]
              for _ in range(sets)]
        kp = [torch.randn(T, nk, hs + 8, device="cuda", dtype=torch.bfloat16)[..., :hs]
              for _ in range(sets)]
        # correctness of the A/B pair on the same input
        a, b = qs[0].clone(), qs[0].clone()
        old(pos[0], a, None, hs, cache, neox); new(pos[0], b, None, hs, cache, neox)
        assert torch.equal(a, b), "old and new kernels disagree"
        mk = lambda op, Q, K: [(lambda i=i: op(pos[i], Q[i], K[i], hs, cache, neox))
                               for i in range(sets)]
        res = {"old": [], "new": [], "new_strided": []}
        for _ in range(2):  # interleaved, best of two medians
            res["old"].append(harness.time_calls(mk(old, qs, ks), nbytes, repeats=10, min_ms=10)["seconds"])
            res["new"].append(harness.time_calls(mk(new, qs, ks), nbytes, repeats=10, min_ms=10)["seconds"])
            res["new_strided"].append(harness.time_calls(mk(new, qp, kp), nbytes, repeats=10, min_ms=10)["seconds"])
        r = {"neox": neox, "tokens": T, **{k: min(v) * 1e6 for k, v in res.items()}}
        r["new/old"] = r["new"] / r["old"]
        r["pct_copy_new"] = 100 * nbytes / (r["new"] * 1e-6) / copy
        rows.append(r)
        print(json.dumps(r), flush=True)
json.dump({"device": harness.device_info(), "copy_GBps": copy / 1e9, "rows": rows},
          open(out, "w"), indent=1)
