"""Benchmark the attention ops against eager PyTorch and torch.compile of the native formulations.

One process, one table per section, written as
bench/results/attention_<device>_<section>_<dtype>.{json,md,png} (one dtype per run: --dtype):

- merge: merge_attn_states of two partial attention results (prefix and suffix), outputs
  [tokens, heads, head_size] of 32 heads of 128 (and of 64 at 4096 tokens), LSEs float32
  [heads, tokens], finite. Variants:
    compile_ops:     the op (CUDA kernel), writing output and output_lse in place.
    triton:          triton_merge_attn_states (the op's kernel without the extension), directly.
    eager_native:    vLLM-style math in torch ops (an infinite LSE counts as -inf; max, exp,
                     weights, weighted sum in float32, one cast); new output and output_lse.
    compiled_native: torch.compile (inductor) of eager_native. The baseline of the x column.
  Bytes: prefix_output and suffix_output read, output written, two LSEs read and one written.
  Target (the issue): the op >= 85% of the measured copy bandwidth for large inputs (>= 4096
  tokens): the summary under the table (and the last line printed) says at which sizes it is met.

    python bench/bench_attention.py                                  # every section, bf16
    python bench/bench_attention.py --section merge --dtype fp16 --quick
    python bench/bench_attention.py --cpu-check    # no GPU: every variant on the CPU, numerics
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import compile_ops  # noqa: E402, F401  (registers torch.ops.compile_ops)
from compile_ops.attention import triton_merge_attn_states  # noqa: E402
from compile_ops.testing import assert_close  # noqa: E402

ops = torch.ops.compile_ops
SECTIONS = ("merge",)
TOKENS = [1, 16, 128, 512, 2048, 4096, 16384, 65536]
TARGET_MIN_TOKENS, TARGET_PCT = 4096, 85.0
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# merge_attn_states
# ---------------------------------------------------------------------------------------------
def native_merge(prefix_output, prefix_lse, suffix_output, suffix_lse):
    """vLLM-style merge in torch ops, out of place: returns (output, output_lse).

    An infinite LSE (+inf or -inf) marks an empty part and counts as -inf. Both parts empty:
    output = prefix_output and output_lse = -inf (vLLM's choice)."""
    p_lse = torch.where(torch.isinf(prefix_lse), NEG_INF, prefix_lse.float())
    s_lse = torch.where(torch.isinf(suffix_lse), NEG_INF, suffix_lse.float())
    max_lse = torch.maximum(p_lse, s_lse)
    empty = max_lse == NEG_INF  # [heads, tokens]
    max_lse = torch.where(empty, 0.0, max_lse)  # both empty: exp(-inf) = 0, not exp(nan)
    p_w, s_w = torch.exp(p_lse - max_lse), torch.exp(s_lse - max_lse)
    total = p_w + s_w
    p_scale = (p_w / total).t().unsqueeze(-1)  # [tokens, heads, 1]
    s_scale = (s_w / total).t().unsqueeze(-1)
    out = prefix_output.float() * p_scale + suffix_output.float() * s_scale
    out = torch.where(empty.t().unsqueeze(-1), prefix_output, out.to(prefix_output.dtype))
    return out, torch.where(empty, NEG_INF, torch.log(total) + max_lse)


compiled_merge = torch.compile(native_merge, backend="inductor", dynamic=False)


def merge_ours(p, p_lse, s, s_lse, out, out_lse):
    ops.merge_attn_states(out, p, p_lse, s, s_lse, out_lse)
    return out, out_lse


def merge_triton(p, p_lse, s, s_lse, out, out_lse):
    triton_merge_attn_states(out, p, p_lse, s, s_lse, out_lse)
    return out, out_lse


def merge_eager(p, p_lse, s, s_lse, out, out_lse):  # new outputs; out and out_lse unused
    return native_merge(p, p_lse, s, s_lse)


def merge_compiled(p, p_lse, s, s_lse, out, out_lse):
    return compiled_merge(p, p_lse, s, s_lse)


MERGE_VARIANTS = {"compile_ops": merge_ours, "triton": merge_triton,
                  "eager_native": merge_eager, "compiled_native": merge_compiled}


def merge_inputs(tokens, heads, head_size, dtype, device):
    """(prefix_output, prefix_lse, suffix_output, suffix_lse, output, output_lse); the outputs
    filled with NaN, so that an element left unwritten fails the checks."""
    p = torch.randn(tokens, heads, head_size, device=device, dtype=dtype)
    s = torch.randn(tokens, heads, head_size, device=device, dtype=dtype)
    p_lse = torch.randn(heads, tokens, device=device) * 3 + 5  # LSEs a few units apart
    s_lse = torch.randn(heads, tokens, device=device) * 3 + 5
    return (p, p_lse, s, s_lse, torch.full_like(p, float("nan")),
            torch.full_like(p_lse, float("nan")))


def assert_lse(actual, expected, msg):
    """Same infinities at the same places, finite values close (float32 tolerance); no NaN."""
    a, e = actual.detach().cpu(), expected.detach().cpu()
    inf = torch.isinf(e)
    if not (torch.equal(torch.isinf(a), inf) and torch.equal(a[inf], e[inf])):
        raise AssertionError(f"{msg}: infinities differ\nactual {a}\nexpected {e}")
    assert_close(a[~inf], e[~inf], msg=msg)


def check_merge(device, dtype, tokens=6, heads=4, head_size=16, triton=False):
    """Every variant computes the same output and output_lse, empty parts included."""
    *args, out, out_lse = merge_inputs(tokens, heads, head_size, dtype, device)
    p, p_lse, s, s_lse = args
    inf = float("inf")
    p_lse[0, 1], s_lse[1, 2], p_lse[1, 0], s_lse[0, tokens - 1] = inf, -inf, -inf, inf
    p_lse[2, 3], s_lse[2, 3] = -inf, -inf  # both empty
    p_lse[3, 4], s_lse[3, 4] = inf, -inf  # both empty, one of them as +inf
    expected, expected_lse = native_merge(*args)
    for h, t in ((2, 3), (3, 4)):  # vLLM's both-empty result, exactly
        assert torch.equal(expected[t, h], p[t, h]), f"native: ({h}, {t}) is not prefix_output"
        assert expected_lse[h, t].item() == -inf, f"native: lse ({h}, {t}) is not -inf"
    names = ["compiled_native", "compile_ops"] + (["triton"] if triton else [])
    for name in names:
        o, lse = MERGE_VARIANTS[name](*args, out.clone(), out_lse.clone())
        what = f"{name} {dtype} {tokens}x{heads}x{head_size}"
        assert_close(o, expected, msg=f"{what}: output")
        assert_lse(lse, expected_lse, f"{what}: output_lse")


class MergeReport(harness.Report):
    """The harness's table plus the target summary: the op's %copy at each size."""

    def summary(self) -> str:
        meets, below, large_ok = [], [], True
        for r in self.results:
            if r.variant != "compile_ops":
                continue
            pct = 100 * r.bytes / r.seconds / self.copy_bw
            size = f"{r.case['tokens']}x{r.case['heads']}x{r.case['head_size']} ({pct:.0f}%)"
            (meets if pct >= TARGET_PCT else below).append(size)
            if r.case["tokens"] >= TARGET_MIN_TOKENS:
                large_ok &= pct >= TARGET_PCT
        return (f"{self.name}: compile_ops >= {TARGET_PCT:.0f}% of copy at "
                f"{', '.join(meets) or 'no size'}; below at {', '.join(below) or 'no size'}; "
                f"large inputs (>= {TARGET_MIN_TOKENS} tokens): "
                f"{'target met' if large_ok else 'target NOT met'}")

    def markdown(self) -> str:
        return super().markdown() + f"\n## Target\n\n{self.summary()}\n"


def bench_merge(args, dtype, copy_bw):
    cases = [(t, args.head_size) for t in args.tokens]
    cases += [(t, args.alt_head_size) for t in args.alt_tokens]
    for hs in sorted({hs for _, hs in cases}):
        check_merge("cuda", dtype, tokens=300, heads=args.heads, head_size=hs, triton=True)
    rep = MergeReport(f"merge_attn_states ({args.dtype})", copy_bw, "compiled_native",
                      ["tokens", "heads", "head_size"])
    size = torch.finfo(dtype).bits // 8
    for tokens, hs in cases:
        nbytes = 3 * tokens * args.heads * hs * size + 3 * args.heads * tokens * 4
        case = {"tokens": tokens, "heads": args.heads, "head_size": hs}
        for name, fn in MERGE_VARIANTS.items():
            def make(fn=fn, tokens=tokens, hs=hs):
                x = merge_inputs(tokens, args.heads, hs, dtype, "cuda")
                return lambda: fn(*x)
            rep.add(harness.measure(case, name, make, nbytes))
    return rep, {"plot_x": "tokens", "plot_group": ["heads", "head_size"]}


BENCHES = {"merge": bench_merge}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--section", nargs="+", default=["all"], choices=[*SECTIONS, "all"])
    p.add_argument("--tokens", type=int, nargs="+", default=TOKENS,
                   help="token counts at --head-size (CUDA graphs below 512 MiB moved per call)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--alt-head-size", type=int, default=64, help="merge: a second head size")
    p.add_argument("--alt-tokens", type=int, nargs="*", default=[4096],
                   help="merge: token counts at --alt-head-size (none: --head-size only)")
    p.add_argument("--quick", action="store_true", help="tokens 1, 128, 4096, 65536")
    harness.add_common_args(p)
    args = p.parse_args()
    if args.quick:
        args.tokens = [1, 128, 4096, 65536]
    sections = SECTIONS if "all" in args.section else args.section
    dtype, copy_bw = harness.start(args)
    if args.cpu_check:
        check_merge("cpu", torch.float32)
        check_merge("cpu", torch.bfloat16)  # the GPU run's default dtype and tolerances
        print("cpu check ok: merge_attn_states variants match")
        return
    stem, paths, reports = harness.device_stem("attention"), [], []
    for section in sections:
        rep, plot = BENCHES[section](args, dtype, copy_bw)
        paths += rep.write(args.out, f"{stem}_{section}_{args.dtype}", **plot)
        reports.append(rep)
    print("wrote", *paths)
    for rep in reports:
        print(rep.summary())


if __name__ == "__main__":
    main()
