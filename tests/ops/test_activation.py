"""Gated activations: reference, fake, opcheck, CUDA kernels, compile, errors."""

import itertools
import math

import pytest
import torch

import compile_ops
from compile_ops.activation import act_and_mul_ref
from compile_ops.testing import assert_close, assert_raises_eager_and_fake

ops = torch.ops.compile_ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ["silu_and_mul", "mul_and_silu", "gelu_and_mul", "gelu_tanh_and_mul", "fatrelu_and_mul",
         "swigluoai_and_mul"]
# Non-default scalars, so a kernel that ignores them fails.
EXTRA = {"fatrelu_and_mul": (0.25,), "swigluoai_and_mul": (1.5, 2.0)}
REF_KW = {"fatrelu_and_mul": {"threshold": 0.25},
          "swigluoai_and_mul": {"alpha": 1.5, "limit": 2.0}}


def call(name, out, x):
    getattr(ops, name)(out, x, *EXTRA.get(name, ()))
    return out


def ref(name, x):
    return act_and_mul_ref(name, x, **REF_KW.get(name, {}))


def float64_oracle(name, x):
    """Written independently of the reference: float64, one final rounding (so it differs from
    the reference only by the reference's intermediate rounding, within the tolerance)."""
    x64 = x.double()
    if name == "swigluoai_and_mul":
        alpha, limit = 1.5, 2.0
        g = x64[..., 0::2].clamp(max=limit)
        u = x64[..., 1::2].clamp(-limit, limit)
        return ((u + 1) * g / (1 + torch.exp(-alpha * g))).to(x.dtype)
    d = x.shape[-1] // 2
    a, b = x64[..., :d], x64[..., d:]
    silu = lambda t: t / (1 + torch.exp(-t))  # noqa: E731
    if name == "silu_and_mul":
        y = silu(a) * b
    elif name == "mul_and_silu":
        y = a * silu(b)
    elif name == "gelu_and_mul":
        y = 0.5 * a * (1 + torch.erf(a / math.sqrt(2))) * b
    elif name == "gelu_tanh_and_mul":
        y = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3))) * b
    else:
        y = torch.where(a > 0.25, a, torch.zeros_like(a)) * b
    return y.to(x.dtype)


def rows(tokens, two_d, dtype, device, *, row_pad=0, gen=None, scale=3.0):
    base = torch.randn(tokens, two_d + row_pad, generator=gen) * scale
    t = base.to(dtype=dtype, device=device)
    return t[:, :two_d] if row_pad else t


# ---------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_reference_matches_float64(name, dtype, gen):
    x = rows(9, 2 * 40, dtype, "cpu", gen=gen)
    assert_close(ref(name, x), float64_oracle(name, x), dtype)


@pytest.mark.parametrize("row_pad", [0, 64, 11])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_cpu_ops_match_reference(name, dtype, row_pad, gen):
    x = rows(7, 2 * 24, dtype, "cpu", row_pad=row_pad, gen=gen)
    out = torch.full((7, 24), float("nan"), dtype=dtype)
    assert_close(call(name, out, x), ref(name, x))


def test_leading_dims_and_functional_wrappers(gen):
    x = rows(6, 2 * 16, torch.float32, "cpu", gen=gen).view(2, 3, 32)
    for name in NAMES:
        fn = getattr(compile_ops, name)
        got = fn(x, *EXTRA.get(name, ()))
        assert got.shape == (2, 3, 16)
        assert_close(got, ref(name, x))


def test_defaults_match_vllm():
    schema = str(ops.swigluoai_and_mul.default._schema)
    assert "float alpha=1.702" in schema and "float limit=7." in schema, schema
    assert "float threshold=0." in str(ops.fatrelu_and_mul.default._schema)
    x = torch.randn(4, 16) * 8
    assert_close(compile_ops.swigluoai_and_mul(x), act_and_mul_ref("swigluoai_and_mul", x))


def test_swigluoai_clamps():
    # gate above the limit is clamped (min only), up is clamped both ways.
    x = torch.tensor([[10.0, 10.0, -10.0, -10.0]])
    g = torch.tensor([7.0, -10.0])
    u = torch.tensor([7.0, -7.0])
    expected = (u + 1) * g * torch.sigmoid(1.702 * g)
    assert_close(compile_ops.swigluoai_and_mul(x)[0], expected)


def _samples(device, gen):
    for dtype, (tokens, d), pad in itertools.product(DTYPES, [(1, 8), (5, 13)], [0, 11]):
        yield rows(tokens, 2 * d, dtype, device, row_pad=pad, gen=gen)


def _opcheck_all(device, gen):
    for x in _samples(device, gen):
        out = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype, device=device)
        for name in NAMES:
            torch.library.opcheck(getattr(ops, name).default, (out, x) + EXTRA.get(name, ()))


def test_opcheck_cpu(gen):
    _opcheck_all("cpu", gen)


