"""Test helpers shared by tests/ and bench/: the one per-dtype tolerance table and input makers.

Tests never invent their own tolerances: they call ``assert_close`` (or read ``TOLERANCES``).
"""

import torch

# Where the numbers come from. The kernels and the references perform the same operations in the
# same order per element; they differ only in the float32 reduction order (a few ulps of float32)
# and in rsqrtf (<= 2 ulps of float32). An output is rounded to the dtype at most twice
# (normalize, then weight multiply), so a float32 difference that crosses a rounding boundary moves
# the result by one ulp of the dtype per rounding: allow two ulps, relative to the value.
#   bfloat16: 8 significant bits, ulp <= 2**-7 relative  -> 2 ulps ~ 1.6e-2
#   float16: 11 significant bits, ulp <= 2**-10 relative  -> 2 ulps ~ 2.0e-3
#   float32: reduction order over up to ~1e5 terms and rsqrtf -> ~1e-6; 1e-5 leaves room.
#   float8_e4m3fn (an FP8 output, compared as float values): one rounding to 4 significant
#     bits, ulp <= 2**-3 relative, so a float32 difference (expf, FMA contraction) that crosses
#     a rounding boundary moves one code: 1 ulp; atol is the subnormal step 2**-9.
# atol covers values that round to (near) zero, where a relative bound is meaningless.
TOLERANCES = {
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float8_e4m3fn: dict(atol=2.0 ** -9, rtol=2.0 ** -3),
}


def tolerance(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def softmax_tolerance(dtype: torch.dtype, max_abs_logit: float) -> dict:
    """TOLERANCES[dtype], widened for a softmax over logits of magnitude ``max_abs_logit``: a
    logit is computed with a different rounding sequence in a kernel (base-2 scale, fused bias)
    than in the reference, so each may differ by an ulp of the logit, i.e. a relative change of
    2**-23 * |logit| in its weight. Negligible for logits near 0; with ALiBi, a v2 partition far
    from the sequence's end has logits ~ -300, where float32's ulp is 3e-5 (measured: partition
    outputs off by 1.85e-5 on an H200, the attention output itself within 1e-6 of float64).
    Two such ulps are allowed on top of the dtype's atol."""
    tol = dict(TOLERANCES[dtype])
    tol["atol"] = tol["atol"] + 2 * 2.0 ** -23 * float(max_abs_logit)
    return tol


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None,
                 msg: str = "") -> None:
    """Compare on the CPU with the tolerance of ``dtype`` (default: actual.dtype); NaN fails."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.detach().cpu().to(expected.dtype),
                               expected.detach().cpu(), equal_nan=False,
                               msg=(lambda m: f"{msg}\n{m}") if msg else None, **tol)


def rows_tensor(tokens: int, hidden: int, dtype: torch.dtype, device, *, row_pad: int = 0,
                generator: torch.Generator = None) -> torch.Tensor:
    """Random normal [tokens, hidden]. With ``row_pad`` > 0 it is a row slice of a wider tensor
    (row stride hidden + row_pad): a pad of 64 keeps rows 16-byte aligned (vectorized path with a
    stride), an odd pad breaks the alignment (scalar path)."""
    base = torch.randn(tokens, hidden + row_pad, dtype=torch.float32, generator=generator)
    t = base.to(dtype=dtype, device=device)
    return t[:, :hidden] if row_pad else t


def assert_raises_eager_and_fake(call, exc, fragment: str) -> None:
    """`call()` raises `exc` matching `fragment` eagerly and, through the fake kernel, while
    tracing under FakeTensorMode (the two share one check, so they must agree)."""
    import pytest
    from torch._subclasses.fake_tensor import FakeTensorMode

    with pytest.raises(exc, match=fragment):
        call()
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(exc, match=fragment):
            call()


def rope_cos_sin_cache(max_pos: int, rot_dim: int, dtype: torch.dtype = torch.float32,
                       device="cpu", base: float = 10000.0) -> torch.Tensor:
    """[max_pos, rot_dim] RoPE table: cos of the rot_dim / 2 frequencies, then their sin
    (vLLM's cos_sin_cache layout), computed in float64."""
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype=dtype, device=device)


