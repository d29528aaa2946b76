"""The compile_ops backend on a stack of "add + RMSNorm" layers, side by side with Inductor.

Variants (one process, CUDA graphs, the copy bandwidth measured alongside):
- inductor_ops:    torch.compile(backend="inductor") of the layer written with our unfused ops
                   (h = x + residual; compile_ops.rms_norm(out, h, w, eps)): Inductor's add
                   kernel + our rms_norm kernel per layer
- compile_ops:     torch.compile(backend="compile_ops") of that layer: the add_rms_norm pass
                   fuses it into one compile_ops.fused_add_rms_norm_out per layer
- inductor_native: torch.compile(backend="inductor") of vLLM's forward_native in plain PyTorch
                   (the add in float32, RMSNorm math, one rounding): Inductor's own fused kernel
- inductor_hf:     torch.compile(backend="inductor") of the layer as Hugging Face writes it
                   (h = x + residual in the model dtype, then LlamaRMSNorm's module math:
                   float32 statistics, cast back, times the weight): Inductor's fused kernel
- compile_ops_hf:  torch.compile(backend="compile_ops") of that same plain-PyTorch layer: the
                   rms_norm_math pass turns the module math into rms_norm, add_rms_norm fuses the
                   add into fused_add_rms_norm_out. compile_ops_hf vs inductor_hf compares the two
                   backends on one native formulation.

Each layer is compiled on its own (one graph, shared by the layers; "regional compilation"): in a
model, attention and MLP GEMMs sit between one layer's norm and the next layer's add, so no
backend may fuse across layers. (Compiled as one graph, Inductor fused the plain-PyTorch stack
into one kernel that keeps the residual stream in registers across all layers: on the H200,
session 6, 56 us at 4096 tokens, "224% of copy" against the bytes counted below.)

In such a layer graph x and residual are graph inputs. The in-place fused_add_rms_norm writes both,
so Inductor copied them first: on the H200 (session 7, bench/results/session7_issue14) that ran at
x0.60-0.68 of inductor_ops, and the pass then left graph inputs alone (session 8: compile_ops =
inductor_ops, Inductor's native kernel 1.43-1.74x faster than add + rms_norm). Now the pass emits
the out-of-place fused_add_rms_norm_out for graph-input operands: fresh output buffers, x and
residual only read, one kernel per layer that reads each input once and writes each output once,
the same bytes as Inductor's native kernel. The check below asserts those rewrites (one per
compiled layer graph) and that the generated code calls the op without copying the inputs.

Bytes counted per layer: read x and residual, write the output and the new residual.

    python bench/bench_backend.py                  # decode 1..256 tokens and prefill 4096
    python bench/bench_backend.py --cpu-check      # no GPU: compile each variant, check numerics
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import compile_ops  # noqa: E402
import lowerings  # noqa: E402
from compile_ops.testing import assert_close  # noqa: E402

ops = torch.ops.compile_ops
EPS = 1e-6


class OpsLayer(torch.nn.Module):
    """vLLM-style: add to the residual stream, normalize with the out-style op."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w, requires_grad=False)

    def forward(self, x, residual):
        h = x + residual
        out = torch.empty_like(h)
        ops.rms_norm(out, h, self.w, EPS)
        return out, h


class NativeLayer(OpsLayer):
    """The same computation in plain PyTorch (vLLM's forward_native rounding)."""

    def forward(self, x, residual):
        z = x.float() + residual.float()
        inv = torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + EPS)
        return (z * inv).to(x.dtype) * self.w, z.to(x.dtype)


class HFLayer(OpsLayer):
    """Plain PyTorch as Hugging Face writes it: the residual add in the model dtype, then
    LlamaRMSNorm (float32 statistics, cast back to the input dtype, weight multiply)."""

    def forward(self, x, residual):
        h = x + residual
        hf = h.to(torch.float32)
        hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)
        return self.w * hf.to(h.dtype), h


class Stack(torch.nn.Module):
    """The layers one after the other; with a backend, each layer compiled on its own."""

    def __init__(self, layer_cls, weights, backend=None):
        super().__init__()
        layers = [layer_cls(w) for w in weights]
        if backend is not None:
            layers = [torch.compile(m, backend=backend, dynamic=False) for m in layers]
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x, residual):
        for layer in self.layers:
            x, residual = layer(x, residual)
        return x, residual


def variants(weights):
    return {
        "inductor_ops": Stack(OpsLayer, weights, "inductor"),
        "compile_ops": Stack(OpsLayer, weights, "compile_ops"),
        "inductor_native": Stack(NativeLayer, weights, "inductor"),
        "inductor_hf": Stack(HFLayer, weights, "inductor"),
        "compile_ops_hf": Stack(HFLayer, weights, "compile_ops"),
    }


# What the passes must do to the layer graphs: the layers of a stack share one compiled graph
# (same code and shapes), so one rewrite per compile_ops variant; x and residual are that graph's
# inputs, hence the out-of-place op. rms_norm_math: compile_ops_hf's module-math norm.
EXPECTED_COUNTERS = {"add_rms_norm": {"matched": 2}, "rms_norm_math": {"matched": 1}}


