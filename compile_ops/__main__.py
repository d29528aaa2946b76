"""python -m compile_ops: what is registered, whether the CUDA kernels are built, and a tiny
eager + torch.compile run checked against the reference.

With arguments it runs the main job instead, the paged-KV Llama (``python -m
compile_ops.models.llama``, the same options), e.g. on two tensor-parallel ranks::

    torchrun --nproc-per-node 2 -m compile_ops --config 8b-4layers --tp 2
"""

import sys
import time

import torch

import compile_ops
from compile_ops.testing import assert_close


class TinyBlock(torch.nn.Module):
    """Two residual layers written the way vLLM model code calls the ops."""

    def __init__(self, hidden: int, dtype: torch.dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w_in = torch.nn.Parameter(torch.randn(hidden, generator=g).to(dtype), False)
        self.w_post = torch.nn.Parameter(torch.randn(hidden, generator=g).to(dtype), False)
        self.proj = torch.nn.Linear(hidden, hidden, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor):
        ops = torch.ops.compile_ops
        for w in (self.w_in, self.w_post):  # add + rms_norm per layer: the backend fuses them
            h = x + residual
            out = torch.empty_like(h)
            ops.rms_norm(out, h, w, 1e-6)
            x, residual = self.proj(out), h
        return x, residual


def main() -> int:
    print(f"compile_ops {compile_ops.__version__}, torch {torch.__version__}")
    print("registered ops:")
    for name in compile_ops.registered_ops():
        print(f"  {name}")
    if compile_ops.kernels_available():
        print("CUDA kernels: built (compile_ops._C)")
    else:
        print(f"CUDA kernels: not available ({compile_ops.kernels_unavailable_reason()}); "
              "the reference kernels run on every device")
    use_cuda = torch.cuda.is_available() and compile_ops.kernels_available()
    device = "cuda" if use_cuda else "cpu"
    dtype = torch.bfloat16 if use_cuda else torch.float32
    torch.manual_seed(0)
    model = TinyBlock(256, dtype).to(device).eval()
    x = torch.randn(8, 256, device=device, dtype=dtype)
    res = torch.randn(8, 256, device=device, dtype=dtype)
    with torch.no_grad():
        t0 = time.perf_counter()
        eager = model(x.clone(), res.clone())
        t1 = time.perf_counter()
        print(f"eager run on {device} ({dtype}): ok, output {tuple(eager[0].shape)}, "
              f"{(t1 - t0) * 1e3:.1f} ms")
        print('compiling with torch.compile(backend="compile_ops", fullgraph=True) ...', flush=True)
        import lowerings

        lowerings.reset_counters()
        compiled = torch.compile(model, backend="compile_ops", fullgraph=True)
        t0 = time.perf_counter()
        got = compiled(x.clone(), res.clone())
        t1 = time.perf_counter()
    for a, b in zip(got, eager):
        assert_close(a, b)
    print(f"compiled run: matches eager (compile + first call {t1 - t0:.1f} s)")
    print(f"fusion report: {lowerings.counters() or 'no pattern ran (FX graph cache hit)'}")
    pm = lowerings.pass_manager()
    if pm.ops_after:
        print("  ops before the passes:", ", ".join(pm.ops_before))
        print("  ops after the passes: ", ", ".join(pm.ops_after))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1:  # the main job's options: --config, --tp, ...
        from compile_ops.models.llama import main as main_job

        sys.exit(main_job(sys.argv[1:]))
    sys.exit(main())