def special_gate_up_rows(group_size: int, groups: int, *, up_inf: bool = False,
                         generator: torch.Generator = None) -> torch.Tensor:
    """Two float32 rows ``[gate | up]`` and ``[up | gate]`` of gated-activation input whose
    ``group_size``-column groups hold the special cases of the quantization kernels: an all-zero
    gate group, one NaN, an all-NaN group, +inf, -inf, an all-zero up group (``groups >= 6``), and
    with ``up_inf`` an inf in the up half of group 6 (``groups >= 7``)."""
    inf, nan = float("inf"), float("nan")
    gs = group_size
    g = torch.randn(groups * gs, generator=generator)
    u = torch.randn(groups * gs, generator=generator)
    g[0:gs] = 0.0
    g[gs + 3] = nan
    g[2 * gs:3 * gs] = nan
    g[3 * gs + 5] = inf
    g[4 * gs + 7] = -inf
    u[5 * gs:6 * gs] = 0.0
    if up_inf:
        u[6 * gs + 1] = inf
    return torch.stack([torch.cat([g, u]), torch.cat([u, g])])


def ordered_codes(q: torch.Tensor) -> torch.Tensor:
    """FP8 (float8_e4m3fn) or INT8 codes as int32 in value order (FP8: sign-magnitude to two's
    complement), so adjacent representable values differ by one."""
    if q.dtype == torch.float8_e4m3fn:
        b = q.view(torch.uint8).to(torch.int32)
        mag = b & 0x7F
        return torch.where(b >= 0x80, -mag, mag)
    return q.to(torch.int32)


def quant_mismatch(got: torch.Tensor, want: torch.Tensor, *, source: torch.Tensor = None,
                   scales: torch.Tensor = None, want_scales: torch.Tensor = None,
                   limit: int = 4) -> str:
    """Why two quantized outputs (FP8 or INT8, any device, same shape) differ, for an assertion
    message: how many codes differ, the largest code distance, and the first ``limit`` positions
    with both codes, their values, the source value there (``source``: the tensor that was
    quantized, e.g. the normalized rows) and the row's scales (``scales`` / ``want_scales``:
    [rows, groups], the group found from the column). Empty string when they are equal. A GPU
    run that fails a byte-exact test then says in one line whether a scale, a single rounding or
    the data path is off."""
    g, w = got.detach().cpu(), want.detach().cpu()
    if g.shape != w.shape:
        return f"shapes differ: got {tuple(g.shape)}, want {tuple(w.shape)}"
    if g.numel() == 0:
        return ""
    fp8 = g.dtype == torch.float8_e4m3fn
    gb = g.view(torch.uint8) if fp8 else g
    wb = w.view(torch.uint8) if w.dtype == torch.float8_e4m3fn else w
    g2, w2, gf, wf = (t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)
                      for t in (gb, wb, g.float(), w.float()))
    diff = (g2 != w2).nonzero()
    if diff.numel() == 0:
        if scales is not None and want_scales is not None:
            sg, sw = scales.detach().cpu().float(), want_scales.detach().cpu().float()
            bad = (sg.reshape(-1) != sw.reshape(-1)) & ~(sg.reshape(-1).isnan()
                                                         & sw.reshape(-1).isnan())
            if bad.any():
                i = int(bad.nonzero()[0])
                return (f"codes equal; {int(bad.sum())} of {bad.numel()} scales differ, first "
                        f"at flat index {i}: got {sg.reshape(-1)[i].item()!r}, want "
                        f"{sw.reshape(-1)[i].item()!r}")
        return ""

    shape2 = g2.shape
    dist = (ordered_codes(g.reshape(shape2)) - ordered_codes(w.reshape(shape2))).abs().max().item()
    src = None if source is None else source.detach().cpu().float().reshape(g2.shape)
    parts = [f"{diff.shape[0]} of {g2.numel()} codes differ (max code distance {dist})"]
    for r, c in diff[:limit].tolist():
        s = f"[{r}, {c}]: got {int(g2[r, c])} ({gf[r, c].item()!r}) want {int(w2[r, c])} " \
            f"({wf[r, c].item()!r})"
        if src is not None:
            s += f" source {src[r, c].item()!r}"
        for name, sc in (("scale", scales), ("want scale", want_scales)):
            if sc is not None:
                sc2 = sc.detach().cpu().float().reshape(g2.shape[0], -1)
                gsz = max(1, g2.shape[1] // sc2.shape[1])
                s += f" {name} {sc2[r, min(c // gsz, sc2.shape[1] - 1)].item()!r}"
        parts.append(s)
    return "; ".join(parts)