def close_enough(a, b, msg):
    """Each variant against eager (our unfused ops). In float32: the dtype's tolerance. In 16-bit
    dtypes the variants round at different points, each legitimately: eager (and Hugging Face's
    formulation) rounds h = x + residual to the dtype before normalizing it; the fused kernel
    (compile_ops, compile_ops_hf) and vLLM's forward_native (inductor_native) normalize the
    float32 sum; Inductor recomputes a layer's add inline in float32 without rounding the
    previous layer's (torch._inductor.config.
    emulate_precision_casts is off by default; with it inductor_ops is bit-equal to eager). One
    rounding step of the stream is an ulp at its magnitude (|residual| reaches 16-32 after four
    layers of random weights: an ulp of 0.125), which becomes an absolute error wherever the next
    add cancels (an output near 0 off by 0.125: what stopped this bench on the H200; seen on the
    CPU too: 1-2 ulps there, the rounding differences of successive layers adding up). So 16-bit
    outputs may differ by 4 ulps at the tensor's largest magnitude plus the relative tolerance;
    a wrong kernel is off by far more."""
    if a.dtype == torch.float32:
        assert_close(a, b, msg=msg)
        return
    eps = torch.finfo(a.dtype).eps
    a, b = a.float().cpu(), b.float().cpu()
    top = float(b.abs().max())
    ulp = eps * 2.0 ** math.floor(math.log2(top)) if top > 0 else eps
    atol = 4 * ulp
    torch.testing.assert_close(a, b, rtol=2 * eps, atol=atol, msg=lambda m: f"{msg}\n{m}")


def check(fns, tokens, hidden, dtype, device):
    """Every variant against eager, the inputs left as they were, the passes' rewrites as
    EXPECTED_COUNTERS says, and compile_ops' generated layer code: fused_add_rms_norm_out, no
    copy of an input, no rms_norm left."""
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    r = torch.randn(tokens, hidden, device=device, dtype=dtype)
    lowerings.reset_counters()
    code = {}
    # No cache hits here: the passes must run for the match counts to mean anything.
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        weights = [m._orig_mod.w for m in fns["inductor_ops"].layers]
        expected = Stack(OpsLayer, weights)(x.clone(), r.clone())
        for name, fn in fns.items():
            xc, rc = x.clone(), r.clone()
            got, code[name] = run_and_get_code(fn, xc, rc)
            assert torch.equal(xc, x) and torch.equal(rc, r), f"{name} wrote its inputs"
            for a, b, what in zip(got, expected, ("out", "residual")):
                close_enough(a, b, f"{name} {tokens}x{hidden} {what}")
                diff = float((a.float() - b.float()).abs().max())
                print(f"check {name} {tokens}x{hidden} {what}: max |diff| {diff:.4g}", flush=True)
    c = lowerings.counters()
    assert c == EXPECTED_COUNTERS, f"compile_ops: expected {EXPECTED_COUNTERS}, got {c}"
    for name in ("compile_ops", "compile_ops_hf"):
        src = "\n".join(code[name])
        assert "compile_ops.fused_add_rms_norm_out" in src, f"{name}: not fused\n{src}"
        assert "clone" not in src and "compile_ops.rms_norm" not in src, f"{name}:\n{src}"
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 4096])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    harness.add_common_args(p)
    args = p.parse_args()
    dtype, copy_bw = harness.start(args)
    if args.cpu_check:
        hidden = 64
        weights = [torch.randn(hidden, dtype=torch.float32) for _ in range(args.layers)]
        # The passes rewrite CUDA graphs only by default (lowerings.passes: Inductor's own CPU
        # code is faster); the check wants to see them rewrite these CPU graphs.
        with lowerings.pass_devices("all"):
            check(variants(weights), 5, hidden, torch.float32, "cpu")
        print(f"cpu check ok: {args.layers} layers (each compiled on its own), add + rms_norm "
              f"fused out of place (graph inputs), all variants match")
        return

    weights = [torch.randn(args.hidden, device="cuda", dtype=dtype) for _ in range(args.layers)]
    fns = variants(weights)
    check(fns, 7, args.hidden, dtype, "cuda")
    print("compile_ops, compile_ops_hf: add + RMSNorm fused into fused_add_rms_norm_out in the "
          "layer graph (x and residual are its inputs)", flush=True)

    rep = harness.Report(f"{args.layers} x (add + rms_norm), backends", copy_bw, "inductor_ops",
                         ["dtype", "tokens", "hidden", "layers"])
    size = torch.finfo(dtype).bits // 8
    for tokens in args.tokens:
        nbytes = args.layers * 4 * tokens * args.hidden * size
        case = {"dtype": args.dtype, "tokens": tokens, "hidden": args.hidden, "layers": args.layers}
        for name, fn in fns.items():
            def make(fn=fn):
                x = torch.randn(tokens, args.hidden, device="cuda", dtype=dtype)
                r = torch.randn(tokens, args.hidden, device="cuda", dtype=dtype)
                return lambda: fn(x, r)
            with torch.no_grad():
                rep.add(harness.measure(case, name, make, nbytes))
    print("wrote", *rep.write(args.out, harness.device_stem("backend"), plot_x="tokens", plot_group=["dtype"]))
    for key, v in rep._rows().items():
        c, i, n = v["compile_ops"], v["inductor_ops"], v["inductor_native"]
        ch, ih = v["compile_ops_hf"], v["inductor_hf"]
        print(f"tokens {key[1]:>5}: compile_ops x{i.seconds / c.seconds:.2f} vs inductor_ops, "
              f"x{n.seconds / c.seconds:.2f} vs inductor_native; compile_ops_hf "
              f"x{ih.seconds / ch.seconds:.2f} vs inductor_hf")


if __name__ == "__main__":
    main()
