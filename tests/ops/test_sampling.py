"""argmax (greedy sampling): reference semantics, fake, opcheck, errors, the CUDA kernel against
an independent oracle (splits, ties across splits, NaN, infinities, signed zeros, strided rows),
compile and CUDA-graph capture."""

import pytest
import torch

import compile_ops
from compile_ops.testing import assert_raises_eager_and_fake

ops = torch.ops.compile_ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAN, INF = float("nan"), float("inf")


def oracle(x: torch.Tensor) -> torch.Tensor:
    """Written without torch.argmax: the first index holding the row's NaN if any, else the first
    holding its maximum (float64 compares, so -0.0 == +0.0)."""
    n = x.shape[-1]
    x64 = x.detach().to("cpu", torch.float64).reshape(-1, n)
    nan = x64.isnan()
    top = x64.masked_fill(nan, -INF).amax(-1, keepdim=True)
    hit = torch.where(nan.any(-1, keepdim=True), nan, x64 == top)
    idx = torch.where(hit, torch.arange(n), n).amin(-1)
    return idx.reshape(x.shape[:-1])


def planted(rows, n, dtype, gen, device="cpu"):
    """Small integers (many ties), with each row's maximum planted twice (the later copy first
    in memory order of a split, so a kernel that keeps the last tie fails)."""
    x = torch.randint(-40, 40, (rows, n), generator=gen).to(dtype)
    for r in range(rows):
        a = int(torch.randint(0, n, (1,), generator=gen))
        b = int(torch.randint(0, n, (1,), generator=gen))
        x[r, a] = x[r, b] = 100 + r % 7
    return x.to(device)


# ---------------------------------------------------------------------------------------------
# Reference (the CPU kernel) and fake
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row,want", [
    ([1.0, 3.0, 3.0, 2.0], 1),                  # ties: the first
    ([1.0, NAN, 5.0, NAN], 1),                  # NaN is the largest, the first NaN
    ([-INF, -INF, -INF], 0),                    # all -inf: index 0
    ([-1.0, INF, 7.0, INF], 1),
    ([-0.0, 0.0, -1.0], 0),                     # -0.0 == +0.0
    ([0.0, -0.0], 0),
    ([-3.0], 0),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_rules(row, want, dtype):
    x = torch.tensor([row], dtype=dtype)
    assert ops.argmax(x).tolist() == [want]
    assert oracle(x).tolist() == [want]


@pytest.mark.parametrize("shape", [(7, 33), (2, 3, 50), (50,), (0, 9), (4, 1)])
def test_reference_shapes_and_fake(shape, gen):
    x = torch.randn(shape, generator=gen)
    got = compile_ops.argmax(x)
    assert got.dtype == torch.int64 and got.shape == shape[:-1]
    assert torch.equal(got, oracle(x))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        f = ops.argmax(mode.from_tensor(x))
    assert f.shape == got.shape and f.dtype == torch.int64


def test_opcheck(gen):
    for x in (torch.randn(5, 70, generator=gen), torch.randn(3, 9, generator=gen)[:, 2:],
              torch.randn(2, 4, 16, generator=gen).bfloat16()):
        torch.library.opcheck(ops.argmax.default, (x,))


@pytest.mark.parametrize("bad,exc,fragment", [
    (lambda: torch.arange(6).view(2, 3), TypeError, "input must be float32"),
    (lambda: torch.tensor(1.0), ValueError, "at least one dimension"),
    (lambda: torch.empty(3, 0), ValueError, "last dimension must not be empty"),
])
def test_bad_input_names_the_argument(bad, exc, fragment):
    assert_raises_eager_and_fake(lambda: ops.argmax(bad()), exc, fragment)
    with pytest.raises(RuntimeError, match="for argument 'input'"):  # the dispatcher's check
        ops.argmax([1.0, 2.0])


# ---------------------------------------------------------------------------------------------
# CUDA kernel
# ---------------------------------------------------------------------------------------------
LAYOUTS = ["contiguous", "row_slice", "unaligned", "transposed", "3d"]


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    rows, n = x.shape
    if layout == "contiguous":
        return x
    if layout == "row_slice":   # rows of a wider tensor, still 16-byte aligned rows
        wide = torch.full((rows, n + 24), -1e4, dtype=x.dtype, device=x.device)
        wide[:, 8:8 + n] = x
        return wide[:, 8:8 + n]
    if layout == "unaligned":   # rows one element off 16-byte alignment: the scalar path
        wide = torch.full((rows, n + 3), -1e4, dtype=x.dtype, device=x.device)
        wide[:, 1:1 + n] = x
        return wide[:, 1:1 + n]
    if layout == "transposed":  # last dimension not contiguous: the op copies it
        return x.t().contiguous().t()
    if rows % 2 == 0:           # 3d
        return x.view(2, rows // 2, n)
    return x.view(1, rows, n)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows,n", [(1, 128256), (3, 32000), (8, 5003), (1, 1), (5, 7),
                                    (129, 4096), (600, 257), (2, 2049), (1, 2048)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_oracle(dtype, rows, n, layout, gen):
    x = make_layout(planted(rows, n, dtype, gen, "cuda"), layout)
    got = ops.argmax(x)
    assert got.device.type == "cuda" and got.shape == x.shape[:-1]
    assert torch.equal(got.cpu(), oracle(x)), layout


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_special_values_across_splits(dtype):
    n = 128256  # split over many CTAs at one row
    rows = []
    r = torch.full((n,), -INF)
    rows.append(r.clone())                                  # all -inf: 0
    r = torch.zeros(n); r[::2] = -0.0                       # noqa: E702  signed zeros: 0
    rows.append(r)
    r = torch.full((n,), -5.0); r[100000] = INF; r[120000] = INF  # noqa: E702
    rows.append(r)                                          # inf ties: the first
    r = torch.randn(n); r[90000] = NAN; r[3] = 50.0; r[127000] = NAN  # noqa: E702
    rows.append(r)                                          # NaN beats a larger number
    r = torch.full((n,), 1.0); r[-1] = 2.0                  # noqa: E702  the last element
    rows.append(r)
    r = torch.full((n,), 1.0)                               # all equal: 0
    rows.append(r)
    x = torch.stack(rows).to(dtype)
    want = oracle(x)
    assert want.tolist() == [0, 0, 100000, 90000, n - 1, 0]
    assert torch.equal(ops.argmax(x.cuda()).cpu(), want)
    for i in range(len(rows)):  # one row at a time: the most splits per row
        assert ops.argmax(x[i:i + 1].cuda()).item() == want[i].item()


@pytest.mark.cuda
def test_cuda_empty_rows_and_opcheck():
    x = torch.randn(0, 100, device="cuda")
    assert ops.argmax(x).shape == (0,)
    torch.library.opcheck(ops.argmax.default, (torch.randn(3, 5000, device="cuda"),))


@pytest.mark.cuda
def test_cuda_compiled_and_graph_captured():
    x = torch.randn(4, 128256, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(lambda t: ops.argmax(t * 2), fullgraph=True)
    assert torch.equal(f(x).cpu(), oracle(x * 2))
    static = x.clone()
    out = ops.argmax(static)  # warm-up outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.argmax(static)
    for seed in range(3):
        static.copy_(torch.randn(4, 128256, device="cuda", generator=torch.Generator(
            "cuda").manual_seed(seed)).bfloat16())
        g.replay()
        assert torch.equal(out.cpu(), oracle(static))
