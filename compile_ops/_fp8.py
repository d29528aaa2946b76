"""FP8 / INT8 activation-quantization numerics shared by the quant ops' references (the oracle
for every CUDA kernel; vLLM's kernels are the spec, see csrc/include/compile_ops/quant.cuh).

    to_fp8(y)        fp32 -> float8_e4m3fn: clamp fmax(-448, fmin(y, 448)) (NaN -> +448), then
                     round to nearest even
    to_fp8_clamp_lo_first(y)  per_token_group_fp8_quant's order fminf(fmaxf(y, lo), hi): NaN -> lo
    to_int8(y)       fp32 -> int8: round half to even, saturate to [-128, 127], NaN -> 0
"""

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# vLLM's min_scaling_factor (fp32): 1 / (448 * 512) for FP8, FLT_EPSILON for INT8.
FP8_MIN_SCALE = float(torch.tensor(1.0 / (448.0 * 512.0), dtype=torch.float32))
INT8_MAX = 127.0
INT8_MIN_SCALE = float(torch.finfo(torch.float32).eps)


def to_fp8(y: torch.Tensor) -> torch.Tensor:
    """float32 -> float8_e4m3fn as vLLM's CUDA kernels: fmaxf(-448, fminf(y, 448)) turns NaN
    into +448; the clamped value is rounded to nearest even (exact for CPU and CUDA casts)."""
    y = y.float()
    y = torch.where(torch.isnan(y), torch.full_like(y, FP8_MAX), y.clamp(-FP8_MAX, FP8_MAX))
    return y.to(FP8_DTYPE)


def to_fp8_clamp_lo_first(y: torch.Tensor, lo: float = -FP8_MAX,
                          hi: float = FP8_MAX) -> torch.Tensor:
    """float32 -> float8_e4m3fn with per_token_group_fp8_quant's clamp order
    fminf(fmaxf(y, lo), hi): fmaxf(NaN, lo) is lo, so NaN becomes `lo` (-448)."""
    y = y.float()
    y = torch.where(torch.isnan(y), torch.full_like(y, lo), y.clamp(lo, hi))
    return y.to(FP8_DTYPE)


def to_int8(y: torch.Tensor) -> torch.Tensor:
    """float32 -> int8: round half to even, saturate to [-128, 127], NaN -> 0 (PTX
    cvt.rni.sat.s8.f32)."""
    y = y.float()
    y = torch.where(torch.isnan(y), torch.zeros_like(y), y.clamp(-128.0, 127.0).round())
    return y.to(torch.int8)
