"""Issue 24, item 6: do our RoPE and gated-activation kernels beat what Inductor makes of Hugging
Face's own formulations at a decode step? (bf16, CUDA graphs, one process)

- RoPE (Llama-3-8B: 32 query / 8 KV heads of 128): HF's ``apply_rotary_pos_emb`` (``rotate_half``
  with the step's ``cos`` / ``sin`` of ``[batch, 1, 128]``) on ``q [batch, 32, 1, 128]`` and
  ``k [batch, 8, 1, 128]`` laid out as the projections leave them (``view`` + ``transpose``),
  under Inductor (``hf_inductor``), against ``compile_ops.rotary_embedding`` in place on the
  ``[batch, heads * 128]`` projection outputs with a float32 cos/sin cache (``rotary_embedding``).
  HF's version also computes cos / sin from ``inv_freq`` each step (once per model, not per
  layer): ``hf_inductor`` here takes them as inputs, the per-layer part only.
- The gated MLP activation: ``silu(gate) * up``. Llama-style models produce gate and up with two
  GEMMs (``hf_inductor_2``: Inductor's fused kernel over two tensors; our ``silu_and_mul`` would
  need them concatenated first, so the fair alternative is a fused gate_up GEMM, which changes
  the weights: not a rewrite a pass can do for free); Phi-3 produces them as one ``gate_up``
  tensor (``hf_inductor_chunk``: ``chunk(2)`` then the math, under Inductor) against
  ``silu_and_mul`` on the same tensor (``silu_and_mul``). Gemma: the same with GELU-tanh
  (``gelu_tanh_and_mul``).

Bytes: what each form must read and write. A rewrite is worth making only where our kernel
wins here by more than a kernel boundary costs in the real graph (Inductor fuses these into
neighbouring ops: the RoPE into the key's cache write, the activation into nothing, since GEMMs
sit on both sides).

    python bench/bench_hf_pieces.py                     # batch 1, 8, 32, 128
    python bench/bench_hf_pieces.py --cpu-check
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import compile_ops  # noqa: E402, F401

HEADS, KV_HEADS, HEAD = 32, 8, 128


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_rope(qp, kp, cos, sin):
    """HF Llama: q/k from the projections ([B, 1, H * D] -> [B, H, 1, D]), then rotate_half."""
    b = qp.shape[0]
    q = qp.view(b, 1, HEADS, HEAD).transpose(1, 2)
    k = kp.view(b, 1, KV_HEADS, HEAD).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def ours_rope(qp, kp, positions, cache):
    torch.ops.compile_ops.rotary_embedding(positions, qp.view(qp.shape[0], -1),
                                           kp.view(kp.shape[0], -1), HEAD, cache, True)
    return qp, kp


def hf_act_chunk(gate_up, gelu=False):
    gate, up = gate_up.chunk(2, dim=-1)
    a = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
    return a * up


def hf_act_two(gate, up):
    return F.silu(gate) * up


def rope_cache(max_pos, dtype=torch.float32, device="cuda"):
    inv = 1.0 / (500000.0 ** (torch.arange(0, HEAD, 2, device=device).float() / HEAD))
    f = torch.arange(max_pos, device=device).float()[:, None] * inv[None]
    return torch.cat((f.cos(), f.sin()), -1).to(dtype)


def cos_sin(positions, cache):
    cs = cache[positions]  # [B, 1, D]
    c, s = cs[..., : HEAD // 2], cs[..., HEAD // 2:]
    return torch.cat((c, c), -1), torch.cat((s, s), -1)


def cpu_check():
    b = 3
    qp = torch.randn(b, 1, HEADS * HEAD)
    kp = torch.randn(b, 1, KV_HEADS * HEAD)
    pos = torch.tensor([[5], [9], [100]])
    cache = rope_cache(256, device="cpu")
    cos, sin = cos_sin(pos, cache)
    q, k = hf_rope(qp, kp, cos, sin)
    q2, k2 = ours_rope(qp.clone(), kp.clone(), pos.view(-1), cache)
    torch.testing.assert_close(q2.view(b, 1, HEADS, HEAD).transpose(1, 2), q, atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(k2.view(b, 1, KV_HEADS, HEAD).transpose(1, 2), k, atol=1e-5,
                               rtol=1e-5)
    gu = torch.randn(b, 2 * 64)
    out = torch.empty(b, 64)
    torch.ops.compile_ops.silu_and_mul(out, gu)
    torch.testing.assert_close(out, hf_act_chunk(gu))
    torch.ops.compile_ops.gelu_tanh_and_mul(out, gu)
    torch.testing.assert_close(out, hf_act_chunk(gu, gelu=True))
    print("cpu check ok: rotary_embedding / silu_and_mul / gelu_tanh_and_mul match HF's math")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--inter", type=int, nargs="+", default=[8192, 14336],
                   help="MLP intermediate sizes (Phi-3-mini 8192, Llama-3-8B 14336)")
    harness.add_common_args(p)
    args = p.parse_args()
    dtype, copy_bw = harness.start(args)
    if args.cpu_check:
        cpu_check()
        return
    rep = harness.Report("HF decode-step pieces: RoPE and gated activations", copy_bw,
                         "hf_inductor", ["piece", "batch", "width"])
    rope_c = torch.compile(hf_rope, backend="inductor", fullgraph=True, dynamic=False)
    chunk_c = torch.compile(hf_act_chunk, backend="inductor", fullgraph=True, dynamic=False)
    two_c = torch.compile(hf_act_two, backend="inductor", fullgraph=True, dynamic=False)
    es = torch.empty(0, dtype=dtype).element_size()
    cache = rope_cache(8192)
    for b in args.batch:
        case = {"piece": "rope", "batch": b, "width": HEADS * HEAD}
        nbytes = 2 * b * (HEADS + KV_HEADS) * HEAD * es

        def make_rope(variant):
            qp = torch.randn(b, 1, HEADS * HEAD, device="cuda", dtype=dtype)
            kp = torch.randn(b, 1, KV_HEADS * HEAD, device="cuda", dtype=dtype)
            pos = torch.randint(0, 8192, (b, 1), device="cuda")
            if variant == "hf_inductor":
                cos, sin = (t.to(dtype) for t in cos_sin(pos, cache))
                return lambda: rope_c(qp, kp, cos, sin)
            flat = pos.view(-1)
            return lambda: ours_rope(qp, kp, flat, cache)
        for v in ("hf_inductor", "rotary_embedding"):
            rep.add(harness.measure(case, v, lambda v=v: make_rope(v), nbytes, use_graph=True))
        for inter in args.inter:
            for act in ("silu", "gelu_tanh"):
                case = {"piece": f"{act}_and_mul", "batch": b, "width": inter}
                nbytes = 3 * b * inter * es

                def make_act(variant, act=act, inter=inter):
                    gu = torch.randn(b, 2 * inter, device="cuda", dtype=dtype)
                    if variant == "hf_inductor":
                        return lambda: chunk_c(gu, act == "gelu_tanh")
                    if variant == "hf_inductor_2":
                        g, u = gu[:, :inter].clone(), gu[:, inter:].clone()
                        return lambda: two_c(g, u)
                    out = torch.empty(b, inter, device="cuda", dtype=dtype)
                    op = getattr(torch.ops.compile_ops, f"{act}_and_mul")
                    return lambda: op(out, gu) or out
                variants = ["hf_inductor", "ours"] + (["hf_inductor_2"] if act == "silu" else [])
                for v in variants:
                    rep.add(harness.measure(case, v, lambda v=v: make_act(v), nbytes,
                                            use_graph=True))
    paths = rep.write(args.out, harness.device_stem("hf_pieces"))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
