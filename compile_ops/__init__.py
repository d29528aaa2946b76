"""compile_ops: vLLM's hot-path kernels as torch.library custom ops for torch.compile.

``import compile_ops`` registers every op under ``torch.ops.compile_ops``. Each op has a fake
kernel (for tracing), a pure-PyTorch reference body (the CPU kernel and test oracle) and, when the
extension is built, a CUDA kernel. See README.md for the op table.
"""

from compile_ops._extension import kernels_available, kernels_unavailable_reason
from compile_ops.activation import (
    fatrelu_and_mul,
    gelu_and_mul,
    gelu_tanh_and_mul,
    mul_and_silu,
    silu_and_mul,
    swigluoai_and_mul,
)
from compile_ops.activation_quant import silu_and_mul_per_block_quant, silu_and_mul_quant
from compile_ops.allreduce_norm import fused_allreduce_add_rms_norm
from compile_ops.attention import merge_attn_states
from compile_ops.cache import (
    convert_fp8,
    cp_gather_cache,
    gather_and_maybe_dequant_cache,
    reshape_and_cache,
    reshape_and_cache_flash,
    swap_blocks,
)
from compile_ops.mla import (
    concat_and_cache_mla,
    concat_and_cache_mla_rope_fused,
    cp_gather_and_upconvert_fp8_kv_cache,
    cp_gather_indexer_k_quant_cache,
    indexer_k_quant_and_cache,
)
from compile_ops.norm import fused_add_rms_norm, fused_add_rms_norm_out, rms_norm
from compile_ops.norm_quant import (
    fused_add_rms_norm_static_fp8_quant,
    rms_norm_dynamic_per_token_quant,
    rms_norm_per_block_quant,
    rms_norm_static_fp8_quant,
)
from compile_ops.quant import per_token_group_quant_fp8, scaled_fp8_quant
from compile_ops.rope_cache import fused_rope_and_cache, fused_rope_and_cache_flash
from compile_ops.rotary import rotary_embedding
from compile_ops.sampling import argmax
from compile_ops.static_cache import static_cache_attention

__version__ = "0.1.0"

__all__ = [
    "disable",
    "enable",
    "enabled",
    "kernels_available",
    "kernels_unavailable_reason",
    "registered_ops",
    "rms_norm",
    "fused_add_rms_norm",
    "fused_add_rms_norm_out",
    "silu_and_mul",
    "mul_and_silu",
    "gelu_and_mul",
    "gelu_tanh_and_mul",
    "fatrelu_and_mul",
    "swigluoai_and_mul",
    "silu_and_mul_quant",
    "silu_and_mul_per_block_quant",
    "scaled_fp8_quant",
    "rms_norm_static_fp8_quant",
    "fused_add_rms_norm_static_fp8_quant",
    "rms_norm_dynamic_per_token_quant",
    "rms_norm_per_block_quant",
    "per_token_group_quant_fp8",
    "rotary_embedding",
    "reshape_and_cache",
    "reshape_and_cache_flash",
    "swap_blocks",
    "convert_fp8",
    "gather_and_maybe_dequant_cache",
    "cp_gather_cache",
    "fused_rope_and_cache_flash",
    "fused_rope_and_cache",
    "merge_attn_states",
    "concat_and_cache_mla",
    "concat_and_cache_mla_rope_fused",
    "cp_gather_and_upconvert_fp8_kv_cache",
    "indexer_k_quant_and_cache",
    "cp_gather_indexer_k_quant_cache",
    "argmax",
    "static_cache_attention",
    "fused_allreduce_add_rms_norm",
]


def enable() -> None:
    """Run compile_ops' fusion passes in the default ``inductor`` backend too."""
    import lowerings

    lowerings.enable()


def disable() -> None:
    """Stop running the fusion passes in the default ``inductor`` backend."""
    import lowerings

    lowerings.disable()


class enabled:
    """Context manager: ``with compile_ops.enabled(): torch.compile(model)(x)``."""

    def __enter__(self):
        enable()
        return self

    def __exit__(self, *exc):
        disable()
        return False


def registered_ops() -> list[str]:
    """Qualified names of the ops this package registers, e.g. ``compile_ops::rms_norm``."""
    import torch

    ns = torch.ops.compile_ops
    names = []
    for name in sorted(dir(ns)):
        packet = getattr(ns, name, None)
        if isinstance(packet, torch._ops.OpOverloadPacket):
            names.append(f"compile_ops::{name}")
    return names


from compile_ops._extension import _warn_if_gpu_without_kernels as _w  # noqa: E402

_w()
del _w