def _bad_calls():
    x = lambda: torch.randn(4, 16)  # noqa: E731
    return [
        ("odd_last_dim", lambda: ops.silu_and_mul(torch.empty(4, 7), torch.randn(4, 15)),
         ValueError, "last dimension must be even"),
        ("out_shape", lambda: ops.gelu_and_mul(torch.empty(4, 16), x()),
         ValueError, r"out must have shape \(4, 8\)"),
        ("out_dtype", lambda: ops.silu_and_mul(torch.empty(4, 8, dtype=torch.float16), x()),
         TypeError, "out must have dtype torch.float32"),
        ("input_int", lambda: ops.silu_and_mul(torch.empty(4, 8, dtype=torch.int32),
                                               x().int()),
         TypeError, "input must be float32, float16 or bfloat16"),
        ("out_device", lambda: ops.mul_and_silu(torch.empty(4, 8, device="meta"), x()),
         ValueError, "out must be on device cpu"),
        ("input_transposed", lambda: ops.silu_and_mul(torch.empty(16, 2), x().t()),
         ValueError, "input must be contiguous in its last dimension"),
        ("out_rows_overlap", lambda: ops.silu_and_mul(torch.empty(1, 8).expand(4, 8), x()),
         ValueError, "out rows overlap in memory"),
        ("threshold_nan", lambda: ops.fatrelu_and_mul(torch.empty(4, 8), x(), float("nan")),
         ValueError, "threshold must be finite"),
        ("limit_inf", lambda: ops.swigluoai_and_mul(torch.empty(4, 8), x(), 1.702,
                                                    float("inf")),
         ValueError, "limit must be finite"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_eager_and_fake(case):
    _, call, exc, fragment = case
    assert_raises_eager_and_fake(call, exc, fragment)


def test_out_overlapping_input_rejected():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="out and input overlap in memory"):
        ops.silu_and_mul(x[:, :8], x)


class GatedMLP(torch.nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def forward(self, x):
        out = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype, device=x.device)
        call(self.name, out, x * 1.5)
        return out + 1


def _compile_check(device, dtype, gen, **kw):
    torch._dynamo.reset()
    for name in NAMES:
        model = GatedMLP(name)
        compiled = torch.compile(model, fullgraph=True, **kw)
        x = rows(5, 2 * 64, dtype, device, gen=gen)
        for _ in range(3):
            got = compiled(x)
        assert_close(got, model(x), msg=name)


def test_torch_compile_fullgraph_cpu(gen):
    _compile_check("cpu", torch.float32, gen)


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("row_pad", [0, 64, 11])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [8, 13, 1024, 14336])
@pytest.mark.parametrize("tokens", [1, 7, 257])
@pytest.mark.parametrize("name", NAMES)
def test_cuda_grid(name, tokens, d, dtype, row_pad, gen):
    x = rows(tokens, 2 * d, dtype, "cuda", row_pad=row_pad, gen=gen)
    out_base = torch.full((tokens, d + row_pad), float("nan"), dtype=dtype, device="cuda")
    out = out_base[:, :d]
    call(name, out, x)
    assert_close(out, ref(name, x), msg=f"{name} {tokens}x{d} {dtype} pad={row_pad}")
    torch.testing.assert_close(out_base[:, d:], torch.full_like(out_base[:, d:], float("nan")),
                               rtol=0, atol=0, equal_nan=True, msg="wrote outside the rows")


# What PyTorch users compare against: torch's own CUDA activation times the up half. Same float
# formula, same operation order and roundings (the activation rounded to the dtype, then the
# product), so every bit agrees; gelu_tanh needs PyTorch's FMA in `x + kappa * x**3` (issue 25).
TORCH_FORMS = {
    "silu_and_mul": lambda a, b: torch.nn.functional.silu(a) * b,
    "gelu_and_mul": lambda a, b: torch.nn.functional.gelu(a) * b,
    "gelu_tanh_and_mul": lambda a, b: torch.nn.functional.gelu(a, approximate="tanh") * b,
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(TORCH_FORMS))
def test_cuda_bit_equal_to_torch(name, dtype, gen):
    d = 4096
    x = (torch.randn(64, 2 * d, generator=gen) * torch.logspace(-3, 1.5, 2 * d)).to(dtype)
    x = x.cuda()
    x[0, :8] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 8.0, -8.0, 30.0, -30.0], dtype=dtype)
    want = TORCH_FORMS[name](x[:, :d], x[:, d:])
    got = call(name, torch.empty_like(want), x)
    bad = (got.view(torch.int16 if dtype != torch.float32 else torch.int32)
           != want.view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert not bool(bad.any()), (f"{name} {dtype}: {int(bad.sum())} of {bad.numel()} values "
                                 f"differ from torch, e.g. input {x[:, :d][bad][:4].tolist()}: "
                                 f"{got[bad][:4].tolist()} vs {want[bad][:4].tolist()}")


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_cuda_misaligned_base_and_leading_dims(name, gen):
    buf = rows(1, 2 * 3 * 4 * 512 + 1, torch.bfloat16, "cuda", gen=gen)[0]
    x = buf[1:].view(3, 4, 1024)
    out = torch.empty(3, 4, 512, dtype=torch.bfloat16, device="cuda")
    assert_close(call(name, out, x), ref(name, x))


@pytest.mark.cuda
def test_opcheck_cuda(gen):
    _opcheck_all("cuda", gen)


@pytest.mark.cuda
def test_cuda_launcher_checks():
    from compile_ops._extension import _C

    x = torch.randn(4, 16, device="cuda")
    with pytest.raises(RuntimeError, match="out must have shape"):
        _C.act_and_mul(torch.empty(4, 16, device="cuda"), x, 0, 0.0)
    with pytest.raises(RuntimeError, match="unknown activation kind 9"):
        _C.act_and_mul(torch.empty(4, 8, device="cuda"), x, 9, 0.0)


@pytest.mark.cuda
def test_torch_compile_cuda(gen):
    _compile_check("cuda", torch.bfloat16, gen)


@pytest.mark.cuda
def test_torch_compile_cuda_graphs(gen):
    _compile_check("cuda", torch.bfloat16, gen, mode="reduce-overhead")
